"""Specification of core.py: J_M and SAC terms, the contrastive loss, gradient routing, learning, CLI."""

import math

import numpy as np
import pytest
import torch

import core
import benchmark
from conftest import collect_episodes, check_beats_random, check_run_then_resume, smoke_args


def tiny_args(**kw):
    return core.preset_args("tiny", **kw)


@pytest.fixture(scope="module")
def dcs_replay():
    """Real pixels: two random-action episodes of dcs-walker-walk (medium), 48x48, 100 steps."""
    args = tiny_args()
    replay = core.Replay(1000, (3, args.render_size, args.render_size), 6, seed=0)
    for episode in collect_episodes("dcs-walker-walk", episodes=2, seed=0, distraction="medium",
                                    image_size=args.render_size, time_limit=200):
        replay.add_episode(*episode)
    return replay


def batch_from(replay, args, seed=0):
    replay.rng = np.random.default_rng(seed)
    return core.to_torch(replay.sample(args.batch_size, args.seq_len, args.crop_size), torch.device("cpu"))


def test_every_model_and_sac_term_is_a_finite_scalar(dcs_replay):
    args = tiny_args(gating=True)
    agent = core.Agent(args, 6, torch.device("cpu"))
    batch = batch_from(dcs_replay, args)
    assert batch["obs"].shape == (args.seq_len, args.batch_size, 3, args.crop_size, args.crop_size)
    loss, metrics = core.model_loss(agent.wm, batch, args)
    for key in ("contrastive_loss", "kl_loss", "reward_loss", "inverse_dynamics_loss", "model_loss"):
        assert metrics[key].shape == () and torch.isfinite(metrics[key]), key
    x, post, prior, mask = core.world_model_forward(agent.wm, batch)
    T, B = args.seq_len, args.batch_size
    assert x.shape == (T, B, args.embed)
    assert core.RSSM.latent(post).shape == (T, B, args.deter + args.stoch)
    assert mask.shape == (T, B, 1, args.crop_size, args.crop_size) and 0 <= mask.min() <= mask.max() <= 1
    metrics = agent.update(batch)
    for key in ("critic_loss", "actor_loss", "alpha_loss", "alpha", "entropy"):
        assert metrics[key].shape == () and torch.isfinite(metrics[key]), key


def test_reconstruction_objective_decodes_pixels_of_the_crop(dcs_replay):
    args = tiny_args(objective="reconstruction")
    agent = core.Agent(args, 6, torch.device("cpu"))
    loss, metrics = core.model_loss(agent.wm, batch_from(dcs_replay, args), args)
    assert "contrastive_loss" not in metrics and torch.isfinite(metrics["reconstruction_loss"])
    z = torch.zeros(2, 3, agent.wm.rssm.state_dim)
    assert agent.wm.pixel_decoder(z).shape == (2, 3, 3, args.crop_size, args.crop_size)


def test_contrastive_loss_is_symmetric_log_n_when_uninformative_and_zero_when_matched():
    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randn(16, 8)
    lam = torch.tensor(1.3)
    forward, _ = core.contrastive_loss(x, y, lam)
    swapped, _ = core.contrastive_loss(y, x, lam)
    torch.testing.assert_close(forward, swapped)
    uninformative, _ = core.contrastive_loss(x, y, torch.tensor(0.0))
    assert uninformative.item() == pytest.approx(math.log(16))
    unit = torch.nn.functional.normalize(torch.randn(16, 8), dim=-1)
    matched, accuracy = core.contrastive_loss(unit, unit, torch.tensor(50.0))
    assert matched.item() < 0.05 and accuracy.item() == 1.0


def test_same_sequence_negatives_only_compare_within_a_sequence():
    torch.manual_seed(0)
    T, B = 4, 3
    x, y = torch.randn(T * B, 5), torch.randn(T * B, 5)
    seq = torch.arange(B).repeat(T)
    same = seq[:, None] == seq[None, :]
    loss, _ = core.contrastive_loss(x, y, torch.tensor(0.0), same)
    assert loss.item() == pytest.approx(math.log(T))  # T candidates per row, not T * B


def test_inverse_temperature_and_encoder_get_gradients_from_the_contrastive_loss(dcs_replay):
    args = tiny_args(no_reward_loss=True, no_inverse_dynamics=True, beta=0.0)
    agent = core.Agent(args, 6, torch.device("cpu"))
    loss, metrics = core.model_loss(agent.wm, batch_from(dcs_replay, args), args)
    loss.backward()
    assert agent.wm.inverse_temperature_raw.grad.abs() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.wm.encoder.parameters())


