"""The LIVE family's session: a streaming-EOS decision per frame over one continuous cache, its input side,
its cache machinery, its reply roles and its restore after a move."""
