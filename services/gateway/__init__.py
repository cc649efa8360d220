"""The Gateway: the public LiveStream call, its stream sessions, batched hops to the pools, the gRPC server,
the browser front, and resume after a broken connection."""
