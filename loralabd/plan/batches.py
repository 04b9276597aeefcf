"""The micro-batches a training run will really compute, for a time estimate from the data instead of full rows.

The trainer cuts each micro-batch to its longest row (rounded up, packing.make_batch) and packing leaves rows
partly empty, so a step of batch x seq rows often computes far fewer positions than batch x seq: short chat rows
at batch 1 x seq 256 ran 27% under a plan that priced full rows. run_batches() walks the trainer's own data
stream (packing.DataStream, Trainer's step count) over the examples and keeps each step's shapes; the plan
prices those (Calibration.predict_step).

    rb = run_batches(dataset.train, TrainConfig.from_protocol(train_params))
    rb.steps        # {((rows, length), ...) per micro-batch of a step: how many steps}
    rb.row_fill     # real tokens / (rows x seq)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..training.data import Example
    from ..training.trainer import TrainConfig

Shape = tuple[int, int]  # (rows, length) of one micro-batch as the trainer cuts it


@dataclass
class RunBatches:
    """What a run computes, step by step: the shapes of each step's micro-batches and the tokens they hold."""

    seq: int  # the run's seqLen
    steps: Counter = field(default_factory=Counter)  # tuple[Shape, ...] (one step) -> how many steps
    tokens: int = 0  # non-padding tokens trained (what TrainProgress counts)
    rows: int = 0  # rows over the run
    positions: int = 0  # rows x cut length, summed: what the engine computes
    examples: int = 0

    @property
    def n_steps(self) -> int:
        return sum(self.steps.values())

    @property
    def micro_batches(self) -> int:
        return sum(len(k) * n for k, n in self.steps.items())

    @property
    def row_fill(self) -> float:
        """Real tokens over rows x seqLen (what full rows would compute)."""
        return self.tokens / max(1, self.rows * self.seq)

    @property
    def mean_length(self) -> float:
        """The micro-batches' cut length, averaged over rows."""
        return self.positions / max(1, self.rows)

    def note(self) -> str:
        return (f"time: priced {self.micro_batches} batches of the dataset's real shapes ({self.n_steps} steps, "
                f"{self.examples} examples): mean row fill {100 * self.row_fill:.0f}% of seq {self.seq}, "
                f"batches cut to {self.mean_length:.0f} tokens on average")


# PlanParams fields that shape the run's batches, as TrainParams names them (train/start reads the data with them)
DATA_FIELDS = ("seqLen", "batchSize", "gradAccum", "steps", "epochs", "seed", "pack", "validationFraction")


def read_batches(path, tokenizer, p: Mapping[str, Any], progress: Callable[[int, int], None] | None = None,
                 stop: Callable[[], None] | None = None) -> RunBatches:
    """The run's micro-batches over the dataset at `path`, read and split as train/start reads it
    (packing.Dataset.load: a train.jsonl folder's valid.jsonl, validationFraction held out with the seed) for the
    PlanParams p. progress(done, total): bytes read (read_source). Raises DatasetError, TrainError, ValueError."""
    from ..protocol import with_defaults
    from ..training.packing import Dataset
    from ..training.trainer import TrainConfig

    tp = {k: p[k] for k in DATA_FIELDS if k in p}
    cfg = TrainConfig.from_protocol(tp)
    q = with_defaults("TrainParams", tp)
    ds = Dataset.load(path, tokenizer, valid_fraction=float(q["validationFraction"]), seed=cfg.seed,
                      max_seq_len=cfg.seq_len, progress=progress)
    return run_batches(ds.train, cfg, stop)


def run_batches(examples: list[Example], cfg: TrainConfig, stop: Callable[[], None] | None = None) -> RunBatches:
    """The shapes of every micro-batch the trainer runs on `examples` with `cfg`, in its order (its seed, packing,
    step count and stop rule). stop(): checked every 1,000 steps; raises what it raises (a cancelled request)."""
    from ..training.packing import DataStream
    from ..training.trainer import Trainer

    stream = DataStream(examples, cfg.seq_len, cfg.batch_size, 0, cfg.seed, cfg.shuffle, cfg.pack)
    # the trainer's own count: _plan_steps reads only its cfg and stream
    total = Trainer._plan_steps(SimpleNamespace(cfg=cfg, stream=stream))  # type: ignore[arg-type]
    # as Trainer.step: epochs bound the stream only when neither steps nor tokens are given
    max_epochs = None if (cfg.max_steps is not None or cfg.max_tokens is not None) else (cfg.epochs or 1.0)
    out = RunBatches(seq=cfg.seq_len, examples=len(examples))
    for i in range(total):
        if stop is not None and i % 1000 == 999:
            stop()
        shapes = []
        for _ in range(cfg.grad_accum):
            b = stream.next_batch(max_epochs)
            if b is None:
                break
            rows, length = b.tokens.shape  # (rows, cut length)
            shapes.append((rows, length))
            out.tokens += b.n_tokens
            out.rows += rows
            out.positions += rows * length
        if not shapes:  # the data ran out: the trainer stops here too
            break
        out.steps[tuple(shapes)] += 1
        if cfg.max_steps is None and cfg.max_tokens is not None and out.tokens >= cfg.max_tokens:
            break  # Trainer.done's token bound
    return out
