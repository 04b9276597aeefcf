"""llama.cpp GGUF LoRA adapters (what convert_lora_to_gguf.py writes and llama-adapter.cpp reads).

- general.type="adapter", adapter.type="lora", adapter.lora.alpha (f32), general.architecture = base's.
- Tensors `blk.{i}.attn_q.weight.lora_a` (r, in) and `.lora_b` (out, r) — GGUF lists shapes
  fastest-first, so they read [in, r] and [r, out] there.
- llama.cpp keeps llama q/k rows in its RoPE layout, so lora_b of q and k (their output rows) gets
  the same row permutation as the base weights; lora_a (input side) does not. qwen2 uses NeoX RoPE
  in llama.cpp and is not permuted.
- Runtime scale = user scale · alpha / r; llama.cpp has no rsLoRA, so we write alpha·√r for it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ..engine.lora import LoraAdapter, LoraConfig
from ..models.args import LINEAR_NAMES, ModelArgs
from . import AdapterFormatError, check_adapter

GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # HF model_type -> llama.cpp arch
_PERMUTED = {"llama"}  # llama.cpp archs whose q/k rows are in the "normal" (interleaved) RoPE layout


def gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rows -> llama.cpp rows (convert_hf_to_gguf.py's LlamaModel.permute)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _heads(args: ModelArgs, name: str) -> int | None:
    if GGUF_ARCH.get(args.arch, args.arch) not in _PERMUTED:
        return None
    return {"q_proj": args.num_attention_heads, "k_proj": args.num_key_value_heads}.get(name)


def gguf_alpha(cfg: LoraConfig) -> float:
    """alpha such that llama.cpp's alpha / r equals our scale (rsLoRA: alpha / sqrt(r))."""
    return cfg.alpha * math.sqrt(cfg.r) if cfg.use_rslora else cfg.alpha


def save_gguf_lora(adapter: LoraAdapter, path, args: ModelArgs, *, dtype: str = "f32",
                   name: str | None = None, base_name: str | None = None) -> Path:
    """Write a llama.cpp LoRA GGUF (load with llama-server --lora FILE, or llama-cli --lora FILE)."""
    import gguf

    check_adapter(adapter, args)
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be f32 or f16, not {dtype!r}")
    arch = GGUF_ARCH.get(args.arch)
    if arch is None:
        raise AdapterFormatError(f"no llama.cpp architecture for {args.arch!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(gguf_alpha(adapter.config)))
    w.add_name(name or "LoRA Lab adapter")
    if base_name:
        w.add_uint32(gguf.Keys.General.BASE_MODEL_COUNT, 1)
        w.add_string(gguf.Keys.General.BASE_MODEL_NAME.format(id=0), base_name)
    np_dtype = np.float32 if dtype == "f32" else np.float16
    for key in sorted(adapter.keys(), key=lambda k: (int(k.split(".")[0]), LINEAR_NAMES.index(k.split(".")[1]))):
        i, n = key.split(".")
        A, B = adapter.A[key], adapter.B[key]  # (r, in), (out, r)
        nh = _heads(args, n)
        if nh is not None:
            B = gguf_permute(B, nh)
        base = f"blk.{i}.{GGUF_NAMES[n]}.weight"
        w.add_tensor(base + ".lora_a", np.ascontiguousarray(A, dtype=np_dtype))
        w.add_tensor(base + ".lora_b", np.ascontiguousarray(B, dtype=np_dtype))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # readers never see half a file
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_gguf_lora(path, args: ModelArgs) -> LoraAdapter:
    """Read a llama.cpp LoRA GGUF back into our layout (rsLoRA is folded into alpha, as llama.cpp sees it)."""
    from ..models.load import gguf_metadata, read_gguf

    path = Path(path)
    reader = read_gguf(path)
    meta = gguf_metadata(reader)
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise AdapterFormatError(f"{path}: not a llama.cpp LoRA adapter (general.type={meta.get('general.type')!r}, "
                                 f"adapter.type={meta.get('adapter.type')!r})")
    arch = meta.get("general.architecture")
    if arch != GGUF_ARCH.get(args.arch):
        raise AdapterFormatError(f"{path}: adapter architecture {arch!r} does not match the model's "
                                 f"{GGUF_ARCH.get(args.arch)!r}")
    inv = {v: k for k, v in GGUF_NAMES.items()}
    A: dict[str, np.ndarray] = {}
    B: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if len(parts) != 5 or parts[0] != "blk" or parts[2] not in inv or parts[4] not in ("lora_a", "lora_b"):
            raise AdapterFormatError(f"{path}: unexpected tensor {t.name!r}; LoRA Lab reads blk.N.<proj>.weight.lora_a/b")
        shape = tuple(int(s) for s in reversed(t.shape))  # numpy order
        arr = np.asarray(t.data).astype(np.float32).reshape(shape)
        key = f"{int(parts[1])}.{inv[parts[2]]}"
        (A if parts[4] == "lora_a" else B)[key] = arr
    if set(A) != set(B):
        raise AdapterFormatError(f"{path}: lora_a/lora_b pairs are incomplete for {sorted(set(A) ^ set(B))[:3]}")
    r = next(iter(A.values())).shape[0]
    for key in B:
        nh = _heads(args, key.split(".")[1])
        if nh is not None:
            B[key] = gguf_unpermute(B[key], nh)
    layers = sorted({int(k.split(".")[0]) for k in A})
    targets = tuple(n for n in LINEAR_NAMES if any(k.endswith("." + n) for k in A))
    alpha = float(meta.get("adapter.lora.alpha") or r)  # llama.cpp: alpha 0 means scale 1
    cfg = LoraConfig(r=r, alpha=alpha, targets=targets,
                     layers=None if layers == list(range(args.num_hidden_layers)) else tuple(layers))
    ad = LoraAdapter(cfg, A, B)
    check_adapter(ad, args, str(path))
    return ad
