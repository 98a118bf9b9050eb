"""The Open Inference Protocol over gRPC at the gateway: tritonclient.grpc unchanged, and every refusal a gRPC
status with the reason (controlplane/edge). Translation tested pure; the rest through a real gateway Envoy,
the control plane's front and real runtimes."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane._gen.mllambda.oip.v2 import inference_pb2 as pb
from controlplane.edge import oip_grpc as t
from controlplane.node import processes
from tests.helpers.pipelines import apply, pipeline, until_ok
from tests.helpers.triton import infer_with_triton_grpc


def raw_bytes(*texts: str) -> bytes:
    return b"".join(struct.pack("<I", len(x.encode())) + x.encode() for x in texts)


def test_raw_tensors_stay_bytes_and_typed_ones_become_data() -> None:
    request = pb.ModelInferRequest(model_name="words", id="r1")
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    request.inputs.add(name="x", datatype="FP32", shape=[2])
    request.raw_input_contents.extend([raw_bytes("one two"), struct.pack("<2f", 1.5, 2.5)])
    body, length = t.infer_body(request)
    head = body[:length].decode()
    assert '"binary_data_size": 11' in head and '"id": "r1"' in head
    assert body[length:] == raw_bytes("one two") + struct.pack("<2f", 1.5, 2.5)

    typed = pb.ModelInferRequest(model_name="words")
    typed.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"one two")
    typed.inputs.add(name="n", datatype="INT32", shape=[2]).contents.int_contents.extend([3, 4])
    body, length = t.infer_body(typed)
    assert length == len(body) and b'"data": ["one two"]' in body and b'"data": [3, 4]' in body


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda r: r.raw_input_contents.extend([b"", b""]), "raw_input_contents holds 2 tensors for 1 inputs"),
        (lambda r: r.inputs[0].contents.bytes_contents.append(b"\xff\xfe"), "BYTES elements must be UTF-8 text"),
        (lambda r: r.inputs[0].MergeFrom(pb.ModelInferRequest.InferInputTensor(datatype="COMPLEX")), "is unknown"),
        (
            lambda r: (r.inputs[0].contents.bytes_contents.append(b"a"), r.raw_input_contents.append(b"")),
            "contents and raw_input_contents both given",
        ),
    ],
)
def test_requests_that_cannot_be_sent_on_are_invalid_arguments(build: Any, reason: str) -> None:
    request = pb.ModelInferRequest(model_name="words")
    request.inputs.add(name="text", datatype="BYTES", shape=[1])
    build(request)
    with pytest.raises(t.Refused) as refused:
        t.infer_body(request)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT and reason in str(refused.value)


def test_answers_become_raw_tensors_and_refusals_grpc_statuses() -> None:
    answer = b"""{"model_name": "words", "model_version": "3", "outputs": [
        {"name": "count", "datatype": "INT64", "shape": [1], "data": [3]},
        {"name": "tokens", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]},
        {"name": "m", "datatype": "FP64", "shape": [2, 1], "data": [[0.5], [1.5]]}]}"""
    response = t.infer_response(answer)
    assert [o.name for o in response.outputs] == ["count", "tokens", "m"] and response.model_version == "3"
    assert response.raw_output_contents[0] == struct.pack("<q", 3)
    assert response.raw_output_contents[1] == raw_bytes("a", "b")
    assert response.raw_output_contents[2] == struct.pack("<2d", 0.5, 1.5)
    with pytest.raises(t.Refused) as bad:
        t.infer_response(b'{"outputs": [{"name": "n", "datatype": "INT64", "shape": [3], "data": [1]}]}')
    assert bad.value.code == grpc.StatusCode.INTERNAL

    for status, code in (
        (400, "INVALID_ARGUMENT"),
        (404, "NOT_FOUND"),
        (413, "RESOURCE_EXHAUSTED"),
        (503, "UNAVAILABLE"),
        (418, "UNKNOWN"),
    ):
        refused = t.refusal(status, b'{"error": "why ' + b"x" * 5000 + b'"}')
        assert refused.code.name == code and str(refused).startswith("why x") and len(str(refused)) < 1100
    assert "HTTP 502" in str(t.refusal(502, b"<html>bad gateway</html>"))


@pytest.mark.parametrize("name", ["", "../admin", "a/b", "words\nx", "x" * 300, ".."])
def test_a_model_name_that_is_no_pipeline_name_never_reaches_a_path(name: str) -> None:
    with pytest.raises(t.Refused) as refused:
        t.model_path(name)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_caller_metadata_reaches_the_gateway_as_headers_but_never_what_is_the_gateways_or_grpcs_own() -> None:
    from controlplane.edge.front import MAX_FORWARDED, forwarded

    metadata = [
        ("x-tenant", "gold"),
        ("x-request-id", "r1"),
        ("authorization", "Bearer t"),
        ("trace-bin", b"\x00\x01"),
        ("x-mll-caller", "light"),
        ("x-mll-priority", "critical"),
        ("x-mll-share", "100"),
        ("grpc-timeout", "1S"),
        ("x-envoy-upstream-rq-timeout-ms", "1"),
        ("x-forwarded-for", "10.0.0.1"),
        ("user-agent", "grpc-python"),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
        (":authority", "x"),
        ("host", "elsewhere"),
    ]
    assert forwarded(metadata) == {"x-tenant": "gold", "x-request-id": "r1", "authorization": "Bearer t"}
    many = [(f"k{i}", "v") for i in range(MAX_FORWARDED + 10)]
    assert len(forwarded(many)) == MAX_FORWARDED  # bounded


@pytest.fixture
def oip_plane(control_plane: Any) -> Any:
    """The control plane, restarted with its OIP gRPC front."""
    control_plane.stop()
    control_plane.extra_args = [*control_plane.extra_args, f"--oip-grpc=127.0.0.1:{processes.free_port()}"]
    return control_plane.start()


async def call(port: int, body: bytes, method: str = "ModelInfer") -> grpc.aio.AioRpcError | bytes:
    """One call with bytes we chose (a client library would refuse to send the hostile ones)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        rpc = channel.unary_unary(f"/{t.SERVICE}/{method}")
        try:
            return bytes(await rpc(body, timeout=10))
        except grpc.aio.AioRpcError as err:
            return err


