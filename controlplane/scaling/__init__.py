"""Autoscaling: the policy (pure), the decider, scale to zero, and the backends that carry decisions out."""
