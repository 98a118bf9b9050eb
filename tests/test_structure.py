"""The layout holds: no import cycles, each folder imports only the layers below it, modules stay small.

Reads the source with `ast` (no imports run), so it also sees imports inside
functions: a lazy import that closes a cycle is still a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("contract", "controlplane", "runtime_sdk")
# A soft signal, not a target: a concept decides where a file splits; past this, ask whether it holds two.
MAX_LINES = 600
# What each package may import from the others (and itself).
ALLOWED = {
    "contract": {"contract"},
    "runtime_sdk": {"contract", "runtime_sdk"},
    "controlplane": {"contract", "runtime_sdk", "controlplane"},
}
# Inside the control plane: what each folder (a "room") may import besides itself, `contract` and the
# small shared modules. Top-level modules not named here (plane, cli) wire rooms together and may use any.
SHARED = {"controlplane.config", "controlplane.errors", "controlplane.files", "controlplane.listen"}
ROOMS: dict[str, set[str]] = {
    "controlplane.pipeline": set(),  # the domain: pipelines, their validator and store
    "controlplane.consul": set(),  # what lives in Consul beside pipelines; knows nothing of Envoy
    "controlplane.xds": {"controlplane.consul"},  # streams a cache; never sees a pipeline (go-control-plane's split)
    "controlplane.translate": {"controlplane.pipeline", "controlplane.xds"},  # pure: pipelines -> snapshots
    "controlplane.delivery": {
        "controlplane.pipeline",
        "controlplane.translate",
        "controlplane.xds",
        "controlplane.consul",
    },
    "controlplane.kafka": {"controlplane.pipeline", "controlplane.translate", "controlplane.consul"},
    "controlplane.edge": {"controlplane.consul"},  # the OIP gRPC front: gRPC in, the gateway's OIP over HTTP out
    # the autoscaler, its backends and the activator; it scales deployed packages (`deploy --autoscale`) too
    "controlplane.scaling": {
        "controlplane.consul",
        "controlplane.delivery",
        "controlplane.settings",
        "controlplane.models",
    },
    "controlplane.node": {"runtime_sdk", "controlplane.consul", "controlplane.translate", "controlplane.models"},
    # model packages, their store and environments (which get a copy of the runtime SDK); the contracts
    # of the versions a pipeline names
    "controlplane.models": {"runtime_sdk", "controlplane.pipeline"},
    "controlplane.monitoring": set(),  # the runtimes' profiles merged per model version; baselines, drift
    "controlplane.admin": {
        "controlplane.monitoring",
        "controlplane.scaling",  # `deploy --autoscale`: its policy checked as the --autoscale file's
        "controlplane.pipeline",
        "controlplane.models",
        "controlplane.translate",
        "controlplane.delivery",
        "controlplane.xds",
        "controlplane.node",
    },
    "controlplane.web": {
        "controlplane.view",
        "controlplane.admin",
        "controlplane.monitoring",  # what the runtimes report (admission per caller), shown as it is read
        "controlplane.pipeline",
        "controlplane.delivery",
        "controlplane.consul",
        "controlplane.xds",
    },
    "controlplane.stack": {
        "controlplane.pipeline",
        "controlplane.models",
        "controlplane.scaling",
        "controlplane.node",
        "controlplane.admin",
    },
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_gen" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Our modules that `path` imports, anywhere in it."""
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            # `from a.b import c`: the module a.b.c if there is one, else a.b
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                targets.add(name)
    return targets


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {name: imports_of(path, known) for name, path in known.items()}
    # A package's __init__ is not a dependency of what it contains.
    return {name: {t for t in targets if t != name and not name.startswith(t + ".")} for name, targets in edges.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_real_imports() -> None:
    edges = graph()
    assert "contract.service" in edges["controlplane.consul.discovery"]
    assert "controlplane.pipeline.model" in edges["controlplane.translate.pipelines"]


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_a_cycle_is_found_when_there_is_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_packages_import_only_what_they_may() -> None:
    wrong = [
        f"{source} imports {target}"
        for source, targets in graph().items()
        for target in targets
        if target.split(".")[0] not in ALLOWED[source.split(".")[0]]
    ]
    assert wrong == []


def room(module: str) -> str:
    """The folder a module lives in: `controlplane.delivery.switch` -> `controlplane.delivery`."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "controlplane" else parts[0]


def test_rooms_import_only_the_layers_below_them() -> None:
    wrong = sorted(
        f"{source} imports {target}"
        for source, targets in graph().items()
        if (home := room(source)) in ROOMS
        for target in targets
        if (there := room(target)) != home and there not in ROOMS[home] | SHARED | {"contract"}
    )
    assert wrong == []


def test_the_shared_modules_import_no_room() -> None:
    wrong = sorted(
        f"{source} imports {target}"
        for source, targets in graph().items()
        if room(source) in SHARED
        for target in targets
        if room(target) not in SHARED | {"contract"}
    )
    assert wrong == []


def test_a_room_that_breaks_its_layer_is_caught() -> None:
    """The rule reads real imports: the pipeline model importing xDS would be named."""
    source, target = "controlplane.pipeline.model", "controlplane.xds.snapshot"
    assert room(target) not in ROOMS[room(source)] | SHARED | {"contract"}


def test_no_cycles_between_rooms() -> None:
    edges: dict[str, set[str]] = {}
    for source, targets in graph().items():
        edges.setdefault(room(source), set()).update(room(t) for t in targets if room(t) != room(source))
    assert cycles(edges) == []


def test_the_architecture_map_is_the_folder_tree() -> None:
    """docs/architecture.md names every module where it lives, and no module that is gone."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    mapped = text.split("## Pieces", 1)[1].split("```")[1]
    missing = [
        str(path.relative_to(ROOT))
        for path in modules().values()
        if path.name != "__init__.py" and f"{path.relative_to(ROOT)}" not in _map_paths(mapped)
    ]
    assert missing == []


def _map_paths(block: str) -> set[str]:
    """Paths in the module map: a line's first word is a folder (ends with /) or a file in the last folder."""
    paths: set[str] = set()
    folders: list[tuple[int, str]] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        word = line.split()[0]
        while folders and folders[-1][0] >= indent:
            folders.pop()
        prefix = folders[-1][1] if folders else ""
        if word.endswith("/"):
            folders.append((indent, prefix + word))
        elif word.endswith(".py"):
            paths.add(prefix + word)
    return paths


def test_no_module_over_the_size_limit() -> None:
    big = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert big == {}


def test_the_cli_starts_before_the_admin_stubs_are_generated() -> None:
    """`mllambda setup` generates them, so the CLI must build without them (a fresh checkout)."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "class NoStubs:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.startswith('controlplane._gen'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, NoStubs())\n"
        "from controlplane.cli import build_parser\n"
        "build_parser().parse_args(['setup'])\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_cli_command_table_names_each_command_where_it_is_defined() -> None:
    import argparse
    import importlib

    from controlplane import cli

    for module in dict.fromkeys(cli.COMMANDS.values()):
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module).add_command(sub)
        assert {name: module for name in sub.choices} == {n: m for n, m in cli.COMMANDS.items() if m == module}
    every = cli.build_parser(["--help"]).format_help()
    assert all(name in every for name in cli.COMMANDS), every


def test_a_cli_command_loads_only_its_own_module() -> None:
    """`mllambda get` pays for the admin client, not for the control plane, numpy or Kafka (1 s of CPU a call)."""
    import subprocess
    import sys

    heavy = ("numpy", "aiokafka", "aiohttp", "consul", "controlplane.plane", "controlplane.stack.up")
    probe = (
        "import sys\n"
        "from controlplane.cli import build_parser\n"
        "build_parser(['--debug', 'get', 'pipelines']).parse_args(['--debug', 'get', 'pipelines'])\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_a_runtime_starts_without_numpy_kafka_or_a_web_server_and_profiles_load_aside() -> None:
    """A runtime's start (`mllambda runtime`, also a scale-from-zero's cold start) imports what every runtime needs:
    DataSketches and numpy load in a thread while it starts, the Kafka client only with a broker, the protos of
    Envoy's TLS only under mTLS, the package server's side only to fetch (0.86 -> 0.44 s of CPU to import)."""
    import subprocess
    import sys

    heavy = ("numpy", "datasketches", "aiokafka", "aiohttp.web", "controlplane.translate.security")
    probe = (
        "import sys, time\n"
        "from controlplane.cli import build_parser\n"
        "argv = ['runtime', 'm:f', '--model=m', '--version=v1']\n"
        "build_parser(argv).parse_args(argv)\n"
        "import controlplane.node.launch, runtime_sdk.serve\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
        "from runtime_sdk.profiles import Profiler\n"
        "p = Profiler(100.0, clock=lambda: 5.0)\n"  # one window (a real clock may cross into the next meanwhile)
        "p.offer({'x': 1.5, 's': 'a'}, {'y': 2})\n"
        "w = p._window()\n"
        "print(w.requests, 'numpy' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split("\n")[:2] == ["[]", "1 True"], done.stdout + done.stderr


def unexplained_sleeps(source: str) -> list[int]:
    """Lines of `sleep(...)` calls outside a loop with no comment on them: a test waits on a predicate or an event;
    a sleep that stays is load duration, simulated work, an observation window or time passing, and says which.
    A sleep inside a loop is the loop's poll interval."""
    import io
    import tokenize

    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    commented = {t.start[0] for t in tokens if t.type == tokenize.COMMENT}
    found: list[int] = []

    def visit(node: ast.AST, in_loop: bool) -> None:
        for child in ast.iter_child_nodes(node):
            looping = in_loop or isinstance(node, ast.While | ast.For | ast.AsyncFor)
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                looping = False
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) and child.func.attr == "sleep":
                lines = range(child.lineno, (child.end_lineno or child.lineno) + 1)
                if not looping and not commented.intersection(lines):
                    found.append(child.lineno)
            visit(child, looping)

    visit(ast.parse(source), False)
    return found


