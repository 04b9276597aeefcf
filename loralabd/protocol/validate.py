"""Check JSON values against the protocol's types; say exactly which field is wrong and why.

pygls answers nothing when typed params fail to parse, so the daemon validates every request here,
before any handler runs, and answers -32602 with the reason.
"""

from __future__ import annotations

import math
import re

from .types import ALIASES, ENUMERATIONS, REQUESTS, STRUCTURES, with_defaults


class ValidationError(ValueError):
    """params fail the protocol's types; str() is the reason a client sees."""


def _show(v) -> str:
    s = repr(v) if not isinstance(v, (dict, list)) else type(v).__name__
    return s if len(s) <= 40 else s[:37] + "..."


_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(v: str, path: str) -> None:
    """JSON's \\u escapes can spell lone UTF-16 surrogates, which are no Unicode text: tokenizers and UTF-8
    writers fail on them, so they are refused here, for every string field."""
    m = _SURROGATE.search(v)
    if m is not None:
        raise ValidationError(f"{path}: not valid Unicode text: a lone surrogate {m.group()!r} at character "
                              f"{m.start()}; send UTF-8 text")


def _kind_name(t: dict) -> str:
    k = t["kind"]
    if k == "base":
        return t["name"]
    if k == "reference":
        return t["name"]
    if k == "array":
        return f"array of {_kind_name(t['element'])}"
    if k == "map":
        return "object"
    if k == "or":
        return " or ".join(_kind_name(x) for x in t["items"])
    if k == "stringLiteral":
        return repr(t["value"])
    return k


def check(value, t: dict, path: str, depth: int = 0) -> None:
    """Raise ValidationError if value is not of type t (a protocol.json type expression)."""
    if depth > 32:
        raise ValidationError(f"{path}: nested too deeply")
    k = t["kind"]
    if k == "base":
        n = t["name"]
        ok = {
            "string": lambda v: isinstance(v, str),
            "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
            "boolean": lambda v: isinstance(v, bool),
            "null": lambda v: v is None,
            "any": lambda v: True,
        }[n](value)
        if not ok:
            raise ValidationError(f"{path}: expected {n}, got {_show(value)}")
        if n == "string":
            _check_text(value, path)
    elif k == "stringLiteral":
        if value != t["value"]:
            raise ValidationError(f"{path}: expected {t['value']!r}, got {_show(value)}")
    elif k == "array":
        if not isinstance(value, list):
            raise ValidationError(f"{path}: expected {_kind_name(t)}, got {_show(value)}")
        for i, v in enumerate(value):
            check(v, t["element"], f"{path}[{i}]", depth + 1)
    elif k == "map":
        if not isinstance(value, dict):
            raise ValidationError(f"{path}: expected an object, got {_show(value)}")
        for key, v in value.items():
            check(v, t["value"], f"{path}.{key}", depth + 1)
    elif k == "or":
        reasons = []
        for item in t["items"]:
            try:
                check(value, item, path, depth + 1)
                return
            except ValidationError as e:
                reasons.append(str(e))
        # One alternative of matching shape explains best (e.g. the struct whose field is wrong).
        deep = [r for r in reasons if not r.startswith(path + ": expected")]
        raise ValidationError(deep[0] if len(deep) == 1 else f"{path}: expected {_kind_name(t)}, got {_show(value)}")
    elif k == "reference":
        name = t["name"]
        if name in ALIASES:
            check(value, ALIASES[name], path, depth + 1)
        elif name in ENUMERATIONS:
            if value not in ENUMERATIONS[name] or not isinstance(value, str):
                raise ValidationError(f"{path}: expected one of {', '.join(ENUMERATIONS[name])}, got {_show(value)}")
        else:
            check_structure(value, name, path, depth + 1)
    else:
        raise ValidationError(f"{path}: unknown type kind {k!r} in the protocol")


