"""GGUF files other than the default model: tiny llama and qwen2 written the way llama.cpp's converter
writes them (llama's q/k rows permuted, qwen2's not; F32 and F16 tensors), against transformers."""

import json

import numpy as np
import pytest
import torch

from loralabd.engine.numpy_engine import NumpyEngine
from loralabd.models import load_model

from conftest import write_tiny_hf_model

TOL = 1e-3  # max |Δ| <= TOL · max |ref|

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf, d, arch, path, dtype):
    import gguf

    cfg = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tj = json.loads((d / "tokenizer.json").read_text())
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    tokens += [f"[PAD{i}]" for i in range(cfg.vocab_size - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    special = {a["content"] for a in tj["added_tokens"]}
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template(json.loads((d / "tokenizer_config.json").read_text())["chat_template"])
    np_dtype = np.float16 if dtype == "f16" else np.float32
    for name, p in hf.state_dict().items():
        a = p.detach().float().numpy()
        name = name.removeprefix("model.")
        if name == "embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "lm_head.weight":
            out = "output.weight"
        elif name == "norm.weight":
            out = "output_norm.weight"
        else:
            _, i, rest = name.split(".", 2)
            mod, kind = rest.rsplit(".", 1)
            out = f"blk.{i}.{GGUF_NAMES[mod]}.{kind}"
            if arch == "llama" and mod in ("self_attn.q_proj", "self_attn.k_proj"):
                a = permute(a, cfg.num_attention_heads if mod.endswith("q_proj") else cfg.num_key_value_heads)
        w.add_tensor(out, a.astype(np_dtype if a.ndim == 2 else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch,dtype", [("llama", "f32"), ("qwen2", "f32"), ("llama", "f16")])
def test_gguf_matches_transformers(tmp_path, arch, dtype):
    hf = write_tiny_hf_model(tmp_path, arch).float().eval()
    f = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(hf, tmp_path, arch, f, dtype)
    model = load_model(f)
    assert model.args.arch == arch and model.args.attention_bias == (arch == "qwen2")
    assert model.layers[0].linear["q_proj"].kind == dtype
    tokens = np.random.default_rng(0).integers(0, model.args.vocab_size, (2, 24))
    if dtype == "f16":  # the reference sees the same f16-rounded weights
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if p.ndim == 2 and "embed" not in n and "lm_head" not in n:
                    p.copy_(p.half().float())
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    ours = NumpyEngine(model).logits(tokens)
    assert np.abs(ours - ref).max() <= TOL * np.abs(ref).max()
    # the tokenizer built from the GGUF's vocabulary and merges agrees with the tokenizer.json one
    hf_dir = load_model(tmp_path, weights="f32").tokenizer
    text = "the quick brown fox, hello world! <|im_start|>user\nhi<|im_end|>"
    assert model.tokenizer.encode(text) == hf_dir.encode(text)
