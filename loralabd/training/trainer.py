"""The trainer: LoRA on either engine through the train-session interface (engine/interface.py).

Trainer.step() runs one optimizer step (its micro-batches, clipping and the update: one submit on a
GPU) and returns a StepReport, so the daemon can yield its model's queue between steps; run() loops
with a callback. Losses and gradient norms stay on the device and are read at report cadence (at most
every `report_interval` seconds), at evaluations, checkpoints and the end — a report between reads has
loss None. Everything random is counter-based — the data order of epoch e is a function of (seed, e),
dropout masks of (seed, step, micro-batch) — so a checkpoint's (step, epoch, row) restores the run exactly.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, asdict, field, fields, replace
from pathlib import Path

import numpy as np

from ..engine.interface import Engine, OptimSettings
from ..engine.lora import LoraAdapter, LoraConfig
from ..errors import LoraLabError
from ..models.args import LINEAR_NAMES
from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, newest_good_checkpoint, read_checkpoint, \
    save_checkpoint, set_aside
from .packing import Dataset, DataStream, eval_batches
from .schedule import Schedule

# fields a resumed run may change without changing the run's arithmetic
# (activations: keeping and recomputing them give the same bits; checkpoints from before the setting have none)
RESUME_FREE = ("eval_every", "eval_batches", "save_every", "keep_last", "log_every", "activations")
# ... and the peak learning rate, which a resume may lower on purpose (after a run diverged): the schedule keeps its shape
RESUME_NEW_LR = ("lr",)


class TrainError(LoraLabError):
    """Training cannot start or resume as asked; the message says what to change."""


class DivergedError(TrainError):
    """The loss, the gradient norm or the LoRA weights stopped being finite: the run cannot go on, and nothing
    non-finite is written (no checkpoint, no adapter). str() starts with DIVERGED and names the step and the value."""

    def __init__(self, step: int, what: str, value: float):
        super().__init__(f"{DIVERGED} at step {step}: {what} is {value}")
        self.step, self.what, self.value = step, what, value


DIVERGED = "diverged"


def first_nonfinite(arrays: dict[str, np.ndarray]) -> tuple[str, float] | None:
    """(name, a value) of the first float array holding NaN or inf, else None."""
    for k, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            return k, float(a[~np.isfinite(a)].flat[0])
    return None


@dataclass
class TrainConfig:
    # LoRA
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    targets: tuple = LINEAR_NAMES
    layers: tuple | None = None
    # optimizer
    optimizer: str = "adamw"  # adamw | adam8bit
    lr: float = 2e-4
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    # schedule
    lr_schedule: str = "cosine"  # cosine | linear | constant
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0  # used when warmup_steps is None
    min_lr_ratio: float = 0.0
    # batches
    seq_len: int = 512
    batch_size: int = 4
    grad_accum: int = 1
    pack: bool = True
    shuffle: bool = True
    # when to stop (the first given wins: steps, then tokens, then epochs; none given: 1 epoch)
    max_steps: int | None = None
    max_tokens: int | None = None
    epochs: float | None = None
    # evaluation and checkpoints
    eval_every: int = 0  # 0: only at the end
    eval_batches: int | None = None  # cap on validation batches per evaluation
    save_every: int = 0  # 0: only at the end (when a run_dir is given)
    keep_last: int = 3
    log_every: int = 1
    seed: int = 0
    activations: str = "auto"  # auto | keep | recompute (plan/activations.py)

    def __post_init__(self):
        self.targets = tuple(self.targets)
        self.betas = tuple(float(b) for b in self.betas)
        if self.layers is not None:
            self.layers = tuple(self.layers)
        if self.optimizer not in ("adamw", "adam8bit"):
            raise TrainError(f"optimizer must be 'adamw' or 'adam8bit', not {self.optimizer!r}")
        for k in ("batch_size", "grad_accum", "seq_len"):
            if getattr(self, k) < 1:
                raise TrainError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.lr <= 0:
            raise TrainError(f"lr must be > 0, got {self.lr}")
        if self.activations not in ("auto", "keep", "recompute"):
            raise TrainError(f"activations must be 'auto', 'keep' or 'recompute', not {self.activations!r}")

    @property
    def lora(self) -> LoraConfig:
        return LoraConfig(r=self.r, alpha=self.alpha, dropout=self.dropout, use_rslora=self.use_rslora,
                          targets=self.targets, layers=self.layers)

    def optim(self) -> OptimSettings:
        return OptimSettings(kind=self.optimizer, betas=(self.betas[0], self.betas[1]), eps=self.eps,
                             weight_decay=self.weight_decay, seed=self.seed)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"], d["betas"] = list(self.targets), list(self.betas)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_protocol(cls, params: dict | None) -> "TrainConfig":
        """The protocol's TrainParams (camelCase, as on the wire; model, dataset and adapter are the caller's)
        -> TrainConfig: the one place they are read. Every default comes from protocol/protocol.json; settings
        the wire does not carry (warmup_ratio, eval_batches, ...) keep TrainConfig's own. A wrong value
        raises ValueError or TrainError naming the wire field (`optimizer.lr`, `seqLen`)."""
        from ..protocol.validate import read_settings

        given = params or {}
        q = read_settings("TrainParams", given)
        lora = LoraConfig.from_protocol(q["lora"], "lora")
        opt = q["optimizer"]
        if not opt["lr"] > 0:
            raise TrainError(f"optimizer.lr must be > 0, got {opt['lr']}")
        betas = opt["betas"]
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise TrainError(f"optimizer.betas must be two numbers in [0, 1) (beta1, beta2), got {betas}")
        steps = q.get("steps")
        return cls(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, use_rslora=lora.use_rslora, targets=lora.targets,
                   layers=lora.layers, optimizer=opt["kind"], lr=float(opt["lr"]), betas=tuple(float(b) for b in betas),
                   eps=float(opt["eps"]), weight_decay=float(opt["weightDecay"]),
                   max_grad_norm=None if q["maxGradNorm"] is None else float(q["maxGradNorm"]),
                   lr_schedule=q["schedule"], warmup_steps=int(q["warmupSteps"]), seq_len=int(q["seqLen"]),
                   batch_size=int(q["batchSize"]), grad_accum=int(q["gradAccum"]),
                   max_steps=None if steps is None else int(steps),
                   # epochs counts only without steps (a given one is kept as given: a resume compares settings)
                   epochs=float(q["epochs"]) if steps is None else given.get("epochs"),
                   eval_every=int(q["evalEvery"]), save_every=int(q["checkpointEvery"]), seed=int(q["seed"]),
                   pack=bool(q["pack"]), min_lr_ratio=float(q["minLrRatio"]), keep_last=int(q["keepLast"]),
                   activations=q["activations"])


def _fingerprint(examples) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(e.ids.tobytes())
        h.update(np.packbits(e.mask).tobytes())
    return h.hexdigest()[:24]


@dataclass
class StepReport:
    """One optimizer step, as the trainer saw it. loss and grad_norm are None when they were not read
    back at this step (reads happen at report cadence); the step's history entry gets them later."""

    step: int
    total_steps: int
    lr: float
    tokens: int  # non-padding tokens in the step's rows
    target_tokens: int  # labelled positions (the tokens the loss trains on)
    tokens_seen: int  # non-padding tokens so far in the run
    targets_seen: int  # labelled positions so far in the run
    epoch: float
    step_time_s: float  # host time of this step (the device may still be running it)
    tokens_per_s: float  # non-padding tokens a second over the steps of the last read window
    eta_s: float | None
    loss: float | None = None
    grad_norm: float | None = None
    val_loss: float | None = None
    val_ppl: float | None = None
    checkpoint: Path | None = None  # written at this step
    memory_bytes: int = 0


