"""Why do multi-expert mixtures leave noisy residue in samples? Held-out loss per t-bin, swaps, hard vs soft.

    OMP_NUM_THREADS=1 python benchmarks/residue.py --quick      # ~3 min on one CPU core (budget 400)
    OMP_NUM_THREADS=1 python benchmarks/residue.py              # ~18 min on one CPU core (budget 2,400)

Every arm trains class-conditional `UNet2DModel` experts of the demo's width (16/32/64, or the "small" 8/16/32) on the
first 4,000 bundled MNIST digits at 16 px with the components of `examples/train_meme.py` (AdamW 2e-3, cosine with 100
warmup steps per expert, grad clip 1, one EMA per expert with power 2/3, label dropout 0.1, interleaved experts,
batch 32). All arms see the same batches, noise and label-dropout draws step for step (one data generator); only the
timestep draws (own generator) differ. `--budget` B is the single model's optimizer steps:

    single        1 model,      B steps, uniform t
    single-B/4    1 model,    B/4 steps (what one expert of a 4-mixture gets at equal total steps)
    soft4         4 experts,  B/4 steps each, MEME soft p = .8/.4/.2/.1   (the demo's protocol)
    hard4         4 experts,  B/4 steps each, own interval only
    hard2         2 experts,  B/2 steps each, own interval only (boundary 500)
    small-hard4   4 small experts (8/16/32),  B steps each, hard (about the single model's training MACs)
    hard4-x4      4 experts,    B steps each, hard (per-expert parity, 4x the compute; only with --arms)

Evaluation (primary): held-out denoising loss (epsilon MSE, true labels) at 16 t from 5 to 995 on 512 digits never
trained on, fixed noise, reported per expert interval [0,250) [250,500) [500,750) [750,1000). Secondary, a quick sample
look: 200 DDIM-25 samples at guidance 1.5, class accuracy by a small offline classifier fitted on the training
digits, and "residue" = mean brightness of the darkest half of each image's pixels in [0, 1] (real digits: ~0.00;
textured grey backgrounds raise it). Swaps: a mixture with expert k replaced by the single model, and the single model
with expert k in its place, tell which noise range carries the residue.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from types import SimpleNamespace

import torch

from diffusers_experts import ExpertMixtureUNet, MultiExpertPipeline
from diffusers_experts.evaluation import ReferenceClassifier, heldout_loss, mnist_digits, save_image_grid
from diffusers_experts.training import (
    ExpertEMA,
    apply_class_dropout,
    build_experts,
    denoising_loss,
    make_lr_scheduler,
    make_noise_scheduler,
    make_optimizer,
    trainable_parameters,
)


NUM_TRAIN = 4000
NUM_HELDOUT = 512
NUM_CLASSES = 10
EDGES = [0, 250, 500, 750, 1000]
WIDE = {"block_out_channels": [16, 32, 64], "attention_head_dim": 16, "norm_num_groups": 8}
SMALL = {"block_out_channels": [8, 16, 32], "attention_head_dim": 8, "norm_num_groups": 4}
BASE = {
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def arms(budget: int, quick: bool) -> list[dict]:
    out = [
        {"name": "single", "experts": 1, "width": WIDE, "strategy": "uniform", "steps": budget},
        {"name": "soft4", "experts": 4, "width": WIDE, "strategy": "soft", "steps": budget // 4},
        {"name": "hard4", "experts": 4, "width": WIDE, "strategy": "hard", "steps": budget // 4},
        {"name": "single-B/4", "experts": 1, "width": WIDE, "strategy": "uniform", "steps": budget // 4},
        {"name": "hard2", "experts": 2, "width": WIDE, "strategy": "hard", "steps": budget // 2},
    ]
    if not quick:
        out += [
            {"name": "small-hard4", "experts": 4, "width": SMALL, "strategy": "hard", "steps": budget},
        ]
    # 4x the compute: only when asked for by name (`--arms ... hard4-x4`)
    out.append({"name": "hard4-x4", "experts": 4, "width": WIDE, "strategy": "hard", "steps": budget, "opt_in": True})
    return out


def train_args(lr: float) -> SimpleNamespace:
    """The demo's optimisation flags (`make demo`), as `examples/train_meme.py` reads them."""
    return SimpleNamespace(
        learning_rate=lr,
        adam_beta1=0.95,
        adam_beta2=0.999,
        adam_weight_decay=1e-6,
        adam_epsilon=1e-8,
        lr_scheduler="cosine",
        lr_warmup_steps=100,
    )


