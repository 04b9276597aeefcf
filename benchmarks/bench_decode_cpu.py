"""Decode speed on CPU: our generation service on NumpyEngine and WebGPUEngine vs transformers `generate` (and llama.cpp
when llama-cpp-python is installed), the default model, batch 1, greedy, same prompt ids.

Reports time to first token (prompt in -> first token out), prompt tokens/s and decode tokens/s
(tokens after the first / time after the first). Each backend runs once to warm up (weights
dequantized, caches built), then `--runs` times; the median is reported.

    .venv/bin/python benchmarks/bench_decode_cpu.py [--tokens 64] [--runs 3] [--threads 2] [--adapter]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loralabd.engine.lora import LoraAdapter, LoraConfig  # noqa: E402
from loralabd.engine.numpy_engine import NumpyEngine  # noqa: E402
from loralabd.generation import GenerationService  # noqa: E402
from loralabd.models import default_model_path, load_model  # noqa: E402

QUESTION = "Explain in a few sentences why the sky is blue, for a curious ten-year-old."


def bench_ours(engine, ids, n, adapters):
    svc = GenerationService(engine)
    svc.generate(prompt_ids=ids, max_tokens=4, stop_ids=[], adapters=adapters)  # warm-up
    g = svc.generate(prompt_ids=ids, max_tokens=n, stop_ids=[], adapters=adapters)
    s = g.stats
    return dict(ttft_s=s.time_to_first_token_s, prompt_tok_s=s.prompt_tokens_per_s,
                decode_tok_s=s.decode_tokens_per_s, tokens=g.token_ids)


def bench_transformers(path, ids, n, adapter_dir=None):
    import torch
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        hf = PeftModel.from_pretrained(hf, str(adapter_dir)).eval()

    class Clock(StoppingCriteria):  # called once per new token, right after it is chosen
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores, **kw):
            self.t.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def once(k):
        clock = Clock()
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                              stopping_criteria=StoppingCriteriaList([clock]))
        ttft = clock.t[0] - t0
        return dict(ttft_s=ttft, prompt_tok_s=len(ids) / ttft, decode_tok_s=(k - 1) / (clock.t[-1] - clock.t[0]),
                    tokens=out[0, len(ids):].tolist())

    once(4)
    return once(n)


def bench_llamacpp(path, ids, n, threads, lora=None):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=512, n_threads=threads,
                verbose=False, seed=0)

    def once(k):
        llm.reset()  # else generate() reuses the cached prompt prefix and the first token comes free
        t0 = time.perf_counter()
        ts, toks = [], []
        for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            ts.append(time.perf_counter())
            toks.append(int(t))
            if len(toks) == k:
                break
        return dict(ttft_s=ts[0] - t0, prompt_tok_s=len(ids) / (ts[0] - t0),
                    decode_tok_s=(k - 1) / (ts[-1] - ts[0]), tokens=toks)

    once(4)
    r = once(n)
    llm.close()
    return r


def median(runs):
    out = {k: statistics.median(r[k] for r in runs) for k in ("ttft_s", "prompt_tok_s", "decode_tok_s")}
    out["tokens"] = runs[0]["tokens"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adapter", action="store_true", help="all runs with an r=8 LoRA on all projections")
    ap.add_argument("--engines", default="numpy,webgpu,transformers,llama.cpp",
                    help="comma list of numpy, webgpu (this machine's WebGPU adapter), transformers, llama.cpp")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    path = default_model_path()
    model = load_model(path)
    ids = model.tokenizer.encode_chat([{"role": "user", "content": QUESTION}])
    adapters, adapter_dir, lora = [], None, None
    if a.adapter:
        import tempfile

        from loralabd.export.gguf_lora import save_gguf_lora
        from loralabd.export.peft import save_peft

        ad = LoraAdapter.init(model.args, LoraConfig(r=8, alpha=16), seed=0)
        adapters = [(ad, 1.0)]
        tmp = Path(tempfile.mkdtemp())
        adapter_dir = save_peft(ad, tmp / "peft", model.args)
        lora = save_gguf_lora(ad, tmp / "lora.gguf", model.args)
    res = {"machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", "threads": a.threads,
           "prompt_tokens": len(ids), "new_tokens": a.tokens, "adapter": a.adapter}
    engines = a.engines.split(",")
    res["numpy"] = median([bench_ours(NumpyEngine(model), ids, a.tokens, adapters) for _ in range(a.runs)])
    if "webgpu" in engines:
        from loralabd.engine.webgpu.engine import WebGPUEngine
        from loralabd.engine.webgpu.runtime import get_runtime

        res["webgpu_adapter"] = get_runtime().info()["name"]
        eng = WebGPUEngine(model)
        res["webgpu"] = median([bench_ours(eng, ids, a.tokens, adapters) for _ in range(a.runs)])
    res["transformers"] = median([bench_transformers(path, ids, a.tokens, adapter_dir) for _ in range(a.runs)])
    try:
        import llama_cpp  # noqa: F401

        if "llama.cpp" in engines:
            res["llama.cpp"] = median([bench_llamacpp(path, ids, a.tokens, a.threads, lora) for _ in range(a.runs)])
    except ImportError:
        pass
    # transformers' min_new_tokens masks the end-of-turn token, so compare up to our first one
    ours_t, hf_t = res["numpy"]["tokens"], res["transformers"]["tokens"]
    stop = {model.tokenizer.eos_id}
    n_cmp = next((i for i, t in enumerate(ours_t) if t in stop), len(ours_t))
    same = ours_t[:n_cmp] == hf_t[:n_cmp]
    if "webgpu" in res:
        res["webgpu_tokens_equal_numpy"] = res["webgpu"]["tokens"] == ours_t
    for k in ("numpy", "webgpu", "transformers", "llama.cpp"):
        if k in res:
            res[k].pop("tokens")
            res[k] = {m: round(v, 3) for m, v in res[k].items()}
    res["numpy_tokens_equal_transformers"] = f"{same} (first {n_cmp} tokens, up to end of turn)"
    res["load_average_after"] = round(os.getloadavg()[0], 1)
    print(json.dumps(res, indent=2))
    print("\n| backend | time to first token | prompt tokens/s | decode tokens/s |\n|---|---|---|---|")
    for k in ("numpy", "webgpu", "transformers", "llama.cpp"):
        if k in res:
            r = res[k]
            print(f"| {k} | {r['ttft_s'] * 1000:.0f} ms | {r['prompt_tok_s']:.0f} | {r['decode_tok_s']:.1f} |")


if __name__ == "__main__":
    main()
