"""Planning through the real daemon: structured plan/estimate answers (limits, by how much, what to change),
plan/calibrate then a time prediction, `loralab plan` on a tiny model, and unload freeing an engine."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from daemon_helpers import PY, Daemon, conn_file, dataset, env_for, home, run, tiny_model  # noqa: F401

PLAN = {"model": "tiny", "batchSize": 2, "seqLen": 32, "lora": {"r": 4}, "steps": 10}


def test_plan_that_does_not_fit_names_the_limit_by_how_much_and_what_to_change(home, tiny_model):
    d = Daemon(home)
    try:
        async def go():
            c = await d.client()
            await c.request("model/load", {"source": str(tiny_model), "name": "tiny", "backend": "numpy"})
            fit = await c.request("plan/estimate", PLAN)
            assert fit["fits"] is True and fit["exceeded"] == [] and fit["backend"] == "numpy"
            assert sum(p["bytes"] for p in fit["parts"]) == fit["memory"]["total"]
            assert fit["device"]["type"] == "cpu" and fit["device"]["memoryEstimated"] is False
            assert any("CPU fallback" in w for w in fit["warnings"])
            assert fit["tokensPerSecond"] is None and fit["calibration"] is None  # not calibrated yet
            assert any("loralab plan --calibrate" in n for n in fit["notes"])

            # batch 16 under a cap that holds about half its step: the memory limit, by how much, what to change
            big = {**PLAN, "batchSize": 16}
            need = (await c.request("plan/estimate", big))["memory"]["total"]
            cap = (need + fit["memory"]["total"]) // 2
            p = await c.request("plan/estimate", {**big, "memoryCapBytes": cap})
            assert p["fits"] is False and p["availableBytes"] == cap
            (e,) = p["exceeded"]
            assert e["limit"] == "memory" and e["unit"] == "bytes"
            assert e["needed"] == need and e["available"] == cap and e["over"] == need - cap > 0
            b = p["advice"]["maxBatch"]
            assert 2 <= b < 16 and f"batch {b} at seq 32 with grad_accum" in e["change"]
            assert p["parts"][0]["fraction"] == pytest.approx(p["parts"][0]["bytes"] / cap)
            # the advice is right: the batch it names fits under the cap, one more does not
            assert (await c.request("plan/estimate", {**big, "batchSize": b, "memoryCapBytes": cap}))["fits"] is True
            assert (await c.request("plan/estimate", {**big, "batchSize": b + 1, "memoryCapBytes": cap}))["fits"] is False
            assert any(n.startswith("limit exceeded: ") and "over by" in n for n in p["notes"])

            # a sequence past the model's context: positions, not bytes
            p = await c.request("plan/estimate", {**PLAN, "seqLen": 512})
            (e,) = [x for x in p["exceeded"] if x["limit"] == "context length"]
            assert e["unit"] == "positions" and e["needed"] == 512 and e["available"] == 256 and e["over"] == 256
            assert "seq <= 256" in e["change"]

            # the run's length from a dataset's tokens and epochs, with gradient accumulation
            no_steps = {k: v for k, v in PLAN.items() if k != "steps"}
            p = await c.request("plan/estimate", {**no_steps, "datasetTokens": 1000, "epochs": 2, "gradAccum": 2})
            assert p["tokensPerStep"] == 128 and p["steps"] == 16 and p["gradAccum"] == 2  # ceil(2000 / 128)
            with pytest.raises(Exception, match="epochs needs datasetTokens"):
                await c.request("plan/estimate", {"model": "tiny", "epochs": 2})
            await c.request("model/unload", {"model": "tiny"})  # closes the engine when it can (numpy: nothing to)
            assert (await c.request("model/list"))["models"] == []
            await c.close()
        run(go())
    finally:
        d.stop()


def test_calibrate_then_estimate_predicts_time(home, tiny_model):
    d = Daemon(home)
    try:
        async def go():
            c = await d.client()
            await c.request("model/load", {"source": str(tiny_model), "name": "tiny", "backend": "numpy"})
            t0 = time.monotonic()
            s = c.stream("plan/calibrate", {"model": "tiny"})
            events = [ev async for ev in s]
            cal = await s.result()
            took = time.monotonic() - t0
            assert cal["cached"] is False and cal["backend"] == "numpy"
            cc = cal["calibration"]
            # more shapes than the time model has terms, and the fit's residual reported
            assert len(cal["samples"]) > len(cc["terms"]) and cc["residual"] >= 0
            assert cc["leaveOneOutResidual"] is not None and cc["leaveOneOutResidual"] >= 0
            assert {x["gradAccum"] for x in cal["samples"]} == {1, 2}  # per-step work told from per-micro-batch
            assert all(x["seconds"] > 0 and x["predictedSeconds"] > 0 for x in cal["samples"])
            # memory measured from outside (the daemon's peak resident set) beside the engine's account
            assert all(x["peakBytes"] > x["engineBytes"] > 0 for x in cal["samples"])
            assert cc["runtimeBytes"] > 0 and "resident set" in cc["memoryMeasuredAs"]
            assert 0 < cc["seconds"] <= cal["seconds"] <= took
            kinds = [e["kind"] for e in events]
            assert kinds[0] == "begin" and kinds[-1] == "end" and "calibrated in" in events[-1]["message"]

            p = await c.request("plan/estimate", {**PLAN, "timeBudgetSeconds": 3600})
            assert p["tokensPerSecond"] > 0 and p["stepSeconds"] > 0 and p["seconds"] > p["stepSeconds"]
            # the measured fixed cost is part of the plan's total, in the quantity it was measured in
            assert {x["part"]: x["bytes"] for x in p["parts"]}["runtime"] >= cc["runtimeBytes"]
            assert p["memoryMeasuredAs"] == cc["memoryMeasuredAs"] and p["loadBytes"] is None  # CPU: not predicted
            assert p["tokensPerSecond"] == pytest.approx(p["tokensPerStep"] / p["stepSeconds"])
            assert p["calibration"]["key"] == cal["calibration"]["key"]
            assert p["advice"]["rankForBudget"] is not None and p["advice"]["budgetSeconds"] == 3600
            tight = await c.request("plan/estimate", {**PLAN, "steps": 100000, "timeBudgetSeconds": 1})
            assert tight["advice"]["rankForBudget"] is None and tight["advice"]["stepsInBudget"] < 100000

            again = await c.request("plan/calibrate", {"model": "tiny"})  # cached: nothing runs
            assert again["cached"] is True and again["calibration"] == cal["calibration"]
            await c.close()
        run(go())
    finally:
        d.stop()
    # a new daemon on the same data dir finds the calibration
    d = Daemon(home)
    try:
        async def go2():
            c = await d.client()
            await c.request("model/load", {"source": str(tiny_model), "name": "tiny", "backend": "numpy"})
            assert (await c.request("plan/estimate", PLAN))["tokensPerSecond"] > 0
            await c.close()
        run(go2())
    finally:
        d.stop()


def test_estimate_with_the_dataset_prices_its_batches_off_the_models_queue(home, tiny_model, dataset):
    """plan/estimate with train/start's dataset: read on a data thread, its batches priced (PlanEstimate.data), the
    run's length from its epochs, and a missing file a DatasetError."""
    d = Daemon(home)
    try:
        async def go():
            c = await d.client()
            await c.request("model/load", {"source": str(tiny_model), "name": "tiny", "backend": "numpy"})
            await c.request("plan/calibrate", {"model": "tiny"})
            plain = await c.request("plan/estimate", PLAN)
            assert plain["data"] is None and any("priced as full 2 x 32 rows" in n for n in plain["notes"])
            p = await c.request("plan/estimate", {**PLAN, "dataset": str(dataset), "workDoneToken": "plan-1"})
            data = p["data"]
            assert data["examples"] == 24 and data["batches"] == 10 and p["steps"] == 10
            assert 0 < data["rowFill"] <= 1 and 0 < data["meanLength"] <= 32 and p["tokens"] == data["tokens"]
            assert data["fullRowsSeconds"] > 0 and p["seconds"] > 0
            assert any("priced 10 batches of the dataset's real shapes" in n for n in p["notes"])
            # no steps: epochs of the dataset, as train/start counts them
            no_steps = {k: v for k, v in PLAN.items() if k != "steps"}
            e2 = await c.request("plan/estimate", {**no_steps, "dataset": str(dataset), "epochs": 2})
            job = await c.request("train/start", {**no_steps, "dataset": str(dataset), "epochs": 2, "adapter": "e2"})
            assert e2["steps"] == job["totalSteps"] and e2["tokens"] == job["tokensSeen"]
            with pytest.raises(Exception) as ei:
                await c.request("plan/estimate", {**PLAN, "dataset": str(dataset) + ".missing"})
            assert ei.value.code == -32057
            await c.close()
        run(go())
    finally:
        d.stop()


