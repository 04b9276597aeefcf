"""Base + adapter(s) merged into a Hugging Face safetensors directory (f16 by default).

W' = W + Σ scale_j · (α/r)_j · B_j A_j on the dequantized base; written with config.json,
tokenizer.json, tokenizer_config.json (chat template) and generation_config.json, so that
transformers, vLLM, or llama.cpp's convert_hf_to_gguf.py read it like any HF model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..models.args import LINEAR_NAMES
from ..models.load import LoadedModel
from . import AdapterFormatError, check_adapter, module_path, replace_dir, safetensors_bytes

_HF_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config(model: LoadedModel, dtype: str) -> dict:
    a = model.args
    if a.arch not in _HF_CLASS:
        raise AdapterFormatError(f"cannot write a Hugging Face config for architecture {a.arch!r}")
    torch_dtype = {"f16": "float16", "f32": "float32"}[dtype]
    cfg = {
        "architectures": [_HF_CLASS[a.arch]],
        "model_type": a.arch,
        "hidden_size": a.hidden_size,
        "intermediate_size": a.intermediate_size,
        "num_hidden_layers": a.num_hidden_layers,
        "num_attention_heads": a.num_attention_heads,
        "num_key_value_heads": a.num_key_value_heads,
        "head_dim": a.head_dim,
        "vocab_size": a.vocab_size,
        "rms_norm_eps": a.rms_norm_eps,
        "rope_theta": a.rope_theta,  # transformers < 5
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},  # transformers >= 5
        "max_position_embeddings": a.max_position_embeddings,
        "tie_word_embeddings": model.lm_head is None,
        "hidden_act": "silu",
        "bos_token_id": a.bos_token_id,
        "eos_token_id": a.eos_token_id,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }
    if a.arch == "llama":
        cfg.update(attention_bias=a.attention_bias, mlp_bias=False)
    if a.arch == "mistral":
        cfg["sliding_window"] = None
    return cfg


def merged_weights(model: LoadedModel, adapters, dtype: str = "f16") -> dict[str, np.ndarray]:
    np_dtype = {"f16": np.float16, "f32": np.float32}[dtype]
    for ad, _ in adapters:
        check_adapter(ad, model.args)
    out = {"model.embed_tokens.weight": model.embed_tokens.dequantize().astype(np_dtype),
           "model.norm.weight": model.norm.astype(np_dtype)}
    if model.lm_head is not None:
        out["lm_head.weight"] = model.lm_head.dequantize().astype(np_dtype)
    for i, L in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = L.input_layernorm.astype(np_dtype)
        out[p + "post_attention_layernorm.weight"] = L.post_attention_layernorm.astype(np_dtype)
        for n in LINEAR_NAMES:
            W = L.linear[n].dequantize()  # (out, in) f32
            for ad, s in adapters:
                ab = ad.get(i, n)
                if ab is not None and s != 0.0:
                    W = W + (float(s) * ad.config.scale) * (ab[1] @ ab[0])
            out[p + module_path(n) + ".weight"] = W.astype(np_dtype)
            if n in L.bias:
                out[p + module_path(n) + ".bias"] = L.bias[n].astype(np_dtype)
    return out


def tokenizer_files(model: LoadedModel) -> dict[str, str]:
    tok = model.tokenizer
    if tok is None:
        raise AdapterFormatError("the model has no tokenizer to export; load it from a GGUF or HF directory")
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "add_bos_token": bool(tok.add_bos),
        "clean_up_tokenization_spaces": False,
        "model_max_length": model.args.max_position_embeddings,
    }
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    return {"tokenizer.json": tok.tk.to_str(), "tokenizer_config.json": json.dumps(cfg, indent=2) + "\n",
            "generation_config.json": json.dumps(gen, indent=2) + "\n"}


def save_merged(model: LoadedModel, adapters, out_dir, dtype: str = "f16") -> Path:
    """adapters: [(LoraAdapter, scale)] (empty: the base alone, dequantized). Writes the whole
    directory next to its destination first, then moves it into place."""
    if dtype not in ("f16", "f32"):
        raise ValueError(f"dtype must be f16 or f32, not {dtype!r}")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = tokenizer_files(model)
    cfg = hf_config(model, dtype)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix="." + out.name + "."))
    try:
        (tmp / "model.safetensors").write_bytes(
            safetensors_bytes(merged_weights(model, list(adapters), dtype), {"format": "pt"}))
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        for f in tmp.iterdir():  # flush the data before the rename makes it visible
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
