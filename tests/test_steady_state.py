"""In steady state the WebGPU engine creates nothing: no buffer, bind group, shader module or pipeline per
training step or per generate request. Counted at the device (every create_* call the runtime makes goes
through it), on lavapipe in CI."""

from __future__ import annotations

import numpy as np
import pytest

from loralabd.engine.interface import OptimSettings
from loralabd.engine.lora import LoraAdapter, LoraConfig
from loralabd.generation import GenerationService
from loralabd.models.random import random_model, tiny_args
from loralabd.training.packing import Batch

wgpu_rt = pytest.importorskip("loralabd.engine.webgpu.runtime")
pytestmark = pytest.mark.gpu

CREATES = ("create_buffer", "create_buffer_with_data", "create_bind_group", "create_bind_group_layout",
           "create_pipeline_layout", "create_compute_pipeline", "create_shader_module")


class CountingDevice:
    """The wgpu device, with every creation counted by kind."""

    def __init__(self, device):
        self._device = device
        self.counts = dict.fromkeys(CREATES, 0)

    def __getattr__(self, name):
        attr = getattr(self._device, name)
        if name in CREATES:
            def counted(*a, **k):
                self.counts[name] += 1
                return attr(*a, **k)
            return counted
        return attr

    def total(self) -> int:
        return sum(self.counts.values())


@pytest.fixture
def counting():
    if not wgpu_rt.available():
        pytest.skip("no WebGPU adapter (install mesa-vulkan-drivers for lavapipe)")
    rt = wgpu_rt.get_runtime()
    real = rt.device
    rt.device = CountingDevice(real)
    try:
        yield rt, rt.device
    finally:
        rt.device = real


def test_training_steps_create_nothing(counting):
    from loralabd.engine.webgpu.engine import WebGPUEngine

    rt, dev = counting
    args = tiny_args()
    eng = WebGPUEngine(random_model(args, seed=3))
    sess = eng.train_session(LoraAdapter.init(args, LoraConfig(r=4, alpha=8, dropout=0.1)),
                             OptimSettings(weight_decay=0.01))
    rng = np.random.default_rng(0)

    def step():
        sess.step([Batch.of(rng.integers(0, args.vocab_size, (2, 32))) for _ in range(2)], 1e-3, 1.0)

    for _ in range(2):  # warm-up: programs, inputs, optimizer, metrics ring, staging
        step()
    sess.metrics()
    before = dict(dev.counts)
    for i in range(10):
        step()
        if i % 3 == 2:
            assert len(sess.metrics()) == 3  # a read at report cadence
    got = sess.metrics()
    assert len(got) == 1 and np.isfinite(got[0].loss)
    assert dev.counts == before, {k: dev.counts[k] - before[k] for k in CREATES if dev.counts[k] != before[k]}
    assert dev.total() > 0  # the counter does see the warm-up's creations
    sess.close()
    eng.close()


def test_generate_requests_create_nothing(counting):
    from loralabd.engine.webgpu.engine import WebGPUEngine

    rt, dev = counting
    args = tiny_args()
    eng = WebGPUEngine(random_model(args, seed=4))
    ad = LoraAdapter.init(args, LoraConfig(r=4, alpha=8), seed=1)
    svc = GenerationService(eng)
    kw = dict(max_tokens=20, stop_ids=[])
    svc.generate(prompt_ids=[1, 2, 3], **kw)  # the first requests build the arena and programs
    svc.generate(prompt_ids=[1, 2, 3], adapters=[(ad, 1.0)], **kw)
    before = dict(dev.counts)
    for i in range(10):
        prompt = [int(t) for t in np.random.default_rng(i).integers(0, args.vocab_size, 3 + 2 * i)]
        g = svc.generate(prompt_ids=prompt, adapters=[(ad, 1.0)] if i % 2 else [], temperature=0.7 * (i % 3),
                         top_k=5 * (i % 2), top_p=0.9, seed=i, **kw)
        assert len(g.token_ids) == 20
    assert dev.counts == before, {k: dev.counts[k] - before[k] for k in CREATES if dev.counts[k] != before[k]}
    eng.close()
