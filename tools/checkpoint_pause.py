"""How long a checkpoint write pauses training, with and without the replay (issue 22 item 7).

Builds dreamerv2.py's agent at `--preset small` for dmc-cartpole-swingup, fills its replay with
`--agent-steps` agent steps of synthetic episodes (random 64x64x3 frames, 500 agent steps each:
cartpole's 1000 env steps at action repeat 2; torch.save does not compress, so random frames cost
what real ones do), then times `save_checkpoint` (write, flush, fsync, rename) into `--dir`:
checkpoint.pt alone, as at every evaluation, and checkpoint.pt plus replay.pt, as at the end, on
an interrupt and every --replay-checkpoint-every evaluations. Prints one line per case and a JSON
line. The disk of `--dir` decides the numbers; on a GPU the replay is also copied to the host.

    python tools/checkpoint_pause.py --agent-steps 5000 --repeats 3
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dreamerv2  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agent-steps", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    cli = parser.parse_args()

    args = dreamerv2.parse_args(["--preset", "small", "--env", "dmc-cartpole-swingup"])
    device = torch.device("cpu")
    agent = dreamerv2.Agent(args, 1, False, device)  # cartpole: one action dimension
    repeat = dreamerv2.action_repeat(args)
    replay = dreamerv2.Replay(dreamerv2.replay_slots(args.replay_capacity, args.total_steps, repeat,
                                                     args.batch_length),
                              (3, 64, 64), 1, args.seed, device, args.prioritize_ends)
    rng = np.random.default_rng(0)
    while replay.size < cli.agent_steps:
        n = min(501, cli.agent_steps - replay.size)  # 500 steps plus the first observation
        replay.add_episode(rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8),
                           rng.uniform(-1, 1, (n, 1)).astype(np.float32),
                           rng.standard_normal(n).astype(np.float32), np.ones(n, np.float32))
    counters = dict(env_steps=cli.agent_steps * repeat)

    folder = Path(cli.dir or tempfile.mkdtemp(prefix="checkpoint_pause_"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "checkpoint.pt"
    result = dict(agent_steps=replay.size, replay_capacity=replay.capacity, folder=str(folder))
    for case, with_replay in (("checkpoint_only", False), ("checkpoint_and_replay", True)):
        seconds = []
        for _ in range(cli.repeats):
            (folder / "replay.pt").unlink(missing_ok=True)
            start = time.perf_counter()
            dreamerv2.save_checkpoint(path, agent, replay if with_replay else None, counters, args)
            seconds.append(time.perf_counter() - start)
        replay_bytes = (folder / "replay.pt").stat().st_size if with_replay else 0
        result[case] = dict(seconds=statistics.median(seconds), all_seconds=seconds,
                            checkpoint_mb=path.stat().st_size / 2**20, replay_mb=replay_bytes / 2**20)
        print(f"{case}: {statistics.median(seconds):.3f} s (median of {cli.repeats}: "
              f"{', '.join(f'{s:.3f}' for s in seconds)}) | checkpoint.pt "
              f"{path.stat().st_size / 2**20:.1f} MiB | replay.pt {replay_bytes / 2**20:.1f} MiB", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
