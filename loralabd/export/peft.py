"""PEFT adapter directories (adapter_model.safetensors + adapter_config.json): write and read.

PEFT is the lingua franca (transformers, vLLM, TGI, Unsloth, Axolotl). Its common silent failure is
keys that don't match, so PEFT warns "missing adapter keys" and the adapter does nothing; we write
exactly its names, and on import refuse anything we would not apply faithfully.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NoReturn

import numpy as np

from ..engine.lora import LoraAdapter, LoraConfig
from ..models.args import LINEAR_NAMES, ModelArgs
from . import AdapterFormatError, check_adapter, clean_alpha, module_path, safetensors_bytes, write_files

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def peft_key(layer: int, name: str, which: str) -> str:
    """which: "A" or "B" -> base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight"""
    return f"base_model.model.model.layers.{layer}.{module_path(name)}.lora_{which}.weight"


def peft_config(adapter: LoraAdapter, args: ModelArgs, base_model_name_or_path: str | None = None) -> dict:
    c = adapter.config
    layers = sorted({int(k.split(".")[0]) for k in adapter.keys()})
    all_layers = layers == list(range(args.num_hidden_layers))
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(c.r),
        "lora_alpha": clean_alpha(c.alpha),
        "lora_dropout": float(c.dropout),
        "target_modules": sorted({k.split(".")[1] for k in adapter.keys()}),
        "use_rslora": bool(c.use_rslora),
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None if all_layers else layers,
        "layers_pattern": None,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def save_peft(adapter: LoraAdapter, out_dir, args: ModelArgs, base_model_name_or_path: str | None = None) -> Path:
    """Write a PEFT LoRA directory that PeftModel.from_pretrained loads with no missing keys."""
    check_adapter(adapter, args)
    out = Path(out_dir)
    tensors = {}
    for key in adapter.keys():
        i, name = key.split(".")
        tensors[peft_key(int(i), name, "A")] = adapter.A[key].astype(np.float32)
        tensors[peft_key(int(i), name, "B")] = adapter.B[key].astype(np.float32)
    weights = safetensors_bytes(tensors, {"format": "pt"})
    cfg = peft_config(adapter, args, base_model_name_or_path)
    return write_files(out, {WEIGHTS: weights, CONFIG: (json.dumps(cfg, indent=2) + "\n").encode()})  # whole or not at all


# --- import ----------------------------------------------------------------------------------------

# Config options that change the math; each must be at its plain-LoRA value or we refuse.
_UNSUPPORTED = [
    ("use_dora", lambda v: bool(v), "DoRA (use_dora=true) adds a magnitude vector LoRA Lab does not apply"),
    ("fan_in_fan_out", lambda v: bool(v), "fan_in_fan_out=true (GPT-2 style Conv1D weights) is not a llama layout"),
    ("bias", lambda v: v not in (None, "none"), "trained biases (bias={v!r}) are not supported; retrain with bias='none'"),
    ("lora_bias", lambda v: bool(v), "lora_bias=true (a bias on lora_B) is not supported"),
    ("modules_to_save", lambda v: bool(v), "modules_to_save={v!r} stores fully trained modules, which LoRA Lab does not load"),
    ("rank_pattern", lambda v: bool(v), "per-module ranks (rank_pattern={v!r}) are not supported; one r for all modules"),
    ("alpha_pattern", lambda v: bool(v), "per-module alphas (alpha_pattern={v!r}) are not supported; one lora_alpha for all"),
    ("layer_replication", lambda v: bool(v), "layer_replication is not supported"),
    ("use_qalora", lambda v: bool(v), "QA-LoRA (use_qalora=true) is not supported"),
]


def _fail(where, msg) -> NoReturn:
    raise AdapterFormatError(f"{where}: {msg}")


def read_peft_config(path) -> dict:
    path = Path(path)
    cf = path / CONFIG
    if not path.is_dir():
        _fail(path, "not a directory; a PEFT adapter is a directory with adapter_config.json and "
                    "adapter_model.safetensors")
    if not cf.exists():
        _fail(path, f"{CONFIG} is missing; is this a PEFT adapter directory?")
    try:
        return json.loads(cf.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(cf, f"not valid JSON ({e})")


def load_peft(path, args: ModelArgs) -> LoraAdapter:
    """Read a PEFT LoRA directory onto a base with `args`; refuse whatever does not match, saying what."""
    from ..models.load import _load_safetensors_any
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    cfg = read_peft_config(path)
    where = str(path)
    kind = cfg.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        _fail(where, f"peft_type is {kind!r}; LoRA Lab imports LoRA adapters only")
    for field, bad, msg in _UNSUPPORTED:
        v = cfg.get(field)
        if v is not None and bad(v):
            _fail(where, msg.format(v=v))
    wf = path / WEIGHTS
    if not wf.exists():
        if (path / "adapter_model.bin").exists():
            _fail(where, "only adapter_model.bin (pickle) is present; re-save with "
                         "model.save_pretrained(dir, safe_serialization=True) to get adapter_model.safetensors")
        _fail(where, f"{WEIGHTS} is missing")
    try:
        sd = _load_safetensors_any(wf, load_file)
    except (SafetensorError, OSError, ValueError) as e:
        _fail(wf, f"not a readable safetensors file ({e})")
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)  # PEFT's defaults
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        _fail(where, f"r={r!r} and lora_alpha={alpha!r} must be a positive integer and a number")

    A: dict[str, np.ndarray] = {}
    B: dict[str, np.ndarray] = {}
    unexpected: list[str] = []
    unsupported: set[str] = set()
    for k, v in sd.items():
        m = _KEY.match(k)
        if not m:
            unexpected.append(k)
            continue
        i, sub, name, which = int(m[1]), m[2], m[3], m[4]
        if name not in LINEAR_NAMES or module_path(name) != f"{sub}.{name}":
            unsupported.add(f"{sub}.{name}")
            continue
        (A if which == "A" else B)[f"{i}.{name}"] = np.asarray(v, dtype=np.float32)
    if unsupported:
        _fail(where, f"targets {sorted(unsupported)} are not supported; LoRA Lab adapts "
                     f"{', '.join(LINEAR_NAMES)} of llama-family models")
    if unexpected:
        emb = [k for k in unexpected if "embed" in k or "lm_head" in k]
        hint = " (LoRA on embeddings / lm_head is not supported)" if emb else ""
        _fail(where, f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:3]}{hint}; LoRA Lab reads "
                     "base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_{A|B}.weight")
    if not A and not B:
        _fail(where, "the adapter holds no LoRA tensors")

    layers = sorted({int(k.split(".")[0]) for k in (*A, *B)})
    targets = [n for n in LINEAR_NAMES if any(k.split(".")[1] == n for k in (*A, *B))]
    tm = cfg.get("target_modules")
    if isinstance(tm, list):
        extra = [t for t in tm if t.split(".")[-1] not in LINEAR_NAMES]
        if extra:
            _fail(where, f"target_modules {extra} are not supported; LoRA Lab adapts {', '.join(LINEAR_NAMES)}")
        for t in tm:  # a configured target without weights would silently do nothing
            if t.split(".")[-1] not in targets:
                targets.append(t.split(".")[-1])
        targets = [n for n in LINEAR_NAMES if n in targets]
    ltt = cfg.get("layers_to_transform")
    if isinstance(ltt, int):
        ltt = [ltt]
    if ltt:
        layers = sorted(set(layers) | {int(x) for x in ltt})
    n_layers = args.num_hidden_layers
    if layers[-1] >= n_layers:
        _fail(where, f"the adapter has layer {layers[-1]} but this model has {n_layers} layers; it was made for "
                     f"a different base model ({cfg.get('base_model_name_or_path')!r})")
    missing = [peft_key(i, n, w) for i in layers for n in targets for w in "AB"
               if f"{i}.{n}" not in (A if w == "A" else B)]
    if missing:
        _fail(where, f"{len(missing)} missing tensors, e.g. {missing[:3]}; the file is incomplete or the "
                     "config's target_modules / layers_to_transform do not match its weights")

    lc = LoraConfig(r=r, alpha=float(alpha), dropout=float(cfg.get("lora_dropout") or 0.0),
                    use_rslora=bool(cfg.get("use_rslora", False)), targets=tuple(targets),
                    layers=None if layers == list(range(n_layers)) else tuple(layers))
    ad = LoraAdapter(lc, {k: A[k] for k in sorted(A, key=_order)}, {k: B[k] for k in sorted(B, key=_order)})
    check_adapter(ad, args, where)
    for k, v in (*ad.A.items(), *ad.B.items()):
        if not np.isfinite(v).all():
            _fail(where, f"layer {k} holds NaN or Inf values; the adapter is broken (diverged training?)")
    return ad


def _order(key: str):
    i, name = key.split(".")
    return int(i), LINEAR_NAMES.index(name)

