"""`python -m runtime_sdk.child`: serve a model package's predict() in the package's own environment.

`mllambda runtime --package M:V` runs in ML Lambda's environment: it picks the ports,
keeps the certificate and runs the Envoy sidecar. The model runs here instead, in the
environment built from the package's lock, which holds the model's libraries and this
SDK but nothing of the control plane. The launcher writes one JSON document to stdin
(options, the planned service, where Consul is) and stops this process with SIGTERM;
if the launcher dies, this process stops too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import Any

from contract import consul_client
from contract.service import RuntimeService
from runtime_sdk.serve import ServeError, ServeOptions, serve


class Launcher:
    """The launching process stands for the sidecar: while it lives, the sidecar does (it stops us otherwise)."""

    def __init__(self, parent: int) -> None:
        self.parent = parent

    def alive(self) -> bool:
        return os.getppid() == self.parent

    def tail(self, lines: int = 20) -> str:
        return "the launcher (mllambda runtime) exited"


def read_spec(raw: str) -> tuple[ServeOptions, RuntimeService, dict[str, Any], bool]:
    spec = json.loads(raw)
    return (
        ServeOptions(**spec["options"]),
        RuntimeService(**spec["service"]),
        dict(spec["consul"]),
        bool(spec.get("through_sidecar", True)),
    )


async def main() -> None:
    options, service, where, through_sidecar = read_spec(sys.stdin.readline())
    client = consul_client.connect(
        where["scheme"], where["host"], where["port"], where.get("token"), where.get("ca_file")
    )
    try:
        await serve(options, service, client, Launcher(os.getppid()) if through_sidecar else None)
    finally:
        await client.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    sys.path.insert(0, os.getcwd())  # the package's root: its entry imports from there
    try:
        asyncio.run(main())
    except ServeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
