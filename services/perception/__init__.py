"""Perception: the batched frame encoder (vision tower + connector) shared by a model's sessions."""
