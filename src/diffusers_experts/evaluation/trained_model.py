"""Loading a trained model to sample from or to evaluate: a pipeline folder, or a bare mixture folder."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

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

    Raises [`UsageError`] naming `--model` when `name_or_path` is neither a folder nor a reachable repo, or when a
    file of it cannot be read (a broken `config.json`, a truncated safetensors file: the file is named).
    """
    with usage_errors("--model", name_or_path):
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


def add_class_and_guidance_arguments(parser) -> None:
    """`--class_label` and `--guidance_scale` of the sampling scripts (read with [`class_labels_for`] and
    [`guidance_for`] once the model is loaded)."""
    parser.add_argument(
        "--class_label",
        nargs="+",
        default=None,
        help="Class-conditional models: labels cycled over the images, or all.",
    )
    parser.add_argument(
        "--guidance_scale",
        type=float,
        nargs="+",
        default=None,
        help="One value, or one per expert (expert 0 first); default 1.5 for class-conditional models (the measured "
        "best of benchmarks/RESULTS.md), 1.0 otherwise.",
    )


class UsageError(ValueError):
    """A command-line value that does not fit the loaded model or data; the scripts print it as one usage line."""


@contextmanager
def usage_errors(flag: str, value) -> Iterator[None]:
    """Re-raise what loading the model or folder `value` of command-line flag `flag` raises (not found, a broken
    `config.json`, a truncated safetensors file) as a one-line [`UsageError`] naming the flag, the value and, for
    unreadable weights, the reason safetensors gives."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, OSError) as error:
        message = str(error)
        cause = _safetensors_cause(error)
        if cause is not None:
            message = f"{message} ({cause}: truncated or corrupt?)"
        raise UsageError(" ".join(f"{flag} {value}: {message}".split())) from None


def _safetensors_cause(error: BaseException) -> str | None:
    """The message of a safetensors error among the exceptions `error` was raised from, if any."""
    seen = error.__cause__ or error.__context__
    while seen is not None:
        if type(seen).__name__ == "SafetensorError":
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return None


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


# Classifier-free guidance scale measured best for class-conditional models (benchmarks/RESULTS.md, "Guidance").
DEFAULT_GUIDANCE_SCALE = 1.5


def guidance_for(values: Sequence[float] | None, num_experts: int, conditional: bool = False) -> float | list[float]:
    """The `--guidance_scale` values as the pipeline takes them: one scale, or one per expert (expert 0 first).
    Without values: `DEFAULT_GUIDANCE_SCALE` for class-conditional models, 1.0 (no guidance) otherwise."""
    if not values:
        return DEFAULT_GUIDANCE_SCALE if conditional else 1.0
    if len(values) == 1:
        return float(values[0])
    if len(values) != num_experts:
        raise UsageError(
            f"--guidance_scale takes one value or one per expert ({num_experts} for this model), got {len(values)}: "
            f"{' '.join(map(str, values))}."
        )
    return [float(v) for v in values]
