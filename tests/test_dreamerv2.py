"""Specification of dreamerv2.py: shapes, KL balancing, lambda-return, learning, CLI."""

import copy
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import dreamerv2 as dv2
import benchmark
from conftest import (collect_episodes, check_beats_random, smoke_args, without_host_sync,
                      sync_test_device, check_bad_cli_input, check_dreamerv2_weight_decay,
                      check_output_layer_in_fp32, check_behaviour_step_freezes_world_model,
                      preset_flags, make_agent, synthetic_batch)


def tiny_args(**kw):
    return preset_flags(dv2, "tiny", **kw)[0]


def tiny_agent(action_dim=1, discrete=False, device="cpu", **kw):
    """A `--preset tiny` agent with `kw` set (Args or RunSettings fields, e.g. compile=True)."""
    args, settings = preset_flags(dv2, "tiny", **kw)
    return make_agent(dv2, args, settings, action_dim, discrete, device)


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


def test_the_action_into_an_episode_start_is_zeroed(cartpole_replay):
    """Official RSSM.obs_step: the action at is_first is zero, whatever the batch holds there."""
    agent = tiny_agent()
    args = agent.args
    batch = batch_from(cartpole_replay, args)
    batch["is_first"] = torch.zeros_like(batch["reward"])
    batch["is_first"][0] = 1.0
    losses = []
    for first_action in (0.0, 0.9):
        batch["action"][0] = first_action
        torch.manual_seed(0)
        losses.append(dv2.world_model_loss(agent.wm, batch, args)[0])
    assert torch.equal(losses[0], losses[1])
    batch["is_first"][0] = 0.0  # and the action does matter where it is not an episode start
    torch.manual_seed(0)
    assert not torch.equal(dv2.world_model_loss(agent.wm, batch, args)[0], losses[1])


def test_the_actor_is_credited_with_the_next_steps_return_and_the_slow_critic_is_the_baseline():
    """Official agent.py: the action at z_t (t = 0..H-2) gets V_{t+1}; REINFORCE's baseline is the
    slow critic v(z_t). So the actor loss depends on the slow critic, not on the trained critic."""
    agent = tiny_agent(3, True, actor_grad="reinforce")
    args = agent.args
    T, B = args.batch_length, args.batch_size
    post = dict(deter=torch.randn(T, B, args.deter),
                stoch=torch.nn.functional.one_hot(torch.randint(0, args.classes, (T, B, args.stoch)), args.classes).float())

    def actor_loss():
        torch.manual_seed(0)
        with torch.no_grad():
            return dv2.behaviour_losses(agent.wm, agent.ac, post, args, True)[0]

    before = actor_loss()
    with torch.no_grad():
        for p in agent.ac.critic.parameters():
            p.add_(torch.randn_like(p))
    assert torch.equal(actor_loss(), before)  # the trained critic plays no part in it
    with torch.no_grad():
        for p in agent.ac.target_critic.parameters():
            p.add_(torch.randn_like(p))
    assert not torch.equal(actor_loss(), before)  # the slow critic does
    # H - 1 policy terms per start state: the policy at the last imagined state never acts
    seen = []
    original = agent.ac.actor.forward
    agent.ac.actor.forward = lambda feat: (seen.append(feat.shape[0]), original(feat))[1]
    torch.manual_seed(0)
    dv2.behaviour_losses(agent.wm, agent.ac, post, args, True)
    assert seen[-1] == args.horizon - 1  # the actor loss's forward pass over feats[:-2]


def test_world_model_terms_are_finite_scalars_and_states_have_documented_shapes(cartpole_replay):
    agent = tiny_agent()
    args = agent.args
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
    # Eq. 2 as weighted: image + reward_scale * reward + kl_scale * balanced KL
    m = metrics
    torch.testing.assert_close(loss, m["image_loss"] + m["reward_loss"] + m["kl_loss"])
    weighted = dataclasses.replace(args, reward_scale=10.0, kl_scale=2.0)
    loss, _, m = dv2.world_model_loss(agent.wm, batch, weighted)
    torch.testing.assert_close(loss, m["image_loss"] + 10.0 * m["reward_loss"] + 2.0 * m["kl_loss"])
    actor_loss, critic_loss, ac_metrics = dv2.behaviour_losses(agent.wm, agent.ac, post, args, False)
    for name, value in {"actor": actor_loss, "critic": critic_loss, **ac_metrics}.items():
        assert value.shape == () and torch.isfinite(value), name