def train_arm(arm: dict, data: torch.Tensor, labels: torch.Tensor, args) -> ExpertMixtureUNet:
    """Train one arm with the trainer's components; the data/noise stream depends only on `args.seed`."""
    torch.manual_seed(args.seed)
    config = {**BASE, **arm["width"]}
    experts = build_experts("unet", arm["experts"], config, 16, 1, NUM_CLASSES + 1)
    mixture = ExpertMixtureUNet.from_experts(experts, routing="hard")
    experts = list(mixture.experts)
    targs = train_args(args.lr)
    one_process = SimpleNamespace(num_processes=1)
    optimizers = [make_optimizer(trainable_parameters(e), targs) for e in experts]
    schedulers = [make_lr_scheduler(o, targs, one_process, arm["steps"]) for o in optimizers]
    ema = ExpertEMA(experts, list(range(len(experts))), decay=0.9999, power=2 / 3)
    noise_scheduler = make_noise_scheduler(
        SimpleNamespace(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    )
    data_gen = torch.Generator().manual_seed(args.seed)  # batches, noise, label dropout: the same for every arm
    t_gen = torch.Generator().manual_seed(args.seed + 1)  # timesteps
    mixture.train()
    total = arm["steps"] * len(experts)
    for step in range(total):
        k = step % len(experts)
        index = torch.randint(0, len(data), (args.batch_size,), generator=data_gen)
        clean = data[index]
        noise = torch.randn(clean.shape, generator=data_gen)
        batch_labels = apply_class_dropout(labels[index], 0.1, NUM_CLASSES, data_gen)
        t = mixture.sample_training_timesteps(args.batch_size, k, arm["strategy"], generator=t_gen)
        loss = denoising_loss(experts[k], noise_scheduler, clean, noise, t, batch_labels, "epsilon")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable_parameters(experts[k]), 1.0)
        optimizers[k].step()
        schedulers[k].step()
        optimizers[k].zero_grad(set_to_none=True)
        ema.step(k)
    ema.copy_to_experts()
    mixture.eval()
    return mixture


