"""What several test files share: waiting on conditions, Envoy admin reads, test hosts, test models."""
