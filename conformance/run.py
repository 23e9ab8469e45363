"""Run diffusers' own tests once per mixture mode (`MIXTURE_EXPERTS`) and print a per-test comparison.

    python conformance/run.py --tests-root /tmp/diffusers-tests --modes 0 1 3 [--out DIR] [-- TEST_IDS...]

Mode 0 is the baseline (plain `UNet2DModel`, plugin inert). Exit status 1 if a test that passes in the baseline
fails (or errors) with a mixture, 0 otherwise. Each mode writes `<out>/experts_<mode>.xml` (JUnit) and `.log`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


HERE = Path(__file__).resolve().parent
DEFAULT_TESTS = [
    "tests/pipelines/ddpm/test_ddpm.py",
    "tests/pipelines/ddim/test_ddim.py",
    "tests/models/unets/test_models_unet_2d.py::TestUnet2DModel",
    "tests/models/unets/test_models_unet_2d.py::TestUnet2DModelTraining",
    "tests/models/unets/test_models_unet_2d.py::TestUnet2DModelMemory",
]


def run_mode(mode: int, args, tests: list[str]) -> dict[str, tuple[str, str]]:
    """{test id: (outcome, first line of the failure message)} for one `MIXTURE_EXPERTS` mode."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    xml_path, log_path = out / f"experts_{mode}.xml", out / f"experts_{mode}.log"
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
    cmd += ["--tb=short", f"--junitxml={xml_path}", *tests]
    print(f"== MIXTURE_EXPERTS={mode} routing={args.routing}: {' '.join(cmd[2:])}", flush=True)
    with open(log_path, "w") as log:
        subprocess.run(cmd, cwd=args.tests_root, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    print(log_path.read_text().strip().splitlines()[-1] if log_path.stat().st_size else "(no output)", flush=True)
    results = {}
    if not xml_path.exists():
        return results
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                message = (node.get("message") or "").strip().splitlines()[0][:160] if node.get("message") else ""
                break
        results[test_id] = (outcome, message)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests-root", required=True, help="folder that holds diffusers' extracted `tests/`")
    parser.add_argument(
        "--modes", type=int, nargs="+", default=[0, 1, 3], help="MIXTURE_EXPERTS values (0 = baseline)"
    )
    parser.add_argument("--routing", default="hard", help="MIXTURE_ROUTING for the mixture modes")
    parser.add_argument("--deps", nargs="*", default=[], help="extra PYTHONPATH folders (diffusers' test deps)")
    parser.add_argument("--src", default=None, help="put this diffusers_experts source folder first on PYTHONPATH")
    parser.add_argument("--out", default="outputs/conformance", help="folder for JUnit XML and logs")
    parser.add_argument("tests", nargs="*", help=f"test ids relative to --tests-root (default: {DEFAULT_TESTS})")
    args = parser.parse_args()
    if not (Path(args.tests_root) / "tests").is_dir():
        parser.error(f"--tests-root {args.tests_root!r} has no `tests/` folder: extract diffusers' tests there.")
    tests = args.tests or DEFAULT_TESTS

    results = {mode: run_mode(mode, args, tests) for mode in args.modes}
    ids = sorted({test_id for per_mode in results.values() for test_id in per_mode})
    width = max((len(i) for i in ids), default=10)
    print("\n" + f"{'test':<{width}}  " + "  ".join(f"E={m:<6}" for m in args.modes))
    regressions = 0
    for test_id in ids:
        row = [results[m].get(test_id, ("-", ""))[0] for m in args.modes]
        if all(outcome == "skipped" for outcome in row):
            continue
        print(f"{test_id:<{width}}  " + "  ".join(f"{outcome:<8}" for outcome in row))
        base = results[args.modes[0]].get(test_id, ("-", ""))[0] if args.modes[0] == 0 else "passed"
        for m in args.modes:
            outcome, message = results[m].get(test_id, ("-", ""))
            if m and outcome in ("FAILED", "ERROR") and base == "passed":
                regressions += 1
                print(f"{'':<{width}}    E={m}: {message}")
    for m in args.modes:
        counts = {}
        for outcome, _ in results[m].values():
            counts[outcome] = counts.get(outcome, 0) + 1
        print(f"MIXTURE_EXPERTS={m}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
