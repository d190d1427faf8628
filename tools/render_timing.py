"""Time control-suite rendering with the models' shadow map (2048 px) and with the 1024 px map that
envs/dmc.py uses, and how much the frames differ (mean |difference| in 0-255 units).

    MUJOCO_GL=egl OMP_NUM_THREADS=1 python tools/render_timing.py
"""
import time

import numpy as np
from dm_control import suite

for domain, task in [("cartpole", "swingup"), ("walker", "walk"), ("cheetah", "run")]:
    for height, width in [(64, 64), (240, 320)]:
        frames, ms = [], []
        for shadow in (None, 1024):
            env = suite.load(domain, task, task_kwargs={"random": 0})
            if shadow:
                env.physics.model.vis.quality.shadowsize = shadow
            env.reset()
            for _ in range(20):
                env.step(np.zeros(env.action_spec().shape))
            frame = env.physics.render(height, width, camera_id=0)
            start = time.perf_counter()
            for _ in range(20):
                frame = env.physics.render(height, width, camera_id=0)
            ms.append((time.perf_counter() - start) / 20 * 1e3)
            frames.append(frame.astype(int))
        diff = np.abs(frames[0] - frames[1]).mean()
        print(f"{domain}-{task} {width}x{height}: {ms[0]:.1f} -> {ms[1]:.1f} ms a frame, "
              f"mean difference {diff:.4f}", flush=True)
