"""`mllambda`: one entry point for the control plane, sidecars, runtimes and admin."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from controlplane import __version__
from controlplane.errors import CliError

Handler = Callable[[argparse.Namespace], int]


def cmd_doctor(args: argparse.Namespace) -> int:
    from controlplane.node.tools import all_tools

    missing = 0
    for tool in all_tools():
        if tool.ok:
            print(f"ok       {tool.name:<7} {tool.version:<10} {tool.path}")
        else:
            missing += 1
            print(f"MISSING  {tool.name:<7} fix: {tool.fix}")
    return 1 if missing else 0


def cmd_setup(args: argparse.Namespace) -> int:
    from controlplane.node.tools import ToolError, generate_protos, install_consul

    try:
        generate_protos()
        install_consul()
    except ToolError as err:
        raise CliError(str(err)) from err
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllambda", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mllambda {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    doctor = sub.add_parser("doctor", help="check that Envoy, Consul and tansu are installed")
    doctor.set_defaults(handler=cmd_doctor)
    setup = sub.add_parser("setup", help="generate stubs and fetch Consul if missing")
    setup.set_defaults(handler=cmd_setup)

    for add_command in _command_adders():
        add_command(sub)
    return parser


def _command_adders() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Subcommands that live beside the concept they drive."""
    from controlplane import invoke, plane
    from controlplane.admin import cli as admin_cli
    from controlplane.admin import model_cli, monitor_cli, replay_cli, rollout_cli
    from controlplane.node import launch, packaged, register, sidecar
    from controlplane.stack import kubernetes as kube
    from controlplane.stack import up as stack

    return [
        stack.add_command,
        invoke.add_command,
        admin_cli.add_command,
        rollout_cli.add_command,
        replay_cli.add_command,
        monitor_cli.add_command,
        model_cli.add_command,
        plane.add_command,
        sidecar.add_command,
        launch.add_command,
        packaged.add_command,
        register.add_command,
        kube.add_command,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except CliError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
