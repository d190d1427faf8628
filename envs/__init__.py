"""Environments for reconstruction-free world-model RL: `envs.make(env_id, ...)`.

Every env is a Gymnasium env with uint8 `(3, image_size, image_size)` pixel observations (a dict
with `image` and `proprio` for `robosuite-*` with `proprio=True`) and a `Box` action space in
[-1, 1] (`Discrete` for `minigrid-*`, and for `gym:` or registered envs that act so);
`info["env_steps"]` is the number of simulator steps the call took (the action repeat, or fewer at
the end of an episode).

| id                          | what the agent sees                           | `distraction`         |
|-----------------------------|-----------------------------------------------|-----------------------|
| `dmc-<domain>-<task>`       | the clean DeepMind Control Suite task         | none                  |
| `dcs-<domain>-<task>`       | Distracting Control Suite: video background,  | none, easy, medium,   |
|                             | camera and colour changes                     | hard, background      |
| `natural-<domain>-<task>`   | CVRL's Natural Mujoco: video behind the agent | none                  |
| `manipulation-<task>`       | dm_control.manipulation, e.g. `reach-duplo`   | none                  |
| `robosuite-<task>-<robot>`  | robosuite (CoRe Sec. 3.4), e.g. `door-panda`  | none, color-lighting, |
|                             |                                               | color-lighting-camera |
| `pybullet-boxpush`          | CVRL's box pushing, with moving shadows       | none                  |
| `minigrid-<name>`           | MiniGrid from above, BLAST's 100-step return  | none, color_direction,|
|                             | (e.g. `minigrid-dynamic-obstacles-6x6`)       | smaller_agent,        |
|                             |                                               | random_frames, video  |
| `toy-reach`                 | a dot to move onto a random target (tests)    | none                  |
| `toy-reach-center`          | the same, target at the centre (CPU checks)   | none                  |
| `gym:<id>`                  | any Gymnasium id that renders `rgb_array`,    | none                  |
|                             | e.g. `gym:CartPole-v1` (docs/own-env.md)      |                       |
| a name given to `register`  | your own pixel env (docs/own-env.md)          | what it takes         |

`envs.register(name, factory, action_repeat=1)` adds an env of your own under `name`.

Without a display (Linux, `DISPLAY` and `WAYLAND_DISPLAY` unset) and without `MUJOCO_GL`, importing
`envs` sets `MUJOCO_GL=egl` (`osmesa` if only OSMesa is installed) and says so once on stderr:
MuJoCo would otherwise fail at the first render. A `MUJOCO_GL` of yours is left as it is.
"""

from __future__ import annotations

import ctypes
import difflib
import os
import re
import sys


def _loadable(*libraries: str) -> bool:
    for library in libraries:
        try:
            ctypes.CDLL(library)
            return True
        except OSError:
            pass
    return False


