"""The protocol of `benchmarks/quality.py` as plain functions: the models, the two training budgets (arms), the
per-model data / noise streams, the summary over seeds, the guidance choice and the claim verdicts.

Nothing here trains or samples; `tests/test_benchmark_quality.py` checks it directly.

Arms (MEME's and the two-experts paper's claims are about different budgets, so both are run):

- **Arm A, per-expert parity** (MEME's protocol, Appendix: each small expert trained as long as its small single
  model): every expert gets `steps` optimizer updates of `batch_size` samples. A single model gets `steps` updates; a
  4-expert mixture `4 x steps` (one expert per update, interleaved); a jointly trained blend `steps` (both experts
  update on every step).
- **Arm B, compute parity**: every model gets the training compute (fwd + bwd MACs x samples) of the reference single
  model (`unet-large`) trained for `steps` updates. Per-sample training MACs are measured
  (`training_macs_per_sample`), so a model whose step is cheaper trains for more steps.

Each model trains once, for the larger of its two budgets, and is evaluated (EMA weights) when it reaches each budget.
That is valid because the learning rate is constant after warm-up (no schedule depends on the total length) and the
data / noise streams are prefix-identical (`TrainingStreams`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


ARMS = ("A", "B")
ARM_TITLES = {"A": "Arm A: per-expert parity", "B": "Arm B: compute parity"}
REFERENCE_MODEL = "unet-large"


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model.

    family: `"single"` (one denoiser), `"experts"` (N hard-routed experts trained one at a time with MEME's expert
    timestep sampling, `strategy` hard or soft) or `"blend"` (N experts trained jointly through the mixture's output
    with `routing` hard / linear / sigmoid / learned).
    """

    name: str
    family: str
    arch: str  # "unet" | "iunet"
    size: str  # "large" | "small"
    num_experts: int = 1
    strategy: str | None = None
    routing: str | None = None
    paper_row: str = ""


MODEL_SPECS = {
    spec.name: spec
    for spec in (
        ModelSpec("unet-large", "single", "unet", "large", paper_row="LDM-L (MEME Table 1), baseline (two-experts)"),
        ModelSpec("iunet-large", "single", "iunet", "large", paper_row="iU-Net at LDM-L size (not in the papers)"),
        ModelSpec("unet-small", "single", "unet", "small", paper_row="LDM-S"),
        ModelSpec("iunet-small", "single", "iunet", "small", paper_row="iU-LDM-S"),
        ModelSpec("multi-unet-hard", "experts", "unet", "small", 4, "hard", paper_row="Multi-Expert (w/o Soft)"),
        ModelSpec("multi-unet-soft", "experts", "unet", "small", 4, "soft", paper_row="Multi-Expert"),
        ModelSpec("meme-hard", "experts", "iunet", "small", 4, "hard", paper_row="MEME (w/o Soft)"),
        ModelSpec("meme-soft", "experts", "iunet", "small", 4, "soft", paper_row="MEME"),
        ModelSpec("blend-hard", "blend", "unet", "small", 2, routing="hard", paper_row="two experts, hard switch"),
        ModelSpec("blend-linear", "blend", "unet", "small", 2, routing="linear", paper_row="Our (Linear)"),
        ModelSpec("blend-sigmoid", "blend", "unet", "small", 2, routing="sigmoid", paper_row="Our (Sigmoid)"),
        ModelSpec("blend-learned", "blend", "unet", "small", 2, routing="learned", paper_row="Our (Learned)"),
    )
}
MODELS = tuple(MODEL_SPECS)
# iunet-large is not in the papers' tables; it costs ~1.3x unet-large per run: opt-in.
DEFAULT_MODELS = tuple(m for m in MODELS if m != "iunet-large")


# ------------------------------------------------------------------------------------------------------ budgets


@dataclass(frozen=True)
class ArmBudget:
    """A model's budget in one arm: `updates_per_expert` optimizer updates of each expert, reached after
    `optimizer_steps` steps of the model's training loop, costing `train_macs` (fwd + bwd MACs, all samples)."""

    updates_per_expert: int
    optimizer_steps: int
    train_macs: float


def step_macs_per_sample(spec: ModelSpec, expert_train_macs: Sequence[float], activity: Sequence[float] | None = None):
    """Training MACs per sample of one optimizer step, averaged over the steps of the model's loop.

    - single: the model's fwd + bwd MACs;
    - experts (interleaved, one expert per step): the mean over experts;
    - blend: `sum_k P(expert k runs at a uniform t) * macs_k` (`activity`), since an expert runs only on the samples
      where its weight is non-zero.
    """
    macs = [float(m) for m in expert_train_macs]
    if spec.family == "single":
        return macs[0]
    if spec.family == "experts":
        return sum(macs) / len(macs)
    if activity is None or len(activity) != len(macs):
        raise ValueError(f"{spec.name}: a blend needs the activity of each of its {len(macs)} experts.")
    return sum(a * m for a, m in zip(activity, macs))


