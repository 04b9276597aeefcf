"""What users run is what is measured: training and generation throughput through the real daemon, beside the
engine-level numbers of the same model, same data and same shapes, in one run.

    python benchmarks/bench_daemon.py                          # default model, auto backend, 8x64 and 8x512
    python benchmarks/bench_daemon.py --backend numpy --quick  # CPU smoke run (a few minutes on 2 cores)
    python benchmarks/bench_daemon.py --random-weights --backend webgpu --json out.json   # the lent GPU

Daemon side: a private LORALAB_HOME in a temp dir, `python -m loralabd.server.main` (what `loralab serve`
runs) as a child process, the websocket connection file read for port and token, loralabd.client driving it:

- model/load (`--model`, `--backend`), device/info (the card or CPU the daemon sees);
- train/start on a few hundred synthetic chat records (JSONL `{"messages": [...]}`) at each `--shapes`
  (default batch 8 x seq 64 and 8 x 512), `--steps` optimizer steps, LoRA r 8 / alpha 16 on all projections,
  AdamW, the daemon's own defaults otherwise (cosine schedule, checkpoints). Measured: the client's wall clock
  from train/start to its answer (tokensSeen / wall: data loading, first-step build and checkpoints included),
  and the median `tokensPerSecond` of the `$/progress` TrainProgress reports after the first three;
- generate, streamed (partialResultToken, as the CLI and the editors do), `--max-tokens` (128), greedy and
  top-p 0.9 (temperature 1, fixed seed), base model and the adapter trained at the last shape, median over
  `--prompts` chat prompts of tokens / client wall per request, and the daemon's own GenerateResult
  tokensPerSecond. One untimed warm-up request per model/adapter first.

Engine side (`engine_numbers`, in this process after the daemon has stopped, so that they do not share the
device): load_model + engine.select.make_engine on the same source and backend; the same packed batches
(training.packing, same data, same seed) through `engine.train_session` (one untimed warm-up step, then
`--steps` timed steps, metrics read back once at the end), and `engine.decode` of exactly `--max-tokens`
tokens (no stop tokens) on the same rendered prompts, with per-token timestamps. The table's daemon/engine
ratio for generation compares at the same length: the engine's rate over the first n tokens, n being what
the daemon generated for that prompt (see the stop-token note below).

Random weights (`--random-weights`, for the lent GPU machine where the 98 MB default model does not travel):
the daemon needs no change for them. The script writes a GGUF file with random weights of the default
model's shape (models.random.random_model(smollm2_135m_args()): Q4_1 projections, Q8_0 embedding, F32 norms
— the default GGUF's types) and the metadata, tokenizer and chat template of `--tokenizer-gguf` (default: the
installed default model), and both the daemon (model/load source = that file) and engine_numbers load it
through the ordinary GGUF loader. Without the default model on the GPU machine, write a ~2 MB tokenizer-only
GGUF here and carry it:

    python benchmarks/bench_daemon.py --write-tokenizer-gguf smollm2-tokenizer.gguf   # here (*.gguf is ignored)
    ../shared/tools/gpu-bundle gguf websockets                                           # here: the bundle + these
    # device run, carry [".gpu-bundle", "smollm2-tokenizer.gguf"]:
    source .gpu-bundle/activate && python3 benchmarks/bench_daemon.py --random-weights \\
        --tokenizer-gguf smollm2-tokenizer.gguf --backend webgpu --json $OUT/bench_daemon.json

Stop tokens: the protocol has no way to turn off the end-of-sequence / end-of-turn stop of `generate`
(GenerateParams has only stop *strings*), so with real weights a reply may end before --max-tokens. The
prompts ask for long answers, the table shows the median tokens generated, and rates are completion tokens
over wall time; the engine column decodes the full --max-tokens without stops.

The daemon it starts is stopped on every way out (shutdown + exit, then SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loralabd.client import AsyncClient  # noqa: E402

LORA = {"r": 8, "alpha": 16, "targets": ["all"]}
TOP_P = {"temperature": 1.0, "topP": 0.9, "seed": 1234}
GREEDY = {"temperature": 0.0, "seed": 1234}
MODES = {"greedy": GREEDY, "top-p 0.9": TOP_P}


# --- data ------------------------------------------------------------------------------------------------

_TOPICS = ["the ocean", "volcanoes", "bread baking", "the moon", "bicycles", "honey bees", "chess", "rainforests",
           "the printing press", "glaciers", "coffee", "lighthouses", "the violin", "deserts", "penguins",
           "electric motors", "origami", "the human heart", "tea ceremonies", "solar panels", "sourdough",
           "octopuses", "the Silk Road", "thunderstorms", "compost", "trains", "libraries", "maple syrup"]
_ASKS = ["What is {t}?", "Tell me something interesting about {t}.", "Explain {t} to a child.",
         "Why do people care about {t}?", "Give me three facts about {t}.", "How would you describe {t}?",
         "Write a short note about {t}.", "What should a beginner know about {t}?"]
_SENTENCES = ["{T} has a long history that many people never hear about.",
              "Scientists and hobbyists alike keep finding new things to learn about {t}.",
              "One simple way to start is to look closely and ask questions.",
              "Many cultures have their own stories and traditions around {t}.",
              "It changes with the seasons, which makes it a good subject to watch over a year.",
              "A good book or a patient teacher makes the first steps much easier.",
              "Small details often explain the big picture.",
              "Numbers help, but curiosity helps more.",
              "People who work with {t} every day say it never gets boring.",
              "Safety comes first, so read the instructions before you try anything.",
              "There is more variety in {t} than most people expect.",
              "If you remember one thing, remember that practice beats theory."]
_SYSTEM = ["You are a friendly tutor.", "You answer briefly and clearly.", "You are a pirate who loves facts.",
           "You explain things with simple words."]


def chat_records(n: int = 320, seed: int = 0) -> list[dict]:
    """Varied synthetic chat examples: a system turn sometimes, one to three user/assistant exchanges,
    answers of 1 to 9 sentences (30 to ~400 tokens an example), so that packing fills long rows too."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": rng.choice(_SYSTEM)}] if rng.random() < 0.3 else []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            t = rng.choice(_TOPICS)
            msgs.append({"role": "user", "content": rng.choice(_ASKS).format(t=t)})
            k = rng.randint(1, 9)
            body = " ".join(rng.choice(_SENTENCES).format(t=t, T=t[0].upper() + t[1:]) for _ in range(k))
            msgs.append({"role": "assistant", "content": body})
        out.append({"messages": msgs})
    return out


