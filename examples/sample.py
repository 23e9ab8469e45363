r"""Sample images from a multi-expert model with any diffusers scheduler.

    python examples/sample.py --model DIR --num_images 64 --steps 50 --scheduler dpmpp --out samples/
    python examples/sample.py --model DIR --num_images 40 --class_label all --guidance_scale 1.5 --out samples/
    python examples/sample.py --model DIR --num_images 16 --class_label 3 7 \
        --guidance_scale 1.0 1.0 2.0 2.0 --out samples/   # one scale per expert (here 4 experts, expert 0 first)
    python examples/sample.py --model DIR --num_images 5000 --bulk --offload cuda --out samples/   # expert-major

`--model` is a saved `MultiExpertPipeline` folder (`model_index.json`), a saved `ExpertMixtureUNet` folder
(`config.json`), or a Hub repo id of either. Writes `000000.png`, ... into `--out` and a preview grid of the first 64
next to it, `<out>_grid.png`, so that `--out` holds samples only (e.g. for `evaluate.py --samples`).
"""

import argparse
import os

import torch
from PIL import Image

from diffusers_experts import BlendedScheduler
from diffusers_experts.evaluation import (
    UsageError,
    add_class_and_guidance_arguments,
    class_labels_for,
    guidance_for,
    load_pipeline,
    save_image_grid,
)
from diffusers_experts.schedulers import SCHEDULER_NAMES
from diffusers_experts.training.arguments import HelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="Pipeline or mixture folder, or a Hub repo id.")
    parser.add_argument("--num_images", type=int, default=16, help="Images to generate.")
    parser.add_argument("--batch_size", type=int, default=16, help="Images per model call.")
    parser.add_argument("--steps", type=int, default=50, help="Inference steps.")
    parser.add_argument("--scheduler", default="ddim", choices=sorted(SCHEDULER_NAMES), help="Sampler.")
    parser.add_argument("--blended", action="store_true", help="Wrap the scheduler in a BlendedScheduler.")
    parser.add_argument("--align", action="store_true", help="Align the steps to the expert boundaries (--blended).")
    parser.add_argument("--steps_per_expert", type=int, nargs="+", default=None, help="Expert 0 first (--blended).")
    add_class_and_guidance_arguments(parser)
    parser.add_argument("--offload", default=None, help="Per-expert offload onto this device (e.g. cuda).")
    parser.add_argument("--bulk", action="store_true", help="Expert-major generation (generate_many), resumable.")
    parser.add_argument("--seed", type=int, default=0, help="Image i uses seed + i.")
    parser.add_argument("--out", default="samples", help="Folder of the PNGs.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.blended and (args.align or args.steps_per_expert):
        parser.error("--align / --steps_per_expert need --blended")
    if args.num_images < 1 or args.batch_size < 1 or args.steps < 1:
        parser.error("--num_images, --batch_size and --steps must be positive integers")
    return args


def main(args):
    pipe = load_pipeline(args.model, scheduler=args.scheduler)
    mixture = pipe.unet
    labels = class_labels_for(args.class_label, args.num_images, mixture.config.num_class_embeds)
    guidance = guidance_for(args.guidance_scale, mixture.num_experts, mixture.config.num_class_embeds is not None)
    if args.blended:
        options = dict(align_to_boundaries=args.align, steps_per_expert=args.steps_per_expert)
        pipe.scheduler = BlendedScheduler.from_scheduler(pipe.scheduler, **options)
    if args.offload:
        pipe.enable_expert_offload(args.offload)
    else:
        pipe.to(args.device)

    split = mixture.steps_per_expert(pipe.scheduler, args.steps)
    owned = ", ".join(
        f"expert {k} [{low:g}, {high:g}): {n}"
        for k, ((low, high), n) in enumerate(zip(mixture.expert_intervals, split))
    )
    print(f"denoiser calls per expert ({type(pipe.scheduler).__name__}, {args.steps} steps): {owned}")
    call = dict(num_inference_steps=args.steps, guidance_scale=guidance)
    os.makedirs(args.out, exist_ok=True)
    if args.bulk:
        result = pipe.generate_many(
            args.num_images, batch_size=args.batch_size, seed=args.seed, output_dir=args.out, class_labels=labels,
            **call,
        )  # fmt: skip
        images = [Image.open(path) for path in result.paths[:64]]
        print(f"expert loads: {result.expert_loads}")
    else:
        images = []
        for start in range(0, args.num_images, args.batch_size):
            indices = range(start, min(start + args.batch_size, args.num_images))
            generators = [torch.Generator().manual_seed(args.seed + i) for i in indices]
            batch_labels = None if labels is None else labels[start : indices.stop]
            batch = pipe(len(indices), generator=generators, class_labels=batch_labels, **call).images
            for i, image in zip(indices, batch):
                image.save(os.path.join(args.out, f"{i:06d}.png"))
            images.extend(batch)
    grid = save_image_grid(images[:64], f"{os.path.normpath(args.out)}_grid.png")
    print(f"wrote {args.num_images} images to {args.out} and a grid of the first {min(64, len(images))} to {grid}")


if __name__ == "__main__":
    cli = build_parser()
    try:
        main(parse_args())
    except UsageError as error:  # found once the model is loaded: one line naming the flag
        cli.error(str(error))