def categoricals(logits):
    """The RSSM's latent as torch.distributions: independent one-hot categoricals."""
    return torch.distributions.Independent(torch.distributions.OneHotCategorical(logits=logits), 1)


def test_kl_balancing_splits_the_gradient_080_to_prior_and_020_to_posterior():
    torch.manual_seed(0)
    post = torch.randn(2, 3, 3, 5, requires_grad=True)
    prior = torch.randn(2, 3, 3, 5, requires_grad=True)
    balanced, _ = dv2.kl_balance(post, prior, alpha=0.8, free=0.0)
    g_post, g_prior = torch.autograd.grad(balanced, [post, prior])
    plain = torch.distributions.kl_divergence(categoricals(post), categoricals(prior)).mean()
    p_post, p_prior = torch.autograd.grad(plain, [post, prior])
    torch.testing.assert_close(g_prior, 0.8 * p_prior)
    torch.testing.assert_close(g_post, 0.2 * p_post)
    # the value is the plain KL
    torch.testing.assert_close(balanced, plain)


def test_free_nats_stop_the_kl_gradient_below_the_threshold():
    post = torch.zeros(2, 3, 3, 5, requires_grad=True)
    prior = (0.01 * torch.randn(2, 3, 3, 5)).requires_grad_()
    loss, _ = dv2.kl_balance(post, prior, alpha=0.8, free=1.0)
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
    agent = tiny_agent()
    args = agent.args
    batch = batch_from(cartpole_replay, args)
    _, post, _ = dv2.world_model_loss(agent.wm, batch, args)
    before = [p.detach().clone() for p in agent.wm.parameters()]
    actor_before = [p.detach().clone() for p in agent.ac.actor.parameters()]
    actor_loss, critic_loss, _ = dv2.behaviour_losses(agent.wm, agent.ac, post, args, False)
    agent.actor_opt(actor_loss)  # zero_grad, backward into the actor only, its step
    assert all(p.grad is None for p in agent.wm.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, agent.wm.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(actor_before, agent.ac.actor.parameters()))


def test_replay_sequences_never_cross_episode_boundaries_and_wrap_around():
    replay = dv2.Replay(capacity=25, obs_shape=(1, 1, 1), action_dim=1, seed=0)
    for e in range(4):  # 4 episodes of 10 steps in 25 slots: the ring wraps
        obs = np.full((10, 1, 1, 1), e, np.uint8)
        replay.add_episode(obs, np.zeros((10, 1)), np.arange(10, dtype=np.float32), np.ones(10))
    batch = {k: v.numpy() for k, v in replay.sample(200, 6).items()}
    obs = batch["obs"][:, :, 0, 0, 0]  # (T, B) episode ids
    assert np.all(obs == obs[:1])  # one episode per sequence
    assert set(np.unique(obs)) <= {1, 2, 3}  # episode 0 was overwritten
    steps = batch["reward"]
    assert np.all(np.diff(steps, axis=0) == 1)  # consecutive steps


@pytest.mark.parametrize("script", ["dreamerv2", "blast", "dreamingv2"])
def test_prioritize_ends_draws_each_episodes_last_start_length_plus_one_times_as_often(script):
    """DreamerV2's replay (prioritize_ends True): the last window of an episode is drawn
    length + 1 times as often as any other window; without it every window is equally likely.
    The Replay code is the same text in the three scripts."""
    module = __import__(script)
    length, n = 5, 300_000
    for prioritize, ratio in ((True, length + 1), (False, 1)):
        replay = module.Replay(100, (1, 1, 1), 1, seed=0, prioritize_ends=prioritize)
        for size in (12, 20):  # valid starts: slots 0..7 and 12..27; last ones 7 and 27
            replay.add_episode(np.zeros((size, 1, 1, 1), np.uint8), np.zeros((size, 1)),
                               np.zeros(size, np.float32), np.ones(size, np.float32))
        counts = np.bincount(replay.draw_starts(n, length), minlength=100)
        ends, others = [7, 27], [i for i in range(28) if i not in (7, 27, *range(8, 12))]
        assert counts[8:12].sum() == counts[28:].sum() == 0  # windows never cross episodes
        expected = n / (len(others) + ratio * len(ends))
        np.testing.assert_allclose(counts[others], expected, rtol=0.05)
        np.testing.assert_allclose(counts[ends], ratio * expected, rtol=0.05)


