"""The wire protocol: generated types (types.py, from protocol/protocol.json) and their validator."""

from .types import DEFAULTS, ERROR_HINTS, NOTIFICATIONS, PROTOCOL_VERSION, REQUESTS, ErrorCode, with_defaults
from .validate import ValidationError, check, check_params, read_settings

__all__ = ["DEFAULTS", "ERROR_HINTS", "NOTIFICATIONS", "PROTOCOL_VERSION", "REQUESTS", "ErrorCode", "ValidationError",
           "check", "check_params", "read_settings", "with_defaults"]
