"""Stages that do not fit each other are refused at apply, from the contracts of the model versions they name."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.pipeline.contracts import coverage, problems
from controlplane.pipeline.spec import parse_pipeline
from tests.helpers.components import ControlPlaneProc


def contract(reads: list[str], answers: list[str]) -> dict[str, Any]:
    field = lambda n: {"name": n, "datatype": "ANY", "shape": [-1]}  # noqa: E731
    return {"inputs": [field(n) for n in reads], "outputs": [field(n) for n in answers]}


CONTRACTS = {
    ("features", "v1"): contract(["text"], ["tfidf"]),
    ("classifier", "v1"): contract(["tfidf"], ["category", "confidence", "tfidf"]),  # passes the features on
    ("classifier", "v2"): contract(["tfidf"], ["label"]),  # answers another name
    ("net", "v1"): contract(["tfidf"], ["sentiment"]),
    ("net", "v2"): contract(["embedding"], ["sentiment"]),
}


def pipeline(classify: list[dict[str, Any]], network: list[dict[str, Any]]) -> Any:
    return parse_pipeline(
        {
            "name": "p",
            "stages": [
                {"name": "features", "variants": [{"model": "features", "version": "v1"}]},
                {"name": "classify", "variants": classify},
                {"name": "network", "branch_on": "category", "branches": [{"key": "sports", "variants": network}]},
            ],
        }
    )


def test_stages_that_fit_pass_and_each_misfit_is_named_with_its_path() -> None:
    good = pipeline([{"model": "classifier", "version": "v1"}], [{"model": "net", "version": "v1"}])
    assert problems(good, CONTRACTS) == []
    # net:v1 reads tfidf, which the classifier does not pass on; net:v2 reads what nobody answers
    bad = pipeline([{"model": "classifier", "version": "v1"}], [{"model": "net", "version": "v2"}])
    assert [str(p) for p in problems(bad, CONTRACTS)] == [
        "stages[2].branches[0].variants[0]: net:v2 reads 'embedding', which stage 'classify' never answers "
        "(it answers: category, confidence, tfidf)",
    ]
    # a split whose second variant does not answer `category`: the branch cannot be picked for its answers
    split = [
        {"model": "classifier", "version": "v1", "weight": 90},
        {"model": "classifier", "version": "v2", "weight": 10},
    ]
    found = [str(p) for p in problems(pipeline(split, [{"model": "net", "version": "v1"}]), CONTRACTS)]
    assert found[0] == "stages[2].branch_on: 'category' is not answered by stage 'classify' (it answers: nothing)"
    assert len(found) == 2 and "reads 'tfidf'" in found[1]


def test_branch_keys_outside_the_answered_values_and_input_misfits_are_refused() -> None:
    from controlplane.models.contract import read_contract

    said: list[str] = []
    category = {"type": "BYTES", "enum": ["sports", "tech"]}
    enum = read_contract({"reads": {"tfidf": "ANY"}, "answers": {"category": category, "tfidf": "ANY"}}, said)
    assert said == [] and enum["outputs"][0]["enum"] == ["sports", "tech"]
    contracts = {**CONTRACTS, ("classifier", "v3"): enum}
    spec = {
        "name": "p",
        "input": {"text": "BYTES"},
        "stages": [
            {"name": "features", "variants": [{"model": "features", "version": "v1"}]},
            {"name": "classify", "variants": [{"model": "classifier", "version": "v3"}]},
            {
                "name": "network",
                "branch_on": "category",
                "branches": [{"key": k, "variants": [{"model": "net", "version": "v1"}]} for k in ("sports", "food")],
            },
        ],
    }
    assert [str(p) for p in problems(parse_pipeline(spec), contracts)] == [
        "stages[2].branches[1].key: 'food' is never answered by stage 'classify' (category is one of: sports, tech)"
    ]
    assert coverage(parse_pipeline(spec), contracts)[0] == "features: checked against the pipeline's input"
    wrong = parse_pipeline({**spec, "input": {"words": "ANY", "lang": "BYTES"}})
    assert next(str(p) for p in problems(wrong, contracts)) == (
        "stages[0].variants[0]: features:v1 reads 'text', which the pipeline's input does not hold (input: lang, words)"
    )
    # a version that declares no values (v1) answers any key: the branch can be taken
    both = [{"model": "classifier", "version": "v3"}, {"model": "classifier", "version": "v1"}]
    either = parse_pipeline(
        {**spec, "stages": [spec["stages"][0], {"name": "classify", "variants": both}, spec["stages"][2]]}
    )
    assert not [p for p in problems(either, contracts) if p.path.endswith(".key")]
    with pytest.raises(Exception, match=r"input.text: 'TEXT' is not one of"):
        parse_pipeline({**spec, "input": {"text": "TEXT"}})
    bad: list[str] = []
    read_contract({"answers": {"c": {"type": "BYTES", "enum": []}, "d": {"type": "BYTES", "values": [1]}}}, bad)
    assert bad == [
        "contract.answers.c.enum: a list of 1 to 256 strings or integers",
        "contract.answers.d: a type, or {type: TYPE, enum: [values]}",
    ]


def test_a_contract_its_own_examples_contradict_is_refused_at_build(tmp_path: Path) -> None:
    from controlplane.models.package import PackageError, read_manifest

    (tmp_path / "model.py").write_text("def predict(payload):\n    return payload\n")
    lines = [
        {"text": "fine"},
        {"request": {"txt": "typo"}, "expected": {"category": "sports"}},
        {"request": {"text": "x"}, "expected": {"category": "weather", "extra": 1}},
        "not an object",
    ]
    (tmp_path / "examples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "{broken\n")
    answers = {"category": {"type": "BYTES", "enum": ["sports"]}}
    manifest = {
        "kind": "Model",
        "entry": "model:predict",
        "examples": "examples.jsonl",
        "contract": {"reads": {"text": "BYTES"}, "answers": answers},
    }
    (tmp_path / "mllambda.yaml").write_text(yaml.safe_dump(manifest))
    with pytest.raises(PackageError) as refused:
        read_manifest(tmp_path, "mllambda.yaml", "")
    assert str(refused.value).splitlines()[1:] == [
        "  examples line 2: the request has no 'text', which the contract reads",
        "  examples line 3: category 'weather' is not one of ['sports']",
        "  examples line 3: the expected answer has 'extra', which the contract does not answer",
    ]
    (tmp_path / "examples.jsonl").write_text(json.dumps({"request": {"text": "a"}, "expected": {"category": "sports"}}))
    assert read_manifest(tmp_path, "mllambda.yaml", "")[0].signature["outputs"][0]["enum"] == ["sports"]


def test_versions_without_contracts_are_unchecked_and_said_so() -> None:
    p = pipeline([{"model": "classifier", "version": "v9"}], [{"model": "net", "version": "v2"}])
    assert problems(p, CONTRACTS) == []  # classifier:v9 has none: nothing is claimed about its answer
    assert coverage(p, CONTRACTS) == [
        "classify: unchecked (no contract for classifier:v9)",
        "network: unchecked (no contract for classifier:v9)",
    ]
    fits = pipeline([{"model": "classifier", "version": "v1"}], [{"model": "net", "version": "v1"}])
    assert coverage(fits, CONTRACTS) == ["classify: checked against features", "network: checked against classify"]


@pytest.mark.slow
def test_apply_refuses_stages_that_do_not_fit_with_every_path(model_plane: ControlPlaneProc, tmp_path: Path) -> None:
    """Code packages declare their contract in the manifest; apply reads them from the store."""
    for name, reads, answers in (
        ("tok", {"text": "BYTES"}, {"tokens": "ANY"}),
        ("cls", {"words": "ANY"}, {"label": "BYTES"}),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.py").write_text("def predict(payload):\n    return payload\n")
        manifest = {"kind": "Model", "entry": "model:predict", "contract": {"reads": reads, "answers": answers}}
        (folder / "mllambda.yaml").write_text(yaml.safe_dump(manifest))
        built = model_plane.cli("build", str(folder), f"--model={name}", "--version=v1", "--no-check")
        assert built.returncode == 0, built.stderr
    spec = {
        "name": "fits",
        "stages": [
            {"name": "tokenize", "variants": [{"model": "tok", "version": "v1"}]},
            {"name": "classify", "variants": [{"model": "cls", "version": "v1"}]},
            {
                "name": "route",
                "branch_on": "category",
                "branches": [{"key": "a", "variants": [{"model": "tok", "version": "v1"}]}],
            },
        ],
    }
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec))
    refused = model_plane.cli("apply", "-f", str(path))
    assert refused.returncode == 1, refused.stdout
    assert "stages[1].variants[0]: cls:v1 reads 'words', which stage 'tokenize' never answers" in refused.stderr
    assert "stages[2].branch_on: 'category' is not answered by stage 'classify' (it answers: label)" in refused.stderr
    assert "stages[2].branches[0].variants[0]: tok:v1 reads 'text'" in refused.stderr
    assert model_plane.cli("get", "pipelines").stdout.count("fits") == 0  # nothing written

    # a model without a contract after tok: accepted, and `describe` says that pair went unchecked
    spec["stages"] = [spec["stages"][0], {"name": "plain", "variants": [{"model": "nocontract", "version": "v1"}]}]
    path.write_text(yaml.safe_dump(spec))
    assert model_plane.cli("apply", "-f", str(path)).returncode == 0
    described = model_plane.cli("describe", "pipeline", "fits").stdout
    assert "Contracts:\n  plain: unchecked (no contract for nocontract:v1)" in described, described

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.py").write_text("def predict(payload):\n    return payload\n")
    (bad / "mllambda.yaml").write_text(
        yaml.safe_dump(
            {
                "kind": "Model",
                "entry": "model:predict",
                "contract": {"reads": {"x\n": "FP64"}, "answers": {"y": "FLOAT"}},
            }
        )
    )
    refused = model_plane.cli("build", str(bad), "--model=bad", "--version=v1", "--no-check")
    assert (
        refused.returncode == 1
        and "a printable field name" in refused.stderr
        and "'FLOAT' is not one of" in refused.stderr
    )


@pytest.mark.slow
def test_mllambda_test_runs_a_versions_examples_in_its_own_environment(
    model_plane: ControlPlaneProc, store: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "double"
    folder.mkdir()
    (folder / "model.py").write_text("def predict(payload):\n    return {'y': payload['x'] * 2, 'p': [0.25, 0.75]}\n")
    lines = [
        {"request": {"x": 2}, "expected": {"y": 4, "p": [0.25, 0.75]}},
        {"request": {"x": 3}, "expected": {"y": 6, "p": [0.2500001, 0.75]}, "tolerance": 1e-3},
        {"x": 5},  # no expected answer: it only has to run
    ]
    (folder / "examples.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    manifest = {"kind": "Model", "entry": "model:predict", "examples": "examples.jsonl"}
    (folder / "mllambda.yaml").write_text(yaml.safe_dump(manifest))
    built = model_plane.cli("build", str(folder), "--model=double", "--version=v1")
    assert built.returncode == 0 and "contract inferred from 3 examples: reads x; answers y, p" in built.stderr
    # no contract declared: the one its examples tell (through its own predict) is checked like a declared one
    described = model_plane.cli("describe", "model", "double:v1").stdout
    assert "Signature:    inferred from 3 examples\n  inputs:\n    x  INT64 [-1]\n  outputs:\n    y  INT64" in described
    spec = {
        "name": "doubled",
        "input": {"text": "BYTES"},
        "stages": [{"name": "d", "variants": [{"model": "double", "version": "v1"}]}],
    }
    (tmp_path / "doubled.yaml").write_text(yaml.safe_dump(spec))
    refused = model_plane.cli("apply", "-f", str(tmp_path / "doubled.yaml"))
    assert refused.returncode == 1 and "double:v1 reads 'x', which the pipeline's input does not hold" in refused.stderr
    flags = [f"--consul=127.0.0.1:{model_plane.consul_port}", f"--kv-prefix={model_plane.kv_prefix}"]
    flags += [f"--model-store={store}", "--security=plaintext"]
    passed = model_plane.cli("test", "double:v1", *flags)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "model/double:v1: 3 examples: 2 passed, 1 ran" in passed.stdout, passed.stdout

    lines[1]["expected"] = {"y": 7, "p": [0.3, 0.75]}  # wrong on purpose, and a line that is not JSON
    (folder / "examples.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + "{not json\n")
    assert model_plane.cli("build", str(folder), "--model=double", "--version=v2").returncode == 0
    failed = model_plane.cli("test", "double:v2", *flags)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "example 2: failed: y: 6 != 7; p[0]: 0.25 != 0.3" in failed.stdout, failed.stdout
    assert "example 4: error: JSONDecodeError" in failed.stdout, failed.stdout
    assert "4 examples: 1 passed, 1 failed, 1 error, 1 ran" in failed.stdout, failed.stdout


def test_a_contract_is_inferred_from_examples_through_predict_and_not_guessed_when_one_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """reads: the fields without which predict fails (one read with a default is not required); answers: the
    fields every answer has; nothing when an example fails or is no object."""
    from runtime_sdk.examples import MAX_PROBED, infer

    (tmp_path / "inferring.py").write_text(
        "def predict(p):\n"
        "    if p.get('fail'):\n"
        "        raise ValueError('no')\n"
        "    out = {'y': p['x'] * p.get('scale', 1), 'label': str(p['name'])}\n"
        "    return {**out, 'extra': 1} if p['x'] > 1 else out\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    meta = {"entry": "inferring:predict"}
    lines = [json.dumps({"request": {"x": 1, "name": "a", "scale": 2}}), json.dumps({"x": 2.5, "name": "b"}), ""]
    found = asyncio.run(infer(meta, lines))
    assert found["kind"] == "inferred from 2 examples"
    assert [(f["name"], f["datatype"]) for f in found["inputs"]] == [("x", "FP64"), ("name", "BYTES")]
    assert [f["name"] for f in found["outputs"]] == ["y", "label"]  # 'extra' is not in every answer
    assert asyncio.run(infer(meta, [*lines, json.dumps({"x": 1, "name": "c", "fail": True})])) == {}
    assert asyncio.run(infer(meta, [json.dumps([1, 2])])) == {}
    assert asyncio.run(infer(meta, ["{not json"])) == {}
    wide = {**{f"f{i}": i for i in range(100)}, "x": 1, "name": "n"}  # the fields it needs come after the bound
    assert asyncio.run(infer(meta, [json.dumps(wide)]))["inputs"] == [] and MAX_PROBED < 100  # probed: the first 64
