"""Checkpoints: one directory per step, written atomically (temp dir, fsync, rename).

    <run_dir>/step-00000050/state.safetensors   LoRA A/B, optimizer moments, optimizer step
    <run_dir>/step-00000050/trainer.json        step, data position, schedule, RNG, metrics, config
    <run_dir>/step-00000050/manifest.json       SHA-256 and size of the two files above

A directory named step-* is complete by construction (it appears only through rename), so a process
killed at any moment leaves either the previous checkpoint or the new one, never half of one. What the
disk does to it later (a flipped bit, a truncation) the manifest catches: a damaged checkpoint is set
aside as step-NNNNNNNN.damaged and a resume falls back to the newest whole one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import faults
from ..errors import LoraLabError

STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE, META, MANIFEST = "state.safetensors", "trainer.json", "manifest.json"


class CheckpointError(LoraLabError):
    """A checkpoint could not be read or does not belong to this run."""


def _fsync_path(p: Path):
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir, step: int, arrays: dict[str, np.ndarray], meta: dict, keep_last: int = 3) -> Path:
    """Write step's checkpoint atomically; a failed write (a full disk) leaves no partial directory behind."""
    from safetensors.numpy import save

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step-{step:08d}"
    tmp = run_dir / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    blobs = {STATE: save({k: np.ascontiguousarray(v) for k, v in arrays.items()}),
             META: json.dumps(meta, indent=1, sort_keys=True).encode()}
    blobs[MANIFEST] = json.dumps({"format": 1, "files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)}
                                                         for n, b in blobs.items()}}, indent=1).encode()
    try:
        tmp.mkdir()
        for name, data in blobs.items():
            with open(tmp / name, "wb") as f:
                faults.write(f, data, "checkpoint")  # f.write(data), unless a test injects a fault
                f.flush()
                os.fsync(f.fileno())
        _fsync_path(tmp)
        _replace(tmp, final, run_dir / f".old-step-{step:08d}-{os.getpid()}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the space it held is what the next try needs
        raise
    _fsync_path(run_dir)
    for d in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(d, ignore_errors=True)
    return final


def _replace(tmp: Path, final: Path, old: Path) -> None:
    if not final.exists():
        faults.point("checkpoint")
        os.rename(tmp, final)
        return
    os.rename(final, old)  # the same step saved again (a resumed run): replace it
    try:
        faults.point("checkpoint")
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


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
    """Arrays and metadata of one checkpoint directory (or of a run directory's newest whole one), checked
    against its manifest. Raises CheckpointError when it is damaged or there is none."""
    path = Path(path)
    if (path / META).exists():
        return read_checkpoint(path)
    found = newest_good_checkpoint(path)
    if found.path is None:
        raise CheckpointError(found.why_none(path))
    assert found.arrays is not None and found.meta is not None
    return found.arrays, found.meta


def read_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """One checkpoint directory, each file read once: its SHA-256 checked against the manifest (checkpoints
    older than manifests are only checked for being readable), then parsed."""
    from safetensors.numpy import load

    try:
        raw = {n: (path / n).read_bytes() for n in (STATE, META)}
        manifest = json.loads((path / MANIFEST).read_bytes()) if (path / MANIFEST).exists() else None
        if manifest is not None:
            if not {STATE, META} <= set(manifest["files"]):
                raise CheckpointError(f"{path}: its manifest lists {sorted(manifest['files'])}, not {STATE} and {META}")
            for name, want in manifest["files"].items():
                data = raw[name] if name in raw else (path / name).read_bytes()
                if len(data) != want["bytes"]:
                    raise CheckpointError(f"{path}: {name} has {len(data)} bytes, its manifest says {want['bytes']}")
                if hashlib.sha256(data).hexdigest() != want["sha256"]:
                    raise CheckpointError(f"{path}: {name} differs from its manifest's SHA-256 (damaged on disk)")
        meta = json.loads(raw[META])
        arrays = load(raw[STATE])
    except CheckpointError:
        raise
    except Exception as e:  # OSError, bad JSON, safetensors' own error for a truncated file
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    return arrays, meta


@dataclass
class Found:
    """The newest whole checkpoint of a run (path None: none) and the damaged ones passed over, newest first."""

    path: Path | None = None
    arrays: dict[str, np.ndarray] | None = None
    meta: dict | None = None
    damaged: list[tuple[Path, str]] = field(default_factory=list)

    def why_none(self, run_dir: Path) -> str:
        if not self.damaged:
            return (f"{run_dir}: no checkpoint here (expected a step-NNNNNNNN directory with {META}); start a new "
                    "run or point at the run's checkpoint directory")
        return (f"{run_dir}: no whole checkpoint left: " + "; ".join(why for _, why in self.damaged)
                + "; start a new run")


def newest_good_checkpoint(run_dir) -> Found:
    """Checkpoints newest first until one reads whole (read_checkpoint); the damaged ones before it are listed."""
    found = Found()
    for p in reversed(list_checkpoints(run_dir)):
        try:
            found.arrays, found.meta = read_checkpoint(p)
        except CheckpointError as e:
            found.damaged.append((p, str(e)))
            continue
        found.path = p
        break
    return found


def set_aside(path: Path) -> Path:
    """A damaged checkpoint renamed out of the run's list (kept for a look, never read again); where it is now."""
    dest = path.with_name(path.name + ".damaged")
    try:
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        os.rename(path, dest)
    except OSError:
        return path  # a read-only disk: it stays, and a later resume passes over it again
    return dest
