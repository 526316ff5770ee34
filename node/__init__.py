"""Everything that runs on a cluster machine: the node service, the MLX shard engine,
the pipeline data plane and the pure planning math. Never imports `console` or Textual."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 2  # 2: chat messages, stop strings and continuations in GenerateRequest
