"""Run diffusers' own tests once per mixture mode (`MIXTURE_EXPERTS`) and print a per-test comparison.

    python conformance/run.py --tests-root /tmp/diffusers-tests --modes 0 1 3 [--suite default|unet|conditional|text|all]
                              [--out DIR] [-- TEST_IDS...]

Mode 0 is the baseline (plain models, plugin inert). Exit status 1 if a test that passes in the baseline fails, errors
or becomes "not runnable offline" with a mixture, 0 otherwise (a test that passes in the baseline and skips with a
mixture is listed as a coverage loss, not counted as a failure). Each mode writes `<out>/experts_<mode>.xml` (JUnit) and
`.log`. Outcomes: `passed`, `FAILED`, `ERROR`, `skipped`, `offline` (needs files from the Hugging Face Hub, which
`HF_HUB_OFFLINE=1` forbids: the plugin reports those as skips with reason "mixture_plugin: not runnable offline").
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path


HERE = Path(__file__).resolve().parent
OFFLINE_REASON = "mixture_plugin: not runnable offline"

# (selection label, test ids relative to --tests-root); a test belongs to the first selection whose file it is in
UNET_SELECTIONS = [
    ("pipelines/ddpm", ["tests/pipelines/ddpm/test_ddpm.py"]),
    ("pipelines/ddim", ["tests/pipelines/ddim/test_ddim.py"]),
    (
        "models/unet_2d",
        [
            "tests/models/unets/test_models_unet_2d.py::TestUnet2DModel",
            "tests/models/unets/test_models_unet_2d.py::TestUnet2DModelTraining",
            "tests/models/unets/test_models_unet_2d.py::TestUnet2DModelMemory",
        ],
    ),
]
CONDITIONAL_SELECTIONS = [
    ("pipelines/dit", ["tests/pipelines/dit/test_dit.py"]),
    ("models/unet_2d_condition", ["tests/models/unets/test_models_unet_2d_condition.py"]),
    ("models/dit_transformer", ["tests/models/transformers/test_models_dit_transformer2d.py"]),
    ("models/sd3_transformer", ["tests/models/transformers/test_models_transformer_sd3.py"]),
    ("models/wan_transformer", ["tests/models/transformers/test_models_transformer_wan.py"]),
]
# fast tests of the text-conditioned pipelines: they load tiny tokenizers / text-encoder configs from the Hub
# (hf-internal-testing/tiny-random-*), so offline most of them report `offline` in every mode, the baseline too
TEXT_SELECTIONS = [
    ("pipelines/stable_diffusion", ["tests/pipelines/stable_diffusion/test_stable_diffusion.py"]),
    ("pipelines/stable_diffusion_xl", ["tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py"]),
    ("pipelines/stable_diffusion_3", ["tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py"]),
    ("pipelines/wan", ["tests/pipelines/wan/test_wan.py", "tests/pipelines/wan/test_wan_22.py"]),
]
SUITES = {
    "unet": UNET_SELECTIONS,
    "conditional": CONDITIONAL_SELECTIONS,
    "text": TEXT_SELECTIONS,
    "default": UNET_SELECTIONS + CONDITIONAL_SELECTIONS,
    "all": UNET_SELECTIONS + CONDITIONAL_SELECTIONS + TEXT_SELECTIONS,
}


def _file_of(test_id: str) -> str:
    return test_id.split("::", 1)[0]


def selection_of(test_file: str, selections) -> str:
    """The label of the selection a test file belongs to (`other` for test ids given by hand)."""
    for label, test_ids in selections:
        if any(_file_of(t) == test_file for t in test_ids):
            return label
    return "other"


def run_mode(mode: int, args, tests: list[str]) -> tuple[dict[str, tuple[str, str, str]], float]:
    """({test id: (outcome, first line of the failure message, test file)}, seconds) for one `MIXTURE_EXPERTS` mode."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    xml_path, log_path = out / f"experts_{mode}.xml", out / f"experts_{mode}.log"
    xml_path.unlink(missing_ok=True)
    python_path = [str(HERE), *(str(Path(p).resolve()) for p in args.deps if p)]
    if args.src:
        python_path.insert(0, str(Path(args.src).resolve()))
    env = dict(
        os.environ,
        MIXTURE_EXPERTS=str(mode),
        MIXTURE_ROUTING=args.routing,
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(python_path + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "mixture_plugin", "-q", "-rfE"]
    cmd += ["--tb=short", f"--junitxml={xml_path}", *shlex.split(args.pytest_args), *tests]
    print(f"== MIXTURE_EXPERTS={mode} routing={args.routing}: {' '.join(cmd[2:])}", flush=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        subprocess.run(cmd, cwd=args.tests_root, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    seconds = time.monotonic() - start
    last = log_path.read_text().strip().splitlines()[-1] if log_path.stat().st_size else "(no output)"
    print(f"{last}  [{seconds:.0f} s]", flush=True)
    results = {}
    if not xml_path.exists():
        return results, seconds
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        classname = case.get("classname", "")
        test_id = f"{classname.rsplit('.', 1)[-1]}::{case.get('name')}"
        module = classname.rsplit(".", 1)[0] if "." in classname else classname
        test_file = module.replace(".", "/") + ".py"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                message = (node.get("message") or "").strip().splitlines()[0][:160] if node.get("message") else ""
                if outcome == "skipped" and message.startswith(OFFLINE_REASON):
                    outcome = "offline"
                break
        results[test_id] = (outcome, message, test_file)
    return results, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests-root", required=True, help="folder that holds diffusers' extracted `tests/`")
    parser.add_argument(
        "--modes", type=int, nargs="+", default=[0, 1, 3], help="MIXTURE_EXPERTS values (0 = baseline)"
    )
    parser.add_argument("--routing", default="hard", help="MIXTURE_ROUTING for the mixture modes")
    parser.add_argument(
        "--suite",
        choices=sorted(SUITES),
        default="default",
        help="test selection when no test ids are given: `unet` (DDPM/DDIM pipelines, UNet2DModel model tests), "
        "`conditional` (DiT pipeline; UNet2DConditionModel/DiT/SD3/Wan transformer model tests), `text` (SD/SDXL/SD3/Wan "
        "pipeline fast tests, which need tiny tokenizers from the Hub), `default` (unet + conditional), `all`",
    )
    parser.add_argument("--deps", nargs="*", default=[], help="extra PYTHONPATH folders (diffusers' test deps)")
    parser.add_argument("--src", default=None, help="put this diffusers_experts source folder first on PYTHONPATH")
    parser.add_argument("--out", default="outputs/conformance", help="folder for JUnit XML and logs")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, one string, e.g. \"-k 'not Hub'\"")
    parser.add_argument("--all-rows", action="store_true", help="print every test, not only those that differ")
    parser.add_argument("tests", nargs="*", help="test ids relative to --tests-root (default: the --suite selection)")
    args = parser.parse_args()
    if not (Path(args.tests_root) / "tests").is_dir():
        parser.error(f"--tests-root {args.tests_root!r} has no `tests/` folder: extract diffusers' tests there.")
    selections = SUITES[args.suite] if not args.tests else SUITES["all"]  # labels for test ids given by hand too
    tests = args.tests or [t for _, test_ids in selections for t in test_ids]

    runs = {mode: run_mode(mode, args, tests) for mode in args.modes}
    results = {mode: per_mode for mode, (per_mode, _) in runs.items()}
    ids = sorted({test_id for per_mode in results.values() for test_id in per_mode})
    width = max((len(i) for i in ids), default=10)
    shown = "every test that ran" if args.all_rows else "tests whose outcome differs between modes (--all-rows: all)"
    print(f"\n{shown}:\n" + f"{'test':<{width}}  " + "  ".join(f"E={m:<6}" for m in args.modes))
    regressions, coverage_losses, early_failures = 0, 0, 0
    for test_id in ids:
        row = [results[m].get(test_id, ("-", "", ""))[0] for m in args.modes]
        if all(outcome in ("skipped", "offline") for outcome in row):
            continue
        if not args.all_rows and len(set(row)) == 1:
            continue
        print(f"{test_id:<{width}}  " + "  ".join(f"{outcome:<8}" for outcome in row))
        base = results[args.modes[0]].get(test_id, ("-", "", ""))[0] if args.modes[0] == 0 else "passed"
        for m in args.modes:
            outcome, message, _ = results[m].get(test_id, ("-", "", ""))
            if m and base == "passed" and outcome in ("FAILED", "ERROR", "offline"):
                regressions += 1
                print(f"{'':<{width}}    E={m}: {message}")
            elif m and base == "passed" and outcome == "skipped":
                coverage_losses += 1
                print(f"{'':<{width}}    E={m} skipped (passes on the baseline): {message}")
            elif m and base == "offline" and outcome in ("FAILED", "ERROR"):
                early_failures += 1
                print(f"{'':<{width}}    E={m} fails before the step that needs the Hub: {message}")

    # counts per selection and mode
    outcomes = ("passed", "FAILED", "ERROR", "skipped", "offline")
    labels = [label for label, _ in selections] + ["other"]
    print(f"\n{'selection':<30}" + "".join(f"{'E=' + str(m):>38}" for m in args.modes))
    for label in labels:
        cells, any_test = [], False
        for m in args.modes:
            counts = dict.fromkeys(outcomes, 0)
            for outcome, _, test_file in results[m].values():
                if selection_of(test_file, selections) == label:
                    counts[outcome] = counts.get(outcome, 0) + 1
                    any_test = True
            cells.append(
                f"{counts['passed']:>3} pass {counts['FAILED'] + counts['ERROR']:>2} fail "
                f"{counts['skipped']:>3} skip {counts['offline']:>3} offline"
            )
        if any_test:
            print(f"{label:<30}" + "".join(f"{cell:>38}" for cell in cells))
    for m in args.modes:
        counts = {}
        for outcome, _, _ in results[m].values():
            counts[outcome] = counts.get(outcome, 0) + 1
        print(
            f"MIXTURE_EXPERTS={m}: "
            + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
            + f" [{runs[m][1]:.0f} s]"
        )
    print(
        f"regressions (baseline passed, mixture failed/errored/offline): {regressions}; "
        f"coverage losses (baseline passed, mixture skipped): {coverage_losses}; "
        f"mixture failures in tests not runnable offline (baseline offline): {early_failures}"
    )
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
