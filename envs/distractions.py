"""Visual distractions for MuJoCo control tasks.

Distracting Control Suite (Stone et al., 2021), as used by CoRe (appendix Table 4):

| level  | camera / colour scale | train / val videos |
|--------|-----------------------|--------------------|
| easy   | 0.1                   | 4 / 4              |
| medium | 0.2                   | 8 / 8              |
| hard   | 0.3                   | all (60 / 30)      |

Each distraction is an object with `reset(physics, rng)` (start of an episode) and
`step(physics)` (after every control step of the simulator, i.e. before action repeat is summed),
and optionally `before_render(physics)` and `composite(image, physics, render)`,
so with `dynamic=True` the video advances one frame per simulator control step and the camera and
colours move a little each step; with `dynamic=False` one background frame, camera pose and colour
set are drawn per episode and held.

`NaturalBackground` is CVRL's "Natural Mujoco": it composites video frames into the rendered image
wherever the segmentation render sees the sky or the floor, leaving the agent's pixels untouched.
"""

from __future__ import annotations

import numpy as np

from envs.videos import Clip

LEVELS = ("none", "easy", "medium", "hard", "background")
SCALE = {"easy": 0.1, "medium": 0.2, "hard": 0.3}
NUM_VIDEOS = {"easy": 4, "medium": 8, "hard": None, "background": None}
SKY_TEXTURE = 0  # the suite's shared skybox is the first texture of every model


def ground_alpha(domain: str) -> float:
    """Floor transparency of the benchmark: the video shows through the floor."""
    return {"reacher": 0.0, "walker": 1.0, "cheetah": 1.0}.get(domain, 0.3)


class _VideoPlayer:
    """Picks a clip per episode and plays it forward/backward, bouncing at the ends (no cuts)."""

    def __init__(self, clips: list[Clip], size: int, dynamic: bool):
        self.clips, self.size, self.dynamic = clips, size, dynamic
        self.frames = None
        self.index = 0
        self.direction = 1

    def reset(self, rng: np.random.Generator) -> np.ndarray:
        frames = self.clips[rng.integers(len(self.clips))].frames(self.size)
        if not self.dynamic:  # static: one random frame for the whole episode
            frames = frames[rng.integers(len(frames))][None]
        self.frames = frames
        self.index = int(rng.integers(len(frames)))
        self.direction = int(rng.choice([-1, 1]))
        return self.frames[self.index]

    def step(self) -> np.ndarray:
        if self.dynamic and len(self.frames) > 1:
            nxt = self.index + self.direction
            if nxt < 0 or nxt >= len(self.frames):
                self.direction = -self.direction
                nxt = self.index + self.direction
            self.index = nxt
        return self.frames[self.index]


class SkyboxVideo:
    """Background video written into the skybox texture (`tex_data`), floor made transparent."""

    def __init__(self, clips: list[Clip], dynamic: bool, floor_alpha: float, texture_size: int = 256):
        # The benchmark resizes frames to the 800x800 skybox face; at the 64-100 px the agents see,
        # 256x256 is indistinguishable and 10x cheaper to upload and to cache.
        self.player = _VideoPlayer(clips, texture_size, dynamic)
        self.floor_alpha = floor_alpha
        self.size = texture_size

    def reset(self, physics, rng):
        model = physics.model
        if "grid" in [model.mat(i).name for i in range(model.nmat)]:
            physics.named.model.mat_rgba["grid", "a"] = self.floor_alpha
        # A cube texture whose height equals its width shows the same image on all six faces.
        model.tex_width[SKY_TEXTURE] = model.tex_height[SKY_TEXTURE] = self.size
        self.frame = self.player.reset(rng)
        self.dirty = True

    def step(self, physics):
        if self.player.dynamic:
            self.frame = self.player.step()
            self.dirty = True

    def before_render(self, physics):
        """Upload the current frame; only the frame that gets rendered needs to reach the GPU."""
        import mujoco

        if not self.dirty:
            return
        self.dirty, frame = False, self.frame
        adr = physics.model.tex_adr[SKY_TEXTURE]
        physics.model.tex_data[adr:adr + frame.size] = frame.reshape(-1)
        with physics.contexts.gl.make_current() as ctx:
            ctx.call(mujoco.mjr_uploadTexture, physics.model.ptr, physics.contexts.mujoco.ptr,
                     SKY_TEXTURE)


