"""Backend choice: `auto` takes WebGPU on a hardware adapter and numpy on a CPU-only machine (lavapipe,
Mesa's software Vulkan, is ~10x slower than numpy at matmul); `webgpu` or `numpy` force one."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..models.load import LoadedModel
    from .interface import Engine
    from .lora import LoraConfig
    from .memory import MemoryPlan

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


def adapter_description() -> dict:
    """The WebGPU adapter this process uses (Runtime.description: name, vendor, type, api, driver, limits, features,
    kernel variants); raises when there is none. The planner describes the device from it without importing
    WebGPU code itself."""
    from .webgpu.runtime import get_runtime

    return get_runtime().description()


def memory_plan(model: LoadedModel, backend: str, batch: int, seq: int, lora_config: LoraConfig, optim: str = "adamw",
                limits: dict | None = None, hardware: bool = True, recompute: bool = False) -> MemoryPlan:
    """Engine.memory_plan without an engine: what an engine of `backend` would allocate for this model and shape
    (WebGPU: on an adapter with these limits; hardware: whether it runs the hardware-GPU kernel variants —
    LORALAB_WGPU_TILED=0/1 overrides, as in the runtime); recompute: activation checkpointing
    (OptimSettings.recompute; the numpy engine always keeps its activations)."""
    if backend == "numpy":
        from .memory import numpy_memory_plan

        return numpy_memory_plan(model, lora_config, batch, seq, optim)
    if backend == "webgpu":
        from .webgpu.sizing import default_tiled, memory_plan as webgpu_plan

        return webgpu_plan(model, batch, seq, lora_config, optim, limits or {}, default_tiled(hardware),
                           recompute=recompute)
    raise ValueError(f"unknown backend {backend!r}; use 'numpy' or 'webgpu'")
