"""What the daemon runs on the device thread: engines, training runs, generation, adapters, plans.

Everything here is called from the one device thread (manager.py), never from the event loop. It is
the seam to the rest of the package: engine.select, training.Trainer, generation, plan, the adapter store.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..engine.lora import LoraAdapter, LoraConfig
from ..errors import LoraLabError
from .. import paths


class DomainError(LoraLabError):
    """An error with a protocol error name (protocol.json `errors`), raised to reach the client as-is."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


# -- engines -------------------------------------------------------------------------------------------

def make_engine(model, backend: str = "auto"):
    """The engine for a loaded model (engine.select: `auto` takes WebGPU on a hardware adapter, else numpy)."""
    try:
        from ..engine.select import make_engine as select
    except ImportError:
        select = None
    if select is None:
        if backend == "webgpu":
            raise DomainError("BackendUnavailable", "the WebGPU engine is not in this build; use backend 'numpy' or 'auto'")
        from ..engine.numpy_engine import NumpyEngine

        return NumpyEngine(model)
    try:
        return select(model, backend)
    except Exception as e:  # no adapter, a driver that fails to start: never the daemon's end
        raise DomainError("BackendUnavailable", f"backend {backend!r} cannot start here: {e}") from e


def device_probe() -> dict:
    """What `auto` picks and the WebGPU adapter, if any (runs on the device thread: it may open the device)."""
    from ..engine.select import choose_backend, webgpu_adapter_info

    info = webgpu_adapter_info()
    return {"backend": choose_backend("auto"), "adapter": info}


def available_backends() -> list[str]:
    out = ["numpy"]
    try:
        import importlib.util

        if importlib.util.find_spec("loralabd.engine.select") and importlib.util.find_spec("wgpu"):
            out.insert(0, "webgpu")
    except Exception:
        pass
    return out


def lora_config(s: dict | None) -> LoraConfig:
    s = s or {}
    try:
        return LoraConfig(r=s.get("r", 8), alpha=float(s.get("alpha", 2 * s.get("r", 8))), dropout=s.get("dropout", 0.0),
                          use_rslora=s.get("useRslora", False), targets=tuple(s.get("targets") or ("all",)),
                          layers=None if s.get("layers") is None else tuple(s["layers"]))
    except ValueError as e:
        raise DomainError("InvalidSettings", str(e)) from None


# -- adapters on disk (loralabd.adapters.AdapterStore: PEFT directories + loralab.json) ----------------

def _store():
    from ..adapters import AdapterStore

    return AdapterStore()


def save_adapter(name: str, adapter: LoraAdapter, args, base_model: str, meta: dict):
    return _store().save(name, adapter, args, base_model=base_model, meta={**meta, "args": args.to_dict()})


def adapter_meta(name: str) -> dict:
    from ..adapters import AdapterStoreError

    try:
        return _store().info(name)
    except AdapterStoreError as e:
        raise DomainError("AdapterNotFound", f"{e} (loralab adapters)") from None


def load_adapter(name: str, args) -> tuple[LoraAdapter, dict]:
    """A stored adapter, checked against the base it is about to be used with."""
    from ..adapters import AdapterStoreError

    meta = adapter_meta(name)
    try:
        return _store().load(name, args), meta
    except (AdapterStoreError, ValueError) as e:
        raise DomainError("InvalidSettings", str(e)) from None


def _info(meta: dict) -> dict:
    c = meta.get("config", {})
    return {"name": meta["name"], "path": str(paths.adapters_dir() / meta["name"]), "baseModel": meta.get("base_model") or "",
            "r": int(c.get("r", 0)), "alpha": float(c.get("alpha", 0.0)), "targets": list(c.get("targets", [])),
            "steps": int(meta.get("steps", 0)), "jobId": meta.get("jobId")}


def adapter_info(name: str) -> dict | None:
    try:
        return _info(adapter_meta(name))
    except DomainError:
        return None


def list_adapters() -> list[dict]:
    return [_info(m) for m in _store().list() if "name" in m]


