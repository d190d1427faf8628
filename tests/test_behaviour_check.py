"""tools/behaviour_check.py: what a checkpoint's policy does in its evaluation episodes."""

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import behaviour_check  # noqa: E402
from conftest import tiny_checkpoint  # noqa: E402


@pytest.mark.parametrize("script", behaviour_check.SCRIPTS)
def test_saturation_counts_the_action_components_at_the_bound(script, tmp_path, monkeypatch):
    module = importlib.import_module(script)
    path = tiny_checkpoint(module, tmp_path / "checkpoint.pt")
    act = module.Agent.act

    def half_at_the_bound(self, obs, state, explore, **kw):  # the agent's state, a fixed action
        _, state = act(self, obs, state, explore, **kw)
        return np.array([-1.0, 0.5], np.float32), state

    monkeypatch.setattr(module.Agent, "act", half_at_the_bound)
    report = behaviour_check.main([str(path), "--episodes", "2"])
    assert report["script"] == script and len(report["episode_returns"]) == 2
    assert report["steps"] > 2
    assert report["action_saturation"] == pytest.approx(0.5)
    assert report["action_abs_mean"] == pytest.approx(0.75)
    assert "state_abs_mean" not in report  # a toy env has no physical state


def test_a_dmc_task_reports_where_its_state_spends_the_episode(tmp_path):
    import dreamerv2

    path = tiny_checkpoint(dreamerv2, tmp_path / "dmc.pt", env="dmc-cartpole-swingup", action_dim=1)
    report = behaviour_check.main([str(path), "--episodes", "1"])
    state = report["state_abs_mean"]
    assert list(state) == ["position[0]", "position[1]", "position[2]", "velocity[0]", "velocity[1]"]
    assert 0 <= state["position[0]"] <= 1.8 and 0 <= state["position[1]"] <= 1
    assert 0 <= report["action_saturation"] <= 1


def test_a_checkpoint_of_an_unknown_script_is_named_in_one_line(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save(dict(agent={}, args=dict(exp_name="nosuch")), path)
    with pytest.raises(SystemExit, match="a checkpoint of 'nosuch'"):
        behaviour_check.main([str(path)])


@pytest.mark.parametrize("script", behaviour_check.SCRIPTS)
def test_explore_plays_the_training_time_actions(script, tmp_path):
    module = importlib.import_module(script)
    path = tiny_checkpoint(module, tmp_path / "checkpoint.pt")
    mode = behaviour_check.main([str(path), "--episodes", "1"])
    explore = behaviour_check.main([str(path), "--episodes", "1", "--actions", "explore"])
    assert (mode["actions"], explore["actions"]) == ("mode", "explore")
    again = behaviour_check.main([str(path), "--episodes", "1"])
    assert again["action_abs_mean"] == mode["action_abs_mean"]  # the mode replays exactly
    assert explore["action_abs_mean"] != mode["action_abs_mean"]  # samples do not


DREAMERS = ("dreamerv2", "dreamingv2", "blast")


@pytest.mark.parametrize("script", DREAMERS)
def test_the_truncated_normal_mean_is_the_average_of_its_samples(script):
    module = importlib.import_module(script)
    torch.manual_seed(0)
    loc = torch.tensor([-0.9, 0.0, 0.5, 0.99, 0.99])
    scale = torch.tensor([0.3, 1.2, 0.1, 0.1, 1.0])
    dist = module.TruncatedNormal(loc, scale)
    samples = dist.rsample((200_000,))
    assert torch.allclose(dist.mean, samples.mean(0), atol=5e-3)
    assert dist.mean[3] < 0.95 < dist.mode[3]  # a location at the bound: the mean lies inside


@pytest.mark.parametrize("script", DREAMERS)
def test_mean_actions_are_the_eval_action_flag_and_deterministic(script, tmp_path):
    module = importlib.import_module(script)
    path = tiny_checkpoint(module, tmp_path / "checkpoint.pt")
    mode = behaviour_check.main([str(path), "--episodes", "1"])
    mean = behaviour_check.main([str(path), "--episodes", "1", "--actions", "mean"])
    again = behaviour_check.main([str(path), "--episodes", "1", "--actions", "mean"])
    assert mean["actions"] == "mean"
    assert again["action_abs_mean"] == mean["action_abs_mean"] != mode["action_abs_mean"]
    # what the tool plays is what the script's --eval-action selects
    torch.manual_seed(0)
    dist = module.Actor(8, 2, False, 16, 2)(torch.randn(4, 8) * 3)
    assert torch.equal(module.mode(dist, "mean"), dist.base_dist.mean)
    assert torch.equal(module.mode(dist), dist.base_dist.loc.clamp(-1, 1))


@pytest.mark.parametrize("script", DREAMERS)
def test_the_actions_flag_decides_not_the_eval_action_the_run_was_trained_with(script, tmp_path):
    """A run trained with --eval-action mean, checked with the default --actions mode, plays the
    mode: the same actions as the same networks saved by a run that evaluated with the mode."""
    module = importlib.import_module(script)
    torch.manual_seed(0)
    by_mode = tiny_checkpoint(module, tmp_path / "mode.pt")
    torch.manual_seed(0)  # the same initial networks
    by_mean = tiny_checkpoint(module, tmp_path / "mean.pt", eval_action="mean")
    mode = behaviour_check.main([str(by_mean), "--episodes", "1"])
    assert mode["actions"] == "mode"
    assert mode["action_abs_mean"] == behaviour_check.main([str(by_mode), "--episodes", "1"])["action_abs_mean"]
    mean = behaviour_check.main([str(by_mean), "--episodes", "1", "--actions", "mean"])
    assert mean["action_abs_mean"] != mode["action_abs_mean"]


@pytest.mark.parametrize("script", ("cvrl", "core"))
def test_mean_actions_of_a_sac_actor_end_in_one_line(script, tmp_path):
    module = importlib.import_module(script)
    path = tiny_checkpoint(module, tmp_path / "checkpoint.pt")
    with pytest.raises(SystemExit, match="no truncated-normal mean"):
        behaviour_check.main([str(path), "--actions", "mean"])
