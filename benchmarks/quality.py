"""The papers' claims measured on the bundled MNIST digits (16 px, class-conditional), at two fair budgets, two seeds.

Models (small = about 1/4 of a large model's MACs; `benchmarks/quality_protocol.py` holds the list and the rules):

| name | what | paper row |
|---|---|---|
| `unet-large` | one `UNet2DModel` (16/32/64 channels): the reference | MEME's LDM-L; two-experts' baseline |
| `iunet-large` | one `IUNet2DModel` of the same width (opt-in) | - |
| `unet-small` / `iunet-small` | one small model (8/16/32) | LDM-S / iU-LDM-S |
| `multi-unet-hard` / `-soft` | 4 small `UNet2DModel` experts, MEME's hard / soft expert timestep sampling | Multi-Expert (w/o Soft) / Multi-Expert |
| `meme-hard` / `meme-soft` | 4 small `IUNet2DModel(**meme_expert_config(k, 4))` experts | MEME (w/o Soft) / MEME |
| `blend-hard` | 2 small `UNet2DModel` experts, hard switch at t = 500, trained jointly through the mixture | hard switch |
| `blend-linear` / `-sigmoid` / `-learned` | the same 2 experts blended by a ratio schedule r(t) | two-experts paper |

Protocol:

- **Arm A, per-expert parity** (MEME's protocol): every expert gets `--steps` optimizer updates (a 4-expert mixture
  trains its experts in turn: 4 x `--steps` loop steps; a blend updates both experts every step).
- **Arm B, compute parity**: every model gets the training MACs x samples of `unet-large` trained for `--steps`
  updates (fwd + bwd MACs per sample measured with `diffusers_experts.evaluation.complexity`); wall-clock is reported
  separately. Each model trains once, to the larger of its two budgets, and is evaluated when it reaches each one
  (the learning rate is constant after warm-up, so a snapshot is a model trained for that budget).
- Training: batch `--batch-size`, AdamW (`--learning-rate`, betas 0.95 / 0.999, weight decay 1e-6, grad clip 1),
  `--warmup` updates of linear warm-up then constant, one AdamW + EMA (power 2/3, max decay `--ema-max-decay`) per
  expert; a blend has one AdamW with the learned routing logits in their own group (`--routing-lr`, no weight decay,
  as in `examples/train_blended.py`) and its EMA covers the logits too. Label dropout `--class-dropout` (null class
  10) for classifier-free guidance. `--prediction-type` v_prediction by default: in a pilot at the default budget
  (600 updates, seed 0) epsilon-prediction `unet-small` sampled pure noise (FID 465 at every guidance scale) where v
  gives 8.8, and `unet-large` reached FID 18.4 against 3.6 with v. DDPM linear betas, T = 1000.
- Same data order, noise and label dropout for every model of a seed: each model builds its own generators
  (`TrainingStreams`), seeded from the seed alone, one per stream (data, noise, timesteps, dropout). Uniform-t models
  see the same timesteps too; expert timestep sampling draws from its own generator. Seeds (`--seeds`, default two)
  change the initialisation and every stream; the held-out set, its noise, the sampling noise and the metrics'
  reference stay fixed. Reported: mean ± spread (half the range over seeds).
- Primary metric: held-out denoising loss (`diffusers_experts.evaluation.heldout_loss`) on 256 digits never
  trained on, fixed noise, 16 timesteps 5..995; with the true labels ("cond") and the null class ("null").
- Secondary: DDIM (`--inference-steps`, eta 0) samples, `--num-samples` per guidance scale of `--guidance-scales`
  (classes 0..9 in turn); FID, KID, precision / recall in the feature space of the project's offline
  `ReferenceClassifier` (trained here on the training digits; metrics are withheld if its held-out accuracy is below
  `--min-classifier-accuracy`) against 1,000 held-out digits, and the class accuracy of the samples (the classifier
  predicts the requested class). Each model is reported at its best scale and at one shared scale (lowest mean
  log-FID over all models): that shared scale is the recommended default guidance.

Outputs in `--output-dir`: `results.json`, `table.md` (both arms + the claims table), `plots/heldout_loss_arm-*.png`
(per-t loss and ratio to `unet-large`), `plots/samples_<arm>_<model>.png` (seed 0, shared scale; `_best` at the best
scale), `plots/routing_<arm>_blend-learned.png`, `seed-<k>/<model>.json` (raw per-seed results), `quality.log`.

Commands:

    # smoke test (~2-3 min on 2 cores)
    python benchmarks/quality.py --quick --output-dir outputs/quality-quick
    # the CPU run of benchmarks/RESULTS.md (~30 min on 2 cores: one worker process per seed, one thread each)
    mkdir -p benchmarks/quality-out && nohup python benchmarks/quality.py --output-dir benchmarks/quality-out \
        > benchmarks/quality-out/quality.log 2>&1 &
    # the plan and the expected wall time only
    python benchmarks/quality.py --dry-run --output-dir /tmp/quality-plan
    # GPU scale (benchmarks/RESULTS.md, "GPU recipe")
    python benchmarks/quality.py --device cuda --data mnist70k.npz --image-size 32 --width 64 --models all \
        --steps 10000 --batch-size 128 --learning-rate 5e-4 --warmup 500 --ema-max-decay 0.9999 \
        --num-samples 1000 --inference-steps 25 --classifier-steps 2000 --seeds 0,1 --jobs 2 --output-dir quality-gpu

The expected wall time is printed before training starts (calibrated on this machine). `--resume` keeps the finished
(seed, model) results in `<output-dir>/seed-<k>/` and trains only the missing ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402
from torch.utils import flop_counter  # noqa: E402

import quality_protocol as P  # noqa: E402
from diffusers_experts import ExpertMixtureUNet, IUNet2DModel, MultiExpertPipeline, meme_expert_config  # noqa: E402
from diffusers_experts.evaluation import (  # noqa: E402
    DEFAULT_HELDOUT_TIMESTEPS,
    MIN_EXTRACTOR_ACCURACY,
    ReferenceClassifier,
    attention_flop_formulas,
    check_extractor_accuracy,
    compute_metrics,
    count_parameters,
    heldout_loss,
    measure_macs,
    mixture_macs_per_call,
    mnist_digits,
    plot_routing,
    save_image_grid,
    to_uint8_images,
)
from diffusers_experts.saving import atomic_file  # noqa: E402
from diffusers_experts.training import denoising_loss  # noqa: E402


NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # num_class_embeds = 11: the last one is the null class of guidance
NUM_HELDOUT = 1000  # the last 1,000 digits (data split seed 0) are held out; the bundled 5,000 leave 4,000 to train
DATA_SEED = 0
HELDOUT_NOISE_SEED = 1234
SAMPLE_SEED = 4321
NUM_TRAIN_TIMESTEPS = 1000
GRID_IMAGES = 100  # 10 per class, one class per column
RUN_START = [0.0]  # time.time() at the start of the main process, shared with the workers' logs


# ------------------------------------------------------------------------------------------------------ arguments


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="benchmarks/quality-out")
    parser.add_argument("--quick", action="store_true", help="Tiny budgets for a smoke test (~2-3 min on 2 cores).")
    parser.add_argument(
        "--models",
        default=None,
        help=f"Comma-separated subset of {list(P.MODELS)}, or 'all' (default: all but iunet-large).",
    )
    parser.add_argument("--seeds", default="0,1", help="Comma-separated training seeds (default 0,1).")
    parser.add_argument("--jobs", type=int, default=None, help="Worker processes, one seed each (default 2).")
    parser.add_argument("--steps", type=int, default=None, help="Updates per expert in arm A (default 600; quick 12).")
    parser.add_argument("--batch-size", type=int, default=None, help="Training batch (default 32; quick 16).")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--routing-lr", type=float, default=1e-2, help="Learned routing logits' lr (train_blended).")
    parser.add_argument("--warmup", type=int, default=None, help="Warm-up updates per expert (default 50; quick 3).")
    parser.add_argument("--ema-max-decay", type=float, default=0.999)
    parser.add_argument("--class-dropout", type=float, default=0.1)
    parser.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        default="v_prediction",
        help="What every denoiser predicts (v: at 600 updates epsilon-prediction small models sample pure noise).",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="An .npz of grey digits (`images` uint8 (N, H, W), `labels` 0..9) instead of the bundled 5,000.",
    )
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=16, help="Base channels of the large models (small: half).")
    parser.add_argument("--heldout-images", type=int, default=None, help="Held-out loss digits (256; quick 64).")
    parser.add_argument("--num-samples", type=int, default=None, help="Samples per guidance scale (200; quick 40).")
    parser.add_argument("--num-reference", type=int, default=1000, help="Held-out reference digits for FID.")
    parser.add_argument("--inference-steps", type=int, default=None, help="DDIM steps (20; quick 5).")
    parser.add_argument(
        "--guidance-scales", default=None, help="Comma-separated sweep (1.0,1.5,2.0,2.5,3.0; quick 1.0,2.0,3.0)."
    )
    parser.add_argument(
        "--classifier-steps", type=int, default=None, help="Feature extractor training (400; quick 300)."
    )
    parser.add_argument(
        "--min-classifier-accuracy",
        type=float,
        default=MIN_EXTRACTOR_ACCURACY,
        help="Withhold FID/KID/PR/class accuracy if the extractor's held-out accuracy is below this.",
    )
    parser.add_argument("--claim-margin", type=float, default=0.02, help="Relative margin of '>=' claims.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resume", action="store_true", help="Keep finished (seed, model) results.")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="Print the plan (budgets, MACs) and the expected wall time; train nothing.",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # plan.json of a worker process
    parser.add_argument("--worker-seeds", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = dict(
        steps=(12, 600),
        batch_size=(16, 32),
        warmup=(3, 50),
        heldout_images=(64, 256),
        num_samples=(40, 200),
        inference_steps=(5, 20),
        guidance_scales=("1.0,2.0,3.0", "1.0,1.5,2.0,2.5,3.0"),
        classifier_steps=(300, 400),
        jobs=(2, 2),
    )
    for name, (quick_value, full_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_value if quick else full_value)
    if args.models == "all":
        args.models = ",".join(P.MODELS)
    args.models = [m.strip() for m in (args.models or ",".join(P.DEFAULT_MODELS)).split(",") if m.strip()]
    unknown = [m for m in args.models if m not in P.MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; valid: {list(P.MODELS)}")
    if P.REFERENCE_MODEL not in args.models:
        args.models.insert(0, P.REFERENCE_MODEL)  # arm B's budget is defined by it
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        args.guidance_scales = [float(s) for s in args.guidance_scales.split(",") if s.strip()]
    except ValueError as error:
        parser.error(f"--seeds / --guidance-scales must be comma-separated numbers: {error}")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct integers, got {args.seeds}")
    if not args.guidance_scales or min(args.guidance_scales) < 1.0:
        parser.error(f"--guidance-scales must be >= 1.0, got {args.guidance_scales}")
    if args.width % 8 or args.width < 16:
        parser.error(f"--width must be a multiple of 8 and at least 16, got {args.width}")
    if args.image_size % 4:
        parser.error(f"--image-size must be a multiple of 4 (3 stages), got {args.image_size}")
    if not 0 < args.num_reference <= NUM_HELDOUT:
        parser.error(f"--num-reference must lie in (0, {NUM_HELDOUT}], got {args.num_reference}")
    if not 0 < args.heldout_images <= NUM_HELDOUT:
        parser.error(f"--heldout-images must lie in (0, {NUM_HELDOUT}], got {args.heldout_images}")
    if args.data is not None and not os.path.isfile(args.data):
        parser.error(f"--data {args.data!r} is not a file")
    if args.num_samples <= 3:
        parser.error(f"--num-samples must be > 3 (precision / recall need k + 1 = 4), got {args.num_samples}")
    return args


def timestep_grid(quick: bool) -> list[int]:
    grid = list(DEFAULT_HELDOUT_TIMESTEPS)
    return grid[::4] if quick else grid


# ------------------------------------------------------------------------------------------------------ data


def read_npz_digits(path: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(uint8 images (N, 1, S, S), labels)` from an `.npz` with `images` (N, H, W) or (N, 1, H, W) uint8 grey images
    and `labels` (N,) in 0..9, shuffled with the data seed; 28 px -> 32 px by padding, other sizes resized."""
    with np.load(path) as f:
        if "images" not in f or "labels" not in f:
            raise ValueError(f"--data {path!r} must hold arrays `images` and `labels`, found {sorted(f.keys())}.")
        images, labels = torch.from_numpy(f["images"]), torch.from_numpy(f["labels"]).long().reshape(-1)
    if images.ndim == 3:
        images = images[:, None]
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 1 or len(images) != len(labels):
        raise ValueError(
            f"--data {path!r}: `images` must be uint8 grey (N, H, W) with one label each, got {images.dtype} "
            f"{tuple(images.shape)} and {len(labels)} labels."
        )
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"--data {path!r}: labels must lie in 0..{NUM_CLASSES - 1}.")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(DATA_SEED))
    images, labels = images[order].float(), labels[order]
    if image_size == 32 and images.shape[-1] == 28:
        images = torch.nn.functional.pad(images, (2, 2, 2, 2))
    elif images.shape[-1] != image_size:
        images = torch.nn.functional.interpolate(
            images, size=(image_size, image_size), mode="bilinear", antialias=True
        )
    return images.round().clamp(0, 255).to(torch.uint8), labels


