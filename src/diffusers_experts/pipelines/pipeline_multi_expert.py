"""MultiExpertPipeline: sampling of an ExpertMixtureUNet under any diffusers scheduler, routed by the mixture."""

from __future__ import annotations

import copy
import glob
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..constants import MODEL_INDEX_NAME, TRUSTED_LIBRARIES
from ..hub_mixin import HubPushMixin
from ..loading import pop_hub_options, resolve_pipeline_folder
from ..models.expert_calls import sample_of
from ..models.expert_mixture import ExpertMixtureUNet
from ..routing import BOUNDARY_TOLERANCE
from ..schedulers.scheduling_blended import BlendedScheduler
from . import bulk_generation
from .bulk_generation import BulkGenerationOutput
from .expert_offload import ExpertOffloader


@dataclass
class MultiExpertPipelineOutput(ImagePipelineOutput):
    r"""
    Output of [`MultiExpertPipeline`]: diffusers' `ImagePipelineOutput` plus, for a run that stopped at
    `denoising_end`, the scheduler as it stopped.

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`): The images (or latents).
        solver_state ([`SchedulerMixin`], *optional*): A copy of the scheduler after the run's last step, with its
            multistep history (DPM-Solver, UniPC, ...) or half-done second-order step (Heun). Pass it with the
            latents to the run that starts at `denoising_start` to continue exactly where this run stopped.
    """

    solver_state: SchedulerMixin | None = None


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


# Components that may come from `transformers`, each with the transformers base class its class must have.
TRANSFORMERS_COMPONENTS = {"text_encoder": "PreTrainedModel", "tokenizer": "PreTrainedTokenizerBase"}


def _check_component_libraries(folder: str) -> None:
    """Refuse a `model_index.json` whose components come from other libraries than diffusers / diffusers_experts
    (diffusers would import whatever module the possibly downloaded file names), except a `text_encoder` and a
    `tokenizer` of `transformers` classes; a transformers text encoder must be stored as safetensors."""
    index_file = os.path.join(folder, MODEL_INDEX_NAME)
    if not os.path.isfile(index_file):
        raise ValueError(f"No {MODEL_INDEX_NAME} in {folder!r}: not a saved MultiExpertPipeline.")
    for name, value in DiffusionPipeline.load_config(folder).items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        library = str(value[0])
        if library == "transformers" and name in TRANSFORMERS_COMPONENTS:
            _check_transformers_component(folder, name, str(value[1]))
            continue
        if library.split(".")[0] not in TRUSTED_LIBRARIES:
            raise ValueError(
                f"Component `{name}` of {index_file!r} comes from library {library!r}; MultiExpertPipeline loads "
                f"components from {' and '.join(repr(name) for name in TRUSTED_LIBRARIES)} only (and "
                f"{' / '.join(f'`{c}`' for c in TRANSFORMERS_COMPONENTS)} from 'transformers')."
            )


def _check_transformers_component(folder: str, name: str, class_name: str) -> None:
    """A `text_encoder` / `tokenizer` entry naming a transformers class: it must be a transformers model / tokenizer
    class (nothing else is imported), and a text encoder's weights must be safetensors."""
    import transformers

    base = getattr(transformers, TRANSFORMERS_COMPONENTS[name])
    try:
        cls = getattr(transformers, class_name, None)
    except Exception:  # a class whose optional dependency is missing
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(
            f"Component `{name}` of {os.path.join(folder, MODEL_INDEX_NAME)!r} names {class_name!r}, which is not a "
            f"`transformers.{base.__name__}` class."
        )
    if name == "text_encoder" and not glob.glob(os.path.join(folder, name, "*.safetensors")):
        raise ValueError(
            f"Component `text_encoder` in {os.path.join(folder, name)!r} has no safetensors weights: "
            f"MultiExpertPipeline loads text encoders from safetensors only (save with safe_serialization=True)."
        )


@dataclass(frozen=True)
class _ClassTable:
    """The class embedding table of class-conditional experts: `size` labels, the null class `null` among them."""

    size: int
    null: int
    described: str  # the config keys that define it, for error messages


def _step_parameters(scheduler) -> set[str]:
    """Keyword arguments the (base) scheduler's `step` accepts."""
    step = scheduler.base.step if isinstance(scheduler, BlendedScheduler) else scheduler.step
    return set(inspect.signature(step).parameters)


