"""Training- and sampling-step times on the CPU: the train_meme inner step, and the iU-Net's time per MAC.

1. `overhead`: train_meme's inner step vs a plain diffusers `UNet2DModel` training step. Both steps train the *same*
   `UNet2DModel` on the *same* batch with the same optimizer: the plain step is the `train_unconditional.py` recipe
   (uniform timesteps, `add_noise`, MSE, backward, clip, AdamW); the MEME step is `examples/train_meme.py`'s
   `training_loss` on that model as expert k of a 4-expert `ExpertMixtureUNet` (soft timestep sampling through the
   mixture, class-free), then the same backward/clip/AdamW. Prints the median step times and their ratio
   (target <= 1.05).
2. `architecture`: time per MAC of `IUNet2DModel` vs `UNet2DModel` (MEME's efficiency claim is in MACs; this checks
   that it survives in wall-clock time). Both models have the widths, depth, head size and group count of the demo's
   iU-Net (`examples/configs/meme_mnist_demo.json`, expert `--expert` of 4) and the same LDM attention placement
   (`UNet2DModel`: attention blocks at every stage but the first; iU-Net: iFormer blocks in the encoder, attention
   blocks in the decoder at every stage but the first). MACs per image come from
   `diffusers_experts.evaluation.measure_macs`. Times: a training step (forward, backward, clip, AdamW) and an
   inference call (`torch.no_grad()` forward), batch `--batch_size`. Prints ms / GMAC of each and the ratio
   iU-Net / UNet2DModel (target <= 1.1).

Two options change both sides of the `architecture` comparison or its baseline: `--compile` times both models under
`torch.compile` (default inductor backend; compilation happens in the untimed warm-up steps and is reported
separately), and `--unet_fused_qkv` gives the `UNet2DModel` baseline diffusers' fused query/key/value attention
(`Attention.fuse_projections()` + `FusedAttnProcessor2_0`, same outputs), as the iU-Net's attention blocks always have
one fused projection: without it the baseline pays for three separate projections and the ratio flatters the iU-Net.

Every measurement alternates its two contenders (A, B, B, A, ...) in one process so that machine load affects both
alike, and reports medians; the time-per-MAC ratio is the median over rounds of each round's ratio. On a CPU shared
with other jobs, `--clock cpu` times this process's CPU time instead of the wall clock (one thread).

With glibc's default malloc, the activations a training step frees are handed back to the OS (the heap is trimmed)
and the next step page-faults them back in: kernel time of 0 to 5 ms per step on the demo models, varying from run
to run for the same model and depending on the other contender's allocations in the same heap. `--malloc keep`
(default) keeps freed memory in the process (`mallopt` `M_TRIM_THRESHOLD` and `M_MMAP_THRESHOLD` at 1 GiB, as the
environment variables `MALLOC_TRIM_THRESHOLD_` / `MALLOC_MMAP_THRESHOLD_` would at start-up; jemalloc and tcmalloc
also return freed memory only gradually), so that the times are the models' own computation; `--malloc default`
leaves glibc as it is. Inference steps do not page-fault either way.

    OMP_NUM_THREADS=1 python benchmarks/train_step.py                          # both, CPU, one thread
    OMP_NUM_THREADS=1 python benchmarks/train_step.py --what architecture --resolution 16 --steps 30 --clock cpu
    OMP_NUM_THREADS=1 python benchmarks/train_step.py --what architecture --widths 64 128 256   # wider models
    OMP_NUM_THREADS=1 python benchmarks/train_step.py --what architecture --resolution 16 --unet_fused_qkv
    python benchmarks/train_step.py --device cuda --batch_size 64 --resolution 64
    python benchmarks/train_step.py --what architecture --device cuda --batch_size 64 --resolution 64 --compile
"""

import argparse
import ctypes
import ctypes.util
import importlib.util
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

from diffusers_experts import ExpertMixtureUNet, IUNet2DModel, meme_expert_config
from diffusers_experts.evaluation import count_parameters, measure_macs
from diffusers_experts.training import make_optimizer


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "examples", "configs", "meme_mnist_demo.json")
# The trainers' optimizer (`make_optimizer`: fused AdamW where available) with the training scripts' defaults.
TRAINER_ADAMW = argparse.Namespace(
    learning_rate=1e-4, adam_beta1=0.95, adam_beta2=0.999, adam_weight_decay=1e-6, adam_epsilon=1e-8
)


