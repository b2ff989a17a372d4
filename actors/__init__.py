"""The data plane: engine, batcher, KV cache, model runner; later the router and expert-group actors."""
