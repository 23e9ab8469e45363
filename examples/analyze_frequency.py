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
import torch.nn.functional as F

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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Mixture, pipeline or single-model folder, or a Hub repo id.")
    parser.add_argument("--images", default="mnist", help="Folder of real images, or 'mnist' (bundled digits).")
    parser.add_argument("--num_images", type=int, default=64, help="Images averaged over.")
    parser.add_argument("--timesteps", type=int, nargs="+", default=[50, 250, 500, 750, 950])
    parser.add_argument("--layers", nargs="+", default=None, help="Block names (default: input to output blocks).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="frequency")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def load_model(name: str):
    """A mixture (also the `unet` of a pipeline folder) or a single diffusers model folder."""
    from diffusers_experts import ExpertMixtureUNet
    from diffusers_experts.hub import resolve_model_folder
    from diffusers_experts.models.expert_mixture import _class_from_model_folder

    folder = resolve_model_folder(name)
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        folder = os.path.join(folder, "unet")
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        class_name = json.load(f).get("_class_name")
    if class_name == ExpertMixtureUNet.__name__:
        return ExpertMixtureUNet.from_pretrained(folder)
    return _class_from_model_folder(folder).from_pretrained(folder)


def load_images(source: str, num_images: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """`num_images` real images as floats in [-1, 1] with the model's channels and size."""
    images = mnist_digits(32, seed=seed)[0] if source == "mnist" else read_image_folder(source)
    if num_images > len(images):
        raise ValueError(f"`--num_images` {num_images} exceeds the {len(images)} images in {source!r}.")
    x = images[:num_images].float() / 127.5 - 1.0
    if x.shape[1] != channels:
        x = x.mean(dim=1, keepdim=True) if channels == 1 else x.expand(-1, channels, -1, -1)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return x


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
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    os.replace(f"{path}.tmp", path)
    for label, data in (result.get("experts") or {"model": result.get("model")}).items():
        summary = ", ".join(f"t={t}: {row[-1]:+.2f}" for t, row in zip(data["timesteps"], data["high_frequency"]))
        print(f"{label}: last layer, relative log amplitude at pi -> {summary}")
    print(f"wrote {path} and plots to {args.out}")
    return result


if __name__ == "__main__":
    main(parse_args())
