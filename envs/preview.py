"""Render a PNG grid of what the agent sees, to check distractions by eye.

    python -m envs.preview --env dcs-walker-walk            # writes preview/dcs-walker-walk.png
    python -m envs.preview --env dcs-walker-walk robosuite-door-panda --out previews

Rows: one per distraction setting of the family (dcs-*: clean, then easy/medium/hard/background
dynamic and static; robosuite-*: one row per level and episode, since they are static per
episode; minigrid-*: one row per rendering change); columns: frames `--every` agent steps apart
under random actions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import envs


def rollout_frames(env_id: str, steps: int, every: int, *, seed: int, image_size: int, **kw):
    env = envs.make(env_id, seed=seed, image_size=image_size, **kw)
    try:
        env.action_space.seed(seed)
        obs, _ = env.reset(seed=seed)
        frames = [obs]
        for t in range(1, steps * every):
            obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
            if terminated or truncated:
                obs, _ = env.reset()
            if t % every == 0:
                frames.append(obs)
        return frames
    finally:
        env.close()


def settings(env_id: str):
    """(row label, make kwargs) pairs to show for an env id."""
    if env_id.startswith("dcs-"):
        rows = [("clean", dict(distraction="none"))]
        for dynamic in (True, False):
            tag = "dynamic" if dynamic else "static"
            rows += [(f"{lvl} {tag}", dict(distraction=lvl, dynamic=dynamic))
                     for lvl in ("easy", "medium", "hard", "background")]
        return rows
    if env_id.startswith("natural-"):
        return [("natural dynamic", dict(dynamic=True)), ("natural static", dict(dynamic=False)),
                ("natural val", dict(split="val"))]
    family = env_id.partition("-")[0]
    if family == "robosuite":  # static: show two episodes (seeds) per level
        return [(f"{lvl} ep{k}", dict(distraction=lvl, seed=k))
                for lvl in envs.FAMILY_LEVELS["robosuite"] for k in (0, 1)]
    if family in envs.FAMILY_LEVELS:
        return [(lvl, dict(distraction=lvl)) for lvl in envs.FAMILY_LEVELS[family]]
    return [("clean", {})]


def grid(env_id: str, steps: int = 6, every: int = 5, seed: int = 0, image_size: int = 64):
    """(rows, labels): a uint8 (H, W, 3) image and the row labels."""
    pad = 2
    rows, labels = [], []
    for label, kw in settings(env_id):
        kw = {"seed": seed, **kw}
        frames = rollout_frames(env_id, steps, every, image_size=image_size, **kw)
        row = np.concatenate([np.pad(f.transpose(1, 2, 0), ((pad, pad), (pad, pad), (0, 0)),
                                     constant_values=255) for f in frames], axis=1)
        rows.append(row)
        labels.append(label)
    return np.concatenate(rows, axis=0), labels


def save_png(image: np.ndarray, labels: list[str], path: Path, scale: int = 2):
    import PIL.Image
    import PIL.ImageDraw

    label_w = 110
    big = np.kron(image, np.ones((scale, scale, 1), np.uint8))
    canvas = PIL.Image.new("RGB", (big.shape[1] + label_w, big.shape[0]), "white")
    canvas.paste(PIL.Image.fromarray(big), (label_w, 0))
    draw = PIL.ImageDraw.Draw(canvas)
    row_h = big.shape[0] // len(labels)
    for i, text in enumerate(labels):
        draw.text((4, i * row_h + row_h // 2 - 5), text, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv=None):
    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = argparse.ArgumentParser(prog="python -m envs.preview", description=__doc__,
                                     formatter_class=Formatter)
    parser.add_argument("--env", nargs="+", default=["dcs-walker-walk"], help="env ids")
    parser.add_argument("--out", default="preview",
                        help="output FOLDER; each env is written to <out>/<env>.png")
    parser.add_argument("--steps", type=int, default=6, help="frames per row")
    parser.add_argument("--every", type=int, default=5, help="agent steps between frames")
    parser.add_argument("--seed", type=int, default=0, help="seed of the envs and random actions")
    parser.add_argument("--image-size", type=int, default=64, help="observation side in pixels")
    args = parser.parse_args(argv)
    if args.out.endswith(".png"):
        parser.error(f"--out is a folder (each env goes to <out>/<env>.png), got {args.out!r}")
    for env_id in args.env:
        image, labels = grid(env_id, args.steps, args.every, args.seed, args.image_size)
        path = Path(args.out) / f"{env_id}.png"
        save_png(image, labels, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
