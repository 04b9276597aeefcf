"""Bounded, checked input against the real daemon (issue 12): settings out of range, layers the model does not
have, text that is not Unicode, wrong LSP frames, non-finite training, datasets too big to read whole."""

from __future__ import annotations

import asyncio
import json
import re

import numpy as np
import pytest

from daemon_helpers import Daemon, connect, dataset, env_for, home, run, server, tiny_model  # noqa: F401 (fixtures)
from loralabd.client import AsyncClient, RpcError

TRANSPORTS = ["stdio", "ws"]

# settings that once passed validation and trained NaN adapters or failed the job late
BAD_SETTINGS = [
    ({"optimizer": {"betas": [0.9]}}, "params.optimizer.betas: expected exactly 2 items, got 1"),
    ({"optimizer": {"betas": [2, -1]}}, "params.optimizer.betas[0]: must be < 1"),
    ({"optimizer": {"eps": 0}}, "params.optimizer.eps: must be >= 1e-30"),
    ({"optimizer": {"weightDecay": 1e308}}, "params.optimizer.weightDecay: must be <= 10"),
    ({"lora": {"alpha": 1e308}}, "params.lora.alpha: must be <= 10000"),
    ({"lora": {"layers": [0, 999]}}, "params.lora.layers[1]: model 'tiny' has 2 layers, numbered 0 to 1, got 999"),
    ({"lora": {"layers": [1, 1]}}, "params.lora.layers[1]: layer 1 is listed twice"),
    ({"lora": {"layers": [-1]}}, "params.lora.layers[0]: must be >= 0"),
]


async def _refused(c: AsyncClient, method: str, params: dict, reason: str) -> None:
    with pytest.raises(RpcError) as e:
        await c.request(method, params, timeout=30)
    assert e.value.code == -32602 and reason in e.value.message, (method, params, e.value.message)


async def _bad_settings(transport, home, d, tiny_model, data):
    c = await connect(transport, home, d)
    try:
        await c.request("model/load", {"source": str(tiny_model), "name": "tiny"})
        base = {"model": "tiny", "dataset": str(data), "adapter": "bad", "steps": 2, "seqLen": 32}
        for extra, reason in BAD_SETTINGS:
            await _refused(c, "train/start", {**base, **extra}, reason)
            if "lora" in extra:  # plan/estimate takes the same LoRA settings
                await _refused(c, "plan/estimate", {"model": "tiny", **extra}, reason)
        assert (await c.request("train/list"))["jobs"] == []  # refused before any job was made
        plan = await c.request("plan/estimate", {"model": "tiny", "lora": {"layers": [1], "r": 4}})
        assert plan["loraParameters"] > 0
        # lone surrogates are no text: -32602 naming the field, not an internal error
        await _refused(c, "generate", {"model": "tiny", "prompt": "\ud800 x", "maxTokens": 2},
                       "params.prompt: not valid Unicode text: a lone surrogate")
        await _refused(c, "generate", {"model": "tiny", "messages": [{"role": "user", "content": "hi \udc00"}],
                                       "maxTokens": 2}, "params.messages[0].content: not valid Unicode text")
        out = await c.request("generate", {"model": "tiny", "prompt": "hello \U0001F600", "maxTokens": 2})
        assert out["tokens"] >= 1
    finally:
        await c.close()


@pytest.mark.parametrize("server", TRANSPORTS, indirect=True)
def test_bad_settings_layers_and_surrogates_answer_invalid_params(server, tiny_model, dataset):
    transport, home, d = server
    run(_bad_settings(transport, home, d, tiny_model, dataset))


def _frame(obj: dict, length: int | None = None) -> bytes:
    body = json.dumps(obj).encode()
    return b"Content-Length: %d\r\n\r\n" % (len(body) if length is None else length) + body


def test_stdio_resynchronizes_after_a_wrong_content_length(home):
    """A frame whose Content-Length is too short, too long or not a number is answered with -32700, and the
    requests after it are answered (they were swallowed before)."""
    async def go():
        c = await AsyncClient.spawn_stdio(env=env_for(home))
        try:
            assert c.proc is not None and c.proc.stdin is not None
            bad = {"jsonrpc": "2.0", "id": 100, "method": "model/list", "params": {"x": "y" * 10}}
            assert len(json.dumps(bad)) > 10
            c.proc.stdin.write(_frame(bad, 10))  # too short: the rest of the body is left in the stream
            assert await c.request("model/list", timeout=30) == {"models": []}
            c.proc.stdin.write(b"Content-Length: ten\r\n\r\n{}")
            assert await c.request("model/list", timeout=30) == {"models": []}
            # too long: the body runs into the next frame; both requests are still answered
            nxt = _frame({"jsonrpc": "2.0", "id": 101, "method": "model/list"})
            c.proc.stdin.write(_frame({"jsonrpc": "2.0", "id": 102, "method": "model/list"}, 60) + nxt)
            assert await c.request("model/list", timeout=30) == {"models": []}
            errors = [m["error"]["message"] for m in c.notifications if "error" in m]
            assert len(errors) == 2 and "invalid JSON" in errors[0] and "bad LSP header" in errors[1], errors
            answered = {m["id"] for m in c.notifications if "result" in m}
            assert answered == {101, 102}, c.notifications
            assert not any(m.get("id") == 100 for m in c.notifications)
        finally:
            await c.close()
    run(go())


def _adapter_files(home) -> dict[str, bytes]:
    d = home / "adapters" / "mine"
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


