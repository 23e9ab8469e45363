"""diffusers' pipeline variant lookup, extended to the expert folders of a mixture.

`DiffusionPipeline.from_pretrained(folder, variant="fp16")` decides which components have weights of that variant by
reading `name.split(".")[1]` of every entry of each component folder. A mixture folder (`unet/`) holds its weights in
expert folders (`expert_0/`, ...) whose names have no dot: diffusers' lookup raises `IndexError` on them, and it does not
look inside them. [`identify_model_variants`] answers as diffusers' lookup does for every other folder and also looks
into expert folders. It replaces diffusers' lookup when `diffusers_experts` is imported (a wrap, as peft and accelerate
extend diffusers); [`uninstall_variant_lookup`] puts diffusers' own function back.
"""

from __future__ import annotations

import os

from diffusers.pipelines import pipeline_utils

from .loading import is_expert_folder


_DIFFUSERS_LOOKUP = pipeline_utils._identify_model_variants


def _holds_variant(folder: str, variant: str, look_into_experts: bool = True) -> bool:
    """Whether `folder` (or, for a mixture, one of its expert folders) has a file of weights variant `variant`."""
    for name in os.listdir(folder):
        parts = name.split(".")
        if len(parts) > 1 and parts[1].startswith(variant):  # diffusers' own rule: `<name>.<variant>...`
            return True
        path = os.path.join(folder, name)
        if look_into_experts and is_expert_folder(name) and os.path.isdir(path):
            if _holds_variant(path, variant, look_into_experts=False):
                return True
    return False


def identify_model_variants(folder: str, variant: str | None, config: dict) -> dict[str, str]:
    """`{component: variant}` for the component folders of pipeline folder `folder` that hold `variant` weights."""
    if variant is None:
        return {}
    return {
        name: variant
        for name in os.listdir(folder)
        if name in config
        and os.path.isdir(os.path.join(folder, name))
        and _holds_variant(os.path.join(folder, name), variant)
    }


def install_variant_lookup() -> None:
    """Make `DiffusionPipeline.from_pretrained(..., variant=...)` see the variant weights of mixtures."""
    pipeline_utils._identify_model_variants = identify_model_variants


def uninstall_variant_lookup() -> None:
    """Restore diffusers' own variant lookup."""
    pipeline_utils._identify_model_variants = _DIFFUSERS_LOOKUP
