"""The default model (SmolLM2-135M-Instruct Q4_1) through the daemon: load, plan, chat."""

from __future__ import annotations

import json

import pytest

from daemon_helpers import Daemon, home, run  # noqa: F401


@pytest.mark.slow
def test_default_model_chat(home, default_model_path):
    d = Daemon(home)
    try:
        async def go():
            c = await d.client()
            m = await c.request("model/load", {})
            assert m["id"] == "default" and m["numLayers"] == 30 and m["vocabSize"] == 49152
            assert m["name"] == "SmolLM2-135M-Instruct"  # what the VS Code panel shows
            assert 60e6 < m["weightBytes"] < 140e6  # the Q4_1 file's tensors, ~98 MB
            plan = await c.request("plan/estimate", {"model": "default", "batchSize": 4, "seqLen": 256})
            assert plan["memory"]["weights"] >= m["weightBytes"] and plan["loraParameters"] > 0
            s = c.stream("generate", {"model": "default", "maxTokens": 12, "messages": [
                {"role": "user", "content": "What is the capital of France?"}]})
            text = "".join([ev["text"] async for ev in s])
            r = await s.result()
            # a 2-step adapter on the demo data: exports name the base by its Hugging Face id, so that
            # AutoPeftModelForCausalLM / mlx_lm fetch the right model (not one called "default")
            from loralabd.training.demo import demo_dir

            job = await c.request("train/start", {"model": "default", "adapter": "d", "dataset": str(demo_dir()),
                                                  "steps": 2, "batchSize": 1, "seqLen": 128})
            assert job["state"] == "completed"
            peft = await c.request("adapter/export", {"adapter": "d", "format": "peft"})
            cfg = json.loads(open([f for f in peft["files"] if f.endswith("adapter_config.json")][0]).read())
            assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
            mlx = await c.request("adapter/export", {"adapter": "d", "format": "mlx"})
            mcfg = json.loads(open([f for f in mlx["files"] if f.endswith(".json")][0]).read())
            assert mcfg["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
            await c.close()
            return text, r
        text, r = run(go(), timeout=300)
        assert r["text"] == text and r["text"].startswith("The capital of France is Paris"), r
    finally:
        d.stop()