@pytest.mark.slow
async def test_tritonclient_grpc_through_the_gateway_and_every_refusal_a_status_with_its_reason(
    oip_plane: Any, gateway: Any, three_stages: Any, tmp_path: Path
) -> None:
    port = oip_plane.gateway_port
    apply(oip_plane, tmp_path, {**pipeline("words"), "max_body": "2Ki"})
    _, over_http, _ = await until_ok(f"http://127.0.0.1:{port}/pipelines/words", {"text": "one two three"})
    over_grpc = await asyncio.to_thread(infer_with_triton_grpc, port, "words", "one two three")
    assert over_grpc == over_http == {"count": 3, "score": 30}

    def infer(text: str | bytes, shape: int = 1, model: str = "words", raws: int = 1) -> bytes:
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="text", datatype="BYTES", shape=[shape])
        payload = text if isinstance(text, bytes) else raw_bytes(text)
        request.raw_input_contents.extend([payload] * raws)
        return request.SerializeToString()

    typed = pb.ModelInferRequest(model_name="words")
    typed.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"a b c d")
    answer = await call(port, typed.SerializeToString())
    assert isinstance(answer, bytes), answer
    outputs = pb.ModelInferResponse.FromString(answer)
    assert dict(zip([o.name for o in outputs.outputs], outputs.raw_output_contents, strict=True))[
        "score"
    ] == struct.pack("<q", 40)

    cases = {  # what a caller does wrong -> (the status, words of the reason it reads)
        "not a protobuf": (b"\xff\xff\xff\xff", "INVALID_ARGUMENT", "not a ModelInferRequest"),
        "shape says 2, one element": (infer("a b", shape=2), "INVALID_ARGUMENT", "inputs[0]"),
        "two raw tensors for one input": (infer("a", raws=2), "INVALID_ARGUMENT", "raw_input_contents holds 2"),
        "raw bytes cut short": (infer(b"\x09\x00\x00\x00abc"), "INVALID_ARGUMENT", "runs past its binary data"),
        "no such pipeline": (infer("a", model="nope"), "NOT_FOUND", "no such pipeline"),
        "a path for a name": (infer("a", model="../v2/health/ready"), "INVALID_ARGUMENT", "a pipeline's name"),
        "over max_body": (infer("word " * 600), "RESOURCE_EXHAUSTED", "max_body of pipeline words"),
    }
    seen = {}
    for case, (body, _, _) in cases.items():
        found = await call(port, body)
        assert isinstance(found, grpc.aio.AioRpcError), (case, found)
        seen[case] = (found.code().name, found.details())
    for case, (_, code, words) in cases.items():
        assert seen[case][0] == code and words in seen[case][1], (case, seen[case])

    # The model's own refusal (tokenize wants a string: a number is not one) arrives with its words.
    number = pb.ModelInferRequest(model_name="words")
    number.inputs.add(name="text", datatype="INT64", shape=[1]).contents.int64_contents.append(7)
    refused = await call(port, number.SerializeToString())
    assert isinstance(refused, grpc.aio.AioRpcError) and refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected {'text': '<a string>'}" in refused.details(), refused.details()
    unknown = await call(port, b"", method="RepositoryIndex")  # a method of the protocol we do not serve
    assert isinstance(unknown, grpc.aio.AioRpcError) and unknown.code() == grpc.StatusCode.UNIMPLEMENTED

    # A pipeline's fairness header travels as gRPC metadata: each tenant has its own quota at the gateway (they
    # used to share the front's), and a forged x-mll-share is not carried.
    quota = {"per_second": 1, "burst": 2}
    tenants = {**pipeline("tenants"), "fairness": {"header": "x-tenant"}, "rate_limit": quota}
    apply(oip_plane, tmp_path, tenants)
    await until_ok(f"http://127.0.0.1:{port}/pipelines/tenants", {"text": "a"})  # in traffic (its own key: no header)

    async def as_tenant(tenant: str, forged: str = "") -> str:
        extra = (("x-mll-share", forged),) if forged else ()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            rpc = channel.unary_unary(f"/{t.SERVICE}/ModelInfer")
            try:
                await rpc(infer("a b", model="tenants"), timeout=10, metadata=(("x-tenant", tenant), *extra))
                return "OK"
            except grpc.aio.AioRpcError as err:
                return f"{err.code().name}: {err.details()}"

    heavy = [await as_tenant("heavy", forged="100") for _ in range(4)]  # at most one more token in between
    refused = [answer for answer in heavy[2:] if answer.startswith("RESOURCE_EXHAUSTED")]
    assert heavy[:2] == ["OK", "OK"] and refused, heavy  # its burst of 2, not 200 (x-mll-share was not carried)
    assert "over the pipeline's rate limit" in refused[0], refused
    assert await as_tenant("light") == "OK"  # another tenant's quota is its own (no longer the front's, shared)
