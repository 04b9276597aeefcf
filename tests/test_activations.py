"""Keep activations or recompute them: the choice (plan/activations.py), made against the device's memory, and
taken by a real run on the WebGPU engine (lavapipe in CI). That both modes give the same bits is
tests/test_webgpu_engine.py::test_keeping_activations_gives_the_bits_recomputing_gives."""

from __future__ import annotations

import pytest

from loralabd.engine.lora import LoraConfig
from loralabd.models.random import random_model, tiny_args
from loralabd.plan.activations import choose, peaks
from loralabd.training import Dataset, TrainConfig, Trainer, TrainError

from conftest import write_tiny_hf_model
from test_trainer import write_data


def test_auto_keeps_what_fits_and_recomputes_what_does_not():
    assert choose("auto", 900, 300, 1000).recompute is False
    c = choose("auto", 1200 << 20, 300 << 20, 1000 << 20)
    assert c.recompute is True and "1.17 GiB" in c.reason and "1,000.0 MiB" in c.reason
    assert choose("keep", 1200, 300, 1000).recompute is False  # given: the user's call
    assert choose("recompute", 10, 5, 1000).recompute is True
    assert choose("auto", 1200, 300, 1000, backend="numpy").recompute is False  # numpy always keeps
    with pytest.raises(ValueError, match="auto, keep, recompute"):
        choose("sometimes", 1, 1, 1)
    with pytest.raises(TrainError, match="activations"):
        TrainConfig(activations="sometimes")


def test_the_plan_prices_both_modes():
    """On the WebGPU engine's own allocation code (a sizing runtime: no GPU needed), keeping holds every layer's
    activations: more than recomputing, and growing with the tokens of a step."""
    model = random_model(tiny_args(), seed=0)
    cfg = LoraConfig(r=4, alpha=8)
    small, big = (peaks(model, "webgpu", cfg, 2, t, hardware=False) for t in (32, 128))
    for p in (small, big):
        assert p["keep"].parts["activations"] > p["recompute"].parts["activations"]
        assert p["keep"].parts["weights"] == p["recompute"].parts["weights"]
    grow = lambda p: p["keep"].parts["activations"] - p["recompute"].parts["activations"]  # noqa: E731
    assert grow(big) > 3 * grow(small)


@pytest.mark.gpu
def test_a_run_keeps_or_recomputes_as_the_memory_says(tmp_path, monkeypatch):
    from loralabd.engine.webgpu.runtime import available

    if not available():
        pytest.skip("no WebGPU adapter (install mesa-vulkan-drivers for lavapipe)")
    from loralabd.engine.webgpu.engine import WebGPUEngine
    from loralabd.models import load_model

    write_tiny_hf_model(tmp_path, "llama")
    model = load_model(tmp_path, weights="f32")
    ds = Dataset.load(write_data(tmp_path / "train.jsonl"), model.tokenizer, max_seq_len=64, cache_dir=False)
    eng = WebGPUEngine(model)
    try:
        cfg = TrainConfig(r=4, alpha=8, max_steps=1, batch_size=2, seq_len=64)
        p = peaks(model, "webgpu", cfg.lora, 2, 64, engine=eng)
        keep, rec = p["keep"].total, p["recompute"].total
        monkeypatch.setenv("LORALAB_DEVICE_MEMORY", str((keep + rec) // 2))  # fits one mode, not the other
        tr = Trainer(eng, ds, cfg)
        assert tr.sess.recompute and tr.activations.recompute and "recomputed" in tr.activations.reason
        tr.run()
        tr.sess.close()
        monkeypatch.setenv("LORALAB_DEVICE_MEMORY", str(2 * keep))
        tr = Trainer(eng, ds, cfg)
        assert not tr.sess.recompute and "kept" in tr.activations.reason
        tr.sess.close()
        tr = Trainer(eng, ds, TrainConfig(r=4, alpha=8, max_steps=1, batch_size=2, seq_len=64, activations="keep"))
        assert not tr.sess.recompute  # given: kept, whatever the memory
        tr.sess.close()
    finally:
        eng.close()
