"""What the model replicas (Perception, Decision, Reaction) share: start-up, the engine thread, outboxes."""
