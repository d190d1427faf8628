"""Your own environment: any Gymnasium id as `gym:<id>`, or a factory given to `envs.register`.

Both end in `PixelEnv`, which gives them the contract of every other family (envs/__init__.py):
uint8 `(3, image_size, image_size)` observations; `Box` actions in [-1, 1], rescaled to the env's
own bounds, or the env's `Discrete(n)` actions numbered from 0; `action_repeat` steps of the env per
call with the rewards summed and `info["env_steps"]` counting them; `seed` used at the first reset.

- `gym:<id>`: the env is made with `render_mode="rgb_array"` and its rendered frame, area-resized to
  the square (the aspect ratio is not kept, as for CoRe's 4:3 renders), replaces its observation.
  `time_limit` replaces the id's own `max_episode_steps`. `gym:<module>:<id>` imports `module`
  first, for ids that another package registers (Gymnasium's own syntax).
- `envs.register(name, factory)`: the factory returns a Gymnasium env whose observations already
  are the pixels; `make_registered` says what it is called with (docs/own-env.md).
"""

from __future__ import annotations

import difflib
import inspect
import os
import warnings

import gymnasium as gym
import numpy as np

from envs.dmc import resize_render

# make's keyword arguments that a registered factory receives when its signature names them.
FACTORY_ARGS = ("seed", "image_size", "time_limit", "distraction", "dynamic", "split", "video_dir")


def check_spaces(env: gym.Env, name: str, image_size: int):
    """ValueError in one line unless `env` observes uint8 (3, image_size, image_size) pixels and
    acts with a one-dimensional Box of finite bounds or a Discrete space."""
    want = (3, image_size, image_size)
    obs = env.observation_space
    if not (isinstance(obs, gym.spaces.Box) and obs.dtype == np.uint8 and obs.shape == want):
        raise ValueError(f"env {name!r} has observation_space {obs}; envs needs "
                         f"Box(0, 255, {want}, uint8): channels first, image_size={image_size}")
    act = env.action_space
    if isinstance(act, gym.spaces.Box):
        if len(act.shape) != 1 or not (np.isfinite(act.low).all() and np.isfinite(act.high).all()):
            raise ValueError(f"env {name!r} has action_space {act}; envs needs a one-dimensional "
                             "Box with finite bounds (rescaled to [-1, 1]) or Discrete")
    elif not isinstance(act, gym.spaces.Discrete):
        raise ValueError(f"env {name!r} has action_space {act}; envs needs a Box or Discrete one")


class PixelEnv(gym.Wrapper):
    """A pixel env with envs' contract: actions in [-1, 1] (Box) or 0..n-1 (Discrete), the action
    repeated `action_repeat` times (or until the episode ends) with summed rewards,
    `info["env_steps"]` the inner steps taken (an inner env may report its own count in
    `info["env_steps"]`), and `seed` given to the first reset."""

    def __init__(self, env: gym.Env, name: str, *, seed: int = 0, image_size: int = 64,
                 action_repeat: int = 1):
        check_spaces(env, name, image_size)
        super().__init__(env)
        self.name, self.action_repeat, self._seed = name, action_repeat, seed
        inner = env.action_space
        if isinstance(inner, gym.spaces.Box):
            self._low, self._high = inner.low.astype(np.float64), inner.high.astype(np.float64)
            self.action_space = gym.spaces.Box(-1.0, 1.0, inner.shape, np.float32)
        else:
            self._start = int(inner.start)
            self.action_space = gym.spaces.Discrete(int(inner.n))
        self.observation_space = env.observation_space
        self._first_reset, self._obs = True, None

    def reset(self, *, seed=None, options=None):
        if seed is None and self._first_reset:
            seed = self._seed
        self._first_reset = False
        obs, info = self.env.reset(seed=seed, options=options)
        space = self.observation_space
        if not (isinstance(obs, np.ndarray) and obs.dtype == space.dtype and obs.shape == space.shape):
            got = f"{obs.dtype} {obs.shape}" if isinstance(obs, np.ndarray) else type(obs).__name__
            raise ValueError(f"env {self.name!r} returned a {got} observation at reset; its "
                             f"observation_space says uint8 {space.shape}")
        self._obs = obs
        return obs, {**info, "env_steps": 0}

    def step(self, action):
        if isinstance(self.action_space, gym.spaces.Box):
            action = np.asarray(action, dtype=np.float64)
            if action.shape != self.action_space.shape:
                raise ValueError(f"action has shape {action.shape}, expected {self.action_space.shape}")
            action = self._low + (np.clip(action, -1, 1) + 1) * 0.5 * (self._high - self._low)
            action = action.astype(self.env.action_space.dtype)
        else:
            a = np.asarray(action)
            if a.size != 1 or not self.action_space.contains(int(a.item())):
                raise ValueError(f"action must be an int in [0, {self.action_space.n}), got {action!r}")
            action = int(a.item()) + self._start
        reward, taken = 0.0, 0
        for _ in range(self.action_repeat):
            obs, r, terminated, truncated, info = self.env.step(action)
            reward += float(r)
            taken += int(info.get("env_steps", 1))
            if terminated or truncated:
                break
        self._obs = obs
        return obs, reward, bool(terminated), bool(truncated), {**info, "env_steps": taken}

    def render(self):
        """The last observation as an (H, W, 3) image, for videos."""
        return None if self._obs is None else self._obs.transpose(1, 2, 0)


