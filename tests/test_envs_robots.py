"""Specification of the robot-arm families: robosuite, PyBullet box pushing, dm_control manipulation.

robosuite builds take seconds, so each test module shares one clean and one distracted env.
"""

import numpy as np
import pytest

import envs


@pytest.fixture(scope="module")
def door():
    """(clean, distracted) robosuite Door/Panda at 48 px, the distracted one with proprioception."""
    clean = envs.make("robosuite-door-panda", image_size=48, seed=1)
    noisy = envs.make("robosuite-door-panda", distraction="color-lighting-camera", image_size=48,
                      seed=1, proprio=True)
    yield clean, noisy
    clean.close()
    noisy.close()


def rollout(env, actions, seed):
    obs, _ = env.reset(seed=seed)
    frames, rewards = [obs["image"] if isinstance(obs, dict) else obs], []
    for a in actions:
        obs, r, terminated, truncated, info = env.step(a)
        assert not terminated and info["env_steps"] == 1
        frames.append(obs["image"] if isinstance(obs, dict) else obs)
        rewards.append(r)
    return np.stack(frames), np.array(rewards)


def assert_seed_replays(env, actions, seed):
    """The same seed and actions give identical frames and rewards; returns them."""
    f1, r1 = rollout(env, actions, seed)
    f2, r2 = rollout(env, actions, seed)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_array_equal(r1, r2)
    return f1, r1


def test_robosuite_spaces_follow_core_setup(door):
    clean, noisy = door
    assert clean.observation_space.shape == (3, 48, 48)
    assert clean.action_space.shape == (7,)  # OSC_POSE delta (6) + gripper
    assert np.all(clean.action_space.low == -1) and np.all(clean.action_space.high == 1)
    assert clean.time_limit == 500
    obs, _ = noisy.reset(seed=0)
    assert set(obs) == {"image", "proprio"}
    assert obs["image"].shape == (3, 48, 48) and obs["image"].dtype == np.uint8
    assert obs["proprio"].dtype == np.float32
    assert noisy.observation_space.contains(obs)


def test_robosuite_image_is_upright(door):
    """robosuite's own offscreen renderer gives the frame upside down; ours matches it flipped."""
    clean, _ = door
    obs, _ = clean.reset(seed=0)
    from robosuite.utils.binding_utils import MjRenderContextOffscreen

    size = clean._render_size
    sim = clean._env.sim
    if sim._render_context_offscreen is None:
        MjRenderContextOffscreen(sim, device_id=-1)  # registers itself with the sim
    sim._render_context_offscreen.vopt.geomgroup[0] = 0
    theirs = sim.render(camera_name="frontview", width=size, height=size)
    upright = np.flipud(theirs)[clean._window].transpose(2, 0, 1).astype(float)
    flipped = theirs[clean._window].transpose(2, 0, 1).astype(float)
    assert np.abs(obs - upright).mean() < 0.5 * np.abs(obs - flipped).mean()


def test_robosuite_seed_replays_and_distraction_leaves_rewards_unchanged(door):
    clean, noisy = door
    actions = np.random.default_rng(0).uniform(-1, 1, (6, 7))
    f1, r1 = assert_seed_replays(clean, actions, seed=5)
    f3, r3 = rollout(noisy, actions, seed=5)
    np.testing.assert_allclose(r1, r3, rtol=0, atol=1e-9)
    assert np.abs(f1.astype(int) - f3).mean() > 5  # colours, light and camera all changed


def test_robosuite_static_distraction_is_fixed_in_an_episode_and_resampled_across(door):
    _, noisy = door
    noisy.reset(seed=2)
    first = noisy.perturbation.state()
    for _ in range(4):
        noisy.step(np.zeros(7))
    np.testing.assert_array_equal(noisy.perturbation.state(), first)
    noisy.reset()
    second = noisy.perturbation.state()
    assert not np.array_equal(first, second)
    # The camera itself moves in the -camera setting.
    c = noisy.camera_id
    assert not np.allclose(noisy.model.cam_quat[c], noisy.perturbation.default["cam_quat"][c])


