"""What the control plane reads from or keeps in Consul beside pipelines: runtimes, presence, locks, certs."""
