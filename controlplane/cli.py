"""`mllambda`: one entry point for the control plane, sidecars, runtimes and admin."""

from __future__ import annotations

import argparse
import importlib
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


# Where each command is defined (its module's `add_command` adds it), in the order `mllambda --help` lists them.
# Only the invoked command's module is imported: `mllambda get pipelines` does not load the control plane, numpy
# or Kafka's client (about 1 s of CPU a call before). tests/test_structure.py checks this table against the modules.
COMMANDS = {
    "up": "controlplane.stack.up",
    "down": "controlplane.stack.up",
    "invoke": "controlplane.invoke",
    "status": "controlplane.invoke",
    "apply": "controlplane.admin.cli",
    "get": "controlplane.admin.cli",
    "describe": "controlplane.admin.cli",
    "delete": "controlplane.admin.cli",
    "history": "controlplane.admin.cli",
    "rollback": "controlplane.admin.cli",
    "rollout": "controlplane.admin.rollout_cli",
    "replay": "controlplane.admin.replay_cli",
    "monitor": "controlplane.admin.monitor_cli",
    "build": "controlplane.admin.model_cli",
    "deploy": "controlplane.admin.model_cli",
    "undeploy": "controlplane.admin.model_cli",
    "controlplane": "controlplane.plane",
    "sidecar": "controlplane.node.sidecar",
    "runtime": "controlplane.node.launch",
    "prepare": "controlplane.node.packaged",
    "test": "controlplane.node.packaged",
    "register": "controlplane.node.register",
    "render": "controlplane.stack.kubernetes",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`, with only the module of the command it names loaded; with every command for help,
    for a word that is no command, and when no `argv` is given."""
    parser = argparse.ArgumentParser(prog="mllambda", description=__doc__)
    parser.add_argument("--version", action="version", version=f"mllambda {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    doctor = sub.add_parser("doctor", help="check that Envoy, Consul and tansu are installed")
    doctor.set_defaults(handler=cmd_doctor)
    setup = sub.add_parser("setup", help="generate stubs and fetch Consul if missing")
    setup.set_defaults(handler=cmd_setup)

    for add_command in _command_adders(_command_word(argv)):
        add_command(sub)
    return parser


def _command_word(argv: list[str] | None) -> str | None:
    words = [word for word in argv or [] if not word.startswith("-")]
    return words[0] if words else None


def _command_adders(command: str | None = None) -> list[Callable[[argparse._SubParsersAction], None]]:
    """The `add_command` of `command`'s module, or of every module (for help, and for a word that is none)."""
    chosen = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    return [importlib.import_module(name).add_command for name in chosen]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
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
