"""LoRA training speed on CPU: our numpy and WebGPU (lavapipe) train sessions vs PyTorch + PEFT (fp32), same config.

The default model (SmolLM2-135M-Instruct; transformers reads the same GGUF, dequantized to f32),
LoRA r=8 alpha=16 on all 7 linear projections, AdamW, clipping at 1.0, batch x seq random tokens.
Each side runs `--warmup` optimizer steps, then `--steps` timed ones; tokens/s = batch*seq / median step.

    .venv/bin/python benchmarks/bench_train_cpu.py [--batch 1] [--seq 256] [--steps 3] [--threads 2]
                                                   [--only numpy|webgpu|torch] [--profile-by-op]

--profile-by-op: after the numpy engine's timed steps, one more step with a timer on each CPU kernel
(engine/cpu_ops.py, engine/cpu_layer.py), printed as thread-seconds per op (summed over the engine's threads;
proj/proj_back include the matmuls they make).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--threads" in sys.argv:  # OpenBLAS reads its thread count when numpy is first imported
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = sys.argv[sys.argv.index("--threads") + 1]

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loralabd.engine.lora import LoraAdapter, LoraConfig  # noqa: E402
from loralabd.engine.numpy_engine import NumpyEngine  # noqa: E402
from loralabd.models import LINEAR_NAMES, default_model_path, load_model  # noqa: E402


def batches(n, batch, seq, vocab, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        t = rng.integers(0, vocab, size=(batch, seq + 1))
        yield t[:, :-1], t[:, 1:]


def bench_ours(eng, model, cfg, args):
    from loralabd.engine.interface import OptimSettings
    from loralabd.training.packing import Batch

    sess = eng.train_session(LoraAdapter.init(model.args, cfg, seed=0), OptimSettings(kind=args.optimizer))
    times, cpu, losses = [], [], []
    for i, (x, y) in enumerate(batches(args.warmup + args.steps, args.batch, args.seq, model.args.vocab_size)):
        t0, c0 = time.perf_counter(), time.process_time()
        sess.step([Batch.of(x, y)], 1e-4, 1.0)
        m = sess.metrics()[-1]  # the numpy engine's metrics are there at once
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        losses.append(m.loss)
    if args.profile_by_op and eng.backend == "numpy":
        profile_by_op(sess, args, model.args.vocab_size)
    return times, cpu, losses


def profile_by_op(sess, args, vocab):
    """Thread-seconds and calls per CPU kernel over one numpy training step."""
    import collections
    import functools
    import threading

    from loralabd.engine import cpu_layer, cpu_ops
    from loralabd.training.packing import Batch

    secs, calls, lock = collections.defaultdict(float), collections.Counter(), threading.Lock()
    ops = [(cpu_ops, n) for n in ("mm", "gemm_acc", "attention", "attention_backward", "cross_entropy_grad",
                                  "swiglu", "swiglu_backward", "rmsnorm", "rmsnorm_backward", "rope", "rope_backward")]
    ops += [(cpu_layer, "proj"), (cpu_layer, "proj_back")]
    originals = [(mod, name, getattr(mod, name)) for mod, name in ops]

    def timed(name, f):
        @functools.wraps(f)
        def g(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                with lock:
                    secs[name] += time.perf_counter() - t
                    calls[name] += 1
        return g

    for mod, name, f in originals:
        setattr(mod, name, timed(name, f))
    try:
        (x, y), = batches(1, args.batch, args.seq, vocab, seed=1)
        t0 = time.perf_counter()
        sess.step([Batch.of(x, y)], 1e-4, 1.0)
        wall = time.perf_counter() - t0
    finally:
        for mod, name, f in originals:
            setattr(mod, name, f)
    print(f"\nnumpy step by op ({args.batch} x {args.seq}, {wall:.2f} s wall; thread-seconds, summed over threads; "
          "proj/proj_back include their matmuls):")
    for name, sec in sorted(secs.items(), key=lambda kv: -kv[1]):
        print(f"  {name:20s} {sec:8.3f} s  {calls[name]:6d} calls")


def bench_torch(path, cfg, args):
    import torch
    from peft import LoraConfig as PeftConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    pm = get_peft_model(hf, PeftConfig(r=cfg.r, lora_alpha=cfg.alpha, target_modules=list(cfg.targets),
                                       lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times, cpu, losses = [], [], []
    for i, (x, y) in enumerate(batches(args.warmup + args.steps, args.batch, args.seq, hf.config.vocab_size)):
        t0, c0 = time.perf_counter(), time.process_time()
        logits = pm(input_ids=torch.from_numpy(x)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        losses.append(loss.item())
    return times, cpu, losses


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "adam8bit"])
    ap.add_argument("--only", choices=["numpy", "webgpu", "torch"], default=None)
    ap.add_argument("--profile-by-op", action="store_true", help="one more numpy step, timed per CPU kernel")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    cfg = LoraConfig(r=8, alpha=16, targets=LINEAR_NAMES)
    rows = []
    tok = args.batch * args.seq
    model = load_model()
    for backend in ("numpy", "webgpu"):
        if args.only not in (None, backend):
            continue
        if backend == "numpy":
            eng, name = NumpyEngine(model), "numpy"
        else:  # the WebGPU engine on whatever adapter this machine has (lavapipe on a CPU-only box)
            from loralabd.engine.webgpu.engine import WebGPUEngine
            from loralabd.engine.webgpu.runtime import get_runtime

            eng, name = WebGPUEngine(model), f"webgpu on {get_runtime().info()['name']}"
        t, c, l0 = bench_ours(eng, model, cfg, args)
        rows.append({"backend": f"loralabd {name} ({args.optimizer})", "ms_per_step": 1000 * statistics.median(t),
                     "tokens_per_s": tok / statistics.median(t), "cpu_s_per_step": statistics.median(c),
                     "first_loss": l0[0]})
    if args.only in (None, "torch"):
        t, c, l1 = bench_torch(default_model_path(), cfg, args)
        rows.append({"backend": f"PyTorch {torch.__version__} + PEFT fp32", "ms_per_step": 1000 * statistics.median(t),
                     "tokens_per_s": tok / statistics.median(t), "cpu_s_per_step": statistics.median(c),
                     "first_loss": l1[0]})
    # CPU seconds per step are what a shared machine cannot inflate much; tokens per CPU-second x threads
    # is the speed an idle machine would show when the work scales over its threads.
    print(f"| backend | batch x seq | threads | ms/step | tokens/s | CPU s/step | tokens per CPU-s |   "
          f"(load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores)")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backend']} | {args.batch} x {args.seq} | {args.threads} | {r['ms_per_step']:.0f} | "
              f"{r['tokens_per_s']:.1f} | {r['cpu_s_per_step']:.2f} | {tok / r['cpu_s_per_step']:.1f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
