"""One client's session at the Gateway: its input side, its event relay and its recovery (stream_session.py)."""
