"""Specification of dreamingv2.py: the critic and its logits (Fig. 2c), the contrastive terms
(Eq. 3, 6), the momentum encoder (Sec. III-E), k-step predictions, augmentation (Sec. III-F),
shapes, the fast update pattern and the CLI."""

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import benchmark
import dreamingv2 as dv
from conftest import (check_beats_random, collect_episodes, smoke_args, without_host_sync, sync_test_device,
                      check_bad_cli_input, check_dreamerv2_weight_decay, check_output_layer_in_fp32,
                      check_behaviour_step_freezes_world_model, preset_flags, make_agent, tiny_checkpoint)

CPU = torch.device("cpu")


def tiny_args(**kw):
    return preset_flags(dv, "tiny", **kw)[0]


def tiny_agent(action_dim=2, discrete=False, device="cpu", **kw):
    """A `--preset tiny` agent with `kw` set (Args or RunSettings fields, e.g. compile=True)."""
    args, settings = preset_flags(dv, "tiny", **kw)
    return make_agent(dv, args, settings, action_dim, discrete, device)


def random_batch(args, action_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, B = args.batch_length, args.batch_size
    return dict(obs=torch.randint(0, 255, (T, B, 3, 64, 64), dtype=torch.uint8, generator=g),
                action=torch.rand(T, B, action_dim, generator=g) * 2 - 1,
                reward=torch.rand(T, B, generator=g), cont=torch.ones(T, B), is_first=torch.zeros(T, B))


def captured(monkeypatch, name):
    """The outputs of every call of `dv.<name>` (as world_model_loss computes them, with their
    autograd graphs: its metrics are detached)."""
    calls, original = [], getattr(dv, name)
    monkeypatch.setattr(dv, name, lambda *a, **k: calls.append(original(*a, **k)) or calls[-1])
    return calls


@pytest.fixture(scope="module")
def cartpole_batch():
    """Real pixels: one random-action episode of dmc-cartpole-balance in the replay."""
    replay = dv.Replay(1000, (3, 64, 64), 1, seed=0)
    for episode in collect_episodes("dmc-cartpole-balance", episodes=1, seed=0, time_limit=200):
        replay.add_episode(*episode)
    return replay


# --- critic and contrastive terms --------------------------------------------------------------


def test_logit_is_sum_of_z_times_log_pmf_as_in_fig_2c_on_a_hand_computed_example():
    # 2 variables of 3 classes; W e gives the per-variable scores below (Fig. 2c calc_pmf).
    w = torch.nn.Linear(2, 6, bias=False)
    with torch.no_grad():
        w.weight.copy_(torch.tensor([[1., 0.], [0., 0.], [0., 0.],     # variable 0: [e0, 0, 0]
                                     [0., 0.], [0., 1.], [0., 2.]]))  # variable 1: [0, e1, 2 e1]
    e = torch.tensor([[math.log(2.0), math.log(3.0)]])
    log_pmf = dv.pmf_critic_log_pmf(w, e, stoch=2, classes=3)
    # variable 0: softmax([ln 2, 0, 0]) = [2/4, 1/4, 1/4]; variable 1: softmax([0, ln 3, ln 9]) = [1, 3, 9]/13
    torch.testing.assert_close(log_pmf.exp()[0], torch.tensor([[0.5, 0.25, 0.25], [1 / 13, 3 / 13, 9 / 13]]))
    z = torch.tensor([[[1., 0., 0.], [0., 0., 1.]]])  # classes 0 and 2
    logit = dv.contrastive_logits(z, log_pmf)
    assert logit.shape == (1, 1)
    torch.testing.assert_close(logit[0, 0], torch.tensor(math.log(0.5) + math.log(9 / 13)))


def test_nce_loss_is_log_n_for_uniform_pmfs_and_falls_towards_zero_for_matching_ones():
    n, stoch, classes = 6, 4, 5
    torch.manual_seed(0)
    z = F.one_hot(torch.randint(0, classes, (n, stoch)), classes).float()
    z[:, 0] = F.one_hot(torch.arange(n) % classes, classes).float()  # the z_i differ pairwise
    z[5, 1] = F.one_hot(torch.tensor(4), classes).float()
    assert len({tuple(v.argmax(-1).tolist()) for v in z}) == n
    uniform = torch.full((n, stoch, classes), -math.log(classes))
    loss, _ = dv.contrastive_nce(dv.contrastive_logits(z, uniform), torch.arange(n))
    torch.testing.assert_close(loss, torch.tensor(math.log(n)))
    losses = []
    for sharpness in (1.0, 2.0, 4.0, 8.0):  # PMFs that put more and more mass on z_j
        log_pmf = F.log_softmax(sharpness * z, -1)
        loss, accuracy = dv.contrastive_nce(dv.contrastive_logits(z, log_pmf), torch.arange(n))
        losses.append(loss.item())
    assert all(a > b for a, b in zip(losses, losses[1:])) and losses[-1] < 1e-4, losses
    assert accuracy == 1.0


@pytest.mark.parametrize("negatives", ["window", "batch"])
def test_perfectly_predicted_latents_and_matching_pmfs_give_accuracy_one_at_every_k(negatives):
    """End to end through `nce_objectives`, the scoring world_model_loss uses: latents that
    predict exactly the frame k steps later, and momentum PMFs peaked on each frame's own code,
    are classified right at every k and by the auxiliary term; predictions one step off are not
    (a batch-major flatten or an off-by-one in the pairing fails here)."""
    T, B, K, S, C = 7, 3, 3, 2, 5
    code = torch.arange(T * B).reshape(T, B)  # a distinct latent per (t, b): 2 variables base 5
    z = F.one_hot(torch.stack([code // C, code % C], -1), C).float()  # (T, B, S, C)
    log_pmf = F.log_softmax(20.0 * z, -1)
    latents = [z[k:] for k in range(K + 1)]  # element t of latents[k] predicts time t + k
    terms, (aux_loss, aux_accuracy) = dv.nce_objectives(latents, z, log_pmf, negatives)
    assert len(terms) == K + 1 and all(acc == 1.0 and loss < 1e-3 for loss, acc in terms)
    assert aux_accuracy == 1.0 and aux_loss < 1e-3
    off_by_one = [z[:-1]] + [z[k - 1:-1] for k in range(1, K + 1)]  # predict t + k - 1
    terms, _ = dv.nce_objectives(off_by_one, z, log_pmf, negatives)
    assert all(acc < 0.5 for _, acc in terms[1:])
    batch_major = [x.transpose(0, 1).reshape(x.shape) for x in latents]
    terms, _ = dv.nce_objectives(batch_major, z, log_pmf, negatives)
    assert any(acc < 1.0 for _, acc in terms)


def test_window_negatives_score_b_times_k_plus_one_latents_pairwise():
    """Fig. 2a: per window (B (K+1))^2 logits; 'batch' scores T * B candidates per latent."""
    T, B, K, S, C = 6, 2, 3, 2, 4
    torch.manual_seed(0)
    z = dv.sample_one_hot(torch.randn(T, B, S, C))
    log_pmf = F.log_softmax(torch.randn(T, B, S, C), -1)
    pmf = dv.windows(log_pmf, K)
    assert pmf.shape == (T - K, K + 1, B, S, C)
    torch.testing.assert_close(pmf[1, 2], log_pmf[3])  # window t, offset k holds time t + k
    logits = dv.contrastive_logits(dv.windows(z, K).flatten(1, 2), pmf.flatten(1, 2))  # per window
    assert logits.shape == (T - K, (K + 1) * B, (K + 1) * B)
    # row k * B + b of window t is z_{t+k, b}; column j * B + b' the PMF of x'_{t+j, b'}
    torch.testing.assert_close(logits[1, 2 * B + 1, 3 * B + 0], (z[3, 1] * log_pmf[4, 0]).sum())


def test_world_model_terms_are_finite_scalars_and_shapes_are_as_documented(cartpole_batch):
    agent = tiny_agent(1)
    args = agent.args
    cartpole_batch.rng = np.random.default_rng(0)
    batch = cartpole_batch.sample(args.batch_size, args.batch_length)
    loss, post, metrics = dv.world_model_loss(agent.wm, batch, args)
    T, B, S, C = args.batch_length, args.batch_size, args.stoch, args.classes
    assert post["stoch"].shape == post["logits"].shape == (T, B, S, C)
    assert post["deter"].shape == (T, B, args.deter)
    assert torch.all(post["stoch"].sum(-1) == 1)  # one-hot samples
    for name, value in metrics.items():
        assert value.shape == () and torch.isfinite(value), name
    assert {f"nce_loss_{k}" for k in range(args.nce_steps + 1)} <= set(metrics)
    priors = dv.multi_step_priors(agent.wm.rssm, post, batch["action"], args.nce_steps)
    assert [p["stoch"].shape for p in priors] == [(T - k, B, S, C) for k in range(1, args.nce_steps + 1)]
    # no image decoder anywhere
    assert not any("decoder" in name for name, _ in agent.wm.named_modules())


def test_linear_aux_dynamics_predicts_for_j_nce_while_j_kl_still_rolls_the_rssm(cartpole_batch, monkeypatch):
    """--aux-dynamics linear (Table III) replaces p~ in J_NCE_k only; the overshooting KL is the
    RSSM's, the same as with --aux-dynamics rssm for the same weights and random draws."""
    args = tiny_args()
    cartpole_batch.rng = np.random.default_rng(0)
    batch = cartpole_batch.sample(args.batch_size, args.batch_length)
    agent = tiny_agent(1, aux_dynamics="linear")
    wm, linear = agent.wm, agent.args
    wm_rssm = tiny_agent(1).wm
    wm_rssm.load_state_dict(wm.state_dict(), strict=False)
    torch.manual_seed(1)
    _, _, m_rssm = dv.world_model_loss(wm_rssm, batch, args)
    nce, kl_terms = captured(monkeypatch, "nce_objectives"), captured(monkeypatch, "kl_balance")
    kl_terms += captured(monkeypatch, "overshooting_kl")
    torch.manual_seed(1)
    _, _, m = dv.world_model_loss(wm, batch, linear)
    torch.testing.assert_close(m["kl_loss"], m_rssm["kl_loss"])
    assert not torch.allclose(m["nce_loss"], m_rssm["nce_loss"])
    nce_loss = sum(loss for loss, _ in nce[0][0])  # J_NCE_k, k = 0..K, as world_model_loss sums them
    (g,) = torch.autograd.grad(nce_loss, [wm.linear_dynamics.net.weight], retain_graph=True)
    assert g.abs().sum() > 0
    kl_loss = sum(term[0] if isinstance(term, tuple) else term for term in kl_terms)  # every J_KL_k
    (g,) = torch.autograd.grad(kl_loss, [wm.linear_dynamics.net.weight], allow_unused=True)
    assert g is None


def test_overshooting_kl_pairs_each_k_step_prior_with_the_posterior_k_steps_later(cartpole_batch):
    """PlaNet's latent overshooting (Sec. 4, Eq. 7): kl_loss = KL_0 (DreamerV2's balanced KL) +
    mean_k KL(sg(q_{t+k}) || p_k(z_{t+k} | z_t)); no gradient into the posterior from k >= 1."""
    agent = tiny_agent(1, free_nats=0.0)
    args, wm = agent.args, agent.wm
    cartpole_batch.rng = np.random.default_rng(0)
    batch = cartpole_batch.sample(args.batch_size, args.batch_length)
    torch.manual_seed(1)
    _, post, m = dv.world_model_loss(wm, batch, args)
    # redo the draws: random shifts, then observe and the k-step rollouts
    torch.manual_seed(1)
    obs = batch["obs"].flatten(0, 1)
    x = dv.random_shift(obs, args.aug_pad)
    dv.random_shift(obs, args.aug_pad)
    T, B = args.batch_length, args.batch_size
    post2, prior = wm.rssm.observe(wm.encoder(x).reshape(T, B, -1), batch["action"])
    priors = dv.multi_step_priors(wm.rssm, post2, batch["action"], args.nce_steps)
    torch.testing.assert_close(post2["logits"], post["logits"])
    kl_0, _ = dv.kl_balance(post2["logits"], prior["logits"], args.kl_balance, 0.0)
    kl = lambda k, p: dv.categorical_kl(post2["logits"][k:], p["logits"]).mean()  # noqa: E731
    expected = kl_0 + sum(kl(k, p) for k, p in enumerate(priors, 1)) / args.nce_steps
    torch.testing.assert_close(m["kl_loss"], expected)
    misaligned = kl_0 + sum(dv.categorical_kl(post2["logits"][:T - k], p["logits"]).mean()
                            for k, p in enumerate(priors, 1)) / args.nce_steps  # q_t with p_k(z_{t+k})
    assert not torch.allclose(m["kl_loss"], misaligned)
    q = post2["logits"][1:].detach().requires_grad_()
    (g,) = torch.autograd.grad(dv.overshooting_kl(q, priors[0]["logits"], 0.0), [q], allow_unused=True)
    assert g is None  # sg(q)
    # --overshooting-kl sum: each k balanced like k = 0 and summed (the posterior moves too)
    loss, _ = dv.kl_balance(q, priors[0]["logits"], args.kl_balance, 0.0)
    assert torch.autograd.grad(loss, [q])[0].abs().sum() > 0


def test_the_two_augmented_views_inside_world_model_loss_differ():
    """Sec. III-F: x (online CNN) and x' (momentum CNN') are independent shifts of the same
    frames, seen by forward hooks on the two encoders during world_model_loss."""
    agent = tiny_agent(2)
    args, wm = agent.args, agent.wm
    seen = {}
    hooks = [net.register_forward_pre_hook(lambda m, inp, name=name: seen.setdefault(name, inp[0].clone()))
             for name, net in (("online", wm.encoder), ("momentum", wm.momentum_encoder))]
    batch = random_batch(args)
    dv.world_model_loss(wm, batch, args)
    for h in hooks:
        h.remove()
    x, x_prime = seen["online"], seen["momentum"]
    assert x.shape == x_prime.shape == batch["obs"].flatten(0, 1).shape
    differ = (x != x_prime).flatten(1).any(1)
    assert differ.float().mean() > 0.5  # most frames got different offsets


# --- momentum encoder ---------------------------------------------------------------------------


def test_momentum_encoder_moves_by_eta_towards_the_online_encoder_after_each_update():
    agent = tiny_agent(2)
    args = agent.args
    with torch.no_grad():  # make CNN' differ from CNN so that the update is visible
        for p in agent.wm.momentum_encoder.parameters():
            p.add_(0.1)
    before = [p.clone() for p in agent.wm.momentum_encoder.parameters()]
    agent.update(random_batch(args))
    online = list(agent.wm.encoder.parameters())
    for old, new, theta in zip(before, agent.wm.momentum_encoder.parameters(), online):
        torch.testing.assert_close(new, (1 - args.momentum) * old + args.momentum * theta)


def test_the_pmf_critic_w_learns_from_the_momentum_side_and_the_online_encoder_from_eq_6(monkeypatch):
    """J_NCE_k's latents come from the RSSM, so J_NCE_k reaches W only through the momentum
    PMFs: a gradient there shows that side trains W (stop-gradient after CNN', not after W).
    J_NCE_aux reaches the online CNN through its critic samples (Eq. 6)."""
    agent = tiny_agent(2)
    args, wm = agent.args, agent.wm
    nce = captured(monkeypatch, "nce_objectives")  # (J_NCE_k terms, J_NCE_aux), with their graphs
    dv.world_model_loss(wm, random_batch(args), args)
    (terms, (nce_aux_loss, _)), = nce
    nce_loss = sum(loss for loss, _ in terms)
    (g_w,) = torch.autograd.grad(nce_loss, [wm.pmf_critic_w.weight], retain_graph=True)
    assert g_w.abs().sum() > 0
    g_cnn = torch.autograd.grad(nce_aux_loss, list(wm.encoder.parameters()), retain_graph=True)
    assert all(g.abs().sum() > 0 for g in g_cnn)


# --- RSSM ---------------------------------------------------------------------------------------


def test_k_step_predictions_are_k_applications_of_the_prior_step():
    torch.manual_seed(0)
    rssm = dv.RSSM(embed_dim=6, action_dim=2, deter=5, hidden=7, stoch=3, classes=4)
    T, B, K = 6, 2, 3
    post, _ = rssm.observe(torch.randn(T, B, 6), torch.randn(T, B, 2))
    action = torch.randn(T, B, 2)
    priors = dv.multi_step_priors(rssm, post, action, K)
    for t in range(T - 1):
        state = {k: post[k][t] for k in ("deter", "stoch")}
        for k in range(1, min(K, T - 1 - t) + 1):
            step = rssm.img_step(state, action[t + k])  # z_{t+k-1}, a_{t+k-1} -> z_{t+k}
            predicted = {key: priors[k - 1][key][t] for key in ("deter", "logits", "stoch")}
            torch.testing.assert_close(step["deter"], predicted["deter"])
            torch.testing.assert_close(step["logits"], predicted["logits"])
            # the next step continues from the batched rollout's own sample
            state = {"deter": predicted["deter"], "stoch": predicted["stoch"]}


def test_batched_observe_equals_the_step_by_step_obs_step_loop():
    rssm = dv.RSSM(embed_dim=6, action_dim=2, deter=5, hidden=7, stoch=3, classes=4)
    embed, action = torch.randn(5, 3, 6), torch.randn(5, 3, 2)
    torch.manual_seed(1)
    post, prior = rssm.observe(embed, action)
    torch.manual_seed(1)
    state = rssm.initial(3, CPU)
    for t in range(5):
        state = rssm.obs_step(state, action[t], embed[t])
        step_prior = rssm.img_out(state["deter"]).unflatten(-1, (3, 4))  # p(z_t | h_t) of that step
        for key in ("deter", "stoch", "logits"):
            torch.testing.assert_close(post[key][t], state[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prior["logits"][t], step_prior, atol=1e-5, rtol=1e-5)


# --- augmentation -------------------------------------------------------------------------------


def test_random_shift_gives_two_different_views_each_a_crop_of_the_replicate_padded_image():
    torch.manual_seed(0)
    obs = torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8)
    a, b = dv.random_shift(obs, 4), dv.random_shift(obs, 4)
    assert a.shape == b.shape == obs.shape and a.dtype == torch.uint8
    assert not torch.equal(a, b)
    padded = F.pad(obs.float(), (4, 4, 4, 4), mode="replicate")
    for view in (a, b):
        for i in range(4):
            crops = [padded[i, :, y:y + 64, x:x + 64] for y in range(9) for x in range(9)]
            assert any(torch.equal(view[i].float(), c) for c in crops)


# --- update: NaN guard, precision, compile, CUDA ------------------------------------------------


def test_behaviour_step_leaves_the_world_model_out_and_the_actor_gradient_through_the_latents():
    """Issue 22 item 9: with --compile, `backward(inputs=...)` does not prune a compiled backward, so
    the behaviour losses run with the world model frozen; the loss and the actor's gradient are
    unchanged. With no entropy bonus and dynamics gradients, the actor reaches its loss only
    through the imagined latents, so its non-zero gradient has come through them."""
    agent = tiny_agent(2, actor_entropy=0.0, actor_grad="dynamics")
    batch = random_batch(agent.args)
    check_behaviour_step_freezes_world_model(agent, "behaviour_losses", lambda: agent.update(batch),
                                             agent.wm, agent.ac.actor, dv.frozen)


def test_a_nan_reward_skips_the_whole_update_and_is_flagged():
    agent = tiny_agent(2)
    args = agent.args
    agent.update(random_batch(args))  # Adam moments exist
    before = {k: v.clone() for k, v in agent.wm.state_dict().items()}
    ac_before = {k: v.clone() for k, v in agent.ac.state_dict().items()}
    opt_before = [s["exp_avg"].clone() for s in agent.model_opt.opt.state.values()]
    batch = random_batch(args, seed=1)
    batch["reward"][0, 0] = float("nan")
    agent.update(batch)
    assert agent.compute.flags()[0] == 1  # model_loss
    assert all(torch.equal(before[k], v) for k, v in agent.wm.state_dict().items())
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(opt_before, agent.model_opt.opt.state.values()))
    # the actor and critic steps of that update are skipped too (and the slow critic's copy)
    assert all(torch.equal(ac_before[k], v) for k, v in agent.ac.state_dict().items())
    # later updates stay skipped (the loop reads the flags one update late and then stops)
    agent.update(random_batch(args, seed=2))
    assert agent.compute.skip == 1  # every step skipped from the non-finite update on
    assert all(torch.equal(before[k], v) for k, v in agent.wm.state_dict().items())
    assert all(torch.equal(ac_before[k], v) for k, v in agent.ac.state_dict().items())


def test_bf16_keeps_kl_log_probs_values_and_score_matrices_in_fp32():
    agent = tiny_agent(2, precision="bf16")
    args = agent.args
    batch = random_batch(args)
    loss, post, metrics = agent.world_model_loss(agent.wm, batch, args)  # under --precision
    assert all(v.dtype == torch.float32 for v in metrics.values())
    with agent.compute.precision():
        embed = agent.wm.encoder(batch["obs"][0])
        assert embed.dtype == torch.bfloat16  # the networks do run in bf16
        log_pmf = dv.pmf_critic_log_pmf(agent.wm.pmf_critic_w, embed, args.stoch, args.classes)
        logits = dv.contrastive_logits(dv.sample_one_hot(log_pmf), log_pmf)
        kl = dv.categorical_kl(post["logits"].bfloat16(), post["logits"].bfloat16())
        feats = agent.wm.rssm.feat({k: v[0] for k, v in post.items()})
        log_prob = agent.ac.actor(feats).log_prob(torch.zeros(args.batch_size, 2))
    assert log_pmf.dtype == logits.dtype == kl.dtype == log_prob.dtype == torch.float32
    actor_loss, critic_loss, ac_metrics = agent.behaviour_losses(agent.wm, agent.ac, post, args, False)
    assert all(v.dtype == torch.float32 for v in (actor_loss, critic_loss, *ac_metrics.values()))
    agent.update(batch)
    assert not agent.compute.flags().any()
    # reward and values are computed in fp32 (the output layer), not rounded to bf16 and cast
    feat = 3 * torch.randn(16, agent.wm.rssm.feat_dim)
    for net in (agent.wm.reward, agent.ac.critic, agent.ac.target_critic):
        check_output_layer_in_fp32(net, net, feat)


def test_compiled_losses_equal_eager_on_cpu(compile_backend):
    """Backend per `compile_backend`. Inductor with fallback_random draws the same samples as eager; tolerance 1e-4 relative.
    Slow: compiling both whole losses with inductor took over 10 minutes on the shared 2-core
    machine."""
    import torch._inductor.config as inductor_config

    kw = dict(batch_length=4, batch_size=2, horizon=2, nce_steps=1, cnn_depth=2)
    eager = tiny_agent(2, **kw)
    compiled = tiny_agent(2, compile=True, **kw)
    batch = random_batch(eager.args)
    compiled.wm.load_state_dict(eager.wm.state_dict())
    compiled.ac.load_state_dict(eager.ac.state_dict())
    old = inductor_config.fallback_random
    inductor_config.fallback_random = True
    try:
        torch.manual_seed(3)
        want = eager.update(batch)
        torch.manual_seed(3)
        got = compiled.update(batch)
    finally:
        inductor_config.fallback_random = old
    for key in ("model_loss", "nce_loss", "kl_loss", "nce_aux_loss", "actor_loss", "critic_loss"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "discrete"])  # discrete: REINFORCE
def test_an_update_never_syncs_with_the_host(discrete):
    device = sync_test_device()  # CUDA where there is one, else CPU (see without_host_sync)
    agent = tiny_agent(2, discrete, device)
    args = agent.args
    replay = dv.Replay(200, (3, 64, 64), 2, seed=0, device=device)
    batch = random_batch(args)
    replay.add_episode(*(batch[k][:, 0].numpy() for k in ("obs", "action", "reward", "cont")))
    # the training loop's device work: sampling, the update, acting (up to its numpy action)
    without_host_sync(lambda: agent.update(dv.to_torch(replay.sample(args.batch_size, args.batch_length), device)))
    state = agent.act(np.zeros((3, 64, 64), np.uint8), None, explore=True)[1]
    without_host_sync(agent.act, np.zeros((3, 64, 64), np.uint8), state, True, returns_to_host=True)
    assert not agent.compute.flags().cpu().any()


# --- CLI and the paper's defaults --------------------------------------------------------------


def test_dreamingv2_defaults_match_paper():
    """Each value's source: dreamingv2.txt (section / table), DreamerV2's configs.yaml
    (danijar/dreamerv2, dmc_vision) where the paper is silent, PlaNet for the overshooting terms,
    or ours (see the module docstring)."""
    a, s = dv.parse_args([])
    # paper: Sec. III-A 32 x 32 latents; III-G / Table II K = 3; III-E eta 0.05; III-F pad 4;
    # III-B RSSM p~; Fig. 2a / III-E window negatives; Table I budget 500K steps
    assert (a.stoch, a.classes, a.nce_steps, a.momentum, a.aug_pad) == (32, 32, 3, 0.05, 4)
    assert (a.aux_dynamics, a.negatives, s.total_steps) == ("rssm", "window", 500_000)
    # Dreaming's J_KL_k = PlaNet's latent overshooting (Sec. 4, Eq. 7)
    assert a.overshooting_kl == "planet"
    # DreamerV2 configs.yaml (dmc_vision): sizes, KL, optimisers, behaviour, replay sampling
    assert (a.deter, a.hidden, a.cnn_depth, a.mlp_units, a.mlp_layers) == (200, 200, 48, 400, 4)
    assert (a.kl_balance, a.free_nats, a.kl_scale, a.prioritize_ends) == (0.8, 1.0, 1.0, False)
    assert (a.batch_size, a.batch_length, a.horizon, a.gamma, a.return_lambda) == (16, 50, 15, 0.99, 0.95)
    assert (a.model_lr, a.actor_lr, a.critic_lr, a.adam_eps, a.grad_clip) == (3e-4, 8e-5, 8e-5, 1e-5, 100.0)
    assert (a.actor_entropy, a.target_update_every, a.train_every, a.prefill) == (1e-4, 100, 5, 1000)
    assert (a.pretrain, a.weight_decay, a.init, s.eval_every) == (100, 1e-6, "glorot", 10_000)
    assert dv.action_repeat(a) == 2 and dv.action_repeat(dv.parse_args(["--env", "dmc-cartpole-swingup"])[0]) == 2
    # ours: replay 1e6 simulator steps (a whole 500K run), 10 eval episodes
    assert (a.replay_capacity, s.eval_episodes) == (1_000_000, 10)
    agent = tiny_agent(1)
    assert all(torch.all(m.bias == 0) for m in agent.ac.modules() if isinstance(m, torch.nn.Linear))
    # (1 - wd) per step, as DreamerV2's optimiser; the helper steps the torch optimiser itself
    check_dreamerv2_weight_decay(types.SimpleNamespace(ac=agent.ac, critic_opt=agent.critic_opt.opt))




def test_resume_refuses_flags_that_change_the_algorithm(tmp_path):
    args = tiny_args()
    path = tiny_checkpoint(dv, tmp_path / "checkpoint.pt")
    resumed, settings = dv.parse_args(["--resume", str(path), "--total-steps", "5000"])
    assert settings.total_steps == 5000 and resumed.cnn_depth == args.cnn_depth
    with pytest.raises(SystemExit, match="--nce-steps 2 \\(checkpoint 3\\)"):
        dv.parse_args(["--resume", str(path), "--nce-steps", "2"])


def test_tiny_preset_means_2000_steps_unless_told_otherwise():
    assert dv.parse_args(["--preset", "tiny"])[1].total_steps == 2000
    assert dv.parse_args(["--preset", "tiny", "--total-steps", "300"])[1].total_steps == 300
    assert dv.parse_args([])[1].total_steps == 500_000  # Table I: 500K steps


@pytest.mark.parametrize("flags,message", [
    (["--env", "dcs-walkr-walk"], "did you mean 'walker'"),
    (["--env", "dcs-walker-walk", "--distraction", "extreme"], "unknown distraction 'extreme'"),
    (["--nce-steps", "8"], "--nce-steps 8"),
])
def test_bad_cli_input_gets_a_clear_message_and_no_traceback(tmp_path, flags, message):
    check_bad_cli_input("dreamingv2.py", flags, message, tmp_path)


# --- learning checks (slow) -----------------------------------------------------------------------


@pytest.mark.slow
def test_contrastive_top1_accuracy_rises_on_real_dmc_data():
    """A few minutes on 1 CPU core: 150 world-model updates on cartpole-swingup pixels."""
    agent = tiny_agent(1, cnn_depth=8, deter=64, hidden=64, stoch=8, classes=8, batch_size=8,
                       batch_length=16, model_lr=1e-3, seed=0)
    args = agent.args
    replay = dv.Replay(5000, (3, 64, 64), 1, seed=0)
    for episode in collect_episodes("dmc-cartpole-swingup", episodes=3, seed=0):
        replay.add_episode(*episode)
    accuracy = []
    for _ in range(150):
        metrics = agent.update(replay.sample(args.batch_size, args.batch_length))
        accuracy.append(metrics["nce_accuracy_0"].item())
    chance = 1 / (args.batch_size * (args.nce_steps + 1))  # window negatives (Fig. 2a)
    print(f"top-1 accuracy first 10: {np.mean(accuracy[:10]):.3f}, last 10: {np.mean(accuracy[-10:]):.3f}")
    assert np.mean(accuracy[-10:]) > max(5 * chance, np.mean(accuracy[:10]) + 0.1)


@pytest.mark.slow
def test_dreamingv2_beats_random_on_toy_reach_center(tmp_path, monkeypatch):
    """About 10-20 minutes on 2 CPU cores (criterion: conftest.check_beats_random)."""
    monkeypatch.chdir(tmp_path)
    run_dir = dv.main(*smoke_args(dv, "dreamingv2"))
    check_beats_random(run_dir, benchmark.SMOKE_ENV)


def test_cuda_graph_modes_keep_the_losses_and_survive_overwritten_outputs(cuda_graph_steps):
    """--compile-mode reduce-overhead: each compiled call begins a CUDA-graph step and what outlives
    one is copied first (the posterior, the metrics read after the next update), so the losses
    equal the eager ones under the conftest simulation, which turns any use of an overwritten
    output into NaN. 'max-autotune' compiles without CUDA graphs."""
    kw = dict(batch_length=4, batch_size=2, horizon=2, nce_steps=1, cnn_depth=2)
    tiny_agent(2, compile=True, compile_mode="max-autotune", **kw)
    assert cuda_graph_steps.modes == ["max-autotune-no-cudagraphs"] * 2
    batch, runs = random_batch(tiny_args(**kw)), []
    for compile in (False, True):
        agent = tiny_agent(2, compile=compile, compile_mode="reduce-overhead", **kw)
        runs.append([])
        for seed in (3, 4):
            torch.manual_seed(seed)
            runs[-1].append(agent.update(batch))
    assert cuda_graph_steps.marks == 4
    for want, got in zip(*runs):  # the first update's metrics are read after the second update
        for key in ("model_loss", "nce_loss", "kl_loss", "actor_loss", "critic_loss"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)


def test_the_run_header_names_the_preset_overrides_a_run_applied():
    """Issue 24 item 3: one place for the numbers (PRESETS), and the header says which applied;
    a flag that replaced a preset value is not listed among them (but apart, as replaced)."""
    line = dv.describe_presets(*dv.parse_args(["--preset", "small", "--cnn-depth", "8"]))
    applied, _, replaced = line.partition("; flags replaced ")
    assert "deter=128" in applied and "cnn_depth" not in applied and replaced == "cnn_depth=8 (preset 16)"
    assert dv.describe_presets(*dv.parse_args([])).startswith("no overrides")
