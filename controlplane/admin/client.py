"""A small synchronous client for the admin API, with errors a person can act on."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import grpc

from controlplane.errors import CliError
from controlplane.pipeline.model import Pipeline

if TYPE_CHECKING:  # the generated messages, for annotations only (they are imported where used)
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb

_HINTS = {
    grpc.StatusCode.UNAVAILABLE: "is the control plane running (mllambda controlplane / ./dev up)?",
    grpc.StatusCode.UNAUTHENTICATED: "set MLLAMBDA_TOKEN to the control plane's token",
    grpc.StatusCode.ABORTED: "another client changed it at the same time; run the command again",
}


def _channel(address: str) -> grpc.Channel:
    """TLS when MLLAMBDA_ADMIN_CA names the CA to trust (with MLLAMBDA_ADMIN_CERT/KEY: a client certificate)."""
    ca = os.environ.get("MLLAMBDA_ADMIN_CA")
    if not ca:
        return grpc.insecure_channel(address)
    cert, key = os.environ.get("MLLAMBDA_ADMIN_CERT"), os.environ.get("MLLAMBDA_ADMIN_KEY")
    try:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(ca),
            private_key=_read(key) if key else None,
            certificate_chain=_read(cert) if cert else None,
        )
    except OSError as err:
        raise CliError(f"cannot read the admin TLS files: {err}") from err
    return grpc.secure_channel(address, credentials)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class AdminClient:
    """`client.Get(request)` etc. call the RPC; failures become CliError with a hint."""

    def __init__(self, address: str, token: str | None = None, timeout: float = 15) -> None:
        from controlplane._gen.mllambda.admin.v1 import admin_pb2_grpc as pb_grpc

        self.address = address
        token = token if token is not None else os.environ.get("MLLAMBDA_TOKEN")
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout
        self.channel = _channel(address)
        self.stub = pb_grpc.PipelineAdminStub(self.channel)
        self.model_stub = pb_grpc.ModelAdminStub(self.channel)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def __getattr__(self, method: str) -> Any:
        about = "pipeline" if hasattr(self.stub, method) else "model"
        rpc = getattr(self.stub if about == "pipeline" else self.model_stub, method)

        def call(request: Any, timeout: float | None = None) -> Any:
            try:
                return rpc(request, metadata=self.metadata, timeout=timeout or self.timeout)
            except grpc.RpcError as err:
                raise self._explain(err, about) from err

        return call

    def _explain(self, err: grpc.RpcError, about: str = "pipeline") -> CliError:
        code, details = err.code(), err.details() or ""
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            details = f"invalid {about}:\n  " + details.replace("; ", "\n  ")
        if code == grpc.StatusCode.UNAVAILABLE:
            details = f"{details} ({self.address})"
        hint = _HINTS.get(code)
        return CliError(details + (f"\nhint: {hint}" if hint else ""))

    def apply(
        self, pipeline: Pipeline, cause: str = "", expect_version: int = 0, dry_run: bool = False
    ) -> pb.ApplyResponse:
        from controlplane.admin.convert import apply_request

        return self.Apply(apply_request(pipeline, cause, expect_version, dry_run))

    def gateway_has(self, name: str, version: int, node_id: str = "gateway") -> bool:
        """Has the gateway Envoy acknowledged config that carries this pipeline version, or a newer one?

        Newer counts: a rollout's driver may write the next version as soon as this one is in traffic.
        """
        from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb

        nodes = self.Status(pb.StatusRequest(name=name)).nodes
        return any(n.node_id == node_id and n.pipeline_version >= version for n in nodes)


def admin_client(args: Any) -> AdminClient:
    """The client for a command's `--server` (else MLLAMBDA_ADMIN_ADDR, else the default address)."""
    from controlplane.config import DEFAULT_ADMIN_ADDR, resolve

    return AdminClient(resolve(args.server, "MLLAMBDA_ADMIN_ADDR", DEFAULT_ADMIN_ADDR))
