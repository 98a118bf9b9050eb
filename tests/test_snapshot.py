"""Snapshots are refused when they reference something they do not contain."""

from __future__ import annotations

import pytest

from controlplane.translate import resources as r
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.snapshot import CLUSTER, InconsistentSnapshot, Snapshot


def listener() -> object:
    return r.http_listener("in", r.tcp_address("127.0.0.1", 1), "in")


def test_a_route_to_a_missing_cluster_is_refused_with_its_name() -> None:
    with pytest.raises(InconsistentSnapshot, match="route config 'in' sends to missing cluster 'b'"):
        Snapshot.build(
            "1",
            clusters=[r.eds_cluster("a")],
            endpoints=[r.load_assignment("a", [])],
            listeners=[listener()],
            routes=[r.route_config("in", [r.weighted_route("/", [("a", 1), ("b", 1)])])],
        )


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(InconsistentSnapshot) as err:
        Snapshot.build("1", clusters=[r.eds_cluster("a")], listeners=[listener()])
    assert err.value.problems == [
        "cluster 'a' uses EDS but has no load assignment",
        "listener 'in' needs route config 'in'",
    ]


def test_tcp_proxy_listener_must_name_an_existing_cluster() -> None:
    with pytest.raises(InconsistentSnapshot, match="missing cluster 'kafka'"):
        Snapshot.build(
            "1", listeners=[r.kafka_listener("k", r.tcp_address("127.0.0.1", 2), "kafka", broker_filter=False)]
        )


def test_cache_keeps_the_previous_snapshot_when_a_bad_one_is_set() -> None:
    cache = SnapshotCache()
    good = Snapshot.build("1", clusters=[r.eds_cluster("a")], endpoints=[r.load_assignment("a", [])])
    cache.set_snapshot("g", good)
    with pytest.raises(InconsistentSnapshot):
        cache.set_snapshot("g", Snapshot("2", {CLUSTER: good.of_type(CLUSTER)}))
    assert cache.get("g") is good


def test_resource_versions_are_content_hashes() -> None:
    one = Snapshot.build("1", clusters=[r.eds_cluster("a")], endpoints=[r.load_assignment("a", [])])
    two = Snapshot.build("2", clusters=[r.eds_cluster("a")], endpoints=[r.load_assignment("a", [])])
    assert one.of_type(CLUSTER).versions == two.of_type(CLUSTER).versions
