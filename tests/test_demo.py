"""The demo: a few CPU minutes of LoRA on the shipped pirate dataset teach the default model its voice.

Measured margins are in docs/training.md; this test asserts the stated one."""

import json

import pytest

from loralabd.engine.numpy_engine import NumpyEngine
from loralabd.training import Dataset
from loralabd.training.demo import DEMO_CONFIG, MARKER, answer, demo_dir, run_demo
from loralabd.training.demo import test_prompts as held_out_prompts

VAL_MARGIN = 1.0  # held-out loss must fall by at least this many nats (docs/training.md)


def test_demo_dataset_is_clean(default_model):
    d = demo_dir()
    ds = Dataset.load(d, default_model.tokenizer, max_seq_len=DEMO_CONFIG["seq_len"], cache_dir=False)
    assert ds.problems == [] and ds.format == "chat"
    assert len(ds.train) == 80 and len(ds.valid) == 12
    prompts = held_out_prompts()
    seen = set()
    for f in ("train.jsonl", "valid.jsonl"):
        for line in (d / f).read_text().splitlines():
            msgs = json.loads(line)["messages"]
            seen.add(msgs[0]["content"])
            assert msgs[-1]["content"].startswith(MARKER)
    assert len(prompts) >= 5 and not seen & set(prompts)  # test prompts are held out


@pytest.mark.slow
def test_demo_teaches_the_behaviour(default_model):
    engine = NumpyEngine(default_model)
    base = [answer(engine, p, None, max_tokens=8) for p in held_out_prompts()]
    assert not any("Ahoy" in b or "matey" in b for b in base), base  # the base model never talks like this
    r = run_demo(engine=engine, max_tokens=8)
    assert [a["base"] for a in r["answers"]] == base
    assert r["val_loss_start"] - r["val_loss_end"] >= VAL_MARGIN, (r["val_loss_start"], r["val_loss_end"])
    tuned = [a["adapter"] for a in r["answers"]]
    assert all(t.startswith(MARKER) for t in tuned), tuned
