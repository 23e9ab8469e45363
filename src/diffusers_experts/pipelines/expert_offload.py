"""Per-expert offload: only the experts that a model call runs live on the accelerator."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class ExpertOffloader:
    r"""
    Keeps a mixture's experts on `offload_device` and moves in only the experts a call needs, evicting the others
    first, so accelerator memory holds one expert (two while a blend is active). Moves are counted per expert in
    `load_counts` (moves onto `device`), and `resident` is the set of experts currently on `device`.

    On a machine without an accelerator use `device="cpu"`: every move is a no-op and the bookkeeping still runs.

    Args:
        mixture ([`ExpertMixtureUNet`]): The mixture whose experts are moved.
        device (`torch.device`): Where experts run.
        offload_device (`torch.device`): Where idle experts wait.
    """

    def __init__(self, mixture, device: torch.device, offload_device: torch.device):
        self.mixture = mixture
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.resident: set[int] = set()
        self.load_counts = [0] * mixture.num_experts
        # the mixture's own parameters (learned routing logits) are small: they stay on the execution device
        for parameter in mixture.parameters(recurse=False):
            parameter.data = parameter.data.to(self.device)
        for expert in mixture.experts:
            expert.to(self.offload_device)

    def activate(self, experts: Iterable[int]) -> None:
        """Make exactly `experts` resident on `device`: evict the others, then load the missing ones."""
        wanted = set(int(k) for k in experts)
        for k in sorted(self.resident - wanted):
            self.mixture.experts[k].to(self.offload_device)
            self.resident.discard(k)
        for k in sorted(wanted - self.resident):
            self.mixture.experts[k].to(self.device)
            self.resident.add(k)
            self.load_counts[k] += 1

    def reset_counts(self) -> None:
        self.load_counts = [0] * self.mixture.num_experts

    def release(self, device: torch.device | str | None = None) -> None:
        """Move every expert to `device` (default: the offload device) and forget residency."""
        target = torch.device(device) if device is not None else self.offload_device
        for expert in self.mixture.experts:
            expert.to(target)
        self.resident = set(range(self.mixture.num_experts)) if target == self.device else set()
