"""Measure milliseconds per agent step (random actions, 64x64) for each env family.

    python -m envs.speed [--steps 200] [--env dmc-walker-walk ...]

Prints a markdown table: ms per agent step and per simulator step (agent step / action repeat).
"""

from __future__ import annotations

import argparse
import time

import envs

DEFAULT_CASES = [
    ("toy-reach", "none"), ("dmc-walker-walk", "none"), ("dcs-walker-walk", "easy"),
    ("dcs-walker-walk", "medium"), ("dcs-walker-walk", "hard"),
    ("dcs-walker-walk", "background"), ("natural-walker-walk", "none"),
    ("dmc-cartpole-swingup", "none"), ("dcs-cartpole-swingup", "medium"),
    ("manipulation-reach-duplo", "none"), ("robosuite-door-panda", "none"),
    ("robosuite-door-panda", "color-lighting-camera"), ("robosuite-lift-jaco", "none"),
    ("pybullet-boxpush", "none"), ("minigrid-dynamic-obstacles-6x6", "none"),
    ("minigrid-dynamic-obstacles-6x6", "video"),
]


def ms_per_step(env_id: str, distraction: str, steps: int, image_size: int = 64) -> tuple[float, int]:
    env = envs.make(env_id, distraction=distraction, image_size=image_size)
    try:
        env.action_space.seed(0)
        env.reset()
        for _ in range(5):  # warm-up: GL context, first video decode
            env.step(env.action_space.sample())
        start, sim_steps = time.perf_counter(), 0
        for _ in range(steps):
            *_, terminated, truncated, info = env.step(env.action_space.sample())
            sim_steps += info["env_steps"]
            if terminated or truncated:
                env.reset()
        elapsed = time.perf_counter() - start
        return 1000 * elapsed / steps, round(sim_steps / steps)
    finally:
        env.close()


def parse_case(text: str) -> tuple[str, str]:
    """'dcs-walker-walk:hard' -> ('dcs-walker-walk', 'hard'); the colons of gym:<id> stay."""
    levels = {level for family in envs.FAMILY_LEVELS.values() for level in family}
    env_id, _, level = text.rpartition(":")
    return (env_id, level) if env_id and level in levels else (text, "none")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--env", nargs="*", help="env ids (distraction after a colon: dcs-walker-walk:hard)")
    args = parser.parse_args(argv)
    cases = [parse_case(e) for e in args.env] if args.env else DEFAULT_CASES
    print("| env | distraction | action repeat | ms / agent step | ms / simulator step |")
    print("|---|---|---|---|---|")
    for env_id, distraction in cases:
        ms, repeat = ms_per_step(env_id, distraction, args.steps)
        print(f"| `{env_id}` | {distraction} | {repeat} | {ms:.2f} | {ms / repeat:.2f} |", flush=True)


if __name__ == "__main__":
    main()
