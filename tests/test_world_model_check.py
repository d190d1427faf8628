"""tools/world_model_check.py: the world-model and critic check of a Dreamer-family checkpoint."""

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import world_model_check  # noqa: E402
from conftest import tiny_checkpoint  # noqa: E402


class Constant(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, feat):
        return torch.full((*feat.shape[:-1], 1), self.value)


@pytest.mark.parametrize("script", world_model_check.SCRIPTS)
def test_the_check_sums_h_predicted_rewards_per_start_and_counts_every_start(script, tmp_path,
                                                                             monkeypatch, capsys):
    module = importlib.import_module(script)
    path = tiny_checkpoint(module, tmp_path / "checkpoint.pt")
    # A reward head that predicts 0.25 everywhere: one step predicts 0.25, H steps 0.25 * H.
    build = module.Agent.load_state_dict

    def load_then_constant(self, state):
        build(self, state)
        self.wm.reward = Constant(0.25)

    monkeypatch.setattr(module.Agent, "load_state_dict", load_then_constant)
    report = world_model_check.main([str(path), "--episodes", "2", "--horizon", "4"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report))
    steps = report["reward_one_step"]["n"]
    assert steps >= 2 * 4 and report["value"]["n"] == steps
    assert report["reward_one_step"]["predicted"] == pytest.approx(0.25)
    for key in ("reward_open_loop", "imagined_return"):
        assert report[key]["n"] == steps - 2 * (4 - 1)  # starts with 4 real steps after them
        assert report[key]["predicted"] == pytest.approx(1.0)
    assert len(report["episode_returns"]) == 2


def test_random_or_another_runs_agent_can_play_the_episodes_the_model_filters(tmp_path, capsys):
    import blast
    import dreamerv2

    model = tiny_checkpoint(dreamerv2, tmp_path / "model.pt")
    other = tiny_checkpoint(blast, tmp_path / "other.pt", seed=4)
    reports = {policy: world_model_check.main([str(model), "--episodes", "1", "--horizon", "3",
                                               "--policy", policy])
               for policy in ("agent", "random", str(other))}
    for policy, report in reports.items():
        assert report["policy"] == policy
        has_own = policy == "agent"
        assert ("imagined_return" in report) == has_own and ("value" in report) == has_own
        assert report["reward_open_loop"]["n"] == report["reward_one_step"]["n"] - 2
    # the three policies play different episodes: different real rewards
    reals = {report["reward_one_step"]["real"] for report in reports.values()}
    assert len(reals) == 3
    wrong = tiny_checkpoint(blast, tmp_path / "wrong.pt", env="toy-reach")
    with pytest.raises(SystemExit, match="an agent for toy-reach, not toy-reach-center"):
        world_model_check.main([str(model), "--policy", str(wrong)])


def test_a_checkpoint_of_another_script_is_named_in_one_line(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save(dict(agent={}, args=dict(exp_name="core")), path)
    with pytest.raises(SystemExit, match="a checkpoint of 'core'"):
        world_model_check.main([str(path)])


def test_the_state_probe_scores_a_linear_readout_near_one_and_noise_near_zero():
    rng = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=rng).double().numpy()
    w = torch.randn(12, 3, generator=rng).double().numpy()
    y = x @ w
    r2 = world_model_check.ridge_r2(x[:200], y[:200], x[200:], y[200:])
    assert r2.shape == (3,) and (r2 > 0.99).all()
    noise = torch.randn(400, 2, generator=rng).double().numpy()  # independent of x
    r2 = world_model_check.ridge_r2(x[:200], noise[:200], x[200:], noise[200:])
    assert (r2 < 0.1).all()


def test_the_state_probe_reads_the_dmc_tasks_state_and_toy_envs_have_none(tmp_path):
    import dreamerv2

    dmc = tiny_checkpoint(dreamerv2, tmp_path / "dmc.pt", env="dmc-cartpole-swingup", action_dim=1)
    report = world_model_check.main([str(dmc), "--episodes", "2", "--horizon", "3", "--policy", "random"])
    r2 = report["state_probe_r2"]
    assert list(r2) == ["position[0]", "position[1]", "position[2]", "velocity[0]", "velocity[1]"]
    assert all(value <= 1.0 for value in r2.values())
    toy = tiny_checkpoint(dreamerv2, tmp_path / "toy.pt")
    assert "state_probe_r2" not in world_model_check.main([str(toy), "--episodes", "2", "--horizon", "3"])