# -- training ------------------------------------------------------------------------------------------

class TrainRun:
    """One job's run on loralabd.training.Trainer (packing, schedule, clipping, validation, checkpoints).

    The manager calls step() once per turn of the model's queue; the trainer checkpoints itself every
    checkpointEvery steps and at the end (LoRA weights, optimizer and schedule state, data position).
    """

    def __init__(self, engine, model, job_id: str, p: dict, resume: bool = False):
        from ..training.data import DatasetError
        from ..training.packing import Dataset
        from ..training.trainer import TrainConfig, TrainError, Trainer

        self.engine, self.model, self.job_id, self.p = engine, model, job_id, p
        self.run_dir = paths.checkpoints_dir() / job_id
        lora, opt = p.get("lora") or {}, p.get("optimizer") or {}
        r = int(lora.get("r", 8))
        try:
            cfg = TrainConfig(r=r, alpha=float(lora.get("alpha", 2 * r)), dropout=float(lora.get("dropout", 0.0)),
                              use_rslora=bool(lora.get("useRslora", False)),
                              targets=lora_config(lora).targets, layers=lora.get("layers"),
                              optimizer=opt.get("kind", "adamw"), lr=float(opt.get("lr", 2e-4)),
                              betas=tuple(opt.get("betas", (0.9, 0.999))), eps=float(opt.get("eps", 1e-8)),
                              weight_decay=float(opt.get("weightDecay", 0.0)), max_grad_norm=p.get("maxGradNorm", 1.0),
                              lr_schedule=p.get("schedule", "cosine"), warmup_steps=int(p.get("warmupSteps", 0)),
                              seq_len=int(p.get("seqLen", 256)), batch_size=int(p.get("batchSize", 4)),
                              grad_accum=int(p.get("gradAccum", 1)), max_steps=p.get("steps"), epochs=p.get("epochs"),
                              eval_every=int(p.get("evalEvery", 0)),
                              save_every=int(p.get("checkpointEvery", 50)), seed=int(p.get("seed", 0)))
            ds = Dataset.load(p["dataset"], model.tokenizer, max_seq_len=cfg.seq_len)
            if not ds.train:
                lines = "; ".join(str(x) for x in ds.problems[:5])
                raise DomainError("DatasetError", f"{p['dataset']}: no usable example" + (f" ({lines})" if lines else "")
                                  + "; fix the data or pick another dataset")
            self.tr = Trainer(engine, ds, cfg, run_dir=self.run_dir, resume=resume)
        except DatasetError as e:
            raise DomainError("DatasetError", str(e)) from None
        except OSError as e:
            raise DomainError("DatasetError", f"{p['dataset']}: {e}; check the path") from None
        except (TrainError, ValueError) as e:
            raise DomainError("InvalidSettings", str(e)) from None
        self.total = self.tr.total_steps
        self.last_loss: float | None = self.tr.history[-1]["loss"] if self.tr.history else None
        self.schedule = self.tr.schedule

    @property
    def done(self) -> bool:
        return self.tr.done

    @property
    def step_count(self) -> int:
        return self.tr.step_num

    @property
    def tokens_seen(self) -> int:
        return self.tr.tokens_seen

    def step(self) -> dict:
        m = self.tr.step()
        if m is None:  # the data ran out (an epoch-bounded run)
            return {"loss": self.last_loss, "lr": 0.0, "tokens": 0, "gradNorm": None}
        self.last_loss = float(m["loss"])
        out = {"loss": self.last_loss, "lr": float(m["lr"]), "tokens": int(m["tokens"]),
               "gradNorm": finite(m.get("grad_norm"))}
        if "val_loss" in m:
            out["valLoss"] = float(m["val_loss"])
        return out

    @property
    def last_checkpoint(self):
        return self.tr.last_checkpoint

    def save_checkpoint(self) -> Path:
        lc = self.tr.last_checkpoint
        if lc is not None and lc.name == f"step-{self.tr.step_num:08d}" and lc.exists():
            return lc  # the trainer just saved this step
        return self.tr.save()

    def snapshot(self) -> LoraAdapter:
        return self.tr.adapter()

    def save_adapter(self, base_source: str) -> Path:
        return save_adapter(self.p["adapter"], self.snapshot(), self.model.args, base_source,
                            {"steps": self.step_count, "jobId": self.job_id, "loss": self.last_loss,
                             "baseName": self.model.name})