def prompts(n: int) -> list[list[dict]]:
    """Chat prompts that ask for long answers (the daemon's generate always stops at end-of-turn)."""
    kinds = ["Write a long, detailed essay about {t}, with an introduction, five sections and a conclusion.",
             "Explain step by step, in at least 400 words, everything a beginner should know about {t}.",
             "Tell a long story (at least 500 words) in which {t} plays the central role.",
             "Write a thorough guide to {t}: history, how it works, common mistakes, and ten tips."]
    return [[{"role": "user", "content": kinds[i % len(kinds)].format(t=_TOPICS[i % len(_TOPICS)])}]
            for i in range(n)]


# --- random weights as a GGUF file (the daemon loads it like any model) -----------------------------------

def write_gguf(dest: Path, tokenizer_gguf: str | None, tensors: bool = True, seed: int = 0) -> Path:
    """A GGUF with the metadata (tokenizer, chat template, shape) of `tokenizer_gguf` (default: the installed
    default model) and, with tensors=True, random weights of the default model's shape in its types."""
    import gguf
    import numpy as np

    from loralabd.models.load import default_model_path, read_gguf
    from loralabd.models.random import random_model, smollm2_135m_args

    src = Path(tokenizer_gguf).expanduser() if tokenizer_gguf else default_model_path()
    reader = read_gguf(src)
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise SystemExit(f"{src}: has no tokenizer (tokenizer.ggml.tokens); name the default model's GGUF")
    a = smollm2_135m_args()
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if n_vocab != a.vocab_size:
        raise SystemExit(f"{src}: its tokenizer has {n_vocab} tokens, the default model's shape {a.vocab_size}")
    w = gguf.GGUFWriter(str(dest), arch="llama")
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        val = f.contents()
        if f.name == "general.name":
            val = str(val).removesuffix(" (tokenizer only)") + (" (random weights)" if tensors else " (tokenizer only)")
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, val, f.types[0], sub_type=sub)
    if tensors:
        m = random_model(a, seed=seed)

        def raw(q):  # QuantTensor -> ggml block bytes (rows, bytes per row)
            rows = q.shape[0]
            if q.kind == "q4_1":  # f16 d, f16 m, 16 bytes of nibbles
                b = np.concatenate([np.ascontiguousarray(q.scales).view(np.uint8), q.qs], axis=-1)
                return b.reshape(rows, -1), gguf.GGMLQuantizationType.Q4_1
            if q.kind == "q8_0":  # f16 d, 32 int8
                d = np.ascontiguousarray(q.scales)[..., None].view(np.uint8)
                b = np.concatenate([d, np.ascontiguousarray(q.qs).view(np.uint8)], axis=-1)
                return b.reshape(rows, -1), gguf.GGMLQuantizationType.Q8_0
            raise ValueError(q.kind)

        def add(name, q):
            data, kind = raw(q)
            w.add_tensor(name, data, raw_dtype=kind)

        add("token_embd.weight", m.embed_tokens)
        w.add_tensor("output_norm.weight", m.norm.astype(np.float32))
        gg = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
        for i, L in enumerate(m.layers):
            w.add_tensor(f"blk.{i}.attn_norm.weight", L.input_layernorm.astype(np.float32))
            w.add_tensor(f"blk.{i}.ffn_norm.weight", L.post_attention_layernorm.astype(np.float32))
            for n, q in L.linear.items():
                add(f"blk.{i}.{gg[n]}.weight", q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dest


# --- the daemon ------------------------------------------------------------------------------------------

class Daemon:
    """`python -m loralabd.server.main` on a private LORALAB_HOME; the connection file gives url and token."""

    def __init__(self, home: Path, timeout: float = 120.0):
        self.home = home
        self.log_path = home / "daemon.out"
        self.log = open(self.log_path, "ab")
        env = dict(os.environ, LORALAB_HOME=str(home), LORALAB_LOG=os.environ.get("LORALAB_LOG", "WARNING"))
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self.proc = subprocess.Popen([sys.executable, "-m", "loralabd.server.main"], env=env, cwd=str(home),
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while True:
            info = self._conn()
            if info and info.get("pid") == self.proc.pid:
                self.info = info
                self.start_s = time.monotonic() - t0
                return
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"the daemon did not start:\n{self.tail()}")
            time.sleep(0.05)

    def _conn(self) -> dict | None:
        run = self.home / "run"
        for f in sorted(run.glob("loralabd-*.json")) if run.exists() else []:
            try:
                return json.loads(f.read_text())
            except (OSError, ValueError):
                return None
        return None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    async def client(self) -> AsyncClient:
        return await AsyncClient.connect_ws(self.info["url"], self.info["token"])

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the daemon checkpoints and exits), SIGKILL after `timeout`; a no-op once it has exited."""
        p = self.proc
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.log.close()
        return p.returncode


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


async def train_job(c, params: dict) -> tuple[dict, list, float]:
    """train/start through to its answer: the job, its TrainProgress reports and the client's wall clock."""
    reports = []
    t0 = time.perf_counter()
    s = c.stream("train/start", params)
    async for v in s:
        if v.get("kind") == "report" and v.get("train"):
            reports.append(v["train"])
    job = await s.result()
    return job, reports, time.perf_counter() - t0


