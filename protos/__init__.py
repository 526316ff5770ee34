"""Generated gRPC/protobuf modules for `cluster.proto` (regenerate with `make protos`)."""