@dataclass
class _Clock:
    started: float = field(default_factory=time.perf_counter)
    steps: int = 0  # steps timed in this process (a resumed run starts a new clock)
    seconds: float = 0.0


class Trainer:
    def __init__(self, engine: Engine, dataset: Dataset, config: TrainConfig, run_dir=None, resume=False,
                 adapter: LoraAdapter | None = None, report_interval: float = 0.25, ahead: bool | None = None):
        """ahead: at a read of the metrics, submit the next step first, so the device works through the read
        (None: on GPU engines, whose steps run asynchronously; the numpy engine computes a step in step())."""
        self.engine, self.data, self.cfg = engine, dataset, config
        self.run_dir = Path(run_dir) if run_dir else None
        tok = dataset.tokenizer
        pad = (tok.eos_id if tok is not None and tok.eos_id is not None else 0)
        c = config
        self.stream = DataStream(dataset.train, c.seq_len, c.batch_size, pad, c.seed, c.shuffle, c.pack)
        self.valid = eval_batches(dataset.valid, c.seq_len, c.batch_size, pad, c.pack, c.eval_batches)
        self.total_steps = self._plan_steps()
        warm = c.warmup_steps if c.warmup_steps is not None else int(math.ceil(c.warmup_ratio * self.total_steps))
        self.schedule = Schedule(c.lr, self.total_steps, min(warm, self.total_steps), c.lr_schedule, c.min_lr_ratio)
        if adapter is None:
            adapter = LoraAdapter.init(engine.args, c.lora, seed=c.seed)
        from ..plan.estimate import activations_for_engine

        # keep activations when they fit, else recompute them: the same bits either way
        self.activations = activations_for_engine(engine, c.lora, c.batch_size, c.seq_len, c.optimizer, c.activations)
        self.sess = engine.train_session(adapter, replace(c.optim(), recompute=self.activations.recompute))
        self.sess.reserve(c.batch_size, c.seq_len)  # micro-batches are at most this: one program from step 0
        self.step_num = 0
        self.tokens_seen = 0
        self.targets_seen = 0
        self.report_interval = report_interval
        self._last_read = time.perf_counter()
        self._window: tuple[float, int] = (time.perf_counter(), 0)  # (start, tokens) of the throughput window
        self._rate = 0.0
        self.history: list[dict] = []  # per-step metrics (and eval results) of the whole run
        self.data_hash = _fingerprint(dataset.train)
        self.exhausted = False
        self.stop_requested = False
        self.ahead = engine.backend != "numpy" if ahead is None else bool(ahead)
        self._ahead: tuple[list, float] | None = None  # a step submitted ahead of its report: (micro-batches, lr)
        self._clock = _Clock()
        self.last_checkpoint: Path | None = None
        self.job: dict | None = None  # the daemon's job (id, params, ...), kept in each checkpoint to rebuild its journal
        self.passed_over: list[tuple[Path, str]] = []  # damaged checkpoints a resume set aside: (where now, why)
        if resume:
            src = resume if isinstance(resume, (str, Path)) else self.run_dir
            if src is None:
                raise TrainError("resume needs a run directory; pass run_dir=... or resume=<checkpoint dir>")
            if latest_checkpoint(src) is not None or (Path(src) / "trainer.json").exists():
                self.load(src)

    # -- planning ------------------------------------------------------------------------------------

    def _plan_steps(self) -> int:
        c = self.cfg
        per_step = c.batch_size * c.grad_accum
        if c.max_steps is not None:
            return int(c.max_steps)
        if c.max_tokens is not None:
            tok_per_row = self.stream.lengths.sum() / len(self.stream.rows(0))
            return max(1, math.ceil(c.max_tokens / (tok_per_row * per_step)))
        epochs = 1.0 if c.epochs is None else float(c.epochs)
        rows = sum(len(self.stream.rows(e)) for e in range(int(epochs)))
        if epochs > int(epochs):
            rows += math.ceil((epochs - int(epochs)) * len(self.stream.rows(int(epochs))))
        self.stream.rows(0)
        return max(1, math.ceil(rows / per_step))

    @property
    def done(self) -> bool:
        c = self.cfg
        if self.exhausted or self.step_num >= self.total_steps:
            return True
        if c.max_steps is None and c.max_tokens is not None and self.tokens_seen >= c.max_tokens:
            return True
        return False

    # -- one optimizer step ----------------------------------------------------------------------------

    def step(self) -> StepReport | None:
        """One optimizer step: grad_accum micro-batches, clip, update; eval and checkpoint when due."""
        if self.done:
            return None
        c = self.cfg
        t0 = time.perf_counter()
        if self._ahead is not None:  # submitted at the last read
            batches, lr = self._ahead
            self._ahead = None
        else:
            batches = self._next_batches()
            if batches:
                lr = self.schedule(self.step_num)
                self.sess.step(batches, lr, c.max_grad_norm)
        if not batches:
            self.exhausted = True
            self.read_metrics()
            return None
        n_tokens, n_targets = self._account(batches, lr)
        due_eval = self.done or bool(c.eval_every and self.step_num % c.eval_every == 0)
        due_save = self.run_dir is not None and (self.done or bool(c.save_every and self.step_num % c.save_every == 0))
        now = time.perf_counter()
        read = due_eval or due_save or now - self._last_read >= self.report_interval
        if read:
            if self.ahead and not (due_eval or due_save or self.stop_requested):
                self._submit_ahead()  # the device runs the next step while this one's metrics come back
            self.read_metrics()
        dt = time.perf_counter() - t0
        self._clock.steps += 1
        self._clock.seconds += dt
        h = self.history[-1]
        rep = StepReport(step=self.step_num, total_steps=self.total_steps, lr=lr, tokens=n_tokens,
                         target_tokens=n_targets, tokens_seen=self.tokens_seen, targets_seen=self.targets_seen,
                         epoch=h["epoch"], step_time_s=dt, tokens_per_s=self._rate, eta_s=self._eta(),
                         loss=h.get("loss"), grad_norm=h.get("grad_norm"), memory_bytes=self.engine.memory_in_use())
        if due_eval:
            ev = self.evaluate()
            if ev:
                h.update(ev)
                rep.val_loss, rep.val_ppl = ev["val_loss"], ev["val_ppl"]
        if due_save:
            rep.checkpoint = self.save()
        return rep

    def _next_batches(self) -> list:
        """The next step's micro-batches from the stream ([] when it ran dry)."""
        c = self.cfg
        # stop by epochs only when neither steps nor tokens are given (then the stream just cycles)
        max_epochs = None if (c.max_steps is not None or c.max_tokens is not None) else (c.epochs or 1.0)
        batches = []
        for _ in range(c.grad_accum):
            b = self.stream.next_batch(max_epochs)
            if b is None:
                break
            batches.append(b)
        return batches

    def _account(self, batches: list, lr: float) -> tuple[int, int]:
        """A submitted step into the counts and the history."""
        self.step_num += 1
        n_tokens = sum(b.n_tokens for b in batches)
        n_targets = sum(b.n_targets for b in batches)
        self.tokens_seen += n_tokens
        self.targets_seen += n_targets
        self.history.append({"step": self.step_num, "lr": lr, "tokens": n_tokens, "target_tokens": n_targets,
                             "tokens_seen": self.tokens_seen, "epoch": self.stream.epoch_float()})
        return n_tokens, n_targets

    def _submit_ahead(self) -> None:
        """Submit the next step now (when the run goes on): its report comes from the next step() call."""
        if self.done:
            return
        batches = self._next_batches()
        lr = self.schedule(self.step_num)
        if batches:
            self.sess.step(batches, lr, self.cfg.max_grad_norm)
        self._ahead = (batches, lr)  # [] : the stream ran dry, which the next step() reports

    def settle(self) -> None:
        """Count the step submitted ahead, if any, as done (before a checkpoint: the state holds it)."""
        if self._ahead is not None and self._ahead[0]:
            batches, lr = self._ahead
            self._ahead = None
            self._account(batches, lr)

    def read_metrics(self) -> None:
        """Read the device's losses and gradient norms into the history (a sync on GPU engines; a step submitted
        ahead stays in flight). DivergedError when one is not finite: the run stops there, before its next
        checkpoint."""
        got = self.sess.metrics(lag=1 if self._ahead is not None and self._ahead[0] else 0)
        now = time.perf_counter()
        self._last_read = now
        # got covers the last len(got) steps, oldest first
        for h, m in zip(self.history[len(self.history) - len(got):], got):
            h["loss"], h["grad_norm"] = m.loss, m.grad_norm
        for h in self.history[len(self.history) - len(got):]:
            for key, what in (("loss", "the loss"), ("grad_norm", "the gradient norm")):
                if not math.isfinite(h[key]):
                    self._set_aside_from(h["step"] - 1)
                    raise DivergedError(h["step"], what, h[key])
        start, tokens0 = self._window
        if now > start and self.tokens_seen > tokens0:
            self._rate = (self.tokens_seen - tokens0) / (now - start)
        self._window = (now, self.tokens_seen)

    def _set_aside_from(self, step: int) -> None:
        """Checkpoints of `step` and later gave the non-finite loss (a resume from them would compute it again, at
        any lr): renamed out of the run's list (step-*.diverged), so a resume starts from the one before."""
        if self.run_dir is None:
            return
        for p in list_checkpoints(self.run_dir):
            if int(p.name.split("-")[1]) >= step:
                try:
                    os.replace(p, p.with_name(p.name + ".diverged"))
                except OSError:
                    pass  # still listed: a resume diverges again, and says so
        left = list_checkpoints(self.run_dir)
        self.last_checkpoint = left[-1] if left else None

    def _eta(self) -> float | None:
        if self._rate <= 0 or not self.step_num:
            return None
        per_step = self.tokens_seen / self.step_num / self._rate if self.tokens_seen else 0.0
        return per_step * max(0, self.total_steps - self.step_num)

    @property
    def last_loss(self) -> float | None:
        for h in reversed(self.history):
            if h.get("loss") is not None:
                return float(h["loss"])
        return None

    def run(self, callback=None) -> list[dict]:
        """Step until done or until callback(report) returns False / request_stop() is called; a stopped run
        saves a checkpoint (when it has a run_dir) so that it can resume. Returns the history."""
        while not self.done and not self.stop_requested:
            m = self.step()
            if m is None:
                break
            if callback is not None and callback(m) is False:
                self.stop_requested = True
        stopped_early = self.stop_requested and not self.done
        ran_dry = self.exhausted and (self.last_checkpoint is None or self.last_checkpoint.name != f"step-{self.step_num:08d}")
        self.settle()
        if self.run_dir is not None and self.step_num > 0 and (stopped_early or ran_dry):
            self.save()
        self.read_metrics()
        return self.history

    def request_stop(self):
        self.stop_requested = True

    # -- evaluation ------------------------------------------------------------------------------------

    def evaluate(self) -> dict:
        """Validation loss and perplexity of the current adapter (empty dict without a validation set)."""
        if not self.valid:
            return {}
        total, n = 0.0, 0
        for b in self.valid:
            ls, nt = self.sess.evaluate(b)
            total += ls
            n += nt
        loss = total / max(n, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": n}

    def adapter(self) -> LoraAdapter:
        return self.sess.snapshot()

    # -- checkpoints -----------------------------------------------------------------------------------

    def save(self) -> Path:
        if self.run_dir is None:
            raise TrainError("this trainer has no run_dir to save checkpoints in; pass run_dir=...")
        self.settle()
        self.read_metrics()
        meta = {"step": self.step_num, "tokens_seen": self.tokens_seen, "targets_seen": self.targets_seen, "data": self.stream.state(),
                "data_hash": self.data_hash, "schedule": self.schedule.state_dict(),
                "rng": {"seed": self.cfg.seed, "scheme": "counter: order(seed, epoch), dropout(seed, step, micro)"},
                "config": self.cfg.to_dict(), "lora": self.cfg.lora.to_dict(), "exhausted": self.exhausted,
                "history": self.history, "model": self.engine.model.name,
                "backend": self.engine.backend}
        if self.job is not None:
            meta["job"] = self.job
        arrays = self.sess.state_dict()
        bad = first_nonfinite(arrays)  # never a checkpoint that cannot be resumed: the last good one stays newest
        if bad is not None:
            raise DivergedError(self.step_num, f"the optimizer state ({bad[0]})", bad[1])
        self.last_checkpoint = save_checkpoint(self.run_dir, self.step_num, arrays, meta, self.cfg.keep_last)
        return self.last_checkpoint

    def load(self, path) -> None:
        """Restore a checkpoint: the one at path, or a run directory's newest whole one (damaged newer ones are
        set aside and listed in passed_over). CheckpointError when there is none to restore."""
        path, damaged = Path(path), []
        if (path / "trainer.json").exists():
            arrays, meta = read_checkpoint(path)
        else:
            found = newest_good_checkpoint(path)
            if found.path is None or found.arrays is None or found.meta is None:
                raise CheckpointError(found.why_none(path))
            path, arrays, meta, damaged = found.path, found.arrays, found.meta, found.damaged
        mine, theirs = self.cfg.to_dict(), meta["config"]
        diff = sorted(k for k in set(mine) | set(theirs)
                      if k not in RESUME_FREE + RESUME_NEW_LR and mine.get(k) != theirs.get(k))
        if diff:
            raise TrainError(f"{path}: the checkpoint's run used other settings ({', '.join(f'{k}={theirs.get(k)!r}' for k in diff)}); "
                             "resume with the run's own settings, or start a new run directory")
        if meta["data_hash"] != self.data_hash:
            raise TrainError(f"{path}: the training data differ from the checkpoint's run (tokens hash "
                             f"{meta['data_hash']} vs {self.data_hash}); resume with the same dataset and model")
        if replace(Schedule.from_state(meta["schedule"]), lr=self.schedule.lr) != self.schedule:
            raise TrainError(f"{path}: the planned schedule differs ({meta['schedule']} vs "
                             f"{self.schedule.state_dict()}); resume with the same stop settings")
        self.sess.load_state_dict(arrays)
        self.stream.load_state(meta["data"])
        self.step_num = int(meta["step"])
        self.tokens_seen = int(meta["tokens_seen"])
        self.targets_seen = int(meta.get("targets_seen", 0))
        self._window = (time.perf_counter(), self.tokens_seen)
        self.exhausted = bool(meta.get("exhausted", False))
        self.history = list(meta.get("history", []))
        self.last_checkpoint = path
        self.passed_over = [(set_aside(p), why) for p, why in damaged]
