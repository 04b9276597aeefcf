"""Does mlx_lm apply our MLX adapter export the way we do?  (needs `pip install "mlx[cpu]" mlx-lm`,
which may live in another venv: the two halves run in two interpreters.)

    .venv/bin/python benchmarks/check_mlx_adapter.py write DIR [--tiny]   # base (HF dir), export, our logits
    /path/to/mlx-venv/bin/python benchmarks/check_mlx_adapter.py check DIR  # mlx_lm.load + load_adapters

`write` saves the base as an f32 HF directory (mlx_lm reads those), the adapter with save_mlx, the
token ids, and our logits with and without the adapter. `check` runs mlx_lm on the same ids and
prints max|Δ|/max|ref| with the adapter and the cosine of the adapter's effect.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

TEXT = "The history of the Roman Empire spans more than a thousand years, from the founding of the city."


def write(d: Path, tiny: bool):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from loralabd.engine.lora import LoraAdapter, LoraConfig
    from loralabd.engine.numpy_engine import NumpyEngine
    from loralabd.export.merged import save_merged
    from loralabd.export.mlx import save_mlx
    from loralabd.models import load_model

    if tiny:
        from conftest import write_tiny_hf_model

        write_tiny_hf_model(d / "tiny-src", "llama")
        model = load_model(d / "tiny-src", weights="f32")
    else:
        model = load_model()
    ad = LoraAdapter.init(model.args, LoraConfig(r=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "down_proj"),
                                                 layers=tuple(range(1, model.args.num_hidden_layers))), seed=7)
    rng = np.random.default_rng(8)
    for k in ad.B:
        ad.B[k][:] = rng.standard_normal(ad.B[k].shape).astype(np.float32) * (0.05 if tiny else 0.1)
    save_merged(model, [], d / "base", dtype="f32")  # the base alone, as an HF directory
    save_mlx(ad, d / "adapter", model.args)
    ids = model.tokenizer.encode(TEXT)
    eng = NumpyEngine(model)
    np.save(d / "ids.npy", np.array(ids))
    np.save(d / "ours_base.npy", eng.logits(np.array([ids]))[0])
    np.save(d / "ours_adapter.npy", eng.logits(np.array([ids]), [(ad, 1.0)])[0])
    print(f"wrote {d}")


def check(d: Path):
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters

    ids = np.load(d / "ids.npy")
    model, _ = load(str(d / "base"))
    base = np.array(model(mx.array(ids[None]))[0].astype(mx.float32))
    model = load_adapters(model, str(d / "adapter"))
    with_ = np.array(model(mx.array(ids[None]))[0].astype(mx.float32))
    ours_b, ours_a = np.load(d / "ours_base.npy"), np.load(d / "ours_adapter.npy")
    e_o, e_m = (ours_a - ours_b).ravel(), (with_ - base).ravel()
    res = {"mlx_version": mx.__version__, "positions": int(ids.size),
           "base_rel_err": float(np.abs(base - ours_b).max() / np.abs(ours_b).max()),
           "adapter_rel_err": float(np.abs(with_ - ours_a).max() / np.abs(ours_a).max()),
           "adapter_effect_rel": float(np.abs(ours_a - ours_b).max() / np.abs(ours_b).max()),
           "effect_cosine": float(e_o @ e_m / (np.linalg.norm(e_o) * np.linalg.norm(e_m)))}
    print(json.dumps(res, indent=2))
    ok = res["adapter_rel_err"] <= 1e-3 and res["effect_cosine"] >= 0.999 and res["adapter_effect_rel"] > 0.02
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    mode, d = sys.argv[1], Path(sys.argv[2])
    d.mkdir(parents=True, exist_ok=True)
    sys.exit(write(d, "--tiny" in sys.argv) if mode == "write" else check(d))
