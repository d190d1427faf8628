"""Environments for reconstruction-free world-model RL: `envs.make(env_id, ...)`.

Every env is a Gymnasium env with uint8 `(3, image_size, image_size)` pixel observations and a
`Box` action space in [-1, 1]; `info["env_steps"]` is the number of simulator steps the call took
(the action repeat, or fewer at the end of an episode).

Env ids (`<family>-<domain>-<task>`):

| id                      | what the agent sees                                                |
|-------------------------|--------------------------------------------------------------------|
| `dmc-<domain>-<task>`   | the clean DeepMind Control Suite task (any suite task)             |
| `dcs-<domain>-<task>`   | Distracting Control Suite: `distraction` none/easy/medium/hard     |
|                         | (background video + camera + colour) or `background` (video only)  |
| `natural-<domain>-<task>` | CVRL's Natural Mujoco: video pixels behind the agent              |
| `toy-reach`             | a dot to move onto a random target; numpy-rendered, for tests      |
| `toy-reach-center`      | the same with the target always at the centre: CPU learning checks |
"""

from __future__ import annotations

import difflib

from envs.distractions import LEVELS, NUM_VIDEOS, SCALE

FAMILIES = ("dmc", "dcs", "natural", "toy")
ID_FORMS = ("dmc-<domain>-<task>, dcs-<domain>-<task>, natural-<domain>-<task>, toy-reach, "
            "toy-reach-center")
SPLITS = ("train", "val")

__all__ = ["make", "FAMILIES", "LEVELS", "default_action_repeat"]


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def default_action_repeat(env_id: str) -> int:
    """The per-task action repeat `make` uses when `action_repeat=None`."""
    from envs.dmc import ACTION_REPEAT, DEFAULT_ACTION_REPEAT

    family, _, rest = env_id.partition("-")
    if family == "toy":
        return 1
    return ACTION_REPEAT.get(rest.partition("-")[0], DEFAULT_ACTION_REPEAT)


def _parse_control_id(env_id: str, family: str, rest: str) -> tuple[str, str]:
    from envs.dmc import suite_tasks

    domain, _, task = rest.partition("-")
    tasks = suite_tasks()
    if domain not in tasks:
        raise ValueError(f"unknown domain {domain!r} in env {env_id!r}{_suggest(domain, tasks)}; "
                         f"known domains: {', '.join(sorted(tasks))}")
    if task not in tasks[domain]:
        raise ValueError(f"unknown task {task!r} for domain {domain!r} in env {env_id!r}"
                         f"{_suggest(task, tasks[domain])}; known: "
                         + ", ".join(f"{family}-{domain}-{t}" for t in tasks[domain]))
    return domain, task


def make(env_id: str, *, distraction: str = "none", dynamic: bool = True, seed: int = 0,
         image_size: int = 64, action_repeat: int | None = None, split: str = "train",
         video_dir=None, time_limit: int | None = None):
    """Build an environment.

    Args:
        env_id: `dmc-<domain>-<task>`, `dcs-<domain>-<task>`, `natural-<domain>-<task>`,
            `toy-reach` or `toy-reach-center` (e.g. `dcs-walker-walk`).
        distraction: for `dcs-*`: `none`, `easy`, `medium`, `hard` (Distracting Control Suite:
            camera and colour scale 0.1 / 0.2 / 0.3, 4 / 8 / all background videos) or
            `background` (all videos, no camera or colour change). Other families: `none`.
        dynamic: distractions move during the episode (video plays back and forth, camera and
            colours drift); False holds one frame, pose and colour set per episode.
        seed: seeds the task and the distractions; `reset(seed=...)` reseeds.
        image_size: side of the square observation.
        action_repeat: simulator steps per action; None uses the per-task literature default
            (ball_in_cup 4, cartpole 8, cheetah 4, finger 2, reacher 4, walker 2, others 2).
        split: `train` or `val` background videos (disjoint sets).
        video_dir: DAVIS 2017 folder or a folder of video files; None uses the built-in pool.
        time_limit: episode length in simulator steps before action repeat; None uses the
            family default (1000 for the control suite, 50 for toy-reach).
    """
    if not isinstance(env_id, str) or "-" not in env_id:
        raise ValueError(f"unknown env {env_id!r}; known: {ID_FORMS}")
    family, _, rest = env_id.partition("-")
    if family not in FAMILIES:
        raise ValueError(f"unknown env family {family!r} in {env_id!r}{_suggest(family, FAMILIES)};"
                         f" known: {ID_FORMS}")
    if distraction not in LEVELS:
        raise ValueError(f"unknown distraction {distraction!r}{_suggest(distraction, LEVELS)}; "
                         f"known: {', '.join(LEVELS)}")
    if family != "dcs" and distraction != "none":
        raise ValueError(f"distraction={distraction!r} applies to dcs-* envs only; {env_id!r} takes "
                         f"distraction='none' (try 'dcs-{rest}')")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if action_repeat is None:
        action_repeat = default_action_repeat(env_id)
    if action_repeat < 1 or image_size < 8:
        raise ValueError(f"action_repeat must be >= 1 and image_size >= 8, got {action_repeat}, "
                         f"{image_size}")

    if family == "toy":
        if rest not in ("reach", "reach-center"):
            raise ValueError(f"unknown env {env_id!r}; the toy family has 'toy-reach' and "
                             "'toy-reach-center'")
        from envs.toy import ToyReach

        return ToyReach(seed=seed, image_size=image_size, action_repeat=action_repeat,
                        time_limit=time_limit or 50, fixed_target=rest == "reach-center")

    from envs import distractions as dist
    from envs.dmc import DMCPixels
    from envs.videos import clips_for_level, video_pool

    domain, task = _parse_control_id(env_id, family, rest)
    layers = []
    if family == "dcs" and distraction != "none":
        clips = clips_for_level(video_pool(split, video_dir), NUM_VIDEOS[distraction])
        layers.append(dist.SkyboxVideo(clips, dynamic, dist.ground_alpha(domain)))
        if distraction in SCALE:
            layers.append(dist.CameraShake(SCALE[distraction], dynamic, domain,
                                           camera_id=2 if domain == "quadruped" else 0))
            layers.append(dist.ColorDrift(SCALE[distraction], dynamic))
    elif family == "natural":
        layers.append(dist.NaturalBackground(video_pool(split, video_dir), image_size, dynamic))
    return DMCPixels(domain, task, seed=seed, image_size=image_size, action_repeat=action_repeat,
                     time_limit=time_limit or 1000, distractions=layers)