async def _diverges(home, d, tiny_model, data):
    from safetensors.numpy import load_file

    c = await d.client()
    try:
        await c.request("model/load", {"source": str(tiny_model), "name": "tiny"})
        base = {"model": "tiny", "dataset": str(data), "adapter": "mine", "seqLen": 32}
        good = await c.request("train/start", {**base, "steps": 3}, timeout=120)
        assert good["state"] == "completed"
        before = _adapter_files(home)
        # in range, yet each step multiplies the weights by 1 - lr x weightDecay = -9: the loss overflows
        wild = {**base, "steps": 20, "overwrite": True, "optimizer": {"lr": 1.0, "weightDecay": 10},
                "maxGradNorm": None, "schedule": "constant", "checkpointEvery": 5}
        job = await c.request("train/start", wild, timeout=120)
        assert job["state"] == "failed", job
        m = re.match(r"diverged at step (\d+): the (loss|gradient norm) is (nan|inf|-inf);", job["error"])
        assert m is not None and "resume it with a lower learning rate" in job["error"], job["error"]
        at = int(m.group(1))
        assert job["resumable"] and 0 < job["step"] < at - 1 and job["step"] % 5 == 0, job
        assert _adapter_files(home) == before  # overwrite: true, yet the good adapter is still there, unchanged
        run_dir = home / "checkpoints" / job["jobId"]
        kept = sorted(p for p in run_dir.iterdir() if p.name.startswith("step-") and "." not in p.name)
        assert kept and kept[-1].name == f"step-{job['step']:08d}"
        for ck in kept:  # whatever is resumable is finite
            assert all(np.isfinite(a).all() for a in load_file(str(ck / "state.safetensors")).values() if a.dtype.kind == "f")
        listed = {j["jobId"]: j for j in (await c.request("train/list"))["jobs"]}
        assert listed[job["jobId"]]["resumable"] and listed[job["jobId"]]["error"] == job["error"]
        # resumed from that checkpoint with a lower lr, the run completes and writes the adapter
        done = await c.request("train/resume", {"jobId": job["jobId"], "lr": 1e-3}, timeout=120)
        assert done["state"] == "completed" and done["step"] == 20 and done["error"] is None, done
        after = load_file(str(home / "adapters" / "mine" / "adapter_model.safetensors"))
        assert all(np.isfinite(a).all() for a in after.values())
    finally:
        await c.close()


@pytest.mark.parametrize("server", ["ws"], indirect=True)
def test_a_diverging_run_fails_with_its_step_and_never_overwrites_the_adapter(server, tiny_model, dataset):
    transport, home, d = server
    run(_diverges(home, d, tiny_model, dataset), timeout=300)


async def _big_data(home, d, tiny_model, tmp):
    c = await d.client()
    try:
        await c.request("model/load", {"source": str(tiny_model), "name": "tiny"})
        # a 2 GiB file (sparse: only its size is looked at) is refused as a problem naming the limit, never read
        vast = tmp / "vast.jsonl"
        with open(vast, "wb") as f:
            f.truncate(2 << 30)
        info = await c.request("dataset/inspect", {"model": "tiny", "path": str(vast)}, timeout=30)
        assert info["examples"] == 0 and len(info["problems"]) == 1, info
        assert "too_big" in info["problems"][0]["message"] and "limit of 256.0 MiB" in info["problems"][0]["message"]
        # one 5 MB line: refused as a problem naming the line and the limit, without tokenizing it
        huge = tmp / "huge.jsonl"
        huge.write_text(json.dumps({"text": "word " * (1 << 20)}) + "\n" + json.dumps({"text": "hello world"}) + "\n")
        info = await c.request("dataset/inspect", {"model": "tiny", "path": str(huge)}, timeout=30)
        assert info["examples"] == 1 and [q["line"] for q in info["problems"]] == [1], info["problems"]
        assert "too_big: a line of 5.0 MiB is over the limit of 1.0 MiB" in info["problems"][0]["message"]
        only = tmp / "only.jsonl"
        only.write_text(json.dumps({"text": "word " * (1 << 20)}) + "\n")
        with pytest.raises(RpcError) as e:
            await c.request("train/start", {"model": "tiny", "dataset": str(only), "adapter": "x", "steps": 1}, timeout=30)
        assert e.value.code == -32057 and "over the limit of 1.0 MiB" in e.value.message, e.value.message
        # a long read runs off the model's queue: a generate sent while it runs is answered before it ends
        big = tmp / "big.jsonl"
        row = json.dumps({"text": "the quick brown fox jumps over the lazy dog. hello world, this is a tiny tokenizer " * 8})
        with open(big, "w") as f:
            for _ in range(12000):
                f.write(row + "\n")
        reports = []
        c.on_notification = lambda m: reports.append(m) if m["method"] == "$/progress" else None
        reading = asyncio.ensure_future(c.request("dataset/inspect", {"model": "tiny", "path": str(big),
                                                                      "workDoneToken": "read-1"}, timeout=120))
        while not any(r["params"]["value"]["kind"] == "report" for r in reports):  # the read is under way
            await asyncio.sleep(0.02)
            assert not reading.done(), reading.result()
        out = await c.request("generate", {"model": "tiny", "prompt": "hello", "maxTokens": 2}, timeout=60)
        assert out["tokens"] >= 1 and not reading.done()
        info = await reading
        assert info["examples"] == 12000 and not info["problems"]
        kinds = [r["params"]["value"]["kind"] for r in reports]
        assert kinds[0] == "begin" and kinds[-1] == "end" and "MiB" in reports[1]["params"]["value"]["message"]
    finally:
        await c.close()


def test_big_data_is_bounded_and_read_off_the_model_queue(home, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the daemon's token cache: this test's own
    d = Daemon(home)
    try:
        run(_big_data(home, d, tiny_model, tmp_path), timeout=300)
    finally:
        d.stop()
        d.log.close()
    assert any((tmp_path / "cache" / "loralab" / "tokens").iterdir())  # the cache was this test's (a hit: no long read)
