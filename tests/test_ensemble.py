"""Ensembles on plain data: validation, the routes each sidecar gets, the steering headers; no sockets."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2

from contract.fanout import FanOut, Member, merge
from controlplane.pipeline.model import InvalidPipeline
from controlplane.pipeline.spec import parse_pipeline, pipeline_to_dict
from controlplane.translate.pipelines import Options, translate
from tests.helpers.translation import instance, routes, steady


def one(model: str, version: str = "v1", **extra: Any) -> dict[str, Any]:
    return {"variants": [{"model": model, "version": version}], **extra}


def spec(*stages: dict[str, Any], transport: str = "http") -> dict[str, Any]:
    return {"name": "p", "transport": transport, "stages": list(stages)}


ENSEMBLE = {
    "name": "e",
    "timeout_ms": 2000,
    "branch_on": "kind",
    "members": [
        {"name": "x", **one("mx"), "shadow": {"model": "mx", "version": "v2", "percent": 10}},
        {"name": "y", "required": False, "timeout_ms": 300, "branches": [{"key": "k", **one("my")}]},
    ],
    "join": {"model": "mj", "version": "v1"},
}
PIPELINE = parse_pipeline(spec({"name": "a", **one("ma")}, ENSEMBLE, {"name": "z", **one("mz")}))
RUNTIMES = [
    instance(m, v, n)
    for n, (m, v) in enumerate([("ma", "v1"), ("mx", "v1"), ("mx", "v2"), ("my", "v1"), ("mj", "v1"), ("mz", "v1")])
]


def headers(route: Any) -> dict[str, str]:
    return {h.header.key: h.header.value for h in route.request_headers_to_add}


def test_an_ensemble_round_trips_through_its_stored_form() -> None:
    assert parse_pipeline(pipeline_to_dict(PIPELINE)) == PIPELINE
    member = PIPELINE.stages[1].members[1]
    assert (member.required, member.timeout_ms, PIPELINE.stages[1].members[0].timeout_ms) == (False, 300, 2000)


@pytest.mark.parametrize(
    "stages, transport, problem",
    [
        (
            [{"name": "e", "members": [{"name": "x", **one("m")}]}],
            "http",
            "stages[0].members: the first stage is called by the gateway, which cannot ask an ensemble",
        ),
        (
            [{"name": "a", **one("m")}, {"name": "e", "members": [{"name": "x", **one("m")}]}],
            "kafka",
            "stages[1].members: an ensemble is asked over HTTP: use transport http or uds",
        ),
        (
            [
                {"name": "a", **one("m")},
                {"name": "e", "members": [{"name": "x", **one("m")}, {"name": "x", **one("n")}]},
            ],
            "http",
            "stages[1].members: duplicate member name 'x'",
        ),
        (
            [{"name": "a", **one("m")}, {"name": "e", "members": [{"name": "x\n", **one("m")}]}],
            "http",
            "stages[1].members[0].name: 'x\\n' is not valid",
        ),
        (
            [{"name": "a", **one("m")}, {"name": "e", "members": [{"name": "x", **one("m"), "timeout_ms": 20_000}]}],
            "http",
            "stages[1].members[0].timeout_ms: must be between 1 and 10000, got 20000",
        ),
        (
            [{"name": "a", **one("m")}, {"name": "e", "members": [{"name": "x", **one("m"), "required": "no"}]}],
            "http",
            "stages[1].members[0].required: must be true or false, got str",
        ),
        (
            [{"name": "a", **one("m")}, {"name": "e", "members": [{"name": "x"}]}],
            "http",
            "stages[1].members[0]: needs exactly one of 'variants' or 'branches'",
        ),
        (
            [{"name": "a", **one("m")}, {"name": "e", **one("m"), "members": [{"name": "x", **one("m")}]}],
            "http",
            "stages[1]: needs exactly one of 'variants', 'branches' or 'members'",
        ),
        (
            [{"name": "a", **one("m")}, {"name": "e", **one("m"), "join": {"model": "j", "version": "v1"}}],
            "http",
            "stages[1].join: only an ensemble (a stage with 'members') has a join",
        ),
        (
            [
                {"name": "a", **one("m")},
                {
                    "name": "e",
                    "members": [{"name": "x", **one("m")}],
                    "shadow": {"model": "s", "version": "v1", "percent": 5},
                },
            ],
            "http",
            "stages[1].shadow: an ensemble's shadow goes in one of its members",
        ),
        (
            [{"name": "a", **one("m")}, {"name": "e", "members": [{"name": "x", **one("m"), "rollout": {}}]}],
            "http",
            "stages[1].members[0].rollout: unknown field",
        ),
        (
            [
                {"name": "a", **one("m")},
                {"name": "e", "members": [{"name": "x", **one("m")}]},
                {"name": "f", "members": [{"name": "x", **one("m")}]},
            ],
            "http",
            "stages[2].members: no model of ours sends into an ensemble here: put a stage (or a join) before it",
        ),
        (
            [{"name": "a", **one("m")}, {"name": "e", "members": [{"name": str(i), **one("m")} for i in range(9)]}],
            "http",
            "stages[1].members: at most 8 entries, got 9",
        ),
    ],
)
def test_every_ensemble_problem_is_reported_with_its_path(stages: list[Any], transport: str, problem: str) -> None:
    with pytest.raises(InvalidPipeline) as err:
        parse_pipeline(spec(*stages, transport=transport))
    assert any(str(p).startswith(problem) for p in err.value.problems), err.value.problems


def test_the_sender_is_told_whom_to_ask_and_routes_to_every_member_and_the_join() -> None:
    sender = translate(steady(PIPELINE), RUNTIMES)["ma-v1-0"]
    (ingress,) = [r for r in routes(sender, "ingress") if r.name == "p/a"]
    assert headers(ingress) | {"x-mll-transport": "-"} == {
        "x-mll-stage": "a",
        "x-mll-transport": "-",
        "x-mll-fanout-path": "/pipelines/p/v1/e",
        "x-mll-fanout": "x=2000,y=300?",
        "x-mll-fanout-branch-field": "kind",
        "x-mll-next": "/pipelines/p/v1/e",  # the merged answers go to the join
        "x-mll-max-body": str(16 * 1024 * 1024),  # the pipeline's: the sender refuses a bigger body with 413
    }
    egress: dict[str, Any] = {}
    for route in routes(sender, "egress"):
        egress.setdefault(route.match.path, route)  # the first route for a path
    x = egress["/pipelines/p/v1/e/x"]
    assert x.route.cluster == "mx.v1" and x.route.timeout.ToMilliseconds() == 2000
    assert x.route.request_mirror_policies[0].cluster == "mx.v2"  # a member's own shadow
    assert x.route.retry_policy.num_retries.value == 2
    y = egress["/pipelines/p/v1/e/y"]  # its branch (a 422 for other keys follows)
    assert (y.match.headers[0].string_match.exact, y.route.cluster) == ("k", "my.v1")
    assert y.route.timeout.ToMilliseconds() == 300
    assert egress["/pipelines/p/v1/e"].route.cluster == "mj.v1"
    assert "/pipelines/p/v1/z" not in egress  # the join sends on, not the sender


def test_members_answer_without_forwarding_and_the_join_sends_on() -> None:
    snapshots = translate(steady(PIPELINE), RUNTIMES)
    (member,) = [r for r in routes(snapshots["mx-v1-1"], "ingress") if r.name == "p/e/x"]
    assert member.match.path == "/pipelines/p/v1/e/x"
    # Members, their shadows and the join keep their answers by request id: monitoring compares them.
    assert headers(member) == {
        "x-mll-stage": "e.x",
        "x-mll-transport": "http",
        "x-mll-agree": "1",
        "x-mll-max-body": str(16 * 1024 * 1024),
    }
    assert member.route.timeout.ToMilliseconds() == 2000
    (shadow,) = [r for r in routes(snapshots["mx-v2-2"], "ingress") if r.name == "p/e/x"]
    assert headers(shadow)["x-mll-shadow"] == "1" and headers(shadow)["x-mll-agree"] == "1"
    (join,) = [r for r in routes(snapshots["mj-v1-4"], "ingress") if r.name == "p/e"]
    assert headers(join)["x-mll-next"] == "/pipelines/p/v1/z" and headers(join)["x-mll-agree"] == "1"
    compared = {(c, tuple(sorted(against)), shared) for c, against, shared in PIPELINE.stages[1].compared()}
    assert ("mx.v1", ("mj.v1",), True) in compared and ("my.v1", ("mj.v1",), True) in compared  # vs the join
    assert ("mx.v2", ("mx.v1",), False) in compared  # a member's shadow against that member
    assert [r.match.path for r in routes(snapshots["mj-v1-4"], "egress") if r.match.path] == [
        "/readyz",
        "/pipelines/p/v1/z",
    ]


def test_without_a_join_the_sender_sends_the_merged_answers_on_itself() -> None:
    no_join = {k: v for k, v in ENSEMBLE.items() if k != "join"}
    pipeline = parse_pipeline(spec({"name": "a", **one("ma")}, no_join, {"name": "z", **one("mz")}))
    sender = translate(steady(pipeline), RUNTIMES)["ma-v1-0"]
    (ingress,) = [r for r in routes(sender, "ingress") if r.name == "p/a"]
    assert headers(ingress)["x-mll-next"] == "/pipelines/p/v1/z"
    assert "/pipelines/p/v1/z" in {r.match.path for r in routes(sender, "egress")}


def test_under_mtls_members_and_join_admit_the_sender_and_the_next_stage_admits_the_join() -> None:
    secured = [dataclasses.replace(i, tls_dir=f"/certs/{i.service_id}") for i in RUNTIMES]
    snapshots = translate(steady(PIPELINE), secured, Options(mtls=True, gateway_tls_dir="/certs/gw"))

    def admitted(node: str, route_name: str) -> set[str]:
        route = next(r for r in routes(snapshots[node], "ingress") if r.name == route_name)
        per_route = rbac_pb2.RBACPerRoute()
        route.typed_per_filter_config["envoy.filters.http.rbac"].Unpack(per_route)
        principals = per_route.rbac.rules.policies["pipeline-graph"].principals
        return {p.authenticated.principal_name.safe_regex.regex.rsplit("/", 1)[1] for p in principals}

    assert admitted("mx-v1-1", "p/e/x") == admitted("mj-v1-4", "p/e") == {"ma"}
    assert admitted("mz-v1-5", "p/z") == {"mj"}


@pytest.mark.parametrize(
    "path, members",
    [
        ("/pipelines/p/v1/e", "x=100,x=200"),
        ("/pipelines/p/v1/e", "x=0"),
        ("/pipelines/p/v1/e", "X=100"),
        ("/pipelines/p/v1/e", "x=100\n"),
        ("/pipelines/p/v1/e", ",".join(f"m{i}=1" for i in range(9))),
        ("/admin", "x=100"),
        ("/pipelines/p/v1/e/../../x", "x=100"),
    ],
)
def test_steering_headers_the_control_plane_would_not_write_are_refused(path: str, members: str) -> None:
    with pytest.raises(ValueError):
        FanOut.parse(path, members)


def test_steering_headers_round_trip_and_answers_merge_by_name() -> None:
    fan = FanOut("/pipelines/p/v1/e", (Member("x", 2000, True), Member("y", 300, False)), "kind")
    assert FanOut.parse(fan.path, fan.header_value(), "kind") == fan
    assert fan.member_path(fan.members[1]) == "/pipelines/p/v1/e/y"
    assert merge({"x": {"a": 1}}, {"y": "timed out"}) == {"x": {"a": 1}, "_missing": {"y": "timed out"}}
    assert merge({"x": {}}, {}) == {"x": {}}


def test_status_shows_a_row_per_member_with_its_share_and_errors() -> None:
    from controlplane.delivery.traffic import ClusterStats, per_variant

    stats = {
        "mx.v1": ClusterStats(100, 3),
        "mx.v2": ClusterStats(10),
        "my.v1": ClusterStats(40, 0),
        "mj.v1": ClusterStats(97),
    }
    rows = {(r.branch, r.model, r.version): r for r in per_variant([PIPELINE], stats) if r.stage == "e"}
    assert set(rows) == {("x", "mx", "v1"), ("y/k", "my", "v1"), ("(join)", "mj", "v1"), ("x (shadow)", "mx", "v2")}
    assert (rows["x", "mx", "v1"].observed_share, rows["x", "mx", "v1"].errors) == (1.0, 3)
    assert rows["x (shadow)", "mx", "v2"].observed_share == 0.1  # of member x's requests
    assert rows["y/k", "my", "v1"].requests == 40
