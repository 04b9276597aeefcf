"""A job's training run: protocol params -> loralabd.training.Trainer, and its StepReport -> TrainProgress."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .. import faults, paths
from ..engine.lora import LoraAdapter
from ..protocol import ErrorCode, with_defaults
from ..protocol.types import TrainProgress
from ..training.trainer import DivergedError, StepReport, first_nonfinite
from .adapters import save_adapter
from .errors import DomainError, finite

if TYPE_CHECKING:
    from ..engine.interface import Engine
    from ..models.args import ModelArgs
    from ..models.load import LoadedModel
    from ..training.packing import Dataset


class TrainRun:
    """One job's run on loralabd.training.Trainer (packing, schedule, clipping, validation, checkpoints).

    The manager calls step() once per turn of the model's queue; the trainer checkpoints itself every
    checkpointEvery steps and at the end (LoRA weights, optimizer and schedule state, data position).
    """

    def __init__(self, engine: Engine, model: LoadedModel, job_id: str, p: dict, resume: bool = False,
                 job: dict | None = None, need_checkpoint: bool = False, ds: Dataset | None = None):
        """job: what each checkpoint records of the job (to rebuild a lost journal); need_checkpoint: the job got
        past step 0, so a resume without a whole checkpoint left is refused rather than started over; ds: the job's
        data, tokenized (load_dataset, off the device thread), else read here."""
        from ..training.checkpoint import CheckpointError
        from ..training.data import DatasetError
        from ..training.trainer import TrainConfig, TrainError, Trainer

        self.engine, self.model, self.job_id, self.p = engine, model, job_id, p
        self.run_dir = paths.checkpoints_dir() / job_id
        try:
            cfg = TrainConfig.from_protocol(p)
            q = with_defaults("TrainParams", dict(p))
            ds = ds if ds is not None else load_dataset(model, p)
            self.tr = Trainer(engine, ds, cfg, run_dir=self.run_dir, resume=resume)
            if need_checkpoint and self.tr.last_checkpoint is None:
                raise CheckpointError(f"{self.run_dir}: no checkpoint left")
            self.tr.job = None if job is None else {**job, "totalSteps": self.tr.total_steps}
            if q["evalAtStart"] and self.tr.step_num == 0 and not self.tr.history:
                ev = self.tr.evaluate()  # step 0: the base model's loss on the validation data
                if ev:
                    self.tr.history.append({"step": 0, "tokens_seen": 0, **ev})
        except DatasetError as e:
            raise DomainError(ErrorCode.DatasetError, str(e)) from None
        except OSError as e:
            raise DomainError(ErrorCode.DatasetError, f"{p['dataset']}: {e}; check the path") from None
        except CheckpointError as e:
            raise DomainError(ErrorCode.JobNotResumable, f"job {job_id} cannot resume: {e}; its progress is lost, so "
                                                         "start a new job (train/start) with the same settings") from None
        except (TrainError, ValueError) as e:
            raise DomainError(ErrorCode.InvalidSettings, str(e)) from None
        self.total = self.tr.total_steps
        self.schedule = self.tr.schedule
        self.last: StepReport | None = None  # the newest step report

    @property
    def note(self) -> str | None:
        """The activation mode chosen and why (GPU engines), and what a resume passed over: the damaged checkpoints
        (set aside) and the step it continued from."""
        out = [] if self.tr.engine.backend == "numpy" else [self.tr.activations.reason]
        if self.tr.passed_over:
            lc = self.tr.last_checkpoint
            gone = "; ".join(f"{why} (set aside as {where.name})" for where, why in self.tr.passed_over)
            out.append(f"resumed from {lc.name if lc else 'step 0'} (step {self.tr.step_num}), the newest whole "
                       f"checkpoint: {gone}")
        return "; ".join(out) or None

    @property
    def done(self) -> bool:
        return self.tr.done

    @property
    def step_count(self) -> int:
        return self.tr.step_num

    @property
    def tokens_seen(self) -> int:
        return self.tr.tokens_seen

    @property
    def last_loss(self) -> float | None:
        return self.tr.last_loss

    def step(self) -> StepReport | None:
        """One optimizer step (None when the data ran out: an epoch-bounded run)."""
        faults.point("step")  # a test may kill the daemon here (mid-run)
        rep = self.tr.step()
        if rep is not None:
            self.last = rep
        return rep

    def progress(self) -> TrainProgress:
        """The protocol's TrainProgress of this run now: the one place a step report becomes the wire's."""
        rep, tr = self.last, self.tr
        out: TrainProgress = {"jobId": self.job_id, "step": tr.step_num, "totalSteps": self.total, "loss": finite(tr.last_loss),
               "lr": float(rep.lr if rep is not None else self.schedule(tr.step_num)),
               "tokensPerSecond": float(rep.tokens_per_s if rep is not None else 0.0),
               "tokensSeen": int(tr.tokens_seen), "targetsSeen": int(tr.targets_seen),
               "etaSeconds": None if rep is None or rep.eta_s is None else float(rep.eta_s),
               "gradNorm": None, "valLoss": None}
        for h in reversed(tr.history):
            if h.get("grad_norm") is not None and out["gradNorm"] is None:
                out["gradNorm"] = finite(h["grad_norm"])
            if h.get("val_loss") is not None and out["valLoss"] is None:
                out["valLoss"] = finite(h["val_loss"])
        return out

    def save_checkpoint(self) -> Path:
        lc = self.tr.last_checkpoint
        if lc is not None and lc.name == f"step-{self.tr.step_num:08d}" and lc.exists():
            return lc  # the trainer just saved this step
        return self.tr.save()

    @property
    def last_checkpoint(self):
        return self.tr.last_checkpoint

    @property
    def saved_step(self) -> int:
        """The step of the last whole checkpoint (0: none yet): where a resume continues."""
        lc = self.tr.last_checkpoint
        return 0 if lc is None else int(lc.name.split("-")[1])

    def snapshot(self) -> LoraAdapter:
        return self.tr.adapter()

    def diverged(self, e: DivergedError) -> str:
        """The failed job's error: where the run diverged, with what value, and what to do next."""
        lr = self.tr.cfg.lr
        if self.tr.last_checkpoint is None:
            return (f"{e}; no checkpoint was written before it, so start again with a lower learning rate "
                    f"(optimizer.lr, {lr:g} now), a lower weightDecay, or maxGradNorm")
        return (f"{e}; the checkpoint of step {self.saved_step} is kept: resume it with a lower learning rate "
                f"(train/resume with lr below {lr:g}; loralab train --resume {self.job_id} --lr ...), or start again "
                "with other settings")

    def save_adapter(self, base_source: str) -> Path:
        ad = self.snapshot()
        bad = first_nonfinite({**{f"{k}.lora_A": a for k, a in ad.A.items()}, **{f"{k}.lora_B": b for k, b in ad.B.items()}})
        if bad is not None:  # a saved adapter (overwrite: true) is never replaced by a broken one
            raise DivergedError(self.step_count, f"the LoRA weights ({bad[0]})", bad[1])
        return save_adapter(self.p["adapter"], ad, self.model.args, base_source,
                            {"steps": self.step_count, "jobId": self.job_id, "loss": self.last_loss,
                             "baseName": self.model.name})


