"""robosuite manipulation tasks from pixels (`robosuite-<task>-<robot>`, e.g. `robosuite-door-panda`).

CoRe Sec. 3.4: delta end-effector pose actions (robosuite's OSC_POSE controller, 6 numbers plus
the gripper) at 20 Hz, 500-step episodes, shaped reward in [0, 1] per step, camera image with or
without proprioception. The camera is `frontview`; for Door the image is the 144/256 window of
the frame that CoRe's config crops around the door (centre (104, 112) of the upright 256 image),
rendered at the resolution that makes the window `image_size` wide.

Distractions are **static** (CoRe's setting): drawn at reset, fixed for the episode.
- `color-lighting`: every material and uncoloured geom moves its RGB 20% of the way to a random
  colour and its specular/shininess/reflectance 30% of the way to random values; every light
  moves its position up to 0.1 m, turns its direction by up to 0.35 rad and shifts its ambient,
  diffuse and specular colour by up to ±0.1 (robosuite's `DomainRandomizationWrapper` defaults).
- `color-lighting-camera`: also the camera moves up to 0.01 m, turns up to 0.087 rad and changes
  its field of view by up to ±5 degrees (the wrapper's camera defaults).
robosuite 1.5.2's own randomiser swaps textures, which only works with mujoco 3.1.1, so colours
are perturbed through the model's material and geom colours here: textured surfaces (floor,
table, door wood) are tinted rather than re-textured, and the skybox is not changed.
"""

from __future__ import annotations

import logging

import gymnasium as gym
import numpy as np

TASKS = {"lift": "Lift", "door": "Door", "stack": "Stack", "pick-place": "PickPlace",
         "nut-assembly": "NutAssembly", "wipe": "Wipe", "tool-hang": "ToolHang",
         "peg-in-hole": "TwoArmPegInHole"}
ROBOTS = {"panda": "Panda", "jaco": "Jaco", "sawyer": "Sawyer", "kinova3": "Kinova3",
          "iiwa": "IIWA", "ur5e": "UR5e", "xarm7": "XArm7"}
LEVELS = ("none", "color-lighting", "color-lighting-camera")
# (centre x, centre y, side) of the square window, as fractions of the upright frontview frame.
CROP = {"door": (104 / 256, 112 / 256, 144 / 256)}


def parse(rest: str) -> tuple[str, str]:
    """'door-panda' -> ('door', 'panda'); ValueError naming the valid choices otherwise."""
    task, _, robot = rest.rpartition("-")
    if task not in TASKS or robot not in ROBOTS:
        raise ValueError(f"unknown robosuite env 'robosuite-{rest}'; use robosuite-<task>-<robot> "
                         f"with task in {', '.join(TASKS)} and robot in {', '.join(ROBOTS)} "
                         "(e.g. robosuite-door-panda)")
    return task, robot


def _quiet_robosuite():
    # robosuite logs macro/optional-package warnings on import and controller INFO on every make.
    # (Without a display, importing envs has chosen MUJOCO_GL already: envs/__init__.py.)
    import robosuite

    logging.getLogger("robosuite_logs").setLevel(logging.ERROR)
    for handler in logging.getLogger("robosuite_logs").handlers:
        handler.setLevel(logging.ERROR)
    return robosuite