def load_train_meme():
    spec = importlib.util.spec_from_file_location("train_meme", os.path.join(ROOT, "examples", "train_meme.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=("overhead", "architecture", "both"), default="both")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument(
        "--block_out_channels", type=int, nargs="+", default=[32, 64, 64], help="Widths of the `overhead` model."
    )
    parser.add_argument("--model_config", default=DEMO_CONFIG, help="iU-Net config of the `architecture` comparison.")
    parser.add_argument("--expert", type=int, default=3, help="Expert (of 4) whose attention shares the iU-Net uses.")
    parser.add_argument(
        "--widths", type=int, nargs="+", default=None, help="`block_out_channels` of both `architecture` models."
    )
    parser.add_argument(
        "--compile", action="store_true", help="`architecture`: time both models under torch.compile (inductor)."
    )
    parser.add_argument(
        "--unet_fused_qkv",
        action="store_true",
        help="`architecture`: give the UNet2DModel baseline diffusers' fused q/k/v attention projections.",
    )
    parser.add_argument("--steps", type=int, default=12, help="Timed steps of each kind (after 2 warm-up steps).")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: wall-clock time; cpu: this process's CPU time, robust to other jobs on the machine (one thread).",
    )
    parser.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="keep: glibc malloc keeps freed memory (no page faults from heap trimming between steps); "
        "default: glibc's own thresholds. See the module docstring.",
    )
    return parser.parse_args()


def keep_freed_memory() -> bool:
    """Stop glibc's malloc from returning freed memory to the OS (see the module docstring); False where there is no
    glibc `mallopt` or it refuses."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # glibc before 2.35 caps the mmap threshold at 32 MiB on 64-bit systems
    mmap_ok = mallopt(m_mmap_threshold, 1 << 30) or mallopt(m_mmap_threshold, 32 << 20)
    return bool(mmap_ok and mallopt(m_trim_threshold, 1 << 30))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_times(steps: dict, repeats: int, device: str, clock: str = "wall", warmup: int = 2) -> dict:
    """Seconds of each callable in `steps` over `repeats` rounds (after `warmup`), run alternately (A, B, B, A, ...).

    `clock="cpu"` reads this process's CPU time (`time.process_time`) instead of the wall clock: on a machine shared
    with other jobs it leaves out the time the process waits for a core (single-threaded CPU runs only).
    """
    timer = time.process_time if clock == "cpu" else time.perf_counter
    times = {name: [] for name in steps}
    order = list(steps)
    for i in range(repeats + warmup):
        for name in order if i % 2 == 0 else reversed(order):
            sync(device)
            start = timer()
            steps[name]()
            sync(device)
            if i >= warmup:
                times[name].append(timer() - start)
    return times


def interleaved_medians(steps: dict, repeats: int, device: str, clock: str = "wall", warmup: int = 2) -> dict:
    """Median seconds of each callable in `steps` (see `interleaved_times`)."""
    times = interleaved_times(steps, repeats, device, clock, warmup)
    return {name: statistics.median(values) for name, values in times.items()}


def overhead(args):
    train_meme = load_train_meme()
    torch.manual_seed(0)
    stages = len(args.block_out_channels)
    model = UNet2DModel(
        sample_size=args.resolution,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=2,
        down_block_types=("DownBlock2D",) * (stages - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (stages - 1),
        norm_num_groups=8,
    ).to(args.device)
    others = [UNet2DModel.from_config(model.config) for _ in range(3)]
    mixture = ExpertMixtureUNet.from_experts([*others[:1], model, *others[1:]])  # the model is expert 1 of 4
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = make_optimizer(model.parameters(), TRAINER_ADAMW)
    clean = torch.randn(args.batch_size, 3, args.resolution, args.resolution, device=args.device)
    batch = {"pixel_values": clean}
    meme_args = argparse.Namespace(
        cache_latents=False,
        strategy="soft",
        expertization_probs=None,
        num_classes=None,
        class_dropout_prob=None,
        prediction_type="epsilon",
    )
    generator = torch.Generator().manual_seed(0)

    def step(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def plain_step():
        noise = torch.randn(clean.shape, generator=generator).to(args.device)
        timesteps = torch.randint(0, 1000, (clean.shape[0],), generator=generator).to(args.device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        step(F.mse_loss(model(noisy, timesteps).sample.float(), noise.float()))

    def meme_step():
        loss = train_meme.training_loss(
            meme_args, mixture, model, 1, batch, noise_scheduler, None, generator, args.device
        )
        step(loss)

    times = interleaved_medians({"plain": plain_step, "meme": meme_step}, args.steps, args.device, args.clock)
    print(
        f"[overhead] device {args.device}, threads {torch.get_num_threads()}, {args.clock} clock, malloc {args.malloc}, "
        f"batch {args.batch_size}x3x{args.resolution}^2, UNet2DModel {count_parameters(model) / 1e6:.2f}M params, "
        f"{args.steps} steps each"
    )
    print(f"plain UNet2DModel step: {times['plain'] * 1000:.1f} ms (median)")
    print(f"train_meme inner step:  {times['meme'] * 1000:.1f} ms (median)")
    print(f"ratio meme / plain: {times['meme'] / times['plain']:.3f} (target <= 1.05)")


def architecture_models(args):
    """`(iunet, unet)`: the demo's iU-Net (expert `args.expert` of 4) and a `UNet2DModel` of the same widths."""
    with open(args.model_config) as f:
        config = json.load(f)
    if args.widths:
        config["block_out_channels"] = list(args.widths)
    shape = dict(sample_size=args.resolution, in_channels=3, out_channels=3)
    torch.manual_seed(0)
    iunet = IUNet2DModel(**meme_expert_config(args.expert, 4, **config, **shape))
    stages = len(config["block_out_channels"])
    unet = UNet2DModel(
        **shape,
        block_out_channels=tuple(config["block_out_channels"]),
        layers_per_block=config.get("layers_per_block", 2),
        attention_head_dim=config.get("attention_head_dim", 32),
        norm_num_groups=config.get("norm_num_groups", 32),
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (stages - 1),
        up_block_types=("AttnUpBlock2D",) * (stages - 1) + ("UpBlock2D",),
    )
    if args.unet_fused_qkv:
        fuse_qkv_projections(unet)
    return iunet.to(args.device), unet.to(args.device)


