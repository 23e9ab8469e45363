"""Expert-aware schedulers."""

from .scheduler_names import SCHEDULER_NAMES, scheduler_from_name
from .scheduling_blended import BlendedScheduler


__all__ = ["SCHEDULER_NAMES", "BlendedScheduler", "scheduler_from_name"]