class MultiExpertPipeline(HubPushMixin, DiffusionPipeline):
    r"""
    Sampling pipeline for an [`ExpertMixtureUNet`] under any diffusers scheduler of the DDPM family (DDPM, DDIM,
    DPM-Solver(++) with or without Karras sigmas, Euler, Heun, LMS, UniPC, ...). The pipeline calls the mixture, and
    the mixture routes every call by the timestep it is conditioned on (the `t` the scheduler hands the model), so the
    expert that runs is always the one trained on that `t`. Wrap the scheduler in a [`BlendedScheduler`] to align the
    steps to the experts' boundaries or choose the steps per expert.

    Also: classifier-free guidance (one scale, or one per expert) for class-conditional and text-conditional experts,
    latent experts with a VAE, split runs (`denoising_end` / `denoising_start` + `latents`), per-expert offload
    ([`~MultiExpertPipeline.enable_expert_offload`]) and expert-major bulk generation
    ([`~MultiExpertPipeline.generate_many`]).

    The pipeline calls the mixture with the experts' own argument names (`sample` for UNets, `hidden_states` for
    DiT / PixArt-style transformers), so any diffusers denoiser of the DDPM family can be an expert:

    - **Class-conditional** experts (`UNet2DModel` / `UNet2DConditionModel` with `num_class_embeds`, DiT with
      `num_embeds_ada_norm`) get `class_labels`. UNet experts reserve a **null class** for guidance:
      `num_class_embeds = num_classes + 1` and the null (unconditional) class is the last index,
      `num_class_embeds - 1` (train with class dropout onto it); DiT's null class is `num_embeds_ada_norm`.
    - **Text-conditional** experts (those whose `forward` takes `encoder_hidden_states`: `UNet2DConditionModel`,
      PixArt, ...) get `prompt_embeds`, or `prompt` strings encoded by the optional `text_encoder` and `tokenizer`
      (CLIP-style, as `StableDiffusionPipeline` encodes them). Guidance uses `negative_prompt_embeds`, or the
      encoded `negative_prompt` (`""` by default).

    The unconditional pass of guidance drops every condition the experts take (null class and negative prompt).

    Args:
        unet ([`ExpertMixtureUNet`]): The mixture of expert denoisers.
        scheduler ([`SchedulerMixin`]): A diffusers scheduler or a [`BlendedScheduler`].
        vae ([`~diffusers.AutoencoderKL`], *optional*): Decodes the latents of latent experts.
        text_encoder ([`~transformers.PreTrainedModel`], *optional*): Encodes `prompt` for text-conditional experts
            (`text_encoder(input_ids)[0]` are the `encoder_hidden_states`, e.g. `CLIPTextModel`).
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*): Tokenizes `prompt` for the text encoder.

    Example:
        ```py
        >>> from diffusers import DDIMScheduler
        >>> from diffusers_experts import ExpertMixtureUNet, MultiExpertPipeline

        >>> mixture = ExpertMixtureUNet.from_pretrained("path/to/mixture")
        >>> pipe = MultiExpertPipeline(unet=mixture, scheduler=DDIMScheduler())
        >>> images = pipe(batch_size=4, num_inference_steps=50).images
        >>> pipe.save_pretrained("my-pipeline")
        >>> pipe = MultiExpertPipeline.from_pretrained("my-pipeline")

        >>> # text-conditional experts (e.g. UNet2DConditionModel), with a CLIP text encoder and tokenizer
        >>> from transformers import CLIPTextModel, CLIPTokenizer

        >>> text_encoder = CLIPTextModel.from_pretrained("path/to/sd", subfolder="text_encoder")
        >>> tokenizer = CLIPTokenizer.from_pretrained("path/to/sd", subfolder="tokenizer")
        >>> pipe = MultiExpertPipeline(
        ...     unet=ExpertMixtureUNet.from_pretrained("path/to/text-mixture"),
        ...     scheduler=DDIMScheduler(),
        ...     text_encoder=text_encoder,
        ...     tokenizer=tokenizer,
        ... )
        >>> # guidance 7.5 on the high-noise expert, 3.0 on the low-noise one (expert 0 first)
        >>> images = pipe(prompt=["a red car", "a cat"], num_images_per_prompt=2, guidance_scale=[3.0, 7.5]).images
        >>> # or precomputed embeddings, without a text encoder
        >>> images = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, guidance_scale=5.0).images
        ```
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        unet: ExpertMixtureUNet,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer=None,
    ):
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
        for name, component in (("text_encoder", text_encoder), ("tokenizer", tokenizer)):
            if component is not None and "encoder_hidden_states" not in unet.call_parameters:
                raise ValueError(
                    f"`{name}` was given, but the experts are not text-conditional: their forward takes "
                    f"{list(unet.call_parameters)}, no `encoder_hidden_states`."
                )
        if text_encoder is not None and not isinstance(text_encoder, torch.nn.Module):
            raise TypeError(f"`text_encoder` must be a torch module, got {type(text_encoder).__name__}.")
        if tokenizer is not None and not (callable(tokenizer) and hasattr(tokenizer, "model_max_length")):
            raise TypeError(
                f"`tokenizer` must be a transformers tokenizer (callable, with `model_max_length`), got "
                f"{type(tokenizer).__name__}."
            )
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
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

        Components come from diffusers and diffusers_experts; a `text_encoder` and `tokenizer` may be transformers
        classes (a text encoder stored as safetensors).
        """
        # a folder as is; for a repo id a snapshot of only the files loading needs
        path = resolve_pipeline_folder(pretrained_model_name_or_path, **pop_hub_options(kwargs))
        _check_component_libraries(path)
        if kwargs.get("use_safetensors") is False and kwargs.get("text_encoder") is None:
            index = DiffusionPipeline.load_config(path).get("text_encoder")
            if isinstance(index, list) and index[0] == "transformers":
                raise ValueError(
                    "`use_safetensors=False`: MultiExpertPipeline loads text encoders from safetensors only."
                )
        return super().from_pretrained(path, **kwargs)

    # ------------------------------------------------------------------ per-expert offload

    def enable_expert_offload(
        self, device: str | torch.device | None = None, offload_device: str | torch.device = "cpu"
    ) -> ExpertOffloader:
        r"""
        Keep the experts on `offload_device` and move onto `device` only the expert(s) with non-zero weight for the
        current model call, evicting the others first. Hard routing moves each expert once per call; peak accelerator
        memory is about one expert (two during a blend). The VAE and the text encoder are moved to `device`. Undo with
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
        for component in (self.vae, self.text_encoder):
            if component is not None:
                component.to(device)
        return self.expert_offload

    def disable_expert_offload(self) -> None:
        """Stop per-expert offload and put every expert back on the device the mixture had before."""
        if self.expert_offload is not None:
            self.expert_offload.release(self._device_before_offload)
            self.expert_offload = None

    @property
    def _run_device(self) -> torch.device:
        return self.expert_offload.device if self.expert_offload is not None else self._execution_device

    # ------------------------------------------------------------------ checks (once, at the public entry points)

    def check_inputs(
        self,
        batch_size: int | None,
        num_inference_steps: int,
        generator,
        class_labels,
        guidance_scale,
        latents: torch.Tensor | None,
        denoising_start: float | None,
        denoising_end: float | None,
        output_type: str,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        solver_state: SchedulerMixin | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
    ) -> None:
        """Raise a `ValueError` / `TypeError` naming the argument for any bad input of [`~MultiExpertPipeline.__call__`]."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {list(OUTPUT_TYPES)}, got {output_type!r}.")
        if batch_size is not None and (
            not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
        ):
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        guided = self._check_guidance_scale(guidance_scale)
        batch_size = self._check_text_inputs(
            batch_size, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_images_per_prompt, guided
        )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators, but batch_size={batch_size}: give one per image."
            )
        self._check_fractions(denoising_start, denoising_end, latents)
        shape = self._sample_shape(batch_size)
        if latents is not None and (not torch.is_tensor(latents) or tuple(latents.shape) != shape):
            got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(f"`latents` must have shape {shape} (batch, channels, height, width), got {got}.")
        self._check_solver_state(solver_state, num_inference_steps, denoising_start)
        self._check_class_labels(class_labels, batch_size, guided)
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(f"`callback_on_step_end` must be callable, got {callback_on_step_end!r}.")
        unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` {unknown} are not available; valid: {self._callback_tensor_inputs}."
            )

    @property
    def _text_conditional(self) -> bool:
        """Whether the experts take text conditioning (`encoder_hidden_states`)."""
        return "encoder_hidden_states" in self.unet.call_parameters

    @property
    def _can_encode_text(self) -> bool:
        return self.text_encoder is not None and self.tokenizer is not None

    def _check_text_inputs(
        self,
        batch_size: int | None,
        prompt,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        num_images_per_prompt,
        guided: bool,
    ) -> int:
        """Check the text conditioning against the experts; return the number of images of the call."""
        if not isinstance(num_images_per_prompt, int) or isinstance(num_images_per_prompt, bool):
            raise TypeError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")
        if num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")
        named = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
        }
        if not self._text_conditional:
            given = [name for name, value in named.items() if value is not None]
            if given:
                raise ValueError(
                    f"`{given[0]}` was given, but the experts are not text-conditional: their forward takes "
                    f"{list(self.unet.call_parameters)}, no `encoder_hidden_states`."
                )
            if num_images_per_prompt != 1:
                raise ValueError(
                    f"`num_images_per_prompt`={num_images_per_prompt} is for prompts, but the experts are not "
                    f"text-conditional: set the number of images with `batch_size`."
                )
            return 1 if batch_size is None else batch_size
        for text, embeds in (("prompt", "prompt_embeds"), ("negative_prompt", "negative_prompt_embeds")):
            if named[text] is not None and named[embeds] is not None:
                raise ValueError(f"Pass either `{text}` or `{embeds}`, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError(
                "`prompt` or `prompt_embeds` must be given: the experts are text-conditional (they take "
                "`encoder_hidden_states`)."
            )
        for name in ("prompt", "negative_prompt"):
            value = named[name]
            if value is None:
                continue
            if not (isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
                raise TypeError(f"`{name}` must be a string or a list of strings, got {value!r}.")
            if isinstance(value, list) and not value:
                raise ValueError(f"`{name}` must not be an empty list.")
            if not self._can_encode_text:
                raise ValueError(
                    f"`{name}` needs the pipeline's `text_encoder` and `tokenizer` (MultiExpertPipeline(..., "
                    f"text_encoder=..., tokenizer=...)); without them pass `{name}_embeds`."
                )
        for name in ("prompt_embeds", "negative_prompt_embeds"):
            value = named[name]
            if value is not None and (not torch.is_tensor(value) or value.ndim != 3):
                got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(f"`{name}` must be a tensor of shape (batch, sequence, dim), got {got}.")
        num_prompts = len(prompt) if isinstance(prompt, list) else 1 if prompt is not None else prompt_embeds.shape[0]
        if isinstance(negative_prompt, list) and len(negative_prompt) != num_prompts:
            raise ValueError(
                f"`negative_prompt` has {len(negative_prompt)} entries, but there are {num_prompts} prompts: give "
                f"one negative prompt, or one per prompt."
            )
        if negative_prompt_embeds is not None:
            if prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(
                    f"`negative_prompt_embeds` must have the shape of `prompt_embeds` {tuple(prompt_embeds.shape)}, "
                    f"got {tuple(negative_prompt_embeds.shape)}."
                )
            if negative_prompt_embeds.shape[0] != num_prompts:
                raise ValueError(
                    f"`negative_prompt_embeds` has a batch of {negative_prompt_embeds.shape[0]}, but there are "
                    f"{num_prompts} prompts: give one per prompt."
                )
        if guided and negative_prompt_embeds is None and not self._can_encode_text:
            raise ValueError(
                "Classifier-free guidance (a `guidance_scale` != 1) needs unconditional text embeddings: pass "
                "`negative_prompt_embeds` (e.g. the embeddings of the empty prompt the experts were trained to drop "
                'to), or give the pipeline a `text_encoder` and `tokenizer` to encode `negative_prompt` (default "").'
            )
        num_images = num_prompts * num_images_per_prompt
        if batch_size is not None and batch_size != num_images:
            raise ValueError(
                f"`batch_size`={batch_size} does not match the prompts: {num_prompts} prompt(s) x "
                f"num_images_per_prompt={num_images_per_prompt} = {num_images} images; leave batch_size unset."
            )
        return num_images

    def _num_images(self, batch_size: int | None, prompt, prompt_embeds, num_images_per_prompt: int) -> int:
        """The number of images of a (checked) call: the prompts times `num_images_per_prompt`, or `batch_size`."""
        if prompt is not None:
            return (len(prompt) if isinstance(prompt, list) else 1) * num_images_per_prompt
        if prompt_embeds is not None:
            return prompt_embeds.shape[0] * num_images_per_prompt
        return 1 if batch_size is None else batch_size

    def _check_solver_state(self, solver_state, num_inference_steps: int, denoising_start: float | None) -> None:
        if solver_state is None:
            return
        if denoising_start is None:
            raise ValueError(
                "`solver_state` continues a run that stopped at `denoising_end`: pass it with `denoising_start` (and "
                "the handed-over `latents`)."
            )
        if type(solver_state) is not type(self.scheduler):
            raise TypeError(
                f"`solver_state` must be the `solver_state` of a run of this pipeline's scheduler "
                f"({type(self.scheduler).__name__}), got {type(solver_state).__name__}."
            )
        if solver_state.num_inference_steps != num_inference_steps:
            raise ValueError(
                f"`solver_state` comes from a {solver_state.num_inference_steps}-step run, but num_inference_steps="
                f"{num_inference_steps}: split runs share one schedule, pass the same num_inference_steps."
            )

    def _check_guidance_scale(self, guidance_scale) -> bool:
        """Check `guidance_scale` (a float or one per expert); return whether it guides any expert."""
        num_experts = self.unet.num_experts
        is_float = isinstance(guidance_scale, (int, float)) and not isinstance(guidance_scale, bool)
        is_list = isinstance(guidance_scale, (Sequence, torch.Tensor)) and not isinstance(guidance_scale, str)
        if not (is_float or is_list):
            raise TypeError(f"`guidance_scale` must be a float or a list of floats, got {guidance_scale!r}.")
        scales = self._guidance_scales(guidance_scale)
        if len(scales) != num_experts:
            raise ValueError(
                f"`guidance_scale` must be a float or hold one value per expert ({num_experts}), got "
                f"{list(guidance_scale)!r}."
            )
        if not bool(torch.isfinite(scales).all()):
            raise ValueError(f"`guidance_scale` must be finite, got {guidance_scale!r}.")
        guided = bool((scales != 1).any())
        table = self._class_table()
        if guided and table is None and not self._text_conditional:
            raise ValueError(
                f"`guidance_scale`={guidance_scale!r} needs conditional experts (classifier-free guidance), but the "
                f"experts are unconditional (num_class_embeds=None, no `encoder_hidden_states`): use guidance_scale=1.0."
            )
        if guided and table is not None and table.size < 2:
            raise ValueError(f"Guidance needs a class and the null class, but {table.described}.")
        return guided

    def _class_table(self) -> _ClassTable | None:
        """The experts' class embedding table, if they are class-conditional and take `class_labels`."""
        if "class_labels" not in self.unet.call_parameters:
            return None
        config = self.unet.config
        num_class_embeds = config.get("num_class_embeds")
        if num_class_embeds is not None and config.get("class_embed_type") is None:
            return _ClassTable(num_class_embeds, num_class_embeds - 1, f"num_class_embeds={num_class_embeds}")
        classes = config.get("num_embeds_ada_norm")
        if config.get("norm_type") == "ada_norm_zero" and classes:  # DiT: `classes` classes and a null embedding
            return _ClassTable(classes + 1, classes, f"num_embeds_ada_norm={classes}")
        return None

    def _check_class_labels(self, class_labels, batch_size: int, guided: bool) -> None:
        table = self._class_table()
        if table is None:
            if class_labels is not None:
                if "class_labels" not in self.unet.call_parameters:
                    raise ValueError(
                        f"`class_labels`={class_labels!r} were given, but the experts take no class labels: their "
                        f"forward takes {list(self.unet.call_parameters)}."
                    )
                raise ValueError(
                    f"`class_labels`={class_labels!r} were given, but the experts are unconditional "
                    f"(num_class_embeds=None): pass class_labels=None."
                )
            return
        if class_labels is None:
            raise ValueError(
                f"`class_labels` must be given: the experts are class-conditional ({table.described}, null class "
                f"{table.null})."
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
        # with guidance the null class is reserved for the unconditional pass, not a class to generate
        high = table.null if guided else table.size
        if bool(((labels < 0) | (labels >= high)).any()):
            raise ValueError(
                f"`class_labels` must lie in [0, {high - 1}] ({table.described}"
                f"{f', the null class {table.null} is reserved for guidance' if guided else ''}), got {labels.tolist()}."
            )

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

    # ------------------------------------------------------------------ preparation (inputs already checked)

    def _sample_shape(self, batch_size: int) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        spatial = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.config.in_channels, *spatial)

    def _guidance_scales(self, guidance_scale) -> torch.Tensor:
        """One guidance scale per expert (expert 0 first), from a float or a list."""
        if isinstance(guidance_scale, (int, float)):
            return torch.full((self.unet.num_experts,), float(guidance_scale))
        return torch.tensor([float(g) for g in guidance_scale], dtype=torch.float32)

    def _class_labels(self, class_labels, batch_size: int, device: torch.device) -> torch.Tensor | None:
        """Class labels as a `(batch_size,)` long tensor on `device` (one label is shared by all images)."""
        if class_labels is None:
            return None
        labels = torch.as_tensor(class_labels)
        return labels.expand(batch_size).to(device=device, dtype=torch.long)

    def prepare_timesteps(
        self,
        num_inference_steps: int,
        device: torch.device,
        denoising_start: float | None,
        denoising_end: float | None,
        scheduler: SchedulerMixin | None = None,
    ) -> tuple[torch.Tensor, int]:
        r"""
        Set the scheduler's timesteps (a [`BlendedScheduler`] aligns them to the mixture's experts) and return the
        run's part of them, with the index of its first step (SDXL base/refiner: `denoising_start` / `denoising_end`
        are fractions of the noise range; a timestep within the routing tolerance of a cut counts as on it). A
        `scheduler` handed over by a split run (its `solver_state`) keeps its timesteps and state and must have
        stopped exactly at `denoising_start`.
        """
        handed_over = scheduler is not None
        scheduler = scheduler if handed_over else self.scheduler
        if not handed_over and isinstance(scheduler, BlendedScheduler):
            scheduler.set_timesteps(num_inference_steps, device=device, mixture=self.unet)
        elif not handed_over:
            scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps, num_train_timesteps = scheduler.timesteps, self.unet.config.num_train_timesteps

        def cut(fraction: float) -> int:
            cutoff = round(num_train_timesteps - fraction * num_train_timesteps)
            count = int((timesteps >= cutoff - BOUNDARY_TOLERANCE).sum())
            # second-order schedulers: cut between two full steps, never between a step's two model calls
            if scheduler.order == 2 and count % 2 == 1 and count < len(timesteps):
                count -= 1
            return count

        begin = cut(denoising_start) if denoising_start is not None else 0
        end = cut(denoising_end) if denoising_end is not None else len(timesteps)
        if end <= begin:
            raise ValueError(
                f"`denoising_start`={denoising_start} / `denoising_end`={denoising_end} select no step of the "
                f"{len(timesteps)}-step schedule: widen the range or use more inference steps."
            )
        stopped_at = getattr(scheduler, "step_index", None) if handed_over else None
        if stopped_at is not None and stopped_at != begin:
            raise ValueError(
                f"`solver_state` stopped at step {stopped_at} of {len(timesteps)}, but denoising_start="
                f"{denoising_start} starts at step {begin}: pass the fraction the first run ended at (its "
                f"`denoising_end`)."
            )
        if begin > 0 and not handed_over and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        return timesteps[begin:end], begin

    def prepare_latents(
        self, batch_size: int, generator, latents: torch.Tensor | None, device: torch.device, handed_over: bool = False
    ) -> torch.Tensor:
        """Initial noise scaled by the scheduler's `init_noise_sigma`, or `latents` handed over by a split run as is."""
        if latents is None:
            latents = randn_tensor(
                self._sample_shape(batch_size), generator=generator, device=device, dtype=self.unet.dtype
            )
        else:
            latents = latents.to(device=device, dtype=self.unet.dtype)
        return latents if handed_over else latents * self.scheduler.init_noise_sigma

    def prepare_extra_step_kwargs(self, generator, eta: float) -> dict:
        """Arguments of the scheduler's `step` that not every scheduler takes: DDIM's `eta`, the `generator`."""
        accepted = _step_parameters(self.scheduler)
        extra_step_kwargs = {}
        if "eta" in accepted:
            extra_step_kwargs["eta"] = eta
        if "generator" in accepted:
            extra_step_kwargs["generator"] = generator
        return extra_step_kwargs

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = False,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""
        The `encoder_hidden_states` of the prompts, and of the negative prompts for guidance, each repeated
        `num_images_per_prompt` times (image-major: a prompt's images are consecutive) and cast to the experts' dtype.
        As `StableDiffusionPipeline.encode_prompt`, simplified: `prompt` strings are tokenized to
        `tokenizer.model_max_length` and encoded with `text_encoder(input_ids)[0]`; without `negative_prompt_embeds`
        guidance encodes `negative_prompt` (default `""`, one for all prompts or one per prompt) to the same length.

        Args:
            prompt (`str` or `list[str]`, *optional*): The prompts (or pass `prompt_embeds`).
            device (`torch.device`): Where the embeddings go.
            num_images_per_prompt (`int`, defaults to 1): Images per prompt.
            do_classifier_free_guidance (`bool`, defaults to `False`): Also return the negative embeddings.
            negative_prompt (`str` or `list[str]`, *optional*): The negative prompts (default `""`).
            prompt_embeds, negative_prompt_embeds (`torch.Tensor`, *optional*): Precomputed `(batch, sequence, dim)`
                embeddings, used as they are.

        Returns:
            `(prompt_embeds, negative_prompt_embeds)`; the second is `None` without guidance.
        """
        if prompt_embeds is None:
            prompt_embeds = self._encode_text([prompt] if isinstance(prompt, str) else list(prompt), device)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            num_prompts = prompt_embeds.shape[0]
            negatives = negative_prompt if negative_prompt is not None else ""
            negatives = [negatives] * num_prompts if isinstance(negatives, str) else list(negatives)
            negative_prompt_embeds = self._encode_text(negatives, device, max_length=prompt_embeds.shape[1])
        if do_classifier_free_guidance and negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"`negative_prompt_embeds` must have the shape of the prompts' embeddings {tuple(prompt_embeds.shape)}, "
                f"got {tuple(negative_prompt_embeds.shape)}."
            )

        def prepare(embeds: torch.Tensor) -> torch.Tensor:
            embeds = embeds.to(device=device, dtype=self.unet.dtype)
            return embeds.repeat_interleave(num_images_per_prompt, dim=0) if num_images_per_prompt > 1 else embeds

        negative = prepare(negative_prompt_embeds) if do_classifier_free_guidance else None
        return prepare(prompt_embeds), negative

    def _encode_text(self, texts: list[str], device: torch.device, max_length: int | None = None) -> torch.Tensor:
        """`text_encoder(input_ids)[0]` of `texts`, padded and truncated to `max_length` (the tokenizer's)."""
        inputs = self.tokenizer(
            texts,
            padding="max_length",
            max_length=max_length or self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        config = getattr(self.text_encoder, "config", None)
        use_mask = getattr(config, "use_attention_mask", False) and "attention_mask" in inputs
        attention_mask = inputs["attention_mask"].to(device) if use_mask else None
        return self.text_encoder(inputs["input_ids"].to(device), attention_mask=attention_mask)[0]

    # ------------------------------------------------------------------ denoising

    def _predict_noise(
        self,
        scheduler: SchedulerMixin,
        latents: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None,
        experts: list[int],
        guidance_scales: torch.Tensor,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mixture's noise prediction at `t` (the mixture routes the call by `t`; `experts` are the ones it runs),
        with classifier-free guidance when one of them has a scale != 1: cond and uncond in one batched call, the
        uncond half with every condition dropped (null class, negative prompt embeddings)."""
        if self.expert_offload is not None:
            self.expert_offload.activate(experts)
        guided = bool((guidance_scales[experts] != 1).any())
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)

        # the conditions the experts take: (cond, uncond) per argument name
        conditions = {}
        if class_labels is not None:
            null = torch.full_like(class_labels, self._class_table().null) if guided else None
            conditions["class_labels"] = (class_labels, null)
        if prompt_embeds is not None:
            conditions["encoder_hidden_states"] = (prompt_embeds, negative_prompt_embeds)
        arguments = {
            name: torch.cat([uncond, cond]) if guided else cond for name, (cond, uncond) in conditions.items()
        }

        # the experts' own names: `sample` (UNets) or `hidden_states` (transformers); UNets broadcast a 0-d timestep,
        # transformers (DiT, PixArt, ...) take one per sample, as their pipelines pass it
        parameters = self.unet.call_parameters
        sample_name = parameters[0]
        arguments[sample_name] = model_input
        arguments["timestep"] = t if sample_name == "sample" or t.ndim > 0 else t.expand(model_input.shape[0])
        if "return_dict" in parameters:
            arguments["return_dict"] = False
        noise_pred = sample_of(self.unet(**arguments))

        # learned sigma (DiT, PixArt): the prediction, then as many variance channels
        variance = None
        if noise_pred.shape[1] == 2 * latents.shape[1]:
            noise_pred, variance = noise_pred.chunk(2, dim=1)
        if guided:
            # eps = eps_uncond + s * (eps_cond - eps_uncond); a blend guides with the weighted mean of the scales
            scale = float(self.unet.expert_weights(t)[0].detach().float().cpu() @ guidance_scales)
            noise_uncond, noise_cond = noise_pred.chunk(2)
            noise_pred = noise_uncond + scale * (noise_cond - noise_uncond)
            variance = None if variance is None else variance.chunk(2)[1]
        if variance is not None and self._learned_variance:
            noise_pred = torch.cat([noise_pred, variance], dim=1)
        return noise_pred

    @property
    def _learned_variance(self) -> bool:
        """Whether the scheduler takes the model's variance channels (DDPM's `variance_type="learned(_range)"`)."""
        solver = self.scheduler.base if isinstance(self.scheduler, BlendedScheduler) else self.scheduler
        return solver.config.get("variance_type") in ("learned", "learned_range")

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

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int | None = None,
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
        solver_state: SchedulerMixin | None = None,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
    ) -> MultiExpertPipelineOutput | tuple:
        r"""
        Generate images with the mixture; each model call is routed by the mixture to the expert(s) that own the
        timestep the call is conditioned on.

        Args:
            batch_size (`int`, *optional*): Number of images: 1 by default; with prompts, the number of prompts times
                `num_images_per_prompt` (which `batch_size`, if given, must equal).
            num_inference_steps (`int`, defaults to 50): Denoising steps (of the whole noise range, also in split runs).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): For determinism; a list gives one
                generator per image (image i's noise from `generator[i]`).
            class_labels (`int`, `list[int]` or `torch.Tensor`, *optional*): Classes of class-conditional experts,
                one for all images or one per image, in `[0, num_class_embeds - 2]` with guidance (the last index is
                the null class) and `[0, num_class_embeds - 1]` without (DiT: `[0, num_embeds_ada_norm - 1]`).
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
            solver_state ([`SchedulerMixin`], *optional*): With `denoising_start`, the `solver_state` returned by the
                run that stopped at `denoising_end`: the multistep history continues, so the two runs give exactly the
                images of one run (without it, a multistep solver restarts at first order).
            prompt (`str` or `list[str]`, *optional*): Prompts of text-conditional experts, encoded with the
                pipeline's `text_encoder` and `tokenizer` (or pass `prompt_embeds`).
            negative_prompt (`str` or `list[str]`, *optional*): What guidance steers away from: one for all prompts or
                one per prompt; `""` by default.
            prompt_embeds (`torch.Tensor`, *optional*): Precomputed `(num_prompts, sequence, dim)` text embeddings,
                passed to the experts as `encoder_hidden_states`.
            negative_prompt_embeds (`torch.Tensor`, *optional*): The unconditional embeddings of guidance, shaped as
                `prompt_embeds`. Without a text encoder, guidance needs them.
            num_images_per_prompt (`int`, defaults to 1): Images per prompt (a prompt's images are consecutive).

        Returns:
            [`MultiExpertPipelineOutput`] or `tuple`: the images, and the `solver_state` of a run that stopped at
            `denoising_end` (the tuple holds the fields that are not `None`, as diffusers' outputs do).

        Example:
            ```py
            >>> images = pipe(batch_size=8, num_inference_steps=25, class_labels=3, guidance_scale=[1.0, 2.0, 4.0]).images
            >>> # split run: high-noise experts here, low-noise experts elsewhere
            >>> handover = pipe(batch_size=8, denoising_end=0.5, output_type="latent").images
            >>> images = pipe(batch_size=8, denoising_start=0.5, latents=handover).images
            >>> # text-conditional experts: precomputed embeddings, or `prompt=` with a text encoder and tokenizer
            >>> images = pipe(prompt_embeds=embeds, negative_prompt_embeds=empty, guidance_scale=[2.0, 6.0]).images
            ```
        """
        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            batch_size,
            num_inference_steps,
            generator,
            class_labels,
            guidance_scale,
            latents,
            denoising_start,
            denoising_end,
            output_type,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            solver_state,
            prompt=prompt,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            num_images_per_prompt=num_images_per_prompt,
        )

        # 2. Define call parameters: one guidance scale per expert, the class labels and text embeddings of the images
        device = self._run_device
        batch_size = self._num_images(batch_size, prompt, prompt_embeds, num_images_per_prompt)
        guidance_scales = self._guidance_scales(guidance_scale)
        class_labels = self._class_labels(class_labels, batch_size, device)
        if self._text_conditional:
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompt,
                device,
                num_images_per_prompt,
                bool((guidance_scales != 1).any()),
                negative_prompt,
                prompt_embeds,
                negative_prompt_embeds,
            )

        # 3. Prepare timesteps: this run's part of the schedule (a handed-over solver continues where it stopped)
        scheduler = self.scheduler if solver_state is None else copy.deepcopy(solver_state)
        timesteps, begin_index = self.prepare_timesteps(
            num_inference_steps,
            device,
            denoising_start,
            denoising_end,
            scheduler if solver_state is not None else None,
        )

        # 4. Prepare latent variables: fresh noise, or the latents handed over by a run that stopped at denoising_end
        latents = self.prepare_latents(batch_size, generator, latents, device, handed_over=denoising_start is not None)

        # 5. Prepare extra step kwargs
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 6. Denoising loop: each call of the mixture is routed by the timestep it is conditioned on
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                # 6.1 the experts the mixture runs at t (hard routing: one)
                experts = self.unet.active_experts(t)

                # 6.2 predict the noise residual (with per-expert offload, exactly those experts are on the device)
                noise_pred = self._predict_noise(
                    scheduler,
                    latents,
                    t,
                    class_labels,
                    experts,
                    guidance_scales,
                    prompt_embeds,
                    negative_prompt_embeds,
                )

                # 6.3 compute the previous noisy sample x_t -> x_t-1
                latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = callback_on_step_end(self, begin_index + i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.set_postfix_str(f"expert {'+'.join(str(k) for k in experts)}", refresh=False)
                progress_bar.update()

        # 7. Decode
        image = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        output = MultiExpertPipelineOutput(
            images=image, solver_state=copy.deepcopy(scheduler) if denoising_end is not None else None
        )
        return output if return_dict else output.to_tuple()

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
        `pipe(generator=[torch.Generator().manual_seed(seed + i) for i in batch], ...)`. Implemented in
        [`~diffusers_experts.pipelines.bulk_generation`].

        Args:
            num_images (`int`): Number of images.
            batch_size (`int`, defaults to 16): Images per model call.
            seed (`int`, defaults to 0): Image `i` uses seed `seed + i`.
            output_dir (`str`, *optional*): Write `000000.png`, `000001.png`, ... there; images already present are
                skipped, so an interrupted run resumes without redoing finished images.
            intermediates (`str`, defaults to `"memory"`): Where latents wait between experts: `"memory"` (on the
                offload device when offloading) or `"disk"` (safetensors under `output_dir/.intermediates`, with the
                per-batch solver state named in `bulk_generation.SOLVER_STATE_FIELDS`, such as multistep history, for
                sets too large for memory).
            class_labels (`int` or sequence, *optional*): One class for all images or one per image.
            output_type (`str`, defaults to `"pil"`): Type of the returned images without `output_dir`.
            call_kwargs: `num_inference_steps`, `guidance_scale`, `eta`, `denoising_start`, `denoising_end` and, for
                text-conditional experts, `prompt`, `negative_prompt`, `prompt_embeds`, `negative_prompt_embeds`,
                `num_images_per_prompt` as in `__call__` (`num_images` must then be the number of prompts times
                `num_images_per_prompt`; not `generator`, `latents`, `batch_size`).

        Returns:
            [`BulkGenerationOutput`]: `images` (or `paths` with `output_dir`) and `expert_loads`.
        """
        return bulk_generation.generate_many(
            self, num_images, batch_size, seed, output_dir, intermediates, class_labels, output_type, **call_kwargs
        )
