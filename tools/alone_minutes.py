"""How long one `./benchmark.sh cpu` run of each script would take alone on this machine, from two
short measurements instead of a whole run: the seconds per update alone (`--measure-updates 10`,
torch's default threads, nothing else running) and the env steps per second of acting with the
agent's own policy (the same command's `env_steps_per_second`), times what a finished run did (its
updates, from results/cpu/runs/<algo>/<task>/seed*; its env steps: the budget plus the evaluation
episodes). Run it with nothing else on the machine:

    MUJOCO_GL=egl python tools/alone_minutes.py [--algos dreamerv2 blast] \
        [--task dcs-cartpole-swingup]

Leaves out start-up, prefill's random actions (acted as fast as the policy's) and checkpoint writes;
checked against a whole run alone in the README ("Learning on a CPU, measured").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchmark  # noqa: E402

EPISODE_ENV_STEPS = 1000  # a control-suite episode, whatever the action repeat


def measure(script: Path, env: str, flags: list[str]) -> dict:
    """`<script> --preset small --measure-updates 10` on `env`: its JSON result line."""
    cmd = [sys.executable, str(script), "--preset", "small", "--env", env, *flags,
           "--measure-updates", "10"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl")))
    if out.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed (exit {out.returncode}): "
                         f"{benchmark.last_error_line(out.stderr or out.stdout)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def estimate(updates: float, seconds_per_update: float, env_steps: int, env_sps: float) -> dict:
    """Minutes of updates, of acting (training and evaluation episodes) and their sum."""
    update_min = updates * seconds_per_update / 60
    acting_min = env_steps / env_sps / 60
    return dict(update_min=update_min, acting_min=acting_min, minutes=update_min + acting_min)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", nargs="+", help="algorithms (default: every script present)")
    parser.add_argument("--task", default="dmc-cartpole-swingup",
                        choices=[t for t in benchmark.CPU_TASKS if not t.startswith("minigrid")],
                        help="a control-suite column of the cpu suite (MiniGrid episodes vary)")
    parser.add_argument("--results", type=Path, default=ROOT / "results",
                        help="where the finished runs are (<results>/cpu/runs/<algo>/<task>)")
    args = parser.parse_args(argv)
    env, flags, steps, every, episodes = benchmark.CPU_TASKS[args.task]
    env_steps = steps + steps // every * episodes * EPISODE_ENV_STEPS
    updates = {}
    for algo, script in benchmark.available_algorithms(args.algos).items():
        runs = args.results / "cpu" / "runs" / algo / args.task
        counts = [benchmark.updates_made(benchmark.run_records(seed))
                  for seed in runs.glob("seed*")]
        counts = [c for c in counts if math.isfinite(c)]  # NaN: a run that logged no update
        if not counts:
            raise SystemExit(f"error: no run of {algo} under {runs}: run ./benchmark.sh cpu "
                             f"--algos {algo} --tasks {args.task} first, or pass --results")
        updates[algo] = (script, max(counts))
    print(f"| script | updates in a run | s / update alone | acting env steps / s | minutes: "
          f"updates + acting ({env_steps:,} env steps) = alone |\n|---|---|---|---|---|")
    for algo, (script, count) in updates.items():
        r = measure(script, env, flags)
        e = estimate(count, r["seconds_per_update"], env_steps, r["env_steps_per_second"])
        print(f"| `{algo}.py` | {count:,.0f} | {r['seconds_per_update']:.2f} | "
              f"{r['env_steps_per_second']:.0f} | {e['update_min']:.0f} + {e['acting_min']:.0f} = "
              f"{e['minutes']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