def load_data(image_size: int, num_reference: int, heldout_images: int, data_path: str | None = None):
    """Training digits in [-1, 1] with labels, the same as uint8; held-out uint8 reference digits and labels; the
    held-out-loss digits (the first `heldout_images` of the held-out part) in [-1, 1] with labels.

    The last `NUM_HELDOUT` digits (after shuffling with the data seed) are held out, the rest train: the bundled 5,000
    digits give 4,000 / 1,000 (the split of `diffusers_experts.evaluation.heldout_digits`); `data_path`, an `.npz`
    (see `read_npz_digits`), gives any larger set, e.g. all 70,000 MNIST digits."""
    if data_path is None:
        uint8, labels = mnist_digits(image_size, seed=DATA_SEED)
    else:
        uint8, labels = read_npz_digits(data_path, image_size)
    num_train = len(uint8) - NUM_HELDOUT
    train_uint8, train_labels = uint8[:num_train], labels[:num_train]
    heldout_uint8, heldout_labels = uint8[num_train:], labels[num_train:]
    return {
        "train": train_uint8.float() / 127.5 - 1.0,
        "train_uint8": train_uint8,
        "train_labels": train_labels,
        "reference": heldout_uint8[:num_reference],
        "reference_labels": heldout_labels[:num_reference],
        "heldout": heldout_uint8[:heldout_images].float() / 127.5 - 1.0,
        "heldout_labels": heldout_labels[:heldout_images],
    }


