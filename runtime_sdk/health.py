"""Readiness on a listener of its own, answered by a thread: not behind the event loop.

Consul checks readiness every second with a 1-s timeout. A predict that keeps
the event loop busy (an `async def` doing CPU work, or a burst of inline
calls) would make the app's own /readyz late and flap every replica out of the
catalog under load. This listener runs in a thread; Python hands the GIL
around every few milliseconds, so it answers within the check's timeout
whatever the loop is doing.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from runtime_sdk.app import Runtime, readiness


class HealthServer:
    def __init__(self, runtime: Runtime, host: str, port: int) -> None:
        runtime_ = runtime

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/readyz", "/healthz"):
                    self._send(404, {"error": "only /readyz and /healthz here"})
                elif self.path.startswith("/healthz"):
                    self._send(200, {"live": True})
                else:
                    self._send(*readiness(runtime_))

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass  # a check every second is not worth a log line

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="health", daemon=True)

    def start(self) -> HealthServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