async def daemon_numbers(d: Daemon, source: str, backend: str, data: Path, shapes, steps: int, chats,
                         max_tokens: int, log) -> dict:
    c = await d.client()
    try:
        await c.initialize("bench_daemon")
        out = {"device": await c.request("device/info")}
        t0 = time.perf_counter()
        out["model"] = m = await c.request("model/load", {"source": source, "backend": backend, "name": "bench"})
        out["load_s"] = time.perf_counter() - t0
        log(f"daemon: {m['name']} on {m['backend']} ({out['device']['adapterName']}), loaded in {out['load_s']:.1f} s")
        mid, trains, adapter = m["id"], [], None
        for B, T in shapes:
            adapter = f"bench-b{B}-s{T}"
            params = {"model": mid, "dataset": str(data), "adapter": adapter, "steps": steps, "batchSize": B,
                      "seqLen": T, "lora": LORA, "seed": 0, "overwrite": True}
            job, reports, wall = await train_job(c, params)
            if job["state"] != "completed":
                raise RuntimeError(f"train job {job['jobId']} ended {job['state']}: {job.get('error')}")
            later = reports[3:] or reports[-1:]
            r = {"batch": B, "seq": T, "steps": job["step"], "tokens": job["tokensSeen"], "wall_s": wall,
                 "wall_tokens_per_s": job["tokensSeen"] / wall, "reports": len(reports),
                 "progress_tokens_per_s": _median([x["tokensPerSecond"] for x in later]),
                 "loss": job["loss"], "adapter": adapter}
            trains.append(r)
            log(f"daemon: train {B}x{T}: {r['tokens']} tokens in {wall:.1f} s = {r['wall_tokens_per_s']:.0f} tok/s, "
                f"progress median {r['progress_tokens_per_s'] or 0:.0f} tok/s ({len(reports)} reports)")
        out["train"] = trains
        gens = []
        for ad in (None, adapter):
            warm = {"model": mid, "messages": chats[0], "maxTokens": 4, **GREEDY}
            await c.request("generate", {**warm, **({"adapter": ad} if ad else {})})
            for mode, samp in MODES.items():
                per = []
                for msgs in chats:
                    p = {"model": mid, "messages": msgs, "maxTokens": max_tokens, **samp,
                         **({"adapter": ad} if ad else {})}
                    t0 = time.perf_counter()
                    first = None
                    s = c.stream("generate", p)
                    async for _ in s:
                        if first is None:
                            first = time.perf_counter() - t0
                    res = await s.result()
                    wall = time.perf_counter() - t0
                    per.append({"tokens": res["tokens"], "wall_s": wall, "first_delta_s": first,
                                "client_tokens_per_s": res["tokens"] / wall,
                                "daemon_tokens_per_s": res["tokensPerSecond"],
                                "prompt_tokens": res["promptTokens"], "finish": res["finishReason"]})
                g = {"mode": mode, "adapter": ad, "prompts": len(per), "per_prompt": per,
                     "tokens_median": _median([x["tokens"] for x in per]),
                     "client_tokens_per_s": _median([x["client_tokens_per_s"] for x in per]),
                     "daemon_tokens_per_s": _median([x["daemon_tokens_per_s"] for x in per]),
                     "first_delta_s": _median([x["first_delta_s"] for x in per]),
                     "stopped_early": sum(x["finish"] == "stop" for x in per)}
                gens.append(g)
                log(f"daemon: generate {mode} {'adapter' if ad else 'base'}: {g['client_tokens_per_s']:.1f} tok/s "
                    f"(daemon says {g['daemon_tokens_per_s']:.1f}; median {g['tokens_median']} tokens)")
        out["generate"] = gens
        try:
            await c.request("shutdown", timeout=60)
            await c.notify("exit")
        except Exception:  # stop() below still ends it
            pass
        return out
    finally:
        await c.close()


