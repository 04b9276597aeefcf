"""The real daemon as a subprocess; the same cases over stdio (LSP framing) and over the websocket."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from daemon_helpers import Daemon, connect, dataset, home, run, server, tiny_model  # noqa: F401 (fixtures)
from loralabd.client import RpcError

TRANSPORTS = ["stdio", "ws"]


async def _session(transport, home, d, tiny_model, dataset):
    c = await connect(transport, home, d)
    try:
        init = await c.initialize("pytest")
        assert init["serverInfo"]["name"] == "loralabd" and "generate" in init["loralab"]["methods"]
        m = await c.request("model/load", {"source": str(tiny_model), "name": "tiny"})
        assert m["numLayers"] == 2 and m["hiddenSize"] == 64 and m["weightBytes"] > 0
        assert [x["id"] for x in (await c.request("model/list"))["models"]] == ["tiny"]

        plan = await c.request("plan/estimate", {"model": "tiny", "batchSize": 2, "seqLen": 32, "lora": {"r": 4}})
        mem = plan["memory"]
        assert mem["weights"] >= m["weightBytes"]  # at least the loaded model's real tensor bytes
        # r=4 on all 7 projections of 2 layers: r * (in + out) each, f32
        n = 2 * 4 * ((64 + 64) + (32 + 64) * 2 + (64 + 64) + (64 + 160) * 2 + (160 + 64))
        assert plan["loraParameters"] == n and mem["lora"] == 4 * n
        assert mem["total"] >= mem["weights"] and plan["tokensPerStep"] == 64, plan

        info = await c.request("dataset/inspect", {"path": str(dataset), "model": "tiny", "seqLen": 64})
        assert info["examples"] == 24 and info["tokens"] > 24 and info["problems"] == []
        L = info["lengths"]
        assert 0 < L["min"] <= L["median"] <= L["max"] <= 64 and L["overSeqLen"] == 0 and info["validation"] is None
        # a folder in MLX-LM's layout: train and validation counted apart; a short seqLen counts what it truncates
        split = dataset.parent / "split"
        split.mkdir()
        rows = dataset.read_text().splitlines()
        (split / "train.jsonl").write_text("\n".join(rows[:18]) + "\n")
        (split / "valid.jsonl").write_text("\n".join(rows[18:]) + "\n")
        both = await c.request("dataset/inspect", {"path": str(split), "model": "tiny", "seqLen": 64})
        assert both["examples"] == 18 and both["validation"]["examples"] == 6
        assert both["tokens"] + both["validation"]["tokens"] == info["tokens"]
        short = await c.request("dataset/inspect", {"path": str(dataset), "model": "tiny", "seqLen": 8})
        assert short["lengths"]["max"] == 8 and short["lengths"]["overSeqLen"] == 24

        # train with progress
        s = c.stream("train/start", {"model": "tiny", "dataset": str(dataset), "adapter": "a1", "steps": 4,
                                     "batchSize": 2, "seqLen": 32, "lora": {"r": 4}, "optimizer": {"lr": 1e-2}})
        events = [ev async for ev in s]
        job = await s.result()
        assert job["state"] == "completed" and job["step"] == 4 and math.isfinite(job["loss"])
        kinds = [e["kind"] for e in events]
        assert kinds[0] == "begin" and kinds[-1] == "end" and "report" in kinds
        assert events[-1]["train"]["step"] == 4 and events[-1]["train"]["tokensSeen"] > 0

        # generate with streaming; the deltas are the text
        g = c.stream("generate", {"model": "tiny", "prompt": "the quick brown", "maxTokens": 12, "adapter": "a1"})
        deltas = [ev async for ev in g]
        res = await g.result()
        assert res["tokens"] >= 1 and res["adapter"] == "a1" and res["adapterStep"] == 4
        assert "".join(d["text"] for d in deltas) == res["text"]
        # same request without streaming gives the same greedy text
        res2 = await c.request("generate", {"model": "tiny", "prompt": "the quick brown", "maxTokens": 12, "adapter": "a1"})
        assert res2["text"] == res["text"]

        # evaluate: the base model and the trained adapter on the same data, without a training job
        before = await c.request("evaluate", {"model": "tiny", "dataset": str(dataset), "seqLen": 32})
        after = await c.request("evaluate", {"model": "tiny", "dataset": str(dataset), "seqLen": 32, "adapter": "a1"})
        assert before["tokens"] == after["tokens"] > 0 and before["examples"] == 24
        assert abs(before["perplexity"] - math.exp(before["loss"])) <= 1e-6 * before["perplexity"]
        assert after["adapter"] == "a1" and after["adapterStep"] == 4 and after["loss"] != before["loss"]
        # the adapter at scale 0 is the base model
        zero = await c.request("evaluate", {"model": "tiny", "dataset": str(dataset), "seqLen": 32, "adapter": "a1",
                                            "adapterScale": 0.0})
        assert abs(zero["loss"] - before["loss"]) <= 1e-6 * before["loss"]

        # export: PEFT keys and shapes
        ex = await c.request("adapter/export", {"adapter": "a1", "format": "peft"})
        from safetensors.numpy import load_file

        st = [f for f in ex["files"] if f.endswith(".safetensors")][0]
        t = load_file(st)
        assert t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
        assert t["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 4)
        assert np.abs(t["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]).max() > 0  # trained
        cfg = json.loads(open([f for f in ex["files"] if f.endswith(".json")][0]).read())
        assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
        assert [a["name"] for a in (await c.request("adapter/list"))["adapters"]] == ["a1"]
        # a PEFT directory comes back in as a stored adapter that answers as the original does
        imp = await c.request("adapter/import", {"path": ex["path"], "name": "a1-copy", "model": "tiny"})
        assert imp["name"] == "a1-copy" and imp["r"] == 4
        q = {"model": "tiny", "prompt": "the quick brown", "maxTokens": 12}
        assert (await c.request("generate", {**q, "adapter": "a1-copy"}))["text"] == res2["text"]
        with pytest.raises(RpcError, match="exists"):
            await c.request("adapter/import", {"path": ex["path"], "name": "a1-copy", "model": "tiny"})
        # merged into its base: a Hugging Face directory
        mg = await c.request("adapter/export", {"adapter": "a1", "format": "merged"})
        assert {"model.safetensors", "config.json"} <= {f.rsplit("/", 1)[-1] for f in mg["files"]}
        gg = await c.request("adapter/export", {"adapter": "a1", "format": "gguf", "path": str(home / "out" / "a1")})
        assert gg["path"].endswith("a1.gguf") and gg["files"] == [gg["path"]]  # llama.cpp wants the extension

        # cancel: a long run stops between steps, answers -32800, is checkpointed and resumable
        s = c.stream("train/start", {"model": "tiny", "dataset": str(dataset), "adapter": "a2", "steps": 10000,
                                     "batchSize": 2, "seqLen": 32, "lora": {"r": 4}})
        async for ev in s:
            if ev["kind"] == "report":
                await s.cancel()
                break
        with pytest.raises(RpcError) as ei:
            await s.result()
        assert ei.value.code == -32800
        jobs = (await c.request("train/list"))["jobs"]
        j2 = [j for j in jobs if j["adapter"] == "a2"][0]
        assert j2["state"] == "cancelled" and j2["resumable"] and 1 <= j2["step"] < 10000

        # the daemon still serves after all that
        assert (await c.request("train/status", {"jobId": j2["jobId"]}))["state"] == "cancelled"
        await c.request("shutdown")
        await c.notify("exit")
    finally:
        await c.close()
    if transport == "stdio":
        assert c.proc.returncode == 0


@pytest.mark.parametrize("server", TRANSPORTS, indirect=True)
def test_session(server, tiny_model, dataset):
    transport, home, d = server
    run(_session(transport, home, d, tiny_model, dataset), timeout=300)


async def _bad_input(transport, home, d):
    c = await connect(transport, home, d)
    try:
        async def err(method, params):
            with pytest.raises(RpcError) as ei:
                await c.request(method, params)
            return ei.value

        e = await err("generate", {"model": 5})
        assert e.code == -32602 and "params.model: expected string" in e.message
        e = await err("train/start", {"model": "m", "dataset": "d", "steps": 3})
        assert e.code == -32602 and "params.adapter: required field is missing" in e.message
        e = await err("train/start", {"model": "m", "dataset": "d", "adapter": "x", "steps": 1, "lora": {"r": 0}})
        assert e.code == -32602 and "params.lora.r: must be >= 1" in e.message
        e = await err("generate", {"model": "m", "bogus": 1})
        assert e.code == -32602 and "unknown field 'bogus'" in e.message
        e = await err("model/list", [1, 2])
        assert e.code == -32602
        e = await err("no/such", {})
        assert e.code == -32601 and "no/such" in e.message
        e = await err("generate", {"model": "nope", "prompt": "x"})
        assert e.code == -32050 and "model/load" in e.message  # domain error says what to do
        e = await err("train/status", {"jobId": "nope"})
        assert e.code == -32055 and "train/list" in e.message
        e = await err("model/load", {"source": "/definitely/not/here.gguf"})
        assert e.code == -32051 and "/definitely/not/here.gguf" in e.message

        # malformed envelopes: answered with id null (or the id), never a crash
        for raw, code in [({"jsonrpc": "1.0", "id": 77, "method": "model/list"}, -32600), ([1, 2], -32600),
                          ({"jsonrpc": "2.0", "id": {"a": 1}, "method": "x"}, -32600), (42, -32600)]:
            n = len(c.notifications)
            await c.send_raw(raw)
            for _ in range(100):
                if len(c.notifications) > n:
                    break
                await __import__("asyncio").sleep(0.02)
            assert c.notifications[-1]["error"]["code"] == code
        # invalid JSON
        n = len(c.notifications)
        if transport == "ws":
            await c.ws.send("{not json")
        else:
            body = b"{not json"
            c.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await c.proc.stdin.drain()
        for _ in range(100):
            if len(c.notifications) > n:
                break
            await __import__("asyncio").sleep(0.02)
        assert c.notifications[-1]["error"]["code"] == -32700
        # nesting deeper than Python's json parser allows (RecursionError), and deep but parseable params
        for raw, code in [("[" * 100000 + "]" * 100000, -32700),
                          ('{"jsonrpc":"2.0","id":"deep","method":"generate","params":{"model":"m","messages":'
                           + "[" * 500 + "]" * 500 + "}}", -32602)]:
            n = len(c.notifications)
            if transport == "ws":
                await c.ws.send(raw)
            else:
                body = raw.encode()
                c.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
                await c.proc.stdin.drain()
            for _ in range(200):
                if len(c.notifications) > n:
                    break
                await __import__("asyncio").sleep(0.02)
            assert c.notifications[-1]["error"]["code"] == code, c.notifications[-1]
        # unknown notifications are ignored; the daemon still answers
        await c.notify("$/setTrace", {"value": "off"})
        await c.notify("workspace/didChangeConfiguration", {"settings": {}})
        assert (await c.request("model/list")) == {"models": []}
    finally:
        await c.close()


@pytest.mark.parametrize("server", TRANSPORTS, indirect=True)
def test_bad_input(server):
    transport, home, d = server
    run(_bad_input(transport, home, d))


async def _oversized_ws(d):
    """The socket that sent a too-big frame is closed (1009); the daemon and other clients carry on."""
    big = "x" * (2 * 1024 * 1024)
    c = await d.client()
    try:
        with pytest.raises(ConnectionError):
            await c.request("generate", {"model": "m", "prompt": big})
        c2 = await d.client()
        assert (await c2.request("model/list")) == {"models": []}
        await c2.close()
    finally:
        await c.close()


@pytest.mark.parametrize("server", TRANSPORTS, indirect=True)
def test_oversized_message(server):
    transport, home, d = server
    # a 1 MB limit makes "oversized" cheap to send
    if d is not None:
        d.stop()
        d = Daemon(home, "--max-message-mb", "1")
    try:
        run(_oversized_ws(d) if transport == "ws" else _oversized_stdio(home))
    finally:
        if d is not None:
            d.stop()


async def _oversized_stdio(home):
    """Framing survives: the body is skipped in chunks and answered -32600; the next request works."""
    from daemon_helpers import env_for
    from loralabd.client import AsyncClient
    import sys

    c = await AsyncClient.spawn_stdio([sys.executable, "-m", "loralabd.server.main", "--stdio", "--max-message-mb", "1"],
                                      env=env_for(home))
    try:
        big = "x" * (2 * 1024 * 1024)
        fut = __import__("asyncio").ensure_future(c.request("generate", {"model": "m", "prompt": big}))
        for _ in range(250):
            if c.notifications and "error" in c.notifications[-1]:
                break
            await __import__("asyncio").sleep(0.02)
        assert "exceeds the limit" in c.notifications[-1]["error"]["message"]
        fut.cancel()
        assert (await c.request("model/list")) == {"models": []}
    finally:
        await c.close()


def test_vscode_languageclient_handshake(home):
    """The exact LSP lifecycle vscode-languageclient runs over stdio: initialize (full LSP params),
    initialized, $/setTrace, a request, shutdown, exit -> exit code 0."""
    from daemon_helpers import env_for
    from loralabd.client import AsyncClient

    valid = json.loads((__import__("pathlib").Path(__file__).resolve().parent.parent / "protocol" / "fixtures" /
                        "valid.json").read_text())
    init = valid[0]
    assert init["method"] == "initialize" and "capabilities" in init["params"]

    async def go():
        c = await AsyncClient.spawn_stdio(env=env_for(home))
        r = await c.request("initialize", init["params"])
        assert r["serverInfo"]["name"] == "loralabd" and isinstance(r["capabilities"], dict)
        await c.notify("initialized", {})
        await c.notify("$/setTrace", {"value": "verbose"})
        assert (await c.request("device/info"))["available"]
        assert await c.request("shutdown") is None
        await c.notify("exit")
        await c.close()
        return c.proc.returncode
    assert run(go()) == 0


def test_a_second_client_follows_a_running_job(home, tiny_model, dataset):  # noqa: F811
    """train/follow: another connection attaches to the job's progress and gets its end."""
    d = Daemon(home)
    try:
        async def go():
            a, b = await d.client(), await d.client()
            await a.request("model/load", {"source": str(tiny_model), "name": "m", "backend": "numpy"})
            job = await a.request("train/start", {"model": "m", "adapter": "f", "dataset": str(dataset), "steps": 100,
                                                  "batchSize": 2, "seqLen": 32, "wait": False})
            follow = b.stream("train/follow", {"jobId": job["jobId"]})
            seen = [v async for v in follow]
            done = await follow.result()
            assert done["state"] == "completed" and done["step"] == 100
            kinds = [v["kind"] for v in seen]
            assert kinds[0] == "begin" and kinds[-1] == "end", kinds
            assert all("targetsSeen" in v["train"] for v in seen if v["kind"] == "report")
            with pytest.raises(RpcError, match="not running"):
                await b.request("train/follow", {"jobId": job["jobId"], "workDoneToken": "follow-2"})
            await a.close()
            await b.close()
        run(go(), timeout=300)
    finally:
        d.stop()


