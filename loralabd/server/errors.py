"""The daemon's domain errors: a protocol error code and a message that says what to do."""

from __future__ import annotations

import math

from ..errors import LoraLabError
from ..protocol import ErrorCode


class DomainError(LoraLabError):
    """An error with a protocol error code (protocol.json `errors`), raised to reach the client as-is."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = ErrorCode(code)


def finite(x) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)
