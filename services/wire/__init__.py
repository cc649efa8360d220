"""The messages between the Gateway and the pools: typed contracts, their protobuf codec, tensors on the wire,
the seams (Protocols) and their two transports, and what a client is told on an internal error."""
