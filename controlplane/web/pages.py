"""The dashboard's management pages, from plain data (no I/O): sign-in, the edit form, the YAML editor, a diff
between two versions, and the runtimes page. Each is a template (templates/, autoescaped); this module puts
together what a template shows.

No page that holds a form refreshes itself (a refresh would throw away what is being typed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from contract.naming import model_cluster
from contract.service import RuntimeService
from controlplane.delivery.rollouts import label, spots, state, where
from controlplane.delivery.traffic import VariantTraffic
from controlplane.pipeline.model import PipelineVersion, Problem
from controlplane.web.forms import (
    ADD,
    DEFAULT_STEPS,
    REMOVE,
    SHARE,
    START,
    STEPS,
    TRANSPORTS,
    at_path,
    groups,
    shadow_slots,
)
from controlplane.web.render import page


def _page(template: str, title: str, signed_in: bool, csrf: str, section: str = "/", **shown: Any) -> str:
    return page(template, title=title, signed_in=signed_in, csrf=csrf, section=section, live=0, **shown)


def login_page(error: str = "", next_url: str = "/") -> str:
    return _page("login.html", "sign in", False, "", section="", error=error, next_url=next_url)


def edit_page(
    current: PipelineVersion,
    doc: Mapping[str, Any],
    problems: Sequence[Problem],
    csrf: str,
    note: str = "",
    candidates: Sequence[str] = (),
    history: Sequence[PipelineVersion] = (),
) -> str:
    """The form: the transport; per group its variants' weights with their shares, a box to remove each, a
    variant to add at a share (from `candidates`: the model versions passing in Consul) and a rollout to start;
    a shadow per stage or member. It asks for a review (the diff, Envoy's check) before anything is applied;
    then the rollouts' buttons and `history` (newest last) with rollback and diff."""
    name, p = current.pipeline.name, current.pipeline
    shown_groups, fields = [], {"transport"}
    for g in groups(doc):
        holder = g.path.removesuffix(".variants")
        rows = [{"path": f.path, "variant": f.variant, "weight": str(f.weight)} for f in g.fields]
        for row in rows:
            row["gone"] = row["path"].removesuffix(".weight") + REMOVE
        add = _choices(candidates, [f.variant for f in g.fields])
        shown_groups.append(
            {
                "path": g.path,
                "label": g.label,
                "fields": rows,
                "add": add,
                "add_field": g.path + ADD,
                "share_field": g.path + SHARE,
                "start": list(candidates) if _can_start(holder, doc) else [],  # any passing version
                "start_field": holder + START,
                "steps_field": holder + STEPS,
            }
        )
        fields |= {g.path, g.path + ADD, g.path + SHARE, holder + START, holder + STEPS}
        fields |= {r["path"] for r in rows} | {r["gone"] for r in rows}
    shadows = []
    for slot in shadow_slots(doc):
        prefix, values = f"{slot.path}.shadow", slot.shadow or {}
        parts = {part: str(values.get(part, "")) for part in ("model", "version", "percent")}
        shadows.append(
            {"path": slot.path, "label": slot.label, "prefix": prefix, "parts": parts, "present": bool(values)}
        )
        fields |= {slot.path, prefix, *(f"{prefix}.{part}" for part in parts)}
    rollouts = []
    for spot in spots(p):
        _, r = where(p, spot)
        assert r is not None
        rollouts.append({"stage": spot[0], "branch": spot[1], "label": label(p, spot), "state": state(r)})
    return _page(
        "edit.html",
        f"change {name}",
        True,
        csrf,
        name=name,
        version=current.version,
        cause=current.cause,
        note=note,
        problems=problems,
        elsewhere=[problem for problem in problems if problem.path not in fields],
        transports=TRANSPORTS,
        transport=doc.get("transport"),
        groups=shown_groups,
        default_steps=DEFAULT_STEPS,
        shadows=shadows,
        rollouts=rollouts,
        history=_history(history),
    )


def _choices(candidates: Sequence[str], present: Sequence[str]) -> list[str]:
    """The model versions to offer a group: not in it yet, other versions of its own models first."""
    models = {v.partition(":")[0] for v in present}
    return sorted((c for c in candidates if c not in present), key=lambda c: (c.partition(":")[0] not in models, c))


def _can_start(holder: str, doc: Mapping[str, Any]) -> bool:
    """A rollout can start in a stage's or a branch's split (not in an ensemble's members, not where one runs)."""
    node = at_path(doc, holder)
    return ".members[" not in holder and isinstance(node, dict) and not node.get("rollout")


def _history(versions: Sequence[PipelineVersion]) -> list[dict[str, Any]]:
    """Newest first, each with the version before it (whose diff it links to)."""
    return [
        {
            "version": v.version,
            "cause": v.cause,
            "created_at": v.created_at,
            "older": versions[i - 1].version if i else 0,
        }
        for i, v in reversed(list(enumerate(versions)))
    ]


def review_page(
    current: PipelineVersion, form: Mapping[str, str], lines: Sequence[str], csrf: str, would_create: bool
) -> str:
    """What the form would change, as a diff against the current version (Envoy's check has passed), with the
    form's values carried on: apply them, or go back to the form with them."""
    name = current.pipeline.name
    carried = [(k, v) for k, v in form.items() if k == "transport" or k.startswith("stages[")]
    return _page(
        "review.html",
        f"review {name}",
        True,
        csrf,
        name=name,
        version=current.version,
        lines=lines,
        carried=carried,
        would_create=would_create,
    )


def diff_page(name: str, old: int, new: int, lines: Sequence[str], csrf: str | None) -> str:
    """`csrf`: the viewer's session's (None: signed out), for the bar's sign-out button."""
    return _page(
        "diff.html", f"{name} v{old}..v{new}", csrf is not None, csrf or "", name=name, old=old, new=new, lines=lines
    )


def yaml_page(text: str, problems: Sequence[Problem], csrf: str, note: str = "") -> str:
    return _page("yaml.html", "YAML editor", True, csrf, section="/yaml", text=text, problems=problems, note=note)


def runtimes_page(
    runtimes: Sequence[RuntimeService],
    traffic: Sequence[VariantTraffic],
    consul_ui: str,
    envoy_admin: Mapping[str, str],
    csrf: str | None,
) -> str:
    """Each model version: replicas passing of registered, its recent 5xx, and each instance with its links."""
    by_version: dict[tuple[str, str], list[RuntimeService]] = {}
    for r in runtimes:
        by_version.setdefault((r.model, r.version), []).append(r)
    seen: dict[str, tuple[int, int, float | None]] = {}
    for t in traffic:
        requests, errors, window = seen.get(model_cluster(t.model, t.version), (0, 0, None))
        seen[model_cluster(t.model, t.version)] = (requests + t.requests, errors + t.errors, t.window_seconds or window)
    rows = []
    for (model, version), instances in sorted(by_version.items()):
        passing = sum(1 for i in instances if i.passing)
        requests, errors, window = seen.get(model_cluster(model, version), (0, 0, None))
        recent = f"{errors} of {requests}" + (f" in {window:.0f} s" if window else "") if requests else "no traffic"
        shown = sorted(instances, key=lambda i: i.service_id)
        word = "passing" if passing == len(instances) else "failing" if not passing else "degraded"
        rows.append(
            {"model": model, "version": version, "passing": passing, "word": word, "recent": recent, "instances": shown}
        )
    return _page(
        "runtimes.html",
        "runtimes",
        csrf is not None,
        csrf or "",
        section="/runtimes",
        rows=rows,
        consul_ui=consul_ui,
        envoy_admin=envoy_admin,
    )
