"""The demo: teach the default model to answer as a pirate ("Ahoy, matey! ... Arr!") in a few CPU minutes,
then show the base model's and the adapter's answers to held-out prompts side by side."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .packing import Dataset
from .trainer import TrainConfig, Trainer

if TYPE_CHECKING:
    from ..engine.interface import Engine

MARKER = "Ahoy, matey!"  # every demo answer starts with it; the base model never does

# 22 steps; measured on SmolLM2-135M-Instruct in docs/training.md (a few CPU minutes on the numpy engine).
DEMO_CONFIG: dict[str, Any] = dict(r=8, alpha=16, lr=2e-3, lr_schedule="cosine", warmup_steps=2, seq_len=128,
                                   batch_size=2, grad_accum=1, epochs=1, eval_every=0, max_grad_norm=1.0, seed=0)


def demo_dir() -> Path:
    return Path(str(resources.files("loralabd") / "data" / "demo"))


def test_prompts() -> list[str]:
    lines = (demo_dir() / "test.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x)["prompt"] for x in lines if x.strip()]


def answer(engine: Engine, prompt: str, adapter=None, max_tokens: int = 48) -> str:
    """Greedy reply to one user message with the model's chat template."""
    from ..generation import GenerationService

    g = GenerationService(engine).generate(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                           temperature=0.0, seed=0, adapters=[(adapter, 1.0)] if adapter else [])
    return g.text.strip()


def run_demo(model=None, engine=None, on_step=None, run_dir=None, max_tokens: int = 48, **overrides) -> dict:
    """Train on the demo data, then answer the held-out prompts with and without the adapter.
    model: a LoadedModel (None: the default model); engine: any engine with train_session (None: numpy);
    on_step(metrics) is called after each optimizer step (return False to stop early)."""
    if engine is None:
        from ..engine.numpy_engine import NumpyEngine
        from ..models import load_model

        engine = NumpyEngine(model if model is not None else load_model())
    cfg = TrainConfig(**{**DEMO_CONFIG, **overrides})
    ds = Dataset.load(demo_dir(), engine.model.tokenizer, max_seq_len=cfg.seq_len)
    tr = Trainer(engine, ds, cfg, run_dir=run_dir)
    start = tr.evaluate()
    history = tr.run(on_step)
    end = history[-1] if history else {}
    adapter = tr.adapter()
    answers = [{"prompt": p, "base": answer(engine, p, None, max_tokens), "adapter": answer(engine, p, adapter, max_tokens)}
               for p in test_prompts()]
    return {"val_loss_start": start.get("val_loss"), "val_loss_end": end.get("val_loss"), "history": history,
            "answers": answers, "adapter": adapter, "trainer": tr}
