"""Specification of dreamingv2.py: the critic and its logits (Fig. 2c), the contrastive terms
(Eq. 3, 6), the momentum encoder (Sec. III-E), k-step predictions, augmentation (Sec. III-F),
shapes, the fast update pattern and the CLI."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import benchmark
import dreamingv2 as dv
from conftest import check_beats_random, collect_episodes, smoke_args, without_host_sync, sync_test_device, check_bad_cli_input, check_dreamerv2_weight_decay

CPU = torch.device("cpu")


def tiny_args(**kw):
    return dv.preset_args("tiny", **kw)


def random_batch(args, action_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, B = args.batch_length, args.batch_size
    return dict(obs=torch.randint(0, 255, (T, B, 3, 64, 64), dtype=torch.uint8, generator=g),
                action=torch.rand(T, B, action_dim, generator=g) * 2 - 1,
                reward=torch.rand(T, B, generator=g), cont=torch.ones(T, B))


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
    log_pmf = dv.critic_log_pmf(w, e, stoch=2, classes=3)
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
    loss, _ = dv.contrastive_nce(dv.contrastive_logits(z, uniform), 0)
    torch.testing.assert_close(loss, torch.tensor(math.log(n)))
    losses = []
    for sharpness in (1.0, 2.0, 4.0, 8.0):  # PMFs that put more and more mass on z_j
        log_pmf = F.log_softmax(sharpness * z, -1)
        loss, accuracy = dv.contrastive_nce(dv.contrastive_logits(z, log_pmf), 0)
        losses.append(loss.item())
    assert all(a > b for a, b in zip(losses, losses[1:])) and losses[-1] < 1e-4, losses
    assert accuracy == 1.0


def test_nce_positive_of_a_k_step_prediction_is_the_observation_k_steps_later():
    # rows are predictions of start (t, b), t < T - k; candidate index = time * B + b
    T, B, k = 4, 3, 2
    logits = torch.full(((T - k) * B, T * B), -10.0)
    for t in range(T - k):
        for b in range(B):
            logits[t * B + b, (t + k) * B + b] = 10.0
    loss, accuracy = dv.contrastive_nce(logits, k * B)
    assert accuracy == 1.0 and loss < 1e-6


def test_world_model_terms_are_finite_scalars_and_shapes_are_as_documented(cartpole_batch):
    torch.manual_seed(0)
    args = tiny_args()
    agent = dv.Agent(args, 1, False, CPU)
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
    # Dreaming's linear auxiliary dynamics (Table III) gives the same terms
    args_linear = tiny_args(aux_dynamics="linear")
    agent_linear = dv.Agent(args_linear, 1, False, CPU)
    loss, _, metrics_linear = dv.world_model_loss(agent_linear.wm, batch, args_linear)
    assert torch.isfinite(loss) and set(metrics_linear) == set(metrics)
    assert all(torch.isfinite(v) for v in metrics_linear.values())


# --- momentum encoder ---------------------------------------------------------------------------


def test_momentum_encoder_moves_by_eta_towards_the_online_encoder_after_each_update():
    torch.manual_seed(0)
    args = tiny_args()
    agent = dv.Agent(args, 2, False, CPU)
    with torch.no_grad():  # make CNN' differ from CNN so that the update is visible
        for p in agent.wm.momentum_encoder.parameters():
            p.add_(0.1)
    before = [p.clone() for p in agent.wm.momentum_encoder.parameters()]
    agent.update(random_batch(args))
    online = list(agent.wm.encoder.parameters())
    for old, new, theta in zip(before, agent.wm.momentum_encoder.parameters(), online):
        torch.testing.assert_close(new, (1 - args.momentum) * old + args.momentum * theta)
        assert not new.requires_grad and new.grad_fn is None  # the update left no autograd history


def test_no_gradient_reaches_the_momentum_encoder_but_the_critic_w_learns_from_both_sides():
    torch.manual_seed(0)
    args = tiny_args()
    agent = dv.Agent(args, 2, False, CPU)
    loss, _, _ = dv.world_model_loss(agent.wm, random_batch(args), args)
    loss.backward()
    assert all(p.grad is None for p in agent.wm.momentum_encoder.parameters())
    assert all(not p.requires_grad for p in agent.wm.momentum_encoder.parameters())
    assert agent.wm.critic_w.weight.grad is not None and agent.wm.critic_w.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in agent.wm.encoder.parameters())


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
        state, step_prior = rssm.obs_step(state, action[t], embed[t])
        for key in ("deter", "stoch", "logits"):
            torch.testing.assert_close(post[key][t], state[key], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prior["logits"][t], step_prior["logits"], atol=1e-5, rtol=1e-5)


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


def test_a_nan_reward_skips_the_whole_update_and_is_flagged():
    torch.manual_seed(0)
    args = tiny_args()
    agent = dv.Agent(args, 2, False, CPU)
    agent.update(random_batch(args))  # Adam moments exist
    before = {k: v.clone() for k, v in agent.wm.state_dict().items()}
    ac_before = {k: v.clone() for k, v in agent.ac.state_dict().items()}
    opt_before = [s["exp_avg"].clone() for s in agent.model_opt.state.values()]
    batch = random_batch(args, seed=1)
    batch["reward"][0, 0] = float("nan")
    _, nonfinite = agent.update(batch)
    assert nonfinite[0] == 1  # model_loss
    assert all(torch.equal(before[k], v) for k, v in agent.wm.state_dict().items())
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(opt_before, agent.model_opt.state.values()))
    # the actor and critic steps of that update are skipped too (and the slow critic's copy)
    assert all(torch.equal(ac_before[k], v) for k, v in agent.ac.state_dict().items())
    # later updates stay skipped (the loop reads the flags one update late and then stops)
    _, nonfinite = agent.update(random_batch(args, seed=2))
    assert nonfinite[0] == 1
    assert all(torch.equal(before[k], v) for k, v in agent.wm.state_dict().items())
    assert all(torch.equal(ac_before[k], v) for k, v in agent.ac.state_dict().items())


def test_bf16_keeps_kl_log_probs_values_and_score_matrices_in_fp32():
    torch.manual_seed(0)
    args = tiny_args(precision="bf16")
    agent = dv.Agent(args, 2, False, CPU)
    batch = random_batch(args)
    loss, post, metrics = agent._world_model_loss(batch)
    assert all(v.dtype == torch.float32 for v in metrics.values())
    with agent.autocast:
        embed = agent.wm.encoder(batch["obs"][0])
        assert embed.dtype == torch.bfloat16  # the networks do run in bf16
        log_pmf = dv.critic_log_pmf(agent.wm.critic_w, embed, args.stoch, args.classes)
        logits = dv.contrastive_logits(dv.sample_one_hot(log_pmf), log_pmf)
        kl = dv.categorical_kl(post["logits"].bfloat16(), post["logits"].bfloat16())
        feats = agent.wm.rssm.feat({k: v[0] for k, v in post.items()})
        log_prob = agent.ac.actor(feats).log_prob(torch.zeros(args.batch_size, 2))
    assert log_pmf.dtype == logits.dtype == kl.dtype == log_prob.dtype == torch.float32
    actor_loss, critic_loss, ac_metrics = agent._behaviour_losses({k: post[k].detach() for k in ("deter", "stoch")})
    assert all(v.dtype == torch.float32 for v in (actor_loss, critic_loss, *ac_metrics.values()))
    _, nonfinite = agent.update(batch)
    assert not nonfinite.any()


def test_compiled_losses_equal_eager_on_cpu(compile_backend):
    """Backend per `compile_backend`. Inductor with fallback_random draws the same samples as eager; tolerance 1e-4 relative.
    Slow: compiling both whole losses with inductor took over 10 minutes on the shared 2-core
    machine."""
    import torch._inductor.config as inductor_config

    args = tiny_args(batch_length=4, batch_size=2, horizon=2, nce_steps=1, cnn_depth=2)
    batch = random_batch(args)
    torch.manual_seed(0)
    eager = dv.Agent(args, 2, False, CPU)
    torch.manual_seed(0)
    compiled = dv.Agent(dataclasses.replace(args, compile=True), 2, False, CPU)
    compiled.wm.load_state_dict(eager.wm.state_dict())
    compiled.ac.load_state_dict(eager.ac.state_dict())
    old = inductor_config.fallback_random
    inductor_config.fallback_random = True
    try:
        torch.manual_seed(3)
        want, _ = eager.update(batch)
        torch.manual_seed(3)
        got, _ = compiled.update(batch)
    finally:
        inductor_config.fallback_random = old
    for key in ("model_loss", "nce_loss", "kl_loss", "nce_aux_loss", "actor_loss", "critic_loss"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "discrete"])  # discrete: REINFORCE
def test_an_update_never_syncs_with_the_host(discrete):
    args = tiny_args()
    device = sync_test_device()  # CUDA where there is one, else CPU (see without_host_sync)
    agent = dv.Agent(args, 2, discrete, device)
    replay = dv.Replay(200, (3, 64, 64), 2, seed=0, device=device)
    batch = random_batch(args)
    replay.add_episode(*(batch[k][:, 0].numpy() for k in ("obs", "action", "reward", "cont")))
    # the training loop's device work: sampling, the update, acting (up to its numpy action)
    metrics, nonfinite = without_host_sync(lambda: agent.update(replay.sample(args.batch_size, args.batch_length)))
    state = agent.act(np.zeros((3, 64, 64), np.uint8), None, explore=True)[1]
    without_host_sync(agent.act, np.zeros((3, 64, 64), np.uint8), state, True, returns_to_host=True)
    assert not nonfinite.cpu().any()


# --- CLI -----------------------------------------------------------------------------------------




def test_resume_refuses_flags_that_change_the_algorithm(tmp_path):
    args = tiny_args()
    agent = dv.Agent(args, 2, False, CPU)
    path = tmp_path / "checkpoint.pt"
    dv.save_checkpoint(path, agent, None, dict(env_steps=0), args)
    resumed = dv.parse_args(["--resume", str(path), "--total-steps", "5000"])
    assert resumed.total_steps == 5000 and resumed.cnn_depth == args.cnn_depth
    with pytest.raises(SystemExit, match="--nce-steps 2 \\(checkpoint 3\\)"):
        dv.parse_args(["--resume", str(path), "--nce-steps", "2"])


def test_defaults_are_the_papers_values_and_dreamerv2s_where_the_paper_is_silent():
    a = dv.parse_args([])
    # dreamingv2.txt Sec. III-B/E/F, Table II: K = 3, eta = 0.05, pad 4 (64 x 64 crops)
    assert (a.nce_steps, a.momentum, a.aug_pad, a.aux_dynamics) == (3, 0.05, 4, "rssm")
    # DreamerV2's DMC config (danijar/dreamerv2 configs.yaml), which the paper builds on
    assert (a.stoch, a.classes, a.deter, a.hidden, a.cnn_depth) == (32, 32, 200, 200, 48)
    assert (a.kl_balance, a.free_nats, a.kl_scale) == (0.8, 1.0, 1.0)
    assert (a.batch_size, a.batch_length, a.horizon, a.gamma, a.return_lambda) == (16, 50, 15, 0.99, 0.95)
    assert (a.model_lr, a.actor_lr, a.critic_lr, a.adam_eps, a.grad_clip) == (3e-4, 8e-5, 8e-5, 1e-5, 100.0)
    assert (a.actor_entropy, a.target_update_every, a.train_every, a.prefill) == (1e-4, 100, 5, 1000)
    assert dv.action_repeat(a) == 2 and dv.action_repeat(dv.parse_args(["--env", "dmc-cartpole-swingup"])) == 2
    assert a.init == "glorot"
    agent = dv.Agent(tiny_args(), 1, False, CPU)
    assert all(torch.all(m.bias == 0) for m in agent.ac.modules() if isinstance(m, torch.nn.Linear))
    check_dreamerv2_weight_decay(agent)  # (1 - wd) per step, as DreamerV2's optimiser


def test_tiny_preset_means_2000_steps_unless_told_otherwise():
    assert dv.parse_args(["--preset", "tiny"]).total_steps == 2000
    assert dv.parse_args(["--preset", "tiny", "--total-steps", "300"]).total_steps == 300
    assert dv.parse_args([]).total_steps == 1_000_000


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
    torch.manual_seed(0)
    args = tiny_args(cnn_depth=8, deter=64, hidden=64, stoch=8, classes=8, batch_size=8,
                     batch_length=16, model_lr=1e-3)
    replay = dv.Replay(5000, (3, 64, 64), 1, seed=0)
    for episode in collect_episodes("dmc-cartpole-swingup", episodes=3, seed=0):
        replay.add_episode(*episode)
    agent = dv.Agent(args, 1, False, CPU)
    accuracy = []
    for _ in range(150):
        metrics, _ = agent.update(replay.sample(args.batch_size, args.batch_length))
        accuracy.append(metrics["nce_accuracy_0"].item())
    chance = 1 / (args.batch_size * args.batch_length)
    print(f"top-1 accuracy first 10: {np.mean(accuracy[:10]):.3f}, last 10: {np.mean(accuracy[-10:]):.3f}")
    assert np.mean(accuracy[-10:]) > max(5 * chance, np.mean(accuracy[:10]) + 0.1)


@pytest.mark.slow
def test_dreamingv2_beats_random_on_toy_reach_center(tmp_path, monkeypatch):
    """About 10-20 minutes on 2 CPU cores (criterion: conftest.check_beats_random)."""
    monkeypatch.chdir(tmp_path)
    run_dir = dv.main(smoke_args(dv, "dreamingv2"))
    check_beats_random(run_dir, benchmark.SMOKE_ENV)


def test_cuda_graph_modes_keep_the_losses_and_survive_overwritten_outputs(cuda_graph_steps):
    """--compile-mode reduce-overhead: each compiled call begins a CUDA-graph step and what outlives
    one is copied first (the posterior, the metrics read after the next update), so the losses
    equal the eager ones under the conftest simulation, which turns any use of an overwritten
    output into NaN. 'max-autotune' compiles without CUDA graphs."""
    args = tiny_args(batch_length=4, batch_size=2, horizon=2, nce_steps=1, cnn_depth=2)
    dv.Agent(dataclasses.replace(args, compile=True, compile_mode="max-autotune"), 2, False, CPU)
    assert cuda_graph_steps.modes == ["max-autotune-no-cudagraphs"] * 2
    batch, runs = random_batch(args), []
    for compile in (False, True):
        torch.manual_seed(0)
        agent = dv.Agent(dataclasses.replace(args, compile=compile, compile_mode="reduce-overhead"),
                         2, False, CPU)
        runs.append([])
        for seed in (3, 4):
            torch.manual_seed(seed)
            runs[-1].append(agent.update(batch)[0])
    assert cuda_graph_steps.marks == 4
    for want, got in zip(*runs):  # the first update's metrics are read after the second update
        for key in ("model_loss", "nce_loss", "kl_loss", "actor_loss", "critic_loss"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