@pytest.mark.parametrize("no_grad", [False, True])
def test_critic_loss_trains_the_encoder_unless_disabled(dcs_replay, no_grad):
    args = tiny_args(no_critic_grad_to_model=no_grad)
    agent = core.Agent(args, 6, torch.device("cpu"))
    batch = batch_from(dcs_replay, args)
    z = core.sac_states(agent.wm, batch, args, grad_to_model=not no_grad)
    loss, _ = core.critic_loss(agent.critics, agent.target_critics, agent.actor, agent.log_alpha, z, batch, args)
    loss.backward()
    grads = [p.grad for p in agent.wm.encoder.parameters()]
    if no_grad:
        assert all(g is None for g in grads)
    else:
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is not None for p in agent.critics.parameters())


def test_actor_update_leaves_model_and_critic_parameters_untouched(dcs_replay):
    args = tiny_args()
    agent = core.Agent(args, 6, torch.device("cpu"))
    batch = batch_from(dcs_replay, args)
    z = core.sac_states(agent.wm, batch, args, grad_to_model=True)
    others = [p.detach().clone() for m in (agent.wm, agent.critics) for p in m.parameters()]
    actor_before = [p.detach().clone() for p in agent.actor.parameters()]
    loss, _ = core.actor_loss(agent.critics, agent.actor, agent.log_alpha, z[:-1])
    agent.actor_opt.zero_grad()
    loss.backward(inputs=list(agent.actor.parameters()))
    agent.actor_opt.step()
    after = [p for m in (agent.wm, agent.critics) for p in m.parameters()]
    assert all(p.grad is None for p in after)
    assert all(torch.equal(a, b) for a, b in zip(others, after))
    assert not all(torch.equal(a, b) for a, b in zip(actor_before, agent.actor.parameters()))


def test_sequences_share_one_crop_and_acting_uses_the_centre():
    replay = core.Replay(50, (1, 6, 6), 1, seed=0)
    obs = np.arange(36, dtype=np.uint8).reshape(1, 1, 6, 6).repeat(20, 0)  # same image every step
    replay.add_episode(obs, np.zeros((20, 1)), np.zeros(20), np.ones(20))
    batch = replay.sample(64, 5, crop=4)
    crops = batch["obs"][:, :, 0]  # (T, B, 4, 4)
    assert np.all(crops == crops[:1])  # one crop position per sequence
    assert len({c.tobytes() for c in crops[0]}) > 1  # but different across sequences
    np.testing.assert_array_equal(core.centre_crop(obs[0], 4)[0], obs[0, 0, 1:5, 1:5])


def test_fifty_model_updates_raise_contrastive_accuracy_well_above_chance(dcs_replay):
    # Tiny sizes learn slower than the paper's, so this check uses a larger model learning rate.
    torch.manual_seed(0)
    args = tiny_args(batch_size=8, seq_len=8, model_lr=1e-3)
    agent = core.Agent(args, 6, torch.device("cpu"))
    batch = batch_from(dcs_replay, args)
    chance = 1 / ((args.seq_len - 1) * args.batch_size)  # t = 0 is left out of Eq. 1

    def accuracy():  # averaged over draws of the stochastic states
        with torch.no_grad():
            return np.mean([core.model_loss(agent.wm, batch, args)[1]["contrastive_accuracy"].item()
                            for _ in range(5)])

    before = accuracy()
    for _ in range(50):
        loss, _ = core.model_loss(agent.wm, batch, args)
        agent.model_opt.zero_grad()
        loss.backward()
        agent.model_opt.step()
    after = accuracy()
    assert after > 2.5 * chance and after > 2 * before, (before, after, chance)


def test_cli_runs_end_to_end_on_dcs_writes_logs_and_checkpoint_and_resumes(tmp_path):
    flags = ["--env", "dcs-walker-walk", "--distraction", "medium", "--preset", "tiny",
             "--eval-every", "400", "--log-every", "200"]
    check_run_then_resume("core.py", flags, 400, 600, tmp_path, "losses/contrastive_loss")


@pytest.mark.slow
def test_core_beats_random_on_toy_reach_center(tmp_path, monkeypatch):
    """About 8 minutes on 2 CPU cores (criterion: conftest.check_beats_random)."""
    monkeypatch.chdir(tmp_path)
    run_dir = core.main(smoke_args(core, "core"))
    check_beats_random(run_dir, benchmark.SMOKE_ENV)

