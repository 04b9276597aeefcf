"""Training: datasets (data, packing), the trainer, schedules, checkpoints, the demo."""

from .data import DatasetError, Problem
from .packing import Dataset, DataStream
from .schedule import Schedule
from .trainer import TrainConfig, Trainer, TrainError

__all__ = ["Dataset", "DataStream", "DatasetError", "Problem", "Schedule", "TrainConfig", "Trainer", "TrainError"]
