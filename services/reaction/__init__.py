"""Reaction: the asynchronous reply writer with its own per-session cache."""
