"""The Open Inference Protocol codec on plain data, against request bodies Triton's own client builds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton

from contract import oip


def triton_body(binary: bool, **arrays: np.ndarray) -> tuple[bytes, str | None]:
    """What tritonclient sends for these inputs (binary: its default binary tensor extension)."""
    inputs = []
    for name, array in arrays.items():
        datatype = "BYTES" if array.dtype == object else triton.np_to_triton_dtype(array.dtype)
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, request_id="r-1")
    return body, (str(json_size) if json_size is not None else None)


@pytest.mark.parametrize("binary", [False, True])
def test_tensors_from_tritons_client_become_the_fields_predict_sees(binary: bool) -> None:
    body, length = triton_body(
        binary,
        text=np.array(["the pasta was delicious"], dtype=object),
        x=np.array([[1.5, 2.0], [3.0, 4.25]], dtype=np.float32),
        ids=np.array([7, 8, 9], dtype=np.int64),
        flag=np.array([True]),
    )
    payload, request_id = oip.decode_request(body, length)
    assert payload == {
        "text": "the pasta was delicious",
        "x": [[1.5, 2.0], [3.0, 4.25]],
        "ids": [7, 8, 9],
        "flag": True,
    }
    assert request_id == "r-1"


def test_answers_become_typed_tensors_and_anything_else_json_text() -> None:
    output = {
        "label": "positive",
        "score": 0.93,
        "n": 3,
        "ok": True,
        "m": [[1, 2], [3, 4]],
        "mix": [1, 2.5],
        "nested": {"a": 1},
        "ragged": [[1], [2, 3]],
        "none": None,
    }
    response = oip.encode_response("nlp", "3", output, "r-1")
    tensors = {t["name"]: t for t in response["outputs"]}
    assert (response["model_name"], response["model_version"], response["id"]) == ("nlp", "3", "r-1")
    assert [t["name"] for t in response["outputs"]] == list(output)
    assert tensors["label"] == {"name": "label", "shape": [1], "datatype": "BYTES", "data": ["positive"]}
    assert (tensors["score"]["datatype"], tensors["n"]["datatype"], tensors["ok"]["datatype"]) == (
        "FP64",
        "INT64",
        "BOOL",
    )
    assert (tensors["m"]["shape"], tensors["m"]["data"]) == ([2, 2], [1, 2, 3, 4])
    assert (tensors["mix"]["datatype"], tensors["mix"]["data"]) == ("FP64", [1.0, 2.5])
    for name in ("nested", "ragged", "none"):
        assert tensors[name]["parameters"] == {"content_type": "json"}
        assert json.loads(tensors[name]["data"][0]) == output[name]
    result = triton.InferResult.from_response_body(json.dumps(response).encode())  # Triton's client reads it
    assert result.as_numpy("m").tolist() == [[1, 2], [3, 4]]
    assert result.as_numpy("label").tolist() == ["positive"]


@pytest.mark.parametrize(
    "body, length, message",
    [
        (b"not json", None, "the request is not JSON"),
        (b"[]", None, "expected an object with a non-empty 'inputs' list"),
        (b'{"inputs": []}', None, "non-empty 'inputs' list"),
        (
            b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1]}]}',
            None,
            "inputs[0]: shape [2] holds 2 elements, data has 1",
        ),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP99", "data": [1]}]}', None, "inputs[0].datatype"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": ["1"]}]}', None, "are integers"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BOOL", "data": [1]}]}', None, "true or false"),
        (b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}', None, "non-negative"),
        (
            b'{"inputs": [{"name": "x", "shape": [100000, 100000], "datatype": "FP32", "data": []}]}',
            None,
            "at most 32 dimensions and 10000000 elements",
        ),
        (b'{"inputs": [{"name": "x\\n", "shape": [1], "datatype": "FP32", "data": [1]}]}', None, "inputs[0].name"),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},'
            b'{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}',
            None,
            "appears twice",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}ab',
            "100",
            "runs past the end of the body",
        ),
        (b'{"inputs": []}', "9999", "does not fit a body"),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 6}}]}'
            b"\xff\x00\x00\x00ab",
            "101",
            "a BYTES element runs past",
        ),
        (
            b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": '
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}]}",
            None,
            "not JSON",
        ),
    ],
)
def test_malformed_requests_are_refused_with_what_is_wrong(body: bytes, length: str | None, message: str) -> None:
    with pytest.raises(oip.BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        oip.decode_request(body, length)


def test_errors_pass_through_and_only_a_json_object_answer_is_reencoded() -> None:
    error = b'{"error": "stage x failed"}'
    assert oip.reencode(502, error, "p", "1") == error
    assert json.loads(oip.reencode(200, b'{"a": 1}', "p", "1"))["outputs"][0]["data"] == [1]
    assert oip.reencode(200, b"[1]", "p", "1") == b"[1]"


def test_deeply_nested_data_is_read_without_recursion() -> None:
    data = "[" * 500 + "1.5" + "]" * 500
    body = '{"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": ' + data + "}]}"
    assert oip.decode_request(body.encode()) == ({"x": 1.5}, "")


def test_what_we_send_an_oip_stage_decodes_back_to_the_same_object() -> None:
    payload = {"x": [[5.1, 3.5, 1.4, 0.2]], "text": "hi", "n": 2, "meta": {"a": [1, "b"]}}
    body = json.dumps(oip.encode_request(payload)).encode()
    assert oip.decode_request(body) == (payload, "")
    answer = json.dumps(
        {
            "model_name": "iris",
            "outputs": [
                {"name": "predict", "shape": [1, 1], "datatype": "INT64", "data": [2]},
                {"name": "proba", "shape": [1, 3], "datatype": "FP64", "data": [0.1, 0.2, 0.7]},
            ],
        }
    ).encode()
    assert oip.decode_response(answer) == {"predict": 2, "proba": [[0.1, 0.2, 0.7]]}
    with pytest.raises(oip.BadRequest, match="no 'outputs' list"):
        oip.decode_response(b'{"error": "x"}')


def test_a_large_tensor_answer_is_typed_as_each_element_says_without_a_call_per_element() -> None:
    """The per-type shortcut of encode_response (one sum over a million floats) types every list as reading each
    element would: a NaN or infinity anywhere, a sum that overflows, an int past 64 bits, bools with ints, a
    float subclass (numpy's float64 is one) all come out as before."""

    class Real(float):
        pass

    million = [float(i % 7) for i in range(1_000_000)]
    cases = {
        "floats": (million, ("FP64", [1_000_000])),
        "a NaN at the end": ([*million[:-1], float("nan")], ("BYTES", [1])),
        "an infinity first": ([float("-inf"), *million[1:]], ("BYTES", [1])),
        "a sum that overflows": ([1e308] * 4, ("FP64", [4])),
        "an int past 64 bits": ([1, 2**64], ("BYTES", [1])),
        "ints": (list(range(1000)), ("INT64", [1000])),
        "bools with ints": ([True, 1], ("BYTES", [1])),
        "a float subclass": ([Real(1.5), Real(2.5)], ("FP64", [2])),
        "rows": ([[1.0, 2.0], [3.0, 4.0]], ("FP64", [2, 2])),
        "ragged rows": ([[1.0, 2.0], [3.0]], ("BYTES", [1])),
        "texts": (["a", "b"], ("BYTES", [2])),
    }
    for name, (value, want) in cases.items():
        tensor = oip.encode_response("m", "1", {"x": value})["outputs"][0]
        assert (tensor["datatype"], tensor["shape"]) == want, name
