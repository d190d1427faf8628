"""DeepMind Control Suite tasks from pixels, as a Gymnasium env, with optional distractions."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

# Action repeat of the CoRe / CURL / PlaNet literature (CoRe appendix Table 3); others use 2.
ACTION_REPEAT = {"ball_in_cup": 4, "cartpole": 8, "cheetah": 4, "finger": 2, "reacher": 4,
                 "walker": 2}
DEFAULT_ACTION_REPEAT = 2


def manipulation_tasks() -> dict[str, str]:
    """{'reach-duplo': 'reach_duplo_features', ...}: dm_control.manipulation tasks by env name."""
    from dm_control import manipulation

    return {n[:-len("_features")].replace("_", "-"): n for n in manipulation.ALL
            if n.endswith("_features")}


def load_manipulation(name: str, seed: int):
    """A dm_control.manipulation task without its own 10 s time limit (ours truncates)."""
    from dm_control import manipulation

    env = manipulation.load(name, seed=seed)
    env._time_limit = float("inf")  # composer.Environment has no public setter
    return env


def suite_tasks() -> dict[str, list[str]]:
    """{domain: [task, ...]} of every task the installed dm_control suite offers."""
    from dm_control import suite

    tasks: dict[str, list[str]] = {}
    for domain, task in suite.ALL_TASKS:
        tasks.setdefault(domain, []).append(task)
    return tasks


def resize_render(image: np.ndarray, size: int, segmentation: bool = False) -> np.ndarray:
    """An (H, W, C) render squeezed to (size, size, C): area averaging for colours, nearest
    neighbour for segmentation ids (averaging ids would invent objects). The aspect ratio is not
    kept: a 320x240 frame becomes a square with the whole 4:3 field of view, as CoRe does."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    if segmentation:
        rows = ((np.arange(size) + 0.5) * h / size).astype(int)
        cols = ((np.arange(size) + 0.5) * w / size).astype(int)
        return image[rows[:, None], cols[None, :]]
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BOX))


class DMCPixels(gym.Env):
    """One dm_control task rendered to uint8 (3, size, size) pixels.

    `distractions` are objects with `reset(physics, rng)` and `step(physics)` (see
    `envs.distractions`), applied after every simulator control step; optional `before_render`
    and `composite` methods prepare the scene and post-process the rendered image. Actions are
    rescaled from [-1, 1] to the task's bounds; rewards are summed over the action repeat.
    dm_control tasks only end by time limit, so `truncated` is set after `time_limit` simulator
    steps; `terminated` only if the task itself ends with discount 0.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(self, domain: str, task: str, *, seed: int = 0, image_size: int = 64,
                 action_repeat: int = 2, time_limit: int = 1000, distractions=(), camera_id=None,
                 manipulation: str | None = None, render_shape: tuple[int, int] | None = None):
        from dm_control import suite

        self.domain, self.task, self.manipulation = domain, task, manipulation
        self.image_size, self.action_repeat, self.time_limit = image_size, action_repeat, time_limit
        # (height, width) the camera renders at before the image is resized to the square
        # observation; None renders the square directly (a narrower field of view than 4:3).
        self.render_shape = tuple(render_shape) if render_shape else (image_size, image_size)
        self.camera_id = (2 if domain == "quadruped" else 0) if camera_id is None else camera_id
        self.distractions = list(distractions)
        self._rng = np.random.default_rng(seed)
        # The task's own randomness (initial state, targets) gets its own seeded stream; the
        # distraction stream is separate so that distractions never change the task.
        if manipulation is not None:  # a dm_control.manipulation task (composer) by full name
            self._env = load_manipulation(manipulation, seed)
        else:
            self._env = suite.load(domain, task,
                                   task_kwargs={"random": seed, "time_limit": float("inf")})
        if manipulation is None:
            # Speed: a 1024 px shadow map instead of the models' 2048 renders the same frames at
            # agent sizes (cartpole: identical; walker, cheetah: mean difference < 0.02 of 255 at
            # 64x64 and 320x240) and takes 15-30% less time in software GL (cartpole 64x64:
            # 34 -> 26 ms a frame on one core).
            self.physics.model.vis.quality.shadowsize = min(
                1024, int(self.physics.model.vis.quality.shadowsize))
        spec = self._env.action_spec()
        self._low, self._high = spec.minimum.astype(np.float64), spec.maximum.astype(np.float64)
        self.action_space = gym.spaces.Box(-1.0, 1.0, spec.shape, np.float32)
        self.observation_space = gym.spaces.Box(0, 255, (3, image_size, image_size), np.uint8)
        self._steps = 0
        self._frame = None

    @property
    def physics(self):
        return self._env.physics

    def _render(self) -> np.ndarray:
        def render(**kw):
            h, w = self.render_shape
            image = self.physics.render(h, w, camera_id=self.camera_id, **kw)
            return resize_render(image, self.image_size, kw.get("segmentation", False))

        for d in self.distractions:
            if hasattr(d, "before_render"):
                d.before_render(self.physics)
        image = render()
        for d in self.distractions:
            if hasattr(d, "composite"):
                image = d.composite(image, self.physics, render)
        self._frame = image
        return np.ascontiguousarray(image.transpose(2, 0, 1))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
            random = getattr(self._env, "random_state", None)  # composer envs
            (random if random is not None else self._env.task.random).seed(seed)
        self._env.reset()
        if self.manipulation is not None:
            # Composer rebuilds the physics at every reset. Its scene's shadow map (4096 px) and
            # 4x multisampling cost 75 ms a 64 px frame in software GL; 1024 px and 1 sample
            # look the same at agent resolutions and take 33 ms.
            self.physics.model.vis.quality.shadowsize = 1024
            self.physics.model.vis.quality.offsamples = 0
        for d in self.distractions:
            d.reset(self.physics, self._rng)
        self._steps = 0
        return self._render(), {"env_steps": 0}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self.action_space.shape:
            raise ValueError(f"action has shape {action.shape}, expected {self.action_space.shape}")
        action = self._low + (np.clip(action, -1, 1) + 1) * 0.5 * (self._high - self._low)
        reward, taken, terminated = 0.0, 0, False
        for _ in range(self.action_repeat):
            ts = self._env.step(action)
            for d in self.distractions:
                d.step(self.physics)
            reward += ts.reward or 0.0
            taken += 1
            self._steps += 1
            if ts.last() and ts.discount == 0:
                terminated = True
            if terminated or self._steps >= self.time_limit:
                break
        truncated = not terminated and self._steps >= self.time_limit
        return self._render(), reward, terminated, truncated, {"env_steps": taken}

    def render(self):
        """The last observation as an (H, W, 3) image, for videos."""
        return self._frame

    def close(self):
        # Free the EGL context explicitly: left to interpreter exit it prints EGLError tracebacks.
        env = getattr(self, "_env", None)
        if env is not None:
            env.physics.free()
            self._env = None
