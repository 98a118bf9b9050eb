"""What the CLI prints: tables, or JSON/YAML as kubectl prints them, and text from elsewhere made safe to print."""

from __future__ import annotations

import json
from typing import Any

import yaml


def emit(output: str, items: list[dict[str, Any]], headers: list[str], rows: list[list[str]], one: bool) -> None:
    """A table, or JSON/YAML: the object when one was asked for by name, else `{"items": [...]}` (kubectl's way)."""
    if output in ("json", "yaml"):
        data: Any = items[0] if one else {"items": items}
        print(json.dumps(data, indent=2) if output == "json" else yaml.safe_dump(data, sort_keys=False).rstrip())
        return
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        print("   ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def shown(text: str) -> str:
    """Text that came from outside (a caller's header, a process's output) as a terminal may print it: as it came
    when printable, else quoted with its escapes, so that a line break or an escape sequence never reaches it raw."""
    return text if text.isprintable() else ascii(text)
