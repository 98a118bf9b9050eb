"""HTML from Jinja2 templates with autoescape: a value put into a page is escaped unless a template says not.

One page shell (templates/base.html) and one stylesheet (static/mllambda.css) for every page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

HERE = Path(__file__).parent
STYLESHEET = HERE / "static" / "mllambda.css"
_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every template, whatever its name
    undefined=jinja2.StrictUndefined,  # a field the page asks for and nobody gave is an error, not ""
    trim_blocks=True,
    lstrip_blocks=True,
)


def page(template: str, **context: Any) -> str:
    return _env.get_template(template).render(**context)


def shell(title: str, body: str, *, nav: bool = True, signed_in: bool = False, csrf: str = "", refresh: int = 0) -> str:
    """A page whose body was built elsewhere (already escaped HTML) in the one shell."""
    return page(
        "base.html",
        title=title,
        body=jinja2.utils.markupsafe.Markup(body),
        nav=nav,
        signed_in=signed_in,
        csrf=csrf,
        refresh=refresh,
    )
