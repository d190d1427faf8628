"""`pybullet-boxpush`: CVRL's box pushing (Sec. 4.2) in PyBullet.

A Kuka iiwa arm (from `pybullet_data`) holds its flange just above the floor and pushes a red
5 cm box towards a green ball. The action `(dx, dy)` in [-1, 1]^2 moves the end-effector target
by up to 3 cm per step in the floor plane (inverse kinematics, 10 physics steps of 1/240 s per
action: 24 Hz). The box, the goal and the light source are placed at random every episode.

Reward per step: `-|box - goal|` (floor-plane Euclidean distance in metres), plus 1 on the step
the box comes within 5 cm of the goal, which also ends the episode (`terminated`); otherwise
`truncated` after `time_limit` steps (default 200). CVRL reports the accumulated reward and the
execution length, so a good policy gets there fast.

Images come from PyBullet's TinyRenderer with `shadow=1` and the episode's `lightDirection`: the
arm casts a shadow that moves with it, the distraction this task is about. TinyRenderer is a
CPU rasteriser (no GL context needed); at 64x64 it is faster than the EGL plugin here.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

WORKSPACE = np.array([[0.40, -0.25], [0.75, 0.25]])  # (min, max) of the end effector's (x, y)
BOX_REGION = np.array([[0.50, -0.18], [0.68, 0.18]])
GOAL_RADIUS = 0.05
STEP = 0.03
EE_HEIGHT = 0.06  # flange height: low enough to hit the 5 cm box, clear of the floor
SUBSTEPS = 10
EE_LINK = 6
# Null-space IK (joint limits, ranges, rest pose of pybullet's own Kuka example) keeps the elbow
# up; plain IK from the zero pose leaves the flange hanging half a metre above the floor.
IK_LIMITS = dict(lowerLimits=[-.967, -2, -2.96, 0.19, -2.96, -2.09, -3.05],
                 upperLimits=[.967, 2, 2.96, 2.29, 2.96, 2.09, 3.05],
                 jointRanges=[5.8, 4, 5.8, 4, 5.8, 4, 6],
                 restPoses=[0, 0, 0, 0.5 * np.pi, 0, -0.33 * np.pi, 0])


class BoxPush(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 24}

    def __init__(self, *, seed: int = 0, image_size: int = 64, action_repeat: int = 1,
                 time_limit: int = 200):
        import pybullet  # prints a 'build time' banner at interpreter exit; harmless
        import pybullet_data
        from pybullet_utils.bullet_client import BulletClient

        self.image_size, self.action_repeat, self.time_limit = image_size, action_repeat, time_limit
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.observation_space = gym.spaces.Box(0, 255, (3, image_size, image_size), np.uint8)
        self._rng = np.random.default_rng(seed)
        p = self._p = BulletClient(connection_mode=pybullet.DIRECT)
        self._pybullet_data = pybullet_data.getDataPath()
        self._build()
        self._down = p.getQuaternionFromEuler([0, np.pi, 0])
        self._view = p.computeViewMatrixFromYawPitchRoll(
            cameraTargetPosition=[0.52, 0, 0.05], distance=0.85, yaw=90, pitch=-58, roll=0,
            upAxisIndex=2)
        self._proj = p.computeProjectionMatrixFOV(fov=50, aspect=1, nearVal=0.05, farVal=4)
        self._renderer = pybullet.ER_TINY_RENDERER
        self.ee_target = np.zeros(2)
        self.goal = np.zeros(2)
        self.light = np.zeros(3)
        self._steps, self._frame = 0, None

    def _build(self):
        """Load the scene from scratch: PyBullet keeps contact and solver caches across
        resetBasePositionAndOrientation, so only a fresh world makes a seed replay exactly."""
        import pybullet

        p = self._p
        p.resetSimulation()
        p.setAdditionalSearchPath(self._pybullet_data)
        p.setGravity(0, 0, -9.81)
        p.setTimeStep(1 / 240)
        p.loadURDF("plane.urdf")
        self.arm = p.loadURDF("kuka_iiwa/model.urdf", [0, 0, 0], useFixedBase=True)
        self.joints = list(range(p.getNumJoints(self.arm)))
        self.box = p.loadURDF("cube_small.urdf", [0.6, 0, 0.025])
        p.changeVisualShape(self.box, -1, rgbaColor=[0.85, 0.1, 0.1, 1])
        p.changeDynamics(self.box, -1, lateralFriction=0.5)
        ball = p.createVisualShape(pybullet.GEOM_SPHERE, radius=0.03, rgbaColor=[0.1, 0.8, 0.1, 1])
        self.goal_body = p.createMultiBody(baseMass=0, baseVisualShapeIndex=ball,
                                           basePosition=[0.6, 0.1, 0.03])

    # --- state -------------------------------------------------------------------------------
    def box_xy(self) -> np.ndarray:
        return np.array(self._p.getBasePositionAndOrientation(self.box)[0][:2])

    def place_box(self, xy):
        """Put the box at floor position `xy` (for tests and scripted demonstrations)."""
        self._p.resetBasePositionAndOrientation(self.box, [xy[0], xy[1], 0.025], [0, 0, 0, 1])
        self._p.resetBaseVelocity(self.box, [0, 0, 0], [0, 0, 0])

    def distance(self) -> float:
        return float(np.linalg.norm(self.box_xy() - self.goal))

    def _ik(self, xy):
        return self._p.calculateInverseKinematics(self.arm, EE_LINK, [xy[0], xy[1], EE_HEIGHT],
                                                  self._down, maxNumIterations=50, **IK_LIMITS)

    def _drive_arm(self, xy, settle: int):
        p = self._p
        q = self._ik(xy)
        p.setJointMotorControlArray(self.arm, self.joints, self._p.POSITION_CONTROL,
                                    targetPositions=q, forces=[300] * len(self.joints))
        for _ in range(settle):
            p.stepSimulation()

    def _observe(self) -> np.ndarray:
        s = self.image_size
        _, _, rgba, _, _ = self._p.getCameraImage(
            s, s, self._view, self._proj, shadow=1, lightDirection=self.light.tolist(),
            renderer=self._renderer)
        frame = np.asarray(rgba, np.uint8).reshape(s, s, 4)[..., :3]
        self._frame = frame
        return np.ascontiguousarray(frame.transpose(2, 0, 1))

    # --- gym API -----------------------------------------------------------------------------
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self._build()
        rng, p = self._rng, self._p
        box = rng.uniform(*BOX_REGION)
        goal = rng.uniform(*BOX_REGION)
        while np.linalg.norm(goal - box) < 3 * GOAL_RADIUS:
            goal = rng.uniform(*BOX_REGION)
        self.goal = goal
        # Light from a random direction above the scene: the shadows point a new way each episode.
        azimuth, elevation = rng.uniform(0, 2 * np.pi), rng.uniform(np.pi / 6, np.pi / 2.5)
        self.light = 3 * np.array([np.cos(azimuth) * np.cos(elevation),
                                   np.sin(azimuth) * np.cos(elevation), np.sin(elevation)])
        self.place_box(box)
        p.resetBasePositionAndOrientation(self.goal_body, [goal[0], goal[1], 0.03], [0, 0, 0, 1])
        # Start the end effector at the workspace edge nearest the robot, away from the box.
        self.ee_target = np.array([WORKSPACE[0, 0], rng.uniform(-0.15, 0.15)])
        for _ in range(3):  # IK starts from the current joints: iterate to converge
            for j, q in zip(self.joints, self._ik(self.ee_target)):
                p.resetJointState(self.arm, j, q)
        self._drive_arm(self.ee_target, settle=20)
        self.place_box(box)
        self._steps = 0
        return self._observe(), {"env_steps": 0, "distance": self.distance()}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,):
            raise ValueError(f"action has shape {action.shape}, expected (2,)")
        reward, taken, terminated = 0.0, 0, False
        for _ in range(self.action_repeat):
            self.ee_target = np.clip(self.ee_target + STEP * np.clip(action, -1, 1), *WORKSPACE)
            self._drive_arm(self.ee_target, settle=SUBSTEPS)
            dist = self.distance()
            terminated = dist < GOAL_RADIUS
            reward += -dist + (1.0 if terminated else 0.0)
            taken += 1
            self._steps += 1
            if terminated or self._steps >= self.time_limit:
                break
        truncated = not terminated and self._steps >= self.time_limit
        info = {"env_steps": taken, "distance": dist, "success": terminated}
        return self._observe(), reward, terminated, truncated, info

    def render(self):
        return self._frame

    def close(self):
        p = getattr(self, "_p", None)
        if p is not None:
            p.disconnect()
            self._p = None
