"""The dashboard's management pages as HTML, from plain data (no I/O): sign-in, the edit form,
the YAML editor, a diff between two versions, and the runtimes page.

No page that holds a form refreshes itself (a refresh would throw away what is being typed).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from contract.naming import model_cluster
from contract.service import RuntimeService
from controlplane.delivery.rollouts import Spot, label, spots, state, where
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
from controlplane.web.render import badge, shell

e = html.escape
# Shares shown next to the weights follow as they are typed: weights are relative, the shares add up to 100%.
SHARES_JS = (
    "document.querySelectorAll('.group').forEach(function(g){function f(){var ws=g.querySelectorAll('input.weight'),"
    "t=0;ws.forEach(function(i){t+=Math.max(0,parseInt(i.value)||0)});ws.forEach(function(i){"
    "i.parentNode.querySelector('output').textContent=t?Math.round(100*Math.max(0,parseInt(i.value)||0)/t)+'%':'-'})}"
    "g.addEventListener('input',f);f()})"
)


def layout(title: str, body: str, signed_in: bool, csrf: str = "", section: str = "/") -> str:
    return shell(title, body, section=section, signed_in=signed_in, csrf=csrf)


def hidden(name: str, value: object) -> str:
    return f"<input type='hidden' name='{e(name)}' value='{e(str(value))}'>"


def errors_at(problems: Sequence[Problem], path: str) -> str:
    found = [p.message for p in problems if p.path == path]
    return "".join(f"<span class='error' data-for='{e(path)}'>{e(message)}</span>" for message in found)


def login_page(error: str = "", next_url: str = "/") -> str:
    body = (
        "<h1>Sign in</h1><p>With the control plane's token (MLLAMBDA_TOKEN, or the link `mllambda up` printed).</p>"
        f"<form method='post' action='/login'>{hidden('next', next_url)}"
        "<p><label>token <input type='password' name='token' id='token' autocomplete='off'></label></p>"
        "<p><label>your name, recorded with every change (optional) <input name='name' id='name'></label></p>"
        f"<button type='submit' id='sign-in'>sign in</button>{f'<span class=error>{e(error)}</span>' if error else ''}"
        "</form>"
    )
    return layout("sign in", f"<section class='card'>{body}</section>", signed_in=False, section="")


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
    name = current.pipeline.name
    fields = {"transport", *(f.path for g in groups(doc) for f in g.fields), *(g.path for g in groups(doc))}
    for g in groups(doc):
        holder = g.path.removesuffix(".variants")
        fields |= {g.path + ADD, g.path + SHARE, holder + START, holder + STEPS}
        fields |= {f.path.removesuffix(".weight") + REMOVE for f in g.fields}
    for slot in shadow_slots(doc):
        shadow = f"{slot.path}.shadow"
        fields |= {slot.path, shadow, *(f"{shadow}.{f}" for f in ("model", "version", "percent"))}
    elsewhere = [p for p in problems if p.path not in fields]
    out = [f"<h1>Change {e(name)} <small>v{current.version} · {e(current.cause)}</small></h1>"]
    out += [f"<p class='note' id='note' role='status'>{e(note)}</p>"] if note else []
    if elsewhere:
        out.append("<ul class='error' id='problems'>" + "".join(f"<li>{e(str(p))}</li>" for p in elsewhere) + "</ul>")
    out.append(f"<form method='post' action='/pipelines/{e(name)}/edit' id='edit'>")
    out.append(hidden("csrf", csrf) + hidden("expect_version", current.version))
    options = "".join(f"<option{' selected' if t == doc.get('transport') else ''}>{t}</option>" for t in TRANSPORTS)
    out.append("<section class='card'><h2>Transport between stages</h2>")
    out.append(f"<p><label>transport <select name='transport'>{options}</select></label>")
    out.append(errors_at(problems, "transport") + "</p></section><section class='card'><h2>Splits</h2>")
    for group in groups(doc):
        out.append(f"<fieldset class='group' data-path='{e(group.path)}'><legend>{e(group.label)}</legend>")
        for f in group.fields:
            gone = f.path.removesuffix(".weight") + REMOVE
            out.append(
                f"<div class='variant-edit'><label>{e(f.variant)} weight <input class='weight' type='text' "
                f"inputmode='numeric' name='{e(f.path)}' value='{e(str(f.weight))}'> <output></output>"
                f"{errors_at(problems, f.path)}</label><label><input type='checkbox' name='{e(gone)}'> remove"
                f"</label>{errors_at(problems, gone)}</div>"
            )
        out.append(_add_row(group.path, _choices(candidates, [f.variant for f in group.fields]), problems))
        out.append(_start_row(group.path.removesuffix(".variants"), candidates, doc, problems))
        out.append(errors_at(problems, group.path) + "</fieldset>")
    out.append("</section><section class='card'><h2>Shadows</h2>")
    for slot in shadow_slots(doc):
        s = slot.shadow or {}
        p = f"{slot.path}.shadow"
        out.append(f"<fieldset class='shadow'><legend>shadow of {e(slot.label)}</legend>")
        for part, size in (("model", 14), ("version", 6), ("percent", 5)):
            out.append(
                f"<label>{part} <input name='{e(p)}.{part}' size='{size}' value='{e(str(s.get(part, '')))}'>"
                f"{errors_at(problems, f'{p}.{part}')}</label> "
            )
        out.append(f"<label><input type='checkbox' name='{e(p)}.remove'> remove</label>" if s else "")
        out.append(errors_at(problems, p) + errors_at(problems, slot.path) + "</fieldset>")
    out.append(
        "</section><p><button class='primary' name='action' value='review' id='review'>review the change</button>"
        " <span class='muted'>shows what would change and runs Envoy's check; nothing is applied yet</span></p></form>"
    )
    out.append(f"<script>{SHARES_JS}</script>")
    out.append(rollout_forms(current, csrf))
    out.append(
        f"<p><a href='/yaml?name={e(name)}'>edit the whole definition as YAML</a> · "
        f"<a href='/pipelines/{e(name)}'>back to {e(name)}</a></p>"
    )
    out.append(history_table(name, history, current.version, csrf))
    return layout(f"change {name}", "".join(out), signed_in=True, csrf=csrf)


def _choices(candidates: Sequence[str], present: Sequence[str]) -> list[str]:
    """The model versions to offer a group: not in it yet, other versions of its own models first."""
    models = {v.partition(":")[0] for v in present}
    return sorted((c for c in candidates if c not in present), key=lambda c: (c.partition(":")[0] not in models, c))


def _add_row(group: str, choices: Sequence[str], problems: Sequence[Problem]) -> str:
    """A variant to add to a group at a share, picked from the model versions that are passing."""
    if not choices:
        return "<p class='muted add'>no other model version is passing in Consul to add here</p>"
    number = "class='share' type='text' inputmode='numeric' placeholder='10'"
    return _pick_row("add", ("add", group + ADD), choices, ("at", group + SHARE, number, "% of this group"), problems)


def _start_row(holder: str, choices: Sequence[str], doc: Mapping[str, Any], problems: Sequence[Problem]) -> str:
    """A rollout to start in a stage's or a branch's split (not in an ensemble's members, not where one runs)."""
    node = at_path(doc, holder)
    if ".members[" in holder or not choices or not isinstance(node, dict) or node.get("rollout"):
        return ""
    steps = ("in steps of", holder + STEPS, f"size='14' placeholder='{DEFAULT_STEPS}'", "%")
    return _pick_row("start", ("start a rollout to", holder + START), choices, steps, problems)


def _pick_row(
    kind: str,
    pick: tuple[str, str],
    choices: Sequence[str],
    then: tuple[str, str, str, str],
    problems: Sequence[Problem],
) -> str:
    """A model version picked from `choices` (words, field) and a number after it (words, field, attributes, unit),
    each with its problems next to it."""
    (words, field), (before, number, attributes, unit) = pick, then
    options = "<option value=''>(none)</option>" + "".join(f"<option>{e(c)}</option>" for c in choices)
    return (
        f"<div class='variant-edit {kind}'><label>{words} <select name='{e(field)}'>{options}</select></label>"
        f"{errors_at(problems, field)}<label>{before} <input name='{e(number)}' {attributes}> {unit}</label>"
        f"{errors_at(problems, number)}</div>"
    )


def review_page(
    current: PipelineVersion, form: Mapping[str, str], lines: Sequence[str], csrf: str, would_create: bool
) -> str:
    """What the form would change, as a diff against the current version (Envoy's check has passed), with the
    form's values carried on: apply them, or go back to the form with them."""
    name = current.pipeline.name
    carried = "".join(hidden(k, v) for k, v in form.items() if k == "transport" or k.startswith("stages["))
    shown = "\n".join(_diff_line(t) for t in lines) or "(the same definition)"
    verdict = (
        f"<p class='note' role='status'>valid, and Envoy accepts it: applying makes version {current.version + 1}</p>"
        if would_create
        else f"<p class='note' role='status'>nothing would change: this is version {current.version}</p>"
    )
    apply = "<button class='primary' name='action' value='apply' id='apply'>apply</button> " if would_create else ""
    body = (
        f"<h1>Review the change to {e(name)}</h1>{verdict}<pre id='diff'>{shown}</pre>"
        f"<form method='post' action='/pipelines/{e(name)}/edit' id='confirm'>{hidden('csrf', csrf)}"
        f"{hidden('expect_version', current.version)}{carried}{apply}"
        "<button name='action' value='edit' id='back'>back to the form</button></form>"
    )
    return layout(f"review {name}", body, signed_in=True, csrf=csrf)


def _diff_line(text: str) -> str:
    kind = "add" if text.startswith("+") else "del" if text.startswith("-") else ""
    return f"<span class='{kind}'>{e(text)}</span>" if kind else e(text)


def rollout_forms(current: PipelineVersion, csrf: str) -> str:
    p, out = current.pipeline, []
    for spot in spots(p):
        _, r = where(p, spot)
        assert r is not None
        buttons = "".join(
            f"<button name='action' value='{a}'>{a}</button>" for a in ("pause", "resume", "promote", "abort")
        )
        out.append(
            f"<form method='post' action='/pipelines/{e(p.name)}/rollout' class='rollout'>"
            f"{hidden('csrf', csrf)}{hidden('expect_version', current.version)}{_spot_fields(spot)}"
            f"rollout {e(label(p, spot))}: {e(state(r))} {buttons}</form>"
        )
    return "<section class='card'><h2>Rollouts</h2>" + "".join(out) + "</section>" if out else ""


def _spot_fields(spot: Spot) -> str:
    return hidden("stage", spot[0]) + hidden("branch", spot[1])


def history_table(name: str, versions: Sequence[PipelineVersion], current: int, csrf: str | None) -> str:
    """Newest first; each version's changes from the one before it, and a button to roll back to it."""
    heads = "<th>version</th><th>cause</th><th>written</th><th>changes</th><th>roll back</th>"
    rows = [f"<div class='scroll'><table id='history'><tr>{heads}</tr>"]
    for i in range(len(versions) - 1, -1, -1):
        v, older = versions[i], versions[i - 1] if i else None
        diff = (
            f"<a href='/pipelines/{e(name)}/diff?from={older.version}&to={v.version}'>changes from v{older.version}</a>"
            if older
            else ""
        )
        back = (
            f"<form method='post' action='/pipelines/{e(name)}/rollback'>{hidden('csrf', csrf)}"
            f"{hidden('to_version', v.version)}<button>roll back to v{v.version}</button></form>"
            if csrf is not None and v.version != current
            else "(current)"
            if v.version == current
            else ""
        )
        cells = [f"v{v.version}", e(v.cause), e(v.created_at), diff, back]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "<section class='card'><h2>History</h2>" + "".join(rows) + "</table></div></section>"


def diff_page(name: str, old: int, new: int, lines: Sequence[str], csrf: str | None) -> str:
    """`csrf`: the viewer's session's (None: signed out), for the bar's sign-out button."""
    shown = "\n".join(_diff_line(t) for t in lines) or "(the same definition)"
    back = f"<p><a href='/pipelines/{e(name)}/edit'>back</a></p>"
    body = f"<h1>{e(name)}: v{old} → v{new}</h1><pre id='diff'>{shown}</pre>{back}"
    return layout(f"{name} v{old}..v{new}", body, csrf is not None, csrf or "")


def yaml_page(text: str, problems: Sequence[Problem], csrf: str, note: str = "") -> str:
    out = ["<h1>YAML editor</h1><p>Validate asks the control plane (Envoy's rules included) and writes nothing.</p>"]
    out += [f"<p class='note' id='note' role='status'>{e(note)}</p>"] if note else []
    if problems:
        out.append("<ul class='error' id='problems'>" + "".join(f"<li>{e(str(p))}</li>" for p in problems) + "</ul>")
    out.append(
        f"<form method='post' action='/yaml'>{hidden('csrf', csrf)}"
        "<p><label for='text'>a pipeline's whole definition, in YAML</label></p>"
        f"<textarea name='text' id='text' rows='30' spellcheck='false'>{e(text)}</textarea>"
        "<p><button name='action' value='validate' id='validate'>validate</button> "
        "<button class='primary' name='action' value='apply' id='apply'>apply</button></p></form>"
    )
    return layout("YAML editor", "".join(out), signed_in=True, csrf=csrf, section="/yaml")


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
    out = [
        "<h1>Runtimes</h1><p class='muted'>Each model version registered in Consul: its replicas, its recent 5xx "
        "through Envoy, and each instance with links to Consul and its sidecar's admin.</p><div class='scroll'>"
        "<table id='runtimes'><tr><th>model version</th><th>replicas passing</th><th>recent 5xx</th>"
        "<th>instances</th></tr>"
    ]
    for (model, version), instances in sorted(by_version.items()):
        passing = sum(1 for i in instances if i.passing)
        requests, errors, window = seen.get(model_cluster(model, version), (0, 0, None))
        recent = f"{errors} of {requests}" + (f" in {window:.0f} s" if window else "") if requests else "no traffic"
        rows = []
        for i in sorted(instances, key=lambda i: i.service_id):
            admin = envoy_admin.get(i.service_id)
            links = f"<a href='{e(consul_ui)}dc1/services/{e(model)}/instances'>Consul</a>"
            links += f" · <a href='{e(admin)}'>sidecar admin</a>" if admin else ""
            kind = f" (OIP server {e(i.oip_model)})" if i.oip_model else ""
            health = badge("passing", "passing") if i.passing else badge("critical", "critical")
            rows.append(f"{health} {e(i.service_id)}{kind} <code>{e(i.host)}:{i.ingress_port}</code> — {links}")
        word = "passing" if passing == len(instances) else "failing" if not passing else "degraded"
        out.append(
            f"<tr class='{'failing' if not passing else ''}'><td>{e(model)}:{e(version)}</td>"
            f"<td>{badge(f'{passing}/{len(instances)}', word)}</td><td>{e(recent)}</td>"
            f"<td>{'<br>'.join(rows)}</td></tr>"
        )
    return layout("runtimes", "".join(out) + "</table></div>", csrf is not None, csrf or "", section="/runtimes")
