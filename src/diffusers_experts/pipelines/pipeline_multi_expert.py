"""MultiExpertPipeline: timestep-routed sampling of an ExpertMixtureUNet under any diffusers scheduler."""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file, save_file

from ..models.expert_mixture import ExpertMixtureUNet, _sample_of
from ..schedulers.scheduling_blended import BlendedScheduler
from .expert_offload import ExpertOffloader


OUTPUT_TYPES = ("pil", "np", "pt", "latent")
INTERMEDIATES = ("memory", "disk")
IMAGE_NAME = "{:06d}.png"


@dataclass
class BulkGenerationOutput(BaseOutput):
    r"""
    Output of [`MultiExpertPipeline.generate_many`].

    Args:
        images: The images in order (`output_type` of the call), or `None` when they were written to `output_dir`.
        paths (`list[str]`, *optional*): The PNG file of every image when `output_dir` was given.
        expert_loads (`list[int]`, *optional*): Moves of each expert onto the device during this run (per-expert
            offload only): expert-major generation loads each expert once.
    """

    images: list | np.ndarray | torch.Tensor | None
    paths: list[str] | None = None
    expert_loads: list[int] | None = None


def _check_component_libraries(folder: str) -> None:
    """Refuse a `model_index.json` whose components come from other libraries than diffusers / diffusers_experts:
    diffusers would import whatever module the (possibly downloaded) file names."""
    index_file = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_file):
        raise ValueError(f"No model_index.json in {folder!r}: not a saved MultiExpertPipeline.")
    with open(index_file, encoding="utf-8") as f:
        index = json.load(f)
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        library = str(value[0])
        if library != "diffusers" and library.split(".")[0] != "diffusers_experts":
            raise ValueError(
                f"Component `{name}` of {index_file!r} comes from library {library!r}; MultiExpertPipeline loads "
                f"components from 'diffusers' and 'diffusers_experts' only."
            )


def _step_parameters(scheduler) -> set[str]:
    """Keyword arguments the (base) scheduler's `step` accepts."""
    step = scheduler.base.step if isinstance(scheduler, BlendedScheduler) else scheduler.step
    return set(inspect.signature(step).parameters)


