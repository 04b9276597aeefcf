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


def test_the_plan_shows_both_modes_and_picks_the_faster_that_fits():
    """plan/estimate on the WebGPU engine's allocation code: each mode's memory and time side by side; `auto` keeps
    activations when the step fits (faster: no second forward), recomputes them under a tighter cap, and is refused
    only when neither fits; the protocol form carries it."""
    from loralabd.plan.calibrate import Calibration
    from loralabd.plan.estimate import estimate
    from loralabd.plan.hardware import Device
    from loralabd.protocol.validate import check_structure

    model = random_model(tiny_args(), seed=0)
    coef = {"micro_batches": 1e-3, "matmul_flops": 1e-12, "lora_flops": 1e-11, "attention_flops": 1e-11,
            "lora_mats": 0.0, "lora_params": 1e-9, "adam8bit_params": 0.0}
    cal = Calibration(key="t", device={}, clock="wall", coef=coef, fitted=list(coef))
    dev = Device(backend="webgpu", name="test gpu", type="discrete-gpu", memory_bytes=1 << 40, memory_source="given")
    kw = dict(lora=LoraConfig(r=4, alpha=8), batch=4, seq=128, steps=10, calibration=cal, device=dev)
    free = estimate(model, "webgpu", **kw)
    a = free.activations
    keep, rec = a["keep"], a["recompute"]
    assert a["mode"] == "keep" and keep["memoryBytes"] > rec["memoryBytes"] and keep["seconds"] < rec["seconds"]
    assert free.seconds == pytest.approx(keep["seconds"]) and free.memory.total == keep["memoryBytes"]
    tight = estimate(model, "webgpu", memory_cap_bytes=(keep["memoryBytes"] + rec["memoryBytes"]) // 2, **kw)
    assert tight.activations["mode"] == "recompute" and tight.fits
    assert tight.seconds == pytest.approx(rec["seconds"]) and "recomputed" in tight.activations["reason"]
    forced = estimate(model, "webgpu", memory_cap_bytes=(keep["memoryBytes"] + rec["memoryBytes"]) // 2,
                      activations="keep", **kw)
    assert forced.activations["mode"] == "keep" and forced.fits is False  # given: kept, and it does not fit
    none = estimate(model, "webgpu", memory_cap_bytes=rec["memoryBytes"] // 2, **kw)
    assert none.fits is False and none.activations["mode"] == "recompute"
    check_structure(tight.to_protocol(), "PlanEstimate", "result")