def _random_rotation(rng, max_angle: float) -> np.ndarray:
    """A rotation matrix about a uniform random axis by an angle uniform in [0, max_angle]."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(0, max_angle)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _in_ball(rng, radius: float) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v) * radius * rng.uniform() ** (1 / 3)


class StaticPerturbation:
    """Per-episode colour, lighting and (optionally) camera changes on a MuJoCo model."""

    def __init__(self, model, camera_id: int, camera: bool):
        self.model, self.camera_id, self.camera = model, camera_id, camera
        m = model
        self.default = {k: getattr(m, k).copy() for k in (
            "mat_rgba", "mat_specular", "mat_shininess", "mat_reflectance", "geom_rgba",
            "light_pos", "light_dir", "light_ambient", "light_diffuse", "light_specular",
            "cam_pos", "cam_quat", "cam_fovy")}
        # Geoms whose colour comes from their own rgba, not from a material.
        self.plain_geoms = np.flatnonzero(m.geom_matid < 0)

    def restore(self):
        for k, v in self.default.items():
            getattr(self.model, k)[:] = v

    def sample(self, rng):
        import mujoco

        m, d = self.model, self.default
        self.restore()
        m.mat_rgba[:, :3] = 0.8 * d["mat_rgba"][:, :3] + 0.2 * rng.uniform(size=(m.nmat, 3))
        g = self.plain_geoms
        m.geom_rgba[g, :3] = 0.8 * d["geom_rgba"][g, :3] + 0.2 * rng.uniform(size=(len(g), 3))
        for key in ("mat_specular", "mat_shininess", "mat_reflectance"):
            getattr(m, key)[:] = 0.7 * d[key] + 0.3 * rng.uniform(size=d[key].shape)
        for i in range(m.nlight):
            m.light_pos[i] = d["light_pos"][i] + _in_ball(rng, 0.1)
            m.light_dir[i] = _random_rotation(rng, 0.35) @ d["light_dir"][i]
            for key in ("light_ambient", "light_diffuse", "light_specular"):
                getattr(m, key)[i] = np.clip(d[key][i] + rng.uniform(-0.1, 0.1, 3), 0, 1)
        if self.camera:
            c = self.camera_id
            m.cam_pos[c] = d["cam_pos"][c] + _in_ball(rng, 0.01)
            mat = np.zeros(9)
            mujoco.mju_quat2Mat(mat, d["cam_quat"][c])
            quat = np.zeros(4)
            mujoco.mju_mat2Quat(quat, (_random_rotation(rng, 0.087) @ mat.reshape(3, 3)).ravel())
            m.cam_quat[c] = quat
            m.cam_fovy[c] = d["cam_fovy"][c] + rng.uniform(-5, 5)

    def state(self) -> np.ndarray:
        """Every perturbed parameter in one vector (for tests and logging)."""
        m = self.model
        return np.concatenate([np.ravel(getattr(m, k)) for k in self.default]).copy()


class RobosuitePixels(gym.Env):
    """A robosuite task with our own offscreen renderer: uint8 (3, S, S) upright images."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}

    def __init__(self, task: str, robot: str, *, distraction: str = "none", seed: int = 0,
                 image_size: int = 64, action_repeat: int = 1, time_limit: int = 500,
                 proprio: bool = False):
        import mujoco

        suite = _quiet_robosuite()
        self.task, self.robot, self.proprio = task, robot, proprio
        self.image_size, self.action_repeat, self.time_limit = image_size, action_repeat, time_limit
        robots = [ROBOTS[robot]] * (2 if TASKS[task].startswith("TwoArm") else 1)
        # ignore_done: episodes end by our own time limit; hard_reset=False: reset in ~0.1 s by
        # restoring the state instead of rebuilding the model (~3 s).
        self._env = suite.make(TASKS[task], robots=robots, has_renderer=False,
                               has_offscreen_renderer=False, use_camera_obs=False,
                               use_object_obs=False, reward_shaping=True, control_freq=20,
                               horizon=time_limit, ignore_done=True, hard_reset=False, seed=seed)
        self.model = self._env.sim.model._model
        self.data = self._env.sim.data._data
        self.camera_id = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_CAMERA, "frontview")
        # One multisample instead of four: the same picture at 64 px, half the software-GL time.
        self.model.vis.quality.offsamples = 0
        cx, cy, side = CROP.get(task, (0.5, 0.5, 1.0))
        self._render_size = int(round(image_size / side))
        top = int(round(cy * self._render_size - image_size / 2))
        left = int(round(cx * self._render_size - image_size / 2))
        self._window = (slice(top, top + image_size), slice(left, left + image_size))
        self._renderer = mujoco.Renderer(self.model, self._render_size, self._render_size)
        self._scene_option = mujoco.MjvOption()
        self._scene_option.geomgroup[0] = 0  # collision meshes off, as robosuite's own renderer
        self.perturbation = (StaticPerturbation(self.model, self.camera_id,
                                                camera=distraction == "color-lighting-camera")
                             if distraction != "none" else None)
        self._rng = np.random.default_rng([seed, 1])  # distraction stream, separate from the task
        low, high = self._env.action_spec
        self.action_space = gym.spaces.Box(-1.0, 1.0, low.shape, np.float32)
        self._low, self._high = low, high
        image_space = gym.spaces.Box(0, 255, (3, image_size, image_size), np.uint8)
        if proprio:
            n = self._proprio(self._env._get_observations(force_update=True)).shape[0]
            self.observation_space = gym.spaces.Dict({
                "image": image_space,
                "proprio": gym.spaces.Box(-np.inf, np.inf, (n,), np.float32)})
        else:
            self.observation_space = image_space
        self._steps, self._frame, self._last = 0, None, None

    def _proprio(self, obs: dict) -> np.ndarray:
        keys = sorted(k for k in obs if k.endswith("proprio-state"))
        return np.concatenate([obs[k] for k in keys]).astype(np.float32)

    def _observe(self, raw: dict):
        self._renderer.update_scene(self.data, camera=self.camera_id,
                                    scene_option=self._scene_option)
        frame = self._renderer.render()[self._window]
        self._frame = frame
        image = np.ascontiguousarray(frame.transpose(2, 0, 1))
        if self.proprio:
            return {"image": image, "proprio": self._proprio(raw)}
        return image

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng([seed, 1])
            self._env.rng = np.random.default_rng(seed)
            sampler = getattr(self._env, "placement_initializer", None)
            if sampler is not None:
                sampler.rng = self._env.rng
                for s in getattr(sampler, "samplers", {}).values():
                    s.rng = self._env.rng
        if self.perturbation is not None:
            self.perturbation.sample(self._rng)
        raw = self._env.reset()
        self._steps = 0
        return self._observe(raw), {"env_steps": 0}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self.action_space.shape:
            raise ValueError(f"action has shape {action.shape}, expected {self.action_space.shape}")
        action = self._low + (np.clip(action, -1, 1) + 1) * 0.5 * (self._high - self._low)
        reward, taken = 0.0, 0
        for _ in range(self.action_repeat):
            raw, r, _, _ = self._env.step(action)
            reward += float(r)
            taken += 1
            self._steps += 1
            if self._steps >= self.time_limit:
                break
        truncated = self._steps >= self.time_limit
        info = {"env_steps": taken, "success": bool(self._env._check_success())}
        return self._observe(raw), reward, False, truncated, info

    def render(self):
        return self._frame

    def close(self):
        renderer = getattr(self, "_renderer", None)
        if renderer is not None:
            renderer.close()
            self._renderer = None
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()
            self._env = None
