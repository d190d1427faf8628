"""`toy-reach`: a tiny pixel task for tests and CPU learning checks (well under 1 ms a step).

A red dot (the agent) moves on a grey square by `0.1 * action` per step (`action` in [-1, 1]^2) and
must reach a green target placed at random each episode. Reward per step is
`1 - min(distance, 1)`: dense, in [0, 1], about 0.1-0.3 for a random policy on average and close
to 1 once the agent sits on the target. Episodes last 50 steps (time limit, `truncated`).

`toy-reach-center` keeps the target at the centre: the policy then only has to find the agent's
dot. The small DreamerV2 and CoRe configs of the learning checks get there in about 1500 updates
(docs/benchmark.md, "Learning checks"). With a random target they must also relate the two dots; in runs of
~2000 updates neither beat the random policy on `toy-reach`.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class ToyReach(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}
    speed = 0.1

    def __init__(self, *, seed: int = 0, image_size: int = 64, action_repeat: int = 1,
                 time_limit: int = 50, fixed_target: bool = False):
        self.fixed_target = fixed_target
        self.image_size, self.action_repeat, self.time_limit = image_size, action_repeat, time_limit
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.observation_space = gym.spaces.Box(0, 255, (3, image_size, image_size), np.uint8)
        self._rng = np.random.default_rng(seed)
        # Pixel centres in world coordinates ([-1, 1] on both axes), for drawing discs.
        c = (np.arange(image_size) + 0.5) / image_size * 2 - 1
        self._gx, self._gy = np.meshgrid(c, c)
        self._radius = max(0.12, 2.5 / image_size)

    def _disc(self, p):
        return (self._gx - p[0]) ** 2 + (self._gy - p[1]) ** 2 <= self._radius ** 2

    def _render(self) -> np.ndarray:
        img = np.full((3, self.image_size, self.image_size), 90, np.uint8)
        target, agent = self._disc(self.target), self._disc(self.agent)
        img[:, target] = np.array([40, 200, 60], np.uint8)[:, None]
        img[:, agent] = np.array([220, 40, 40], np.uint8)[:, None]
        return img

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self.agent = self._rng.uniform(-0.8, 0.8, 2)
        self.target = np.zeros(2) if self.fixed_target else self._rng.uniform(-0.8, 0.8, 2)
        self._steps = 0
        return self._render(), {"env_steps": 0}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,):
            raise ValueError(f"action has shape {action.shape}, expected (2,)")
        reward, taken = 0.0, 0
        for _ in range(self.action_repeat):
            self.agent = np.clip(self.agent + self.speed * np.clip(action, -1, 1), -1, 1)
            reward += 1.0 - min(float(np.linalg.norm(self.agent - self.target)), 1.0)
            taken += 1
            self._steps += 1
            if self._steps >= self.time_limit:
                break
        truncated = self._steps >= self.time_limit
        return self._render(), reward, False, truncated, {"env_steps": taken}

    def optimal_action(self) -> np.ndarray:
        """The greedy controller (straight at the target), used as the 'good policy' reference."""
        return np.clip((self.target - self.agent) / self.speed, -1, 1)

    def render(self):
        return self._render().transpose(1, 2, 0)
