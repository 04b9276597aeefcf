"""Adapters on disk for the daemon (loralabd.adapters.AdapterStore: PEFT directories + loralab.json), with
its errors as protocol errors."""

from __future__ import annotations

from .. import paths
from ..engine.lora import LoraAdapter
from ..protocol import ErrorCode
from ..protocol.types import AdapterInfo
from .errors import DomainError


def _store():
    from ..adapters import AdapterStore

    return AdapterStore()


def save_adapter(name: str, adapter: LoraAdapter, args, base_model: str, meta: dict):
    return _store().save(name, adapter, args, base_model=base_model, meta={**meta, "args": args.to_dict()})


def adapter_meta(name: str) -> dict:
    from ..adapters import AdapterStoreError

    try:
        return _store().info(name)
    except AdapterStoreError as e:
        raise DomainError(ErrorCode.AdapterNotFound, f"{e} (loralab adapters)") from None


def adapter_stamp(name: str) -> tuple | None:
    """What changes when an adapter is saved again (its metadata file is replaced): a cache key."""
    from ..adapters import META, AdapterStore, AdapterStoreError

    try:
        st = (AdapterStore().path(name) / META).stat()
    except (OSError, AdapterStoreError):
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def load_adapter(name: str, args) -> tuple[LoraAdapter, dict]:
    """A stored adapter, checked against the base it is about to be used with."""
    from ..adapters import AdapterStoreError

    meta = adapter_meta(name)
    try:
        return _store().load(name, args), meta
    except (AdapterStoreError, ValueError) as e:
        raise DomainError(ErrorCode.InvalidSettings, str(e)) from None


def _info(meta: dict) -> AdapterInfo:
    c = meta.get("config", {})
    return {"name": meta["name"], "path": str(paths.adapters_dir() / meta["name"]), "baseModel": meta.get("base_model") or "",
            "r": int(c.get("r", 0)), "alpha": float(c.get("alpha", 0.0)), "targets": list(c.get("targets", [])),
            "steps": int(meta.get("steps", 0)), "jobId": meta.get("jobId")}


def adapter_info(name: str) -> AdapterInfo | None:
    try:
        return _info(adapter_meta(name))
    except DomainError:
        return None


def list_adapters() -> list[AdapterInfo]:
    return [_info(m) for m in _store().list() if "name" in m]