def check_structure(value, name: str, path: str, depth: int = 0, required: bool = True) -> None:
    """Raise ValidationError unless value is a `name` structure; required=False lets its required fields be
    missing (nested structures are checked in full). An empty path names fields bare (`seqLen`)."""
    s = STRUCTURES[name]
    if not isinstance(value, dict):
        raise ValidationError(f"{path or name}: expected an object ({name}), got {_show(value)}")
    props = {p["name"]: p for p in s["properties"]}
    for key in value:
        if key not in props and not s["additionalProperties"]:
            known = ", ".join(props) or "none"
            raise ValidationError(f"{path or name}: unknown field {key!r} (known fields: {known})")
    for p in s["properties"]:
        n = p["name"]
        where = f"{path}.{n}" if path else n
        if n not in value:
            if required and not p.get("optional"):
                raise ValidationError(f"{where}: required field is missing ({_kind_name(p['type'])}: {p['documentation']})")
            continue
        v = value[n]
        check(v, p["type"], where, depth + 1)
        if isinstance(v, list):
            _check_items(v, p, where)
            for i, x in enumerate(v):  # on an array, a property's ranges hold for each element
                _check_bounds(x, p, f"{where}[{i}]")
        else:
            _check_bounds(v, p, where)


def _check_items(v: list, p: dict, where: str) -> None:
    lo, hi = p.get("minItems"), p.get("maxItems")
    if lo is not None and lo == hi and len(v) != lo:
        raise ValidationError(f"{where}: expected exactly {lo} items, got {len(v)}")
    if lo is not None and len(v) < lo:
        raise ValidationError(f"{where}: expected at least {lo} item{'s' * (lo != 1)}, got {len(v)}")
    if hi is not None and len(v) > hi:
        raise ValidationError(f"{where}: expected at most {hi} items, got {len(v)}")


def _check_bounds(v, p: dict, where: str) -> None:
    """A property's ranges (minimum, exclusiveMinimum, maximum, exclusiveMaximum) and string limits."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if "minimum" in p and v < p["minimum"]:
            raise ValidationError(f"{where}: must be >= {p['minimum']}, got {v}")
        if "exclusiveMinimum" in p and v <= p["exclusiveMinimum"]:
            raise ValidationError(f"{where}: must be > {p['exclusiveMinimum']}, got {v}")
        if "maximum" in p and v > p["maximum"]:
            raise ValidationError(f"{where}: must be <= {p['maximum']}, got {v}")
        if "exclusiveMaximum" in p and v >= p["exclusiveMaximum"]:
            raise ValidationError(f"{where}: must be < {p['exclusiveMaximum']}, got {v}")
    if isinstance(v, str):
        if "maxLength" in p and len(v) > p["maxLength"]:
            raise ValidationError(f"{where}: at most {p['maxLength']} characters, got {len(v)}")
        if "pattern" in p and not re.fullmatch(p["pattern"], v):
            raise ValidationError(f"{where}: {v[:40]!r} does not match {p['pattern']}")


def read_settings(structure: str, value, path: str = "") -> dict:
    """The protocol's `structure` value as a domain settings object reads it (LoraConfig.from_protocol,
    TrainConfig.from_protocol, Sampling.from_protocol): the fields given are checked — types, ranges, unknown
    names — and every default from protocol/protocol.json is filled in (types.with_defaults). Required fields
    may be missing (check_params holds requests to them). value None: every default. Raises ValidationError,
    a ValueError, naming the wire field (`seqLen`, `lora.targets[1]`, with `path` as prefix)."""
    value = {} if value is None else value
    check_structure(value, structure, path, required=False)
    return with_defaults(structure, value)


def check_params(method: str, params) -> dict:
    """Validate a request's params; returns them as a dict ({} when the method takes none)."""
    spec = REQUESTS[method]
    t = spec["params"]
    if t is None:
        if params in (None, {}, []):
            return {}
        raise ValidationError(f"params: {method} takes no parameters, got {_show(params)}")
    if params is None:
        params = {}
    check(params, t, "params")
    return params
