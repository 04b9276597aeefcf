"""Plan a training run before it starts: memory by part, time, limits and advice (issue 7).

    from loralabd.plan import estimate
    plan = estimate(model, "numpy", dataset_tokens=50_000, lora=LoraConfig(r=16), batch=4, seq=256, epochs=1)
    plan.to_dict()        # everything; plan.to_protocol() is the protocol's PlanEstimate

estimate(model, params_dict) (a PlanParams dict as second argument) returns the PlanEstimate dict directly.
"""

from .calibrate import Calibration, cached_calibration
from .estimate import Plan, estimate, plan_from_params
from .hardware import Device, describe
from .memory import MemoryEstimate, training_memory

__all__ = ["Calibration", "Device", "MemoryEstimate", "Plan", "cached_calibration", "describe",
           "estimate", "plan_from_params", "training_memory"]