@contextlib.contextmanager
def dataset_errors(dataset: object) -> Iterator[None]:
    """Reading a job's data (train/start, plan/estimate with a dataset): what goes wrong, as the protocol's errors."""
    from ..training.data import DatasetError
    from ..training.trainer import TrainError

    try:
        yield
    except DatasetError as e:
        raise DomainError(ErrorCode.DatasetError, str(e)) from None
    except OSError as e:
        raise DomainError(ErrorCode.DatasetError, f"{dataset}: {e}; check the path") from None
    except (TrainError, ValueError) as e:
        raise DomainError(ErrorCode.InvalidSettings, str(e)) from None


def load_dataset(model: LoadedModel, p: dict) -> Dataset:
    """A job's data (train/start params), read and tokenized: the slow part of starting a job, so the manager runs
    it on a data thread, off the model's queue. Progress goes to the log."""
    import logging

    from ..training.packing import Dataset
    from ..training.trainer import TrainConfig

    log = logging.getLogger("loralabd.training")
    said = [0.0]

    def told(done: int, total: int) -> None:
        if time.monotonic() - said[0] >= 5.0:
            said[0] = time.monotonic()
            log.info("%s: read %.0f of %.0f MiB", p["dataset"], done / 2**20, total / 2**20)

    with dataset_errors(p["dataset"]):
        cfg = TrainConfig.from_protocol(p)
        q = with_defaults("TrainParams", dict(p))
        ds = Dataset.load(p["dataset"], model.tokenizer, valid=q.get("validation"),
                          valid_fraction=float(q["validationFraction"]), seed=cfg.seed, max_seq_len=cfg.seq_len,
                          progress=told)
    if not ds.train:
        lines = "; ".join(str(x) for x in ds.problems[:5])
        raise DomainError(ErrorCode.DatasetError, f"{p['dataset']}: no usable example" + (f" ({lines})" if lines else "")
                          + "; fix the data or pick another dataset")
    return ds


def disk_need(p: dict, args: ModelArgs, resume: bool = False) -> int:
    """About the bytes a job of these settings writes: keepLast checkpoints (one more while the newest is written;
    a resume has its older ones already) of LoRA A and B, two optimizer moments (f32) and the metrics history,
    then the adapter. 0 when the settings do not parse (the job's own checks say why)."""
    from ..training.trainer import TrainConfig

    try:
        cfg = TrainConfig.from_protocol(p)
        lora = cfg.lora
        n = sum(lora.r * sum(args.linear_shape(t)) for _ in lora.layer_ids(args.num_hidden_layers) for t in lora.targets)
    except Exception:
        return 0
    checkpoint = 12 * n + 200 * (cfg.max_steps or 1000) + 8192
    return (1 if resume else max(cfg.keep_last, 1) + 1) * checkpoint + 4 * n