def test_every_sleep_in_the_tests_says_why_it_is_not_a_predicate() -> None:
    bare = {
        str(path.relative_to(ROOT)): lines
        for path in sorted((ROOT / "tests").rglob("*.py"))
        if (lines := unexplained_sleeps(path.read_text()))
    }
    assert bare == {}


def test_a_bare_sleep_is_found() -> None:
    source = (
        "async def t():\n"
        "    await asyncio.sleep(1)\n"  # found
        "    await asyncio.sleep(2)  # load duration\n"
        "    while x:\n"
        "        await asyncio.sleep(0.1)\n"  # a poll interval
        "        async def inner():\n"
        "            time.sleep(3)\n"  # found: a function in a loop is not the loop
    )
    assert unexplained_sleeps(source) == [2, 7]


def test_no_hand_formatting() -> None:
    """ruff formats everything: no marker that turns it off to compress code by hand or fit a limit."""
    marker = "# fmt: " + "skip", "# fmt: " + "off"
    folders = ("contract", "controlplane", "runtime_sdk", "bench", "tests", "examples")
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for folder in folders
        for path in sorted((ROOT / folder).rglob("*.py"))
        if "_gen" not in path.parts
        for n, line in enumerate(path.read_text().splitlines(), start=1)
        if any(m in line for m in marker)
    ]
    assert found == []


