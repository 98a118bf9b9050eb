"""ML Lambda control plane: pipelines in, Envoy configuration out."""

__version__ = "0.1.0"
