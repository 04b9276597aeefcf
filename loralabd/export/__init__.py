"""Adapters out of (and into) LoRA Lab: PEFT, llama.cpp GGUF LoRA, MLX, and a merged HF model.

Our adapters keep HF's layout: A (r, in), B (out, r) per "{layer}.{name}", q/k rows in HF order.
Each writer converts at the edge to what its reader expects (see docs/adapters.md).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .. import faults
from ..errors import LoraLabError
from ..paths import atomic_write_bytes  # noqa: F401  (re-exported for the writers here)


class AdapterFormatError(LoraLabError):
    """An adapter that does not fit the model or uses something we do not support; says what differs."""


ATTN_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")


def module_path(name: str) -> str:
    """HF submodule of a projection inside a decoder layer: self_attn.q_proj, mlp.down_proj, ..."""
    return ("self_attn." if name in ATTN_NAMES else "mlp.") + name


def check_adapter(adapter, args, where: str = "adapter") -> None:
    """Refuse an adapter whose layers or shapes do not fit the model (never a silent no-op)."""
    if not adapter.A:
        raise AdapterFormatError(f"{where}: the adapter has no LoRA matrices")
    for key in adapter.A:
        i, name = key.split(".")
        i = int(i)
        if not 0 <= i < args.num_hidden_layers:
            raise AdapterFormatError(f"{where}: the adapter has layer {i} but the model has "
                                     f"{args.num_hidden_layers} layers; it was made for a different base model")
        out_f, in_f = args.linear_shape(name)
        A, B = adapter.A[key], adapter.B.get(key)
        if B is None:
            raise AdapterFormatError(f"{where}: layer {i} {name} has lora_A but no lora_B")
        r = adapter.config.r
        if A.shape != (r, in_f) or B.shape != (out_f, r):
            raise AdapterFormatError(
                f"{where}: layer {i} {name}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)}, but this model "
                f"needs ({r}, {in_f}) / ({out_f}, {r}) at rank {r}; the adapter was made for a different base model")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_files(out: Path, files: dict[str, bytes]) -> Path:
    """A folder's files whole or not at all: each written to a temp name beside its own (.<file>.XXXXXXXX.tmp,
    fsync'd), then all renamed into place. A write that fails (a full disk) leaves the folder as it was, and a
    folder this call made is removed again."""
    out = Path(out)
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmps: list[tuple[str, str]] = []
    try:
        for name, data in files.items():
            fd, tmp = tempfile.mkstemp(dir=out, prefix="." + name + ".", suffix=".tmp")
            tmps.append((name, tmp))
            with os.fdopen(fd, "wb") as f:
                faults.write(f, data, faults.kind_of(out / name))  # f.write(data), unless a test injects a fault
                f.flush()
                os.fsync(f.fileno())
        for name, tmp in tmps:
            os.replace(tmp, out / name)
    except BaseException:
        for _, tmp in tmps:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # the renames survive a power cut once the folder is synced
        dfd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return out


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory into place, replacing an older one (old one removed after)."""
    final = Path(final)
    old = None
    if final.exists():
        old = final.with_name("." + final.name + ".old-" + secrets.token_hex(4))
        os.replace(final, old)
    faults.point(faults.kind_of(final))  # a test may kill the process here (between the two renames)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict | None = None) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)


def clean_alpha(alpha: float):
    """An integer where alpha is one (Go readers such as Ollama parse lora_alpha as uint32)."""
    a = float(alpha)
    return int(a) if a.is_integer() else a


__all__ = ["AdapterFormatError", "check_adapter", "module_path", "atomic_write_bytes", "atomic_write_text",
           "replace_dir", "safetensors_bytes", "write_files", "clean_alpha"]
