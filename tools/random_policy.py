"""The uniformly random policy, measured like an agent on the cpu suite's task columns.

    OMP_NUM_THREADS=1 MUJOCO_GL=egl python tools/random_policy.py \
        [--columns dmc-cartpole-swingup ...] [--seeds 1 2 3 4 5] [--rounds 7 8 9] [--episodes N]

Every column of `benchmark.CPU_TASKS` (or any env id, `<env>[@<distraction>]`) is played with
uniformly random actions on the env the agents are evaluated on:
`envs.make(env, distraction=<the column's level>, dynamic=True, seed=<run seed>, image_size=64,
action_repeat=envs.default_action_repeat(env), split="val")` (8 for cartpole). Episode j of
evaluation round e of run seed s is reset with the scripts' evaluation seed
`episode_seed(s, "eval", e * 10_000 + j)` (a child of `SeedSequence(s)`, as in every script), so
the random policy starts from the very states (and background videos) the agents'
evaluations in those rounds start from. Its actions come from `np.random.default_rng(<that episode
seed>)`, a generator of its own per episode: uniform over the Box in [-1, 1] for the control suite,
uniform over the Discrete actions for MiniGrid; the episode lasts as long as an evaluation's (the
env's time limit, or until it terminates). The defaults: run seeds 1-5 x rounds 7, 8 and 9 (the
last three evaluations of a run: 80K, 90K and 100K env steps for cartpole, 40K-50K for MiniGrid)
x the column's evaluation episodes (5 for cartpole, 10 for MiniGrid): 75 episodes per cartpole
column, 150 for MiniGrid.

Writes `results/cpu/random_policy.json` (the columns it measured replace theirs, others are kept):
per column the episodes' returns and lengths, mean, SD, SE (SD / sqrt(n)), n, the run seeds,
rounds and episodes per round, the env's settings and the command. `./benchmark.sh report cpu`
reads it (docs/benchmark.md, "The CPU protocol").
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import benchmark  # noqa: E402
import envs  # noqa: E402

OUT = ROOT / "results" / "cpu" / "random_policy.json"
EVAL_STREAM = 1  # the scripts' STREAMS["eval"]: episode seeds are SeedSequence(seed, (1, index))


def episode_seed(seed: int, index: int) -> int:
    """The scripts' `episode_seed(seed, "eval", index)`: evaluation round e, episode j is index
    e * 10_000 + j."""
    return int(np.random.SeedSequence(seed, spawn_key=(EVAL_STREAM, index)).generate_state(1)[0])


def column_settings(column: str) -> dict:
    """The env of a cpu-suite column (`benchmark.CPU_TASKS`), or of `<env>[@<distraction>]` for
    any other env id: env id, distraction level, action repeat."""
    if column in benchmark.CPU_TASKS:
        env, flags = benchmark.CPU_TASKS[column][:2]
        distraction = (flags[flags.index("--distraction") + 1] if "--distraction" in flags
                       else "none")
    else:
        env, _, distraction = column.partition("@")
        distraction = distraction or "none"
    return dict(env=env, distraction=distraction, dynamic=True,
                action_repeat=envs.default_action_repeat(env), image_size=64, split="val")


def play(column: str, seeds: list[int], rounds: list[int], episodes: int) -> dict:
    """Random-action episodes of one column: run seed x evaluation round x episode, in that
    order."""
    settings = column_settings(column)
    returns, lengths = [], []
    for seed in seeds:
        make = {k: v for k, v in settings.items() if k != "env"}
        env = envs.make(settings["env"], seed=seed, **make)
        discrete = hasattr(env.action_space, "n")
        try:
            for round_ in rounds:
                for j in range(episodes):
                    ep_seed = episode_seed(seed, round_ * 10_000 + j)
                    rng = np.random.default_rng(ep_seed)
                    env.reset(seed=ep_seed)
                    total, steps, done = 0.0, 0, False
                    while not done:
                        if discrete:
                            action = int(rng.integers(env.action_space.n))
                        else:
                            action = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
                        _, reward, terminated, truncated, _ = env.step(action)
                        total, steps = total + float(reward), steps + 1
                        done = terminated or truncated
                    returns.append(total)
                    lengths.append(steps)
        finally:
            env.close()
    values = np.asarray(returns, float)
    sd = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    return dict(settings, returns=returns, lengths=lengths, n=len(returns),
                mean=float(values.mean()), sd=sd, se=sd / math.sqrt(len(values)),
                seeds=seeds, rounds=rounds, episodes_per_round=episodes,
                episode_seeds="episode_seed(seed, 'eval', round * 10_000 + j) for seed in seeds, "
                              "round in rounds, j < episodes_per_round",
                actions="np.random.default_rng(episode seed): uniform over the action space")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--columns", nargs="+", default=list(benchmark.CPU_TASKS),
                        help="cpu-suite columns, or any env id as <env>[@<distraction>] "
                             "(default: every column of benchmark.CPU_TASKS)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5],
                        help="run seeds whose evaluation episodes are played")
    parser.add_argument("--rounds", nargs="+", type=int, default=[7, 8, 9],
                        help="evaluation rounds (0-based: round 9 is a cartpole run's evaluation "
                             "at 100K env steps) whose episodes are played")
    parser.add_argument("--episodes", type=int, default=None,
                        help="episodes per round (default: the column's evaluation episodes, "
                             "CPU_TASKS; 5 for other envs)")
    parser.add_argument("--out", type=Path, default=OUT, help="JSON file (other columns kept)")
    args = parser.parse_args(argv)
    saved = json.loads(args.out.read_text()) if args.out.is_file() else {}
    command = "python tools/random_policy.py " + " ".join(shlex.quote(a) for a in (
        sys.argv[1:] if argv is None else argv))
    for column in args.columns:
        start = time.time()
        try:
            episodes = args.episodes or (benchmark.CPU_TASKS[column][4]
                                         if column in benchmark.CPU_TASKS else 5)
            result = play(column, args.seeds, args.rounds, episodes)
        except ValueError as error:  # an unknown env or distraction: envs.make says which
            raise SystemExit(f"error: column {column!r}: {error}")
        result.update(command=command.strip(), seconds=round(time.time() - start, 1),
                      date=time.strftime("%Y-%m-%d %H:%M"))
        saved[column] = result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(saved, indent=1) + "\n")  # after every column
        print(f"{column}: {result['mean']:.1f} ± {result['se']:.1f} (SD {result['sd']:.1f}, "
              f"n {result['n']}) in {result['seconds']:.0f} s", flush=True)
    print(f"wrote {args.out}")
    return saved


if __name__ == "__main__":
    main()
