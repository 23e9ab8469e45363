"""Quick start: build a 4-expert MEME mixture of iU-Nets, show its routing, sample with diffusers' DDIMPipeline.

    python examples/quickstart.py --output_dir outputs/quickstart

Untrained experts produce noise-like images; see `examples/train_meme.py` for training.
"""

import argparse
import os

import torch
from diffusers import DDIMPipeline, DDIMScheduler

from diffusers_experts import ExpertMixtureUNet, IUNet2DModel, meme_expert_config
from diffusers_experts.training.arguments import HelpFormatter


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output_dir", default="outputs/quickstart", help="Samples and the saved mixture.")
    parser.add_argument("--num_experts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(args):
    torch.manual_seed(args.seed)
    small = dict(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), norm_num_groups=8)
    experts = [
        IUNet2DModel(**meme_expert_config(k, args.num_experts, **small), attention_head_dim=16)
        for k in range(args.num_experts)
    ]
    mixture = ExpertMixtureUNet.from_experts(experts, routing="hard")
    for k, (low, high) in enumerate(mixture.expert_intervals):
        print(f"expert {k}: t in [{low:.0f}, {high:.0f})  high_ratios={experts[k].config.high_ratios}")
    pipe = DDIMPipeline(unet=mixture, scheduler=DDIMScheduler())
    images = pipe(batch_size=4, num_inference_steps=args.steps, generator=torch.manual_seed(args.seed)).images
    os.makedirs(args.output_dir, exist_ok=True)
    for i, image in enumerate(images):
        image.save(os.path.join(args.output_dir, f"sample_{i}.png"))
    mixture.save_pretrained(os.path.join(args.output_dir, "mixture"))
    print(f"saved {len(images)} samples and the mixture to {args.output_dir}")


if __name__ == "__main__":
    main(parse_args())
