"""The wire protocol: generated types (types.py, from protocol/protocol.json) and their validator."""

from .types import ERROR_HINTS, NOTIFICATIONS, PROTOCOL_VERSION, REQUESTS, ErrorCode
from .validate import ValidationError, check, check_params

__all__ = ["ERROR_HINTS", "NOTIFICATIONS", "PROTOCOL_VERSION", "REQUESTS", "ErrorCode", "ValidationError",
           "check", "check_params"]
