"""The admin API (gRPC) and the CLI commands built on it."""
