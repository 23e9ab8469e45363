"""Sampling benchmark: routing overhead of MultiExpertPipeline, expert loads of bulk generation, offload memory.

    OMP_NUM_THREADS=2 python benchmarks/sampling.py
    python benchmarks/sampling.py --device cuda --sample_size 64 --batch_size 16

Prints, from one run:
1. time ratio of `MultiExpertPipeline` (4 hard-routed experts) vs diffusers' `DDIMPipeline` with one expert of the
   same size (same scheduler, steps, batch; interleaved repeats): wall clock with the configured threads, and (CPU)
   the calling thread's CPU time with one torch thread, which other processes on a shared machine barely disturb;
   then the pure pipeline overhead, measured around denoisers that cost nothing;
2. expert loads (moves onto the device) of expert-major `generate_many` (= N) vs a loop of `__call__` (= N x batches);
3. peak accelerator memory with and without per-expert offload (CUDA), or on CPU the peak of expert parameters
   resident on the execution device (the offloader's bookkeeping).
"""

import argparse
import statistics
import time

import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput

from diffusers_experts import ExpertMixtureUNet, MultiExpertPipeline


class NullDenoiser(ModelMixin, ConfigMixin):
    """A denoiser that costs nothing (`eps = scale * x`): pipeline time with it is pure pipeline overhead."""

    @register_to_config
    def __init__(self, sample_size: int = 32, in_channels: int = 3, out_channels: int = 3):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        out = sample * self.scale
        return UNet2DOutput(sample=out) if return_dict else (out,)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_experts", type=int, default=4)
    parser.add_argument("--sample_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--bulk_images", type=int, default=12)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def make_expert(seed: int, sample_size: int) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    ).eval()


