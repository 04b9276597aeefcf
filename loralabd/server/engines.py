"""Engines for loaded models and what the device offers (called on the device thread)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..protocol import ErrorCode
from .errors import DomainError

if TYPE_CHECKING:
    from ..engine.interface import Engine
    from ..models.load import LoadedModel


def engine_for(model: LoadedModel, backend: str = "auto") -> Engine:
    """engine.select.make_engine, with a failure to start a backend as the protocol's BackendUnavailable."""
    from ..engine.select import make_engine as select

    try:
        return select(model, backend)
    except Exception as e:  # no adapter, a driver that fails to start: never the daemon's end
        raise DomainError(ErrorCode.BackendUnavailable, f"backend {backend!r} cannot start here: {e}") from e


def device_probe() -> dict:
    """What `auto` picks and the WebGPU adapter, if any (runs on the device thread: it may open the device)."""
    from ..engine.select import choose_backend, webgpu_adapter_info

    info = webgpu_adapter_info()
    return {"backend": choose_backend("auto"), "adapter": info}


def available_backends() -> list[str]:
    out = ["numpy"]
    try:
        import importlib.util

        if importlib.util.find_spec("loralabd.engine.select") and importlib.util.find_spec("wgpu"):
            out.insert(0, "webgpu")
    except Exception:
        pass
    return out