# ------------------------------------------------------------------------------------------------------ models


def model_configs(image_size: int, width: int = 16) -> dict:
    """Large (w/2w/4w, default 16/32/64) and small (half the width, about 1/4 of the MACs) architectures,
    class-conditional (11 embeddings). Head size = the model's base width (two heads in the 2w attention stage)."""
    common = dict(
        sample_size=image_size, in_channels=1, out_channels=1, layers_per_block=1, num_class_embeds=NUM_CLASSES + 1
    )
    half = width // 2
    large = dict(
        block_out_channels=(width, 2 * width, 4 * width), attention_head_dim=width, norm_num_groups=min(32, half)
    )
    small = dict(
        block_out_channels=(half, 2 * half, 4 * half), attention_head_dim=half, norm_num_groups=min(32, half // 2)
    )
    unet_blocks = dict(
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
    return {
        "unet-large": {**common, **unet_blocks, **large},
        "unet-small": {**common, **unet_blocks, **small},
        "iunet-large": {**common, **large},
        "iunet-small": {**common, **small},
    }


def build_model(spec: P.ModelSpec, configs: dict, seed: int):
    """The model of `spec`, initialised from `seed`: a plain denoiser (single) or an `ExpertMixtureUNet`."""
    torch.manual_seed(seed)
    config = configs[f"{spec.arch}-{spec.size}"]
    if spec.family == "single":
        return (IUNet2DModel if spec.arch == "iunet" else UNet2DModel)(**config)
    if spec.arch == "iunet":
        experts = [IUNet2DModel(**meme_expert_config(k, spec.num_experts, **config)) for k in range(spec.num_experts)]
    else:
        experts = [UNet2DModel(**config) for _ in range(spec.num_experts)]
    routing = "hard" if spec.family == "experts" else spec.routing
    return ExpertMixtureUNet.from_experts(experts, routing=routing, num_train_timesteps=NUM_TRAIN_TIMESTEPS)


def as_mixture(model):
    """A mixture for the pipeline: a single model becomes a 1-expert mixture (bit-identical to the model alone)."""
    return model if isinstance(model, ExpertMixtureUNet) else ExpertMixtureUNet.from_experts([model])


def training_macs_per_sample(module, image_size: int) -> float:
    """MACs of one training step (forward + backward) on one sample at t = 500, attention included (the same
    counting as `measure_macs`: `FlopCounterMode` with the SDPA formulas, FLOPs / 2)."""
    sample = torch.randn(1, 1, image_size, image_size)
    labels = torch.zeros(1, dtype=torch.long)
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping=attention_flop_formulas())
    was_training = module.training
    module.train()
    with counter:
        out = module(sample, torch.tensor([500]), class_labels=labels).sample
        out.float().pow(2).mean().backward()
    module.zero_grad(set_to_none=True)
    module.train(was_training)
    return counter.get_total_flops() / 2


def blend_activity(mixture) -> list[float]:
    """Share of uniform training timesteps at which each expert runs (non-zero weight), at the initial routing."""
    with torch.no_grad():
        weights = mixture.expert_weights(torch.arange(NUM_TRAIN_TIMESTEPS, dtype=torch.float32))
    return weights.gt(0).float().mean(dim=0).tolist()


def inference_macs_per_call(model, image_size: int, inference_steps: int) -> float:
    """Mean MACs of one denoiser call on one image over the DDIM schedule (a blend counts every expert that runs)."""
    shape = (1, 1, image_size, image_size)
    labels = torch.zeros(1, dtype=torch.long)
    if not isinstance(model, ExpertMixtureUNet):
        return float(measure_macs(model, torch.zeros(shape), 500, class_labels=labels))
    scheduler = DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS)
    scheduler.set_timesteps(inference_steps)
    return mixture_macs_per_call(model, scheduler.timesteps, shape, class_labels=labels)


def unit_modules(model, spec: P.ModelSpec) -> list:
    """The parts that each have one optimizer and one EMA: the experts of a MEME-style mixture, else the whole model
    (a blend's EMA covers its learned routing logits too)."""
    return list(model.experts) if spec.family == "experts" else [model]


# ------------------------------------------------------------------------------------------------------ training


