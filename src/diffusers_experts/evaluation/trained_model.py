"""Loading a trained model to sample from or to evaluate: a pipeline folder, or a bare mixture folder."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from diffusers import DDPMScheduler

from ..constants import MODEL_INDEX_NAME
from ..loading import resolve_model_folder
from ..models import ExpertMixtureUNet
from ..pipelines import MultiExpertPipeline
from ..schedulers import BlendedScheduler, scheduler_from_name


def load_pipeline(name_or_path: str, scheduler: str | None = None) -> MultiExpertPipeline:
    r"""
    A `MultiExpertPipeline` from a saved pipeline folder (`model_index.json`) or from a saved `ExpertMixtureUNet`
    folder, which gets a `DDPMScheduler` noise schedule with the mixture's `num_train_timesteps`.

    Args:
        name_or_path (`str`): A folder or a Hub repo id of either.
        scheduler (`str`, *optional*): A sampler name of `diffusers_experts.schedulers.scheduler_from_name`
            (e.g. `"ddim"`, `"dpmpp"`) that replaces the pipeline's, on the same noise schedule (the base schedule of
            a saved `BlendedScheduler`).
    """
    folder = resolve_model_folder(name_or_path)
    if os.path.isfile(os.path.join(folder, MODEL_INDEX_NAME)):
        pipe = MultiExpertPipeline.from_pretrained(folder)
    else:
        mixture = ExpertMixtureUNet.from_pretrained(folder)
        noise_scheduler = DDPMScheduler(num_train_timesteps=mixture.config.num_train_timesteps)
        pipe = MultiExpertPipeline(unet=mixture, scheduler=noise_scheduler)
    if scheduler is not None:
        base = pipe.scheduler.base if isinstance(pipe.scheduler, BlendedScheduler) else pipe.scheduler
        pipe.scheduler = scheduler_from_name(scheduler, config=base.config)
    return pipe


class UsageError(ValueError):
    """A command-line value that does not fit the loaded model; the scripts print it as one usage line."""


def class_labels_for(
    values: Sequence[str] | None, num_images: int, num_class_embeds: int | None
) -> torch.Tensor | None:
    r"""
    One class label per image from the `--class_label` values: integers cycled over the images, or `all` (every class,
    cycled: image `i` gets class `i % num_classes`). The last class index, `num_class_embeds - 1`, is the null class
    of classifier-free guidance and is not generated.

    Raises [`UsageError`] naming `--class_label` for unconditional models, missing labels or labels out of range.
    """
    if num_class_embeds is None:
        if values:
            raise UsageError(f"--class_label {' '.join(values)}: the model is unconditional; drop --class_label.")
        return None
    num_classes = num_class_embeds - 1
    if not values:
        raise UsageError(
            f"--class_label is required: the model is class-conditional with {num_classes} classes (0..{num_classes - 1}); "
            f"give one or more labels, or 'all'."
        )
    if list(values) == ["all"]:
        labels = list(range(num_classes))
    else:
        try:
            labels = [int(v) for v in values]
        except ValueError:
            raise UsageError(
                f"--class_label takes integers in 0..{num_classes - 1} or 'all', got {' '.join(values)}."
            ) from None
        bad = [label for label in labels if not 0 <= label < num_classes]
        if bad:
            raise UsageError(
                f"--class_label {' '.join(map(str, bad))} is out of range: the model has {num_classes} classes "
                f"(0..{num_classes - 1}; {num_classes} is the null class used for guidance)."
            )
    return torch.tensor([labels[i % len(labels)] for i in range(num_images)])


def guidance_for(values: Sequence[float], num_experts: int) -> float | list[float]:
    """The `--guidance_scale` values as the pipeline takes them: one scale, or one per expert (expert 0 first)."""
    if len(values) == 1:
        return float(values[0])
    if len(values) != num_experts:
        raise UsageError(
            f"--guidance_scale takes one value or one per expert ({num_experts} for this model), got {len(values)}: "
            f"{' '.join(map(str, values))}."
        )
    return [float(v) for v in values]
