"""Names both sides derive from a pipeline or a model version: clusters, paths, topics, keys.

Pipeline, stage, model and version names are validated by the control plane
(DNS-label rules), so every name built here is safe in Envoy resource names,
URL paths, Kafka topics and Consul keys.
"""

from __future__ import annotations

import re

# The name rules, for every entry point (admin API, CLI, stack file, Consul meta). Always `fullmatch`:
# `$` alone lets a trailing newline through.
LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")  # pipelines, stages, models: a DNS label
VERSION = re.compile(r"[a-z0-9]([a-z0-9.-]{0,30}[a-z0-9])?")  # a model version: a label that may hold dots
SERVICE_ID = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,126}[A-Za-z0-9])?")  # a runtime's Consul service id
RULES = {
    LABEL: "lowercase letters, digits and '-', up to 63",
    VERSION: "lowercase letters, digits, '.' and '-', up to 32",
    SERVICE_ID: "letters, digits, '_', '.' and '-', up to 128",
}


def name_problem(value: object, rule: re.Pattern[str]) -> str | None:
    """Why `value` breaks `rule` (None: it fits)."""
    if not isinstance(value, str):
        return f"expected a string, got {type(value).__name__}"
    if not rule.fullmatch(value):
        return f"{value[:80]!r} is not a valid name ({RULES[rule]})"
    return None


SERVICE_TAG = "mllambda"  # Consul tag of every runtime (discovery watches services that carry it)
BRIDGE_REPLY_PREFIX = "mll.bridge."  # a control plane's reply topic: the only topic a hop answers an HTTP bridge on


def bridge_reply_topic(host: str, port: int) -> str:
    """A bridge's reply topic: one per listen address, so a restarted control plane reuses it (none leak)."""
    return f"{BRIDGE_REPLY_PREFIX}{host.replace(':', '_')}_{port}"


BRIDGE_SERVICE = "mllambda-bridge"  # Consul service of the control planes' Kafka HTTP bridges
FRONT_SERVICE = "mllambda-oip-grpc"  # Consul service of the control planes' OIP gRPC fronts

# Identities (Consul Connect service names, in SPIFFE certificates). A runtime's is its model's name;
# ours start with a prefix no model may take.
RESERVED_PREFIX = "mllambda-"
GATEWAY_IDENTITY = "mllambda-gateway"
CONTROL_PLANE_IDENTITY = "mllambda-control-plane"
SPIFFE_SERVICE = re.compile(r"spiffe://[^/]+/ns/[^/]+/dc/[^/]+/svc/([^/]+)")  # a Consul Connect leaf's URI SAN
CERT_FILE, CA_FILE = "cert.json", "ca.json"  # file-based SDS in a sidecar's certificate folder
CERT_SECRET, CA_SECRET = "mll-cert", "mll-ca"


def spiffe_regex(service: str) -> str:
    """A regex matching the SPIFFE URI of `service` in any trust domain and datacenter our CA signs for."""
    return rf"spiffe://[^/]+/ns/default/dc/[^/]+/svc/{re.escape(service)}"


def identity_of(uri: str) -> str | None:
    """The Consul service a SPIFFE URI names (None: not one)."""
    found = SPIFFE_SERVICE.fullmatch(uri)
    return found.group(1) if found else None


def cluster_model(cluster: str) -> str:
    """The model (identity) of a model-version cluster: model names hold no dot."""
    return cluster.split(".", 1)[0]


DEFAULT_KV_PREFIX = "mllambda/pipelines/"  # pipeline versions in Consul KV


def model_cluster(model: str, version: str) -> str:
    """One Envoy cluster (and Envoy node cluster) per model version."""
    return f"{model}.{version}"


def cluster_stat_name(cluster: str) -> str:
    """How a model-version cluster is named in Envoy's stats: `<model>_<version>` (`_` is in neither name).

    Envoy's Prometheus output tags a stat with the cluster's name up to its first
    dot, so `score.v1` would come out as cluster `score` and a metric named after
    `v1`; with no dot in the stat name the whole name is the tag.
    """
    return cluster.replace(".", "_")


def cluster_of_stat(name: str) -> str:
    return name.replace("_", ".")


def pipeline_path(pipeline: str) -> str:
    """Where clients call a pipeline on the gateway."""
    return f"/pipelines/{pipeline}"


# What stage_path builds; groups: pipeline, version, stage.
STAGE_PATH = re.compile(r"/pipelines/([a-z0-9-]{1,63})/v([0-9]{1,10})/([a-z0-9-]{1,63})")


def stage_path(pipeline: str, version: int, stage: str) -> str:
    """The path of one hop of one pipeline version: a sidecar's ingress and egress routes match it.

    The version is in the path so that a request finishes on the version it
    entered with while a newer one takes over (the old hops drain).
    """
    return f"/pipelines/{pipeline}/v{version}/{stage}"


def bridge_path(pipeline: str) -> str:
    """Where the gateway sends a Kafka pipeline's HTTP requests on a control plane's bridge."""
    return f"/bridge/{pipeline}"


def bridge_service_id(host: str, port: int) -> str:
    return f"{BRIDGE_SERVICE}-{host}-{port}"


def routing_table_prefix(kv_prefix: str) -> str:
    """Where Kafka routing tables live in Consul KV, beside the pipeline versions."""
    return kv_prefix.rstrip("/") + "-kafka/"


def input_topic(pipeline: str, configured: str = "") -> str:
    return configured or f"mll.{pipeline}.in"


def output_topic(pipeline: str, configured: str = "") -> str:
    return configured or f"mll.{pipeline}.out"


def dead_letter_topic(pipeline: str) -> str:
    return f"mll.{pipeline}.dlq"


def hop_topic(pipeline: str, stage: str, cluster: str, shadow: bool = False) -> str:
    """One topic per hop: `mll.<pipeline>.<stage>.<model>.<version>`; a shadow's ends in `_shadow`.

    `_` appears in no pipeline, stage, model or version name, so version `v1.shadow`
    cannot take the shadow topic of version `v1`.
    """
    return f"mll.{pipeline}.{stage}.{cluster}" + ("_shadow" if shadow else "")


def hop_group(topic: str) -> str:
    """Replicas of one model version share a hop topic's work in this consumer group."""
    return f"mll.{topic}"


def router_group(pipeline: str, topic: str = "") -> str:
    """The control planes' entry routers share one input topic of a pipeline in this group.

    The pipeline's default input topic keeps the plain group name; a configured
    one gets its own group (an input topic can change between versions).
    """
    plain = f"mll.{pipeline}.router"
    return plain if not topic or topic == input_topic(pipeline) else f"{plain}.{topic}"
