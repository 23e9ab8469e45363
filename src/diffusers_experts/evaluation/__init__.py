"""Evaluation: complexity (params / MACs), sample-quality metrics (torch-fidelity) and Fourier analysis of experts."""

from .complexity import (
    attention_flop_formulas,
    count_parameters,
    expert_macs,
    measure_macs,
    mixture_macs_per_call,
    mixture_macs_schedule,
)


__all__ = [
    "attention_flop_formulas",
    "count_parameters",
    "expert_macs",
    "measure_macs",
    "mixture_macs_per_call",
    "mixture_macs_schedule",
]
