"""Model loading: HF directories against transformers, GGUF blocks against the gguf package, and errors."""

import json
import shutil

import numpy as np
import pytest
import torch

from loralabd.engine.numpy_engine import NumpyEngine
from loralabd.errors import ModelLoadError, TokenizerError, UnsupportedModelError
from loralabd.models import load_model
from loralabd.models.quant import from_ggml_bytes, quantize_q4_1, quantize_q8_0

from conftest import write_tiny_hf_model

TOL = 1e-3  # max |Δ| <= TOL · max |ref|


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_hf_dir_matches_transformers(tmp_path, arch):
    hf = write_tiny_hf_model(tmp_path, arch).float().eval()
    model = load_model(tmp_path, weights="f32")
    assert model.args.arch == arch
    tokens = np.random.default_rng(0).integers(0, model.args.vocab_size, (2, 40))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    ours = NumpyEngine(model).logits(tokens)
    assert np.abs(ours - ref).max() <= TOL * np.abs(ref).max()


def test_hf_dir_quantized_at_load(tmp_path):
    """Default weights="q4_1": linear weights become 4-bit blocks, each value within half a step."""
    write_tiny_hf_model(tmp_path, "llama")
    q = load_model(tmp_path)
    f = load_model(tmp_path, weights="f32")
    assert q.weight_bytes() < 0.5 * f.weight_bytes()
    for name, wq in q.layers[1].linear.items():
        assert wq.kind == "q4_1"
        orig = f.layers[1].linear[name].dequantize()
        d = np.repeat(wq.scales[..., 0].astype(np.float32), 32, axis=1)  # (rows, cols) step per value
        # half a step, plus the f16 rounding of the block's min and step (15 steps span the block)
        assert np.all(np.abs(wq.dequantize() - orig) <= 0.5 * d + 16 * 2**-10 * np.abs(orig).max())


def test_sharded_safetensors(tmp_path):
    hf = write_tiny_hf_model(tmp_path / "one", "llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "one" / f, tmp_path / "sharded" / f)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a, b = load_model(tmp_path / "one", weights="f32"), load_model(tmp_path / "sharded", weights="f32")
    t = np.arange(10)[None]
    np.testing.assert_array_equal(NumpyEngine(a).logits(t), NumpyEngine(b).logits(t))


def test_chat_template_from_hf_dir(tiny_llama_dir):
    tok = load_model(tiny_llama_dir).tokenizer
    text = tok.render_chat([{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# --- ggml blocks: our parsing against the gguf package's reference dequantization ----------------

@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_blocks_match_gguf_package(qtype):
    import gguf

    rng = np.random.default_rng(0)
    w = rng.standard_normal((7, 96)).astype(np.float32)
    t = getattr(gguf.GGMLQuantizationType, qtype)
    raw = gguf.quants.quantize(w, t)  # (7, bytes)
    ref = gguf.quants.dequantize(raw, t)
    ours = from_ggml_bytes(qtype.lower(), raw, 7, 96).dequantize()
    np.testing.assert_array_equal(ours, ref)


def test_our_quantizers_match_gguf_package():
    import gguf

    w = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    ref1 = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1), gguf.GGMLQuantizationType.Q4_1)
    np.testing.assert_allclose(quantize_q4_1(w).dequantize(), ref1, atol=1e-6)
    ref8 = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_allclose(quantize_q8_0(w).dequantize(), ref8, atol=1e-6)


def test_default_model_shape(default_model):
    a = default_model.args
    assert (a.num_hidden_layers, a.hidden_size, a.intermediate_size) == (30, 576, 1536)
    assert (a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.vocab_size) == (9, 3, 64, 49152)
    assert a.tie_word_embeddings and default_model.lm_head is None
    assert default_model.layers[0].linear["q_proj"].kind == "q4_1"
    assert default_model.embed_tokens.kind == "q8_0"
    assert default_model.weight_bytes() < 110e6  # stays 4-bit in memory


# --- errors: each names the file and the problem ----------------------------------------------

def test_truncated_gguf(default_model_path, tmp_path):
    p = tmp_path / "cut.gguf"
    with open(default_model_path, "rb") as f:
        p.write_bytes(f.read(5_000_000))
    with pytest.raises(ModelLoadError, match=r"cut\.gguf.*truncated"):
        load_model(p)


def test_corrupt_gguf(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"GGUF" + bytes(range(256)) * 10)
    with pytest.raises(ModelLoadError, match=r"junk\.gguf.*not a readable GGUF"):
        load_model(p)
    p.write_bytes(b"hello, not a model at all")
    with pytest.raises(ModelLoadError, match=r"junk\.gguf"):
        load_model(p)


def test_truncated_safetensors(tiny_llama_dir):
    f = tiny_llama_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors.*(truncated|corrupt)"):
        load_model(tiny_llama_dir)


def test_unknown_architecture(tiny_llama_dir):
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (tiny_llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"config\.json.*'gpt_neox' is not supported"):
        load_model(tiny_llama_dir)


def test_missing_tokenizer(tiny_llama_dir):
    (tiny_llama_dir / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is missing"):
        load_model(tiny_llama_dir)


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.gguf")


def test_missing_weight(tiny_llama_dir):
    from safetensors.numpy import load_file, save_file

    f = tiny_llama_dir / "model.safetensors"
    sd = load_file(str(f))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(f))
    with pytest.raises(ModelLoadError, match=r"layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_model(tiny_llama_dir)
