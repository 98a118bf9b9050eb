"""What a model's code raises to refuse a payload (kept apart from the server, so importing it costs nothing)."""

from __future__ import annotations


class Rejected(Exception):
    """Raise from predict() to refuse a payload: the caller gets a 422 (or `status`, a 4xx) with this message."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status if 400 <= status < 500 else 422
