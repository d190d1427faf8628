"""Seconds per update of each algorithm script here against a reference checkout of an earlier
version, both in one process, updates interleaved (old, new, old, new, ...) on the same replayed
batch of random frames at `--preset small`, one CPU thread: the machine's load hits both alike,
which two processes side by side (tools/speed_against.sh) do not guarantee.

    python tools/interleaved_speed.py --reference /tmp/ref [--algos core cvrl] [--updates 8]

The reference scripts are those before the read-first restructuring (commit f918f2d): their Agent
takes (args, action_dim[, discrete], device), and CoRe's took batches already cropped (its replay
cropped while sampling; now its update crops, so its figure here includes the crop).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
ALGOS = ("dreamerv2", "core", "cvrl", "blast", "dreamingv2")


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, type=Path)
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--updates", type=int, default=8)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    cpu, space = torch.device("cpu"), gym.spaces.Box(-1, 1, (1,), np.float32)
    for algo in opts.algos:
        old = load(f"{algo}_reference", opts.reference / f"{algo}.py")
        new = load(f"{algo}_here", ROOT / f"{algo}.py")
        old_args = old.parse_args(["--preset", "small"])
        args, settings = new.parse_args(["--preset", "small"])
        old_agent = (old.Agent(old_args, 1, cpu) if algo in ("core", "cvrl")
                     else old.Agent(old_args, 1, False, cpu))
        agent = new.Agent(args, space, new.Compute(settings, 1))
        length = getattr(args, "batch_length", None) or args.seq_len
        side = args.render_size if algo == "core" else 64
        replay = new.Replay(length + 1, (3, side, side), 1, seed=0)
        rng = np.random.default_rng(0)
        replay.add_episode(rng.integers(0, 255, (length + 1, 3, side, side), dtype=np.uint8),
                           rng.uniform(-1, 1, (length + 1, 1)).astype(np.float32),
                           rng.random(length + 1), np.ones(length + 1))
        batch = new.to_torch(replay.sample(args.batch_size, length), cpu)
        old_batch = batch
        if algo == "core":  # the reference's update took cropped frames without is_first
            cropped = new.random_crop(dict(batch), np.random.default_rng(1), args.crop_size)
            old_batch = {k: v for k, v in cropped.items() if k != "is_first"}
        times = {"reference": [], "here": []}
        for i in range(opts.updates + 2):
            for name, a, b in (("reference", old_agent, old_batch), ("here", agent, batch)):
                start = time.perf_counter()
                a.update(b)
                if i >= 2:  # two warm-ups each
                    times[name].append(time.perf_counter() - start)
        ref, here = (float(np.median(times[k])) for k in ("reference", "here"))
        print(f"{algo}: reference {ref:.3f} s/update, here {here:.3f} (median of {opts.updates} "
              f"interleaved, {100 * (here / ref - 1):+.0f}%)", flush=True)


if __name__ == "__main__":
    main()
