"""gRPC front door, protocol layer: the KServe v2 / Triton `inference.GRPCInferenceService` (`kserve`),
its generated messages (`kserve_pb2`, from `kserve.proto` by `codegen`), health and reflection
(`services`). Pure: no Ray, and nothing here starts a server."""