def residue(images: torch.Tensor) -> float:
    """Mean of the darkest half of each image's pixels (`images` in [0, 1], `(B, ...)`)."""
    flat = images.reshape(images.shape[0], -1)
    dark = flat.sort(dim=1).values[:, : flat.shape[1] // 2]
    return dark.mean().item()


@torch.no_grad()
def sample_look(mixture, noise_scheduler, classifier, num: int, guidance: float, seed: int = 0):
    from diffusers import DDIMScheduler

    pipe = MultiExpertPipeline(unet=mixture, scheduler=DDIMScheduler.from_config(noise_scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    wanted = torch.arange(num) % NUM_CLASSES
    images = pipe(
        batch_size=num,
        num_inference_steps=25,
        generator=torch.Generator().manual_seed(seed),
        class_labels=wanted.tolist(),
        guidance_scale=guidance,
        output_type="pt",
    ).images
    uint8 = (images * 255).round().to(torch.uint8)
    return images, classifier.accuracy(uint8, wanted), residue(images)


def compose(models: list, num_experts: int = 4) -> ExpertMixtureUNet:
    return ExpertMixtureUNet.from_experts(models, routing="hard")


def fmt_row(name: str, bins: list[float], mean: float, extra: str = "") -> str:
    return f"| {name} | " + " | ".join(f"{b:.4f}" for b in bins) + f" | {mean:.4f} |{extra}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="budget 400, no parity arms, 100 samples")
    parser.add_argument("--budget", type=int, default=None, help="single-model optimizer steps (default 2400)")
    parser.add_argument("--arms", nargs="+", default=None, help="only these arms (names as in the docstring)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--num_samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    parser.add_argument("--output_dir", default="outputs/residue")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budget = args.budget or (400 if args.quick else 2400)
    num_samples = args.num_samples or (100 if args.quick else 200)
    os.makedirs(args.output_dir, exist_ok=True)

    digits, all_labels = mnist_digits(16, seed=0)
    data = digits[:NUM_TRAIN].float() / 127.5 - 1.0
    labels = all_labels[:NUM_TRAIN]
    held = digits[NUM_TRAIN : NUM_TRAIN + NUM_HELDOUT].float() / 127.5 - 1.0
    held_labels = all_labels[NUM_TRAIN : NUM_TRAIN + NUM_HELDOUT]
    noise_scheduler = make_noise_scheduler(
        SimpleNamespace(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    )
    start = time.time()
    classifier = ReferenceClassifier.fit(
        digits[:NUM_TRAIN], labels, num_classes=10, sample_size=16, steps=300, block_out_channels=(16, 32, 64)
    )
    real = held[:200] * 0.5 + 0.5
    real_acc = classifier.accuracy(digits[NUM_TRAIN : NUM_TRAIN + 500], all_labels[NUM_TRAIN : NUM_TRAIN + 500])
    print(
        f"classifier: {real_acc:.3f} on held-out real digits; real residue {residue(real):.4f} "
        f"({time.time() - start:.0f}s)",
        flush=True,
    )

    header = "| model | t<250 | 250-500 | 500-750 | >=750 | mean |"
    rows, results, models = [], {}, {}

    def evaluate(name, model, samples=True):
        loss = heldout_loss(model, noise_scheduler, held, held_labels, conditions=["cond"])
        bins, mean = loss.bins(EDGES), loss.mean()
        extra = ""
        entry = {"bins": bins, "mean": mean, "per_t": loss.to_dict()}
        if samples:
            images, acc, res = sample_look(model, noise_scheduler, classifier, num_samples, args.guidance)
            save_image_grid(
                images.permute(0, 2, 3, 1).numpy(),
                os.path.join(args.output_dir, f"samples_{name.replace('/', '_')}.png"),
                columns=NUM_CLASSES,
                scale=4,
            )
            extra = f" acc {acc:.2f} | residue {res:.4f} |"
            entry.update(accuracy=acc, residue=res)
        rows.append(fmt_row(name, bins, mean, extra))
        results[name] = entry
        print(rows[-1], flush=True)
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump({"budget": budget, "results": results}, f, indent=1)

    print(
        f"budget {budget} single-model steps, batch {args.batch_size}, guidance {args.guidance}, "
        f"{num_samples} samples\n{header} sample look |",
        flush=True,
    )

    def swaps(mix_name):
        """Which noise range carries the residue: expert k <-> the single model."""
        single, mix = models.get("single"), models.get(mix_name)
        if single is None or mix is None:
            return
        s = single.experts[0]
        for k in range(4):
            swapped = [s if j == k else mix.experts[j] for j in range(4)]
            evaluate(f"{mix_name}, single in [{EDGES[k]},{EDGES[k + 1]})", compose(swapped))
        for k in range(4):
            reverse = [mix.experts[k] if j == k else s for j in range(4)]
            evaluate(f"single, {mix_name} e{k} in [{EDGES[k]},{EDGES[k + 1]})", compose(reverse))

    cache = os.path.join(args.output_dir, "models")
    os.makedirs(cache, exist_ok=True)
    for arm in arms(budget, args.quick):
        if (args.arms and arm["name"] not in args.arms) or (arm.get("opt_in") and not args.arms):
            continue
        t0 = time.time()
        path = os.path.join(cache, f"{arm['name'].replace('/', '_')}-{budget}-{args.seed}")
        if os.path.isdir(path):  # a finished arm of an earlier run with the same budget and seed
            model = ExpertMixtureUNet.from_pretrained(path).eval()
        else:
            model = train_arm(arm, data, labels, args)
            model.save_pretrained(path)
        models[arm["name"]] = model
        print(
            f"  ({arm['name']}: {arm['experts']} x {arm['steps']} steps, {arm['strategy']}, {time.time() - t0:.0f}s)",
            flush=True,
        )
        evaluate(arm["name"], model)
        if arm["name"] in ("soft4", "hard4"):
            swaps(arm["name"])
    print("\n" + header + " sample look |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\ntotal {time.time() - start:.0f}s; results in {args.output_dir}/results.json")


if __name__ == "__main__":
    main()