def test_fifty_updates_on_a_fixed_batch_reduce_the_world_model_loss(cartpole_replay):
    torch.manual_seed(0)
    agent = tiny_agent(cnn_depth=8, deter=32, batch_length=16, batch_size=8)
    args = agent.args
    batch = batch_from(cartpole_replay, args)
    # Unit-variance Gaussian NLLs carry 0.5 ln(2 pi) per pixel and per reward, ~11,290 nats that no
    # model can remove; measure what lies above that floor.
    floor = (3 * 64 * 64 + 1) * 0.5 * np.log(2 * np.pi)
    losses = [agent.update(batch)["model_loss"].item() - floor for _ in range(50)]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses




@pytest.mark.parametrize("flags,message", [
    (["--env", "dcs-walkr-walk"], "did you mean 'walker'"),
    (["--env", "dcs-walker-walk", "--distraction", "extreme"], "unknown distraction 'extreme'"),
    (["--device", "cuda:99"], "--device cuda:99"),
])
def test_bad_cli_input_gets_a_clear_message_and_no_traceback(tmp_path, flags, message):
    check_bad_cli_input("dreamerv2.py", flags, message, tmp_path)


def tensors(state, prefix=""):
    """Every tensor of a nested state dict, by path."""
    out = {}
    for key, value in state.items() if isinstance(state, dict) else enumerate(state):
        if torch.is_tensor(value):
            out[f"{prefix}{key}"] = value
        elif isinstance(value, (dict, list, tuple)):
            out.update(tensors(value, f"{prefix}{key}/"))
    return out


