"""Routing overhead of ExpertMixtureUNet, and iU-Net vs UNet2DModel complexity at equal width.

    python benchmarks/routing_overhead.py            # ~1-2 minutes on 2 CPU cores
    python benchmarks/routing_overhead.py --device cuda --batch_size 64 --repeats 10

Prints, from one run:
1. the wall-time ratio of DDIM sampling with a 4-expert hard-routed mixture vs one expert of the same architecture
   (target <= 1.03: hard routing runs one expert per step, the routing itself is one lookup of the timestep);
2. parameters and MACs per denoiser call of IUNet2DModel vs UNet2DModel with the same `block_out_channels`.
"""

import argparse
import os
import statistics
import time

import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from diffusers_experts import ExpertMixtureUNet, IUNet2DModel, meme_expert_config
from diffusers_experts.evaluation import count_parameters, measure_macs


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="DDIM inference steps per sampling run")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timing repeats per variant")
    return parser.parse_args()


def _sampling_seconds(pipe: DDIMPipeline, args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one sampling run."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    pipe(batch_size=args.batch_size, num_inference_steps=args.steps, generator=generator, output_type="np")
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - start_cpu


def routing_overhead(args) -> None:
    width = dict(sample_size=args.resolution, block_out_channels=(64, 128, 128), norm_num_groups=32)
    torch.manual_seed(0)
    experts = [IUNet2DModel(**meme_expert_config(0, 1, **width)) for _ in range(4)]
    # every expert has the architecture of the single model, so any difference is routing overhead
    single = experts[0]
    mixture = ExpertMixtureUNet.from_experts(experts, routing="hard")
    pipes = {
        "one expert": DDIMPipeline(unet=single, scheduler=DDIMScheduler()).to(args.device),
        "4-expert mixture": DDIMPipeline(unet=mixture, scheduler=DDIMScheduler()).to(args.device),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
        _sampling_seconds(pipe, args)  # warm-up
    times = {name: [] for name in pipes}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        for name, pipe in pipes.items():
            times[name].append(_sampling_seconds(pipe, args))
    print(
        f"\n## Routing overhead (DDIM, {args.steps} steps, batch {args.batch_size}, "
        f"{args.resolution}x{args.resolution}, device {args.device}, {args.threads} threads, {args.repeats} repeats)"
    )
    print("| model | median wall s / run | min wall s | median CPU s / run |")
    print("|---|---|---|---|")
    summary = {}
    for name, runs in times.items():
        wall, cpu = [w for w, _ in runs], [c for _, c in runs]
        summary[name] = (statistics.median(wall), min(wall), statistics.median(cpu))
        print(f"| {name} | {summary[name][0]:.3f} | {summary[name][1]:.3f} | {summary[name][2]:.3f} |")
    one, four = summary["one expert"], summary["4-expert mixture"]
    print(f"time ratio mixture / one expert, median wall: {four[0] / one[0]:.3f}  (target <= 1.03)")
    print(f"time ratio mixture / one expert, min wall:    {four[1] / one[1]:.3f}")
    print(
        f"time ratio mixture / one expert, median CPU:  {four[2] / one[2]:.3f}  (robust to other load on the machine)"
    )


def per_call_overhead(args, calls: int = 300) -> None:
    """Routing cost per denoiser call, isolated: a tiny expert called directly vs through the mixture."""
    torch.manual_seed(0)
    small = dict(
        sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4, layers_per_block=1
    )
    experts = [IUNet2DModel(**small).eval() for _ in range(4)]
    variants = {
        "expert alone": experts[0],
        "mixture, hard, scalar t": ExpertMixtureUNet.from_experts(experts, routing="hard").eval(),
        "mixture, linear blend (2 experts run)": ExpertMixtureUNet.from_experts(
            experts, routing="linear", blend_width=100.0
        ).eval(),
    }
    x = torch.randn(1, 3, 8, 8)
    t = {"expert alone": 100, "mixture, hard, scalar t": 100, "mixture, linear blend (2 experts run)": 250}
    cpu = {name: [] for name in variants}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # several threads spin-wait on tiny ops, which CPU time would count
    with torch.no_grad():
        for _ in range(5):
            for name, model in variants.items():
                start = time.process_time()
                for _ in range(calls):
                    model(x, t[name])
                cpu[name].append((time.process_time() - start) / calls * 1e6)
    torch.set_num_threads(threads)
    print(f"\n## Per-call cost, tiny 8x8 expert, 1 thread (CPU microseconds per call, min of 5 x {calls} calls)")
    print("| variant | us / call | overhead vs expert alone |")
    print("|---|---|---|")
    base = min(cpu["expert alone"])
    for name, values in cpu.items():
        print(f"| {name} | {min(values):.0f} | {min(values) - base:+.0f} us |")


def complexity(args) -> None:
    print("\n## Params and MACs per denoiser call, equal width (batch 1)")
    print("| setting | model | params (M) | MACs (G) |")
    print("|---|---|---|---|")
    settings = {
        "pixel 32x32x3, (64,128,128)": dict(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128)
        ),
        "MEME-S latent 32x32x4, (128,256,384,512)": dict(
            sample_size=32, in_channels=4, out_channels=4, block_out_channels=(128, 256, 384, 512)
        ),
    }
    for name, cfg in settings.items():
        stages = len(cfg["block_out_channels"])
        unet = UNet2DModel(
            **cfg,
            layers_per_block=2,
            down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (stages - 1),
            up_block_types=("AttnUpBlock2D",) * (stages - 1) + ("UpBlock2D",),
            attention_head_dim=32,
        )
        iunets = {f"IUNet2DModel (MEME expert {k}/4)": IUNet2DModel(**meme_expert_config(k, 4, **cfg)) for k in (0, 3)}
        x = torch.randn(1, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
        for model_name, model in {"UNet2DModel": unet, **iunets}.items():
            macs = measure_macs(model.eval(), x, 500)
            print(f"| {name} | {model_name} | {count_parameters(model) / 1e6:.2f} | {macs / 1e9:.3f} |")


def main(args):
    torch.set_num_threads(args.threads)
    per_call_overhead(args)
    routing_overhead(args)
    complexity(args)


if __name__ == "__main__":
    main(parse_args())