def test_validation_packing_schedule_floor_and_kept_checkpoints_over_the_wire(home, tiny_model, dataset):  # noqa: F811
    """What the trainer can do is reachable from the protocol: a held-out validation fraction, packing off,
    the schedule's floor and how many checkpoints stay on disk."""
    d = Daemon(home)
    try:
        async def go():
            c = await d.client()
            await c.request("model/load", {"source": str(tiny_model), "name": "m", "backend": "numpy"})
            s = c.stream("train/start", {"model": "m", "adapter": "v", "dataset": str(dataset), "steps": 8,
                                         "batchSize": 2, "seqLen": 32, "validationFraction": 0.25, "pack": False,
                                         "minLrRatio": 0.5, "schedule": "linear", "checkpointEvery": 1,
                                         "keepLast": 2, "optimizer": {"lr": 1e-2}, "evalAtStart": True})
            reports = [v["train"] for v in [x async for x in s] if "train" in v]
            job = await s.result()
            await c.close()
            return job, reports
        job, reports = run(go(), timeout=300)
        assert job["state"] == "completed" and job["step"] == 8
        assert reports[0]["step"] == 0 and reports[0]["valLoss"] is not None  # before training (evalAtStart)
        assert reports[-1]["valLoss"] is not None  # evaluated at the end on the held-out quarter
        assert reports[-1]["valLoss"] < reports[0]["valLoss"]
        assert min(r["lr"] for r in reports) >= 0.5e-2 * (1 - 1e-6)  # the floor
        kept = sorted(home.rglob(f"{job['jobId']}/step-*"))
        assert [k.name for k in kept] == ["step-00000007", "step-00000008"], kept
    finally:
        d.stop()
