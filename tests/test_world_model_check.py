"""tools/world_model_check.py: the world-model and critic check of a Dreamer-family checkpoint."""

import dataclasses
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import world_model_check  # noqa: E402


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
    args = module.preset_args("tiny", env="toy-reach-center", seed=3)
    agent = module.Agent(args, 2, False, torch.device("cpu"))
    path = tmp_path / "checkpoint.pt"
    torch.save(dict(agent=agent.state_dict(), args=dataclasses.asdict(args)), path)
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


def test_a_checkpoint_of_another_script_is_named_in_one_line(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save(dict(agent={}, args=dict(exp_name="core")), path)
    with pytest.raises(SystemExit, match="a checkpoint of 'core'"):
        world_model_check.main([str(path)])
