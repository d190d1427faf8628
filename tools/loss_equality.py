"""Loss equality of a restructured script against an earlier version of it.

Runs each algorithm script twice with the same seed and flags, a short `--preset tiny` run on
`toy-reach-center` (replay, updates, acting and an evaluation, ~60 updates on one CPU thread), once
from this checkout and once from a reference checkout (e.g. `git worktree add /tmp/ref <commit>`),
and compares every logged number of the two metrics.jsonl files record by record, then every
tensor of the two final checkpoints' agents (networks and optimiser moments). A restructuring that
keeps the computation gives the same losses, gradient norms, returns and parameters (to 1e-6,
relative; 0 when bit-identical); wall-clock fields (time, SPS, updates per second) are not
compared, and text fields (e.g. a `videos` note) only listed.

    python tools/loss_equality.py --reference /tmp/ref [--algos dreamerv2 core] [--tolerance 1e-6]

Exit status 1 if any script differs; one line per script either way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ALGOS = ("dreamerv2", "core", "cvrl", "blast", "dreamingv2")
FLAGS = ["--preset", "tiny", "--env", "toy-reach-center", "--total-steps", "400", "--eval-every",
         "200", "--eval-episodes", "1", "--log-every", "50", "--seed", "3", "--save-model"]
SKIP = {"time", "charts/SPS", "charts/updates_per_second"}  # wall-clock readings


def run(checkout: Path, algo: str, workdir: Path) -> tuple[list[dict], dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(checkout)}
    done = subprocess.run([sys.executable, str(checkout / f"{algo}.py"), *FLAGS], cwd=workdir,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {checkout / algo}.py failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    (path,) = workdir.glob("runs/*/metrics.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    agent = torch.load(path.with_name("checkpoint.pt"), map_location="cpu", weights_only=False)["agent"]
    return records, flatten(agent)


def flatten(state, prefix: str = "") -> dict:
    """{dotted key: tensor} of every tensor in a nested state dict (networks, optimiser moments)."""
    if torch.is_tensor(state):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(
        state, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in flatten(value, f"{prefix}.{key}").items()}


def compare_states(new: dict, old: dict) -> tuple[float, list[str]]:
    """Largest relative difference over the tensors of both agents, and any that differ in name
    or shape."""
    problems = [f"checkpoint tensor {k} only in {side}" for side, a, b in (("new", new, old),
                                                                           ("old", old, new))
                for k in sorted(set(a) - set(b))][:10]
    worst = 0.0
    for key in sorted(set(new) & set(old)):
        a, b = new[key].double(), old[key].double()
        if a.shape != b.shape:
            problems.append(f"checkpoint tensor {key}: shape {tuple(a.shape)} against {tuple(b.shape)}")
            continue
        if a.numel():
            worst = max(worst, ((a - b).abs() / b.abs().clamp_min(1.0)).max().item())
    return worst, problems


def compare(new: list[dict], old: list[dict], tolerance: float) -> tuple[float, list[str]]:
    """Largest relative difference over all shared numbers, and the differences in structure."""
    problems, worst = [], 0.0
    if len(new) != len(old):
        problems.append(f"{len(new)} records against {len(old)}")
    for i, (a, b) in enumerate(zip(new, old)):
        keys_a = {k for k in set(a) - SKIP if not isinstance(a[k], str)}
        keys_b = {k for k in set(b) - SKIP if not isinstance(b[k], str)}
        if keys_a != keys_b:
            problems.append(f"record {i} (step {a.get('step')}): only new {sorted(keys_a - keys_b)}, "
                            f"only old {sorted(keys_b - keys_a)}")
        for key in keys_a & keys_b:
            x, y = a[key], b[key]
            if isinstance(x, (int, float)) and isinstance(y, (int, float)):
                diff = abs(x - y) / max(1.0, abs(y))
                worst = max(worst, diff)
                if diff > tolerance and len(problems) < 10:
                    problems.append(f"record {i} step {a['step']} {key}: {x!r} against {y!r}")
    return worst, problems


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, type=Path, help="checkout of the earlier version")
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args()
    if not (args.reference / "dreamerv2.py").is_file():
        raise SystemExit(f"error: --reference {args.reference}: no dreamerv2.py there; give a checkout "
                         "of this repository (git worktree add <dir> <commit>)")
    failed = False
    for algo in args.algos:
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            (new, new_agent), (old, old_agent) = (run(ROOT, algo, Path(a)),
                                                  run(args.reference.resolve(), algo, Path(b)))
        worst, problems = compare(new, old, args.tolerance)
        state_worst, state_problems = compare_states(new_agent, old_agent)
        if state_worst > args.tolerance:
            state_problems.append(f"checkpoint tensors differ by up to {state_worst:.2e}")
        problems += state_problems
        failed |= bool(problems)
        texts = sorted({k for r in new for k, v in r.items() if isinstance(v, str)}
                       ^ {k for r in old for k, v in r.items() if isinstance(v, str)})
        print(f"{algo}: {len(new)} records, largest relative difference {worst:.2e}; "
              f"{len(new_agent)} checkpoint tensors, largest relative difference {state_worst:.2e}"
              f"{'; text fields in one only: ' + ', '.join(texts) if texts else ''} "
              f"{'FAIL' if problems else 'ok'}", flush=True)
        for problem in problems:
            print(f"  {problem}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