# -- generation ------------------------------------------------------------------------------------------

def generation(engine, model, p: dict, adapters):
    """A loralabd.generation Generation for a `generate` request (iterate it on the device thread)."""
    from ..generation import GenerationError, GenerationRequest, GenerationService

    if (p.get("messages") is None) == (p.get("prompt") is None):
        raise DomainError("InvalidSettings", "give messages (a chat) or prompt (raw text), exactly one")
    req = GenerationRequest(messages=p.get("messages"), prompt=p.get("prompt"), max_tokens=int(p.get("maxTokens", 256)),
                            temperature=float(p.get("temperature", 0.0)), top_k=int(p.get("topK", 0)),
                            top_p=float(p.get("topP", 1.0)) or 1.0, seed=int(p.get("seed", 0)),
                            stop=[x for x in p.get("stop", []) if x], adapters=adapters)
    try:
        return GenerationService(engine, model.tokenizer).stream(req)
    except GenerationError as e:
        raise DomainError("InvalidSettings", str(e)) from None
    except LoraLabError as e:  # e.g. a model without a chat template
        raise DomainError("InvalidSettings", str(e)) from None


# -- plan ----------------------------------------------------------------------------------------------

def plan_estimate(model, engine, p: dict) -> dict:
    """plan/estimate through loralabd.plan (issue 7): memory by part, limits, advice, time once calibrated."""
    try:
        from ..plan import plan_from_params
    except ImportError as e:
        raise DomainError("FeatureUnavailable", f"planning is not in this build ({e}); update LoRA Lab") from None
    try:
        return plan_from_params(model, p, engine)
    except (ValueError, LoraLabError) as e:
        raise DomainError("InvalidSettings", str(e)) from None


def _plan():
    try:
        from .. import plan
        from ..plan import calibrate
    except ImportError as e:
        raise DomainError("FeatureUnavailable", f"planning is not in this build ({e}); update LoRA Lab") from None
    return plan, calibrate


def calibration_start(engine, model, clock: str, refresh: bool):
    """(device, the cached Calibration or None, the shapes still to time) for plan/calibrate."""
    _, cal = _plan()
    from ..plan.hardware import describe

    device = describe(engine)
    hit = None if refresh else cal.cached(device, model, clock)
    return device, hit, ([] if hit is not None else cal.plan_shapes(engine, device))


def time_shape(engine, cfg, batch: int, seq: int, clock: str, repeats: int) -> dict:
    """One calibration shape: a warm-up step, then the best of `repeats` timed steps."""
    return _plan()[1].time_shape(engine, cfg, batch, seq, clock, repeats)


def calibration_finish(engine, device, clock: str, samples: list, seconds: float):
    """Fit the timed shapes and cache the calibration (every later plan/estimate predicts time with it)."""
    _, cal = _plan()
    c = cal.finish(engine, device, clock, samples, seconds)
    cal.save(c)
    return c


def calibration_result(model_id: str, engine, device, cal, cached: bool, seconds: float) -> dict:
    """The protocol's CalibrateResult."""
    from ..plan.estimate import protocol_calibration, protocol_device

    return {"model": model_id, "backend": getattr(engine, "backend", "numpy"), "device": protocol_device(device),
            "cached": cached, "seconds": float(seconds), "calibration": protocol_calibration(cal),
            "samples": [{"batch": int(s["batch"]), "seq": int(s["seq"]), "r": int(s["r"]),
                         "accumulateSeconds": float(s["accumulate_s"]), "stepSeconds": float(s["step_s"])}
                        for s in cal.samples]}


def finite(x) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)
