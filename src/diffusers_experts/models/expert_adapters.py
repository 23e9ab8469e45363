"""Per-expert LoRA adapters: one adapter at a different strength on each expert, or different adapters per expert."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def set_expert_adapters(experts: Sequence[nn.Module], adapter_names, weights=None) -> None:
    """Placeholder until implemented."""
    raise NotImplementedError("set_expert_adapters")
