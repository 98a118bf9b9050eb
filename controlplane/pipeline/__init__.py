"""Pipelines: the domain objects, their one validator and their store in Consul KV."""
