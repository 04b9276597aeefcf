"""The micro-batches a training run will really compute, for a time estimate from the data instead of full rows.

The trainer cuts each micro-batch to its longest row (rounded up, packing.make_batch) and packing leaves rows
partly empty, so a step of batch x seq rows often computes far fewer positions than batch x seq: short chat rows
at batch 1 x seq 256 ran 27% under a plan that priced full rows. run_batches() walks the trainer's own data
stream (packing.DataStream, Trainer's step count) over the examples and keeps each step's shapes; the plan
prices those (Calibration.predict_step).

    rb = run_batches(dataset.train, TrainConfig.from_protocol(train_params))
    rb.steps        # {((rows, length), ...) per micro-batch of a step: how many steps}
    rb.row_fill     # real tokens / (rows x seq)
    rb.attention_share(32)  # the causal attention blocks an engine that skips packed rows' unseen ones computes
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np

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
    batch: int = 0  # the run's batchSize (rows of the step program)
    segments: list = field(default_factory=list)  # segment ids (rows, length) of up to SEGMENT_SAMPLES micro-batches

    def attention_share(self, block: int) -> float:
        """The share of the causal attention's block x block pairs that see each other in the sampled micro-batches,
        padded to the run's batch x seq program: what an engine whose blocked attention skips the pairs of
        packed rows that see nothing of each other computes (Engine.attention_block; 0: it computes every pair, 1.0).
        A pair is skipped when the blocks' segment id ranges miss, as the kernels decide it."""
        if block <= 0 or not self.segments:
            return 1.0
        nb = -(-self.seq // block)
        tri = np.tril(np.ones((nb, nb), bool))
        seen = total = 0
        for seg in self.segments:
            rows = max(self.batch, seg.shape[0])
            full = np.full((rows, nb * block), -1, np.int32)  # padding rows and positions: segment -1
            full[:seg.shape[0], :seg.shape[1]] = seg
            blocks = full.reshape(rows, nb, block)
            lo, hi = blocks.min(axis=2), blocks.max(axis=2)  # (rows, nb)
            meet = ~((hi[:, None, :] < lo[:, :, None]) | (lo[:, None, :] > hi[:, :, None]))  # (rows, q, k)
            seen += int((meet & tri).sum())
            total += rows * int(tri.sum())
        return seen / max(1, total)

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


SEGMENT_SAMPLES = 256  # micro-batches whose segments attention_share reads (spread over the run)

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
    out = RunBatches(seq=cfg.seq_len, examples=len(examples), batch=cfg.batch_size)
    every = max(1, total * cfg.grad_accum // SEGMENT_SAMPLES)
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
            if (i * cfg.grad_accum + len(shapes) - 1) % every == 0:
                out.segments.append(np.asarray(b.segments, np.int32))
            out.tokens += b.n_tokens
            out.rows += rows
            out.positions += rows * length
        if not shapes:  # the data ran out: the trainer stops here too
            break
        out.steps[tuple(shapes)] += 1
        if cfg.max_steps is None and cfg.max_tokens is not None and out.tokens >= cfg.max_tokens:
            break  # Trainer.done's token bound
    return out