def cpu_timed(fn) -> float:
    """CPU time of the calling thread (run with one torch thread): robust to other processes on a shared machine."""
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def main(args):
    device = torch.device(args.device)
    experts = [make_expert(k, args.sample_size) for k in range(args.num_experts)]
    mixture = ExpertMixtureUNet.from_experts(experts, routing="hard").to(device)
    pipe = MultiExpertPipeline(unet=mixture, scheduler=DDIMScheduler())
    reference = DDIMPipeline(unet=make_expert(0, args.sample_size).to(device), scheduler=DDIMScheduler())
    for p in (pipe, reference):
        p.set_progress_bar_config(disable=True)
    print(
        f"device={device} threads={torch.get_num_threads()} experts={args.num_experts} "
        f"expert_params={sum(p.numel() for p in experts[0].parameters()) / 1e6:.2f}M "
        f"sample={args.sample_size} batch={args.batch_size} steps={args.steps}"
    )

    # 1. routing overhead: same work (one expert call per step), interleaved repeats, median
    def run(p):
        return lambda: p(
            args.batch_size, num_inference_steps=args.steps, generator=torch.manual_seed(0), output_type="pt"
        )

    run(pipe)()
    run(reference)()
    ours, theirs = [], []
    for r in range(args.repeats):  # interleaved, alternating which goes first, so load changes hit both alike
        order = [(pipe, ours), (reference, theirs)]
        for p, wall in order if r % 2 == 0 else order[::-1]:
            wall.append(timed(run(p), device))
    print(
        f"[time] wall, {torch.get_num_threads()} threads, {args.repeats} interleaved runs: MultiExpertPipeline median "
        f"{statistics.median(ours):.3f}s min {min(ours):.3f}s | DDIMPipeline median {statistics.median(theirs):.3f}s "
        f"min {min(theirs):.3f}s | ratio median {statistics.median(ours) / statistics.median(theirs):.3f} "
        f"min {min(ours) / min(theirs):.3f} (target <= 1.03)"
    )
    if device.type == "cpu":
        # CPU time of the calling thread with one torch thread: far less sensitive to other processes on the machine
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        ours_cpu, theirs_cpu = [], []
        for r in range(args.repeats):
            order = [(pipe, ours_cpu), (reference, theirs_cpu)]
            for p, cpu in order if r % 2 == 0 else order[::-1]:
                cpu.append(cpu_timed(run(p)))
        torch.set_num_threads(threads)
        print(
            f"[time] thread CPU time, 1 thread: MultiExpertPipeline min {min(ours_cpu):.3f}s | DDIMPipeline min "
            f"{min(theirs_cpu):.3f}s | ratio min {min(ours_cpu) / min(theirs_cpu):.3f} median "
            f"{statistics.median(ours_cpu) / statistics.median(theirs_cpu):.3f}"
        )

    # 1b. pure pipeline overhead: the same pipelines around denoisers that cost nothing
    null_pipe = MultiExpertPipeline(
        unet=ExpertMixtureUNet.from_experts([NullDenoiser(args.sample_size) for _ in experts]).to(device),
        scheduler=DDIMScheduler(),
    )
    null_reference = DDIMPipeline(unet=NullDenoiser(args.sample_size).to(device), scheduler=DDIMScheduler())
    # on CPU: thread CPU time with one torch thread, relative to the single-thread CPU time of the real run
    on_cpu = device.type == "cpu"
    measure = cpu_timed if on_cpu else (lambda fn: timed(fn, device))
    reference_time = min(theirs_cpu) if on_cpu else min(theirs)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if on_cpu else threads)
    overhead = {}
    for name, p in (("ours", null_pipe), ("ddim", null_reference)):
        p.set_progress_bar_config(disable=True)
        for steps in (1, args.steps + 1):
            call = lambda p=p, steps=steps: p(  # noqa: E731
                args.batch_size, num_inference_steps=steps, generator=torch.manual_seed(0), output_type="pt"
            )
            overhead[name, steps] = min(measure(call) for _ in range(30))
    torch.set_num_threads(threads)
    per_call = overhead["ours", 1] - overhead["ddim", 1]
    per_step = (
        (overhead["ours", args.steps + 1] - overhead["ours", 1])
        - (overhead["ddim", args.steps + 1] - overhead["ddim", 1])
    ) / args.steps
    extra = per_call + args.steps * per_step
    print(
        f"[overhead] null denoisers: MultiExpertPipeline - DDIMPipeline = {per_call * 1e3:+.2f} ms per call, "
        f"{per_step * 1e3:+.3f} ms per step -> {extra * 1e3:+.2f} ms per {args.steps}-step run = "
        f"{extra / reference_time:+.2%} of DDIMPipeline's fastest run above (implied ratio "
        f"{1 + extra / reference_time:.3f})"
    )

    # 2. expert loads: expert-major generate_many vs batch-major loop of __call__
    offload = pipe.enable_expert_offload(device)
    bulk = pipe.generate_many(
        args.bulk_images, batch_size=args.batch_size, seed=0, num_inference_steps=args.steps, output_type="latent"
    )
    num_batches = -(-args.bulk_images // args.batch_size)
    offload.reset_counts()
    for b in range(num_batches):
        indices = range(b * args.batch_size, min((b + 1) * args.batch_size, args.bulk_images))
        gens = [torch.Generator().manual_seed(i) for i in indices]
        pipe(len(indices), num_inference_steps=args.steps, generator=gens, output_type="latent")
    print(
        f"[loads] generate_many: {sum(bulk.expert_loads)} {bulk.expert_loads}  batch-major loop: "
        f"{sum(offload.load_counts)} {offload.load_counts}  ({args.num_experts} experts x {num_batches} batches)"
    )
    pipe.disable_expert_offload()

    # 3. peak memory with and without offload
    if device.type == "cuda":
        peaks = {}
        for mode in ("no offload", "offload"):
            if mode == "offload":
                pipe.enable_expert_offload(device)
            else:
                pipe.unet.to(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            run(pipe)()
            peaks[mode] = torch.cuda.max_memory_allocated(device) / 2**20
            pipe.disable_expert_offload()
        print(
            f"[memory] peak CUDA allocated: no offload {peaks['no offload']:.1f} MiB, offload {peaks['offload']:.1f} MiB"
        )
    else:
        offload = pipe.enable_expert_offload("cpu")
        peak = 0
        originals = []
        for expert in pipe.unet.experts:
            original = expert.forward
            originals.append(original)

            def forward(*a, _original=original, **kw):
                nonlocal peak
                peak = max(peak, sum(parameter_bytes(pipe.unet.experts[k]) for k in offload.resident))
                return _original(*a, **kw)

            expert.forward = forward
        run(pipe)()
        total = parameter_bytes(pipe.unet)
        print(
            f"[memory] expert parameters resident on the execution device (CPU bookkeeping): no offload "
            f"{total / 2**20:.2f} MiB, offload peak {peak / 2**20:.2f} MiB"
        )


if __name__ == "__main__":
    main(parse_args())
