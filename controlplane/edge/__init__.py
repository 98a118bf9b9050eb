"""What the gateway's callers reach that the control plane serves beside Envoy: the Open Inference Protocol
over gRPC, translated to the gateway's own OIP over HTTP."""
