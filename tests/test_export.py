"""Adapter export/import against the real readers: PEFT + transformers, the gguf package, llama.cpp."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from loralabd.engine.lora import LoraAdapter, LoraConfig
from loralabd.engine.numpy_engine import NumpyEngine
from loralabd.export import AdapterFormatError
from loralabd.export.gguf_lora import gguf_permute, load_gguf_lora, save_gguf_lora
from loralabd.export.merged import save_merged
from loralabd.export.mlx import load_mlx, save_mlx
from loralabd.export.peft import load_peft, peft_key, save_peft
from loralabd.models import LINEAR_NAMES, load_model

from conftest import rel_err, write_tiny_hf_model

TOL = 1e-3  # the foundation issue's tolerance: max |Δ| <= TOL · max |ref|
# f16 storage rounds every weight by up to 2^-11 relative; on the tiny random model (logits ~0.6) that
# alone moves logits by ~1e-3 of their max, so f16 merges of it are held to 4 half-ulps.
F16_TOL = 4 * 2.0 ** -11


def trained_adapter(args, cfg: LoraConfig, seed=0, b_std=0.05) -> LoraAdapter:
    """PEFT init (random A) with a random non-zero B, so the adapter visibly changes the output."""
    ad = LoraAdapter.init(args, cfg, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for k in ad.B:
        ad.B[k][:] = rng.standard_normal(ad.B[k].shape).astype(np.float32) * b_std
    return ad


def peft_from_dir(hf, path):
    """PeftModel.from_pretrained, failing on PEFT's missing/unexpected-key warnings."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.numpy import load_file

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(hf, str(path))
    bad = [str(w.message) for w in caught if "adapter keys" in str(w.message) or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    ours = set(load_file(str(path / "adapter_model.safetensors")))
    theirs = set(get_peft_model_state_dict(pm))
    assert ours == theirs, f"missing in file: {sorted(theirs - ours)[:3]}, unexpected: {sorted(ours - theirs)[:3]}"
    return pm.eval()


def tokens_for(args, n=24, seed=3):
    return np.random.default_rng(seed).integers(0, args.vocab_size, size=(1, n))


# --- PEFT: tiny random models --------------------------------------------------------------------

@pytest.mark.parametrize("arch,rslora,targets,layers", [
    ("llama", False, LINEAR_NAMES, None),
    ("qwen2", True, ("q_proj", "v_proj"), None),
    ("mistral", False, ("o_proj", "down_proj", "up_proj"), (1,)),
])
def test_peft_export_loads_in_peft_and_matches(tmp_path, arch, rslora, targets, layers):
    hf = write_tiny_hf_model(tmp_path / "base", arch).float().eval()
    model = load_model(tmp_path / "base", weights="f32")
    ad = trained_adapter(model.args, LoraConfig(r=4, alpha=8, use_rslora=rslora, targets=targets, layers=layers))
    out = save_peft(ad, tmp_path / "peft", model.args, base_model_name_or_path=str(tmp_path / "base"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == 8 and isinstance(cfg["lora_alpha"], int) and cfg["use_dora"] is False
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["use_rslora"] is rslora

    tokens = tokens_for(model.args)
    eng = NumpyEngine(model)
    ours = eng.logits(tokens, [(ad, 1.0)])[0]
    base = eng.logits(tokens)[0]
    pm = peft_from_dir(hf, out)
    with torch.no_grad():
        ref = pm(torch.tensor(tokens)).logits[0].numpy()
    assert rel_err(ours, ref) <= TOL
    assert rel_err(base, ref) > 20 * TOL, "the adapter must change the logits for this check to mean anything"
    back = load_peft(out, model.args)  # and it reads back as it was written
    assert back.config == ad.config
    for k in ad.keys():
        np.testing.assert_array_equal(back.A[k], ad.A[k])
        np.testing.assert_array_equal(back.B[k], ad.B[k])


def test_peft_made_adapter_imports_and_matches(tmp_path):
    from peft import LoraConfig as PeftConfig, get_peft_model

    hf = write_tiny_hf_model(tmp_path / "base", "llama").float().eval()
    model = load_model(tmp_path / "base", weights="f32")
    torch.manual_seed(5)
    pm = get_peft_model(hf, PeftConfig(r=6, lora_alpha=12, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                                       lora_dropout=0.1, bias="none", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "peft")
    pm.eval()
    ad = load_peft(tmp_path / "peft", model.args)
    assert ad.config.r == 6 and ad.config.alpha == 12 and ad.config.targets == ("q_proj", "k_proj", "v_proj", "down_proj")
    assert len(ad.A) == 2 * 4
    tokens = tokens_for(model.args)
    with torch.no_grad():
        ref = pm(torch.tensor(tokens)).logits[0].numpy()
        with pm.disable_adapter():
            base = pm(torch.tensor(tokens)).logits[0].numpy()
    ours = NumpyEngine(model).logits(tokens, [(ad, 1.0)])[0]
    assert rel_err(ours, ref) <= TOL
    assert rel_err(base, ref) > 20 * TOL


# --- PEFT import refuses what it cannot apply -------------------------------------------------------

@pytest.fixture
def tiny_export(tmp_path):
    write_tiny_hf_model(tmp_path / "base", "llama")
    model = load_model(tmp_path / "base", weights="f32")
    ad = trained_adapter(model.args, LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj")))
    save_peft(ad, tmp_path / "peft", model.args)
    return model, tmp_path / "peft"


def _edit_config(path, **kw):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(kw)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(path / "adapter_model.safetensors"))
    fn(sd)
    save_file(sd, str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("edit,expect", [
    (lambda p: _edit_config(p, use_dora=True), "DoRA"),
    (lambda p: _edit_config(p, peft_type="LOHA"), "LOHA"),
    (lambda p: _edit_config(p, modules_to_save=["lm_head"]), "modules_to_save"),
    (lambda p: _edit_config(p, rank_pattern={"q_proj": 8}), "rank_pattern"),
    (lambda p: _edit_config(p, target_modules=["q_proj", "v_proj", "c_attn"]), "c_attn"),
    (lambda p: _edit_config(p, target_modules=["q_proj", "v_proj", "o_proj"]), "missing"),
    (lambda p: _edit_tensors(p, lambda sd: sd.pop(peft_key(1, "v_proj", "B"))), "layers.1.self_attn.v_proj.lora_B"),
    (lambda p: _edit_tensors(p, lambda sd: sd.update({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32)})), "unexpected"),
    (lambda p: _edit_tensors(p, lambda sd: sd.update({peft_key(0, "q_proj", "A"): np.zeros((4, 96), np.float32)})), "(4, 64)"),
    (lambda p: _edit_tensors(p, lambda sd: sd.update({peft_key(5, "q_proj", "A"): np.zeros((4, 64), np.float32),
                                                      peft_key(5, "q_proj", "B"): np.zeros((64, 4), np.float32)})), "layer 5"),
    (lambda p: (p / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
])
def test_peft_import_refuses_mismatches(tiny_export, edit, expect):
    model, path = tiny_export
    edit(path)
    with pytest.raises(AdapterFormatError) as e:
        load_peft(path, model.args)
    assert expect in str(e.value), str(e.value)


def test_peft_import_refuses_other_architecture(tmp_path):
    write_tiny_hf_model(tmp_path / "a", "llama")
    write_tiny_hf_model(tmp_path / "b", "llama", hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    a, b = load_model(tmp_path / "a", weights="f32"), load_model(tmp_path / "b", weights="f32")
    save_peft(trained_adapter(a.args, LoraConfig(r=4, alpha=8)), tmp_path / "peft", a.args)
    with pytest.raises(AdapterFormatError, match="different base model"):
        load_peft(tmp_path / "peft", b.args)


# --- llama.cpp GGUF LoRA, MLX -----------------------------------------------------------------------

@pytest.mark.parametrize("rslora", [False, True])
def test_gguf_lora_reads_back_with_gguf(tmp_path, rslora):
    import gguf

    write_tiny_hf_model(tmp_path / "base", "llama")
    model = load_model(tmp_path / "base", weights="f32")
    a = model.args
    ad = trained_adapter(a, LoraConfig(r=4, alpha=8, use_rslora=rslora))
    f = save_gguf_lora(ad, tmp_path / "lora.gguf", a, name="test")
    r = gguf.GGUFReader(str(f))
    meta = {k: v.contents() for k, v in r.fields.items()}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama"
    assert math.isclose(meta["adapter.lora.alpha"], 8 * math.sqrt(4) if rslora else 8, rel_tol=1e-6)
    tensors = {t.name: t for t in r.tensors}
    assert len(tensors) == 2 * 7 * a.num_hidden_layers
    names = dict(q_proj="attn_q", k_proj="attn_k", v_proj="attn_v", o_proj="attn_output",
                 gate_proj="ffn_gate", up_proj="ffn_up", down_proj="ffn_down")
    for i in range(a.num_hidden_layers):
        for n, g in names.items():
            out_f, in_f = a.linear_shape(n)
            ta, tb = tensors[f"blk.{i}.{g}.weight.lora_a"], tensors[f"blk.{i}.{g}.weight.lora_b"]
            assert list(ta.shape) == [in_f, 4] and list(tb.shape) == [4, out_f]  # ggml ne order
            assert ta.tensor_type == gguf.GGMLQuantizationType.F32
            A, B = ad.get(i, n)
            np.testing.assert_array_equal(np.asarray(ta.data).reshape(4, in_f), A)
            heads = {"q_proj": a.num_attention_heads, "k_proj": a.num_key_value_heads}.get(n)
            want = gguf_permute(B, heads) if heads else B
            np.testing.assert_array_equal(np.asarray(tb.data).reshape(out_f, 4), want)
    if heads := a.num_attention_heads:  # the permutation moves rows (so the check above is not vacuous)
        assert not np.array_equal(gguf_permute(ad.get(0, "q_proj")[1], heads), ad.get(0, "q_proj")[1])
    back = load_gguf_lora(f, a)  # read back: same effective scale, same matrices
    assert math.isclose(back.config.scale, ad.config.scale, rel_tol=1e-6)
    for k in ad.keys():
        np.testing.assert_array_equal(back.B[k], ad.B[k])


def test_gguf_lora_qwen2_is_not_permuted(tmp_path):
    import gguf

    write_tiny_hf_model(tmp_path / "base", "qwen2")
    model = load_model(tmp_path / "base", weights="f32")
    ad = trained_adapter(model.args, LoraConfig(r=4, alpha=8, targets=("q_proj",)))
    r = gguf.GGUFReader(str(save_gguf_lora(ad, tmp_path / "q.gguf", model.args)))
    assert r.fields["general.architecture"].contents() == "qwen2"
    t = {t.name: t for t in r.tensors}["blk.0.attn_q.weight.lora_b"]
    np.testing.assert_array_equal(np.asarray(t.data).reshape(64, 4), ad.get(0, "q_proj")[1])


def test_mlx_export_layout_and_math(tmp_path):
    from safetensors.numpy import load_file

    write_tiny_hf_model(tmp_path / "base", "llama")
    model = load_model(tmp_path / "base", weights="f32")
    a = model.args
    ad = trained_adapter(a, LoraConfig(r=4, alpha=8, targets=("q_proj", "down_proj"), layers=(1,)))
    d = save_mlx(ad, tmp_path / "mlx", a)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["num_layers"] == 1 and cfg["fine_tune_type"] == "lora"
    assert cfg["lora_parameters"]["rank"] == 4 and cfg["lora_parameters"]["scale"] == 2.0
    assert cfg["lora_parameters"]["keys"] == ["self_attn.q_proj", "mlp.down_proj"]
    sd = load_file(str(d / "adapters.safetensors"))
    la, lb = sd["model.layers.1.self_attn.q_proj.lora_a"], sd["model.layers.1.self_attn.q_proj.lora_b"]
    assert la.shape == (64, 4) and lb.shape == (4, 64)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    A, B = ad.get(1, "q_proj")
    # mlx_lm LoRALinear: scale * (x @ lora_a) @ lora_b == ours: (α/r) * x A^T B^T
    np.testing.assert_allclose(2.0 * (x @ la) @ lb, ad.config.scale * (x @ A.T) @ B.T, rtol=1e-5, atol=1e-6)
    back = load_mlx(d, a)
    assert math.isclose(back.config.scale, ad.config.scale)
    np.testing.assert_array_equal(back.B["1.down_proj"], ad.B["1.down_proj"])


# --- merged HF directory ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merged_export_loads_in_transformers(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_tiny_hf_model(tmp_path / "base", arch)
    model = load_model(tmp_path / "base", weights="f32")
    ad = trained_adapter(model.args, LoraConfig(r=4, alpha=8))
    tokens = tokens_for(model.args)
    ours = NumpyEngine(model).logits(tokens, [(ad, 0.7)])[0]
    for dtype, tol in (("f32", 1e-5), ("f16", F16_TOL)):
        d = save_merged(model, [(ad, 0.7)], tmp_path / f"merged-{dtype}", dtype=dtype)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(torch.tensor(tokens)).logits[0].numpy()
        assert rel_err(ours, ref) <= tol, dtype
        # the very same stored weights through our engine: the file holds what we meant (no rounding slack)
        same = NumpyEngine(load_model(d, weights="f32")).logits(tokens)[0]
        assert rel_err(same, ref) <= 1e-5, dtype
    tok = AutoTokenizer.from_pretrained(d)
    text = "the quick brown fox"
    assert tok(text, add_special_tokens=False)["input_ids"] == model.tokenizer.encode(text)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True) == \
        model.tokenizer.render_chat([{"role": "user", "content": "hi"}])


# --- the real default model (slow) ---------------------------------------------------------------------

PROMPT = ("The history of the Roman Empire spans more than a thousand years, from the founding of the city "
          "to the fall of Constantinople. Historians usually divide it into periods.")


@pytest.fixture(scope="module")
def default_adapter(default_model):
    return trained_adapter(default_model.args, LoraConfig(r=8, alpha=16), seed=7, b_std=0.02)


@pytest.mark.slow
def test_peft_export_on_default_model(tmp_path, default_model, default_adapter, hf_default):
    hf, _ = hf_default
    eng = NumpyEngine(default_model)
    ids = np.array([default_model.tokenizer.encode(PROMPT)])
    ours = eng.logits(ids, [(default_adapter, 1.0)])[0]
    base = eng.logits(ids)[0]
    out = save_peft(default_adapter, tmp_path / "peft", default_model.args)
    pm = peft_from_dir(hf, out)
    try:
        with torch.no_grad():
            ref = pm(torch.tensor(ids)).logits[0].numpy()
    finally:
        pm.unload()  # hf_default is shared with other tests: take the LoRA layers out again
    assert rel_err(ours, ref) <= TOL
    assert rel_err(base, ref) > 20 * TOL


@pytest.mark.slow
def test_peft_made_adapter_on_default_model(tmp_path, default_model, hf_default):
    from peft import LoraConfig as PeftConfig, get_peft_model

    hf, _ = hf_default
    torch.manual_seed(3)
    pm = get_peft_model(hf, PeftConfig(r=16, lora_alpha=32, use_rslora=True, target_modules="all-linear",
                                       task_type="CAUSAL_LM"))
    try:
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.01 * torch.randn_like(p))
        pm.save_pretrained(tmp_path / "peft")
        ids = np.array([default_model.tokenizer.encode(PROMPT)])
        with torch.no_grad():
            ref = pm(torch.tensor(ids)).logits[0].numpy()
    finally:
        pm.unload()
    ad = load_peft(tmp_path / "peft", default_model.args)
    assert ad.config.use_rslora and len(ad.A) == 7 * default_model.args.num_hidden_layers
    eng = NumpyEngine(default_model)
    assert rel_err(eng.logits(ids, [(ad, 1.0)])[0], ref) <= TOL
    assert rel_err(eng.logits(ids)[0], ref) > 20 * TOL


@pytest.mark.slow
def test_merged_export_on_default_model(tmp_path, default_model, default_adapter):
    from transformers import AutoModelForCausalLM

    ids = np.array([default_model.tokenizer.encode(PROMPT)])
    ours = NumpyEngine(default_model).logits(ids, [(default_adapter, 1.0)])[0]
    d = save_merged(default_model, [(default_adapter, 1.0)], tmp_path / "merged")  # f16
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits[0].numpy()
    assert rel_err(ours, ref) <= TOL
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.95


@pytest.mark.slow
def test_llamacpp_reproduces_adapter(tmp_path):
    """benchmarks/check_llamacpp_lora.py as a test (needs llama-cpp-python; skips cleanly without it)."""
    pytest.importorskip("llama_cpp")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "check_llamacpp_lora", Path(__file__).parent.parent / "benchmarks" / "check_llamacpp_lora.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.run(tmp_path)
    assert mod.passed(res), res
    assert res["f16_cosine_per_position_min"] >= 0.99, res


# --- the adapter store ------------------------------------------------------------------------------------

def test_adapter_store_round_trip(tmp_path):
    from loralabd.adapters import AdapterStore, AdapterStoreError

    write_tiny_hf_model(tmp_path / "base", "llama")
    write_tiny_hf_model(tmp_path / "other", "llama", num_hidden_layers=3)
    model = load_model(tmp_path / "base", weights="f32")
    store = AdapterStore(tmp_path / "store")
    ad = trained_adapter(model.args, LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj")))
    d = store.save("my-style", ad, model.args, base_model="tiny", meta={"step": 120})
    assert (d / "adapter_model.safetensors").exists() and (d / "adapter_config.json").exists()
    back = store.load("my-style", model.args)
    for k in ad.keys():
        np.testing.assert_array_equal(back.B[k], ad.B[k])
    ad2 = trained_adapter(model.args, LoraConfig(r=4, alpha=8, targets=("q_proj", "v_proj")), seed=9)
    store.save("my-style", ad2, model.args, base_model="tiny", meta={"step": 240})  # replace
    assert [i["step"] for i in store.list()] == [240]
    np.testing.assert_array_equal(store.load("my-style", model.args).B["0.q_proj"], ad2.B["0.q_proj"])
    assert not [p for p in (tmp_path / "store").iterdir() if p.name.startswith(".")]  # no leftovers
    with pytest.raises(AdapterStoreError, match="num_hidden_layers 2 .adapter. vs 3"):
        store.load("my-style", load_model(tmp_path / "other", weights="f32").args)
    with pytest.raises(AdapterStoreError, match="not valid"):
        store.save("../escape", ad, model.args)
    store.delete("my-style")
    assert store.list() == []
    with pytest.raises(AdapterStoreError, match="no adapter named"):
        store.load("my-style", model.args)
