"""The dashboard's management routes: sign-in, edit, rollback, rollout moves, YAML, diff, runtimes.

Every change goes through the admin API over gRPC, on a Unix socket of the control
plane's own admin server (same interceptors, same validation, Envoy's rules, the
store's check-and-set), never around it. Reads of the history come from the
PlaneView like the rest of the dashboard.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import grpc
import yaml
from aiohttp import web

from controlplane._gen.mllambda.admin.v1 import admin_pb2 as pb
from controlplane._gen.mllambda.admin.v1 import admin_pb2_grpc as pb_grpc
from controlplane.admin.convert import spec_from_proto, spec_to_proto
from controlplane.model import InvalidPipeline, Pipeline, PipelineVersion, Problem
from controlplane.rollouts import spots, user_move
from controlplane.spec import parse_pipeline, pipeline_to_dict
from controlplane.ui_auth import COOKIE, Session, Sessions, changing, name_problem, same_origin, set_cookie
from controlplane.ui_forms import as_yaml, diff_lines, edited, problems_from_details
from controlplane.ui_pages import diff_page, edit_page, history_table, login_page, runtimes_page, yaml_page
from controlplane.view import PlaneReader

log = logging.getLogger("mllambda.ui")
YAML_LIMIT = 256 * 1024  # characters in the YAML editor
ROLLOUT_ACTIONS = ("pause", "resume", "promote", "abort")


class AdminRefused(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details

    def problems(self) -> list[Problem]:
        if self.code == grpc.StatusCode.INVALID_ARGUMENT:
            return problems_from_details(self.details)
        return [Problem("", f"{self.code.name.lower()}: {self.details}")]


class AdminCalls:
    """The admin API as the dashboard calls it (async, with the admin token when one is set)."""

    def __init__(self, target: str, token: str | None) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.PipelineAdminStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    async def call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self.stub, method)(request, metadata=self.metadata, timeout=30)
        except grpc.aio.AioRpcError as err:
            raise AdminRefused(err.code(), err.details() or "") from err

    async def current(self, name: str) -> PipelineVersion:
        reply = await self.call("Get", pb.GetRequest(name=name))
        v = reply.pipeline
        return PipelineVersion(spec_from_proto(v.spec), int(v.version), v.created_at, v.cause)

    async def apply(self, pipeline: Pipeline, cause: str, expect: int = 0, dry_run: bool = False) -> Any:
        request = pb.ApplyRequest(spec=spec_to_proto(pipeline), cause=cause, expect_version=expect, dry_run=dry_run)
        return await self.call("Apply", request)

    async def close(self) -> None:
        await self.channel.close()


class LocalAdmin:
    """A Unix socket on the control plane's own admin server for the dashboard's calls, in a folder only
    this user can open; and who may sign in (MLLAMBDA_UI_TOKEN, else the admin token; neither: read-only)."""

    def __init__(self, server: grpc.aio.Server, admin_token: str | None, ui_token: str | None) -> None:
        self.folder = Path(tempfile.gettempdir()) / f"mllambda-{os.getuid()}" / f"admin-{os.getpid()}"
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        socket = self.folder / "admin.sock"
        socket.unlink(missing_ok=True)
        server.add_insecure_port(f"unix:{socket}")
        self.admin = AdminCalls(f"unix:{socket}", admin_token)
        token = ui_token or admin_token
        self.sessions = Sessions(token) if token else None

    async def close(self) -> None:
        await self.admin.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def cause_of(session: Session, what: str = "") -> str:
    """`ui` (or `ui by NAME`), after what was done when it was not an edit: `rollback to v2 (ui)`."""
    ui = f"ui by {session.name}" if session.name else "ui"
    return f"{what} ({ui})" if what else ui


def add_ui_routes(app: web.Application, reader: PlaneReader, sessions: Sessions | None, admin: AdminCalls) -> None:
    def session_of(request: web.Request) -> Session | None:
        return sessions.find(request.cookies.get(COOKIE)) if sessions else None

    def html_page(text: str, status: int = 200) -> web.Response:
        return web.Response(text=text, status=status, content_type="text/html")

    def done(session: Session, name: str, reply: Any, what: str) -> web.Response:
        version = int(reply.pipeline.version)
        if reply.created:
            cause = reply.pipeline.cause
            log.info("ui change pipeline=%s version=%d cause=%r by=%s", name, version, cause, session.who)
        note = f"version {version} {'created' if reply.created else 'is current (nothing changed)'}: {what}"
        raise web.HTTPSeeOther(f"/pipelines/{name}/edit?" + urlencode({"note": note[:200]}))

    async def login_form(request: web.Request) -> web.StreamResponse:
        next_url = _local(request.query.get("next", "/"))
        if "token" in request.query:  # the link `mllambda up` prints
            return _signed_in(request, request.query["token"], "", next_url)
        return html_page(login_page(next_url=next_url))

    async def login(request: web.Request) -> web.StreamResponse:
        form = await request.post()
        if not same_origin(request):
            return html_page(login_page("this request comes from another site"), 403)
        return _signed_in(request, str(form.get("token", "")), str(form.get("name", "")).strip(), str(form.get("next")))

    def _signed_in(request: web.Request, token: str, name: str, next_url: str) -> web.StreamResponse:
        if sessions is None:
            return html_page(login_page("changes are off: start the control plane with MLLAMBDA_UI_TOKEN"), 403)
        if sessions.throttled():
            return html_page(login_page("too many failed sign-ins: wait a minute"), 429)
        if (why := name_problem(name)) is not None:
            return html_page(login_page(f"name: {why}"), 400)
        session = sessions.sign_in(token, name, request.remote or "?")
        if session is None:
            log.warning("ui sign-in refused from %s", request.remote)
            return html_page(login_page("wrong token"), 401)
        log.info("ui sign-in by=%s", session.who)
        response = web.HTTPSeeOther(_local(next_url))
        set_cookie(response, session)
        return response

    async def logout(request: web.Request, session: Session, form: Any) -> web.StreamResponse:
        assert sessions is not None
        sessions.sign_out(session.sid)
        response = web.HTTPSeeOther("/")
        response.del_cookie(COOKIE, path="/")
        return response

    async def edit_form(request: web.Request) -> web.StreamResponse:
        name, session = request.match_info["name"], session_of(request)
        if session is None:
            raise web.HTTPSeeOther(f"/login?next=/pipelines/{name}/edit")
        current = await _current_or_404(name)
        note = request.query.get("note", "")[:200]
        return html_page(_edit(current, pipeline_to_dict(current.pipeline), [], session, note))

    def _edit(current: PipelineVersion, doc: Mapping[str, Any], problems: list[Problem], s: Session, note: str) -> str:
        history = reader.view().history.get(current.pipeline.name, [])[-20:]
        page = edit_page(current, doc, problems, s.csrf, note)
        table = history_table(current.pipeline.name, history, current.version, s.csrf)
        return page.replace("</body>", table + "</body>")

    async def _current_or_404(name: str) -> PipelineVersion:
        try:
            return await admin.current(name)
        except AdminRefused as err:
            if err.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise web.HTTPNotFound(text=f"{err.details}\n") from err
            raise

    async def edit(request: web.Request, session: Session, form: Any) -> web.StreamResponse:
        name = request.match_info["name"]
        current = await _current_or_404(name)
        doc = edited(pipeline_to_dict(current.pipeline), form)
        try:
            pipeline = parse_pipeline(doc)
            reply = await admin.apply(pipeline, cause_of(session), expect=_int(form.get("expect_version")))
        except InvalidPipeline as err:
            return html_page(_edit(current, doc, err.problems, session, ""), 400)
        except AdminRefused as err:
            status = 503 if err.code == grpc.StatusCode.UNAVAILABLE else 400
            return html_page(_edit(current, doc, err.problems(), session, ""), status)
        return done(session, name, reply, "weights, shadows and transport as submitted")

    async def rollback(request: web.Request, session: Session, form: Any) -> web.StreamResponse:
        name, to = request.match_info["name"], _int(form.get("to_version"))
        request_pb = pb.RollbackRequest(name=name, to_version=to, cause=cause_of(session, f"rollback to v{to}"))
        try:
            reply = await admin.call("Rollback", request_pb)
        except AdminRefused as err:
            return web.Response(status=400 if err.code != grpc.StatusCode.NOT_FOUND else 404, text=f"{err}\n")
        return done(session, name, reply, f"rolled back to v{to}")

    async def rollout(request: web.Request, session: Session, form: Any) -> web.StreamResponse:
        name, action = request.match_info["name"], str(form.get("action", ""))
        current = await _current_or_404(name)
        spot = (_int(form.get("stage")), str(form.get("branch", "")))
        if action not in ROLLOUT_ACTIONS or spot not in spots(current.pipeline):
            return web.Response(status=400, text=f"no rollout there, or an unknown action {action[:20]!r}\n")
        move = user_move(current.pipeline, spot, action)
        try:
            reply = await admin.apply(move.pipeline, cause_of(session, move.cause), expect=current.version)
        except AdminRefused as err:
            return web.Response(status=409, text=f"{err}\n")
        return done(session, name, reply, move.cause)

    async def diff(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        versions = {v.version: v for v in reader.view().history.get(name, [])}
        if not versions:
            raise web.HTTPNotFound(text=f"no pipeline {name[:100]!r}\n")
        new = _int(request.query.get("to")) or max(versions)
        old = _int(request.query.get("from")) or max((v for v in versions if v < new), default=new)
        if old not in versions or new not in versions:
            raise web.HTTPNotFound(text=f"versions kept: {min(versions)} to {max(versions)}\n")
        a, b = (pipeline_to_dict(versions[v].pipeline) for v in (old, new))
        lines = diff_lines(a, b, f"v{old}", f"v{new}")
        return html_page(diff_page(name, old, new, lines, session_of(request) is not None))

    async def yaml_form(request: web.Request) -> web.StreamResponse:
        session = session_of(request)
        if session is None:
            raise web.HTTPSeeOther("/login?next=/yaml")
        name = request.query.get("name", "")
        live = {v.pipeline.name: v.pipeline for v in reader.view().pipelines}
        text = as_yaml(pipeline_to_dict(live[name])) if name in live else ""
        return html_page(yaml_page(text, [], session.csrf))

    async def yaml_apply(request: web.Request, session: Session, form: Any) -> web.StreamResponse:
        text, dry_run = str(form.get("text", "")), form.get("action") != "apply"
        try:
            if len(text) > YAML_LIMIT:
                raise InvalidPipeline([Problem("", f"at most {YAML_LIMIT} characters")])
            pipeline = parse_pipeline(_yaml_document(text))
            reply = await admin.apply(pipeline, cause_of(session), dry_run=dry_run)
        except InvalidPipeline as err:
            return html_page(yaml_page(text, err.problems, session.csrf), 400)
        except AdminRefused as err:
            return html_page(yaml_page(text, err.problems(), session.csrf), 400)
        if dry_run:
            change = "would make a new version" if reply.created else "is the same as the current version"
            return html_page(yaml_page(text, [], session.csrf, f"valid: pipeline {pipeline.name} {change}"))
        return done(session, pipeline.name, reply, "applied from the YAML editor")

    async def runtimes(request: web.Request) -> web.StreamResponse:
        view = reader.view()
        signed_in = session_of(request) is not None
        page = runtimes_page(view.runtimes, await reader.recent_traffic(), view.consul_ui, view.envoy_admin, signed_in)
        return html_page(page)

    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", changing(sessions, logout))
    app.router.add_get("/pipelines/{name}/edit", edit_form)
    app.router.add_post("/pipelines/{name}/edit", changing(sessions, edit))
    app.router.add_post("/pipelines/{name}/rollback", changing(sessions, rollback))
    app.router.add_post("/pipelines/{name}/rollout", changing(sessions, rollout))
    app.router.add_get("/pipelines/{name}/diff", diff)
    app.router.add_get("/yaml", yaml_form)
    app.router.add_post("/yaml", changing(sessions, yaml_apply))
    app.router.add_get("/runtimes", runtimes)


def _yaml_document(text: str) -> Any:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "yaml"
        raise InvalidPipeline([Problem(where, str(getattr(err, "problem", None) or err))]) from err
    return doc


def _int(value: Any) -> int:
    text = str(value or "")
    return int(text) if text.isdigit() and len(text) < 10 else 0


def _local(url: str) -> str:
    """Only a path on this dashboard ("//evil.example" is another site)."""
    return url if url.startswith("/") and not url.startswith("//") and "\\" not in url else "/"
