"""The gateway: the public gRPC contract in front of the generator and embedder backends."""
