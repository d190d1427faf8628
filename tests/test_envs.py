"""Specification of the `envs` package: control-suite families, distractions, videos, toy-reach,
headless rendering."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import envs
from envs.videos import video_pool

CONTROL_IDS = [("dmc-cartpole-balance", "none"), ("dcs-cartpole-balance", "medium"),
               ("dcs-walker-walk", "background"), ("natural-reacher-easy", "none")]


def run(env, actions):
    """Observations and rewards of one episode prefix under a fixed action sequence."""
    obs, _ = env.reset()
    frames, rewards = [obs], []
    for a in actions:
        obs, r, *_ = env.step(a)
        frames.append(obs)
        rewards.append(r)
    return np.stack(frames), np.array(rewards)


def actions_for(env, n, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n,) + env.action_space.shape)


@pytest.mark.parametrize("env_id,distraction", CONTROL_IDS + [("toy-reach", "none")])
def test_every_family_has_documented_spaces(env_id, distraction):
    env = envs.make(env_id, distraction=distraction, image_size=48, seed=3)
    try:
        assert env.observation_space.shape == (3, 48, 48)
        assert env.observation_space.dtype == np.uint8
        assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
        obs, info = env.reset()
        assert obs.shape == (3, 48, 48) and obs.dtype == np.uint8 and info["env_steps"] == 0
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert obs.shape == (3, 48, 48) and obs.dtype == np.uint8
        assert np.isfinite(reward) and isinstance(terminated, bool) and isinstance(truncated, bool)
        assert info["env_steps"] == envs.default_action_repeat(env_id)
        assert env.observation_space.contains(obs)
    finally:
        env.close()


def test_default_action_repeat_follows_the_literature():
    expected = {"ball_in_cup-catch": 4, "cartpole-swingup": 8, "cheetah-run": 4, "finger-spin": 2,
                "reacher-easy": 4, "walker-walk": 2, "hopper-hop": 2}
    for task, repeat in expected.items():
        assert envs.default_action_repeat(f"dcs-{task}") == repeat


def test_episode_truncates_at_time_limit_counted_in_simulator_steps():
    env = envs.make("dmc-cartpole-balance", time_limit=40, image_size=16)  # repeat 8: 5 steps
    try:
        env.reset()
        flags, steps = [], 0
        for _ in range(5):
            _, _, terminated, truncated, info = env.step(np.zeros(1))
            flags.append(truncated)
            steps += info["env_steps"]
            assert not terminated
        assert flags == [False] * 4 + [True] and steps == 40
    finally:
        env.close()


@pytest.mark.parametrize("env_id,distraction", CONTROL_IDS[1:] + [("toy-reach", "none")])
def test_same_seed_same_actions_are_identical_and_seeds_differ(env_id, distraction):
    runs = {}
    for seed in (0, 0, 1):
        env = envs.make(env_id, distraction=distraction, seed=seed, image_size=32)
        try:
            runs.setdefault(seed, []).append(run(env, actions_for(env, 6)))
        finally:
            env.close()
    (obs_a, rew_a), (obs_b, rew_b) = runs[0]
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(rew_a, rew_b)
    assert not np.array_equal(obs_a, runs[1][0][0])


def test_reset_with_seed_replays_the_episode():
    env = envs.make("dcs-cartpole-swingup", distraction="easy", image_size=32)
    try:
        acts = actions_for(env, 4)
        env.reset(seed=7)
        first = run(env, acts)
        env.reset(seed=7)
        np.testing.assert_array_equal(first[0], run(env, acts)[0])
    finally:
        env.close()


def test_distractions_change_pixels_but_not_rewards():
    results = {}
    for level in ("none", "easy", "medium", "hard", "background"):
        env = envs.make("dcs-walker-walk", distraction=level, seed=5, image_size=32)
        try:
            results[level] = run(env, actions_for(env, 8))
        finally:
            env.close()
    clean = envs.make("dmc-walker-walk", seed=5, image_size=32)
    try:
        dmc_obs, dmc_rew = run(clean, actions_for(clean, 8))
    finally:
        clean.close()
    np.testing.assert_array_equal(results["none"][0], dmc_obs)
    for level, (obs, rew) in results.items():
        np.testing.assert_array_equal(rew, dmc_rew)
        if level != "none":
            assert np.abs(obs.astype(int) - dmc_obs).mean() > 10, level


def distraction_state(env):
    """What the distractions control: camera pose, material colours, skybox texture."""
    physics = env.physics
    adr = physics.model.tex_adr[0]
    return (physics.data.cam_xpos[0].copy(), physics.model.mat_rgba[:, :3].copy(),
            physics.model.tex_data[adr:adr + 256 * 256 * 3].copy())


@pytest.mark.parametrize("dynamic", [False, True])
def test_static_distractions_hold_and_dynamic_ones_move(dynamic):
    # cartpole's camera is fixed, so any camera motion comes from the distraction.
    env = envs.make("dcs-cartpole-swingup", distraction="medium", dynamic=dynamic, image_size=32)
    try:
        env.reset()
        states = [distraction_state(env)]
        for _ in range(3):
            env.step(np.zeros(1))
            states.append(distraction_state(env))
        for before, after in zip(states, states[1:]):
            for part_before, part_after in zip(before, after):
                assert np.array_equal(part_before, part_after) != dynamic
        env.reset()  # a new episode draws a new static distraction
        assert not all(np.array_equal(a, b) for a, b in zip(states[0], distraction_state(env)))
    finally:
        env.close()


def test_levels_are_ordered_hard_perturbs_more_than_easy():
    def perturbation(level):
        env = envs.make("dcs-cartpole-swingup", distraction=level, dynamic=False, image_size=16)
        clean = envs.make("dmc-cartpole-balance", image_size=16)
        try:
            clean.reset()
            cam0, rgb0 = clean.physics.data.cam_xpos[0].copy(), clean.physics.model.mat_rgba[:, :3]
            cams, colours = [], []
            for seed in range(12):
                env.reset(seed=seed)
                cams.append(np.linalg.norm(env.physics.data.cam_xpos[0] - cam0))
                colours.append(np.abs(env.physics.model.mat_rgba[:, :3] - rgb0).max())
            return np.mean(cams), np.max(colours)
        finally:
            env.close()
            clean.close()

    (cam_e, col_e), (cam_m, col_m), (cam_h, col_h) = map(perturbation, ("easy", "medium", "hard"))
    assert 0 < cam_e < cam_m < cam_h
    assert col_e <= 0.1 + 1e-6 and col_m <= 0.2 + 1e-6 and col_h <= 0.3 + 1e-6
    assert col_e < col_m < col_h


@pytest.mark.parametrize("env_id,distraction", [("dmc-cartpole-swingup", "none"),
                                                 ("natural-cartpole-swingup", "none")])
def test_render_shape_renders_the_wider_4_3_view_then_resizes_to_the_square(env_id, distraction):
    """CoRe renders 320x240 and resizes to 100x100 (core.txt Sec. 4): the observation is square,
    equals the area-resized 4:3 render, and differs from a square render (narrower view)."""
    from envs.dmc import resize_render

    wide = envs.make(env_id, distraction=distraction, image_size=40, seed=2, render_shape=(60, 80))
    square = envs.make(env_id, distraction=distraction, image_size=40, seed=2)
    try:
        obs_wide, _ = wide.reset(seed=5)
        obs_square, _ = square.reset(seed=5)
        assert obs_wide.shape == obs_square.shape == (3, 40, 40) and obs_wide.dtype == np.uint8
        if env_id.startswith("dmc"):
            full = wide.physics.render(60, 80, camera_id=0)
            assert np.array_equal(obs_wide, resize_render(full, 40).transpose(2, 0, 1))
        # natural-*: the same video fills the background of both, only the agent's pixels differ
        diff = np.abs(obs_wide.astype(int) - obs_square.astype(int)).mean()
        assert diff > (2 if env_id.startswith("dmc") else 0.1), diff
    finally:
        wide.close()
        square.close()


def test_render_shape_resizes_segmentation_by_nearest_neighbour():
    from envs.dmc import resize_render

    seg = np.zeros((6, 8, 2), np.int32)
    seg[:, 4:] = 7
    out = resize_render(seg, 4, segmentation=True)
    assert out.shape == (4, 4, 2) and set(np.unique(out)) == {0, 7}


def test_natural_background_leaves_agent_pixels_unchanged():
    env = envs.make("natural-cheetah-run", seed=2, image_size=48)
    try:
        env.reset()
        for a in actions_for(env, 3):
            obs, *_ = env.step(a)
        physics = env.physics
        clean = physics.render(48, 48, camera_id=0)
        seg = physics.render(48, 48, camera_id=0, segmentation=True)
        floor = np.flatnonzero(physics.model.geom_type == 0)
        agent = (seg[..., 0] >= 0) & ~np.isin(seg[..., 0], floor)
        obs = obs.transpose(1, 2, 0)
        assert agent.sum() > 30  # the cheetah is in view
        np.testing.assert_array_equal(obs[agent], clean[agent])
        assert np.abs(obs[~agent].astype(int) - clean[~agent]).mean() > 10
    finally:
        env.close()


def test_train_and_validation_videos_are_disjoint_and_enough_for_hard():
    train, val = video_pool("train"), video_pool("val")
    assert len(train) == 60 and len(val) == 30
    scene = lambda clip: clip.name.rsplit("-", 1)[0]  # noqa: E731  (photo or video the clip is cut from)
    assert not {scene(c) for c in train} & {scene(c) for c in val}
    assert len({c.name for c in train}) == 60
    # the first 4 clips (easy) come from 4 different scenes
    assert len({scene(c) for c in train[:4]}) == 4
    frames = train[0].frames(32)
    assert frames.shape[1:] == (32, 32, 3) and frames.dtype == np.uint8 and len(frames) > 10
    assert train[0].frames(32) is frames  # decoded once, cached


def test_dcs_train_and_val_splits_show_different_backgrounds():
    obs = {}
    for split in ("train", "val"):
        env = envs.make("dcs-walker-walk", distraction="background", split=split, seed=0,
                        image_size=32)
        try:
            obs[split] = env.reset()[0]
        finally:
            env.close()
    assert np.abs(obs["train"].astype(int) - obs["val"]).mean() > 5


def write_davis(root, names, frames=3):
    import PIL.Image

    for k, name in enumerate(names):
        folder = root / "JPEGImages" / "480p" / name
        folder.mkdir(parents=True)
        for t in range(frames):
            image = np.full((24, 32, 3), 20 * k + 5 * t, np.uint8)
            PIL.Image.fromarray(image).save(folder / f"{t:05d}.jpg")


def test_video_dir_accepts_the_davis_layout(tmp_path):
    write_davis(tmp_path, ["bear", "boat", "bus", "dog", "goat"])
    assert [c.name.split("/")[-1] for c in video_pool("train", tmp_path)] == ["bear", "boat", "bus"]
    assert [c.name.split("/")[-1] for c in video_pool("val", tmp_path)] == ["dog", "goat"]
    assert video_pool("val", tmp_path)[0].frames(16).shape == (3, 16, 16, 3)
    env = envs.make("dcs-cartpole-swingup", distraction="background", video_dir=tmp_path,
                    image_size=16)
    try:
        assert env.reset()[0].shape == (3, 16, 16)
    finally:
        env.close()
    with pytest.raises(ValueError, match="needs 4 background videos but the pool has only 3"):
        envs.make("dcs-cartpole-swingup", distraction="easy", video_dir=tmp_path)


def test_video_dir_accepts_a_folder_of_video_files(tmp_path):
    import av

    for k in range(3):
        with av.open(str(tmp_path / f"clip{k}.mp4"), "w") as out:
            stream = out.add_stream("mpeg4", rate=10)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            for t in range(5):
                frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * k + t, np.uint8),
                                                   format="rgb24")
                out.mux(stream.encode(frame))
            out.mux(stream.encode())
    train, val = video_pool("train", tmp_path), video_pool("val", tmp_path)
    assert [c.name.split("/")[-1] for c in train] == ["clip0.mp4", "clip1.mp4"]
    assert [c.name.split("/")[-1] for c in val] == ["clip2.mp4"]
    assert val[0].frames(8).shape == (5, 8, 8, 3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(env_id="toy-reach", render_shape=(240, 320)), "render_shape is for dmc-*"),
    (dict(env_id="dmc-walker-walk", render_shape=(4, 320)), "render_shape must be \\(height, width\\)"),
    (dict(env_id="dcs-walkr-walk"), "unknown domain 'walkr'.*did you mean 'walker'"),
    (dict(env_id="dmc-walker-wlk"), "unknown task 'wlk'.*dmc-walker-walk"),
    (dict(env_id="atari-pong"), "unknown env family 'atari'.*dmc-<domain>-<task>"),
    (dict(env_id="walker"), "unknown env 'walker'; known: dmc-"),
    (dict(env_id="dcs-walker-walk", distraction="extreme"), "unknown distraction 'extreme'.*easy"),
    (dict(env_id="dmc-walker-walk", distraction="easy"), "'easy' is for dcs-\\* envs; dmc-\\* takes: none"),
    (dict(env_id="dcs-walker-walk", split="test"), "unknown split 'test'; known: train, val"),
    (dict(env_id="toy-push"), "toy family has .toy-reach. and .toy-reach-center."),
    (dict(env_id="dcs-walker-walk", distraction="easy", video_dir="/no/such/folder"),
     "does not exist"),
])
def test_bad_input_gets_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        envs.make(kwargs.pop("env_id"), **kwargs)


def test_empty_video_dir_gets_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("no videos here")
    with pytest.raises(ValueError, match="holds no videos"):
        envs.make("natural-walker-walk", video_dir=tmp_path)


def test_wrong_action_shape_gets_a_clear_error():
    env = envs.make("toy-reach")
    env.reset()
    with pytest.raises(ValueError, match="expected \\(2,\\)"):
        env.step(np.zeros(3))


def test_toy_reach_is_fast_and_a_good_policy_beats_random():
    env = envs.make("toy-reach", seed=0)
    returns = {"random": [], "greedy": []}
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    steps = 0
    for policy in returns:
        for _ in range(10):
            env.reset()
            total, done = 0.0, False
            while not done:
                a = env.optimal_action() if policy == "greedy" else rng.uniform(-1, 1, 2)
                _, r, terminated, truncated, _ = env.step(a)
                total += r
                steps += 1
                done = terminated or truncated
            returns[policy].append(total)
    per_step = (time.perf_counter() - start) / steps
    assert per_step < 1e-3
    assert np.mean(returns["greedy"]) > np.mean(returns["random"]) + 20  # 50-step episodes


def test_toy_reach_center_keeps_the_target_at_the_centre_and_a_good_policy_beats_random():
    env = envs.make("toy-reach-center", seed=0)
    targets, returns = [], {"random": [], "greedy": []}
    rng = np.random.default_rng(0)
    for policy in returns:
        for _ in range(10):
            env.reset()
            targets.append(env.target.copy())
            total, done = 0.0, False
            while not done:
                a = env.optimal_action() if policy == "greedy" else rng.uniform(-1, 1, 2)
                _, r, terminated, truncated, _ = env.step(a)
                total += r
                done = terminated or truncated
            returns[policy].append(total)
    assert np.all(np.array(targets) == 0)
    assert np.mean(returns["greedy"]) > np.mean(returns["random"]) + 20


def test_envs_close_cleanly_without_egl_errors():
    code = ("import envs; e = envs.make('dcs-cartpole-swingup', distraction='easy', image_size=16);"
            "e.reset(); e.step([0.0]); e.close()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "EGLError" not in out.stderr and "Traceback" not in out.stderr


def test_control_suite_tasks_render_with_a_1024_px_shadow_map():
    """Speed: 1024 px instead of the models' 2048 px renders the same frames at agent sizes."""
    env = envs.make("dmc-cartpole-swingup", seed=0)
    try:
        assert int(env.unwrapped.physics.model.vis.quality.shadowsize) == 1024
        obs, _ = env.reset(seed=0)
        assert obs.shape == (3, 64, 64) and obs.dtype == np.uint8 and obs.std() > 0
    finally:
        env.close()


