"""Who may change pipelines from the dashboard: sign-in with a token, sessions, and the CSRF guard.

A browser sends cookies with any request to this origin, including ones a page on
another site makes it send. So a change needs three things: the session cookie
(HttpOnly, SameSite=Strict), the session's CSRF value echoed in the form (another
site cannot read it), and, when the browser says where the request comes from, an
`Origin` that is this dashboard. The `Host` check (dashboard.py) stops DNS rebinding.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from aiohttp import web

COOKIE = "mll_session"
SESSIONS_KEPT = 64  # the oldest session is signed out when more sign in
SESSION_SECONDS = 12 * 3600
FAILED_SIGN_INS = 10  # per minute, from anyone: then 429 until the minute has passed
NAME_LIMIT = 40


@dataclass(frozen=True)
class Session:
    sid: str
    csrf: str
    who: str  # the name given at sign-in ("" if none) and where from, for the log
    name: str
    started: float


class Sessions:
    """Signed-in browsers, bounded in number and age; a token compared in constant time."""

    def __init__(self, token: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.token = token.encode()
        self.clock = clock
        self.by_sid: dict[str, Session] = {}
        self.failures: deque[float] = deque(maxlen=FAILED_SIGN_INS)

    def throttled(self) -> bool:
        return len(self.failures) == FAILED_SIGN_INS and self.clock() - self.failures[0] < 60

    def sign_in(self, given: str, name: str, peer: str) -> Session | None:
        if not hmac.compare_digest(given.encode(), self.token):
            self.failures.append(self.clock())
            return None
        while len(self.by_sid) >= SESSIONS_KEPT:
            del self.by_sid[next(iter(self.by_sid))]
        sid = secrets.token_urlsafe(24)
        who = f"{name or 'someone'} from {peer}"
        session = Session(sid, secrets.token_urlsafe(24), who, name, self.clock())
        self.by_sid[sid] = session
        return session

    def find(self, sid: str | None) -> Session | None:
        session = self.by_sid.get(sid or "")
        if session is not None and self.clock() - session.started > SESSION_SECONDS:
            del self.by_sid[session.sid]
            return None
        return session

    def sign_out(self, sid: str | None) -> None:
        self.by_sid.pop(sid or "", None)


def name_problem(name: str) -> str | None:
    if len(name) > NAME_LIMIT or not name.isprintable():
        return f"up to {NAME_LIMIT} printable characters"
    return None


def same_origin(request: web.Request) -> bool:
    """No `Origin` (an old browser, a script): the CSRF value decides. `null` or another site: refused."""
    origin = request.headers.get("Origin")
    return origin is None or origin == f"{request.scheme}://{request.host}"


def set_cookie(response: web.StreamResponse, session: Session) -> None:
    response.set_cookie(COOKIE, session.sid, httponly=True, samesite="Strict", path="/", max_age=SESSION_SECONDS)


Form: TypeAlias = Mapping[str, str]  # a posted form's fields, each its first value, text only (text_form)
Changing = Callable[[web.Request, Session, Form], Awaitable[web.StreamResponse]]


def changing(sessions: Sessions | None, handler: Changing) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A state-changing POST: signed in, same origin, the session's CSRF value in the form."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        if sessions is None:
            return forbidden("changes from the dashboard are off: start the control plane with MLLAMBDA_UI_TOKEN")
        session = session_of(sessions, request)
        if session is None:
            return forbidden("sign in first (/login)")
        if not same_origin(request):
            return forbidden("this request comes from another site")
        form = text_form(await request.post())
        if form is None:
            return web.Response(status=400, text="bad request: a form field is not text (these forms take no files)\n")
        if not hmac.compare_digest(str(form.get("csrf", "")).encode(), session.csrf.encode()):
            return forbidden("the form is stale or forged (CSRF check): reload the page")
        return await handler(request, session, form)

    return guarded


def text_form(posted: Mapping[str, object]) -> Form | None:
    """A posted form as text fields, each key's first value; None if any value is not text (a file, bytes)."""
    form: dict[str, str] = {}
    for key, value in posted.items():
        if not isinstance(value, str):
            return None
        form.setdefault(key, value)
    return form


def session_of(sessions: Sessions | None, request: web.Request) -> Session | None:
    """The request's signed-in session (by its cookie), or None: signed out, or sign-in is off."""
    return sessions.find(request.cookies.get(COOKIE)) if sessions else None


def viewer(sessions: Sessions | None, request: web.Request) -> dict[str, Any]:
    """Who looks, for a page's bar: signed in (with the CSRF value its sign-out button posts) or not."""
    session = session_of(sessions, request)
    return {"signed_in": session is not None, "csrf": session.csrf if session else ""}


def forbidden(why: str) -> web.Response:
    return web.Response(status=403, text=f"forbidden: {why}\n")
