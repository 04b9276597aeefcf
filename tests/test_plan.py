"""plan/estimate: limits named with amounts and changes, per-binding checks, the calibration cache, and
the memory and time models against measurement (numpy engine on the default model; WebGPU buffers)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loralabd.engine.interface import OptimSettings
from loralabd.engine.lora import LoraAdapter, LoraConfig
from loralabd.plan import estimate
from loralabd.plan.hardware import describe_cpu, parse_bytes
from loralabd.plan.memory import binding_violations, mib, training_memory
from loralabd.training.packing import Batch

GiB = 1 << 30


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALAB_HOME", str(tmp_path))
    return tmp_path


def test_plan_that_does_not_fit_names_the_limit_the_excess_and_the_change(default_model):
    cap = int(1.2 * GiB)
    plan = estimate(default_model, "numpy", lora=LoraConfig(r=16), batch=8, seq=256, steps=10,
                    memory_cap_bytes=cap, calibration=None)
    assert plan.fits is False
    (e,) = [x for x in plan.exceeded if x["limit"] == "memory"]
    assert e["available"] == cap and e["needed"] == plan.memory.total
    assert e["over"] == plan.memory.total - cap > 0
    b = plan.advice["maxBatch"]
    assert 1 <= b < 8
    assert f"batch {b} at seq 256" in e["change"] and "grad_accum" in e["change"] and "adam8bit" in e["change"]
    # the advice is right: the batch it names fits, one more does not
    ok = estimate(default_model, "numpy", lora=LoraConfig(r=16), batch=b, seq=256, memory_cap_bytes=cap, calibration=None)
    over = estimate(default_model, "numpy", lora=LoraConfig(r=16), batch=b + 1, seq=256, memory_cap_bytes=cap,
                    calibration=None)
    assert ok.fits is True and ok.exceeded == []
    assert over.fits is False
    t = plan.advice["maxSeq"]
    assert estimate(default_model, "numpy", lora=LoraConfig(r=16), batch=8, seq=t, memory_cap_bytes=cap,
                    calibration=None).fits is True
    notes = " ".join(plan.to_protocol()["notes"])
    assert "limit exceeded" in notes and f"over by {mib(e['over'])}" in notes


def test_sequence_longer_than_the_context_is_a_named_limit(default_model):
    plan = estimate(default_model, "numpy", batch=1, seq=9000, steps=1, calibration=None)
    (e,) = [x for x in plan.exceeded if x["limit"] == "context length"]
    assert e["available"] == default_model.args.max_position_embeddings == 8192 and e["over"] == 9000 - 8192
    assert "seq <= 8192" in e["change"]


def _webgpu_runtime():
    try:
        from loralabd.engine.webgpu.runtime import get_runtime

        return get_runtime()
    except Exception as e:  # no wgpu / no adapter on this machine
        pytest.skip(f"no WebGPU adapter: {e}")


def test_per_binding_check_names_the_buffer_against_the_adapter_limit(default_model):
    rt = _webgpu_runtime()
    from loralabd.plan.hardware import describe_webgpu

    dev = describe_webgpu(rt)
    lim = dev.limits["max-storage-buffer-binding-size"]
    a = default_model.args
    N = lim // (4 * a.intermediate_size) + 64  # one (N, F) activation is just over one binding
    B, T = N // 64 + 1, 64
    plan = estimate(default_model, "webgpu", batch=B, seq=T, steps=1, device=dev, calibration=None,
                    memory_cap_bytes=1 << 50)
    over = [x for x in plan.exceeded if x["limit"] == "max-storage-buffer-binding-size"]
    names = {x["what"] for x in over}
    assert "buffer 'g' (activations)" in names and "buffer 'up' (activations)" not in names
    g = next(x for x in over if x["what"] == "buffer 'g' (activations)")
    assert g["needed"] == 4 * B * T * a.intermediate_size and g["available"] == lim
    assert g["over"] == g["needed"] - lim
    assert plan.fits is False and "batch" in g["change"]
    # the batch the advice names passes every binding check
    ok = estimate(default_model, "webgpu", batch=plan.advice["maxBatch"], seq=T, steps=1, device=dev,
                  calibration=None, memory_cap_bytes=1 << 50)
    assert not binding_violations(ok.memory, dev.limits) and ok.fits is True


def test_webgpu_memory_model_equals_the_engines_buffers():
    """Predicted bytes = what WebGPUEngine + its train session allocate (runtime live bytes), exactly."""
    rt = _webgpu_runtime()
    from loralabd.engine.select import make_engine
    from loralabd.models.random import random_model, smollm2_135m_args

    args = smollm2_135m_args()
    args = type(args)(**{**args.to_dict(), "num_hidden_layers": 2})
    model = random_model(args, seed=1)
    rt.dummy, rt.dummy_rw  # the runtime's own placeholder buffers, made on first use (not the engine's)
    for B, T, cfg, opt in [(1, 16, LoraConfig(r=8), "adamw"), (2, 8, LoraConfig(r=4, targets=("q", "v")), "adam8bit")]:
        before = rt.live_bytes
        rt.peak_bytes = before
        eng = make_engine(model, "webgpu")
        sess = eng.train_session(LoraAdapter.init(args, cfg), OptimSettings(kind=opt))
        tok = np.random.default_rng(0).integers(0, args.vocab_size, (B, T))
        sess.step([Batch.of(tok, tok)], 1e-4, 1.0)
        assert len(sess.metrics()) == 1  # the step has run (and its metrics were read back)
        used = rt.peak_bytes - before
        pred = training_memory(model, "webgpu", cfg, B, T, opt, dict(rt.limits), engine=eng).total
        assert abs(pred - used) <= 0.001 * used, (B, T, cfg, opt, pred, used)
        # without an engine (a plan for a backend name): the same list from the device's limits and variants
        assert training_memory(model, "webgpu", cfg, B, T, opt, dict(rt.limits), tiled=rt.tiled).total == pred
        sess.close()
        eng.close()
        assert rt.live_bytes == before  # the session and the engine gave every buffer back


def test_calibration_is_cached_per_device_and_model(home):
    from loralabd.engine.numpy_engine import NumpyEngine
    from loralabd.models.random import random_model, tiny_args
    from loralabd.plan.calibrate import cache_path, cached_calibration

    model = random_model(tiny_args(hidden_size=64, num_hidden_layers=2), seed=0)
    eng = NumpyEngine(model)
    cal = cached_calibration(eng, clock="cpu")
    assert cache_path().is_file() and str(cache_path()).startswith(str(home))
    assert len(cal.samples) == 6 and all(s["accumulate_s"] > 0 for s in cal.samples)
    again = cached_calibration(NumpyEngine(model), clock="cpu")
    assert again.created == cal.created and again.acc == cal.acc  # read from the cache, not measured again
    other = random_model(tiny_args(hidden_size=96, num_hidden_layers=2), seed=0)  # another shape: not a hit
    from loralabd.plan.calibrate import cached
    from loralabd.plan.hardware import describe

    assert cached(describe(eng), other, "cpu") is None
    # a plan on the calibrated device predicts time and explains where it came from
    plan = estimate(model, eng, batch=2, seq=32, steps=5, clock="cpu", calibration="cached")
    assert plan.tokens_per_s > 0 and plan.seconds > 0 and any("calibrated" in n for n in plan.notes)


def test_rank_for_a_time_budget_is_the_largest_that_meets_it(home):
    from loralabd.engine.numpy_engine import NumpyEngine
    from loralabd.models.random import random_model, tiny_args
    from loralabd.plan.calibrate import cached_calibration
    from loralabd.plan.estimate import RANKS

    model = random_model(tiny_args(), seed=0)
    cal = cached_calibration(NumpyEngine(model), clock="cpu")

    def run_s(r):
        p = estimate(model, "numpy", lora=LoraConfig(r=r, alpha=2 * r), batch=2, seq=32, steps=50, calibration=cal)
        return p.seconds

    budget = run_s(16) * 1.0001
    plan = estimate(model, "numpy", lora=LoraConfig(r=64, alpha=128), batch=2, seq=32, steps=50, calibration=cal,
                    time_budget_s=budget)
    r = plan.advice["rankForBudget"]
    assert r is not None and run_s(r) <= budget
    bigger = [k for k in RANKS if k > r]
    assert all(run_s(k) > budget for k in bigger)  # the largest rank that meets the budget
    tight = estimate(model, "numpy", lora=LoraConfig(r=8), batch=2, seq=32, steps=50, calibration=cal,
                     time_budget_s=run_s(1) / 2)
    assert tight.advice["rankForBudget"] is None and tight.advice["stepsInBudget"] < 50
    assert "no rank meets" in " ".join(tight.advice["text"])


def test_protocol_form_is_a_valid_plan_estimate(default_model, home):
    from loralabd.protocol.validate import check_structure

    out = estimate(default_model, {"model": "m", "batchSize": 2, "seqLen": 64, "lora": {"r": 8}, "steps": 3})
    check_structure(out, "PlanEstimate", "result")
    assert out["fits"] is True and out["tokensPerStep"] == 128 and out["tokensPerSecond"] is None
    assert out["memory"]["total"] == sum(v for k, v in out["memory"].items() if k != "total")


def test_work_comes_from_steps_tokens_or_epochs_of_a_dataset(default_model):
    data = [list(range(100))] * 30  # 3000 tokens
    p = estimate(default_model, "numpy", dataset=data, epochs=2, batch=2, seq=64, calibration=None)
    assert p.steps == math.ceil(2 * 3000 / 128)
    assert estimate(default_model, "numpy", tokens=1000, batch=2, seq=64, calibration=None).steps == 8
    assert estimate(default_model, "numpy", steps=7, batch=2, seq=64, calibration=None).tokens == 7 * 128
    small = estimate(default_model, "numpy", dataset_tokens=50, batch=2, seq=64, calibration=None)
    assert any("fewer than one step" in w for w in small.warnings)
    assert any("CPU fallback" in w for w in small.warnings)


def test_cpu_description_and_memory_sizes():
    d = describe_cpu()
    assert d.cores >= 1 and d.memory_bytes and d.memory_bytes > 0 and d.memory_source
    assert d.blas_threads >= 1
    assert parse_bytes("6GiB") == 6 * GiB and parse_bytes("512 MiB") == 512 << 20 and parse_bytes("8GB") == 8 * 10**9
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("lots")


@pytest.mark.slow
def test_memory_and_tokens_per_second_match_measurement_on_the_default_model(home):
    """>= 6 configurations (batch, seq, rank, targets, optimizer), each measured in a fresh process:
    peak RSS within 15%, tokens/s within 20% (process CPU time, one BLAS thread: the CPU is shared)."""
    from loralabd.plan.measure import markdown, validate

    res = validate("numpy", "default", clock="cpu", threads=1, parallel=2)
    print("\n" + markdown(res))
    rows = res["rows"]
    assert len(rows) >= 6
    for r in rows:
        assert abs(r["mem_err"]) <= 0.15, r
        assert abs(r["tps_err"]) <= 0.20, r
