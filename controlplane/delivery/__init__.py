"""Getting a pipeline version to every Envoy and into traffic: the switch, reconcile, ACKs, rollouts."""
