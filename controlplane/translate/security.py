"""mTLS and authorization for the data path, as Envoy resources. Pure: no I/O.

Every Envoy reads its certificate and the CA roots from file-based SDS in its
own certificate folder (written by the process that fetched them from Consul,
see certs.py), so keys never pass through the control plane. Upstream TLS
checks the SPIFFE identity it expects; a sidecar's ingress requires a client
certificate, and its RBAC admits, per route, only the identities the pipeline
graph says may call that stage: the gateway for stage 0, the previous stage's
models for the others. Everything else gets 403.
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac_config
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import any_pb2, wrappers_pb2

from contract.naming import CA_FILE, CA_SECRET, CERT_FILE, CERT_SECRET, GATEWAY_IDENTITY, spiffe_regex
from controlplane.pipeline.model import Pipeline
from controlplane.xds.snapshot import pack

RBAC_FILTER = "envoy.filters.http.rbac"
TLS_SOCKET = "envoy.transport_sockets.tls"


def _sds(name: str, folder: str, file: str) -> secret_pb2.SdsSecretConfig:
    source = config_source_pb2.ConfigSource(
        path_config_source=config_source_pb2.PathConfigSource(
            path=f"{folder}/{file}", watched_directory=base_pb2.WatchedDirectory(path=folder)
        ),
        resource_api_version=config_source_pb2.V3,
    )
    return secret_pb2.SdsSecretConfig(name=name, sds_config=source)


def _uri_matcher(services: Iterable[str]) -> list[common_pb2.SubjectAltNameMatcher]:
    return [
        common_pb2.SubjectAltNameMatcher(
            san_type=common_pb2.SubjectAltNameMatcher.URI,
            matcher=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=spiffe_regex(s))),
        )
        for s in sorted(services)
    ]


def common_context(folder: str, expect: Iterable[str] = (), alpn: Iterable[str] = ()) -> tls_pb2.CommonTlsContext:
    """Our certificate, the CA roots, and (for a client) the identities the peer may have."""
    return tls_pb2.CommonTlsContext(
        tls_certificate_sds_secret_configs=[_sds(CERT_SECRET, folder, CERT_FILE)],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=common_pb2.CertificateValidationContext(
                match_typed_subject_alt_names=_uri_matcher(expect)
            ),
            validation_context_sds_secret_config=_sds(CA_SECRET, folder, CA_FILE),
        ),
        alpn_protocols=list(alpn),
    )


def upstream_tls(folder: str, expect: str, alpn: Iterable[str] = ()) -> base_pb2.TransportSocket:
    """A cluster's transport socket: mTLS to a peer that must be `expect`."""
    context = tls_pb2.UpstreamTlsContext(common_tls_context=common_context(folder, [expect], alpn))
    return base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=pack(context))


def downstream_tls(folder: str) -> base_pb2.TransportSocket:
    """A listener's transport socket: TLS that requires a client certificate from our CA."""
    context = tls_pb2.DownstreamTlsContext(
        common_tls_context=common_context(folder), require_client_certificate=wrappers_pb2.BoolValue(value=True)
    )
    return base_pb2.TransportSocket(name=TLS_SOCKET, typed_config=pack(context))


def rbac_filter() -> rbac_pb2.RBAC:
    """The ingress HTTP filter: deny by default; each stage route admits its callers (route_rbac)."""
    return rbac_pb2.RBAC(rules=rbac_config.RBAC(action=rbac_config.RBAC.ALLOW))


def route_rbac(callers: Iterable[str]) -> any_pb2.Any:
    """Per-route config: only these identities may call this route."""
    principals = [
        rbac_config.Principal(
            authenticated=rbac_config.Principal.Authenticated(
                principal_name=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=spiffe_regex(s)))
            )
        )
        for s in sorted(set(callers))
    ]
    policy = rbac_config.Policy(permissions=[rbac_config.Permission(any=True)], principals=principals)
    rules = rbac_config.RBAC(action=rbac_config.RBAC.ALLOW, policies={"pipeline-graph": policy})
    return pack(rbac_pb2.RBACPerRoute(rbac=rbac_pb2.RBAC(rules=rules)))


def callers(p: Pipeline, k: int) -> frozenset[str]:
    """Who may call stage k of `p`: the gateway for the first stage, the previous stage's models after.

    A shadow of stage k is called by the same hop as its variants (a mirror), and
    a shadow's own output goes nowhere, so it never calls stage k+1. After an
    ensemble, its join calls; without a join, the model that asked the members
    sends their merged answers on itself. An ensemble's members and its join are
    called by whoever calls the stage; so are an OIP stage's models, whose answer
    the caller sends on itself.
    """
    if k == 0:
        return frozenset({GATEWAY_IDENTITY})
    before = p.stages[k - 1]
    if before.protocol == "oip":  # its models answered the one who asked them, who sends on
        return callers(p, k - 1)
    if not before.members:
        return frozenset(v.model for v in before.all_variants())
    return frozenset({before.join.model}) if before.join else callers(p, k - 1)