def loralab(home, *args, ok=True):
    p = subprocess.run([PY, "-m", "loralabd.cli", *args], env=env_for(home), capture_output=True, text=True, timeout=180)
    if ok:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_cli_plan_on_a_tiny_model(home, tiny_model, dataset):
    try:
        loralab(home, "serve", "--detach")
        loralab(home, "models", "--load", str(tiny_model), "--name", "tiny")
        out = loralab(home, "plan", "--model", "tiny", "--batch", "2", "--seq", "32").stdout
        for part in ("weights", "lora", "optimizer", "activations", "total", "available"):
            assert f"\n  {part} " in out, out
        assert "fits:" in out and "not predicted" in out and "loralab plan --calibrate" in out
        assert "CPU fallback" in out

        p = loralab(home, "plan", "--model", "tiny", "--batch", "2", "--seq", "32", "--calibrate", "--time-budget",
                    "10m", "--data", str(dataset), "--epochs", "2")
        out = p.stdout
        assert "calibration: measured in" in out and "calibrating: " in p.stderr
        assert "dataset: " in out and "24 examples" in out
        assert "tokens/s" in out and "s/step" in out and "meets the 600 s budget" in out

        # what does not fit: the limit, by how much, what to change
        full = json.loads(loralab(home, "plan", "--model", "tiny", "--batch", "16", "--seq", "32", "--json").stdout)
        small = json.loads(loralab(home, "plan", "--model", "tiny", "--batch", "2", "--seq", "32", "--json").stdout)
        cap = (full["memory"]["total"] + small["memory"]["total"]) // 2
        out = loralab(home, "plan", "--model", "tiny", "--batch", "16", "--seq", "32", "--memory-cap", str(cap)).stdout
        assert "DOES NOT FIT" in out and "over by" in out and "change: use batch" in out
        assert "the memory cap (given)" in out
        p = loralab(home, "plan", "--model", "tiny", "--memory-cap", "lots", ok=False)
        assert p.returncode != 0 and "6GiB" in p.stderr
    finally:
        loralab(home, "stop")
    assert conn_file(home) is None


@pytest.mark.gpu
def test_unload_closes_the_engine_and_frees_its_gpu_memory(home, tiny_model, monkeypatch):
    """model/unload calls engine.close(): the WebGPU runtime's live bytes go back to what they were."""
    import asyncio

    monkeypatch.setenv("LORALAB_HOME", str(home))
    try:
        from loralabd.engine.webgpu.runtime import get_runtime

        rt = get_runtime()
    except Exception as e:  # noqa: BLE001 (no adapter: nothing to free)
        pytest.skip(f"no WebGPU adapter here: {e}")
    from loralabd.server.manager import ModelManager

    async def go():
        m = ModelManager()
        rt.dummy, rt.dummy_rw  # the runtime's own placeholder buffers (made on first use, kept for the process)
        before = rt.live_bytes
        e = await m.load(str(tiny_model), "g", "webgpu")
        assert e.engine.backend == "webgpu" and rt.live_bytes > before
        await m.unload("g")
        assert rt.live_bytes == before and "g" not in m.models
        m.device.close()
    asyncio.run(go())