# --- the engine, same process, no daemon ----------------------------------------------------------------

def _decode(engine, prompt_ids, max_tokens, samp: dict, adapters):
    from loralabd.engine.interface import Sampling

    s = Sampling(temperature=samp["temperature"], top_k=0, top_p=samp.get("topP", 1.0), seed=samp["seed"])
    return engine.decode(prompt_ids, max_tokens, s, adapters)


def _session(engine, adapter):
    from loralabd.engine.interface import OptimSettings

    return engine.train_session(adapter, OptimSettings(kind="adamw", seed=0))


def _step(sess, batch, lr: float) -> str:
    sess.step([batch], lr, 1.0)
    return "step(batches)"


def _sync(sess) -> None:
    sess.metrics()  # waits for the device


def _close(x) -> None:
    x.close()


def engine_numbers(model: str, backend: str, *, data: Path, shapes, steps: int, chats, max_tokens: int,
                   adapter_dir: Path | None = None, adapter_name: str | None = None, log=print) -> dict:
    """Engine-level numbers: load_model + make_engine on `model` (a source as model/load takes it), then
    (a) training steps at each (batch, seq) of `shapes` on the same packed chat batches the daemon's trainer
    makes, and (b) decoding `max_tokens` tokens per prompt in each sampling mode, base and with the adapter
    `adapter_name` from the adapter store at `adapter_dir` (when given)."""
    from loralabd.adapters import AdapterStore
    from loralabd.engine.lora import LoraAdapter
    from loralabd.engine.select import make_engine
    from loralabd.models.load import load_model
    from loralabd.training.packing import DataStream, Dataset
    from loralabd.training.trainer import TrainConfig

    t0 = time.perf_counter()
    m = load_model(None if model in (None, "", "default") else model)
    eng = make_engine(m, backend)
    out = {"backend": getattr(eng, "backend", "numpy"), "load_s": time.perf_counter() - t0, "train": [], "decode": []}
    tok = m.tokenizer
    pad = tok.eos_id if tok is not None and tok.eos_id is not None else 0
    try:
        for B, T in shapes:
            cfg = TrainConfig(r=LORA["r"], alpha=float(LORA["alpha"]), seq_len=T, batch_size=B, seed=0)
            ds = Dataset.load(data, tok, max_seq_len=T)
            stream = DataStream(ds.train, T, B, pad, seed=0)
            batches = [stream.next_batch() for _ in range(steps + 1)]
            sess = _session(eng, LoraAdapter.init(m.args, cfg.lora, seed=0))
            try:
                t0 = time.perf_counter()
                out["api"] = {"train": _step(sess, batches[0], cfg.lr),  # builds programs / caches
                              "decode": "decode" if hasattr(eng, "decode") else "generate (old API)"}
                _sync(sess)
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                for b in batches[1:]:
                    _step(sess, b, cfg.lr)
                _sync(sess)
                dt = time.perf_counter() - t0
            finally:
                _close(sess)
            n = sum(b.n_tokens for b in batches[1:])
            r = {"batch": B, "seq": T, "steps": steps, "tokens": n, "seconds": dt, "tokens_per_s": n / dt,
                 "ms_per_step": 1e3 * dt / steps, "first_step_s": first}
            out["train"].append(r)
            log(f"engine: train {B}x{T}: {r['tokens_per_s']:.0f} tok/s ({r['ms_per_step']:.0f} ms/step, "
                f"first step {first:.1f} s)")
        ads = {"base": ()}
        if adapter_dir is not None and adapter_name:
            ads[adapter_name] = [(AdapterStore(adapter_dir).load(adapter_name, m.args), 1.0)]
        ids = [tok.encode_chat(msgs, add_generation_prompt=True) for msgs in chats]
        for name, adapters in ads.items():
            for _ in _decode(eng, ids[0], 4, GREEDY, adapters):  # warm-up, as on the daemon side
                pass
            for mode, samp in MODES.items():
                per = []
                for p in ids:
                    times, t0 = [], time.perf_counter()
                    for _ in _decode(eng, p, max_tokens, samp, adapters):
                        times.append(time.perf_counter() - t0)
                    per.append(times)
                rates = [len(t) / t[-1] for t in per if t]
                r = {"mode": mode, "adapter": None if name == "base" else name, "prompts": len(per),
                     "tokens": max_tokens, "tokens_per_s": _median(rates),
                     "first_token_s": _median([t[0] for t in per if t]), "cumulative_s": per}
                out["decode"].append(r)
                log(f"engine: decode {mode} {name if name == 'base' else 'adapter'}: {r['tokens_per_s']:.1f} tok/s")
    finally:
        _close(eng)
    return out