class Trainer:
    """One model's training loop (see the module docstring for the protocol)."""

    def __init__(self, spec: P.ModelSpec, model, settings: dict, seed: int):
        self.device = torch.device(settings.get("device", "cpu"))
        self.spec, self.model, self.settings = spec, model.to(self.device), settings
        self.streams = P.TrainingStreams(seed)
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type=settings["prediction_type"]
        )
        self.units = unit_modules(model, spec)
        self.optimizers, self.emas = [], []
        for unit in self.units:
            routing = getattr(unit, "routing_logits", None)
            main = [p for p in unit.parameters() if p is not routing]
            groups = [{"params": main, "lr": settings["learning_rate"], "base_lr": settings["learning_rate"]}]
            if routing is not None:
                groups.append(
                    {
                        "params": [routing],
                        "lr": settings["routing_lr"],
                        "base_lr": settings["routing_lr"],
                        "weight_decay": 0.0,
                    }
                )
            self.optimizers.append(torch.optim.AdamW(groups, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8))
            self.emas.append(
                EMAModel(
                    list(unit.parameters()),
                    decay=settings["ema_max_decay"],
                    use_ema_warmup=True,
                    inv_gamma=1.0,
                    power=2 / 3,
                    foreach=True,
                )
            )
        self.updates = [0] * len(self.units)
        self.step_count = 0
        self.losses: list[float] = []
        self.model.train()

    def step(self, data: torch.Tensor, labels: torch.Tensor) -> float:
        s, streams, spec = self.settings, self.streams, self.spec
        batch = s["batch_size"]
        indices, noise = streams.batch(len(data), batch, data.shape[1:])  # drawn on the CPU: the same on any device
        clean, noise = data[indices].to(self.device), noise.to(self.device)
        class_labels = streams.drop_labels(labels[indices], s["class_dropout"], NULL_CLASS).to(self.device)
        if spec.family == "experts":
            unit_index = self.step_count % len(self.units)
            timesteps = self.model.sample_training_timesteps(
                batch, unit_index, strategy=spec.strategy, generator=streams.timesteps
            )
        else:
            unit_index = 0
            timesteps = streams.uniform_timesteps(batch, NUM_TRAIN_TIMESTEPS)
        timesteps = timesteps.to(self.device)
        unit, optimizer = self.units[unit_index], self.optimizers[unit_index]
        loss = denoising_loss(unit, self.noise_scheduler, clean, noise, timesteps, class_labels, s["prediction_type"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        routing = getattr(unit, "routing_logits", None)
        clipped = [p for p in unit.parameters() if p is not routing]  # as train_blended: the experts' weights
        torch.nn.utils.clip_grad_norm_(clipped, 1.0)
        factor = P.constant_lr_factor(self.updates[unit_index], s["warmup"])
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        optimizer.step()
        self.emas[unit_index].step(list(unit.parameters()))
        self.updates[unit_index] += 1
        self.step_count += 1
        self.losses.append(loss.item())
        return self.losses[-1]

    def averaged_model(self):
        """A copy of the model with the EMA weights (the model that is evaluated), in eval mode."""
        averaged = copy.deepcopy(self.model)
        for unit, ema in zip(unit_modules(averaged, self.spec), self.emas):
            ema.copy_to(list(unit.parameters()))
        return averaged.eval()


# ------------------------------------------------------------------------------------------------------ evaluation


def sample_labels(num_samples: int) -> torch.Tensor:
    return torch.arange(num_samples) % NUM_CLASSES


@torch.no_grad()
def generate(model, scale: float, settings: dict) -> tuple[torch.Tensor, float]:
    """`num_samples` DDIM samples (classes 0..9 in turn, the same noise for every model and seed) as uint8, and the
    seconds per image."""
    scheduler = DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type=settings["prediction_type"])
    pipe = MultiExpertPipeline(unet=as_mixture(model), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    n = settings["num_samples"]
    start = time.perf_counter()
    out = pipe(
        batch_size=n,
        generator=torch.Generator().manual_seed(SAMPLE_SEED),
        class_labels=sample_labels(n),
        guidance_scale=scale,
        num_inference_steps=settings["inference_steps"],
        output_type="np",
    )
    seconds = time.perf_counter() - start
    return to_uint8_images(out.images), seconds / n


def evaluate(model, settings: dict, ctx: dict, grid_prefix: str | None, log, label: str = "") -> dict:
    """Held-out loss per t (primary) and the guidance sweep (secondary) of one trained (averaged) model."""
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, prediction_type=settings["prediction_type"]
    )
    table = heldout_loss(
        model,
        noise_scheduler,
        ctx["heldout"],
        class_labels=ctx["heldout_labels"],
        timesteps=settings["t_grid"],
        seed=HELDOUT_NOISE_SEED,
        prediction_type=settings["prediction_type"],
    )
    result = {
        "heldout": table.to_dict(),
        "heldout_mean": table.mean("cond"),
        "heldout_mean_null": table.mean("null"),
        "guidance": {},
    }
    labels = sample_labels(settings["num_samples"])
    for scale in settings["guidance_scales"]:
        images, seconds_per_image = generate(model, scale, settings)
        entry = {"sample_seconds_per_image": seconds_per_image}
        if ctx["classifier"] is not None:
            scores = compute_metrics(
                images,
                ctx["reference"],
                metrics=("fid", "kid", "prc"),
                feature_extractor=ctx["classifier"],
                kid_subset_size=min(len(images), len(ctx["reference"]), 100),
                device="cpu",
                min_extractor_accuracy=settings["min_classifier_accuracy"],
            )
            entry.update({k: scores[k] for k in ("fid", "kid_mean", "kid_std", "precision", "recall")})
            entry["class_accuracy"] = ctx["classifier"].accuracy(images, labels)
        if grid_prefix is not None:
            save_image_grid(images[:GRID_IMAGES], f"{grid_prefix}_g{scale:g}.png", columns=NUM_CLASSES, scale=2)
        result["guidance"][f"{scale:g}"] = entry
    fids = {s: e.get("fid") for s, e in result["guidance"].items()}
    log(
        f"{label}: held-out loss {result['heldout_mean']:.4f} (null {result['heldout_mean_null']:.4f}); FID by scale "
        + ", ".join(f"{s}: {v:.1f}" if v is not None else f"{s}: -" for s, v in fids.items())
    )
    return result


# ------------------------------------------------------------------------------------------------------ the plan


def measure_model(spec: P.ModelSpec, configs: dict, settings: dict) -> dict:
    """Parameters, MACs (training per sample, per expert; inference per call) and the blend activity of a model."""
    model = build_model(spec, configs, seed=0)
    units = list(model.experts) if isinstance(model, ExpertMixtureUNet) else [model]
    info = {
        "params": count_parameters(model),
        "expert_params": [count_parameters(u) for u in units],
        "expert_train_macs": [training_macs_per_sample(u, settings["image_size"]) for u in units],
        "inference_macs_per_call": inference_macs_per_call(model, settings["image_size"], settings["inference_steps"]),
        "activity": blend_activity(model) if spec.family == "blend" else None,
    }
    return info


def calibrate(spec: P.ModelSpec, configs: dict, settings: dict, data: dict, steps: int = 7) -> dict:
    """Seconds per training loop step and per guided sampling call (batch 2 x `num_samples`) on one thread.

    Measured as this process's CPU time (one thread: what the step takes on an idle core, whatever else runs on the
    machine now) and as wall time (what it takes now)."""
    device = torch.device(settings.get("device", "cpu"))
    # one CPU thread: its CPU time is the time on a free core; an accelerator: wall time, synchronised
    clock = time.process_time if device.type == "cpu" else time.perf_counter

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    model = build_model(spec, configs, seed=0)
    trainer = Trainer(spec, model, settings, seed=0)
    trainer.step(data["train"], data["train_labels"])  # warm-up
    cpu_times, wall_times = [], []
    for _ in range(steps):  # the median step: robust to a stray slow one
        sync()
        wall, cpu = time.perf_counter(), clock()
        trainer.step(data["train"], data["train_labels"])
        sync()
        cpu_times.append(clock() - cpu)
        wall_times.append(time.perf_counter() - wall)
    step_seconds, step_wall = float(np.median(cpu_times)), float(np.median(wall_times))
    model.eval()
    n = settings["num_samples"]
    x2 = torch.randn(2 * n, 1, settings["image_size"], settings["image_size"], device=device)
    labels2 = (torch.arange(2 * n) % (NUM_CLASSES + 1)).to(device)
    with torch.no_grad():
        model(x2[:4], 500, class_labels=labels2[:4])  # warm-up
        sync()
        cpu = clock()
        for t in (100, 400, 600, 900):
            model(x2, t, class_labels=labels2)
        sync()
        call_seconds = (clock() - cpu) / 4
    return {"step_seconds": step_seconds, "step_wall_seconds": step_wall, "guided_call_seconds": call_seconds}


def estimate_seconds(plan: dict, settings: dict, metric_seconds: float) -> dict:
    """Expected seconds per seed (train + evaluation) of each model, from the calibration."""
    per_model = {}
    scales = settings["guidance_scales"]
    n_guided = sum(1 for s in scales if s != 1.0)
    n_plain = len(scales) - n_guided
    heldout_calls = len(settings["t_grid"]) * 2 * settings["heldout_images"] / (2 * settings["num_samples"])
    for name, entry in plan["models"].items():
        cal = entry["calibration"]
        total_steps = max(b["optimizer_steps"] for b in entry["budgets"].values())
        evaluations = len({b["optimizer_steps"] for b in entry["budgets"].values()})
        call = cal["guided_call_seconds"]
        sampling = settings["inference_steps"] * (n_guided * call + n_plain * call / 2)
        evaluation = sampling + heldout_calls * call + len(scales) * metric_seconds
        per_model[name] = {"train": total_steps * cal["step_seconds"], "evaluate": evaluations * evaluation}
    return per_model


def build_plan(args, data: dict, log) -> dict:
    settings = {
        "quick": args.quick,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "routing_lr": args.routing_lr,
        "warmup": args.warmup,
        "ema_max_decay": args.ema_max_decay,
        "class_dropout": args.class_dropout,
        "prediction_type": args.prediction_type,
        "image_size": args.image_size,
        "width": args.width,
        "data": os.path.abspath(args.data) if args.data else None,
        "heldout_images": args.heldout_images,
        "num_samples": args.num_samples,
        "num_reference": args.num_reference,
        "inference_steps": args.inference_steps,
        "guidance_scales": args.guidance_scales,
        "t_grid": timestep_grid(args.quick),
        "seeds": args.seeds,
        "models": args.models,
        "device": args.device,
        "min_classifier_accuracy": args.min_classifier_accuracy,
    }
    configs = model_configs(args.image_size, args.width)
    measured = {name: measure_model(P.MODEL_SPECS[name], configs, settings) for name in args.models}
    reference_macs = measured[P.REFERENCE_MODEL]["expert_train_macs"][0]
    models = {}
    for name in args.models:
        spec = P.MODEL_SPECS[name]
        info = measured[name]
        budgets = P.arm_budgets(
            spec, info["expert_train_macs"], reference_macs, args.steps, args.batch_size, info["activity"]
        )
        models[name] = {**info, "budgets": {arm: vars(b) for arm, b in budgets.items()}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # calibrate as the workers run: one thread each (and CPU time = idle wall time)
    try:
        for name in args.models:
            models[name]["calibration"] = calibrate(P.MODEL_SPECS[name], configs, settings, data)
    finally:
        torch.set_num_threads(threads)
    return {"settings": settings, "configs": configs, "reference_train_macs": reference_macs, "models": models}


def describe_plan(plan: dict) -> str:
    ref = plan["models"][P.REFERENCE_MODEL]
    lines = [
        "| model | params | inference MACs/call | train MACs/sample (per expert) | arm A: updates/expert (loop steps) "
        "| arm B: updates/expert (loop steps) | s/step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in plan["models"].items():
        a, b = m["budgets"]["A"], m["budgets"]["B"]
        lines.append(
            f"| {name} | {m['params'] / 1e6:.3f} M | {m['inference_macs_per_call'] / 1e6:.2f} M "
            f"({m['inference_macs_per_call'] / ref['inference_macs_per_call']:.2f}x) | "
            + " / ".join(f"{x / 1e6:.1f}" for x in m["expert_train_macs"])
            + f" M | {a['updates_per_expert']} ({a['optimizer_steps']}) | {b['updates_per_expert']} "
            f"({b['optimizer_steps']}, {b['train_macs'] / ref['budgets']['B']['train_macs']:.3f}x compute) | "
            f"{m['calibration']['step_seconds']:.3f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ workers


def seed_dir(output_dir: str, seed: int) -> str:
    return os.path.join(output_dir, f"seed-{seed}")


def run_seed(plan: dict, output_dir: str, seed: int, resume: bool, log) -> None:
    """Train and evaluate every model of the plan for one seed; one JSON per model in `seed-<k>/`."""
    settings, configs = plan["settings"], plan["configs"]
    data = load_data(settings["image_size"], settings["num_reference"], settings["heldout_images"], settings["data"])
    classifier_dir = os.path.join(output_dir, "classifier")
    classifier = ReferenceClassifier.from_pretrained(classifier_dir) if plan["metrics_allowed"] else None
    ctx = {**data, "classifier": classifier}
    out_dir = seed_dir(output_dir, seed)
    os.makedirs(os.path.join(out_dir, "grids"), exist_ok=True)
    plots_dir = os.path.join(output_dir, "plots")
    for name in settings["models"]:
        path = os.path.join(out_dir, f"{name}.json")
        if resume and os.path.isfile(path):
            log(f"[seed {seed}] {name}: kept from a previous run")
            continue
        spec = P.MODEL_SPECS[name]
        entry = plan["models"][name]
        model = build_model(spec, configs, seed)
        trainer = Trainer(spec, model, settings, seed)
        snapshots: dict[int, list[str]] = {}
        for arm, budget in entry["budgets"].items():
            snapshots.setdefault(budget["optimizer_steps"], []).append(arm)
        total = max(snapshots)
        log(f"[seed {seed}] {name}: {total} loop steps, evaluated after {sorted(snapshots)} ({spec.paper_row})")
        result = {"model": name, "seed": seed, "arms": {}}
        train_seconds = train_cpu_seconds = 0.0
        for step in range(1, total + 1):
            start, cpu = time.perf_counter(), time.process_time()
            trainer.step(ctx["train"], ctx["train_labels"])
            train_seconds += time.perf_counter() - start
            train_cpu_seconds += time.process_time() - cpu
            if step % max(1, total // 5) == 0 and step != total:
                log(
                    f"[seed {seed}] {name}: step {step}/{total} loss {np.mean(trainer.losses[-50:]):.4f} ({train_seconds:.0f}s)"
                )
            if step not in snapshots:
                continue
            arms = snapshots[step]
            log(
                f"[seed {seed}] {name}: arm(s) {'+'.join(arms)} reached at step {step} ({train_seconds:.0f}s training)"
            )
            averaged = trainer.averaged_model()
            grid_prefix = (
                os.path.join(out_dir, "grids", f"{'+'.join(arms)}_{name}") if seed == settings["seeds"][0] else None
            )
            evaluation = evaluate(
                averaged, settings, ctx, grid_prefix, log, f"[seed {seed}] {name} arm {'+'.join(arms)}"
            )
            if spec.family == "blend" and spec.routing == "learned":
                evaluation["learned_routing_logits"] = averaged.routing_logits.detach().cpu().tolist()
                if seed == settings["seeds"][0]:
                    for arm in arms:
                        plot_routing(
                            averaged,
                            os.path.join(plots_dir, f"routing_{arm}_{name}.png"),
                            title=f"{name}, arm {arm} (EMA, seed {seed})",
                        )
            for arm in arms:
                result["arms"][arm] = {
                    **entry["budgets"][arm],
                    "train_seconds": train_seconds,
                    "train_cpu_seconds": train_cpu_seconds,
                    "final_train_loss": float(np.mean(trainer.losses[-50:])),
                    **evaluation,
                }
        with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        log(f"[seed {seed}] {name}: done")


def launch_workers(plan_path: str, args, log) -> None:
    """One process per group of seeds (one thread each), or in-process with `--jobs 1`."""
    jobs = max(1, min(args.jobs, len(args.seeds)))
    if jobs == 1:
        with open(plan_path, encoding="utf-8") as f:
            plan = json.load(f)
        for seed in args.seeds:
            run_seed(plan, args.output_dir, seed, args.resume, log)
        return
    groups = [args.seeds[i::jobs] for i in range(jobs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "QUALITY_RUN_START": str(RUN_START[0])}
    procs = []
    for group in groups:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", plan_path, "--output-dir", args.output_dir]
        cmd += ["--worker-seeds", ",".join(map(str, group))] + (["--resume"] if args.resume else [])
        procs.append(subprocess.Popen(cmd, env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise RuntimeError(f"worker processes failed with exit codes {codes}; see the log above")


def worker_main(args) -> int:
    torch.set_num_threads(1)
    with open(args.worker, encoding="utf-8") as f:
        plan = json.load(f)
    start = float(os.environ.get("QUALITY_RUN_START", time.time()))  # the parent's clock: one time line in the log

    def log(message):
        print(f"[{time.time() - start:7.1f}s] {message}", flush=True)

    for seed in [int(s) for s in args.worker_seeds.split(",")]:
        run_seed(plan, args.output_dir, seed, args.resume, log)
    return 0


# ------------------------------------------------------------------------------------------------------ report


def load_seed_results(output_dir: str, seeds, models) -> dict:
    results = {}
    for seed in seeds:
        for name in models:
            path = os.path.join(seed_dir(output_dir, seed), f"{name}.json")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    results[(seed, name)] = json.load(f)
    return results


def summarize(plan: dict, results: dict, claim_margin: float) -> dict:
    """Seed means ± spreads per arm and model, the guidance choices, and the claim verdicts."""
    settings = plan["settings"]
    seeds, models = settings["seeds"], settings["models"]
    scales = [f"{s:g}" for s in settings["guidance_scales"]]
    summary = {arm: {} for arm in P.ARMS}
    for arm in P.ARMS:
        for name in models:
            runs = [results[(s, name)]["arms"][arm] for s in seeds if (s, name) in results]
            if not runs:
                continue
            row = {"seeds": len(runs)}
            row["heldout_mean"] = P.mean_spread([r["heldout_mean"] for r in runs])
            row["heldout_mean_null"] = P.mean_spread([r["heldout_mean_null"] for r in runs])
            row["heldout_per_seed"] = [r["heldout_mean"] for r in runs]
            timesteps = runs[0]["heldout"]["timesteps"]
            per_t = np.array([r["heldout"]["losses"]["cond"] for r in runs])
            row["heldout_t"] = timesteps
            row["heldout_per_t_mean"] = per_t.mean(axis=0).tolist()
            row["heldout_per_t_spread"] = ((per_t.max(axis=0) - per_t.min(axis=0)) / 2).tolist()
            row["train_seconds"] = P.mean_spread([r["train_seconds"] for r in runs])
            row["train_cpu_seconds"] = P.mean_spread([r.get("train_cpu_seconds") for r in runs])
            row["updates_per_expert"] = runs[0]["updates_per_expert"]
            row["optimizer_steps"] = runs[0]["optimizer_steps"]
            row["train_macs"] = runs[0]["train_macs"]
            row["guidance"] = {}
            for scale in scales:
                entries = [r["guidance"][scale] for r in runs if scale in r["guidance"]]
                row["guidance"][scale] = {
                    key: P.mean_spread([e.get(key) for e in entries])
                    for key in ("fid", "kid_mean", "precision", "recall", "class_accuracy", "sample_seconds_per_image")
                }
            summary[arm][name] = row
    fid_table = {
        f"{arm}/{name}": {
            float(s): v["guidance"][s]["fid"][0] for s in scales if v["guidance"][s]["fid"][0] is not None
        }
        for arm in P.ARMS
        for name, v in summary[arm].items()
    }
    shared = P.shared_guidance_scale(fid_table)
    for arm in P.ARMS:
        for name, row in summary[arm].items():
            best = P.best_guidance_scale(fid_table[f"{arm}/{name}"])
            row["best_scale"] = best
            row["shared_scale"] = shared
    values = {arm: {name: row["heldout_per_seed"] for name, row in summary[arm].items()} for arm in P.ARMS}
    # only paired seeds count: drop models missing a seed
    for arm in P.ARMS:
        values[arm] = {n: v for n, v in values[arm].items() if len(v) == len(seeds)}
    claims = P.claim_rows(values, claim_margin)
    return {"arms": summary, "shared_scale": shared, "claims": claims}


def _fid_cell(row: dict, scale: float | None) -> str:
    if scale is None:
        return "-"
    entry = row["guidance"].get(f"{scale:g}", {})
    return P.fmt_ms(*entry.get("fid", (None, None)), digits=1) + f" @{scale:g}"


def markdown_report(plan: dict, summary: dict, classifier_info: dict) -> str:
    settings = plan["settings"]
    ref = plan["models"][P.REFERENCE_MODEL]
    shared = summary["shared_scale"]
    out = []
    if settings["quick"]:
        out.append(
            "**QUICK SMOKE RUN** (`--quick`): budgets of a few updates; the numbers and verdicts below test the "
            "plumbing, not the claims.\n"
        )
    out.append(
        f"Seeds {settings['seeds']} (mean ± half-range). Held-out loss: {settings['prediction_type']} MSE with the true "
        f"labels, mean over t = {settings['t_grid'][0]}..{settings['t_grid'][-1]} ({len(settings['t_grid'])} points), "
        f"{settings['heldout_images']} held-out digits. Feature extractor held-out accuracy "
        f"{classifier_info['accuracy']:.3f} ({'metrics reported' if classifier_info['metrics_allowed'] else 'BELOW THE THRESHOLD: sample metrics withheld'}). "
        f"Shared guidance scale: {shared if shared is not None else '-'}.\n"
    )
    for arm in P.ARMS:
        out.append(f"### {P.ARM_TITLES[arm]}\n")
        out.append(
            "| model | paper row | params | inference MACs/call | updates/expert | train MACs (x ref) | train s wall (CPU) "
            "| held-out loss | held-out loss (null) | FID @best | FID @shared | KID @shared | P / R @shared | class acc @shared |"
        )
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, row in summary["arms"][arm].items():
            m = plan["models"][name]
            g = row["guidance"].get(f"{shared:g}", {}) if shared is not None else {}
            pr = "-"
            if g.get("precision", (None,))[0] is not None:
                pr = f"{g['precision'][0]:.2f} / {g['recall'][0]:.2f}"
            kid = P.fmt_ms(*g.get("kid_mean", (None, None)), digits=2)
            acc = P.fmt_ms(*g.get("class_accuracy", (None, None)), digits=3)
            out.append(
                f"| {name} | {P.MODEL_SPECS[name].paper_row} | {m['params'] / 1e6:.3f} M | "
                f"{m['inference_macs_per_call'] / 1e6:.2f} M ({m['inference_macs_per_call'] / ref['inference_macs_per_call']:.2f}x) | "
                f"{row['updates_per_expert']} | {row['train_macs'] / ref['budgets']['A']['train_macs']:.2f} | "
                f"{P.fmt_ms(*row['train_seconds'], digits=0)} ({P.fmt_ms(*row['train_cpu_seconds'], digits=0)}) | "
                f"{P.fmt_ms(*row['heldout_mean'])} | "
                f"{P.fmt_ms(*row['heldout_mean_null'])} | {_fid_cell(row, row['best_scale'])} | {_fid_cell(row, shared)} | "
                f"{kid} | {pr} | {acc} |"
            )
        out.append("")
    out.append(
        "### Claims (primary metric: held-out loss; verdict rule in `benchmarks/quality_protocol.py:verdict`)\n"
    )
    out.append(
        "| claim | arm | comparison | held-out loss A | held-out loss B | gap (A/B - 1) | FID A / B @best | verdict |"
    )
    out.append("|---|---|---|---:|---:|---:|---:|---|")
    for c in summary["claims"]:
        gap = f"{100 * c['relative_gap']:+.1f} %" if c.get("relative_gap") is not None else "-"
        rows = summary["arms"][c["arm"]]
        fids = [_fid_cell(rows[m], rows[m]["best_scale"]) for m in (c["a"], c["b"])]
        out.append(
            f"| {c['claim']} | {c['arm']} | {c['a']} {c['relation']} {c['b']} | "
            f"{P.fmt_ms(c.get('a_mean'), c.get('a_spread'))} | {P.fmt_ms(c.get('b_mean'), c.get('b_spread'))} | {gap} | "
            f"{fids[0]} / {fids[1]} | {c['verdict']} |"
        )
    return "\n".join(out) + "\n"


def plot_heldout(summary: dict, plots_dir: str) -> list[str]:
    """Per arm: held-out loss per t (log scale) and its ratio to `unet-large`, seed mean with the spread shaded."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    paths = []
    for arm in P.ARMS:
        rows = summary["arms"][arm]
        if not rows:
            continue
        fig, (ax_loss, ax_ratio) = plt.subplots(1, 2, figsize=(12, 4.5))
        ref = rows.get(P.REFERENCE_MODEL)
        for i, (name, row) in enumerate(rows.items()):
            t = np.array(row["heldout_t"])
            mean, spread = np.array(row["heldout_per_t_mean"]), np.array(row["heldout_per_t_spread"])
            style = dict(color=plt.cm.tab20(i % 20), linestyle="-" if P.MODEL_SPECS[name].family != "blend" else "--")
            ax_loss.plot(t, mean, label=name, **style)
            ax_loss.fill_between(t, mean - spread, mean + spread, alpha=0.15, color=style["color"])
            if ref is not None:
                ratio = mean / np.array(ref["heldout_per_t_mean"])
                ax_ratio.plot(t, ratio, label=name, **style)
        ax_loss.set_yscale("log")
        ax_loss.set_xlabel("timestep t")
        ax_loss.set_ylabel("held-out loss (true labels)")
        ax_loss.set_title(f"{P.ARM_TITLES[arm]}: held-out loss per t")
        ax_ratio.axhline(1.0, color="grey", linewidth=0.8)
        ax_ratio.set_xlabel("timestep t")
        ax_ratio.set_ylabel(f"loss / {P.REFERENCE_MODEL} loss")
        ax_ratio.set_title("ratio to the reference (below 1: better)")
        ax_ratio.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = os.path.join(plots_dir, f"heldout_loss_arm-{arm}.png")
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


def copy_grids(output_dir: str, plan: dict, summary: dict) -> None:
    """`plots/samples_<arm>_<model>.png` (shared scale; without metrics, the first scale of the sweep) and
    `..._best.png` (the model's best scale) from the first seed's grids."""
    grids = os.path.join(seed_dir(output_dir, plan["settings"]["seeds"][0]), "grids")
    plots = os.path.join(output_dir, "plots")
    if not os.path.isdir(grids):
        return
    shared = summary["shared_scale"]
    if shared is None:
        shared = plan["settings"]["guidance_scales"][0]
    for arm in P.ARMS:
        for name, row in summary["arms"][arm].items():
            for suffix, scale in (("", shared), ("_best", row["best_scale"])):
                if scale is None:
                    continue
                for fname in os.listdir(grids):
                    arms, _, rest = fname.partition("_")
                    if arm in arms.split("+") and rest == f"{name}_g{scale:g}.png":
                        shutil.copyfile(
                            os.path.join(grids, fname), os.path.join(plots, f"samples_{arm}_{name}{suffix}.png")
                        )


# ------------------------------------------------------------------------------------------------------ main


def extractor_refusal(classifier: ReferenceClassifier, accuracy: float, threshold: float) -> str | None:
    """Why the feature extractor must not be used for metrics (None: it may): its recorded accuracy on its own
    held-out share of the training digits (`check_extractor_accuracy`) and `accuracy` on the benchmark's held-out
    reference digits must both reach `threshold`."""
    try:
        check_extractor_accuracy(classifier, threshold)
    except ValueError as error:
        return str(error)
    if accuracy < threshold:
        return f"accuracy {accuracy:.3f} on the held-out reference digits is below {threshold}"
    return None


def prepare_output_dir(args) -> None:
    os.makedirs(args.output_dir, exist_ok=True)
    if not args.resume:
        for entry in os.listdir(args.output_dir):
            if entry.startswith("seed-") or entry in ("plots", "classifier", "plan.json", "results.json", "table.md"):
                path = os.path.join(args.output_dir, entry)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(os.path.join(args.output_dir, "plots"), exist_ok=True)


def main(args) -> dict:
    if args.worker:
        return worker_main(args)
    run_start = time.perf_counter()
    RUN_START[0] = time.time()

    def log(message):
        print(f"[{time.perf_counter() - run_start:7.1f}s] {message}", flush=True)

    prepare_output_dir(args)
    data = load_data(args.image_size, args.num_reference, args.heldout_images, args.data)
    log(
        f"data: {len(data['train'])} training digits, {len(data['reference'])} held-out reference digits, "
        f"{len(data['heldout'])} held-out-loss digits, {args.image_size}px, class-conditional"
    )

    # 1. the offline feature extractor: trained here, checked on held-out digits, refused if untrained
    classifier_dir = os.path.join(args.output_dir, "classifier")
    if args.resume and os.path.isdir(classifier_dir):
        classifier = ReferenceClassifier.from_pretrained(classifier_dir)
        log("feature extractor: reloaded")
    else:
        start = time.perf_counter()
        classifier = ReferenceClassifier.fit(
            data["train_uint8"],
            data["train_labels"],
            num_classes=NUM_CLASSES,
            steps=args.classifier_steps,
            batch_size=64,
            seed=0,
            block_out_channels=(16, 32, 64),
            feature_dim=64,
            device=args.device,
            progress=False,
        )
        classifier.save_pretrained(classifier_dir)
        log(f"feature extractor: trained for {args.classifier_steps} steps in {time.perf_counter() - start:.0f}s")
    accuracy = classifier.accuracy(data["reference"], data["reference_labels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = ReferenceClassifier(
            sample_size=args.image_size, num_classes=NUM_CLASSES, block_out_channels=(16, 32, 64), feature_dim=64
        ).eval()
    chance = untrained.accuracy(data["reference"], data["reference_labels"])
    refusal = extractor_refusal(classifier, accuracy, args.min_classifier_accuracy)
    metrics_allowed = refusal is None
    log(
        f"feature extractor: held-out accuracy {accuracy:.3f} on the reference digits, "
        f"{classifier.config.get('heldout_accuracy')} on its own held-out share (an untrained one: {chance:.3f}; "
        f"threshold {args.min_classifier_accuracy}): "
        + (
            "sample metrics will be reported"
            if metrics_allowed
            else f"REFUSED ({refusal}): FID/KID/PR/class accuracy are withheld"
        )
    )
    classifier_info = {
        "accuracy": accuracy,
        "own_heldout_accuracy": classifier.config.get("heldout_accuracy"),
        "refusal": refusal,
        "untrained_accuracy": chance,
        "threshold": args.min_classifier_accuracy,
        "metrics_allowed": metrics_allowed,
        "steps": args.classifier_steps,
    }
    real = {}
    if metrics_allowed:
        start = time.perf_counter()
        real = compute_metrics(
            data["train_uint8"][: args.num_samples],
            data["reference"],
            metrics=("fid", "kid", "prc"),
            feature_extractor=classifier,
            kid_subset_size=min(args.num_samples, args.num_reference, 100),
            device="cpu",
            min_extractor_accuracy=args.min_classifier_accuracy,
        )
        metric_seconds = time.perf_counter() - start
        log(f"real data floor ({args.num_samples} training digits vs the reference): FID {real['fid']:.2f}")
    else:
        metric_seconds = 0.0

    # 2. the plan: budgets from measured MACs, calibration, expected wall time
    plan = build_plan(args, data, log)
    plan["metrics_allowed"] = metrics_allowed
    plan["classifier"] = classifier_info
    log("plan (MACs per image; arm B gives every model the reference's training compute):\n" + describe_plan(plan))
    estimate = estimate_seconds(plan, plan["settings"], metric_seconds)
    per_seed = sum(e["train"] + e["evaluate"] for e in estimate.values())
    jobs = max(1, min(args.jobs, len(args.seeds)))
    seeds_per_job = math.ceil(len(args.seeds) / jobs)
    elapsed = time.perf_counter() - run_start
    expected = elapsed + seeds_per_job * per_seed + 15
    load = np.mean(
        [m["calibration"]["step_wall_seconds"] / m["calibration"]["step_seconds"] for m in plan["models"].values()]
    )
    plan["expected_seconds"] = expected
    plan["estimate_per_seed"] = estimate
    log(
        f"EXPECTED WALL TIME: ~{expected / 60:.1f} min in total with a free core per worker ({per_seed / 60:.1f} min "
        f"per seed: {sum(e['train'] for e in estimate.values()) / 60:.1f} training, "
        f"{sum(e['evaluate'] for e in estimate.values()) / 60:.1f} evaluation; {len(args.seeds)} seed(s) on {jobs} "
        f"worker process(es), one thread each; calibrated now from CPU time). Right now a step takes {load:.1f}x its "
        f"CPU time in wall time (other load on the cores): at that load, ~{(elapsed + load * seeds_per_job * per_seed) / 60:.0f} min."
    )
    plan_path = os.path.join(args.output_dir, "plan.json")
    with atomic_file(plan_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(plan, f, indent=1)
    if args.dry_run:
        return {"plan": plan, "expected_seconds": expected}

    # 3. train and evaluate (one worker per seed)
    launch_workers(plan_path, args, log)

    # 4. report
    results = load_seed_results(args.output_dir, args.seeds, args.models)
    summary = summarize(plan, results, args.claim_margin)
    plots = plot_heldout(summary, os.path.join(args.output_dir, "plots"))
    copy_grids(args.output_dir, plan, summary)
    report = markdown_report(plan, summary, classifier_info)
    with atomic_file(os.path.join(args.output_dir, "table.md")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(report)
    payload = {
        "settings": plan["settings"],
        "configs": plan["configs"],
        "classifier": classifier_info,
        "real_data": real,
        "models": {name: {k: v for k, v in m.items()} for name, m in plan["models"].items()},
        "summary": summary,
        "per_seed": {f"{seed}/{name}": r for (seed, name), r in results.items()},
        "expected_seconds": expected,
        "total_seconds": time.perf_counter() - run_start,
        "torch_threads_per_worker": 1 if jobs > 1 else torch.get_num_threads(),
        "plots": [os.path.relpath(p, args.output_dir) for p in plots],
    }
    with atomic_file(os.path.join(args.output_dir, "results.json")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    print(report)
    log(
        f"done in {payload['total_seconds'] / 60:.1f} min (expected {expected / 60:.1f}); results in {args.output_dir}"
    )
    return payload


if __name__ == "__main__":
    result = main(parse_args())
    sys.exit(result if isinstance(result, int) else 0)
