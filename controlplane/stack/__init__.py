"""The local stack: its file, `mllambda up/down`, and the same stack rendered for Kubernetes."""
