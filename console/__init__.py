"""What the operator runs: the `mlx-cluster` CLI, the async cluster client, the local
cluster launcher (and later discovery, benchmarks, reports and the Textual dashboard)."""