def _sphere(v: np.ndarray) -> np.ndarray:
    """Cartesian -> (radius, azimuth, polar angle from +z)."""
    r = np.linalg.norm(v)
    return np.array([r, np.arctan2(v[1], v[0]), np.arccos(np.clip(v[2] / max(r, 1e-9), -1, 1))])


def _cartesian(s: np.ndarray) -> np.ndarray:
    r, az, pol = s
    return r * np.array([np.sin(pol) * np.cos(az), np.sin(pol) * np.sin(az), np.cos(pol)])


def _look_at(position, target, up_hint, roll) -> np.ndarray:
    """Camera frame (MuJoCo looks along its -z axis, y up) at `position` facing `target`."""
    forward = target - position
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, up_hint)
    if np.linalg.norm(right) < 1e-6:  # looking along the hint: any perpendicular will do
        right = np.cross(forward, np.array([1.0, 0.0, 0.0]))
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    c, s = np.cos(roll), np.sin(roll)
    right, up = c * right + s * up, -s * right + c * up  # roll about the viewing axis
    return np.stack([right, up, -forward], axis=1)


class CameraShake:
    """The camera drifts around its original pose along a smooth random walk (Stone et al. Sec. 3).

    Position in spherical coordinates around the agent (tracking cameras) or the world origin
    (fixed cameras): azimuth and elevation within +-pi/2*scale, distance within
    [1 - 0.5*scale, 1 + 1.5*scale] of the original, roll within +-pi/2*scale. When dynamic, the
    velocity takes Gaussian steps and is clipped; static draws one pose per episode.
    Except for reacher (top-down camera) the camera stays in the upper quadrant, on its side.
    """

    def __init__(self, scale: float, dynamic: bool, domain: str, camera_id: int = 0):
        self.scale, self.camera_id = scale, camera_id
        self.upper_quadrant = domain != "reacher"
        self.max_vel = 0.4 * scale if dynamic else 0.0
        self.vel_std = 0.1 * scale if dynamic else 0.0
        self.max_roll_vel = np.pi / 50 * scale if dynamic else 0.0
        self.roll_std = np.pi / 300 * scale if dynamic else 0.0

    def _centre(self, physics):
        return physics.data.subtree_com[1].copy() if self.tracking else np.zeros(3)

    def _lookat(self, physics):
        """The point the unperturbed camera looks at, at the agent's distance."""
        pos = physics.data.cam_xpos[self.camera_id]
        xmat = physics.data.cam_xmat[self.camera_id].reshape(3, 3)
        dist = np.linalg.norm(pos - physics.data.subtree_com[1])
        return pos - dist * xmat[:, 2]

    def reset(self, physics, rng):
        self.rng = rng
        self.tracking = physics.model.cam_mode[self.camera_id] != 0  # mjCAMLIGHT_FIXED == 0
        self.fixed_target = self._lookat(physics)
        self.up_hint = physics.data.cam_xmat[self.camera_id].reshape(3, 3)[:, 1].copy()
        r0, az0, pol0 = _sphere(physics.data.cam_xpos[self.camera_id] - self._centre(physics))
        d = np.pi / 2 * self.scale
        self.low = np.array([r0 * (1 - 0.5 * self.scale), az0 - d, pol0 - d])
        self.high = np.array([r0 * (1 + 1.5 * self.scale), az0 + d, pol0 + d])
        if self.upper_quadrant:
            self.low[1], self.high[1] = max(self.low[1], -np.pi), min(self.high[1], 0.0)
            self.low[2], self.high[2] = max(self.low[2], 0.0), min(self.high[2], np.pi / 2)
        self.vel_scale = r0 / 4.0  # the suite's cameras sit ~4 m away; slower for closer ones
        self.pos = rng.uniform(self.low, self.high)
        self.roll = rng.uniform(-d, d)
        self.roll_limit = d
        direction = rng.normal(size=3)
        self.vel = direction / np.linalg.norm(direction) * rng.uniform(0, self.max_vel)
        self.roll_vel = rng.uniform(-self.max_roll_vel, self.max_roll_vel)
        self.step(physics)

    def step(self, physics):
        # Random-walk the velocity, clip its norm, move, clip the position to the allowed shell.
        self.vel = self.vel + self.rng.normal(size=3) * self.vel_std * self.vel_scale
        speed, limit = np.linalg.norm(self.vel), self.max_vel * self.vel_scale
        if speed > limit:
            self.vel *= limit / max(speed, 1e-12)
        cart = _cartesian(self.pos)
        new = np.clip(_sphere(cart + self.vel), self.low, self.high)
        self.vel = _cartesian(new) - cart
        self.pos = new
        self.roll_vel = np.clip(self.roll_vel + self.rng.normal() * self.roll_std,
                                -self.max_roll_vel, self.max_roll_vel)
        new_roll = np.clip(self.roll + self.roll_vel, -self.roll_limit, self.roll_limit)
        self.roll_vel, self.roll = new_roll - self.roll, new_roll
        position = _cartesian(self.pos) + self._centre(physics)
        target = self._lookat(physics) if self.tracking else self.fixed_target
        physics.data.cam_xpos[self.camera_id] = position
        physics.data.cam_xmat[self.camera_id] = _look_at(position, target, self.up_hint,
                                                         self.roll).reshape(-1)


