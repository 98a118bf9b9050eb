"""Pure translation: pipelines + endpoints -> Envoy resources. No I/O here."""