class MultiExpertPipeline(DiffusionPipeline):
    r"""
    Sampling pipeline for an [`ExpertMixtureUNet`]: every model call is routed to the expert(s) that own the noise
    level of that call, under any diffusers scheduler of the DDPM family (DDPM, DDIM, DPM-Solver(++) with or without
    Karras sigmas, Euler, Heun, LMS, UniPC, ...). Wrap the scheduler in a [`BlendedScheduler`] to route sigma-stepping
    schedulers by their exact noise level, align steps to the expert boundaries or choose the steps per expert.

    Also: classifier-free guidance for class-conditional experts (one scale, or one per expert), latent experts with a
    VAE, split runs (`denoising_end` / `denoising_start` + `latents`), per-expert offload
    ([`~MultiExpertPipeline.enable_expert_offload`]) and expert-major bulk generation
    ([`~MultiExpertPipeline.generate_many`]).

    Class-conditional experts reserve a **null class** for guidance: `num_class_embeds = num_classes + 1` and the null
    (unconditional) class is the last index, `num_class_embeds - 1` (train with class dropout onto it).

    Args:
        unet ([`ExpertMixtureUNet`]): The mixture of expert denoisers.
        scheduler ([`SchedulerMixin`]): A diffusers scheduler or a [`BlendedScheduler`].
        vae ([`~diffusers.AutoencoderKL`], *optional*): Decodes the latents of latent experts.

    Example:
        ```py
        >>> from diffusers import DDIMScheduler
        >>> from diffusers_experts import ExpertMixtureUNet, MultiExpertPipeline

        >>> mixture = ExpertMixtureUNet.from_pretrained("path/to/mixture")
        >>> pipe = MultiExpertPipeline(unet=mixture, scheduler=DDIMScheduler())
        >>> images = pipe(batch_size=4, num_inference_steps=50).images
        >>> pipe.save_pretrained("my-pipeline")
        >>> pipe = MultiExpertPipeline.from_pretrained("my-pipeline")
        ```
    """

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: ExpertMixtureUNet, scheduler: SchedulerMixin, vae: AutoencoderKL | None = None):
        super().__init__()
        if not isinstance(unet, ExpertMixtureUNet):
            raise TypeError(f"`unet` must be an ExpertMixtureUNet, got {type(unet).__name__}.")
        if not isinstance(scheduler, SchedulerMixin):
            raise TypeError(
                f"`scheduler` must be a diffusers scheduler (SchedulerMixin), got {type(scheduler).__name__}."
            )
        if getattr(scheduler, "alphas_cumprod", None) is None:
            raise ValueError(
                f"`scheduler` {type(scheduler).__name__} has no `alphas_cumprod`: its model timesteps are not training "
                f"timesteps of a DDPM noise schedule, so calls cannot be routed to experts. Use a DDPM-family scheduler "
                f"(DDPM, DDIM, DPMSolverMultistep, Euler, Heun, LMS, UniPC, ...)."
            )
        base_config = scheduler.base.config if isinstance(scheduler, BlendedScheduler) else scheduler.config
        if base_config.num_train_timesteps != unet.config.num_train_timesteps:
            raise ValueError(
                f"`scheduler` has num_train_timesteps={base_config.num_train_timesteps} but the mixture was "
                f"trained with {unet.config.num_train_timesteps}: routing would put calls on the wrong experts."
            )
        if vae is not None and vae.config.latent_channels != unet.config.in_channels:
            raise ValueError(
                f"`vae` has latent_channels={vae.config.latent_channels} but the experts take "
                f"in_channels={unet.config.in_channels}: latent experts must denoise the VAE's latents."
            )
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.expert_offload: ExpertOffloader | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> MultiExpertPipeline:
        r"""
        Load a pipeline saved with `save_pretrained`, from a local folder or a Hub repo id (the snapshot is fetched
        with `huggingface_hub.snapshot_download`, then loaded locally: diffusers' own download refuses third-party
        component libraries).

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): A folder or a repo id `"org/name"`.
            revision, cache_dir, local_files_only, token: Hub options for a repo id.
            kwargs: Passed to `DiffusionPipeline.from_pretrained` (e.g. `torch_dtype`, or a component to replace:
                `scheduler=...`).
        """
        from ..hub import resolve_pipeline_folder

        hub_kwargs = {k: kwargs.pop(k) for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            path = resolve_pipeline_folder(path, **hub_kwargs)  # only the files loading needs
        _check_component_libraries(path)
        return super().from_pretrained(path, **kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        create_pr: bool = False,
        safe_serialization: bool = True,
        variant: str | None = None,
        **kwargs,
    ):
        r"""
        Push the pipeline (`model_index.json`, every component, the mixture's experts, a pipeline card and one card
        per expert) to the Hub in **one commit**, so a failed push leaves the previous revision intact. Options
        (`metadata`, `expert_sources`, `revision`, `commit_description`): see
        [`~diffusers_experts.hub.push_mixture_to_hub`].

        Returns:
            `huggingface_hub.CommitInfo`: The commit (`.oid` is its sha).
        """
        from ..hub import push_mixture_to_hub

        if variant is not None:
            kwargs["variant"] = variant
        return push_mixture_to_hub(
            self,
            repo_id,
            commit_message=commit_message,
            private=private,
            token=token,
            create_pr=create_pr,
            safe_serialization=safe_serialization,
            **kwargs,
        )

    # ------------------------------------------------------------------ per-expert offload

    def enable_expert_offload(
        self, device: str | torch.device | None = None, offload_device: str | torch.device = "cpu"
    ) -> ExpertOffloader:
        r"""
        Keep the experts on `offload_device` and move onto `device` only the expert(s) with non-zero weight for the
        current model call, evicting the others first. Hard routing moves each expert once per call; peak accelerator
        memory is about one expert (two during a blend). The VAE is moved to `device`. Undo with
        [`~MultiExpertPipeline.disable_expert_offload`].

        Args:
            device (`str` or `torch.device`, *optional*): Where experts run; defaults to `"cuda"` when available,
                else `"cpu"` (every move is then a no-op, the bookkeeping still runs).
            offload_device (`str` or `torch.device`, defaults to `"cpu"`): Where idle experts wait.
        """
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"`device` {str(device)!r} is not available on this machine; use device='cpu'.")
        self._device_before_offload = self.unet.device
        self.expert_offload = ExpertOffloader(self.unet, device, offload_device)
        if self.vae is not None:
            self.vae.to(device)
        return self.expert_offload

    def disable_expert_offload(self) -> None:
        """Stop per-expert offload and put every expert back on the device the mixture had before."""
        if self.expert_offload is not None:
            self.expert_offload.release(self._device_before_offload)
            self.expert_offload = None

    @property
    def _run_device(self) -> torch.device:
        return self.expert_offload.device if self.expert_offload is not None else self._execution_device

    # ------------------------------------------------------------------ checks and preparation

    def _sample_shape(self, batch_size: int) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        spatial = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, *spatial)

    def _guidance_scales(self, guidance_scale) -> torch.Tensor:
        """One guidance scale per expert, from a float or a list."""
        num_experts = self.unet.num_experts
        if isinstance(guidance_scale, (int, float)) and not isinstance(guidance_scale, bool):
            values = [float(guidance_scale)] * num_experts
        elif isinstance(guidance_scale, (Sequence, torch.Tensor)) and not isinstance(guidance_scale, str):
            values = [float(g) for g in guidance_scale]
            if len(values) != num_experts:
                raise ValueError(
                    f"`guidance_scale` must be a float or hold one value per expert ({num_experts}), got "
                    f"{list(guidance_scale)!r}."
                )
        else:
            raise TypeError(f"`guidance_scale` must be a float or a list of floats, got {guidance_scale!r}.")
        if not all(math.isfinite(g) for g in values):
            raise ValueError(f"`guidance_scale` must be finite, got {guidance_scale!r}.")
        guided = any(g != 1.0 for g in values)
        num_class_embeds = self.unet.config.num_class_embeds
        if guided and num_class_embeds is None:
            raise ValueError(
                f"`guidance_scale`={guidance_scale!r} needs class-conditional experts (classifier-free guidance), but "
                f"the experts are unconditional (num_class_embeds=None): use guidance_scale=1.0."
            )
        if guided and num_class_embeds < 2:
            raise ValueError(f"Guidance needs a class and the null class, but num_class_embeds={num_class_embeds}.")
        return torch.tensor(values, dtype=torch.float32)

    def _class_labels(self, class_labels, batch_size: int, guided: bool, device: torch.device) -> torch.Tensor | None:
        num_class_embeds = self.unet.config.num_class_embeds
        if num_class_embeds is None:
            if class_labels is not None:
                raise ValueError(
                    f"`class_labels`={class_labels!r} were given, but the experts are unconditional "
                    f"(num_class_embeds=None): pass class_labels=None."
                )
            return None
        if class_labels is None:
            raise ValueError(
                f"`class_labels` must be given: the experts are class-conditional (num_class_embeds="
                f"{num_class_embeds}, null class {num_class_embeds - 1})."
            )
        labels = torch.as_tensor(class_labels)
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise TypeError(f"`class_labels` must be integers, got {class_labels!r}.")
        if labels.ndim == 0:
            labels = labels.expand(batch_size)
        if tuple(labels.shape) != (batch_size,):
            raise ValueError(
                f"`class_labels` must be one integer or one per image ({batch_size}), got shape {tuple(labels.shape)}."
            )
        # with guidance the last index is the reserved null class, not a class to generate
        high = num_class_embeds - 1 if guided else num_class_embeds
        if bool(((labels < 0) | (labels >= high)).any()):
            raise ValueError(
                f"`class_labels` must lie in [0, {high - 1}] (num_class_embeds={num_class_embeds}"
                f"{', the last index is the null class used for guidance' if guided else ''}), got {labels.tolist()}."
            )
        return labels.to(device=device, dtype=torch.long)

    @staticmethod
    def _check_fractions(denoising_start, denoising_end, latents) -> None:
        for name, value, low_ok, high_ok in (
            ("denoising_start", denoising_start, True, False),
            ("denoising_end", denoising_end, False, True),
        ):
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"`{name}` must be a float in [0, 1], got {value!r}.")
            if not ((0.0 <= value if low_ok else 0.0 < value) and (value <= 1.0 if high_ok else value < 1.0)):
                interval = "[0, 1)" if name == "denoising_start" else "(0, 1]"
                raise ValueError(f"`{name}` must be a fraction of the noise range in {interval}, got {value!r}.")
        if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
            raise ValueError(
                f"`denoising_start` ({denoising_start}) must be < `denoising_end` ({denoising_end}): the run denoises "
                f"from the first fraction to the second."
            )
        if denoising_start is not None and latents is None:
            raise ValueError(
                "`latents` must be given with `denoising_start`: the partly denoised latents handed over by the run "
                "that stopped at `denoising_end`."
            )

    def _step_range(self, timesteps: torch.Tensor, order: int, denoising_start, denoising_end) -> tuple[int, int]:
        """Indices `[begin, end)` of the scheduler's timesteps inside the denoising fractions (as SDXL base/refiner)."""
        num_train_timesteps = self.unet.config.num_train_timesteps

        def cut(fraction: float) -> int:
            cutoff = round(num_train_timesteps - fraction * num_train_timesteps)
            count = int((timesteps >= cutoff).sum())
            # second-order schedulers: cut between two full steps, never between a step's two model calls
            if order == 2 and count % 2 == 1 and count < len(timesteps):
                count -= 1
            return count

        begin = cut(denoising_start) if denoising_start is not None else 0
        end = cut(denoising_end) if denoising_end is not None else len(timesteps)
        if end <= begin:
            raise ValueError(
                f"`denoising_start`={denoising_start} / `denoising_end`={denoising_end} select no step of the "
                f"{len(timesteps)}-step schedule: widen the range or use more inference steps."
            )
        return begin, end

    def _prepare_run(
        self,
        batch_size: int,
        num_inference_steps: int,
        generator,
        class_labels,
        guidance_scale,
        eta: float,
        latents: torch.Tensor | None,
        denoising_start: float | None,
        denoising_end: float | None,
        output_type: str,
    ) -> SimpleNamespace:
        """Check the arguments of one run and build its state: latents, scheduler, steps, labels, guidance."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}, got {output_type!r}.")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators, but batch_size={batch_size}: give one per image."
            )
        self._check_fractions(denoising_start, denoising_end, latents)
        device = self._run_device
        scales = self._guidance_scales(guidance_scale)
        labels = self._class_labels(class_labels, batch_size, bool((scales != 1).any()), device)

        # 1. schedule (aligned to the mixture's boundaries by a BlendedScheduler that asks for it)
        scheduler = self.scheduler
        if isinstance(scheduler, BlendedScheduler):
            scheduler.set_timesteps(num_inference_steps, device=device, mixture=self.unet)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device)
        begin, end = self._step_range(scheduler.timesteps, scheduler.order, denoising_start, denoising_end)
        if begin > 0 and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)

        # 2. latents: fresh noise scaled to the first noise level, or handed-over latents used as they are
        shape = self._sample_shape(batch_size)
        dtype = next(self.unet.experts[0].parameters()).dtype
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            latents = latents * scheduler.init_noise_sigma
        else:
            if not torch.is_tensor(latents) or tuple(latents.shape) != shape:
                got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
                raise ValueError(f"`latents` must have shape {shape} (batch, channels, height, width), got {got}.")
            latents = latents.to(device=device, dtype=dtype)
            if denoising_start is None:
                latents = latents * scheduler.init_noise_sigma

        # 3. extra arguments of the scheduler's step
        accepted = _step_parameters(scheduler)
        step_kwargs = {}
        if "eta" in accepted:
            step_kwargs["eta"] = eta
        if "generator" in accepted:
            step_kwargs["generator"] = generator
        steps = [(begin + i, t) for i, t in enumerate(scheduler.timesteps[begin:end])]
        run = SimpleNamespace(
            latents=latents,
            scheduler=scheduler,
            steps=steps,
            labels=labels,
            scales=scales,
            step_kwargs=step_kwargs,
            device=device,
        )
        run.plan = self._routing_plan(run)
        return run

    # ------------------------------------------------------------------ denoising

    def _routing_timestep(self, scheduler, timestep, step_index: int) -> torch.Tensor:
        """Training timestep of a model call: the BlendedScheduler's noise-level mapping, or the model timestep."""
        if isinstance(scheduler, BlendedScheduler):
            return scheduler.routing_timestep(timestep, step_index=step_index)
        return torch.as_tensor(timestep).float()

    def _routing_plan(self, run: SimpleNamespace) -> list[SimpleNamespace]:
        """Per step of a run, computed once: routing weights `(1, N)`, active experts, guidance (on or off, scale)."""
        if not run.steps:
            return []
        routing_t = torch.stack(
            [self._routing_timestep(run.scheduler, t, index).reshape(()) for index, t in run.steps]
        ).float()
        all_weights = self.unet.expert_weights(routing_t.cpu(), batch_size=len(run.steps)).detach()
        plan = []
        for weights in all_weights.to(run.latents.device):
            active = torch.nonzero(weights > 0).flatten().tolist()
            guided = bool((run.scales[active] != 1).any())
            # a blend guides with the routing-weighted mean of the active experts' scales
            scale = float((weights.cpu() * run.scales).sum())
            single = len(active) == 1 and float(weights[active[0]]) == 1.0
            plan.append(
                SimpleNamespace(weights=weights[None], active=active, guided=guided, scale=scale, single=single)
            )
        return plan

    def _expert_schedule(self, run: SimpleNamespace) -> list[list[int]]:
        """Active experts (non-zero weight) of every step of a prepared run."""
        return [step.active for step in run.plan]

    def _denoise(self, run: SimpleNamespace, positions: range, progress_bar, callback_on_step_end, callback_inputs):
        """Denoise `run` over its steps `positions`: route, (guide), step."""
        unet, scheduler = self.unet, run.scheduler
        latents = run.latents
        for position in positions:
            step_index, t = run.steps[position]
            route = run.plan[position]
            if self.expert_offload is not None:
                self.expert_offload.activate(route.active)

            # classifier-free guidance when an active expert has a scale != 1: uncond and cond in one batch
            guided = route.guided
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            labels = run.labels
            if guided:
                null = torch.full_like(labels, unet.config.num_class_embeds - 1)
                labels = torch.cat([null, labels])
            if route.single:  # hard routing: the one owning expert, called as the mixture would call it
                noise_pred = _sample_of(unet.experts[route.active[0]](model_input, t, class_labels=labels))
            else:
                weights = route.weights.expand(model_input.shape[0], -1)
                noise_pred = unet(model_input, t, class_labels=labels, expert_weights=weights).sample
            if guided:
                noise_uncond, noise_cond = noise_pred.chunk(2)
                noise_pred = noise_uncond + route.scale * (noise_cond - noise_uncond)

            latents = scheduler.step(noise_pred, t, latents, **run.step_kwargs).prev_sample

            if callback_on_step_end is not None:
                available = {"latents": latents}
                values = {name: available[name] for name in callback_inputs}
                outputs = callback_on_step_end(self, step_index, t, values) or {}
                latents = outputs.pop("latents", latents)
            progress_bar.set_postfix_str(f"expert {'+'.join(str(k) for k in route.active)}", refresh=False)
            progress_bar.update()
        run.latents = latents

    def _decode(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        image = latents
        if self.vae is not None:
            scaling = self.vae.config.scaling_factor
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            image = latents.to(self.vae.dtype) / scaling + shift
            image = self.vae.decode(image, return_dict=False)[0]
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()
        return self.numpy_to_pil(image) if output_type == "pil" else image

    def _check_callback_inputs(self, callback_on_step_end, callback_on_step_end_tensor_inputs) -> list[str]:
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"`callback_on_step_end` must be callable, got {callback_on_step_end!r}.")
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` {unknown} are not available; valid: {self._callback_tensor_inputs}."
            )
        return list(callback_on_step_end_tensor_inputs)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        guidance_scale: float | list[float] = 1.0,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images with the mixture, each model call routed to the experts that own its noise level.

        Args:
            batch_size (`int`, defaults to 1): Number of images.
            num_inference_steps (`int`, defaults to 50): Denoising steps (of the whole noise range, also in split runs).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): For determinism; a list gives one
                generator per image (image i's noise from `generator[i]`).
            class_labels (`int`, `list[int]` or `torch.Tensor`, *optional*): Classes of class-conditional experts,
                one for all images or one per image, in `[0, num_class_embeds - 2]` with guidance (the last index is
                the null class) and `[0, num_class_embeds - 1]` without.
            guidance_scale (`float` or `list[float]`, defaults to 1.0): Classifier-free guidance scale `s` in
                `eps = eps_uncond + s * (eps_cond - eps_uncond)`; one value per expert (expert 0 first) to guide the
                noise ranges differently (1.0 for an expert skips its unconditional pass).
            eta (`float`, defaults to 0.0): DDIM's eta (passed to schedulers whose `step` takes it).
            latents (`torch.Tensor`, *optional*): Initial noise (scaled by `init_noise_sigma`), or, with
                `denoising_start`, the latents handed over by a run that stopped at `denoising_end` (used as is).
            denoising_start (`float`, *optional*): Start this run at this fraction of the noise range (0 = pure noise).
            denoising_end (`float`, *optional*): Stop at this fraction, e.g. `1 - boundary / T` to stop after the
                high-noise experts; return the latents with `output_type="latent"` and finish elsewhere.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` or `"latent"` (no decoding).
            return_dict (`bool`, defaults to `True`): Return an `ImagePipelineOutput` instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): `callback(pipe, step_index, timestep, callback_kwargs)`
                called after every step; may return `{"latents": ...}` to replace them.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): Tensors passed to it.

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the images.

        Example:
            ```py
            >>> images = pipe(batch_size=8, num_inference_steps=25, class_labels=3, guidance_scale=[1.0, 2.0, 4.0]).images
            >>> # split run: high-noise experts here, low-noise experts elsewhere
            >>> handover = pipe(batch_size=8, denoising_end=0.5, output_type="latent").images
            >>> images = pipe(batch_size=8, denoising_start=0.5, latents=handover).images
            ```
        """
        callback_inputs = self._check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        run = self._prepare_run(
            batch_size,
            num_inference_steps,
            generator,
            class_labels,
            guidance_scale,
            eta,
            latents,
            denoising_start,
            denoising_end,
            output_type,
        )
        with self.progress_bar(total=len(run.steps)) as progress_bar:
            self._denoise(run, range(len(run.steps)), progress_bar, callback_on_step_end, callback_inputs)
        image = self._decode(run.latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    # ------------------------------------------------------------------ expert-major bulk generation

    @torch.no_grad()
    def generate_many(
        self,
        num_images: int,
        batch_size: int = 16,
        seed: int = 0,
        output_dir: str | os.PathLike | None = None,
        intermediates: str = "memory",
        class_labels: int | Sequence[int] | torch.Tensor | None = None,
        output_type: str = "pil",
        **call_kwargs,
    ) -> BulkGenerationOutput:
        r"""
        Generate many images expert by expert (MEME's memory-saving inference): all batches go through the
        highest-noise expert's steps first, intermediates are kept, then the next expert, so with
        [`~MultiExpertPipeline.enable_expert_offload`] each expert is loaded onto the device once in total (a loop of
        `__call__` loads every expert once per batch). Image `i`'s noise comes from
        `torch.Generator().manual_seed(seed + i)`, so images do not depend on batch size or order and equal
        `pipe(generator=[torch.Generator().manual_seed(seed + i) for i in batch], ...)`.

        Args:
            num_images (`int`): Number of images.
            batch_size (`int`, defaults to 16): Images per model call.
            seed (`int`, defaults to 0): Image `i` uses seed `seed + i`.
            output_dir (`str`, *optional*): Write `000000.png`, `000001.png`, ... there; images already present are
                skipped, so an interrupted run resumes without redoing finished images.
            intermediates (`str`, defaults to `"memory"`): Where latents wait between experts: `"memory"` (on the
                offload device when offloading) or `"disk"` (safetensors under `output_dir/.intermediates`, with the
                per-batch solver state such as multistep history, for sets too large for memory).
            class_labels (`int` or sequence, *optional*): One class for all images or one per image.
            output_type (`str`, defaults to `"pil"`): Type of the returned images without `output_dir`.
            call_kwargs: `num_inference_steps`, `guidance_scale`, `eta`, `denoising_start`, `denoising_end` as in
                `__call__` (not `generator`, `latents`, `batch_size`).

        Returns:
            [`BulkGenerationOutput`]: `images` (or `paths` with `output_dir`) and `expert_loads`.
        """
        # 1. checks
        if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
            raise ValueError(f"`num_images` must be a positive integer, got {num_images!r}.")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if not isinstance(seed, int):
            raise TypeError(f"`seed` must be an integer, got {seed!r}.")
        if intermediates not in INTERMEDIATES:
            raise ValueError(f"`intermediates` must be one of {list(INTERMEDIATES)}, got {intermediates!r}.")
        if intermediates == "disk" and output_dir is None:
            raise ValueError("`intermediates='disk'` needs `output_dir` (the latents are kept under it).")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}, got {output_type!r}.")
        reserved = sorted(
            {"generator", "latents", "batch_size", "return_dict", "callback_on_step_end"} & set(call_kwargs)
        )
        if reserved:
            raise TypeError(f"generate_many sets {reserved} itself; remove them from the arguments.")
        allowed = {"num_inference_steps", "guidance_scale", "eta", "denoising_start", "denoising_end"}
        unknown = sorted(set(call_kwargs) - allowed)
        if unknown:
            raise TypeError(f"Unknown argument(s) {unknown} for generate_many; valid: {sorted(allowed)}.")
        if call_kwargs.get("denoising_start") is not None:
            raise ValueError("`denoising_start` needs handed-over latents; generate_many starts from noise.")
        labels = self._bulk_labels(class_labels, num_images)

        # 2. what is left to do (resume: finished PNGs are kept)
        paths = None
        todo = list(range(num_images))
        if output_dir is not None:
            os.makedirs(output_dir, exist_ok=True)
            paths = [os.path.join(output_dir, IMAGE_NAME.format(i)) for i in range(num_images)]
            todo = [i for i in todo if not os.path.isfile(paths[i])]
        batches = [todo[j : j + batch_size] for j in range(0, len(todo), batch_size)]

        # 3. one prepared run per batch, each with its own scheduler copy (multistep solvers keep per-batch history)
        runs = []
        for indices in batches:
            generators = [torch.Generator().manual_seed(seed + i) for i in indices]
            run = self._prepare_run(
                len(indices),
                call_kwargs.get("num_inference_steps", 50),
                generators,
                None if labels is None else labels[indices],
                call_kwargs.get("guidance_scale", 1.0),
                call_kwargs.get("eta", 0.0),
                None,
                None,
                call_kwargs.get("denoising_end"),
                output_type,
            )
            run.scheduler = _copy_scheduler(run.scheduler)
            run.indices = indices
            runs.append(run)
        offload = self.expert_offload
        if offload is not None:
            offload.reset_counts()

        # 4. expert-major: each segment of steps with the same active experts, over all batches
        spill = os.path.join(os.fspath(output_dir), ".intermediates") if intermediates == "disk" else None
        if runs:
            segments = _segments(self._expert_schedule(runs[0]))
            with self.progress_bar(total=len(runs[0].steps) * len(runs)) as progress_bar:
                for start, stop in segments:
                    for j, run in enumerate(runs):
                        self._restore_latents(run, spill, j)
                        self._denoise(run, range(start, stop), progress_bar, None, [])
                        self._park_latents(run, spill, j)

        # 5. decode; write PNGs or collect the images
        images = []
        for j, run in enumerate(runs):
            self._restore_latents(run, spill, j)
            if output_dir is None:
                images.append(self._decode(run.latents, output_type))
                continue
            for i, image in zip(run.indices, self._decode(run.latents, "pil")):
                _save_png_atomically(image, paths[i])
            run.latents = None
        if spill is not None and os.path.isdir(spill):
            for name in os.listdir(spill):
                os.remove(os.path.join(spill, name))
            os.rmdir(spill)
        loads = list(offload.load_counts) if offload is not None else None
        if output_dir is not None:
            return BulkGenerationOutput(images=None, paths=paths, expert_loads=loads)
        return BulkGenerationOutput(images=_concat_images(images, output_type), paths=None, expert_loads=loads)

    def _bulk_labels(self, class_labels, num_images: int) -> torch.Tensor | None:
        if class_labels is None:
            return None
        labels = torch.as_tensor(class_labels)
        if labels.ndim == 0:
            labels = labels.expand(num_images)
        if tuple(labels.shape) != (num_images,):
            raise ValueError(
                f"`class_labels` must be one integer or one per image ({num_images}), got shape {tuple(labels.shape)}."
            )
        return labels

    def _park_latents(self, run: SimpleNamespace, spill: str | None, j: int) -> None:
        """Between experts: latents and per-batch solver state to disk (`spill`), or latents to the offload device."""
        if spill is not None:
            os.makedirs(spill, exist_ok=True)
            tensors = {"latents": run.latents}
            tensors.update({f"state.{key}": value for key, value in _take_solver_state(run).items()})
            tensors = {key: value.detach().cpu().contiguous() for key, value in tensors.items()}
            save_file(tensors, os.path.join(spill, f"batch_{j}.safetensors"))
            run.latents = None
        elif self.expert_offload is not None:
            run.latents = run.latents.to(self.expert_offload.offload_device)

    def _restore_latents(self, run: SimpleNamespace, spill: str | None, j: int) -> None:
        if run.latents is None:
            tensors = load_file(os.path.join(spill, f"batch_{j}.safetensors"), device=str(run.device))
            run.latents = tensors.pop("latents")
            _put_solver_state(run, {key[len("state.") :]: value for key, value in tensors.items()})
        run.latents = run.latents.to(run.device)


def _solver(scheduler):
    return scheduler.base if isinstance(scheduler, BlendedScheduler) else scheduler


def _take_solver_state(run: SimpleNamespace) -> dict[str, torch.Tensor]:
    """Remove and return the batch-shaped tensors a scheduler keeps between steps (multistep history, Heun's
    first-order sample, ...): attributes, or items of list attributes, shaped like the run's latents."""
    solver, shape = _solver(run.scheduler), tuple(run.latents.shape)
    state = {}
    for name, value in vars(solver).items():
        if torch.is_tensor(value) and tuple(value.shape) == shape:
            state[name] = value
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if torch.is_tensor(item) and tuple(item.shape) == shape:
                    state[f"{name}.{i}"] = item
    for key in state:
        name, _, index = key.partition(".")
        if index:
            getattr(solver, name)[int(index)] = None
        else:
            setattr(solver, name, None)
    return state


def _put_solver_state(run: SimpleNamespace, state: dict[str, torch.Tensor]) -> None:
    """Put back what [`_take_solver_state`] removed."""
    solver = _solver(run.scheduler)
    for key, value in state.items():
        name, _, index = key.partition(".")
        if index:
            getattr(solver, name)[int(index)] = value
        else:
            setattr(solver, name, value)


def _copy_scheduler(scheduler):
    """An independent copy of a scheduler whose timesteps are already set (per-batch solver state)."""
    import copy

    return copy.deepcopy(scheduler)


def _segments(schedule: list[list[int]]) -> list[tuple[int, int]]:
    """Maximal runs `[start, stop)` of consecutive steps with the same active experts."""
    segments = []
    start = 0
    for i in range(1, len(schedule) + 1):
        if i == len(schedule) or schedule[i] != schedule[start]:
            segments.append((start, i))
            start = i
    return segments


def _save_png_atomically(image, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _concat_images(chunks: list, output_type: str):
    if output_type == "pil":
        return [image for chunk in chunks for image in chunk]
    if output_type == "np":
        return np.concatenate(chunks) if chunks else np.zeros((0,))
    return torch.cat(chunks) if chunks else torch.zeros(0)
