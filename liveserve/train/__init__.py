"""Training and evaluation of LIVE models: metrics first."""
