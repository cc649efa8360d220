"""Training and evaluation data for LIVE models: the streaming-dialogue format, synthetic clips, and labels."""
