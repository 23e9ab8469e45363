"""Loading a trained model to sample from or to evaluate: a pipeline folder, or a bare mixture folder."""

from __future__ import annotations

import os

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
