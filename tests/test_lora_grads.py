"""LoRA loss and gradients of the reference engine against PyTorch autograd + PEFT."""

import numpy as np
import pytest
import torch

from loralabd.engine import reference as R
from loralabd.engine.lora import LoraAdapter, LoraConfig
from loralabd.engine.numpy_engine import NumpyEngine
from loralabd.models import LINEAR_NAMES, load_model
from loralabd.training.packing import Batch

from conftest import rel_err, write_tiny_hf_model

TOL = 1e-4  # relative: max |Δ| / max |ref|


def peft_model(hf, cfg: LoraConfig, adapter: LoraAdapter):
    from peft import LoraConfig as PeftConfig, get_peft_model

    pm = get_peft_model(hf, PeftConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, use_rslora=cfg.use_rslora,
                                       target_modules=list(cfg.targets), bias="none", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for key in adapter.keys():
            i, name = key.split(".")
            sub = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            mod = getattr(getattr(pm.base_model.model.model.layers[int(i)], sub), name)
            mod.lora_A["default"].weight.copy_(torch.from_numpy(adapter.A[key]))
            mod.lora_B["default"].weight.copy_(torch.from_numpy(adapter.B[key]))
    return pm


def lora_param(pm, key, which):
    i, name = key.split(".")
    sub = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    mod = getattr(getattr(pm.base_model.model.model.layers[int(i)], sub), name)
    return (mod.lora_A if which == "A" else mod.lora_B)["default"].weight


@pytest.mark.parametrize("arch,rslora", [("llama", False), ("qwen2", True)])
def test_grads_match_peft(tmp_path, arch, rslora):
    hf = write_tiny_hf_model(tmp_path, arch).float()
    model = load_model(tmp_path, weights="f32")
    cfg = LoraConfig(r=4, alpha=8, use_rslora=rslora, targets=LINEAR_NAMES)
    ad = LoraAdapter.init(model.args, cfg, seed=1)
    rng = np.random.default_rng(2)
    for k in ad.B:  # non-zero B so that dA is non-zero too
        ad.B[k][:] = rng.standard_normal(ad.B[k].shape).astype(np.float32) * 0.05
    pm = peft_model(hf, cfg, ad)
    tokens = rng.integers(0, model.args.vocab_size, size=(2, 12))
    labels = tokens.copy()
    labels[:, :3] = R.IGNORE  # ignored positions

    # PEFT: HF shifts labels internally; we pass pre-shifted labels to both
    ours_labels = np.concatenate([labels[:, 1:], np.full((2, 1), R.IGNORE)], axis=1)
    out = pm(input_ids=torch.tensor(tokens), labels=torch.tensor(labels))
    out.loss.backward()

    # the train session's gradients: sums over the labelled positions; PEFT's loss is their mean
    loss_sum, n, sums = NumpyEngine(model).train_session(ad).gradients(Batch.of(tokens, ours_labels))
    assert n == int((labels[:, 1:] != R.IGNORE).sum())
    loss, grads = loss_sum / n, {k: g / np.float32(n) for k, g in sums.items()}
    assert abs(loss - out.loss.item()) <= TOL * abs(out.loss.item())
    assert len(grads) == 2 * 2 * 7
    for key in ad.keys():
        for which in "AB":
            ref = lora_param(pm, key, which).grad.numpy()
            err = rel_err(grads[f"{key}.{which}"], ref)
            assert err <= TOL, f"{key}.{which}: relative error {err:.2e}"


def test_adamw_step_matches_torch():
    rng = np.random.default_rng(0)
    p = rng.standard_normal((5, 7)).astype(np.float32)
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    opt = torch.optim.AdamW([tp], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for step in range(1, 4):
        g = rng.standard_normal(p.shape).astype(np.float32)
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        R.adamw(p, g, m, v, step, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
        assert rel_err(p, tp.detach().numpy()) <= 1e-6
