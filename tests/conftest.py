"""Shared fixtures: the real default model, tiny random HF models written by transformers."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def default_model():
    from loralabd.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def default_model_path():
    from loralabd.models import default_model_path

    return default_model_path()


def write_tiny_hf_model(path, arch="llama", seed=0, **overrides):
    """A tiny random model saved by transformers' save_pretrained (with a byte-level BPE tokenizer)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False)
    common.update(overrides)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif arch == "mistral":
        cfg = transformers.MistralConfig(sliding_window=None, **common)
        model = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial weights everywhere (HF inits biases and norms to 0/1)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    _write_tiny_tokenizer(path, common["vocab_size"])
    return model


def _write_tiny_tokenizer(path, vocab_size):
    """A byte-level BPE trained on a few lines, padded to vocab_size, with a ChatML template."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny tokenizer"] * 50
    tk.train_from_iterator(text, trainer)
    tk.save(str(path / "tokenizer.json"))
    template = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
                "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": template}))


@pytest.fixture
def tiny_llama_dir(tmp_path):
    write_tiny_hf_model(tmp_path, "llama")
    return tmp_path


@pytest.fixture
def tiny_qwen2_dir(tmp_path):
    write_tiny_hf_model(tmp_path, "qwen2")
    return tmp_path


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="session")
def hf_default(default_model_path):
    """transformers' own reading of the same GGUF (dequantized to f32): the independent reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_grad_enabled(False)
    d, f = str(default_model_path.parent), default_model_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    torch.set_grad_enabled(True)
    return model, tok
