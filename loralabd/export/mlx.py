"""MLX-LM adapters (`mlx_lm.generate --adapter-path DIR`, `mlx_lm.fuse`): write and read.

mlx_lm's LoRALinear computes y = W x + scale · (x @ lora_a) @ lora_b with lora_a (in, r) and
lora_b (r, out) — PEFT's A and B transposed — and applies LoRA to the *last* `num_layers` layers,
to the modules named in lora_parameters.keys ("self_attn.q_proj", ...).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..engine.lora import LoraAdapter, LoraConfig
from ..models.args import LINEAR_NAMES, ModelArgs
from . import AdapterFormatError, check_adapter, module_path, safetensors_bytes, write_files

CONFIG = "adapter_config.json"
WEIGHTS = "adapters.safetensors"


def save_mlx(adapter: LoraAdapter, out_dir, args: ModelArgs, base_model: str | None = None) -> Path:
    check_adapter(adapter, args)
    c = adapter.config
    out = Path(out_dir)
    n = args.num_hidden_layers
    layers = sorted({int(k.split(".")[0]) for k in adapter.keys()})
    targets = [t for t in LINEAR_NAMES if any(k.split(".")[1] == t for k in adapter.keys())]
    first = layers[0]  # MLX adapts the last num_layers layers; layers we skip get zero matrices (no effect)
    tensors = {}
    for i in range(first, n):
        for t in targets:
            ab = adapter.get(i, t)
            out_f, in_f = args.linear_shape(t)
            A, B = ab if ab is not None else (np.zeros((c.r, in_f), np.float32), np.zeros((out_f, c.r), np.float32))
            p = f"model.layers.{i}.{module_path(t)}"
            tensors[p + ".lora_a"] = np.ascontiguousarray(A.T, dtype=np.float32)  # (in, r)
            tensors[p + ".lora_b"] = np.ascontiguousarray(B.T, dtype=np.float32)  # (r, out)
    weights = safetensors_bytes(tensors, {"format": "mlx"})
    cfg = {
        "fine_tune_type": "lora",
        "model": base_model,
        "num_layers": n - first,
        "lora_parameters": {"rank": int(c.r), "scale": float(c.scale), "dropout": float(c.dropout),
                            "keys": [module_path(t) for t in targets]},
    }
    return write_files(out, {WEIGHTS: weights, CONFIG: (json.dumps(cfg, indent=2) + "\n").encode()})  # whole or not at all


def load_mlx(path, args: ModelArgs) -> LoraAdapter:
    """An MLX LoRA directory as our adapter (alpha = scale · r, so the effective scale is kept)."""
    from safetensors.numpy import load_file

    path = Path(path)
    try:
        cfg = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapterFormatError(f"{path / CONFIG}: unreadable ({e})") from None
    if cfg.get("fine_tune_type", "lora") != "lora":
        raise AdapterFormatError(f"{path}: fine_tune_type={cfg.get('fine_tune_type')!r}; only 'lora' is supported")
    lp = cfg.get("lora_parameters") or {}
    r, scale = int(lp.get("rank", 8)), float(lp.get("scale", 20.0))
    A: dict[str, np.ndarray] = {}
    B: dict[str, np.ndarray] = {}
    for k, v in load_file(str(path / WEIGHTS)).items():
        parts = k.split(".")
        if len(parts) != 6 or parts[:2] != ["model", "layers"] or parts[4] not in LINEAR_NAMES \
                or parts[5] not in ("lora_a", "lora_b"):
            raise AdapterFormatError(f"{path}: unexpected tensor {k!r}")
        key = f"{int(parts[2])}.{parts[4]}"
        (A if parts[5] == "lora_a" else B)[key] = np.ascontiguousarray(np.asarray(v, np.float32).T)
    if set(A) != set(B):
        raise AdapterFormatError(f"{path}: lora_a/lora_b pairs are incomplete for {sorted(set(A) ^ set(B))[:3]}")
    layers = sorted({int(k.split(".")[0]) for k in A})
    targets = tuple(t for t in LINEAR_NAMES if any(k.endswith("." + t) for k in A))
    lc = LoraConfig(r=r, alpha=scale * r, dropout=float(lp.get("dropout", 0.0)), targets=targets,
                    layers=None if layers == list(range(args.num_hidden_layers)) else tuple(layers))
    ad = LoraAdapter(lc, A, B)
    check_adapter(ad, args, str(path))
    return ad
