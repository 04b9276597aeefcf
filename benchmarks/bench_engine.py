"""Training and decoding throughput of the WebGPU engine beside PyTorch + PEFT, same config, same run.

    python benchmarks/bench_engine.py                     # SmolLM2-135M shape, batch 8 and 32, seq 512
    python benchmarks/bench_engine.py --quick             # tiny settings: a CPU/lavapipe smoke run
    python benchmarks/bench_engine.py --engines webgpu --batch 8 --seq 512 --profile
    python benchmarks/bench_engine.py --quick --engines webgpu,numpy,torch   # all three on a CPU box

Random weights of the chosen shape (timing does not depend on the values; the 98 MB default model does
not travel to the lent GPU). LoRA r=8, alpha=16 on all 7 projections, AdamW. Needs only numpy, wgpu,
torch, transformers and peft; no network. Prints one JSON line per measurement:
  {"what": "train", "engine": "webgpu", "batch": 8, "seq": 512, "tokens_per_s": ..., "ms_per_step": ...,
   "peak_bytes": ..., "device": ..., ...}
  {"what": "decode", ...}, {"what": "profile", "top": [[kernel, ms], ...], ...}, {"what": "adapter", ...}
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loralabd.engine.lora import LoraAdapter, LoraConfig  # noqa: E402
from loralabd.models.args import LINEAR_NAMES  # noqa: E402
from loralabd.models.random import random_model, smollm2_135m_args  # noqa: E402


def emit(**kw):
    kw.setdefault("date", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    print(json.dumps(kw), flush=True)


def batch_data(args, B, T, seed=0):
    from loralabd.training.packing import Batch

    rng = np.random.default_rng(seed)
    tok = rng.integers(0, args.vocab_size, (B, T))
    lab = np.roll(tok, -1, axis=1)
    lab[:, -1] = -100
    return Batch.of(tok, lab)


# --- ours ---------------------------------------------------------------------------------------------

def bench_webgpu(args, model, batches, seq, steps, decode_tokens, profile, r):
    from loralabd.engine.webgpu.engine import WebGPUEngine
    from loralabd.engine.webgpu.runtime import get_runtime

    rt = get_runtime()
    info = rt.info()
    emit(what="adapter", engine="webgpu", **info)
    t0 = time.perf_counter()
    eng = WebGPUEngine(model)
    weights = rt.live_bytes
    emit(what="load", engine="webgpu", seconds=round(time.perf_counter() - t0, 3), weight_bytes=weights)
    ad = LoraAdapter.init(args, LoraConfig(r=r, alpha=2 * r), seed=0)
    for B in batches:
        sess = eng.train_session(ad)
        b = batch_data(args, B, seq)
        rt.peak_bytes = rt.live_bytes
        t0 = time.perf_counter()
        sess.step([b], 1e-4, 1.0)  # builds the program (pipelines, buffers, bind groups)
        sess.metrics()
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            sess.step([b], 1e-4, 1.0)
        sess.metrics()  # one read at the end: waits for the device
        dt = (time.perf_counter() - t0) / steps
        prog = sess.prepare(B, seq)
        emit(what="train", engine="webgpu", device=info["name"], batch=B, seq=seq, r=r, steps=steps,
             tokens_per_s=round(B * seq / dt, 1), ms_per_step=round(1e3 * dt, 2), first_step_s=round(warm, 2),
             dispatches_per_step=len(prog.ops) + 3, peak_bytes=rt.peak_bytes,
             peak_activation_bytes=rt.peak_bytes - weights)
        if profile:
            prof = rt.profile(prog.ops)
            if prof:
                total = sum(prof.values())
                top = sorted(prof.items(), key=lambda kv: -kv[1])[:3]
                emit(what="profile", engine="webgpu", device=info["name"], batch=B, seq=seq,
                     gpu_ms_per_step=round(1e3 * total, 2),
                     top=[[k, round(1e3 * v, 2), round(100 * v / total, 1)] for k, v in top])
            else:
                emit(what="profile", engine="webgpu", skipped="adapter has no timestamp-query feature")
        sess.close()
    if decode_tokens:
        prompt = list(range(1, 17))
        list(eng.decode(prompt, 4))  # build the decode programs
        t0 = time.perf_counter()
        gen = eng.decode(prompt, decode_tokens)
        next(gen)
        t1 = time.perf_counter()
        n = 1 + sum(1 for _ in gen)
        t2 = time.perf_counter()
        emit(what="decode", engine="webgpu", device=info["name"], batch=1, prompt=len(prompt), tokens=n,
             tokens_per_s=round((n - 1) / (t2 - t1), 1), prefill_ms=round(1e3 * (t1 - t0), 1))


# --- the numpy engine (the CPU backend `auto` picks without a GPU) ---------------------------------------

def bench_numpy(args, model, batches, seq, steps, decode_tokens, r):
    from loralabd.engine.numpy_engine import NumpyEngine

    eng = NumpyEngine(model)
    ad = LoraAdapter.init(args, LoraConfig(r=r, alpha=2 * r), seed=0)
    for B in batches:
        sess = eng.train_session(ad)
        b = batch_data(args, B, seq)
        sess.step([b], 1e-4, 1.0)
        t0 = time.perf_counter()
        for _ in range(steps):
            sess.step([b], 1e-4, 1.0)
        dt = (time.perf_counter() - t0) / steps
        emit(what="train", engine="numpy", device=platform.processor() or "cpu", batch=B, seq=seq, r=r, steps=steps,
             tokens_per_s=round(B * seq / dt, 1), ms_per_step=round(1e3 * dt, 2))
    if decode_tokens:
        prompt = list(range(1, 17))
        gen = eng.decode(prompt, decode_tokens)
        next(gen)
        t1 = time.perf_counter()
        n = 1 + sum(1 for _ in gen)
        emit(what="decode", engine="numpy", batch=1, prompt=len(prompt), tokens=n,
             tokens_per_s=round((n - 1) / (time.perf_counter() - t1), 1))


# --- PyTorch + PEFT ---------------------------------------------------------------------------------------

def bench_torch(args, batches, seq, steps, decode_tokens, r):
    import torch
    import transformers
    from peft import LoraConfig as PeftConfig, get_peft_model

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    mode = "bf16-autocast" if cuda else "fp32"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=args.hidden_size, intermediate_size=args.intermediate_size, num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads, num_key_value_heads=args.num_key_value_heads,
        vocab_size=args.vocab_size, head_dim=args.head_dim, rms_norm_eps=args.rms_norm_eps, rope_theta=args.rope_theta,
        max_position_embeddings=args.max_position_embeddings, tie_word_embeddings=args.tie_word_embeddings)
    base = transformers.LlamaForCausalLM(cfg).to(dev)
    model = get_peft_model(base, PeftConfig(r=r, lora_alpha=2 * r, target_modules=list(LINEAR_NAMES),
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(tok, lab):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=tok, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for B in batches:
        t = np.asarray(batch_data(args, B, seq).tokens, np.int64)  # the same tokens our side trains on
        tok, lab = torch.tensor(t, device=dev), torch.tensor(t, device=dev)  # HF shifts labels itself
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        step(tok, lab)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step(tok, lab).item()
        sync()
        dt = (time.perf_counter() - t0) / steps
        peak = torch.cuda.max_memory_allocated() if cuda else None
        emit(what="train", engine="torch+peft", mode=mode, device=name, batch=B, seq=seq, r=r, steps=steps,
             tokens_per_s=round(B * seq / dt, 1), ms_per_step=round(1e3 * dt, 2), peak_bytes=peak)
    if decode_tokens:
        model.eval()
        prompt = torch.arange(1, 17, device=dev)[None]
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=cuda):
            model.generate(input_ids=prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            sync()
            t0 = time.perf_counter()
            model.generate(input_ids=prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            sync()
            t1 = time.perf_counter()
            model.generate(input_ids=prompt, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                           do_sample=False)
            sync()
            t2 = time.perf_counter()
        per = ((t2 - t1) - (t1 - t0)) / max(decode_tokens - 1, 1)
        emit(what="decode", engine="torch+peft", mode=mode, device=name, batch=1, prompt=16, tokens=decode_tokens,
             tokens_per_s=round(1.0 / max(per, 1e-9), 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default="webgpu,torch", help="comma list of webgpu, numpy, torch")
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per batch size (after one warm-up)")
    ap.add_argument("--decode", type=int, default=128, help="tokens to decode at batch 1 (0: skip)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (default: the model's 30)")
    ap.add_argument("--profile", action="store_true", help="timestamp-query breakdown of a training step")
    ap.add_argument("--quick", action="store_true", help="tiny settings for a CPU smoke run")
    a = ap.parse_args(argv)
    args = smollm2_135m_args()
    if a.quick:
        a.batch, a.seq, a.steps, a.decode, a.profile = [1], 32, 1, 8, True
        a.layers = a.layers or 2
    if a.layers:
        args = replace(args, num_hidden_layers=a.layers)
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    emit(what="config", model="smollm2-135m-shape", layers=args.num_hidden_layers, batch=a.batch, seq=a.seq,
         r=a.r, targets=list(LINEAR_NAMES), steps=a.steps, decode=a.decode, python=platform.python_version(),
         machine=platform.machine(), host=platform.node())
    model = random_model(args, seed=0) if {"webgpu", "numpy"} & set(engines) else None
    if "webgpu" in engines:
        bench_webgpu(args, model, a.batch, a.seq, a.steps, a.decode, a.profile, a.r)
    if "numpy" in engines:
        bench_numpy(args, model, a.batch, a.seq, a.steps, a.decode, a.r)
    if "torch" in engines:
        bench_torch(args, a.batch, a.seq, a.steps, a.decode, a.r)


if __name__ == "__main__":
    main()