def assert_same_state(a, b):
    a, b = tensors(a), tensors(b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_batched_observe_equals_the_step_by_step_obs_step_loop():
    """observe (embedding branch and priors batched over T*B) == obs_step per step (acting)."""
    torch.manual_seed(0)
    rssm = dv2.RSSM(embed_dim=12, action_dim=2, deter=16, hidden=8, stoch=4, classes=5)
    embed, action = torch.randn(6, 3, 12), torch.randn(6, 3, 2)
    torch.manual_seed(1)
    post, prior = rssm.observe(embed, action)
    torch.manual_seed(1)
    state, steps = rssm.initial(3, "cpu"), []
    for t in range(6):
        state = rssm.obs_step(state, action[t], embed[t])
        steps.append(state)
    for key in ("deter", "stoch", "logits"):
        torch.testing.assert_close(post[key], torch.stack([s[key] for s in steps]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prior["logits"].flatten(-2), rssm.img_out(post["deter"]), atol=1e-5, rtol=1e-5)


def test_slow_critic_is_a_copy_of_the_critic_without_autograd_history():
    """Copied every `target_update_every` updates, in place and outside autograd; several updates
    in a row run (a slow critic with history made the third update's backward fail)."""
    torch.manual_seed(0)
    agent = tiny_agent(2, target_update_every=1)
    batch = synthetic_batch(dv2, agent, agent.args.batch_length, agent.args.batch_size)
    for _ in range(3):
        agent.update(batch)
        for slow, fast in zip(agent.ac.target_critic.parameters(), agent.ac.critic.parameters()):
            assert torch.equal(slow, fast) and not slow.requires_grad and slow.grad_fn is None


def test_compiled_losses_equal_eager_losses_on_cpu(compile_backend):
    """--compile (per `compile_backend`; with inductor on CPU, incl. the decoder's backward that used to crash) computes the same
    losses and gradients. Inductor draws its own random numbers unless fallback_random is set;
    with it the results agree to float rounding (tolerance 1e-4 relative)."""
    import torch._inductor.config

    torch._inductor.config.fallback_random = True
    kw = dict(batch_length=3, horizon=2, batch_size=2)
    eager = tiny_agent(2, **kw)
    compiled = tiny_agent(2, compile=True, **kw)
    batch = synthetic_batch(dv2, eager, 3, 2)
    for seed in (5, 6):  # the second update runs on the compiled graphs without recompiling
        torch.manual_seed(seed)
        expected = eager.update(batch)
        torch.manual_seed(seed)
        got = compiled.update(batch)
        for key in ("model_loss", "kl", "actor_loss", "critic_loss", "model_grad_norm",
                    "actor_grad_norm", "critic_grad_norm"):
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


def test_bf16_keeps_values_returns_log_probs_kl_and_losses_in_fp32(cartpole_replay):
    agent = tiny_agent(precision="bf16")
    args = agent.args
    batch = batch_from(cartpole_replay, args)
    with torch.autocast("cpu", torch.bfloat16):
        embed = agent.wm.encoder(batch["obs"])
        post, prior = agent.wm.rssm.observe(embed, batch["action"])
        _, kl = dv2.kl_balance(post["logits"], prior["logits"], 0.8, 1.0)
        start = {k: post[k].detach().flatten(0, 1) for k in ("deter", "stoch")}
        feats, actions = dv2.imagine(agent.wm, agent.ac.actor, start, args.horizon)
        value, slow = agent.ac.critic(feats), agent.ac.target_critic(feats)
        reward = agent.wm.reward(feats)
        target = dv2.lambda_return(reward[:-1, :, 0], slow[:-1, :, 0], torch.full_like(reward[:-1, :, 0], 0.99),
                                   slow[-1, :, 0], 0.95)
        log_prob = agent.ac.actor(feats[:-1]).log_prob(actions)
    assert embed.dtype == torch.bfloat16  # the networks do run in bf16
    for name, x in dict(kl=kl, value=value, slow_value=slow, reward=reward, target=target,
                        log_prob=log_prob).items():
        assert x.dtype == torch.float32, name
    _, post, metrics = agent.world_model_loss(agent.wm, batch, args)
    metrics.update(agent.behaviour_losses(agent.wm, agent.ac, post, args, False)[2])
    for name, x in metrics.items():
        assert x.dtype == torch.float32, name
    # reward and values are computed in fp32 (the output layer), not rounded to bf16 and cast
    feat = 3 * torch.randn(16, agent.wm.rssm.feat_dim)
    for net in (agent.wm.reward, agent.ac.critic, agent.ac.target_critic):
        check_output_layer_in_fp32(net, net, feat)


def test_behaviour_step_leaves_the_world_model_out_and_the_actor_gradient_through_the_latents(cartpole_replay):
    """Issue 22 item 9: with --compile, `backward(inputs=...)` does not prune a compiled backward, so
    the behaviour losses run with the world model frozen; the loss and the actor's gradient are
    unchanged. With no entropy bonus and dynamics gradients, the actor reaches its loss only
    through the imagined latents, so its non-zero gradient has come through them."""
    agent = tiny_agent(actor_entropy=0.0, actor_grad="dynamics")
    args = agent.args
    batch = batch_from(cartpole_replay, args)
    check_behaviour_step_freezes_world_model(agent, "behaviour_losses", lambda: agent.update(batch),
                                             agent.wm, agent.ac.actor, dv2.frozen)


def test_compiled_behaviour_backward_has_no_world_model_weight_in_its_graph(cartpole_replay, compile_backend):
    """The same with --compile (per `compile_backend`), where the fault was: the compiled actor
    loss's backward node accumulates into the actor's weights and none of the world model's."""
    agent = tiny_agent(actor_entropy=0.0, actor_grad="dynamics", compile=True)
    args = agent.args
    batch = batch_from(cartpole_replay, args)
    check_behaviour_step_freezes_world_model(agent, "behaviour_losses", lambda: agent.update(batch),
                                             agent.wm, agent.ac.actor, dv2.frozen)


def test_an_update_with_a_nan_in_the_batch_changes_no_parameter_and_is_flagged(cartpole_replay):
    agent = tiny_agent()
    args = agent.args
    batch = batch_from(cartpole_replay, args)
    agent.update(batch)  # Adam moments exist
    before = copy.deepcopy(agent.state_dict())
    bad = dict(batch, reward=batch["reward"].clone())
    bad["reward"][2, 1] = float("nan")
    agent.update(bad)
    # model, actor, critic: the model loss is not finite; the later steps are skipped with it
    assert agent.compute.flags().tolist() == [1.0, 0.0, 0.0]
    after = agent.state_dict()
    before.pop("updates"), after.pop("updates")
    assert_same_state(before, after)  # parameters, slow critic, Adam moments and step counts
    agent.update(batch)  # once halted, later updates are skipped too
    assert_same_state(before, {k: v for k, v in agent.state_dict().items() if k != "updates"})


def test_a_non_finite_loss_stops_the_run_with_a_checkpoint_from_before_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    update, before = dv2.Agent.update, {}

    def update_with_nan_reward_at_the_fourth(self, batch):
        if self.updates == 3:
            before.update(copy.deepcopy(self.state_dict()))
            batch = dict(batch, reward=torch.full_like(batch["reward"], float("nan")))
        return update(self, batch)

    monkeypatch.setattr(dv2.Agent, "update", update_with_nan_reward_at_the_fourth)
    flags = dv2.parse_args(["--env", "toy-reach", "--preset", "tiny", "--prefill", "30",
                            "--total-steps", "400", "--eval-every", "0"])
    with pytest.raises(SystemExit) as stop:
        dv2.main(*flags)
    # SystemExit with a message: Python prints it to stderr and exits with status 1
    message = stop.value.code
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert message.startswith("error: non-finite model_loss at update 4 (env step ")
    assert message.endswith(f"checkpoint from before it: {run_dir.relative_to(tmp_path) / 'checkpoint.pt'}")
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    saved = checkpoint["agent"]
    before.pop("updates"), saved.pop("updates")
    assert_same_state(before, saved)
    # the replay too, beside it (issue 22 item 7: otherwise only at the end or every 10th evaluation)
    replay = torch.load(run_dir / "replay.pt", weights_only=False)
    assert replay["env_steps"] == checkpoint["counters"]["env_steps"] and replay["replay"]["size"] > 0


def test_replay_is_allocated_once_at_the_capacity_the_run_can_fill():
    """Issue 22 item 7: a 2e6 capacity for a 10K-env-step run at action repeat 2 holds 5001 agent
    steps (plus the first observation of an episode), allocated at once, not by doubling."""
    slots = dv2.replay_slots(2_000_000, 10_000, 2, 50)
    assert slots == 5_001
    replay = dv2.Replay(slots, (3, 64, 64), 1, seed=0)
    assert len(replay.data["obs"]) == replay.capacity == 5_001
    storage = replay.data["obs"].data_ptr()
    replay.add_episode(np.zeros((501, 3, 64, 64), np.uint8), np.zeros((501, 1)), np.zeros(501), np.ones(501))
    assert replay.data["obs"].data_ptr() == storage and len(replay.data["obs"]) == 5_001
    assert replay.sample(2, 50)["is_first"][0].tolist() in ([0, 0], [1, 0], [0, 1], [1, 1])


def test_dreamerv2_defaults_match_official_config():
    """The official DMC-vision setting: danijar/dreamerv2 dreamerv2/configs.yaml (defaults and
    dmc_vision), agent.py and common/other.py (Optimizer)."""
    args = dv2.Args()
    # configs.yaml dmc: action_repeat 2 for every task (not PlaNet's 8 for cartpole, 4 for cheetah)
    for env in ("dmc-cartpole-swingup", "dmc-cheetah-run", "dcs-ball_in_cup-catch", "natural-reacher-easy",
                "dmc-walker-walk"):
        assert dv2.action_repeat(dv2.Args(env=env)) == 2, env
    assert dv2.action_repeat(dv2.Args(env="dmc-cartpole-swingup", action_repeat=0)) == 8  # PlaNet's
    assert dv2.action_repeat(dv2.Args(env="dmc-cheetah-run", action_repeat=4)) == 4
    assert args.replay_capacity == 2_000_000  # replay.capacity: 2e6 (agent steps)
    assert (args.batch_size, args.batch_length) == (16, 50)  # dataset: {batch: 16, length: 50}
    assert (args.deter, args.hidden, args.stoch, args.classes) == (200, 200, 32, 32)  # rssm (dmc)
    assert (args.cnn_depth, args.mlp_units, args.mlp_layers) == (48, 400, 4)
    assert (args.kl_balance, args.free_nats, args.kl_scale) == (0.8, 1.0, 1.0)  # kl, loss_scales
    assert args.reward_scale == 1.0  # loss_scales.reward
    assert (args.model_lr, args.actor_lr, args.critic_lr) == (3e-4, 8e-5, 8e-5)  # *_opt.lr (dmc)
    assert (args.adam_eps, args.grad_clip, args.weight_decay) == (1e-5, 100.0, 1e-6)  # *_opt
    assert (args.horizon, args.gamma, args.return_lambda, args.actor_entropy) == (15, 0.99, 0.95, 1e-4)
    assert (args.target_update_every, args.train_every, args.pretrain, args.prefill) == (100, 5, 100, 1000)
    assert args.pred_discount is False and args.actor_grad == "auto"  # dynamics for continuous
    # Keras defaults: Glorot-uniform kernels, zero biases
    assert args.init == "glorot"
    agent = tiny_agent()
    assert all(torch.all(m.bias == 0) for m in agent.wm.modules() if isinstance(m, torch.nn.Linear))
    # (1 - wd) per step, as DreamerV2's optimiser; the check steps the torch optimiser itself
    check_dreamerv2_weight_decay(SimpleNamespace(ac=agent.ac, critic_opt=agent.critic_opt.opt))


@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "discrete"])  # discrete: REINFORCE
def test_an_update_never_synchronises_with_the_host(discrete):
    device = sync_test_device()  # CUDA where there is one, else CPU (see without_host_sync)
    agent = tiny_agent(2, discrete, device)
    args = agent.args
    replay = dv2.Replay(1000, (3, 64, 64), 2, seed=0, device=device)
    replay.add_episode(np.zeros((40, 3, 64, 64), np.uint8), np.zeros((40, 2)), np.zeros(40), np.ones(40))
    # the training loop's device work: sampling, the update, acting (up to its numpy action)
    without_host_sync(lambda: agent.update(dv2.to_torch(replay.sample(args.batch_size, args.batch_length),
                                                        device)))
    state = agent.act(np.zeros((3, 64, 64), np.uint8), None, explore=True)[1]
    without_host_sync(agent.act, np.zeros((3, 64, 64), np.uint8), state, True, returns_to_host=True)