class ColorDrift:
    """Material colours drawn within +-scale of the originals, drifting by N(0, 0.03*scale) steps
    when dynamic (clipped to the range)."""

    def __init__(self, scale: float, dynamic: bool):
        self.scale = scale
        self.step_std = 0.03 * scale if dynamic else 0.0
        self.original = None

    def reset(self, physics, rng):
        self.rng = rng
        if self.original is None:
            self.original = physics.model.mat_rgba[:, :3].copy()
            self.low = np.clip(self.original - self.scale, 0, 1)
            self.high = np.clip(self.original + self.scale, 0, 1)
        self.rgb = rng.uniform(self.low, self.high)
        physics.model.mat_rgba[:, :3] = self.rgb

    def step(self, physics):
        if self.step_std > 0:
            self.rgb = np.clip(self.rgb + self.rng.normal(size=self.rgb.shape) * self.step_std,
                               self.low, self.high)
            physics.model.mat_rgba[:, :3] = self.rgb


class NaturalBackground:
    """CVRL's Natural Mujoco: video pixels replace the sky and floor in the rendered image."""

    def __init__(self, clips: list[Clip], size: int, dynamic: bool = True):
        self.player = _VideoPlayer(clips, size, dynamic)
        self.frame = None

    def reset(self, physics, rng):
        self.frame = self.player.reset(rng)

    def step(self, physics):
        self.frame = self.player.step()

    def composite(self, image: np.ndarray, physics, render) -> np.ndarray:
        """image: (H, W, 3) clean render; `render(segmentation=True)` gives (H, W, 2) ids."""
        seg = render(segmentation=True)
        geom_id, obj_type = seg[..., 0], seg[..., 1]
        background = geom_id < 0  # nothing hit: the skybox
        planes = np.flatnonzero(physics.model.geom_type == 0)  # mjGEOM_PLANE: the floor
        if planes.size:
            background |= (obj_type == 5) & np.isin(geom_id, planes)  # mjOBJ_GEOM == 5
        return np.where(background[..., None], self.frame, image)
