"""Model monitoring: the runtimes' field profiles merged per model version, baselines and drift."""
