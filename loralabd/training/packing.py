"""Datasets made of examples, validation split, sequence packing and the resumable batch stream.

Packing puts several examples in one row of seq_len tokens; segment ids keep attention inside each
example and positions restart at 0 for each, so a packed row computes exactly what the examples
would compute one by one. The stream's position (epoch, row) is all a checkpoint needs: the order of
each epoch is a pure function of (seed, epoch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..engine.reference import IGNORE
from .data import DatasetError, Example, Problem, read_source

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

ROUND = 32  # batches are cut to the longest row rounded up to this (few shapes for the GPU arena)


@dataclass
class Batch:
    tokens: np.ndarray  # (b, T) int32
    labels: np.ndarray  # (b, T) int32, IGNORE where no loss
    segments: np.ndarray  # (b, T) int32, -1 on padding
    positions: np.ndarray  # (b, T) int32
    n_tokens: int  # real (non-padding) tokens
    n_targets: int  # labelled positions

    @classmethod
    def of(cls, tokens, labels=None, segments=None, positions=None) -> "Batch":
        """A batch of whole rows (one segment each, positions from 0); labels default to the tokens."""
        tokens = np.asarray(tokens, np.int32)
        B, T = tokens.shape
        labels = tokens if labels is None else np.asarray(labels, np.int32)
        seg = np.zeros((B, T), np.int32) if segments is None else np.asarray(segments, np.int32)
        pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy() if positions is None else \
            np.asarray(positions, np.int32)
        return cls(tokens, labels, seg, pos, int((seg >= 0).sum()), int((labels != IGNORE).sum()))


def pack_rows(lengths: np.ndarray, order: np.ndarray, seq_len: int, pack: bool) -> list[list[int]]:
    """Greedy packing in the given order: a row takes examples until the next does not fit."""
    rows: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i in order:
        n = int(lengths[i])
        if cur and (not pack or used + n > seq_len):
            rows.append(cur)
            cur, used = [], 0
        cur.append(int(i))
        used += n
    if cur:
        rows.append(cur)
    return rows


def make_batch(examples: list[Example], rows: list[list[int]], seq_len: int, pad_id: int) -> Batch:
    used = max(sum(len(examples[i]) for i in r) for r in rows)
    if used > seq_len:
        raise ValueError(f"a row holds {used} tokens but seq_len is {seq_len}")
    T = min(seq_len, -(-used // ROUND) * ROUND)
    b = len(rows)
    tok = np.full((b, T), pad_id, np.int32)
    lab = np.full((b, T), IGNORE, np.int32)
    seg = np.full((b, T), -1, np.int32)
    pos = np.zeros((b, T), np.int32)
    n_tok = 0
    for r, row in enumerate(rows):
        o = 0
        for s, i in enumerate(row):
            e = examples[i]
            n = len(e)
            tok[r, o:o + n] = e.ids
            # label at t is the next token, when that token is a target of this same example
            nxt = np.where(e.mask[1:], e.ids[1:], IGNORE)
            lab[r, o:o + n - 1] = nxt
            seg[r, o:o + n] = s
            pos[r, o:o + n] = np.arange(n)
            o += n
        n_tok += o
    return Batch(tok, lab, seg, pos, n_tok, int((lab != IGNORE).sum()))


def example_stats(examples: list[Example]) -> dict:
    lens = np.asarray([len(e) for e in examples]) if examples else np.zeros(0, int)
    return {"examples": len(examples), "tokens": int(lens.sum()),
            "target_tokens": int(sum(int(e.mask[1:].sum()) for e in examples)),
            "min_len": int(lens.min()) if len(lens) else 0, "mean_len": float(lens.mean()) if len(lens) else 0.0,
            "max_len": int(lens.max()) if len(lens) else 0}


@dataclass
class Dataset:
    """Tokenized train and validation examples, plus every problem met while reading them."""

    train: list[Example]
    valid: list[Example]
    problems: list[Problem] = field(default_factory=list)
    format: str = "text"
    tokenizer: Tokenizer | None = None
    max_seq_len: int = 512

    @classmethod
    def load(cls, train, tokenizer, *, valid=None, valid_fraction: float = 0.0, seed: int = 0, fmt: str = "auto",
             glob: str | None = None, max_seq_len: int = 512, cache_dir=None,
             progress: Callable[[int, int], None] | None = None) -> "Dataset":
        """train: a .jsonl file, a text file, or a folder. A folder with train.jsonl (and valid.jsonl) is read
        as MLX-LM's layout. valid: a file/folder, or valid_fraction of the examples held out with seed.
        progress(done, total): the bytes read of each source (read_source)."""
        p = Path(train).expanduser()
        if p.is_dir() and (p / "train.jsonl").is_file():
            if valid is None and (p / "valid.jsonl").is_file() and valid_fraction == 0.0:
                valid = p / "valid.jsonl"
            p = p / "train.jsonl"
        kw = dict(fmt=fmt, glob=glob, max_seq_len=max_seq_len, cache_dir=cache_dir, progress=progress)
        tr = read_source(p, tokenizer, **kw)
        problems = list(tr.problems)
        train_ex, valid_ex = tr.examples, []
        if valid is not None:
            va = read_source(valid, tokenizer, **kw)
            problems += va.problems
            valid_ex = va.examples
        elif valid_fraction > 0.0:
            if not 0.0 < valid_fraction < 1.0:
                raise DatasetError(f"valid_fraction must lie in (0, 1), got {valid_fraction}")
            n = len(train_ex)
            k = max(1, int(round(valid_fraction * n))) if n > 1 else 0
            perm = np.random.default_rng([seed, 0x5A1D]).permutation(n)
            held = set(perm[:k].tolist())
            valid_ex = [e for i, e in enumerate(train_ex) if i in held]
            train_ex = [e for i, e in enumerate(train_ex) if i not in held]
        if not train_ex:
            shown = "; ".join(str(q) for q in problems[:5])
            raise DatasetError(f"{p}: no usable training example" + (f" ({len(problems)} problems: {shown})"
                                                                      if problems else "; the file is empty"))
        return cls(train_ex, valid_ex, problems, tr.format, tokenizer, max_seq_len)

    def inspect(self, sample: int = 0) -> dict:
        """What the UI shows before training: counts, one rendered example with its trained parts, problems."""
        out = {"format": self.format, "train": example_stats(self.train), "valid": example_stats(self.valid),
               "problems": [p.to_dict() for p in self.problems], "sample": None}
        if self.train and self.tokenizer is not None:
            e = self.train[min(sample, len(self.train) - 1)]
            parts: list[dict] = []
            cur: list[int] = []
            cur_m = None
            for t, m in zip(e.ids.tolist(), e.mask.tolist()):
                if cur and m != cur_m:
                    parts.append({"text": self.tokenizer.decode(cur), "loss": bool(cur_m)})
                    cur = []
                cur.append(t)
                cur_m = m
            if cur:
                parts.append({"text": self.tokenizer.decode(cur), "loss": bool(cur_m)})
            out["sample"] = {"file": e.file, "line": e.line, "tokens": len(e), "parts": parts,
                             "text": "".join(p["text"] for p in parts)}
        return out

    def problem_report(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class DataStream:
    """Micro-batches of packed rows, epoch after epoch, reproducible from (seed, epoch, row)."""

    def __init__(self, examples: list[Example], seq_len: int, batch_size: int, pad_id: int, seed: int = 0,
                 shuffle: bool = True, pack: bool = True):
        if not examples:
            raise DatasetError("no examples to train on")
        long = max(len(e) for e in examples)
        if long > seq_len:
            raise DatasetError(f"an example has {long} tokens but seq_len is {seq_len}; read the dataset with "
                               f"max_seq_len <= seq_len")
        self.examples, self.seq_len, self.batch_size, self.pad_id = examples, seq_len, batch_size, pad_id
        self.seed, self.shuffle, self.pack = seed, shuffle, pack
        self.lengths = np.asarray([len(e) for e in examples])
        self.epoch, self.row = 0, 0
        self._rows: dict[int, list[list[int]]] = {}

    def rows(self, epoch: int) -> list[list[int]]:
        if epoch not in self._rows:
            n = len(self.examples)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._rows = {epoch: pack_rows(self.lengths, order, self.seq_len, self.pack)}
        return self._rows[epoch]

    def epoch_float(self) -> float:
        return self.epoch + self.row / max(1, len(self.rows(self.epoch)))

    def next_batch(self, max_epochs: float | None = None) -> Batch | None:
        """The next batch_size rows (crossing into the next epoch when needed); None past max_epochs."""
        take: list[list[int]] = []
        while len(take) < self.batch_size:
            if max_epochs is not None and self.epoch_float() >= max_epochs - 1e-9:
                break
            rows = self.rows(self.epoch)
            take.append(rows[self.row])
            self.row += 1
            if self.row >= len(rows):
                self.epoch, self.row = self.epoch + 1, 0
        if not take:
            return None
        return make_batch(self.examples, take, self.seq_len, self.pad_id)

    def rows_per_epoch(self) -> int:
        return len(self.rows(0))

    def state(self) -> dict:
        return {"epoch": self.epoch, "row": self.row, "seed": self.seed, "shuffle": self.shuffle, "pack": self.pack,
                "n_examples": len(self.examples), "seq_len": self.seq_len, "batch_size": self.batch_size}

    def load_state(self, st: dict):
        for k in ("seed", "shuffle", "pack", "n_examples", "seq_len", "batch_size"):
            mine = len(self.examples) if k == "n_examples" else getattr(self, k)
            if st[k] != mine:
                raise DatasetError(f"the checkpoint was written with {k}={st[k]} but this run has {k}={mine}; "
                                   "resume with the same dataset and data settings")
        self.epoch, self.row = int(st["epoch"]), int(st["row"])


def eval_batches(examples: list[Example], seq_len: int, batch_size: int, pad_id: int, pack: bool = True,
                 max_batches: int | None = None) -> list[Batch]:
    """The validation set in fixed order (the same batches at every evaluation)."""
    if not examples:
        return []
    rows = pack_rows(np.asarray([len(e) for e in examples]), np.arange(len(examples)), seq_len, pack)
    out = [make_batch(examples, rows[i:i + batch_size], seq_len, pad_id) for i in range(0, len(rows), batch_size)]
    return out[:max_batches] if max_batches else out
