"""`mllambda monitor baseline M:V [--window S | --reference] [--threshold T]`; `mllambda monitor status [M:V]`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from controlplane.admin.client import admin_client
from controlplane.errors import CliError


def _ref(text: str) -> tuple[str, str]:
    model, sep, version = text.partition(":")
    if not sep or not model or not version:
        raise CliError(f"expected MODEL:VERSION, got {text!r}")
    return model, version


def cmd_monitor(args: argparse.Namespace) -> int:
    from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb

    with admin_client(args) as admin:
        if args.action == "baseline":
            if not args.ref:
                raise CliError("mllambda monitor baseline MODEL:VERSION [--window S | --reference] [--threshold T]")
            model, version = _ref(args.ref)
            request = pb.SetBaselineRequest(
                model=model, version=version, window_seconds=args.window, reference=args.reference
            )
            if args.threshold is not None:
                request.threshold = args.threshold
            rows = json.loads(admin.SetBaseline(request).status_json)
            base = rows[0]["baseline"] if rows else None
            if base:
                print(
                    f"model/{model}:{version} baseline set: {base['requests']} {_source(base)}; "
                    f"drift threshold {base['threshold']:g} (PSI)"
                )
            return 0
        model, version = _ref(args.ref) if args.ref else ("", "")
        rows = json.loads(admin.GetMonitorStatus(pb.MonitorStatusRequest(model=model, version=version)).status_json)
    if args.output == "json":
        print(json.dumps({"items": rows}, indent=2))
        return 0
    print(table(rows))
    return 0


def _source(base: dict[str, Any]) -> str:
    if base.get("source", "traffic") == "traffic":
        return f"profiled requests over {base['window_seconds']}s of traffic"
    return f"records of its {base['source']}"


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no profiled model versions yet (runtimes profile --profile-percent of requests, 5 by default)"
    lines = []
    for row in rows:
        base = row["baseline"]
        about = (
            f"baseline {base['created_at']} ({base['requests']} {_source(base)}), threshold {base['threshold']:g}"
            if base
            else "no baseline: `mllambda monitor baseline M:V`"
        )
        if row.get("broken_baseline"):
            about = f"baseline unreadable: {row['broken_baseline']}"
        lines.append(f"{row['model']}:{row['version']}  {row['requests']} profiled in the last minute; {about}")
        for d in row["drift"]:
            mark = "  DRIFTED" if base and d["psi"] > base["threshold"] else ""
            lines.append(
                f"  {d['side']}.{d['field']} ({d['of']}): PSI {d['psi']:.3f}, {d['measure']} {d['distance']:.3f}{mark}"
            )
        if row["too_few"]:
            lines.append(f"  too few values to judge: {', '.join(row['too_few'][:10])}")
    return "\n".join(lines)


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("monitor", help="model monitoring: set a version's baseline, see its fields and drift")
    p.add_argument("action", choices=["baseline", "status"])
    p.add_argument("ref", nargs="?", help="MODEL:VERSION")
    p.add_argument("--window", type=int, default=300, help="baseline: the last SECONDS of traffic (10 to 600)")
    p.add_argument("--reference", action="store_true", help="baseline: the package's reference data, not traffic")
    p.add_argument("--threshold", type=float, help="baseline: PSI above which a field has drifted (0.2)")
    p.add_argument("-o", "--output", choices=["table", "json"], default="table")
    p.add_argument("--server", help="admin API address (default: MLLAMBDA_ADMIN_ADDR or 127.0.0.1:18001)")
    p.set_defaults(handler=cmd_monitor)