def _headless_gl():
    """No display and MUJOCO_GL unset: MuJoCo would look for a window system and end the first
    render in 'an OpenGL platform library has not been loaded'. Choose a headless one before
    mujoco is imported (it reads MUJOCO_GL once, at import). Then MUJOCO_GL is set, so the notice
    comes once per process, and child processes inherit the choice silently."""
    if (not sys.platform.startswith("linux") or os.environ.get("MUJOCO_GL")
            or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return
    osmesa_only = (not _loadable("libEGL.so.1", "libEGL.so")
                   and _loadable("libOSMesa.so.8", "libOSMesa.so.6", "libOSMesa.so"))
    backend = "osmesa" if osmesa_only else "egl"
    os.environ["MUJOCO_GL"] = backend
    print(f"envs: no display and MUJOCO_GL unset: rendering with MUJOCO_GL={backend} "
          "(set MUJOCO_GL to choose)", file=sys.stderr)


_headless_gl()

# After the GL choice: nothing may import mujoco before it.
from envs import own  # noqa: E402
from envs.distractions import LEVELS, NUM_VIDEOS, SCALE  # noqa: E402

FAMILIES = ("dmc", "dcs", "natural", "manipulation", "robosuite", "pybullet", "minigrid", "toy")
ID_FORMS = ("dmc-<domain>-<task>, dcs-<domain>-<task>, natural-<domain>-<task>, "
            "manipulation-<task>, robosuite-<task>-<robot>, pybullet-boxpush, minigrid-<name>, "
            "toy-reach, toy-reach-center, gym:<gymnasium id>")
# Valid `distraction` values per family; families not listed take only 'none'.
# (`LEVELS` is the Distracting Control Suite's list.)
FAMILY_LEVELS = {
    "dcs": LEVELS,
    "robosuite": ("none", "color-lighting", "color-lighting-camera"),
    "minigrid": ("none", "color_direction", "smaller_agent", "random_frames", "video"),
}
SPLITS = ("train", "val")
# name -> (factory, default action repeat), filled by `register`.
REGISTERED: dict[str, tuple] = {}

__all__ = ["make", "register", "FAMILIES", "FAMILY_LEVELS", "LEVELS", "REGISTERED",
           "default_action_repeat", "video_source"]


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _known_forms() -> str:
    mine = ", ".join(REGISTERED) or "none yet"
    return f"{ID_FORMS}, or a name given to envs.register (registered: {mine})"


def register(name: str, factory, *, action_repeat: int = 1):
    """Make `name` an env id of `make` (and so of every script's --env) for this process.

    `factory` is called with those of make's `seed`, `image_size`, `distraction`, `dynamic`, `split`,
    `time_limit` and `video_dir` that its signature names (`time_limit` and `video_dir` only when
    given) and returns a Gymnasium env with uint8 (3, image_size, image_size) observations and a
    Box or Discrete action space, one simulator step per `step`. `make` checks the spaces, rescales
    Box actions to [-1, 1], applies the action repeat (`action_repeat` here is the default) and
    seeds the first reset. Registering a name again replaces its factory."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"cannot register {name!r}: a name is letters, digits, '-', '_' and '.' "
                         "(it names run folders)")
    family = name.partition("-")[0]
    if family in FAMILIES:
        raise ValueError(f"cannot register {name!r}: it collides with the built-in {family}-* "
                         f"family; choose a name that does not start with "
                         f"{', '.join(f + '-' for f in FAMILIES)}")
    if not callable(factory):
        raise ValueError(f"cannot register {name!r}: the factory must be callable, got "
                         f"{type(factory).__name__}")
    if not isinstance(action_repeat, int) or action_repeat < 1:
        raise ValueError(f"cannot register {name!r}: action_repeat must be an int >= 1, got "
                         f"{action_repeat!r}")
    REGISTERED[name] = (factory, action_repeat)


def default_action_repeat(env_id: str) -> int:
    """The action repeat `make` uses when `action_repeat=None`."""
    from envs.dmc import ACTION_REPEAT, DEFAULT_ACTION_REPEAT

    if env_id in REGISTERED:
        return REGISTERED[env_id][1]
    family, _, rest = env_id.partition("-")
    if family not in ("dmc", "dcs", "natural"):
        return 1  # robosuite (20 Hz), box pushing (24 Hz), manipulation (25 Hz), grids, toys, gym:
    return ACTION_REPEAT.get(rest.partition("-")[0], DEFAULT_ACTION_REPEAT)


def video_source(env_id: str, distraction: str = "none", video_dir=None) -> str:
    """Where the background videos of this env come from, for run headers and tables: 'none' (no
    video in the frames), the `video_dir` given, or 'built-in pool' (envs.videos; not DAVIS).
    An env of `register` uses `video_dir` if its factory takes one; `gym:` ids use none."""
    if env_id in REGISTERED:
        takes = "video_dir" in own.factory_parameters(REGISTERED[env_id][0])
        return str(video_dir) if video_dir and takes else "none"
    family = env_id.partition("-")[0]
    uses_videos = (family == "natural" or (family == "dcs" and distraction != "none")
                   or (family == "minigrid" and distraction in ("random_frames", "video")))
    if not uses_videos:
        return "none"
    return str(video_dir) if video_dir else "built-in pool"


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
         video_dir=None, time_limit: int | None = None, proprio: bool = False,
         render_shape: tuple[int, int] | None = None):
    """Build an environment.

    Args:
        env_id: one of the forms in the module docstring (e.g. `dcs-walker-walk`), `gym:<id>`
            or a name given to `register`.
        distraction: `none`, or for `dcs-*`: `easy`, `medium`, `hard` (Distracting Control
            Suite: camera and colour scale 0.1 / 0.2 / 0.3, 4 / 8 / all background videos) or
            `background` (all videos, no camera or colour change); for `robosuite-*`:
            `color-lighting` or `color-lighting-camera` (static, resampled every episode); for
            `minigrid-*`: `color_direction`, `smaller_agent`, `random_frames` or `video`;
            for a registered env: whatever its factory's `distraction` argument takes.
        dynamic: DCS distractions move during the episode (video plays back and forth, camera
            and colours drift); False holds one frame, pose and colour set per episode.
        seed: seeds the task and the distractions; `reset(seed=...)` reseeds.
        image_size: side of the square observation.
        action_repeat: simulator steps per action; None uses the per-task literature default
            (ball_in_cup 4, cartpole 8, cheetah 4, finger 2, reacher 4, walker 2, other control
            suite domains 2, everything else 1).
        split: `train` or `val` background videos (disjoint sets).
        video_dir: DAVIS 2017 folder or a folder of video files; None uses the built-in pool.
        time_limit: episode length in simulator steps before action repeat; None uses the
            family default (control suite 1000, manipulation 250 (10 s), robosuite 500,
            box pushing 200, MiniGrid 100, toy 50; `gym:` the id's own `max_episode_steps`).
        proprio: `robosuite-*` only: observations become {"image": pixels, "proprio": the
            robots' proprioceptive state (float32)}.
        render_shape: control-suite families (`dmc`, `dcs`, `natural`) only: (height, width)
            the camera renders at before the frame is area-resized to `image_size` square, e.g.
            (240, 320) for CoRe's 320x240 renders; None renders the square directly.
    """
    if not isinstance(env_id, str):
        raise ValueError(f"unknown env {env_id!r}; known: {_known_forms()}")
    family, _, rest = env_id.partition("-")
    if env_id in REGISTERED:
        family = "registered"  # its factory judges `distraction`
    elif env_id.startswith("gym:"):
        family = "gym"
    elif "-" not in env_id or (family not in FAMILIES and _suggest(env_id, REGISTERED)):
        raise ValueError(f"unknown env {env_id!r}{_suggest(env_id, REGISTERED)}; known: "
                         f"{_known_forms()}")
    elif family not in FAMILIES:
        raise ValueError(f"unknown env family {family!r} in {env_id!r}"
                         f"{_suggest(family, FAMILIES)}; known: {_known_forms()}")
    levels = FAMILY_LEVELS.get(family, ("none",))
    if family != "registered" and distraction not in levels:
        takes = [f for f, lv in FAMILY_LEVELS.items() if distraction in lv]
        hint = (f"; {distraction!r} is for {', '.join(f + '-*' for f in takes)} envs" if takes
                else _suggest(distraction, levels) if isinstance(distraction, str) else "")
        form = "gym:<id>" if family == "gym" else f"{family}-*"
        raise ValueError(f"unknown distraction {distraction!r} for {env_id!r}{hint}; "
                         f"{form} takes: {', '.join(levels)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if proprio and family != "robosuite":
        raise ValueError(f"proprio=True needs a robosuite-* env, got {env_id!r}")
    if action_repeat is None:
        action_repeat = default_action_repeat(env_id)
    if action_repeat < 1 or image_size < 8:
        raise ValueError(f"action_repeat must be >= 1 and image_size >= 8, got {action_repeat}, "
                         f"{image_size}")
    if render_shape is not None:
        if family not in ("dmc", "dcs", "natural"):
            raise ValueError(f"render_shape is for dmc-*, dcs-* and natural-* envs, got {env_id!r}")
        if len(render_shape) != 2 or min(render_shape) < 8 or max(render_shape) > 2048:
            raise ValueError(f"render_shape must be (height, width) between 8 and 2048, got "
                             f"{render_shape!r}")
    common = dict(seed=seed, image_size=image_size, action_repeat=action_repeat)

    if family == "gym":
        return own.make_gym(env_id, time_limit=time_limit, **common)
    if family == "registered":
        return own.make_registered(env_id, REGISTERED[env_id][0], distraction=distraction,
                                   dynamic=dynamic, split=split, video_dir=video_dir,
                                   time_limit=time_limit, **common)
    if family == "toy":
        if rest not in ("reach", "reach-center"):
            raise ValueError(f"unknown env {env_id!r}; the toy family has 'toy-reach' and "
                             "'toy-reach-center'")
        from envs.toy import ToyReach

        return ToyReach(**common, time_limit=time_limit or 50, fixed_target=rest == "reach-center")
    if family == "pybullet":
        if rest != "boxpush":
            raise ValueError(f"unknown env {env_id!r}; the pybullet family has 'pybullet-boxpush'")
        from envs.boxpush import BoxPush

        return BoxPush(**common, time_limit=time_limit or 200)
    if family == "robosuite":
        from envs import robosuite_env

        task, robot = robosuite_env.parse(rest)
        return robosuite_env.RobosuitePixels(task, robot, distraction=distraction, proprio=proprio,
                                             time_limit=time_limit or 500, **common)
    if family == "minigrid":
        from envs.minigrid_env import HORIZON, MiniGridPixels, registered_ids

        known = registered_ids()
        if env_id not in known:
            raise ValueError(f"unknown env {env_id!r}{_suggest(env_id, known)}; known: "
                             + ", ".join(known))
        gym_id = known[env_id]
        return MiniGridPixels(gym_id, distraction=distraction, split=split, video_dir=video_dir,
                              time_limit=time_limit or HORIZON, **common)

    from envs.dmc import DMCPixels, manipulation_tasks

    if family == "manipulation":
        known = {f"manipulation-{k}": v for k, v in manipulation_tasks().items()}
        if env_id not in known:
            raise ValueError(f"unknown env {env_id!r}{_suggest(env_id, known)}; known: "
                             + ", ".join(known))
        name = known[env_id]
        return DMCPixels("manipulation", rest, manipulation=name, time_limit=time_limit or 250,
                         **common)

    from envs import distractions as dist
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
    return DMCPixels(domain, task, time_limit=time_limit or 1000, distractions=layers,
                     render_shape=render_shape, **common)