# --- report -----------------------------------------------------------------------------------------------

def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ratio(a, b):
    return None if a is None or not b else a / b


def combine(dn: dict, en: dict) -> list[dict]:
    """One row per measurement: daemon numbers, engine number, daemon/engine ratios."""
    rows = []
    for d, e in zip(dn["train"], en["train"]):
        rows.append({"what": "train", "shape": f"{d['batch']}x{d['seq']}", "daemon_wall": d["wall_tokens_per_s"],
                     "daemon_reported": d["progress_tokens_per_s"], "engine": e["tokens_per_s"],
                     "ratio_wall": _ratio(d["wall_tokens_per_s"], e["tokens_per_s"]),
                     "ratio_reported": _ratio(d["progress_tokens_per_s"], e["tokens_per_s"])})
    eng = {(x["mode"], x["adapter"] is not None): x for x in en["decode"]}
    for g in dn["generate"]:
        e = eng.get((g["mode"], g["adapter"] is not None))
        if e is None:
            continue
        # the engine's rate over as many tokens as the daemon generated for that prompt (eos ends a reply early)
        matched = [p["tokens"] / t[p["tokens"] - 1] for p, t in zip(g["per_prompt"], e["cumulative_s"])
                   if p["tokens"] and len(t) >= p["tokens"]]
        em = _median(matched)
        rows.append({"what": "generate", "shape": f"{g['mode']}, {'adapter' if g['adapter'] else 'base'}",
                     "tokens": g["tokens_median"], "daemon_wall": g["client_tokens_per_s"],
                     "daemon_reported": g["daemon_tokens_per_s"], "engine": e["tokens_per_s"], "engine_matched": em,
                     "ratio_wall": _ratio(g["client_tokens_per_s"], em),
                     "ratio_reported": _ratio(g["daemon_tokens_per_s"], em)})
    return rows