class Rendered(gym.ObservationWrapper):
    """A Gymnasium env made with render_mode="rgb_array" whose observation is its rendered frame,
    area-resized to uint8 (3, image_size, image_size)."""

    def __init__(self, env: gym.Env, name: str, image_size: int):
        super().__init__(env)
        self.name, self.image_size = name, image_size
        self.observation_space = gym.spaces.Box(0, 255, (3, image_size, image_size), np.uint8)

    def observation(self, _):
        frame = self.env.render()
        if not (isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[2] == 3):
            got = frame.shape if isinstance(frame, np.ndarray) else type(frame).__name__
            raise ValueError(f"env {self.name!r} rendered {got} instead of an (H, W, 3) image")
        frame = resize_render(np.asarray(frame, np.uint8), self.image_size)
        return np.ascontiguousarray(frame.transpose(2, 0, 1))


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def make_gym(env_id: str, *, seed: int, image_size: int, action_repeat: int,
             time_limit: int | None) -> PixelEnv:
    """`gym:<id>` as a pixel env; every failure to make it is a ValueError in one line."""
    gym_id = env_id[len("gym:"):]
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        # pygame (classic-control rendering) looks for a display and a sound card at init and
        # prints errors for each it lacks; rgb_array frames need neither.
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    kwargs = {} if time_limit is None else {"max_episode_steps": time_limit}
    try:
        with warnings.catch_warnings():  # an env without rgb_array is refused below, in one line
            warnings.filterwarnings("ignore", message=".*not in the possible render_modes")
            env = gym.make(gym_id, render_mode="rgb_array", **kwargs)
    except gym.error.UnregisteredEnv as error:
        close = difflib.get_close_matches(gym_id, list(gym.registry), n=1)
        hint = (f"did you mean 'gym:{close[0]}'?" if close
                else f"Gymnasium: {_first_line(error).rstrip('.')}")
        raise ValueError(f"unknown env {env_id!r} ({hint}); gym:<id> takes a "
                         "registered Gymnasium id such as gym:CartPole-v1 (list them: python -c "
                         "'import gymnasium; gymnasium.pprint_registry()'), and gym:<module>:<id> "
                         "one that <module> registers when imported") from None
    except TypeError as error:  # the env's constructor takes no render_mode
        raise ValueError(f"env {env_id!r} cannot render rgb_array images ({_first_line(error)}); "
                         "envs needs pixels: wrap it in an env that draws them and use "
                         "envs.register (docs/own-env.md)") from None
    except (gym.error.Error, ImportError) as error:
        raise ValueError(f"cannot make env {env_id!r}: {_first_line(error)}") from None
    modes = env.metadata.get("render_modes", [])
    if "rgb_array" not in modes:
        env.close()
        raise ValueError(f"env {env_id!r} cannot render rgb_array images (its render modes: "
                         f"{', '.join(modes) or 'none'}); envs needs pixels: wrap it in an env "
                         "that draws them and use envs.register (docs/own-env.md)")
    return _wrap(Rendered(env, env_id, image_size), env_id, seed, image_size, action_repeat)


def factory_parameters(factory) -> set[str]:
    """The names of FACTORY_ARGS that `factory` takes (all of them if it takes **kwargs)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read: call it bare, check what it returns
        return set()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return set(FACTORY_ARGS)
    return {p.name for p in params if p.name in FACTORY_ARGS}


def make_registered(name: str, factory, *, distraction: str, dynamic: bool, seed: int,
                    image_size: int, action_repeat: int, split: str, video_dir,
                    time_limit: int | None) -> PixelEnv:
    """An env of `envs.register`: `factory(**kw)` with those of seed, image_size, distraction,
    dynamic, split (always offered) and time_limit, video_dir (offered when not None) that it
    takes. A factory without `time_limit` is wrapped in Gymnasium's TimeLimit (counting its
    steps); one without `distraction` takes only 'none'. The action repeat is applied here."""
    takes = factory_parameters(factory)
    offered = dict(seed=seed, image_size=image_size, distraction=distraction, dynamic=dynamic,
                   split=split)
    if time_limit is not None:  # else the factory's own default holds
        offered["time_limit"] = time_limit
    if video_dir is not None:
        offered["video_dir"] = video_dir
    kw = {k: v for k, v in offered.items() if k in takes}
    if distraction != "none" and "distraction" not in takes:
        raise ValueError(f"unknown distraction {distraction!r} for {name!r}: its factory takes no "
                         "distraction argument, so only 'none'")
    env = factory(**kw)
    if not isinstance(env, gym.Env):
        raise ValueError(f"the factory registered as {name!r} returned type "
                         f"{type(env).__name__}, not a gymnasium.Env")
    if time_limit is not None and "time_limit" not in takes:
        env = gym.wrappers.TimeLimit(env, time_limit)
    return _wrap(env, name, seed, image_size, action_repeat)


def _wrap(env: gym.Env, name: str, seed: int, image_size: int, action_repeat: int) -> PixelEnv:
    try:
        return PixelEnv(env, name, seed=seed, image_size=image_size, action_repeat=action_repeat)
    except ValueError:  # wrong spaces: free the env before saying so
        env.close()
        raise
