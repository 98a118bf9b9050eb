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
from controlplane.web.forms import TRANSPORTS, groups, shadow_slots
from controlplane.web.render import shell

e = html.escape
# Shares shown next to the weights follow as they are typed: weights are relative, the shares add up to 100%.
SHARES_JS = (
    "document.querySelectorAll('.group').forEach(function(g){function f(){var ws=g.querySelectorAll('input.weight'),"
    "t=0;ws.forEach(function(i){t+=Math.max(0,parseInt(i.value)||0)});ws.forEach(function(i){"
    "i.parentNode.querySelector('output').textContent=t?Math.round(100*Math.max(0,parseInt(i.value)||0)/t)+'%':'-'})}"
    "g.addEventListener('input',f);f()})"
)


def layout(title: str, body: str, signed_in: bool, csrf: str = "") -> str:
    return shell(title, body, signed_in=signed_in, csrf=csrf)


def hidden(name: str, value: object) -> str:
    return f"<input type='hidden' name='{e(name)}' value='{e(str(value))}'>"


def errors_at(problems: Sequence[Problem], path: str) -> str:
    found = [p.message for p in problems if p.path == path]
    return "".join(f"<span class='error' data-for='{e(path)}'>{e(message)}</span>" for message in found)


def login_page(error: str = "", next_url: str = "/") -> str:
    body = (
        "<h2>Sign in</h2><p>With the control plane's token (MLLAMBDA_TOKEN, or the link `mllambda up` printed).</p>"
        f"<form method='post' action='/login'>{hidden('next', next_url)}"
        "<p><label>token <input type='password' name='token' id='token' autocomplete='off'></label></p>"
        "<p><label>your name, recorded with every change (optional) <input name='name' id='name'></label></p>"
        f"<button type='submit' id='sign-in'>sign in</button>{f'<span class=error>{e(error)}</span>' if error else ''}"
        "</form>"
    )
    return layout("sign in", body, signed_in=False)


def edit_page(
    current: PipelineVersion, doc: Mapping[str, Any], problems: Sequence[Problem], csrf: str, note: str = ""
) -> str:
    """The form: weights per group with their shares, a shadow per stage or member, the transport;
    then the rollouts' buttons and the history with rollback and diff."""
    name = current.pipeline.name
    fields = {"transport", *(f.path for g in groups(doc) for f in g.fields), *(g.path for g in groups(doc))}
    for slot in shadow_slots(doc):
        shadow = f"{slot.path}.shadow"
        fields |= {slot.path, shadow, *(f"{shadow}.{f}" for f in ("model", "version", "percent"))}
    elsewhere = [p for p in problems if p.path not in fields]
    out = [f"<h2>{e(name)} <small>v{current.version} · {e(current.cause)}</small></h2>"]
    out += [f"<p class='ok' id='note'>{e(note)}</p>"] if note else []
    if elsewhere:
        out.append("<ul class='error' id='problems'>" + "".join(f"<li>{e(str(p))}</li>" for p in elsewhere) + "</ul>")
    out.append(f"<form method='post' action='/pipelines/{e(name)}/edit' id='edit'>")
    out.append(hidden("csrf", csrf) + hidden("expect_version", current.version))
    options = "".join(f"<option{' selected' if t == doc.get('transport') else ''}>{t}</option>" for t in TRANSPORTS)
    out.append(f"<p><label>transport <select name='transport'>{options}</select></label>")
    out.append(errors_at(problems, "transport") + "</p>")
    for group in groups(doc):
        out.append(f"<fieldset class='group' data-path='{e(group.path)}'><legend>{e(group.label)}</legend>")
        for f in group.fields:
            out.append(
                f"<label>{e(f.variant)} <input class='weight' type='text' inputmode='numeric' name='{e(f.path)}'"
                f" value='{e(str(f.weight))}'> <output></output>{errors_at(problems, f.path)}</label> "
            )
        out.append(errors_at(problems, group.path) + "</fieldset>")
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
    out.append("<button type='submit' id='apply'>apply as a new version</button></form>")
    out.append(f"<script>{SHARES_JS}</script>")
    out.append(rollout_forms(current, csrf))
    out.append(
        f"<p><a href='/yaml?name={e(name)}'>edit the whole definition as YAML</a> · "
        f"<a href='/pipelines/{e(name)}'>traffic</a></p>"
    )
    return layout(f"edit {name}", "".join(out), signed_in=True, csrf=csrf)


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
    return "<h3>Rollouts</h3>" + "".join(out) if out else ""


def _spot_fields(spot: Spot) -> str:
    return hidden("stage", spot[0]) + hidden("branch", spot[1])


def history_table(name: str, versions: Sequence[PipelineVersion], current: int, csrf: str | None) -> str:
    """Newest first; each version's changes from the one before it, and a button to roll back to it."""
    rows = ["<table id='history'><tr><th>version</th><th>cause</th><th>written</th><th></th><th></th></tr>"]
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
    return "<h3>History</h3>" + "".join(rows) + "</table>"


def diff_page(name: str, old: int, new: int, lines: Sequence[str], signed_in: bool) -> str:
    def line(text: str) -> str:
        kind = "add" if text.startswith("+") else "del" if text.startswith("-") else ""
        return f"<span class='{kind}'>{e(text)}</span>" if kind else e(text)

    shown = "\n".join(line(t) for t in lines) or "(the same definition)"
    back = f"<p><a href='/pipelines/{e(name)}/edit'>back</a></p>"
    body = f"<h2>{e(name)}: v{old} → v{new}</h2><pre id='diff'>{shown}</pre>{back}"
    return layout(f"{name} v{old}..v{new}", body, signed_in)


def yaml_page(text: str, problems: Sequence[Problem], csrf: str, note: str = "") -> str:
    out = ["<h2>YAML editor</h2><p>Validate asks the control plane (Envoy's rules included) and writes nothing.</p>"]
    out += [f"<p class='ok' id='note'>{e(note)}</p>"] if note else []
    if problems:
        out.append("<ul class='error' id='problems'>" + "".join(f"<li>{e(str(p))}</li>" for p in problems) + "</ul>")
    out.append(
        f"<form method='post' action='/yaml'>{hidden('csrf', csrf)}"
        f"<textarea name='text' id='text' rows='30' spellcheck='false'>{e(text)}</textarea>"
        "<button name='action' value='validate' id='validate'>validate</button> "
        "<button name='action' value='apply' id='apply'>apply</button></form>"
    )
    return layout("YAML editor", "".join(out), signed_in=True, csrf=csrf)


def runtimes_page(
    runtimes: Sequence[RuntimeService],
    traffic: Sequence[VariantTraffic],
    consul_ui: str,
    envoy_admin: Mapping[str, str],
    signed_in: bool,
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
        "<h2>Runtimes</h2><table id='runtimes'><tr><th>model version</th><th>replicas passing</th>"
        "<th>recent 5xx</th><th>instances</th></tr>"
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
            health = "passing" if i.passing else "<b class='error'>critical</b>"
            rows.append(f"{e(i.service_id)}{kind} {e(i.host)}:{i.ingress_port} {health} — {links}")
        out.append(
            f"<tr><td>{e(model)}:{e(version)}</td><td>{passing}/{len(instances)}</td><td>{e(recent)}</td>"
            f"<td>{'<br>'.join(rows)}</td></tr>"
        )
    return layout("runtimes", "".join(out) + "</table>", signed_in)
