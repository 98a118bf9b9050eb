"""The JSON Schemas an editor uses (docs/schemas/) are what the validators' constants make, and they bite."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from controlplane.config import PROJECT_ROOT
from controlplane.pipeline.schema import pipeline_schema
from controlplane.stack.schema import stack_schema

SCHEMAS = PROJECT_ROOT / "docs" / "schemas"
CASES = [("pipeline.schema.json", pipeline_schema), ("stack.schema.json", stack_schema)]


@pytest.mark.parametrize(("name", "make"), CASES)
def test_the_published_schemas_are_current(name: str, make: Any, request: pytest.FixtureRequest) -> None:
    made = json.dumps(make(), indent=2) + "\n"
    if request.config.getoption("--update-golden"):
        SCHEMAS.mkdir(exist_ok=True)
        (SCHEMAS / name).write_text(made)
    assert (SCHEMAS / name).read_text() == made, f"docs/schemas/{name} is stale: run with --update-golden"
    jsonschema.Draft202012Validator.check_schema(json.loads(made))


def documents() -> list[tuple[Path, Any]]:
    found = [(PROJECT_ROOT / "examples" / "nlp" / "stack.yaml", None)]
    for path in sorted((PROJECT_ROOT / "examples" / "nlp").glob("pipeline-*.yaml")):
        found += [(path, doc) for doc in yaml.safe_load_all(path.read_text())]
    found.append((Path(__file__).parent / "data" / "three-stage.yaml", None))
    return found


@pytest.mark.parametrize("path", [p for p, _ in documents()], ids=lambda p: p.name)
def test_every_example_fits_its_schema(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        schema = stack_schema() if doc.get("kind") == "Stack" else pipeline_schema()
        jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)


def test_the_schemas_refuse_what_the_validators_refuse() -> None:
    """An editor marks these before `apply` or `up` would refuse them."""
    bad_pipelines: list[dict[str, Any]] = [
        {"name": "Upper", "stages": [{"name": "a", "variants": [{"model": "m", "version": "v1"}]}]},
        {"name": "p", "stages": []},
        {"name": "p", "stages": [{"name": "a"}]},  # no variants, branches or members
        {"name": "p", "transport": "smtp", "stages": [{"name": "a", "variants": [{"model": "m", "version": "v1"}]}]},
        {"name": "p", "stages": [{"name": "a", "variants": [{"model": "m", "version": "v1", "weight": -1}]}]},
        {"name": "p", "stages": [{"name": "a", "variants": [{"model": "m", "version": "v1"}], "colour": "red"}]},
        {"name": "p\n", "stages": [{"name": "a", "variants": [{"model": "m", "version": "v1"}]}]},
    ]
    for doc in bad_pipelines:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, pipeline_schema(), cls=jsonschema.Draft202012Validator)
    bad_stacks: list[dict[str, Any]] = [
        {"kind": "Stack", "ports": {"gatway": 1}},
        {"kind": "Stack", "runtimes": [{"model": "m", "version": "v1"}]},  # neither target nor package
        {"kind": "Stack", "runtimes": [{"model": "m", "version": "v1", "target": "a:b", "autoscale": {"up": 1}}]},
        {"kind": "Stack", "security": "maybe"},
    ]
    for doc in bad_stacks:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(doc, stack_schema(), cls=jsonschema.Draft202012Validator)
