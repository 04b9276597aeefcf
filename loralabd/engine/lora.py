"""LoRA adapters: configuration, parameters (PEFT layout and init), scaling."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, asdict

import numpy as np

from ..models.args import LINEAR_NAMES, ModelArgs

# Short names people type -> HF module names.
TARGET_ALIASES = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all": LINEAR_NAMES, "all-linear": LINEAR_NAMES,
}


def normalize_targets(targets) -> tuple[str, ...]:
    out = []
    for t in ([targets] if isinstance(targets, str) else targets):
        t = t.strip()
        m = TARGET_ALIASES.get(t, t)
        for n in (m if isinstance(m, tuple) else (m,)):
            if n not in LINEAR_NAMES:
                raise ValueError(f"unknown LoRA target {t!r}; choose from {', '.join(LINEAR_NAMES)} "
                                 "(or q, k, v, o, gate, up, down, attn, mlp, all)")
            if n not in out:
                out.append(n)
    if not out:
        raise ValueError("LoRA needs at least one target module")
    return tuple(n for n in LINEAR_NAMES if n in out)


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    targets: tuple[str, ...] = LINEAR_NAMES
    layers: tuple[int, ...] | None = None  # None: every layer

    def __post_init__(self):
        object.__setattr__(self, "targets", normalize_targets(self.targets))
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def layer_ids(self, n_layers: int) -> tuple[int, ...]:
        return tuple(range(n_layers)) if self.layers is None else tuple(self.layers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        d = dict(d)
        d["targets"] = tuple(d.get("targets", LINEAR_NAMES))
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        return cls(**d)

    @classmethod
    def from_protocol(cls, d: dict | None, where: str = "lora") -> "LoraConfig":
        """The protocol's LoraSettings (camelCase, as on the wire; None or {}: every default) -> LoraConfig: the
        one place LoraSettings are read. Defaults come from protocol/protocol.json; alpha, which has none there,
        is 2 x r when omitted (scale 2). A wrong value raises ValueError naming the field (`lora.targets`)."""
        from ..protocol.validate import read_settings

        s = read_settings("LoraSettings", d, where)
        r = int(s["r"])
        try:
            targets = normalize_targets(s["targets"])
        except ValueError as e:
            raise ValueError(f"{where}.targets: {e}") from None
        return cls(r=r, alpha=float(s["alpha"]) if "alpha" in s else 2.0 * r, dropout=float(s["dropout"]),
                   use_rslora=bool(s["useRslora"]), targets=targets,
                   layers=None if s["layers"] is None else tuple(int(i) for i in s["layers"]))


_uids = itertools.count(1)


@dataclass(eq=False)
class LoraAdapter:
    """A (r, in) and B (out, r) per targeted projection, keyed "{layer}.{name}" (f32).

    (uid, version) name the weights' contents for GPU engines, which upload an adapter once per version:
    whoever changes A or B in place bumps the version (a train session's snapshot carries its step)."""

    config: LoraConfig
    A: dict[str, np.ndarray] = field(default_factory=dict)
    B: dict[str, np.ndarray] = field(default_factory=dict)
    uid: int = field(default_factory=lambda: next(_uids))
    version: int = 0

    @classmethod
    def init(cls, args: ModelArgs, config: LoraConfig, seed: int = 0) -> "LoraAdapter":
        """PEFT's init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
        rng = np.random.default_rng(seed)
        ad = cls(config)
        for i in config.layer_ids(args.num_hidden_layers):
            for n in config.targets:
                out_f, in_f = args.linear_shape(n)
                bound = 1.0 / math.sqrt(in_f)
                ad.A[f"{i}.{n}"] = rng.uniform(-bound, bound, size=(config.r, in_f)).astype(np.float32)
                ad.B[f"{i}.{n}"] = np.zeros((out_f, config.r), np.float32)
        return ad

    def keys(self):
        return self.A.keys()

    def get(self, layer: int, name: str):
        k = f"{layer}.{name}"
        return (self.A[k], self.B[k]) if k in self.A else None

    def params(self) -> dict[str, np.ndarray]:
        """Flat name -> array, the order used by optimizers and checkpoints."""
        out = {}
        for k in self.A:
            out[k + ".A"] = self.A[k]
            out[k + ".B"] = self.B[k]
        return out

    def copy(self) -> "LoraAdapter":
        """An independent copy (a new uid: its contents may change apart from this one's)."""
        return LoraAdapter(self.config, {k: v.copy() for k, v in self.A.items()},
                           {k: v.copy() for k, v in self.B.items()})

    def n_params(self) -> int:
        return sum(a.size for a in self.A.values()) + sum(b.size for b in self.B.values())