def test_tests_take_shared_code_from_helpers_only() -> None:
    """A test imports what tests share from tests/helpers/, never from conftest.py or another test module
    (pytest may import those twice, under two names)."""
    wrong = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                leaf = node.module.rsplit(".", 1)[-1]
                if node.module.startswith("tests.") and (leaf == "conftest" or leaf.startswith("test_")):
                    wrong.append(f"{path.relative_to(ROOT)}: {node.module}")
    assert wrong == []


HTML_TAG = re.compile(
    r"<(?:a|p|div|span|table|tr|td|th|h[1-6]|form|input|ul|ol|li|section|pre|button|select|option|label)\b"
)
DRAWN = {"charts.py", "render.py"}  # SVG drawn from geometry (each text escaped); the badge, one escaping Markup


def html_in_strings(source: str) -> list[int]:
    """Lines of string literals (f-string parts included) that hold an HTML tag."""
    return sorted(
        {
            node.lineno
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and HTML_TAG.search(node.value)
        }
    )


def test_pages_are_templates() -> None:
    """The web pages are Jinja2 templates (autoescaped): no module builds HTML in strings, where a new field
    could forget its escape."""
    found = [
        f"{path.name}:{n}"
        for path in sorted((ROOT / "controlplane" / "web").glob("*.py"))
        if path.name not in DRAWN
        for n in html_in_strings(path.read_text())
    ]
    assert found == []
    assert html_in_strings('x = f"<td>{y}</td>"\nz = "plain < text"\n') == [1]  # it finds one
