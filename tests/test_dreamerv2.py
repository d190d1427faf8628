"""Specification of dreamerv2.py: shapes, KL balancing, lambda-return, learning, CLI."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import dreamerv2 as dv2
import benchmark
from conftest import ROOT, collect_episodes, check_beats_random, check_run_then_resume, smoke_args


def tiny_args(**kw):
    return dv2.preset_args("tiny", **kw)


def batch_from(replay, args, seed=0):
    replay.rng = np.random.default_rng(seed)
    return dv2.to_torch(replay.sample(args.batch_size, args.batch_length), torch.device("cpu"))


@pytest.fixture(scope="module")
def cartpole_replay():
    """Real pixels: random-action episodes of dmc-cartpole-balance (125 agent steps each)."""
    replay = dv2.Replay(1000, (3, 64, 64), 1, seed=0)
    for episode in collect_episodes("dmc-cartpole-balance", episodes=1, seed=0):
        replay.add_episode(*episode)
    return replay


def test_world_model_terms_are_finite_scalars_and_states_have_documented_shapes(cartpole_replay):
    args = tiny_args()
    agent = dv2.Agent(args, 1, False, torch.device("cpu"))
    batch = batch_from(cartpole_replay, args)
    loss, post, metrics = dv2.world_model_loss(agent.wm, batch, args)
    T, B = args.batch_length, args.batch_size
    assert post["stoch"].shape == post["logits"].shape == (T, B, args.stoch, args.classes)
    assert post["deter"].shape == (T, B, args.deter)
    assert dv2.RSSM.feat(agent.wm.rssm, post).shape == (T, B, args.stoch * args.classes + args.deter)
    # one-hot samples
    assert torch.all(post["stoch"].sum(-1) == 1)
    for name, value in metrics.items():
        assert value.shape == () and torch.isfinite(value), name
    actor_loss, critic_loss, ac_metrics = dv2.behaviour_losses(agent.wm, agent.ac, post, args, False)
    for name, value in {"actor": actor_loss, "critic": critic_loss, **ac_metrics}.items():
        assert value.shape == () and torch.isfinite(value), name


def test_kl_balancing_splits_the_gradient_080_to_prior_and_020_to_posterior():
    rssm = dv2.RSSM(embed_dim=4, action_dim=1, deter=4, hidden=4, stoch=3, classes=5)
    torch.manual_seed(0)
    post = torch.randn(2, 3, 3, 5, requires_grad=True)
    prior = torch.randn(2, 3, 3, 5, requires_grad=True)
    balanced, _ = dv2.kl_balance(post, prior, rssm, alpha=0.8, free=0.0)
    g_post, g_prior = torch.autograd.grad(balanced, [post, prior])
    plain = torch.distributions.kl_divergence(rssm.dist(post), rssm.dist(prior)).mean()
    p_post, p_prior = torch.autograd.grad(plain, [post, prior])
    torch.testing.assert_close(g_prior, 0.8 * p_prior)
    torch.testing.assert_close(g_post, 0.2 * p_post)
    # the value is the plain KL
    torch.testing.assert_close(balanced, plain)


def test_free_nats_stop_the_kl_gradient_below_the_threshold():
    rssm = dv2.RSSM(embed_dim=4, action_dim=1, deter=4, hidden=4, stoch=3, classes=5)
    post = torch.zeros(2, 3, 3, 5, requires_grad=True)
    prior = (0.01 * torch.randn(2, 3, 3, 5)).requires_grad_()
    loss, _ = dv2.kl_balance(post, prior, rssm, alpha=0.8, free=1.0)
    assert loss.item() == pytest.approx(1.0)
    assert torch.all(torch.autograd.grad(loss, prior)[0] == 0)


def test_lambda_return_matches_a_hand_computed_example():
    reward = torch.tensor([[1.0], [2.0], [3.0]])
    value = torch.tensor([[10.0], [20.0], [30.0]])
    discount = torch.full((3, 1), 0.5)
    bootstrap = torch.tensor([40.0])
    lam = 0.5
    # V_2 = 3 + 0.5 * 40 = 23
    # V_1 = 2 + 0.5 * (0.5 * 30 + 0.5 * 23) = 15.25
    # V_0 = 1 + 0.5 * (0.5 * 20 + 0.5 * 15.25) = 9.8125
    out = dv2.lambda_return(reward, value, discount, bootstrap, lam)
    torch.testing.assert_close(out, torch.tensor([[9.8125], [15.25], [23.0]]))
    # lambda = 1 is the discounted Monte-Carlo return bootstrapped at the end
    mc = dv2.lambda_return(reward, value, discount, bootstrap, 1.0)
    torch.testing.assert_close(mc[0], torch.tensor([1 + 0.5 * 2 + 0.25 * 3 + 0.125 * 40]))


def test_truncated_normal_is_a_normalised_density_on_the_action_box():
    loc, scale = torch.tensor([0.7, -0.2]), torch.tensor([0.5, 0.1])
    dist = dv2.TruncatedNormal(loc, scale)
    x = torch.linspace(-1, 1, 20001)[:, None]
    density = dist.log_prob(x).exp()
    integral = torch.trapezoid(density, x[:, 0], dim=0)
    torch.testing.assert_close(integral, torch.ones(2), atol=1e-3, rtol=0)
    entropy = -torch.trapezoid(density * dist.log_prob(x), x[:, 0], dim=0)
    torch.testing.assert_close(dist.entropy(), entropy, atol=1e-3, rtol=0)
    samples = dist.rsample((5000,))
    assert samples.abs().max() < 1
    torch.testing.assert_close(samples.mean(0), dist.mean, atol=0.02, rtol=0)


def test_actor_update_leaves_the_world_model_untouched(cartpole_replay):
    args = tiny_args()
    agent = dv2.Agent(args, 1, False, torch.device("cpu"))
    batch = batch_from(cartpole_replay, args)
    _, post, _ = dv2.world_model_loss(agent.wm, batch, args)
    before = [p.detach().clone() for p in agent.wm.parameters()]
    actor_before = [p.detach().clone() for p in agent.ac.actor.parameters()]
    actor_loss, critic_loss, _ = dv2.behaviour_losses(agent.wm, agent.ac, post, args, False)
    agent.actor_opt.zero_grad()
    actor_loss.backward(inputs=list(agent.ac.actor.parameters()))
    agent.actor_opt.step()
    assert all(p.grad is None for p in agent.wm.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, agent.wm.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(actor_before, agent.ac.actor.parameters()))


def test_replay_sequences_never_cross_episode_boundaries_and_wrap_around():
    replay = dv2.Replay(capacity=25, obs_shape=(1, 1, 1), action_dim=1, seed=0)
    for e in range(4):  # 4 episodes of 10 steps in 25 slots: the ring wraps
        obs = np.full((10, 1, 1, 1), e, np.uint8)
        replay.add_episode(obs, np.zeros((10, 1)), np.arange(10, dtype=np.float32), np.ones(10))
    batch = replay.sample(200, 6)
    obs = batch["obs"][:, :, 0, 0, 0]  # (T, B) episode ids
    assert np.all(obs == obs[:1])  # one episode per sequence
    assert set(np.unique(obs)) <= {1, 2, 3}  # episode 0 was overwritten
    steps = batch["reward"]
    assert np.all(np.diff(steps, axis=0) == 1)  # consecutive steps


def test_fifty_updates_on_a_fixed_batch_reduce_the_world_model_loss(cartpole_replay):
    torch.manual_seed(0)
    args = tiny_args(cnn_depth=8, deter=32, batch_length=16, batch_size=8)
    agent = dv2.Agent(args, 1, False, torch.device("cpu"))
    batch = batch_from(cartpole_replay, args)
    # Unit-variance Gaussian NLLs carry 0.5 ln(2 pi) per pixel and per reward, ~11,290 nats that no
    # model can remove; measure what lies above that floor.
    floor = (3 * 64 * 64 + 1) * 0.5 * np.log(2 * np.pi)
    losses = [agent.update(batch)["model_loss"].item() - floor for _ in range(50)]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_cli_runs_end_to_end_writes_logs_and_checkpoint_and_resumes(tmp_path):
    flags = ["--env", "dmc-cartpole-balance", "--preset", "tiny", "--eval-every", "1000",
             "--log-every", "400", "--prefill", "60"]
    check_run_then_resume("dreamerv2.py", flags, 1200, 2000, tmp_path, "losses/model_loss")


@pytest.mark.parametrize("flags,message", [
    (["--env", "dcs-walkr-walk"], "did you mean 'walker'"),
    (["--env", "dcs-walker-walk", "--distraction", "extreme"], "unknown distraction 'extreme'"),
    (["--device", "cuda:99"], "--device cuda:99"),
])
def test_bad_cli_input_gets_a_clear_message_and_no_traceback(tmp_path, flags, message):
    cmd = [sys.executable, str(ROOT / "dreamerv2.py"), "--preset", "tiny", *flags]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and message in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_dreamerv2_beats_random_on_toy_reach_center(tmp_path, monkeypatch):
    """About 10 minutes on 2 CPU cores (criterion: conftest.check_beats_random)."""
    monkeypatch.chdir(tmp_path)
    run_dir = dv2.main(smoke_args(dv2, "dreamerv2"))
    check_beats_random(run_dir, benchmark.SMOKE_ENV)