def fuse_qkv_projections(model: torch.nn.Module) -> None:
    """diffusers' fused query/key/value projection in every `Attention` of `model` (UNet2DModel has no
    `fuse_qkv_projections` method of its own, unlike UNet2DConditionModel). diffusers keeps the separate projections
    beside the fused one; they no longer run, so they are frozen (not trained, not counted)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.fuse_projections()
            module.set_processor(FusedAttnProcessor2_0())
            for unused in (module.to_q, module.to_k, module.to_v):
                unused.requires_grad_(False)


def architecture(args):
    models = dict(zip(("iunet", "unet"), architecture_models(args)))
    generator = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.resolution, args.resolution)
    sample = torch.randn(shape, generator=generator).to(args.device)
    noise = torch.randn(shape, generator=generator).to(args.device)
    timesteps = torch.randint(0, 1000, (args.batch_size,), generator=generator).to(args.device)
    macs = {name: measure_macs(m.eval(), sample[:1], timesteps[:1]) for name, m in models.items()}
    optimizers = {
        name: make_optimizer([p for p in m.parameters() if p.requires_grad], TRAINER_ADAMW)
        for name, m in models.items()
    }
    # what the steps call: the models, or their compiled wrappers (same parameters)
    callables = {name: torch.compile(m) if args.compile else m for name, m in models.items()}

    def train_step(name):
        model, optimizer, call = models[name], optimizers[name], callables[name]

        def step():
            model.train()
            F.mse_loss(call(sample, timesteps).sample, noise).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def inference_step(name):
        model, call = models[name], callables[name]

        def step():
            model.eval()
            with torch.no_grad():
                call(sample, timesteps)

        return step

    baseline = "UNet2DModel, fused q/k/v" if args.unet_fused_qkv else "UNet2DModel"

    print(
        f"[architecture] device {args.device}, threads {torch.get_num_threads()}, {args.clock} clock, malloc {args.malloc}, "
        f"batch {args.batch_size}x3x{args.resolution}^2, {args.steps} steps each, iU-Net = expert {args.expert} of 4 "
        f"from {os.path.relpath(args.model_config, ROOT)}, widths {tuple(models['iunet'].config.block_out_channels)}"
        f"{', torch.compile' if args.compile else ''}, baseline {baseline}"
    )
    for name, model in models.items():
        size = f"{count_parameters(model, trainable_only=True) / 1e6:.3f}M params, {macs[name] / 1e6:.2f}M MACs/image"
        print(f"{type(model).__name__:>13}: {size}")
    for kind, make in (("training", train_step), ("inference", inference_step)):
        steps = {name: make(name) for name in models}
        if args.compile:  # compile each model for this kind of step outside the timed steps
            started = time.perf_counter()
            for step in steps.values():
                step()
            print(f"{kind:>9}: compiled both models in {time.perf_counter() - started:.0f} s (wall)")
        times = interleaved_times(steps, args.steps, args.device, args.clock)
        median = {name: statistics.median(values) for name, values in times.items()}
        per_gmac = {name: median[name] / (macs[name] * args.batch_size / 1e9) for name in models}
        # the ratio of each round's pair of steps, then the median: load drifts between rounds cancel out
        rounds = [a / b * macs["unet"] / macs["iunet"] for a, b in zip(times["iunet"], times["unet"])]
        ratio = statistics.median(rounds)
        spread = ""
        if len(rounds) >= 4:  # the middle half of the rounds' ratios: how far one run can be trusted
            low, _, high = statistics.quantiles(rounds, n=4)
            spread = f", rounds' quartiles {low:.3f}-{high:.3f}"
        print(
            f"{kind:>9}: iU-Net {median['iunet'] * 1000:.1f} ms ({per_gmac['iunet'] * 1000:.1f} ms/GMAC), "
            f"{baseline} {median['unet'] * 1000:.1f} ms ({per_gmac['unet'] * 1000:.1f} ms/GMAC); "
            f"time-per-MAC ratio iU-Net / UNet2DModel: {ratio:.3f} (target <= 1.1{spread})"
        )


def main(args):
    if args.malloc == "keep" and not keep_freed_memory():
        args.malloc = "default (glibc mallopt unavailable)"
    if args.what in ("overhead", "both"):
        overhead(args)
    if args.what in ("architecture", "both"):
        architecture(args)


if __name__ == "__main__":
    main(parse_args())
