"""The reference engine on the real default model against transformers reading the same GGUF."""

import numpy as np
import pytest
import torch

from loralabd.engine.interface import Sampling
from loralabd.engine.numpy_engine import NumpyEngine

PROMPTS = [
    "The history of the Roman Empire spans more than a thousand years, from the founding of the city "
    "to the fall of Constantinople. Historians usually divide it into the Republic, the Principate and "
    "the Dominate, each with its own institutions, armies and ways of governing distant provinces. Roads, aqueducts "
    "and a common law tied the provinces together, while Latin and Greek carried ideas between them.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n    for _ in "
    "range(n):\n        a, b = b, a + b\n    return a\n\n\nclass Cache:\n    def __init__(self, size=128):\n"
    "        self.size = size\n        self.items = {}\n",
    "Photosynthesis converts light energy into chemical energy. In the light reactions, water is split "
    "and oxygen released; in the Calvin cycle, carbon dioxide is fixed into sugars — 6 CO2 + 6 H2O → "
    "C6H12O6 + 6 O2. Les plantes, les algues et certaines bactéries en dépendent; 光合作用 is the same "
    "process in Chinese, and its efficiency rarely exceeds 2% in the field (≈ 1–2 %).",
]

TOL = 1e-3  # max |Δ| <= TOL · max |ref|


@pytest.fixture(scope="module")
def engine(default_model):
    return NumpyEngine(default_model)


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_logits_match_transformers(engine, hf_default, i):
    hf, _ = hf_default
    ids = engine.model.tokenizer.encode(PROMPTS[i])
    assert len(ids) >= 64
    ours = engine.logits(np.array([ids]))[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    err = np.abs(ours - ref).max()
    assert err <= TOL * np.abs(ref).max(), f"max |Δ| {err:.3g} vs max |ref| {np.abs(ref).max():.3g}"
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.99


@pytest.mark.slow
def test_greedy_64_tokens_match_transformers(engine, hf_default):
    hf, _ = hf_default
    tok = engine.model.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": "Write a short poem about the sea and the moon."}])
    ours = list(engine.decode(ids, 64))  # greedy (Sampling()), no stop: all 64
    assert len(ours) == 64
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    ref = out[0, len(ids):].tolist()
    assert ours == ref, f"ours: {tok.decode(ours)!r}\nref:  {tok.decode(ref)!r}"


def test_capital_of_france(engine):
    tok = engine.model.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = []
    gen = engine.decode(ids, 16, Sampling())
    for t in gen:  # the caller stops at the stop token
        out.append(t)
        if t == tok.eos_id:
            break
    gen.close()
    assert out[-1] == tok.eos_id and len(out) < 16
    assert tok.decode(out, skip_special=True).strip() == "The capital of France is Paris."