def test_robosuite_color_lighting_leaves_the_camera_alone():
    env = envs.make("robosuite-lift-panda", distraction="color-lighting", image_size=32, seed=0)
    try:
        env.reset()
        c, default = env.camera_id, env.perturbation.default
        np.testing.assert_array_equal(env.model.cam_pos[c], default["cam_pos"][c])
        np.testing.assert_array_equal(env.model.cam_quat[c], default["cam_quat"][c])
        assert not np.allclose(env.model.light_dir, default["light_dir"])
        assert not np.allclose(env.model.mat_rgba, default["mat_rgba"])
    finally:
        env.close()


@pytest.fixture(scope="module")
def boxpush():
    env = envs.make("pybullet-boxpush", seed=0)
    yield env
    env.close()


def test_boxpush_spaces_and_seeding(boxpush):
    assert boxpush.observation_space.shape == (3, 64, 64)
    assert boxpush.action_space.shape == (2,)
    actions = np.random.default_rng(1).uniform(-1, 1, (5, 2))
    f1, _ = assert_seed_replays(boxpush, actions, seed=3)
    f3, _ = rollout(boxpush, actions, seed=4)
    assert not np.array_equal(f1[0], f3[0])


def test_boxpush_reward_is_negative_distance_and_falls_as_the_box_moves_away(boxpush):
    boxpush.reset(seed=0)
    goal = boxpush.goal
    rewards = []
    for offset in (0.10, 0.20, 0.30):
        boxpush.place_box(goal + np.array([0.0, offset]) * np.sign(-goal[1] or 1))
        _, reward, terminated, _, info = boxpush.step(np.zeros(2))
        assert not terminated
        assert reward == pytest.approx(-info["distance"])
        rewards.append(reward)
    assert rewards[0] > rewards[1] > rewards[2]


def test_boxpush_bonus_fires_and_episode_ends_at_the_goal(boxpush):
    boxpush.reset(seed=1)
    boxpush.place_box(boxpush.goal + np.array([0.01, 0.0]))
    _, reward, terminated, truncated, info = boxpush.step(np.zeros(2))
    assert terminated and not truncated and info["success"]
    assert reward == pytest.approx(1.0 - info["distance"])
    assert reward > 0.9


def test_boxpush_arm_pushes_the_box_and_light_changes_per_episode(boxpush):
    boxpush.reset(seed=2)
    start, lights = boxpush.box_xy(), {tuple(boxpush.light)}
    for _ in range(40):  # drive the end effector straight through the box
        boxpush.step(np.clip((boxpush.box_xy() - boxpush.ee_target) / 0.03 + [0.5, 0], -1, 1))
    assert np.linalg.norm(boxpush.box_xy() - start) > 0.03
    for seed in (3, 4):
        boxpush.reset(seed=seed)
        lights.add(tuple(boxpush.light))
    assert len(lights) == 3


def test_manipulation_reach_duplo_renders_and_replays():
    env = envs.make("manipulation-reach-duplo", image_size=48, seed=0)
    try:
        assert env.observation_space.shape == (3, 48, 48)
        assert env.action_space.shape == (9,)
        actions = np.random.default_rng(0).uniform(-1, 1, (3, 9))
        f1, _ = assert_seed_replays(env, actions, seed=7)
        assert f1[0].std() > 10  # a real picture, not a blank frame
    finally:
        env.close()


@pytest.mark.parametrize("env_id,kwargs,message", [
    ("robosuite-door-pand", {}, "robosuite-<task>-<robot>.*panda"),
    ("robosuite-opendoor-panda", {}, "task in lift, door"),
    ("robosuite-door-panda", dict(distraction="medium"),
     "'medium' is for dcs-\\* envs; robosuite-\\* takes: none, color-lighting"),
    ("dmc-walker-walk", dict(proprio=True), "proprio=True needs a robosuite"),
    ("pybullet-push", {}, "pybullet-boxpush"),
    ("manipulation-reach-dupl", {}, "did you mean 'manipulation-reach-duplo'"),
])
def test_robot_families_reject_bad_input_clearly(env_id, kwargs, message):
    with pytest.raises(ValueError, match=message):
        envs.make(env_id, **kwargs)
