"""HTML from Jinja2 templates with autoescape: a value put into a page is escaped unless a template says not.

One page shell (templates/base.html: the section bar, sign-in, the live button) and one stylesheet
(static/mllambda.css, light and dark) for every page; static/mllambda.js keeps live pages current.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

HERE = Path(__file__).parent
STYLESHEET = HERE / "static" / "mllambda.css"
SCRIPT = HERE / "static" / "mllambda.js"
SECTIONS = (
    ("/", "Pipelines"),
    ("/runtimes", "Runtimes"),
    ("/models", "Models"),
    ("/monitoring", "Monitoring"),
    ("/yaml", "YAML editor"),
)
_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,  # every template, whatever its name
    undefined=jinja2.StrictUndefined,  # a field the page asks for and nobody gave is an error, not ""
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.globals["sections"] = SECTIONS


def page(template: str, **context: Any) -> str:
    return _env.get_template(template).render(**context)


def part(macro: str, *args: Any) -> Markup:
    """One of templates/parts.html's macros on its own: a piece a page shows that is also rendered alone."""
    return Markup(getattr(_env.get_template("parts.html").module, macro)(*args))


def badge(word: str, kind: str = "") -> Markup:
    """A state said in words, coloured by its kind (a class of mllambda.css: passing, failing, draining...).
    Templates call it too (a global): its escaped HTML goes in as it is."""
    return Markup("<span class='badge {}'>{}</span>").format(kind, word)


_env.globals["badge"] = badge
