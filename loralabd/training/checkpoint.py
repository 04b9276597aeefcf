"""Checkpoints: one directory per step, written atomically (temp dir, fsync, rename).

    <run_dir>/step-00000050/state.safetensors   LoRA A/B, optimizer moments, optimizer step
    <run_dir>/step-00000050/trainer.json        step, data position, schedule, RNG, metrics, config

A directory named step-* is complete by construction (it appears only through rename), so a process
killed at any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ..errors import LoraLabError
from ..paths import atomic_write_bytes

STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(LoraLabError):
    """A checkpoint could not be read or does not belong to this run."""


def _fsync_path(p: Path):
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir, step: int, arrays: dict[str, np.ndarray], meta: dict, keep_last: int = 3) -> Path:
    from safetensors.numpy import save

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step-{step:08d}"
    tmp = run_dir / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    blobs = {"state.safetensors": save({k: np.ascontiguousarray(v) for k, v in arrays.items()}),
             "trainer.json": json.dumps(meta, indent=1, sort_keys=True).encode()}
    for name, data in blobs.items():
        with open(tmp / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    _fsync_path(tmp)
    if final.exists():  # the same step saved again (a resumed run): replace it
        old = run_dir / f".old-step-{step:08d}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_path(run_dir)
    for d in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(d, ignore_errors=True)
    return final


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir) -> Path | None:
    cks = list_checkpoints(run_dir)
    return cks[-1] if cks else None


def load_checkpoint(path) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and metadata of one checkpoint directory (or of a run directory's latest)."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not (path / "trainer.json").exists():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path}: no checkpoint here (expected a step-NNNNNNNN directory with "
                                  "trainer.json); start a new run or point at the run's checkpoint directory")
        path = latest
    try:
        meta = json.loads((path / "trainer.json").read_text())
        arrays = load_file(str(path / "state.safetensors"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({e}); resume from an earlier step-* directory") from None
    return arrays, meta
