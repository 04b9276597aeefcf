"""Many clients at once; one model's queue serializes whole requests; generate runs between training steps."""

from __future__ import annotations

import asyncio
import time

import pytest

from daemon_helpers import Daemon, dataset, home, run, tiny_model  # noqa: F401 (fixtures)


@pytest.fixture
def daemon(home):
    d = Daemon(home)
    yield d
    d.stop()


async def _three_clients_two_generates(d, tiny_model):
    cs = [await d.client() for _ in range(3)]
    try:
        await cs[0].request("model/load", {"source": str(tiny_model), "name": "tiny"})
        # every client sees the model; concurrent loads of the same id share one load
        loads = await asyncio.gather(*[c.request("model/load", {"source": str(tiny_model), "name": "tiny"}) for c in cs])
        assert {m["id"] for m in loads} == {"tiny"}
        order = []  # (client, delta index) in arrival order across both streams
        for i, c in enumerate(cs[:2]):
            c.on_notification = lambda msg, i=i: order.append(i) if msg["method"] == "generate/delta" else None
        p = {"model": "tiny", "prompt": "hello world", "maxTokens": 40, "temperature": 0.0}
        s0, s1 = cs[0].stream("generate", p), cs[1].stream("generate", p)
        alone = await cs[2].request("model/list")  # a third client is served while both generate
        r0, r1 = await asyncio.gather(s0.result(), s1.result())
        assert alone["models"][0]["id"] == "tiny"
        # serialized: each whole, same text (greedy) and not interleaved: all of one stream, then the other
        assert r0["text"] == r1["text"] and r0["tokens"] == r1["tokens"] == 40
        assert order == sorted(order) or order == sorted(order, reverse=True), order
        assert len(set(order)) == 2
    finally:
        for c in cs:
            await c.close()


def test_three_clients_and_serialized_generates(daemon, tiny_model):
    run(_three_clients_two_generates(daemon, tiny_model))


STEPS = 400  # long enough that training is still running when the generate returns, on a fast machine too


async def _generate_during_training(d, tiny_model, dataset):
    trainer, chatter = await d.client(), await d.client()
    try:
        await trainer.request("model/load", {"source": str(tiny_model), "name": "tiny"})
        steps = []
        s = trainer.stream("train/start", {"model": "tiny", "dataset": str(dataset), "adapter": "live", "steps": STEPS,
                                           "batchSize": 4, "seqLen": 48, "lora": {"r": 4}, "optimizer": {"lr": 1e-2}})
        async for ev in s:
            if ev["kind"] == "report" and ev["train"]["step"] >= 2:
                break
        # generate against the adapter being trained: it runs between two steps on a snapshot
        g = await chatter.request("generate", {"model": "tiny", "prompt": "the quick", "maxTokens": 8, "adapter": "live"})
        status = (await chatter.request("train/list"))["jobs"][0]
        assert status["state"] == "running", "training must still be running when generate returns"
        assert 2 <= g["adapterStep"] < STEPS and g["tokens"] >= 1
        async for ev in s:
            steps.append(ev)
        job = await s.result()
        assert job["state"] == "completed" and job["step"] == STEPS
        final = await chatter.request("generate", {"model": "tiny", "prompt": "the quick", "maxTokens": 8, "adapter": "live"})
        assert final["adapterStep"] == STEPS
    finally:
        await trainer.close()
        await chatter.close()


def test_generate_during_training_runs_between_steps(daemon, tiny_model, dataset):
    run(_generate_during_training(daemon, tiny_model, dataset), timeout=300)


async def _coalesced(d, tiny_model, dataset):
    c = await d.client()
    try:
        await c.request("model/load", {"source": str(tiny_model), "name": "tiny"})
        s = c.stream("train/start", {"model": "tiny", "dataset": str(dataset), "adapter": "fast", "steps": 80,
                                     "batchSize": 1, "seqLen": 16, "lora": {"r": 2}})
        times, events = [], []
        async for ev in s:
            times.append(time.monotonic())
            events.append(ev)
        job = await s.result()
        return job, times, events
    finally:
        await c.close()


def test_progress_is_coalesced(daemon, tiny_model, dataset):
    job, times, events = run(_coalesced(daemon, tiny_model, dataset))
    assert job["step"] == 80
    reports = [t for t, e in zip(times, events) if e["kind"] == "report"]
    assert events[-1]["kind"] == "end" and events[-1]["train"]["step"] == 80  # the last state always arrives
    elapsed = times[-1] - times[0]
    # at most one report per 0.25 s (plus one for the window edge), however fast the steps are
    assert len(reports) <= elapsed / 0.25 + 2, (len(reports), elapsed)
    if elapsed < 80 * 0.25:  # steps were faster than the reporting interval: some reports were merged
        assert len(reports) < 80