HEADLESS_NOTICE = ("envs: no display and MUJOCO_GL unset: rendering with MUJOCO_GL=egl "
                   "(set MUJOCO_GL to choose)")


def run_python(code: str, **environ) -> subprocess.CompletedProcess:
    """`python -c code` without a display and without MUJOCO_GL, plus `environ`."""
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "DISPLAY", "WAYLAND_DISPLAY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(env, PYTHONPATH=str(Path(__file__).resolve().parent.parent), **environ))
    assert out.returncode == 0, out.stderr
    return out


def test_without_a_display_or_mujoco_gl_envs_renders_with_egl_and_says_so_once():
    code = ("import importlib, os, envs; importlib.reload(envs);"  # a second import stays silent
            "e = envs.make('dmc-cartpole-swingup', image_size=32); o, _ = e.reset(); e.close();"
            "print(o.shape, o.std() > 0, os.environ['MUJOCO_GL'])")
    out = run_python(code)
    assert out.stdout.splitlines()[-1] == "(3, 32, 32) True egl"
    assert out.stderr.count(HEADLESS_NOTICE) == 1 and out.stderr.count("envs:") == 1, out.stderr


@pytest.mark.parametrize("environ,gl", [(dict(MUJOCO_GL="egl"), "egl"), (dict(MUJOCO_GL="osmesa"), "osmesa"),
                                        (dict(DISPLAY=":99"), None), (dict(WAYLAND_DISPLAY="wayland-9"), None)])
def test_a_mujoco_gl_or_display_of_the_users_is_kept_and_nothing_is_printed(environ, gl):
    out = run_python("import os, envs; print(os.environ.get('MUJOCO_GL'))", **environ)
    assert out.stdout.splitlines()[-1] == str(gl)
    assert "envs:" not in out.stderr, out.stderr
