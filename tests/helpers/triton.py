"""Triton's own clients (tritonclient.http and .grpc) against a gateway, as a KServe or Triton user runs them."""

from __future__ import annotations

from typing import Any


def infer_with_triton(port: int, model: str, text: str) -> dict[str, object]:
    """One inference through the gateway with tritonclient, as a KServe/Triton user would; outputs by name."""
    import numpy as np
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
    about = client.get_model_metadata(model)
    assert about["name"] == model, about
    tensor = triton.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([text], dtype=object))  # binary tensor extension, Triton's default
    result = client.infer(model, [tensor])
    found = {}
    for output in result.get_response()["outputs"]:
        value = result.as_numpy(output["name"]).reshape(-1)[0]
        if isinstance(value, bytes):
            value = value.decode()
        found[output["name"]] = value.item() if hasattr(value, "item") else value
    client.close()
    return found


def infer_with_triton_grpc(port: int, model: str, text: str) -> dict[str, Any]:
    """tritonclient.grpc as a Triton or KServe user runs it: health, metadata, then one inference."""
    import numpy as np
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(model)
        assert client.get_model_metadata(model).name == model
        tensor = triton.InferInput("text", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([text.encode()], dtype=object))
        result = client.infer(model, [tensor])
        found: dict[str, Any] = {}
        for output in result.get_response().outputs:
            value = result.as_numpy(output.name).reshape(-1)[0]
            found[output.name] = value.decode() if isinstance(value, bytes) else value.item()
        return found
    finally:
        client.close()
