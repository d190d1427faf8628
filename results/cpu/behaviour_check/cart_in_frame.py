"""Where the cart of dmc-cartpole-swingup appears in the 64 x 64 frame the agents see, for cart
positions along the rail (+-1.8): the first and last pixel columns showing the cart's colour, or
None when the cart is out of the frame. The fixed camera (camera 0, as every script renders).

    MUJOCO_GL=egl python results/cpu/behaviour_check/cart_in_frame.py
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import envs  # noqa: E402

env = envs.make("dmc-cartpole-swingup", seed=1, image_size=64, action_repeat=1)
env.reset(seed=0)
physics = env.unwrapped.physics
for x in (0.0, 0.5, 1.0, 1.2, 1.4, 1.5, 1.6, 1.7, 1.8):
    columns = {}
    for side in (-1, 1):
        with physics.reset_context():
            physics.named.data.qpos["slider"] = side * x
            physics.named.data.qpos["hinge_1"] = np.pi  # pole hanging down, below the cart
        image = physics.render(64, 64, camera_id=0).astype(int)
        cart = (image[..., 0] > 150) & (image[..., 2] < 120)  # the cart's orange
        seen = np.flatnonzero(cart.any(0))
        columns[side] = (int(seen.min()), int(seen.max())) if seen.size else None
    print(f"cart at -{x:.1f}: columns {columns[-1]}; at +{x:.1f}: columns {columns[1]}")
env.close()
