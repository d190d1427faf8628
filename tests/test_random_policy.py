"""Specification of tools/random_policy.py: the random policy measured like an agent."""

import json
import subprocess
import sys

import numpy as np
import pytest

import envs
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import random_policy  # noqa: E402


def test_episodes_start_from_the_scripts_evaluation_seeds():
    """Episode j of evaluation round e of run seed s: the scripts' episode_seed(s, "eval",
    e * 10_000 + j), a child of SeedSequence(s); different for every seed and round."""
    import dreamerv2

    for seed, index in [(1, 0), (3, 20_004), (5, 90_001)]:
        expected = dreamerv2.episode_seed(seed, "eval", index)
        assert random_policy.episode_seed(seed, index) == expected
    assert random_policy.episode_seed(1, 0) != random_policy.episode_seed(2, 0)
    assert random_policy.episode_seed(1, 0) != random_policy.episode_seed(1, 10_000)


def test_columns_take_the_cpu_suites_env_and_distraction():
    background = random_policy.column_settings("dcs-cartpole-swingup@background")
    assert (background["env"], background["distraction"]) == ("dcs-cartpole-swingup", "background")
    assert background["action_repeat"] == 8 and background["split"] == "val"
    assert random_policy.column_settings("dcs-cartpole-swingup")["distraction"] == "medium"
    assert random_policy.column_settings("dmc-cartpole-swingup")["distraction"] == "none"
    grid = random_policy.column_settings("minigrid-dynamic-obstacles-6x6@video")
    assert (grid["env"], grid["distraction"], grid["action_repeat"]) == (
        "minigrid-dynamic-obstacles-6x6", "video", 1)
    assert random_policy.column_settings("toy-reach-center")["distraction"] == "none"


def test_the_tool_writes_every_episode_and_its_statistics(tmp_path):
    out = tmp_path / "random_policy.json"
    saved = random_policy.main(["--columns", "toy-reach-center", "--seeds", "1", "2",
                                "--rounds", "0", "3", "--episodes", "2", "--out", str(out)])
    result = json.loads(out.read_text())["toy-reach-center"]
    assert result == saved["toy-reach-center"]
    returns = np.asarray(result["returns"])
    assert result["n"] == len(returns) == 2 * 2 * 2
    assert result["mean"] == pytest.approx(returns.mean())
    assert result["sd"] == pytest.approx(returns.std(ddof=1))
    assert result["se"] == pytest.approx(returns.std(ddof=1) / np.sqrt(8))
    assert (result["seeds"], result["rounds"], result["episodes_per_round"]) == ([1, 2], [0, 3], 2)
    assert "--columns toy-reach-center" in result["command"]
    assert len(set(np.round(returns, 6))) > 1  # different episodes, not one replayed
    # the third episode is run seed 1, round 3, episode 0; played here by hand it earns the same
    seed = random_policy.episode_seed(1, 30_000)
    env = envs.make("toy-reach-center", seed=1, image_size=64, split="val")
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        _, reward, terminated, truncated, _ = env.step(
            rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
        total += reward
        done = terminated or truncated
    assert returns[2] == pytest.approx(total)
    # a second call for another column keeps this one; the same call again gives the same numbers
    random_policy.main(["--columns", "toy-reach", "--seeds", "1", "--rounds", "0",
                        "--episodes", "1", "--out", str(out)])
    both = json.loads(out.read_text())
    assert set(both) == {"toy-reach-center", "toy-reach"}
    assert both["toy-reach-center"]["returns"] == result["returns"]
    again = random_policy.main(["--columns", "toy-reach-center", "--seeds", "1", "2", "--rounds",
                                "0", "3", "--episodes", "2", "--out", str(tmp_path / "b.json")])
    assert again["toy-reach-center"]["returns"] == result["returns"]


def test_minigrid_gets_uniform_discrete_actions_for_an_evaluations_length(tmp_path):
    saved = random_policy.main(["--columns", "minigrid-dynamic-obstacles-6x6", "--seeds", "1",
                                "--rounds", "0", "--episodes", "3", "--out",
                                str(tmp_path / "r.json")])
    result = saved["minigrid-dynamic-obstacles-6x6"]
    assert result["n"] == 3 and all(1 <= n <= 100 for n in result["lengths"])  # 100-step limit
    assert all(-100 <= r <= 100 for r in result["returns"])


def test_an_unknown_column_gets_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "random_policy.py"), "--columns",
                          "dcs-cartpole-swingup@nosuch", "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "dcs-cartpole-swingup@nosuch" in out.stderr and "nosuch" in out.stderr
