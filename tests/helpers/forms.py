"""Every form of a page as a browser would post it (the dashboard tests drive pages without a browser)."""

from __future__ import annotations

from html.parser import HTMLParser


class Forms(HTMLParser):
    """Every form's fields as a browser would post them (text, hidden, select, ticked boxes)."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.forms: list[tuple[dict[str, str], dict[str, str]]] = []
        self.select: str | None = None
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((a, {}))
        elif tag == "input" and self.forms and (a.get("type") != "checkbox" or "checked" in a):
            self.forms[-1][1][a["name"]] = a.get("value", "")
        elif tag == "select":
            self.select = a["name"]
        elif tag == "option" and self.select and "selected" in a:
            self.forms[-1][1][self.select] = ""

    def handle_data(self, data: str) -> None:
        if self.select and self.forms and self.forms[-1][1].get(self.select) == "":
            self.forms[-1][1][self.select] = data

    def handle_endtag(self, tag: str) -> None:
        self.select = None if tag == "select" else self.select

    def actions(self) -> list[str]:
        return [attrs.get("action", "") for attrs, _ in self.forms]

    def find(self, action: str) -> dict[str, str]:
        return next(dict(fields) for attrs, fields in self.forms if attrs.get("action") == action)
