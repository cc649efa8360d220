"""Decision: each session's KV cache and its per-frame streaming-EOS decision; rebuilding a moved session."""
