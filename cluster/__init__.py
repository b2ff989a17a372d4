"""The front door: CLI, serving config, deployment, gRPC / HTTP APIs, telemetry."""