def table(rows: list[dict], max_tokens: int) -> str:
    def f(x, nd=1):
        return "-" if x is None else f"{x:,.{nd}f}"

    head = (f"{'':9} {'shape / mode':22} {'tokens':>6} {'daemon wall':>12} {'daemon says':>12} "
            f"{'engine':>10} {'engine@n':>9} {'wall/eng':>9} {'says/eng':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        tok = f"{r['tokens']:g}" if r["what"] == "generate" and r.get("tokens") is not None else ""
        lines.append(f"{r['what']:9} {r['shape']:22} {tok:>6} {f(r['daemon_wall']):>12} {f(r['daemon_reported']):>12} "
                     f"{f(r['engine']):>10} {f(r.get('engine_matched')):>9} {f(r['ratio_wall'], 2):>9} "
                     f"{f(r['ratio_reported'], 2):>9}")
    lines.append("")
    lines.append("train: tokens/s. daemon wall = tokensSeen / client wall clock from train/start to its answer; "
                 "daemon says = median $/progress tokensPerSecond after the first three reports; engine = the "
                 "engine's train session on the same batches (first step excluded).")
    lines.append(f"generate: tokens/s, median over prompts; tokens = median tokens the daemon generated (of "
                 f"{max_tokens}; it stops at end-of-turn); daemon wall = tokens / client wall per streamed request; "
                 f"daemon says = GenerateResult.tokensPerSecond; engine = engine decode of {max_tokens} tokens; "
                 "engine@n = the engine's rate over the daemon's token count n; ratios are against engine@n.")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------------------

def parse_shapes(s: str):
    out = []
    for part in s.split(","):
        b, _, t = part.strip().lower().partition("x")
        out.append((int(b), int(t)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("auto", "webgpu", "numpy"), default=None,
                    help="engine backend for model/load and make_engine (default auto; numpy with --quick)")
    ap.add_argument("--model", default="default",
                    help="GGUF file or HF directory, or `default` (SmolLM2-135M-Instruct)")
    ap.add_argument("--random-weights", action="store_true",
                    help="random weights of the default model's shape with its real tokenizer (see the docstring)")
    ap.add_argument("--tokenizer-gguf", default=None,
                    help="with --random-weights: the GGUF whose tokenizer and metadata to use "
                         "(default: the default model)")
    ap.add_argument("--write-tokenizer-gguf", metavar="PATH", default=None,
                    help="write a tokenizer-only GGUF (~2 MB) of --tokenizer-gguf to PATH and exit")
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke run: numpy backend, shapes 4x32,4x64, 3 steps, 3 prompts, 16 tokens")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per shape (default 60; 3 with --quick)")
    ap.add_argument("--prompts", type=int, default=None, help="generate prompts per mode (default 20; 3 with --quick)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="maxTokens per generate (default 128; 16 with --quick)")
    ap.add_argument("--shapes", default=None,
                    help="training shapes BxT,... (default 8x64,8x512; 4x32,4x64 with --quick)")
    ap.add_argument("--json", metavar="PATH", default=None, help="also write every number as JSON to PATH")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (daemon home, data, log) and print it")
    a = ap.parse_args(argv)

    if a.write_tokenizer_gguf:
        p = write_gguf(Path(a.write_tokenizer_gguf), a.tokenizer_gguf, tensors=False)
        print(f"wrote {p} ({p.stat().st_size / 1e6:.1f} MB)")
        return 0
    q = a.quick
    backend = a.backend or ("numpy" if q else "auto")
    steps = a.steps or (3 if q else 60)
    n_prompts = a.prompts or (3 if q else 20)
    max_tokens = a.max_tokens or (16 if q else 128)
    shapes = parse_shapes(a.shapes or ("4x32,4x64" if q else "8x64,8x512"))
    if a.random_weights and a.model != "default":
        ap.error("--random-weights replaces --model; give one of them")

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # run the finally: stop the daemon
    tmp = Path(tempfile.mkdtemp(prefix="loralab-bench-"))
    daemon = None
    try:
        home = tmp / "home"
        home.mkdir()
        data = tmp / "chat.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in chat_records()))
        if a.random_weights:
            t0 = time.perf_counter()
            source = str(write_gguf(tmp / "smollm2-135m-random.gguf", a.tokenizer_gguf))
            log(f"random weights written to {source} in {time.perf_counter() - t0:.1f} s")
        else:
            source = a.model if a.model == "default" else str(Path(a.model).expanduser().resolve())
        chats = prompts(n_prompts)

        daemon = Daemon(home)
        log(f"daemon pid {daemon.proc.pid} up in {daemon.start_s:.1f} s at {daemon.info['url']}")
        try:
            dn = asyncio.run(daemon_numbers(daemon, source, backend, data, shapes, steps, chats, max_tokens, log))
        except BaseException:
            log("daemon log tail:\n" + daemon.tail())
            raise
        finally:
            rc = daemon.stop()
        log(f"daemon stopped (exit code {rc})")

        en = engine_numbers(source, backend, data=data, shapes=shapes, steps=steps, chats=chats,
                            max_tokens=max_tokens, adapter_dir=home / "adapters",
                            adapter_name=dn["train"][-1]["adapter"], log=log)
        rows = combine(dn, en)
        dev, mod = dn["device"], dn["model"]
        print(f"device (device/info): {dev['adapterName']} [{dev['adapterType']}], auto -> {dev['backend']}, "
              f"available {', '.join(dev['available'])}; host CPU: {_cpu_name()} x {os.cpu_count()}")
        for n in dev.get("notes") or []:
            print(f"  note: {n}")
        api = en.get("api", {})
        print(f"model: {mod['name']} ({mod['numParameters'] / 1e6:.0f}M params, {mod['weightBytes'] / 1e6:.0f} MB); "
              f"LoRA r {LORA['r']} alpha {LORA['alpha']} on all projections, AdamW")
        print(f"backend: daemon {mod['backend']}, engine {en['backend']} (engine calls: {api.get('train')}, "
              f"{api.get('decode')})")
        print(f"steps {steps} per shape, {n_prompts} prompts per mode, maxTokens {max_tokens}; model/load "
              f"{dn['load_s']:.1f} s (engine-level load {en['load_s']:.1f} s)\n")
        print(table(rows, max_tokens))
        if a.json:
            def strip(g):  # per-token timestamps stay out of the JSON
                return {k: v for k, v in g.items() if k != "cumulative_s"}

            doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "config": {"backend": backend,
                              "model": "random weights, default shape" if a.random_weights else a.model,
                              "shapes": shapes, "steps": steps, "prompts": n_prompts, "max_tokens": max_tokens,
                              "lora": LORA, "sampling": MODES, "quick": q},
                   "host": {"cpu": _cpu_name(), "cpus": os.cpu_count(), "platform": platform.platform()},
                   "device": dev, "model": mod, "daemon": dn,
                   "engine": {**en, "decode": [strip(g) for g in en["decode"]]}, "rows": rows}
            Path(a.json).write_text(json.dumps(doc, indent=1))
            log(f"wrote {a.json}")
        return 0
    finally:
        if daemon is not None and daemon.proc.poll() is None:
            daemon.stop()
        if a.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
