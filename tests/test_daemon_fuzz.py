"""Nothing a client sends crashes the daemon: the invalid fixtures and a hypothesis fuzz of request params,
against the real daemon over the websocket."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from daemon_helpers import Daemon, home, run, tiny_model  # noqa: F401
from loralabd.client import RpcError
from loralabd.protocol import REQUESTS
from loralabd.protocol.types import STRUCTURES

FIX = Path(__file__).resolve().parent.parent / "protocol" / "fixtures"
KNOWN = {e["code"] for e in json.loads((FIX.parent / "protocol.json").read_text())["errors"]}
# shutdown would (rightly) stop the daemon taking requests; model/load with no source loads the 98 MB default
METHODS = sorted(m for m in REQUESTS if m not in ("shutdown",))

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False, allow_infinity=False),
                      st.text(max_size=12))
json_any = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
                        max_leaves=12)


def field_names(method):
    t = REQUESTS[method]["params"]
    if not t or t["kind"] != "reference" or t["name"] not in STRUCTURES:
        return ["x"]
    return [p["name"] for p in STRUCTURES[t["name"]]["properties"]] + ["bogus"]


@st.composite
def requests(draw):
    m = draw(st.sampled_from(METHODS))
    params = draw(st.one_of(json_any, st.dictionaries(st.sampled_from(field_names(m)), json_any, max_size=6)))
    if isinstance(params, dict):
        if "model" in params and draw(st.booleans()):
            params["model"] = "m"  # the loaded model: reach the handlers, not just ModelNotLoaded
        for k in ("path", "dataset", "source"):  # never point the daemon at real folders of this machine
            if isinstance(params.get(k), str):
                params[k] = "/nonexistent/" + params[k]
        if m == "model/load" and not isinstance(params.get("source"), str):
            params["source"] = "/nonexistent/model"
        if isinstance(params.get("maxTokens"), int):
            params["maxTokens"] = min(abs(params["maxTokens"]), 64) or 1
        if isinstance(params.get("steps"), int):
            params["steps"] = min(abs(params["steps"]), 2) or 1
    return m, params


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory, tiny_model):
    h = tmp_path_factory.mktemp("fuzzhome")
    d = Daemon(h)

    async def load():
        c = await d.client()
        await c.request("model/load", {"source": str(tiny_model), "name": "m"})
        await c.close()
    run(load())
    yield d
    d.stop()


def test_invalid_fixtures_over_the_wire(fuzz_daemon):
    async def go():
        c = await fuzz_daemon.client()
        try:
            for case in json.loads((FIX / "invalid.json").read_text()):
                n = len(c.notifications)
                await c.send_raw(case["message"])
                for _ in range(500):
                    if len(c.notifications) > n:
                        break
                    await asyncio.sleep(0.01)
                reply = c.notifications[-1]
                assert len(c.notifications) == n + 1 and reply["error"]["code"] == case["code"], (case, reply)
            assert (await c.request("model/list"))["models"][0]["id"] == "m"
        finally:
            await c.close()
    run(go())
    assert fuzz_daemon.alive()


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(reqs=st.lists(requests(), min_size=1, max_size=4))
def test_fuzz_request_params(fuzz_daemon, reqs):
    async def go():
        c = await fuzz_daemon.client()
        try:
            for m, params in reqs:
                try:
                    await c.request(m, params, timeout=60)
                except RpcError as e:
                    assert e.code in KNOWN, (m, params, e)
                    assert e.code != -32603, f"internal error for {m} {params}: {e.message}"
        finally:
            await c.close()
    run(go())
    assert fuzz_daemon.alive()
