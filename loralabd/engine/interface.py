"""The one engine interface: what the trainer, the generation service and the planner may call.

Both backends implement it (numpy_engine.NumpyEngine, webgpu.engine.WebGPUEngine); a type checker
holds them to it, so no caller probes with hasattr or reaches into an engine's private parts.

    eng.decode(prompt_ids, max_tokens, Sampling(...), adapters) -> iterator of token ids
    sess = eng.train_session(adapter, OptimSettings(...))
    sess.step(micro_batches, lr, max_grad_norm)   # one optimizer step; nothing is read back
    sess.metrics() -> [StepMetrics]               # loss / grad norm of the steps since the last call
    eng.memory_plan(batch, seq, lora_config) -> MemoryPlan   # what training allocates, for the planner
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from ..models.args import ModelArgs
from ..models.load import LoadedModel
from .lora import LoraAdapter, LoraConfig
from .memory import MemoryPlan

AdapterScales = Sequence[tuple[LoraAdapter, float]]  # adapters applied together, each with its scale


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0: greedy. top_k 0 and top_p 1 turn those filters off.
    The same seed gives the same tokens for the same prompt, request after request."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @classmethod
    def from_protocol(cls, params: Mapping[str, Any] | None) -> "Sampling":
        """The sampling fields of the protocol's GenerateParams (temperature, topK, topP, seed), as on the wire:
        the one place they are read. Defaults come from protocol/protocol.json; topP 0 turns nucleus sampling
        off, as 1 does. A wrong value raises ValueError naming the wire field."""
        from ..protocol.validate import read_settings

        q = read_settings("GenerateParams", params)
        return cls(temperature=float(q["temperature"]), top_k=int(q["topK"]), top_p=float(q["topP"]) or 1.0,
                   seed=int(q["seed"]))


@dataclass(frozen=True)
class OptimSettings:
    kind: str = "adamw"  # adamw | adam8bit
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    seed: int = 0  # dropout masks: counter-based on (seed, step, micro-batch)
    recompute: bool = False  # per-layer activation checkpointing: keep each layer's input, recompute the rest

    def __post_init__(self):
        if self.kind not in ("adamw", "adam8bit"):
            raise ValueError(f"optimizer kind must be 'adamw' or 'adam8bit', not {self.kind!r}")
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))


class MicroBatch(Protocol):
    """One micro-batch of packed rows (training.packing.Batch)."""

    tokens: np.ndarray  # (b, T) int32
    labels: np.ndarray  # (b, T) int32, IGNORE where no loss
    segments: np.ndarray  # (b, T) int32, -1 on padding
    positions: np.ndarray  # (b, T) int32


@dataclass(frozen=True)
class StepMetrics:
    """What one optimizer step measured, read back at report cadence."""

    loss_sum: float  # summed over labelled positions
    targets: int  # labelled positions
    grad_norm: float  # before clipping

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.targets, 1)


@runtime_checkable
class TrainSession(Protocol):
    """One training run's adapter, gradients and optimizer state on an engine."""

    t: int  # optimizer steps taken

    def reserve(self, batch: int, seq: int) -> None:
        """The largest micro-batch (rows, length) the run will bring: a GPU engine sizes its one step program
        for it up front (the memory the plan counts from the first step, and the same shapes in a resumed run)."""

    def step(self, batches: Sequence[MicroBatch], lr: float, max_grad_norm: float | None = None) -> None:
        """Accumulate the gradients of every micro-batch, normalise by their labelled tokens, clip, update."""

    def metrics(self, lag: int = 0) -> list[StepMetrics]:
        """The metrics of every step since the last call but the newest `lag`, oldest first (a read back on GPU
        engines, which waits for those steps only: a step submitted ahead keeps the device busy meanwhile)."""

    def gradients(self, batch: MicroBatch) -> tuple[float, int, dict[str, np.ndarray]]:
        """(loss_sum, targets, d(loss_sum)/d(A, B)) of one micro-batch, without a step (tests, parity)."""

    def evaluate(self, batch: MicroBatch) -> tuple[float, int]:
        """(loss_sum, targets) of the current adapter, no gradients (validation)."""

    def snapshot(self) -> LoraAdapter:
        """A copy of the adapter as it is now; its version is the step count."""

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict) -> None: ...

    def memory_bytes(self) -> int:
        """Bytes this session holds on its device (adapter, gradients, optimizer, activations)."""

    def close(self) -> None:
        """Give the session's buffers back now."""


@runtime_checkable
class Engine(Protocol):
    backend: str  # "numpy" | "webgpu"
    model: LoadedModel
    args: ModelArgs

    @property
    def attention_block(self) -> int:
        """Positions of a block of the blocked attention that skips the block pairs of packed rows that see nothing
        of each other; 0: every causal pair is computed (the planner prices attention by it:
        RunBatches.attention_share)."""

    def decode(self, prompt_ids: Sequence[int], max_tokens: int, sampling: Sampling = Sampling(),
               adapters: AdapterScales = ()) -> Generator[int, None, None]:
        """Token ids one at a time after the prompt (batch 1). The caller stops at a stop token and closes
        the generator (a GPU engine then lets the work in flight land)."""

    def logits(self, tokens, adapters: AdapterScales = ()) -> np.ndarray:
        """(B, T, V) logits: tests and small inputs only."""

    def loss(self, tokens, labels, adapters: AdapterScales = (), segments=None, positions=None) -> float:
        """Mean loss over labelled positions."""

    def train_session(self, adapter: LoraAdapter, optim: OptimSettings = OptimSettings()) -> TrainSession: ...

    def memory_plan(self, batch: int, seq: int, lora_config: LoraConfig, optim: str = "adamw",
                    recompute: bool = False) -> MemoryPlan:
        """What this engine allocates to train (batch, seq) with this LoRA config and optimizer — keeping activations
        or recomputing them (OptimSettings.recompute, where the engine can) — by part, and what
        loading its model held (engine/memory.py). The planner's memory comes from here: the engine's own
        account, plus what the process or driver adds, measured at calibration (plan/observe.py)."""

    def forget_compiled(self) -> None:
        """Drop the kernels compiled in this process (a GPU engine's pipelines; the driver's own cache stays), so the
        next step starts as a new daemon's first job does: calibration times that warm start."""

    def memory_in_use(self) -> int:
        """Bytes this engine's allocations hold now: on a GPU the runtime's live buffers (every engine on the
        device: weights, caches, arenas), on the CPU the model's tensors and the engine's f32 copies of them."""

    def close(self) -> None:
        """Free what the engine holds (unload)."""
