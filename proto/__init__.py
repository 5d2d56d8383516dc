"""pdserve.proto: protobuf schemas and gRPC stubs (not yet built)."""