@pytest.mark.slow
def test_dreamerv2_beats_random_on_toy_reach_center(tmp_path, monkeypatch):
    """About 10 minutes on 2 CPU cores (criterion: conftest.check_beats_random)."""
    monkeypatch.chdir(tmp_path)
    run_dir = dv2.main(*smoke_args(dv2, "dreamerv2"))
    check_beats_random(run_dir, benchmark.SMOKE_ENV)



def test_cuda_graph_modes_keep_the_losses_and_survive_overwritten_outputs(cuda_graph_steps):
    """--compile-mode reduce-overhead: each compiled call begins a CUDA-graph step and what outlives
    one is copied first (the posterior into the behaviour losses, the metrics that the logger reads
    later), so the losses equal the eager ones, also for metrics read after the next update. The
    conftest simulation turns any use of an overwritten output into NaN. 'max-autotune' compiles
    without CUDA graphs."""
    kw = dict(batch_length=3, horizon=2, batch_size=2)
    tiny_agent(2, compile=True, compile_mode="max-autotune", **kw)
    assert cuda_graph_steps.modes == ["max-autotune-no-cudagraphs"] * 2
    runs = []
    for compile in (False, True):
        agent = tiny_agent(2, compile=compile, compile_mode="reduce-overhead", **kw)
        batch = synthetic_batch(dv2, agent, 3, 2)
        runs.append([])
        for seed in (5, 6):
            torch.manual_seed(seed)
            runs[-1].append(agent.update(batch))
    assert cuda_graph_steps.marks == 4
    for eager, got in zip(*runs):  # the first update's metrics are read after the second update
        for key in ("model_loss", "kl", "actor_loss", "critic_loss", "value", "actor_grad_norm"):
            torch.testing.assert_close(got[key], eager[key], rtol=1e-4, atol=1e-5, msg=key)
