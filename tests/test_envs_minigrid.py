"""Specification of `minigrid-*`: BLAST's grid world and its four rendering changes (Sec. 3.1.1)."""

import numpy as np
import pytest

import envs
from envs.minigrid_env import DIRECTION_COLORS, triangle_mask

ENV_ID = "minigrid-dynamic-obstacles-6x6"
LEFT, RIGHT, FORWARD = 0, 1, 2


def rollout(distraction, actions, seed=0):
    env = envs.make(ENV_ID, distraction=distraction, seed=seed)
    try:
        obs, _ = env.reset(seed=seed)
        frames, rewards, infos, truncated = [obs], [], [], False
        for a in actions:
            obs, r, terminated, truncated, info = env.step(a)
            frames.append(obs)
            rewards.append(r)
            infos.append(info)
        return np.stack(frames), np.array(rewards), infos, truncated
    finally:
        env.close()


def agent_pixels(frame, color=(255, 0, 0)):
    return int((frame.transpose(1, 2, 0) == color).all(-1).sum())


def red_area(frame):
    """Red coverage in pixels, counting partly covered (area-resized) pixels fractionally; the
    clean scene has nothing else red (walls grey, obstacles blue, goal green, floor black)."""
    f = frame.astype(float)
    return np.clip(f[0] - np.maximum(f[1], f[2]), 0, None).sum() / 255


def test_minigrid_spaces_and_horizon():
    env = envs.make(ENV_ID)
    assert env.observation_space.shape == (3, 64, 64) and env.observation_space.dtype == np.uint8
    assert env.action_space.n == 3  # left, right, forward
    env.close()
    actions = np.random.default_rng(0).integers(0, 3, 100)
    frames, rewards, infos, truncated = rollout("none", actions)
    assert truncated and len(rewards) == 100
    assert frames.shape == (101, 3, 64, 64)


def test_minigrid_return_is_goals_minus_collisions_and_the_episode_goes_on():
    actions = np.random.default_rng(1).integers(0, 3, 100)
    _, rewards, infos, _ = rollout("none", actions)
    goals = sum(i["goals"] for i in infos)
    collisions = sum(i["collisions"] for i in infos)
    assert collisions > 1  # a random walk hits obstacles or walls more than once in 100 steps
    assert rewards.sum() == goals - collisions
    assert set(np.unique(rewards)) <= {-1.0, 0.0, 1.0}


def test_minigrid_distractions_change_pixels_but_not_rewards():
    actions = np.random.default_rng(2).integers(0, 3, 30)
    base_frames, base_rewards, _, _ = rollout("none", actions)
    for level in envs.FAMILY_LEVELS["minigrid"][1:]:
        frames, rewards, _, _ = rollout(level, actions)
        np.testing.assert_array_equal(rewards, base_rewards)
        assert not np.array_equal(frames, base_frames), level


def test_minigrid_smaller_agent_covers_a_quarter_of_the_pixels():
    for direction in range(4):
        ratio = triangle_mask(32, direction, 0.5).sum() / triangle_mask(32, direction).sum()
        assert 0.2 < ratio < 0.3
    full, _, _, _ = rollout("none", [])
    small, _, _, _ = rollout("smaller_agent", [])
    ratio = red_area(small[0]) / red_area(full[0])
    assert 0.2 < ratio < 0.3, ratio


def test_minigrid_color_direction_gives_four_distinct_agent_colours():
    frames, _, _, _ = rollout("color_direction", [LEFT] * 4)
    seen = []
    for frame in frames[:4]:  # four headings: turning never moves or collides
        present = [c for c in DIRECTION_COLORS if agent_pixels(frame, c) > 0]
        assert len(present) == 1
        seen.append(present[0])
    assert len(set(seen)) == 4
    plain, _, _, _ = rollout("none", [LEFT] * 4)
    assert all(agent_pixels(f) > 0 for f in plain[:4])  # default: always red


def floor_change(frames, floor):
    """Mean absolute change of the floor pixels between consecutive frames."""
    f = frames.astype(float)
    return np.abs(f[1:] - f[:-1]).transpose(0, 2, 3, 1)[:, floor].mean()


def test_minigrid_video_backgrounds_replace_the_floor_and_play_in_order():
    actions = [LEFT, RIGHT] * 10  # stay in place: only obstacles and background change
    clean, _, _, _ = rollout("none", actions)
    floor = (clean.transpose(0, 2, 3, 1) == 0).all(-1).all(0)  # black in every clean frame
    assert floor.mean() > 0.1
    video, _, _, _ = rollout("video", actions)
    random_frames, _, _, _ = rollout("random_frames", actions)
    for frames in (video, random_frames):
        assert frames.transpose(0, 2, 3, 1)[:, floor].mean() > 20  # no longer black
    # In order: consecutive video frames are alike; random frames jump around.
    assert floor_change(video, floor) < 0.7 * floor_change(random_frames, floor)


@pytest.mark.parametrize("env_id,kwargs,message", [
    ("minigrid-dynamic-obstacle-6x6", {}, "did you mean 'minigrid-dynamic-obstacles-6x6'"),
    (ENV_ID, dict(distraction="medium"), "'medium' is for dcs-\\* envs; minigrid-\\* takes"),
    (ENV_ID, dict(distraction="vid"), "did you mean 'video'"),
])
def test_minigrid_rejects_bad_input_clearly(env_id, kwargs, message):
    with pytest.raises(ValueError, match=message):
        envs.make(env_id, **kwargs)


def test_minigrid_rejects_bad_actions():
    env = envs.make(ENV_ID)
    env.reset()
    with pytest.raises(ValueError, match="action must be an int in \\[0, 3\\)"):
        env.step(5)
    env.close()
