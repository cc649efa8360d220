"""Session state outside the replicas: the Redis registry, the embedded Redis server, transcripts."""
