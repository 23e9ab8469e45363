"""Fourier analysis of a denoiser's feature maps per layer, per timestep and per expert (MEME Fig. 3 and Fig. 6).

    # a mixture (or a MultiExpertPipeline folder): per-expert curves, routing plot, iU-Net attention shares
    python examples/analyze_frequency.py --model my-mixture --images mnist --out freq/
    # a single model folder (UNet2DModel / IUNet2DModel) on a folder of real images, chosen timesteps
    python examples/analyze_frequency.py --model my-unet --images real/ --timesteps 50 250 500 750 950 --out freq/

Every expert sees the same noisy inputs `x_t` (same images, same noise seed) at each timestep. Writes
`<out>/fourier.json` (relative log amplitudes, from frequency 0 to pi, per timestep and layer) and PNG plots:
`fourier_<name>.png` (Fig. 3: one panel per layer, one curve per timestep) and, for mixtures,
`fourier_experts.png` (Fig. 6: high-frequency amplitude over depth, one line per expert), `routing.png` and, for
iU-Net experts, `attention_shares.png`.
"""

import argparse
import json
import os

import torch

from diffusers_experts.constants import MODEL_INDEX_NAME
from diffusers_experts.evaluation import (
    attention_shares,
    fourier_analysis,
    mnist_digits,
    plot_attention_shares,
    plot_fourier,
    plot_fourier_experts,
    plot_routing,
    read_image_folder,
)
from diffusers_experts.evaluation.feature_extractor import images_to_float
from diffusers_experts.evaluation.trained_model import UsageError, usage_errors
from diffusers_experts.loading import class_from_model_folder, resolve_model_folder
from diffusers_experts.saving import atomic_file
from diffusers_experts.training.arguments import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="Mixture, pipeline or single-model folder, or a Hub repo id.")
    parser.add_argument("--images", default="mnist", help="Folder of real images, or 'mnist' (bundled digits).")
    parser.add_argument("--num_images", type=int, default=64, help="Images averaged over.")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[50, 250, 500, 750, 950])
    parser.add_argument("--layers", nargs="+", default=None, help="Block names (default: input to output blocks).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="frequency")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def load_model(name: str):
    """The model of a model folder (a mixture or a single diffusers model) or the `unet` of a pipeline folder, loaded
    with the class its config names."""
    with usage_errors("--model", name):
        folder = resolve_model_folder(name)
        if os.path.isfile(os.path.join(folder, MODEL_INDEX_NAME)):
            folder = os.path.join(folder, "unet")
        return class_from_model_folder(folder).from_pretrained(folder)


def load_images(source: str, num_images: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """`num_images` real images as floats in [-1, 1] with the model's channels and size."""
    images = mnist_digits(32, seed=seed)[0] if source == "mnist" else read_image_folder(source)
    if num_images > len(images):
        raise UsageError(f"`--num_images` {num_images} exceeds the {len(images)} images in {source!r}.")
    return images_to_float(images[:num_images], channels, size)


def main(args) -> dict:
    model = load_model(args.model).to(args.device).eval()
    size = model.config.sample_size
    size = size if isinstance(size, int) else size[0]
    images = load_images(args.images, args.num_images, model.config.in_channels, size, args.seed).to(args.device)
    os.makedirs(args.out, exist_ok=True)
    options = dict(timesteps=args.timesteps, layers=args.layers, seed=args.seed)
    result = {"timesteps": args.timesteps}
    experts = list(getattr(model, "experts", []))
    if experts:
        analyses = {f"expert {k}": fourier_analysis(expert, images, **options) for k, expert in enumerate(experts)}
        result["experts"] = {label: analysis.to_dict() for label, analysis in analyses.items()}
        plot_fourier_experts(analyses, os.path.join(args.out, "fourier_experts.png"))
        for k, analysis in enumerate(analyses.values()):
            plot_fourier(analysis, os.path.join(args.out, f"fourier_expert_{k}.png"), title=f"expert {k}")
        plot_routing(model, os.path.join(args.out, "routing.png"))
        if all("high_ratios" in expert.config for expert in experts):
            result["attention_shares"] = [attention_shares(expert) for expert in experts]
            plot_attention_shares(experts, os.path.join(args.out, "attention_shares.png"))
    else:
        analysis = fourier_analysis(model, images, **options)
        result["model"] = analysis.to_dict()
        plot_fourier(analysis, os.path.join(args.out, "fourier_model.png"))
    path = os.path.join(args.out, "fourier.json")
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    for label, data in (result.get("experts") or {"model": result.get("model")}).items():
        summary = ", ".join(f"t={t}: {row[-1]:+.2f}" for t, row in zip(data["timesteps"], data["high_frequency"]))
        print(f"{label}: last layer, relative log amplitude at pi -> {summary}")
    print(f"wrote {path} and plots to {args.out}")
    return result


if __name__ == "__main__":
    try:
        main(parse_args())
    except UsageError as error:  # found once the model or the images are loaded: one line naming the flag
        build_parser().error(str(error))
