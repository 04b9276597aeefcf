"""Backend choice: `auto` takes WebGPU on a hardware adapter and numpy on a CPU-only machine (lavapipe,
Mesa's software Vulkan, is ~10x slower than numpy at matmul); `webgpu` or `numpy` force one."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..models.load import LoadedModel
    from .interface import Engine

BACKENDS = ("auto", "webgpu", "numpy")


def is_hardware(adapter_type: str) -> bool:
    """Whether a WebGPU adapter type is a real GPU (lavapipe and other software adapters report cpu)."""
    return str(adapter_type).lower() not in ("cpu", "unknown", "")


def webgpu_adapter_info() -> dict | None:
    """The adapter WebGPU would use ({name, backend, type, ...}), or None when there is none."""
    try:
        from .webgpu.runtime import get_runtime

        return get_runtime().info()
    except Exception:
        return None


def choose_backend(backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend != "auto":
        return backend
    info = webgpu_adapter_info()
    return "webgpu" if info is not None and is_hardware(info.get("type", "")) else "numpy"


def make_engine(model: LoadedModel, backend: str = "auto") -> Engine:
    """An engine for `model` on the chosen backend (see choose_backend)."""
    kind = choose_backend(backend)
    if kind == "webgpu":
        from .webgpu.runtime import NoAdapterError, available
        from .webgpu.engine import WebGPUEngine

        if not available():
            raise NoAdapterError("--backend webgpu: no WebGPU adapter found; install a GPU driver (or Mesa's "
                                 "lavapipe: apt-get install mesa-vulkan-drivers), or use --backend numpy")
        return WebGPUEngine(model)
    from .numpy_engine import NumpyEngine

    return NumpyEngine(model)
