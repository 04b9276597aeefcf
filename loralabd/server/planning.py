"""plan/estimate and plan/calibrate over loralabd.plan (called on the device thread)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LoraLabError
from ..protocol import ErrorCode
from ..protocol.types import CalibrateResult, Clock, PlanEstimate, PlanParams

if TYPE_CHECKING:
    from ..engine.interface import Engine
    from ..models.load import LoadedModel
    from ..plan.batches import RunBatches
    from ..plan.calibrate import Calibration, Item
    from ..plan.hardware import Device
from .errors import DomainError


def plan_estimate(model: LoadedModel, engine: Engine, p: PlanParams, batches: RunBatches | None = None) -> PlanEstimate:
    """plan/estimate through loralabd.plan (issue 7): memory by part, limits, advice, time once calibrated;
    batches: the dataset's real micro-batches (plan_batches), priced instead of full rows."""
    try:
        from ..plan import plan_from_params
    except ImportError as e:
        raise DomainError(ErrorCode.FeatureUnavailable, f"planning is not in this build ({e}); update LoRA Lab") from None
    try:
        return plan_from_params(model, p, engine, batches)
    except (ValueError, LoraLabError) as e:
        raise DomainError(ErrorCode.InvalidSettings, str(e)) from None


def plan_batches(model: LoadedModel, path: Path, p: PlanParams, progress: Callable[[int, int], None],
                 stop: Callable[[], None]) -> RunBatches:
    """The micro-batches the trainer would run on plan/estimate's `dataset` (at `path`, access-checked): read and
    tokenized as train/start reads it, on a data thread (off the model's queue). progress(done, total): the bytes
    read; progress and stop() raise once the request is cancelled, which stops the read and the walk over the
    batches."""
    from ..plan.batches import read_batches
    from .training import dataset_errors

    with dataset_errors(p.get("dataset")):
        return read_batches(path, model.tokenizer, p, progress, stop)


def _plan():
    try:
        from .. import plan
        from ..plan import calibrate
    except ImportError as e:
        raise DomainError(ErrorCode.FeatureUnavailable, f"planning is not in this build ({e}); update LoRA Lab") from None
    return plan, calibrate


def calibration_start(engine: Engine, model: LoadedModel, clock: Clock, refresh: bool) -> tuple[Device, Calibration | None, list]:
    """(device, the cached Calibration or None, the shapes still to time: items for time_shape) for plan/calibrate."""
    _, cal = _plan()
    from ..plan.hardware import describe

    device = describe(engine)
    hit = None if refresh else cal.cached(device, model, clock)
    return device, hit, ([] if hit is not None else cal.plan_shapes(engine, device))


def shape_label(item: Item) -> str:
    """A calibration_start item for progress messages: `batch 2 x seq 64, r=8`."""
    return item.label()


def time_shape(engine: Engine, item: Item, clock: Clock, device: Device) -> dict:
    """One calibration item (a shape in one pass): its timed steps, with the process's peak memory measured
    around them."""
    cal = _plan()[1]
    return cal.run_item(engine, item, clock, cal.memory_quantity(device))


def calibration_finish(engine: Engine, device: Device, clock: Clock, samples: list, seconds: float) -> Calibration:
    """Fit the timed shapes and cache the calibration (every later plan/estimate predicts time with it)."""
    _, cal = _plan()
    c = cal.finish(engine, device, clock, samples, seconds)
    cal.save(c)
    return c


def calibration_result(model_id: str, engine: Engine, device: Device, cal: Calibration, cached: bool,
                       seconds: float) -> CalibrateResult:
    """The protocol's CalibrateResult."""
    from ..plan.estimate import protocol_calibration, protocol_device

    return {"model": model_id, "backend": engine.backend, "device": protocol_device(device),
            "cached": cached, "seconds": float(seconds), "calibration": protocol_calibration(cal),
            "samples": [{"batch": int(s["batch"]), "seq": int(s["seq"]), "r": int(s["r"]),
                         "gradAccum": int(s["grad_accum"]), "seconds": float(s["seconds"]),
                         "predictedSeconds": float(sum(cal.coef[k] * v for k, v in s["features"].items())),
                         "peakBytes": None if s["peak_bytes"] is None else int(s["peak_bytes"]),
                         "engineBytes": int(s["engine_bytes"])}
                        for s in cal.samples]}
