"""loralab: the command line, a client of the daemon (started on first use when none runs).

    loralab serve [--detach]            run the daemon (foreground, or in the background)
    loralab status | stop               the running daemon
    loralab models [--load SRC]         loaded models
    loralab plan   [--model M] ...      will it fit, how long, what to change (--calibrate, --data, --json)
    loralab train  DATA --adapter NAME  train with a live progress bar (Ctrl-C stops it, resumable)
    loralab train  --list | --resume ID
    loralab chat   [PROMPT] [--adapter NAME]   streaming chat (no PROMPT: interactive)
    loralab adapters                    saved adapters
    loralab export NAME --format peft|gguf|mlx [--out PATH] [--overwrite]
    loralab demo                        plan, train the pirate demo, compare base and adapter answers
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from . import paths
from .client import Client, RpcError
from .protocol import DEFAULTS

_T, _G = DEFAULTS["TrainParams"], DEFAULTS["GenerateParams"]  # flag defaults: the protocol's, stated once


def _client(start=True) -> Client:
    try:
        c = Client(start=start)
    except ConnectionError as e:
        sys.exit(f"loralab: {e}")
    if c.ac.started_daemon:
        print(f"started loralabd in the background (pid {c.ac.started_daemon}); it stays for the next command, "
              "`loralab stop` ends it", file=sys.stderr)
    return c


def _ensure_model(c: Client, model: str, backend: str | None = None) -> str:
    """Load the model when needed (idempotent); returns its id. `backend` applies to a new load only."""
    src = None if model in ("default", "") else os.path.abspath(os.path.expanduser(model))
    for m in c.request("model/list")["models"]:
        if m["id"] == model or (src and m["source"] == src):
            return m["id"]
    print(f"loading {model} ...", file=sys.stderr)
    p = {} if src is None else {"source": src}
    if backend:
        p["backend"] = backend
    return c.request("model/load", p)["id"]


def _fmt_s(s):
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _mb(n):
    return f"{n / 2**20:,.1f} MiB"


class Bar:
    """One self-rewriting line: [#####.....] step/total loss tok/s ETA."""

    def __init__(self, out=sys.stderr):
        self.out, self.tty = out, out.isatty()
        self.last = 0.0

    def show(self, t: dict, final=False):
        now = time.monotonic()
        if not final and not self.tty and now - self.last < 5:
            return  # logs get a line every few seconds, terminals a live bar
        self.last = now
        w = 30
        frac = t["step"] / max(t["totalSteps"], 1)
        bar = "#" * int(w * frac) + "." * (w - int(w * frac))
        loss = "-" if t["loss"] is None else f"{t['loss']:.4f}"
        line = (f"[{bar}] {t['step']}/{t['totalSteps']} loss {loss} {t['tokensPerSecond']:,.0f} tok/s "
                f"ETA {_fmt_s(t['etaSeconds'])}")
        self.out.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        if final and self.tty:
            self.out.write("\n")
        self.out.flush()


def _train_stream(c: Client, method: str, params: dict) -> dict | None:
    bar = Bar()
    last = None
    try:
        for ev in c.stream(method, params):
            if ev["kind"] == "begin" and ev.get("message"):  # e.g. a resume that passed over damaged checkpoints
                print(ev["message"], file=sys.stderr)
            if ev.get("train"):
                last = ev["train"]
                bar.show(last, final=ev["kind"] == "end")
            if ev["kind"] == "end":
                print(ev.get("message", ""), file=sys.stderr)
        return c.last_result
    except KeyboardInterrupt:
        print("\nstopping after the current step (checkpointed; `loralab train --resume ID` continues) ...",
              file=sys.stderr)
        c.cancel_current()
        try:
            c._run(c.current.result())  # answers -32800 once the current step is done and checkpointed
        except RpcError:
            pass
        if last:
            print(f"job {last['jobId']} stopped at step {last['step']}/{last['totalSteps']}", file=sys.stderr)
        return None


# -- commands ----------------------------------------------------------------------------------------

def cmd_serve(a):
    args = [*(["--stdio"] if a.stdio else []), *(["--port", str(a.port)] if a.port else []),
            *(["--host", a.host] if a.host else []), *(["--allow-remote"] if a.allow_remote else []),
            *[x for d in a.allow_path for x in ("--allow-path", os.path.abspath(os.path.expanduser(d)))]]
    if a.detach:
        info = paths.read_connection()
        if info:
            print(f"loralabd already runs (pid {info['pid']}, {info['url']})")
            return
        from .client import start_daemon

        info = start_daemon(extra_args=args)
        print(f"loralabd started in the background (pid {info['pid']}, {info['url']}); stop it with `loralab stop`")
        return
    from .server.main import main as daemon_main

    daemon_main(args)


def cmd_status(a):
    info = paths.read_connection()
    if info is None:
        print(f"no loralabd runs for {paths.data_dir()} (start one: loralab serve --detach)")
        sys.exit(1)
    print(f"loralabd {info.get('version', '?')} pid {info['pid']} at {info['url']}\ndata dir {info['dataDir']}")
    with _client(start=False) as c:
        for m in c.request("model/list")["models"]:
            print(f"model {m['id']}: {m['name']} ({m['backend']}, {_mb(m['weightBytes'])}){' busy' if m['busy'] else ''}")
        for j in c.request("train/list")["jobs"]:
            if j["state"] == "running":
                print(f"job {j['jobId']} training {j['adapter']}: step {j['step']}/{j['totalSteps']}")


def cmd_stop(a):
    info = paths.read_connection()
    if info is None:
        print("no loralabd runs")
        return
    os.kill(info["pid"], signal.SIGTERM)  # the daemon checkpoints running jobs, then exits
    for _ in range(600):
        if not paths._pid_alive(info["pid"]):
            print(f"loralabd (pid {info['pid']}) stopped")
            return
        time.sleep(0.1)
    sys.exit(f"loralabd (pid {info['pid']}) is still checkpointing; check again with `loralab status`")


def cmd_models(a):
    with _client() as c:
        if a.load:
            m = c.request("model/load", {"source": a.load, **({"name": a.name} if a.name else {}),
                                         **({"backend": a.backend} if a.backend else {})})
            print(f"loaded {m['id']}")
        if a.unload:
            c.request("model/unload", {"model": a.unload})
            print(f"unloaded {a.unload}")
        for m in c.request("model/list")["models"]:
            print(f"{m['id']:<20} {m['architecture']:<8} {m['numLayers']:>3} layers  d={m['hiddenSize']:<5} "
                  f"{_mb(m['weightBytes']):>12}  {m['backend']:<7} {m['source']}")


def _lora(a):
    return {"r": a.rank, "alpha": float(a.alpha if a.alpha is not None else 2 * a.rank), "targets": a.targets.split(",")}


def _size(n) -> str:
    return f"{n / 2**20:,.1f} MiB" if abs(n) < 2**30 else f"{n / 2**30:,.2f} GiB"


def _seconds(text: str) -> float:
    """90 | 90s | 30m | 2h | 1h30m -> seconds."""
    import re

    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", t)
    if not parts or "".join(n + u for n, u in parts) != t:
        raise ValueError(f"cannot read {text!r} as a time; write seconds or e.g. 90s, 30m, 2h, 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def _plan_params(a, mid) -> dict:
    """PlanParams from the command line (and the dataset's token count from dataset/inspect)."""
    from .plan.hardware import parse_bytes

    p = {"model": mid, "lora": _lora(a), "batchSize": a.batch, "seqLen": a.seq, "gradAccum": a.grad_accum,
         "optimizer": a.optimizer, "activations": a.activations}
    if a.steps is not None:
        p["steps"] = a.steps
    if a.time_budget:
        try:
            p["timeBudgetSeconds"] = _seconds(a.time_budget)
        except ValueError as e:
            sys.exit(f"loralab plan: --time-budget: {e}")
    if a.memory_cap:
        try:
            p["memoryCapBytes"] = parse_bytes(a.memory_cap)
        except ValueError as e:
            sys.exit(f"loralab plan: --memory-cap: {e}")
    return p


def _show_plan(p: dict, mid: str, a) -> None:
    d = p["device"]
    print(f"plan for {mid}: batch {p['batchSize']} x seq {p['seqLen']}"
          + (f" x {p['gradAccum']} micro-batches" if p["gradAccum"] > 1 else "")
          + f", LoRA r={a.rank} on {a.targets}, {p['optimizer']} — {p['steps']:,} steps, {p['tokens']:,} tokens "
          f"({p['loraParameters']:,} trainable parameters)")
    print(f"device: {d['name']} ({d['type']}, {p['backend']}{', ' + d['api'] if d['api'] else ''})")
    avail = p["availableBytes"]
    print(f"\n  {'memory by part':<16} {'bytes':>12} {'of available':>13}")
    for part in p["parts"]:
        if part["bytes"]:
            frac = "" if part["fraction"] is None else f"{100 * part['fraction']:.1f}%"
            print(f"  {part['part']:<16} {_size(part['bytes']):>12} {frac:>13}")
    total = p["memory"]["total"]
    frac = f"{100 * total / avail:.1f}%" if avail else ""
    print(f"  {'total':<16} {_size(total):>12} {frac:>13}   (peak in {p['peakPhase']}; {p['memoryMeasuredAs']})")
    if p.get("loadBytes") is not None:
        print(f"  {'loading':<16} {_size(p['loadBytes']):>12} {'':>13}   (peak while the model loads)")
    if avail is not None:
        print(f"  {'available':<16} {_size(avail):>12} {'':>13}   ({p['availableSource']})")
    act = p.get("activations")
    if act is not None:
        t = {m: "" if act[m]["seconds"] is None else f", {_fmt_s(act[m]['seconds'])}" for m in ("keep", "recompute")}
        print(f"  activations: {act['mode']} — {act['reason']} (keep: {_size(act['keep']['memoryBytes'])}{t['keep']}; "
              f"recompute: {_size(act['recompute']['memoryBytes'])}{t['recompute']})")
    print()
    if p["fits"] is True:
        print(f"fits: {_size(avail - total)} to spare")
    elif p["fits"] is None:
        print("fits: unknown (the device does not say how much memory it has; pass --memory-cap)")
    else:
        print("DOES NOT FIT:")
        for e in p["exceeded"]:
            f = _size if e["unit"] == "bytes" else (lambda n: f"{n} positions")
            print(f"  {e['limit']}: {e['what']} needs {f(e['needed'])}, the limit is {f(e['available'])} "
                  f"— over by {f(e['over'])}")
            print(f"    change: {e['change']}")
    if p["tokensPerSecond"]:
        c = p["calibration"]
        print(f"time: ~{p['tokensPerSecond']:,.0f} tokens/s, {p['stepSeconds']:.3g} s/step, {_fmt_s(p['seconds'])} "
              f"for {p['steps']:,} steps (calibrated on this device, {c['clock']} clock, {c['shapes']} shapes, "
              f"fit residual {100 * c['residual']:.0f}%)")
    else:
        print("time: not predicted — this device is not calibrated for this model yet; run `loralab plan --calibrate`")
    adv = p["advice"]
    if adv["text"]:
        print("advice:")
        for t in adv["text"]:
            print(f"  {t}")
    if p["warnings"]:
        print("warnings:")
        for w in p["warnings"]:
            print(f"  {w}")


def cmd_plan(a):
    with _client() as c:
        mid = _ensure_model(c, a.model, a.backend)
        params = _plan_params(a, mid)
        if a.data:
            info = c.request("dataset/inspect", {"path": os.path.abspath(a.data), "model": mid, "seqLen": a.seq})
            params["datasetTokens"] = info["tokens"]
            params["dataset"] = os.path.abspath(a.data)  # its real batches are priced, as the trainer will cut them
            if a.steps is None:
                params["epochs"] = a.epochs or 1.0
            if not a.json:
                probs = f", {len(info['problems'])} problems (loralab train reports them)" if info["problems"] else ""
                print(f"dataset: {a.data}: {info['examples']:,} examples, {info['tokens']:,} tokens ({info['format']}{probs})")
        elif a.epochs is not None:
            sys.exit("loralab plan: --epochs needs --data PATH (the dataset's tokens set the run's length)")
        if a.calibrate:
            for ev in c.stream("plan/calibrate", {"model": mid, "refresh": a.refresh}):
                if not a.json and ev.get("message"):
                    print(f"calibrating: {ev['message']}", file=sys.stderr)
            cal = c.last_result
            if not a.json:
                how = "cached" if cal["cached"] else f"measured in {cal['seconds']:.1f} s"
                print(f"calibration: {how} ({len(cal['samples'])} shapes on {cal['device']['name']}, "
                      f"{cal['calibration']['clock']} clock)")
        p = c.request("plan/estimate", params)
        if a.json:
            print(json.dumps(p, indent=1))
            return
        _show_plan(p, mid, a)


def cmd_train(a):
    with _client() as c:
        if a.list:
            for j in c.request("train/list")["jobs"]:
                loss = "-" if j["loss"] is None else f"{j['loss']:.4f}"
                print(f"{j['jobId']}  {j['state']:<11} {j['adapter']:<20} {j['step']:>6}/{j['totalSteps']:<6} loss {loss}"
                      f"{'  (resumable)' if j['resumable'] else ''}")
            return
        if a.resume:
            r = _train_stream(c, "train/resume", {"jobId": a.resume, **({"lr": a.lr} if a.lr is not None else {})})
        else:
            if not a.data or not a.adapter:
                sys.exit("loralab train: give DATA and --adapter NAME (or --list / --resume ID)")
            mid = _ensure_model(c, a.model, a.backend)
            length = {"epochs": a.epochs} if a.epochs else {"steps": a.steps}
            params = {"model": mid, "dataset": os.path.abspath(a.data), "adapter": a.adapter, **length,
                      "batchSize": a.batch, "seqLen": a.seq, "lora": _lora(a),
                      "optimizer": {"lr": _T["optimizer"]["lr"] if a.lr is None else a.lr},
                      "warmupSteps": a.warmup, "seed": a.seed, "overwrite": a.overwrite, "pack": not a.no_pack,
                      "validationFraction": a.valid_fraction, "minLrRatio": a.min_lr_ratio, "keepLast": a.keep_last,
                      "evalAtStart": a.eval_at_start, "activations": a.activations}
            if a.valid:
                params["validation"] = os.path.abspath(a.valid)
            r = _train_stream(c, "train/start", params)
        if r:
            print(f"job {r['jobId']} {r['state']}: adapter {r['adapter']} after {r['step']} steps, loss {r['loss']:.4f}")


def _chat_once(c, mid, messages, a):
    params = {"model": mid, "messages": messages, "maxTokens": a.max_tokens, "temperature": a.temperature}
    if a.adapter:
        params["adapter"] = a.adapter
    text = ""
    try:
        for d in c.stream("generate", params):
            text += d["text"]
            sys.stdout.write(d["text"])
            sys.stdout.flush()
    except KeyboardInterrupt:  # stop generating (between two tokens), keep chatting
        c.cancel_current()
        try:
            c._run(c.current.result())
        except RpcError:
            pass
    print()
    return text


def cmd_eval(a):
    with _client() as c:
        mid = _ensure_model(c, a.model, a.backend)
        params = {"model": mid, "dataset": os.path.abspath(a.data), "seqLen": a.seq}
        if a.adapter:
            params["adapter"] = a.adapter
        r = c.request("evaluate", params)
    what = f"adapter {r['adapter']} (step {r['adapterStep']})" if r["adapter"] else "base model"
    print(f"{what} on {r['path']}: loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f} "
          f"({r['tokens']} labelled tokens, {r['examples']} examples)")
    return 0


def cmd_chat(a):
    with _client() as c:
        mid = _ensure_model(c, a.model, a.backend)
        if a.prompt:
            _chat_once(c, mid, [{"role": "user", "content": " ".join(a.prompt)}], a)
            return
        print(f"chatting with {mid}{' + ' + a.adapter if a.adapter else ''} (empty line or Ctrl-D ends)")
        msgs = []
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if not line.strip():
                break
            msgs.append({"role": "user", "content": line})
            msgs.append({"role": "assistant", "content": _chat_once(c, mid, msgs, a)})


def cmd_adapters(a):
    with _client() as c:
        ads = c.request("adapter/list")["adapters"]
        if not ads:
            print("no adapters yet (train one: loralab train DATA --adapter NAME, or loralab demo)")
        for x in ads:
            print(f"{x['name']:<24} r={x['r']:<3} alpha={x['alpha']:<5g} steps={x['steps']:<6} base={x['baseModel']}")


def cmd_export(a):
    with _client() as c:
        r = c.request("adapter/export", {"adapter": a.adapter, "format": a.format, "overwrite": a.overwrite,
                                         **({"path": os.path.abspath(os.path.expanduser(a.out))} if a.out else {})})
        print(f"{r['format']} export of {a.adapter}:")
        for f in r["files"]:
            print(f"  {f}")


def cmd_import(a):
    with _client() as c:
        mid = _ensure_model(c, a.model, a.backend)
        r = c.request("adapter/import", {"path": os.path.abspath(a.path), "name": a.name, "model": mid,
                                         "overwrite": a.overwrite})
    print(f"imported {a.path} as adapter {r['name']} (r={r['r']}, targets {', '.join(r['targets'])}) for {mid}")
    return 0


def cmd_demo(a):
    """Plan, train on the pirate demo with a live bar, then the base model's and the adapter's answers."""
    from .training.demo import DEMO_CONFIG, demo_dir, test_prompts

    cfg = DEMO_CONFIG
    with _client() as c:
        mid = _ensure_model(c, a.model, a.backend)
        lora = {"r": cfg["r"], "alpha": float(cfg["alpha"]), "targets": ["all"]}
        p = c.request("plan/estimate", {"model": mid, "lora": lora, "batchSize": cfg["batch_size"], "seqLen": cfg["seq_len"]})
        print(f"plan: {p['loraParameters']:,} trainable parameters, ~{_mb(p['memory']['total'])} to train "
              f"(weights {_mb(p['memory']['weights'])})")
        name = a.adapter
        length = {"steps": a.steps} if a.steps else {"epochs": float(cfg["epochs"])}
        r = _train_stream(c, "train/start", {
            "model": mid, "dataset": str(demo_dir()), "adapter": name, **length, "batchSize": cfg["batch_size"],
            "seqLen": cfg["seq_len"], "lora": lora, "optimizer": {"lr": cfg["lr"]}, "warmupSteps": cfg["warmup_steps"],
            "seed": cfg["seed"], "overwrite": True})
        if not r:
            return
        for q in test_prompts():
            msgs = [{"role": "user", "content": q}]
            base = c.request("generate", {"model": mid, "messages": msgs, "maxTokens": 48})["text"].strip()
            tuned = c.request("generate", {"model": mid, "messages": msgs, "maxTokens": 48, "adapter": name})["text"].strip()
            print(f"\nQ: {q}\n  base:    {base}\n  adapter: {tuned}")


def build_parser():
    ap = argparse.ArgumentParser(prog="loralab", description="LoRA Lab: fine-tune small language models with LoRA "
                                 "on your own machine, and chat with the result. Every command talks to the daemon "
                                 "(loralabd), starting it when none runs.")
    ap.add_argument("--backend", choices=["auto", "webgpu", "numpy"], default=None,
                    help="engine for models this command loads: auto (WebGPU on a hardware GPU, else numpy), "
                         "webgpu (any WebGPU adapter, software ones too) or numpy")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--detach", action="store_true", help="run in the background")
    s.add_argument("--stdio", action="store_true", help="serve over stdin/stdout (LSP framing), for editors")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--host", default=None)
    s.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (datasets and exports "
                   "then stay inside the data directory and the --allow-path folders)")
    s.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                   help="with --allow-remote: a folder clients may read datasets from and export to (repeatable)")
    s.set_defaults(fn=cmd_serve)
    sub.add_parser("status", help="is a daemon running, what does it hold").set_defaults(fn=cmd_status)
    sub.add_parser("stop", help="stop the daemon (running jobs checkpoint first)").set_defaults(fn=cmd_stop)

    s = sub.add_parser("models", help="list, load or unload models")
    s.add_argument("--load", metavar="SRC", help="GGUF file or HF directory ('default': SmolLM2-135M-Instruct)")
    s.add_argument("--name", help="id for --load")
    s.add_argument("--unload", metavar="ID")
    s.set_defaults(fn=cmd_models)

    def lora_args(s, steps=100):
        s.add_argument("--model", default="default", help="model id or path (default: SmolLM2-135M-Instruct)")
        s.add_argument("--rank", "-r", type=int, default=_T["lora"]["r"])
        s.add_argument("--alpha", type=float, default=None, help="default 2 x rank")
        s.add_argument("--targets", default="all", help="comma list: q,k,v,o,gate,up,down | attn | mlp | all")
        s.add_argument("--batch", type=int, default=_T["batchSize"])
        s.add_argument("--seq", type=int, default=_T["seqLen"])
        s.add_argument("--steps", type=int, default=steps)

    s = sub.add_parser("plan", help="will a training run fit, how long will it take, what to change",
                       description="Memory by part against what is available, every limit exceeded with what to "
                       "change, the largest batch and sequence that fit, and (once calibrated) tokens/s and time.")
    lora_args(s, steps=None)
    s.add_argument("--data", metavar="PATH", help="dataset: its tokens (dataset/inspect) set the run's length")
    s.add_argument("--epochs", type=float, default=None, help="passes over --data (default 1; --steps overrides)")
    s.add_argument("--grad-accum", type=int, default=_T["gradAccum"], help="micro-batches per optimizer step")
    s.add_argument("--optimizer", choices=["adamw", "adam8bit"], default=_T["optimizer"]["kind"])
    s.add_argument("--activations", choices=["auto", "keep", "recompute"], default=_T["activations"],
                   help="plan keeping activations, recomputing them, or auto: what train would choose (default)")
    s.add_argument("--time-budget", metavar="T", help="e.g. 90s, 30m, 2h: advise the largest rank that meets it")
    s.add_argument("--memory-cap", metavar="BYTES", help="memory the run may use, e.g. 6GiB (default: what the "
                   "device reports)")
    s.add_argument("--calibrate", action="store_true", help="time a few short training steps on this device first "
                   "(cached: once per device and model shape) so the plan predicts tokens/s and time")
    s.add_argument("--refresh", action="store_true", help="with --calibrate: measure again even when cached")
    s.add_argument("--json", action="store_true", help="print the PlanEstimate as JSON")
    s.set_defaults(fn=cmd_plan)

    s = sub.add_parser("train", help="train a LoRA adapter (live progress; Ctrl-C stops, resumable)")
    s.add_argument("data", nargs="?", help="JSONL (text | prompt/completion | messages), text file or folder")
    s.add_argument("--adapter", help="name to save the adapter under")
    lora_args(s)
    s.add_argument("--epochs", type=float, default=None, help="passes over the data (instead of --steps)")
    s.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {_T['optimizer']['lr']}); with "
                   "--resume: a new one for the rest of the run (lower, after it diverged)")
    s.add_argument("--warmup", type=int, default=_T["warmupSteps"])
    s.add_argument("--seed", type=int, default=_T["seed"])
    s.add_argument("--valid", metavar="PATH", help="validation data (default: valid.jsonl beside train.jsonl)")
    s.add_argument("--valid-fraction", type=float, default=_T["validationFraction"],
                   help="hold this fraction of the data out for validation")
    s.add_argument("--no-pack", action="store_true", help="one example a row (default: pack several)")
    s.add_argument("--min-lr-ratio", type=float, default=_T["minLrRatio"], help="the schedule's floor, x lr")
    s.add_argument("--keep-last", type=int, default=_T["keepLast"], help="checkpoints kept on disk")
    s.add_argument("--eval-at-start", action="store_true", help="validation loss before the first step too")
    s.add_argument("--activations", choices=["auto", "keep", "recompute"], default=_T["activations"],
                   help="keep every layer's activations (faster), recompute them in the backward (less memory), or "
                        "auto: keep when they fit (default)")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--list", action="store_true", help="list jobs")
    s.add_argument("--resume", metavar="JOB", help="continue an interrupted job (or a diverged one, with a lower --lr)")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("eval", help="validation loss and perplexity of the base model or an adapter on data")
    s.add_argument("data", help="JSONL, text file or folder (a folder's valid.jsonl when it has one)")
    s.add_argument("--model", default="default")
    s.add_argument("--adapter")
    s.add_argument("--seq", type=int, default=DEFAULTS["EvaluateParams"]["seqLen"])
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("chat", help="streaming chat with the base model or an adapter")
    s.add_argument("prompt", nargs="*")
    s.add_argument("--model", default="default")
    s.add_argument("--adapter")
    s.add_argument("--max-tokens", type=int, default=_G["maxTokens"])
    s.add_argument("--temperature", type=float, default=_G["temperature"])
    s.set_defaults(fn=cmd_chat)

    sub.add_parser("adapters", help="saved adapters").set_defaults(fn=cmd_adapters)
    s = sub.add_parser("export", help="write an adapter as PEFT, llama.cpp GGUF or MLX, or merged into its base")
    s.add_argument("adapter")
    s.add_argument("--format", choices=["peft", "gguf", "mlx", "merged"], default="peft")
    s.add_argument("--out", help="file (gguf) or folder to write; default: the data directory's exports")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier export at that path (a regular file, "
                   "or a folder of only that format's files)")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("import", help="store a PEFT adapter directory (to chat with it, export it, train on)")
    s.add_argument("path", help="a directory with adapter_model.safetensors and adapter_config.json")
    s.add_argument("--name", required=True, help="name to store it under")
    s.add_argument("--model", default="default", help="the model it belongs to (its shapes are checked)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_import)

    s = sub.add_parser("demo", help="plan, train the pirate demo, show base vs adapter answers")
    s.add_argument("--model", default="default")
    s.add_argument("--adapter", default="demo-pirate")
    s.add_argument("--steps", type=int, default=0, help="default: the demo's 2 epochs")
    s.set_defaults(fn=cmd_demo)
    return ap


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        a.fn(a)
    except RpcError as e:
        sys.exit(f"loralab {a.cmd}: {e.message}")
    except ConnectionError as e:
        sys.exit(f"loralab {a.cmd}: lost the daemon ({e}); running jobs were checkpointed — "
                 "`loralab train --list` shows them, `loralab train --resume JOB` continues one")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