def arm_budgets(
    spec: ModelSpec,
    expert_train_macs: Sequence[float],
    reference_macs: float,
    steps: int,
    batch_size: int,
    activity: Sequence[float] | None = None,
) -> dict[str, ArmBudget]:
    """Arm A and arm B budgets of one model (see the module docstring). `reference_macs`: fwd + bwd MACs per sample of
    the reference single model; arm B's compute is `steps * batch_size * reference_macs`."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"`steps` and `batch_size` must be positive, got {steps} and {batch_size}.")
    per_sample = step_macs_per_sample(spec, expert_train_macs, activity)
    loop_steps_per_update = spec.num_experts if spec.family == "experts" else 1
    compute = steps * batch_size * reference_macs
    budgets = {}
    for arm in ARMS:
        if arm == "A":
            updates = steps
        else:  # as many updates per expert as the compute allows (rounded down, at least one)
            updates = max(1, math.floor(compute / (batch_size * per_sample * loop_steps_per_update) + 1e-9))
        loop_steps = updates * loop_steps_per_update
        budgets[arm] = ArmBudget(updates, loop_steps, loop_steps * batch_size * per_sample)
    return budgets


# ------------------------------------------------------------------------------------------------------ streams


class TrainingStreams:
    """The random streams of one model's training run, each on its own generator seeded from `seed` only.

    Every model of a seed builds its own `TrainingStreams(seed)`, so optimizer step `i` of every model sees the same
    image indices, the same noise and the same label dropout; uniform timesteps are equal across models too. Expert
    timestep sampling (hard / soft) draws from its own `timesteps` generator, so it never shifts the other streams.
    """

    def __init__(self, seed: int):
        base = 1_000_003 * (int(seed) + 1)
        self.data = torch.Generator().manual_seed(base + 1)
        self.noise = torch.Generator().manual_seed(base + 2)
        self.timesteps = torch.Generator().manual_seed(base + 3)
        self.dropout = torch.Generator().manual_seed(base + 4)

    def batch(self, num_items: int, batch_size: int, sample_shape: Sequence[int]):
        """`(indices, noise)` of the next step."""
        indices = torch.randint(0, num_items, (batch_size,), generator=self.data)
        noise = torch.randn((batch_size, *sample_shape), generator=self.noise)
        return indices, noise

    def uniform_timesteps(self, batch_size: int, num_train_timesteps: int) -> torch.Tensor:
        return torch.randint(0, num_train_timesteps, (batch_size,), generator=self.timesteps)

    def drop_labels(self, labels: torch.Tensor, probability: float, null_class: int) -> torch.Tensor:
        """Replace labels by the null class with `probability` (always draws, so the stream stays aligned)."""
        drop = torch.rand(labels.shape[0], generator=self.dropout) < probability
        return torch.where(drop, torch.full_like(labels, null_class), labels)


def constant_lr_factor(update: int, warmup: int) -> float:
    """Linear warm-up over `warmup` updates, then constant (no dependence on the run's length)."""
    return min(1.0, (update + 1) / max(1, warmup))


# ------------------------------------------------------------------------------------------------------ summaries


def mean_spread(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """`(mean, spread)` over seeds; spread = half the range (for two seeds: |a - b| / 2). None values are skipped."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return sum(vals) / len(vals), (max(vals) - min(vals)) / 2


def fmt_ms(mean: float | None, spread: float | None, digits: int = 4) -> str:
    if mean is None:
        return "-"
    if spread is None or spread == 0:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def shared_guidance_scale(fid_by_model: Mapping[str, Mapping[float, float]]) -> float | None:
    """The one guidance scale for all models: the scale with the lowest mean over models of `log(FID)` (a log so
    that no single bad model decides). `fid_by_model[model][scale]` = seed-mean FID; models missing a scale are left
    out of that scale's mean."""
    scales = sorted({s for per in fid_by_model.values() for s in per})
    best, best_value = None, math.inf
    for s in scales:
        logs = [math.log(max(per[s], 1e-9)) for per in fid_by_model.values() if per.get(s) is not None]
        if logs and sum(logs) / len(logs) < best_value:
            best, best_value = s, sum(logs) / len(logs)
    return best


def best_guidance_scale(fid_by_scale: Mapping[float, float]) -> float | None:
    """The scale with the lowest (seed-mean) FID for one model."""
    valid = {s: v for s, v in fid_by_scale.items() if v is not None}
    return min(valid, key=lambda s: (valid[s], s)) if valid else None


# ------------------------------------------------------------------------------------------------------ verdicts

SUPPORTED, NOT_SUPPORTED, CANT_TELL = "supported", "not supported", "can't tell at this scale"


def verdict(
    a_values: Sequence[float],
    b_values: Sequence[float],
    relation: str = "<",
    margin: float = 0.02,
) -> dict:
    r"""
    Verdict for the claim "A is better than B" (`relation="<"`, lower is better) or "A is at least as good as B"
    (`relation="<="`, non-inferiority within a relative `margin`), from per-seed paired values (same seed = same data
    order, noise and initialisation streams).

    noise = spread(A) + spread(B) (half ranges over seeds).

    - `"<"`: supported if A < B in every seed and mean(B) - mean(A) > noise; not supported if A >= B in every seed and
      mean(A) - mean(B) > noise; otherwise can't tell.
    - `"<="`: supported if A <= B * (1 + margin) in every seed; not supported if A > B * (1 + margin) in every seed and
      mean(A) - mean(B) * (1 + margin) > noise; otherwise can't tell.
    """
    if relation not in ("<", "<="):
        raise ValueError(f"`relation` must be '<' or '<=', got {relation!r}.")
    pairs = [(float(a), float(b)) for a, b in zip(a_values, b_values) if a is not None and b is not None]
    if not pairs:
        return {"verdict": CANT_TELL, "reason": "no paired values"}
    mean_a, spread_a = mean_spread([a for a, _ in pairs])
    mean_b, spread_b = mean_spread([b for _, b in pairs])
    noise = spread_a + spread_b
    info = {
        "a_mean": mean_a,
        "a_spread": spread_a,
        "b_mean": mean_b,
        "b_spread": spread_b,
        "relative_gap": (mean_a - mean_b) / mean_b if mean_b else None,
        "seeds": len(pairs),
    }
    if relation == "<":
        if all(a < b for a, b in pairs) and mean_b - mean_a > noise:
            result = SUPPORTED
        elif all(a >= b for a, b in pairs) and mean_a - mean_b > noise:
            result = NOT_SUPPORTED
        else:
            result = CANT_TELL
    else:
        bound = 1.0 + margin
        if all(a <= b * bound for a, b in pairs):
            result = SUPPORTED
        elif all(a > b * bound for a, b in pairs) and mean_a - mean_b * bound > noise:
            result = NOT_SUPPORTED
        else:
            result = CANT_TELL
    if len(pairs) < 2 and result != CANT_TELL:
        result = CANT_TELL  # one seed: no spread, no verdict
        info["reason"] = "one seed only"
    return {"verdict": result, **info}


# The seed claims and the comparisons that test them: (claim, arm, A, relation, B). A and B are model names; the
# claim reads "A <relation> B" in held-out loss (lower is better).
CLAIMS = (
    (
        "MEME: 4 small iU-Net experts (soft) beat one ~3-4x larger model at lower inference MACs",
        ("meme-soft", "<", "unet-large"),
    ),
    ("MEME: ... and beat a single small U-Net (LDM-S)", ("meme-soft", "<", "unet-small")),
    ("MEME: ... and beat a single small iU-Net (iU-LDM-S)", ("meme-soft", "<", "iunet-small")),
    ("Soft > hard expertization (iU-Net experts)", ("meme-soft", "<", "meme-hard")),
    ("Soft > hard expertization (U-Net experts)", ("multi-unet-soft", "<", "multi-unet-hard")),
    ("iU-Net >= U-Net per MAC (single small models)", ("iunet-small", "<=", "unet-small")),
    ("iU-Net >= U-Net per MAC (single large models)", ("iunet-large", "<=", "unet-large")),
    ("iU-Net >= U-Net per MAC (4 soft experts: MEME vs Multi-Expert)", ("meme-soft", "<=", "multi-unet-soft")),
    ("Two-expert ratio blend (linear) beats the hard switch", ("blend-linear", "<", "blend-hard")),
    ("Two-expert ratio blend (sigmoid) beats the hard switch", ("blend-sigmoid", "<", "blend-hard")),
    ("Two-expert ratio blend (learned) beats the hard switch", ("blend-learned", "<", "blend-hard")),
    ("Two-expert learned blend beats a single small model (paper's baseline)", ("blend-learned", "<", "unet-small")),
)


def claim_rows(values: Mapping[str, Mapping[str, Sequence[float]]], margin: float = 0.02) -> list[dict]:
    """Verdicts of `CLAIMS` in both arms. `values[arm][model]` = per-seed primary metric (seed order fixed);
    comparisons whose models were not run are left out."""
    rows = []
    for claim, (a, relation, b) in CLAIMS:
        for arm in ARMS:
            per_model = values.get(arm, {})
            if a not in per_model or b not in per_model:
                continue
            rows.append(
                {"claim": claim, "arm": arm, "a": a, "relation": relation, "b": b}
                | verdict(per_model[a], per_model[b], relation, margin)
            )
    return rows
