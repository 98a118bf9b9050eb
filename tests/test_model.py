"""Pipeline definitions are validated once, with every problem and its field path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from controlplane.pipeline.model import DEFAULT_TIMEOUT_MS, InvalidPipeline
from controlplane.pipeline.spec import check_name, parse_pipeline, pipeline_to_dict

EXAMPLE = Path(__file__).parent / "data" / "three-stage.yaml"


def problems(spec: object) -> list[str]:
    with pytest.raises(InvalidPipeline) as err:
        parse_pipeline(spec)
    return [str(p) for p in err.value.problems]


def test_the_example_parses_with_defaults_filled_in() -> None:
    pipeline = parse_pipeline(yaml.safe_load(EXAMPLE.read_text()))
    assert [s.name for s in pipeline.stages] == ["features", "classify", "network"]
    assert pipeline.stages[0].variants[0].weight == 1
    assert pipeline.stages[0].timeout_ms == DEFAULT_TIMEOUT_MS
    assert pipeline.stages[1].shadow is not None and pipeline.stages[1].shadow.cluster == "classifier.v3"
    assert [b.key for b in pipeline.stages[2].branches] == ["sports", "politics"]


def test_canonical_form_round_trips() -> None:
    pipeline = parse_pipeline(yaml.safe_load(EXAMPLE.read_text()))
    assert pipeline.stages[2].branch_on == "category"
    assert parse_pipeline(pipeline_to_dict(pipeline)) == pipeline


def test_wire_form_round_trips() -> None:
    from controlplane.admin.convert import spec_from_proto, spec_to_proto

    pipeline = parse_pipeline(yaml.safe_load(EXAMPLE.read_text()))
    assert spec_from_proto(spec_to_proto(pipeline)) == pipeline
    sized = parse_pipeline({**yaml.safe_load(EXAMPLE.read_text()), "max_body": "512Ki"})
    assert sized.max_body == 512 * 1024 and pipeline.max_body == 16 * 1024 * 1024  # the default fits a large image
    assert spec_from_proto(spec_to_proto(sized)) == sized == parse_pipeline(pipeline_to_dict(sized))


def test_every_problem_is_reported_with_its_path() -> None:
    found = problems(
        {
            "name": "Bad_Name",
            "transport": "carrier-pigeon",
            "stages": [
                {"name": "a", "variants": [{"model": "m", "version": "v1", "weight": 0}]},
                {"name": "a", "variants": [{"model": "m", "version": "v1"}, {"model": "m", "version": "v1"}]},
                {"name": "c"},
            ],
        }
    )
    assert found == [
        "name: 'Bad_Name' is not valid: lowercase letters, digits and '-', up to 63",
        "transport: 'carrier-pigeon' is not one of http, uds, kafka",
        "stages[0].variants: weights must add up to more than 0",
        "stages[1].variants: duplicate model version 'm.v1'",
        "stages[2]: needs exactly one of 'variants', 'branches' or 'members'",
        "stages: duplicate stage name 'a'",
    ]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"name": "p", "stages": []}, "stages: a pipeline needs at least one stage"),
        ({"name": "p", "stages": "abc"}, "stages: must be a list, got str"),
        ({"name": "p; rm -rf /", "stages": [{}]}, "name: 'p; rm -rf /' is not valid"),
        (
            {"name": "p", "stages": [{"name": "s", "variants": [{"model": "m", "version": "../../etc"}]}]},
            "stages[0].variants[0].version: '../../etc' is not valid",
        ),
        (
            {
                "name": "p",
                "stages": [{"name": "s", "variants": [{"model": "m", "version": "1", "weight": -3}]}],
            },
            "stages[0].variants[0].weight: must be between 0 and 10000, got -3",
        ),
        (
            {"name": "p", "stages": [{"name": "s", "branches": [{"key": "x", "variants": []}]}]},
            "stages[0].branches: the first stage has no previous stage to branch on",
        ),
        ({"name": "p", "stages": [{"name": "s", "varients": []}]}, "stages[0].varients: unknown field"),
        ("just a string", "spec: must be a mapping, got str"),
        ({"name": "p", "max_body": "16MB", "stages": []}, "max_body: a size in bytes, or with Ki or Mi"),
        ({"name": "p", "max_body": True, "stages": []}, "max_body: a size in bytes"),
        ({"name": "p", "max_body": 10, "stages": []}, "max_body: between 1024 bytes and 64Mi, got 10 bytes"),
        ({"name": "p", "max_body": "65Mi", "stages": []}, "max_body: between 1024 bytes and 64Mi"),
        ({"name": "p", "max_body": "1\n2", "stages": []}, "max_body: a size in bytes"),
    ],
)
def test_hostile_or_malformed_input_names_the_field(spec: object, expected: str) -> None:
    assert any(p.startswith(expected) for p in problems(spec)), problems(spec)


def test_yaml_numeric_versions_are_read_as_text() -> None:
    spec = {"name": "p", "stages": [{"name": "s", "variants": [{"model": "m", "version": 2}]}]}
    assert parse_pipeline(spec).stages[0].variants[0].version == "2"


def test_a_flood_of_problems_keeps_the_message_small() -> None:
    stages = [{"name": f"S{i}", "variants": [{"model": "X" * 60, "version": "?"}]} for i in range(30)]
    with pytest.raises(InvalidPipeline) as err:
        parse_pipeline({"name": "p", "stages": stages})
    assert len(err.value.problems) == 90
    assert len(str(err.value)) < 8000
    assert str(err.value).endswith("(and 50 more problems)")


@given(st.text(max_size=80))
def test_a_name_is_accepted_only_if_it_is_a_whole_dns_label(name: str) -> None:
    for accepted in (_accepts_name(name), _accepts_pipeline_named(name)):
        if accepted:
            assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", name), repr(name)


def _accepts_name(name: str) -> bool:
    try:
        check_name(name)
    except InvalidPipeline:
        return False
    return True


def _accepts_pipeline_named(name: str) -> bool:
    try:
        parse_pipeline({"name": name, "stages": [{"name": "s", "variants": [{"model": "m", "version": "v1"}]}]})
    except InvalidPipeline:
        return False
    return True


@pytest.mark.parametrize(
    ("topics", "problem"),
    [
        ({"input_topic": "."}, "input_topic: '.' is not a usable Kafka topic name"),
        ({"output_topic": ".."}, "output_topic: '..' is not a usable Kafka topic name"),
        ({"input_topic": "mll.p.s.m.v1"}, "input_topic: topics starting with 'mll.'"),
        ({"input_topic": "same", "output_topic": "same"}, "output_topic: must differ from input_topic"),
        ({"input_topic": "in\n"}, "input_topic: 'in\\n' is not valid"),
    ],
)
def test_kafka_topic_names_that_would_break_the_broker_or_the_hops_are_refused(
    topics: dict[str, str], problem: str
) -> None:
    spec = {"name": "p", "transport": "kafka", "stages": [{"name": "s", "variants": [{"model": "m", "version": "v1"}]}]}
    with pytest.raises(InvalidPipeline) as caught:
        parse_pipeline({**spec, **topics})
    assert problem in str(caught.value)


def test_a_rate_limit_round_trips_with_its_defaults_and_hostile_ones_are_named() -> None:
    from controlplane.admin.convert import spec_from_proto, spec_to_proto
    from controlplane.pipeline.model import RateLimit

    base = yaml.safe_load(EXAMPLE.read_text())
    pipeline = parse_pipeline({**base, "rate_limit": {"per_second": 20}})
    assert pipeline.rate_limit == RateLimit(per_second=20, burst=20, keys=10_000)  # burst: one second's worth
    assert spec_from_proto(spec_to_proto(pipeline)) == pipeline == parse_pipeline(pipeline_to_dict(pipeline))
    assert parse_pipeline(base).rate_limit is None and "rate_limit" not in pipeline_to_dict(parse_pipeline(base))
    for quota, said in [
        ({"per_second": 0}, "rate_limit.per_second: must be between 1 and 1000000, got 0"),
        ({"per_second": 10**9}, "rate_limit.per_second: must be between 1 and 1000000, got 1000000000"),
        ({"per_second": 2.5}, "rate_limit.per_second: must be a whole number"),
        ({"per_second": "lots"}, "rate_limit.per_second: must be a number, got str"),
        ({"per_second": True}, "rate_limit.per_second: must be a number, got bool"),
        ({"burst": 3}, "rate_limit.per_second: required"),
        ({"per_second": 5, "burst": 2}, "rate_limit.burst: must be at least per_second (5), got 2"),
        ({"per_second": 5, "keys": 0}, "rate_limit.keys: must be between 1 and 100000, got 0"),
        ({"per_second": 5, "keys": 10**6}, "rate_limit.keys: must be between 1 and 100000"),
        ({"per_second": 5, "window": 1}, "rate_limit.window: unknown field"),
        ("5/s", "rate_limit: must be a mapping, got str"),
    ]:
        found = problems({**base, "rate_limit": quota})
        assert any(said in p for p in found), (quota, found)


def test_a_priority_and_a_fairness_header_round_trip_and_hostile_ones_are_named() -> None:
    from controlplane.admin.convert import spec_from_proto, spec_to_proto

    base = yaml.safe_load(EXAMPLE.read_text())
    for wanted, number in (("sheddable", -100), ("critical", 100), (-50, -50), ("250", 250)):
        pipeline = parse_pipeline({**base, "priority": wanted, "fairness": {"header": "x-tenant"}})
        assert (pipeline.priority, pipeline.fairness_header) == (number, "x-tenant")
        assert spec_from_proto(spec_to_proto(pipeline)) == pipeline == parse_pipeline(pipeline_to_dict(pipeline))
    assert parse_pipeline(base).priority == 0 and "priority" not in pipeline_to_dict(parse_pipeline(base))
    weighed = parse_pipeline({**base, "fairness": {"header": "x-tenant", "shares": {"gold": 3, "bronze": 1}}})
    assert weighed.fairness_shares == (("bronze", 1), ("gold", 3))  # sorted: the same definition, the same routes
    assert spec_from_proto(spec_to_proto(weighed)) == weighed == parse_pipeline(pipeline_to_dict(weighed))
    for spec, said in [
        ({"priority": "urgent"}, "priority: 'urgent' is not one of critical, standard, sheddable"),
        ({"priority": 5000}, "priority: must be between -1000 and 1000"),
        ({"priority": 1.5}, "priority: must be a whole number"),
        ({"priority": True}, "priority: must be a number"),
        ({"fairness": {"header": "X-Tenant"}}, "fairness.header: a lower-case header name"),
        ({"fairness": {"header": "x-tenant\nx-mll-priority: critical"}}, "fairness.header: a lower-case header name"),
        ({"fairness": {"header": "x-mll-priority"}}, "not x-mll-* or x-envoy-*"),
        ({"fairness": {"header": "x-envoy-original-path"}}, "not x-mll-* or x-envoy-*"),
        ({"fairness": {"header": "a" * 65}}, "fairness.header: a lower-case header name"),
        ({"fairness": {"header": 3}}, "fairness.header: a lower-case header name"),
        ({"fairness": {"header": "x-t", "weights": {}}}, "fairness.weights: unknown field"),
        ({"fairness": {"header": "x-t", "shares": {"gold": 0}}}, "fairness.shares['gold']: must be between 1 and 100"),
        ({"fairness": {"header": "x-t", "shares": {"gold": 101}}}, "fairness.shares['gold']: must be between 1 and"),
        ({"fairness": {"header": "x-t", "shares": {"gold": 1.5}}}, "fairness.shares['gold']: must be a whole number"),
        ({"fairness": {"header": "x-t", "shares": {"gold": "3"}}}, "fairness.shares['gold']: must be a number"),
        ({"fairness": {"header": "x-t", "shares": {"go ld": 2}}}, "fairness.shares['go ld']: a caller key is 1 to 64"),
        ({"fairness": {"header": "x-t", "shares": {"a\nx-mll-share: 9": 2}}}, "visible ASCII characters"),
        ({"fairness": {"header": "x-t", "shares": {"": 2}}}, "fairness.shares['']: a caller key is 1 to 64"),
        ({"fairness": {"header": "x-t", "shares": {"k" * 65: 2}}}, "a caller key is 1 to 64"),
        ({"fairness": {"header": "x-t", "shares": {f"k{i}": 2 for i in range(33)}}}, "shares: at most 32 keys"),
        ({"fairness": {"header": "x-t", "shares": ["gold"]}}, "fairness.shares: must be a mapping of caller key"),
        ({"fairness": {"shares": {"gold": 2}}}, "fairness.shares: weighs values of fairness.header: name the header"),
        ({"fairness": "x-tenant"}, "fairness: "),
        ({"transport": "kafka", "priority": "critical"}, "priority: admission is at the runtimes' HTTP"),
    ]:
        found = problems({**base, **spec})
        assert any(said in p for p in found), (spec, found)
