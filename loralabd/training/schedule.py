"""Learning-rate schedules: linear warmup, then cosine or linear decay (transformers' conventions)."""

from __future__ import annotations

import math
from dataclasses import dataclass, asdict

KINDS = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class Schedule:
    """lr(step) for optimizer step `step` (0-based), as transformers' get_*_schedule_with_warmup:
    the first warmup step uses lr 0, decay reaches min_lr_ratio·lr at total_steps."""

    lr: float
    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown lr schedule {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.total_steps < 1:
            raise ValueError(f"the schedule needs at least one step (total_steps={self.total_steps})")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must lie in [0, total_steps={self.total_steps}]")

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        if self.kind == "cosine":
            decay = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        else:
            decay = max(0.0, 1.0 - progress)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay

    def __call__(self, step: int) -> float:
        return self.lr * self.factor(step)

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, d: dict) -> "Schedule":
        return cls(**d)
