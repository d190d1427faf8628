"""Specification of core.py: J_M and SAC terms, the contrastive loss, gradient routing, learning, CLI."""

import math

import numpy as np
import pytest
import torch

import core
import benchmark
from conftest import (collect_episodes, check_beats_random, check_run_then_resume, smoke_args,
                      without_host_sync, sync_test_device, check_output_layer_in_fp32, preset_flags,
                      make_agent)


def tiny_args(**kw):
    return preset_flags(core, "tiny", **kw)[0]


def tiny_agent(action_dim=6, device="cpu", **kw):
    """A `--preset tiny` agent with `kw` set (Args or RunSettings fields, e.g. compile=True)."""
    args, settings = preset_flags(core, "tiny", **kw)
    return make_agent(core, args, settings, action_dim, device=device)


def critic_loss(agent, batch):
    """J_Q of `agent` on `batch`, eager: (loss, states z, metrics)."""
    return core.critic_loss(agent.wm, agent.critics, agent.target_critics, agent.actor, agent.log_alpha,
                            batch, agent.args)


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
    batch = core.to_torch(replay.sample(args.batch_size, args.seq_len), torch.device("cpu"))
    return core.random_crop(batch, replay.rng, args.crop_size)


def test_every_model_and_sac_term_is_a_finite_scalar(dcs_replay):
    agent = tiny_agent(gating=True)
    args = agent.args
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
    # one non-finite flag per optimiser: model, critic, actor, alpha
    assert agent.compute.flags().tolist() == [0.0] * 4


def test_reconstruction_objective_decodes_pixels_of_the_crop(dcs_replay):
    agent = tiny_agent(objective="reconstruction")
    args = agent.args
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
    agent = tiny_agent(no_reward_loss=True, no_inverse_dynamics=True, beta=0.0)
    args = agent.args
    loss, metrics = core.model_loss(agent.wm, batch_from(dcs_replay, args), args)
    loss.backward()
    assert agent.wm.inverse_temperature_raw.grad.abs() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.wm.encoder.parameters())


@pytest.mark.parametrize("no_grad", [False, True])
def test_critic_loss_trains_the_encoder_unless_disabled(dcs_replay, no_grad):
    agent = tiny_agent(no_critic_grad_to_model=no_grad)
    batch = batch_from(dcs_replay, agent.args)
    loss, _, _ = critic_loss(agent, batch)
    loss.backward()
    grads = [p.grad for p in agent.wm.encoder.parameters()]
    if no_grad:
        assert all(g is None for g in grads)
    else:
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is not None for p in agent.critics.parameters())


def test_actor_update_leaves_model_and_critic_parameters_untouched(dcs_replay):
    agent = tiny_agent()
    args = agent.args
    batch = batch_from(dcs_replay, args)
    z = core.sac_states(agent.wm, batch, args)
    others = [p.detach().clone() for m in (agent.wm, agent.critics) for p in m.parameters()]
    actor_before = [p.detach().clone() for p in agent.actor.parameters()]
    loss, _, _ = core.actor_loss(agent.critics, agent.actor, agent.log_alpha, z[:-1], agent.target_entropy)
    agent.actor_opt(loss)  # backpropagates into the actor's parameters only
    after = [p for m in (agent.wm, agent.critics) for p in m.parameters()]
    assert all(p.grad is None for p in after)
    assert all(torch.equal(a, b) for a, b in zip(others, after))
    assert not all(torch.equal(a, b) for a, b in zip(actor_before, agent.actor.parameters()))


def test_sequences_share_one_crop_and_acting_uses_the_centre():
    replay = core.Replay(50, (1, 6, 6), 1, seed=0)
    obs = np.arange(36, dtype=np.uint8).reshape(1, 1, 6, 6).repeat(20, 0)  # same image every step
    replay.add_episode(obs, np.zeros((20, 1)), np.zeros(20), np.ones(20))
    batch = core.random_crop(replay.sample(64, 5), replay.rng, 4)
    crops = batch["obs"][:, :, 0].numpy()  # (T, B, 4, 4)
    assert np.all(crops == crops[:1])  # one crop position per sequence
    assert len({c.tobytes() for c in crops[0]}) > 1  # but different across sequences
    np.testing.assert_array_equal(core.centre_crop(obs[0], 4)[0], obs[0, 0, 1:5, 1:5])


def test_fifty_model_updates_raise_contrastive_accuracy_well_above_chance(dcs_replay):
    # Tiny sizes learn slower than the paper's, so this check uses a larger model learning rate.
    torch.manual_seed(0)
    agent = tiny_agent(batch_size=8, seq_len=8, model_lr=1e-3)
    args = agent.args
    batch = batch_from(dcs_replay, args)
    chance = 1 / ((args.seq_len - 1) * args.batch_size)  # t = 0 is left out of Eq. 1

    def accuracy():  # averaged over draws of the stochastic states
        with torch.no_grad():
            return np.mean([core.model_loss(agent.wm, batch, args)[1]["contrastive_accuracy"].item()
                            for _ in range(5)])

    before = accuracy()
    for _ in range(50):
        loss, _ = core.model_loss(agent.wm, batch, args)
        agent.model_opt(loss)
    after = accuracy()
    assert after > 2.5 * chance and after > 2 * before, (before, after, chance)


def test_episodes_are_whole_and_each_actor_episode_earns_half_its_length_in_updates(tmp_path, monkeypatch):
    """App. A.3: episodes of 50 agent steps; the two begun within the 60-step prefill act at
    random and earn no updates, the third earns 0.5 x 50 = 25; it began within the 130-step
    budget and runs to its end."""
    monkeypatch.chdir(tmp_path)
    run_dir = core.main(*core.parse_args(["--env", "toy-reach-center", "--preset", "tiny", "--time-limit", "50",
                                          "--prefill", "60", "--total-steps", "130", "--eval-every", "0",
                                          "--save-model"]))
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert checkpoint["counters"]["env_steps"] == 150 and checkpoint["counters"]["episodes"] == 3
    assert checkpoint["agent"]["updates"] == 25


def test_discrete_action_spaces_are_refused_with_a_message():
    args, settings = preset_flags(core, "tiny", env="minigrid-dynamic-obstacles-6x6")
    with pytest.raises(SystemExit) as error:
        make_agent(core, args, settings, 3, discrete=True)
    assert "minigrid-dynamic-obstacles-6x6 has discrete actions; CoRe's SAC needs a Box action space" in str(error.value.code)


def test_gating_masks_are_evaluation_images_only_with_gating():
    """Sec. 3.5: with --gating the evaluation logs eight centre-cropped frames above their masks
    (the appendix records frames for an agent with `eval_images`); without it there is none."""
    assert not hasattr(tiny_agent(), "eval_images")
    agent = tiny_agent(gating=True)
    size, crop = agent.args.render_size, agent.args.crop_size
    frames = [np.full((size, size, 3), i, np.uint8) for i in range(20)]
    (name, image), = agent.eval_images(frames).items()
    assert name == "eval/gating_mask" and image.dtype == np.uint8 and image.shape == (2 * crop, 8 * crop, 3)
    assert np.all(image[:crop, :crop] == 0) and np.all(image[:crop, crop:2 * crop] == 2)  # frames 0, 2


def test_cli_runs_end_to_end_on_dcs_writes_logs_and_checkpoint_and_resumes(tmp_path):
    flags = ["--env", "dcs-walker-walk", "--distraction", "medium", "--preset", "tiny",
             "--eval-every", "400", "--log-every", "200"]
    check_run_then_resume("core.py", flags, 400, 600, tmp_path, "losses/contrastive_loss")


@pytest.mark.slow
def test_core_beats_random_on_toy_reach_center(tmp_path, monkeypatch):
    """About 8 minutes on 2 CPU cores (criterion: conftest.check_beats_random)."""
    monkeypatch.chdir(tmp_path)
    run_dir = core.main(*smoke_args(core, "core"))
    check_beats_random(run_dir, benchmark.SMOKE_ENV)



# ---------------------------------------------------------------------------------------------
# Speed restructuring (issue 11): same computation, fewer kernels
# ---------------------------------------------------------------------------------------------


def test_batched_observe_equals_step_by_step_filtering():
    """`observe` (ObsMLP, the posterior's observation half and PriorMLP batched over T x B) gives
    the same states as T calls of the acting step `obs_step`, for the same noise."""
    args = tiny_args()
    torch.manual_seed(0)
    rssm = core.RSSM(args, 3)
    T, B = 6, 3
    x, action = torch.randn(T, B, args.embed), torch.rand(T, B, 3) * 2 - 1
    torch.manual_seed(1)
    post, prior = rssm.observe(x, action)
    torch.manual_seed(1)
    noise = torch.randn(T, 2, B, args.stoch)  # what observe draws: (T, prior/posterior, B, stoch)
    state = rssm.initial(B, torch.device("cpu"))
    for t in range(T):
        state = rssm.obs_step(state, action[t], x[t], noise[t, 1])
        for key in ("deter", "stoch", "mean", "std"):
            torch.testing.assert_close(post[key][t], state[key], atol=1e-5, rtol=1e-5)
        step_prior = rssm.prior(state["deter"], noise[t, 0])
        torch.testing.assert_close(prior["mean"][t], step_prior["mean"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prior["stoch"][t], step_prior["stoch"], atol=1e-5, rtol=1e-5)


def test_compiled_losses_equal_eager_on_cpu_and_compile_once(dcs_replay, compile_backend):
    """--compile (per `compile_backend`; inductor + gcc on CPU is slow) gives the eager losses for the same seed, parameters and
    batch. Tolerance 1e-4 relative: inductor fuses and reorders fp32 reductions. Random draws
    come from the eager generator (fallback_random) so that both see the same noise. A second
    update must not recompile."""
    import torch._dynamo
    import torch._inductor.config

    args = tiny_args(seq_len=4, batch_size=2)
    batch = batch_from(dcs_replay, args)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        agent = tiny_agent(seq_len=4, batch_size=2, compile=compiled)
        torch.manual_seed(1)
        with torch._inductor.config.patch(fallback_random=True):
            metrics = agent.update(batch)
            if compiled:
                with torch._dynamo.config.patch(error_on_recompile=True):
                    agent.update(batch)
        results.append(metrics)
    eager, compiled = results
    for key in ("model_loss", "contrastive_loss", "kl_loss", "critic_loss", "actor_loss", "alpha_loss"):
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5, msg=key)


def test_target_critics_are_polyak_averages_outside_autograd(dcs_replay):
    """Q' <- (1 - tau) Q' + tau Q after each update, in place and without autograd history
    (a history would chain every update to the last and keep growing)."""
    torch.manual_seed(0)
    agent = tiny_agent()
    args = agent.args
    with torch.no_grad():
        for p in agent.target_critics.parameters():
            p.add_(0.1)
    before = [p.clone() for p in agent.target_critics.parameters()]
    agent.update(batch_from(dcs_replay, args))
    for old, new, online in zip(before, agent.target_critics.parameters(), agent.critics.parameters()):
        torch.testing.assert_close(new, (1 - args.tau) * old + args.tau * online)
        assert not new.requires_grad and new.grad_fn is None


def test_bf16_keeps_critic_values_scores_log_probs_and_kl_in_fp32(dcs_replay):
    agent = tiny_agent(precision="bf16")
    args = agent.args
    z, a = torch.randn(5, agent.wm.rssm.state_dim), torch.rand(5, 6) * 2 - 1
    x, y = torch.randn(7, args.embed), torch.randn(7, args.embed)
    lam = agent.wm.inverse_temperature
    with torch.autocast("cpu", torch.bfloat16):
        assert all(q.dtype == torch.float32 for q in agent.critics(z, a))
        scores = core.contrastive_scores(x, y, lam)
        dist = agent.actor(z)
        log_prob = dist.log_prob(dist.rsample())
        assert torch.nn.functional.linear(x, x).dtype == torch.bfloat16  # autocast is really on
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, lam * x @ y.T)  # the fp32 product, not a bf16 one
    assert log_prob.dtype == torch.float32
    batch = batch_from(dcs_replay, args)
    loss, metrics = agent.model_loss(agent.wm, batch, args)  # as the update computes it: bf16
    q_loss, _, q_metrics = agent.critic_loss(agent.wm, agent.critics, agent.target_critics, agent.actor,
                                             agent.log_alpha, batch, args)
    for key, value in {**metrics, **q_metrics}.items():  # KL, Q, targets and every loss
        assert value.dtype == torch.float32, key
    # Q and reward are computed in fp32 (the output layer), not rounded to bf16 and cast
    d = agent.wm.rssm.state_dim
    za = torch.cat([3 * z, a], -1)
    for i, net in enumerate((agent.critics.q1, agent.critics.q2)):
        check_output_layer_in_fp32(lambda x: agent.critics(x[:, :d], x[:, d:])[i], net, za)
    check_output_layer_in_fp32(lambda x: core.fp32_output(agent.wm.reward, x), agent.wm.reward, 3 * z)


def test_bf16_plain_gru_carries_its_state_in_fp32(monkeypatch):
    """--gru plain: CUDA's autocast runs torch.nn.GRUCell in bf16 (gru_cell is on its
    lower-precision list; CPU's autocast leaves it to type promotion), which would carry a bf16
    h_t. The cell runs with autocast off on fp32 inputs, and the state stays fp32 through observe."""
    args = tiny_args(precision="bf16", gru="plain")
    torch.manual_seed(0)
    rssm = core.RSSM(args, 6)
    seen, gru_cell = [], torch.nn.GRUCell.forward

    def spy(cell, x, h=None):  # what torch.nn.GRUCell computes with, on any device
        seen.append((torch.is_autocast_enabled("cpu"), x.dtype, h.dtype))
        return gru_cell(cell, x, h)

    monkeypatch.setattr(torch.nn.GRUCell, "forward", spy)
    stoch, action = torch.randn(4, args.stoch), torch.rand(4, 6) * 2 - 1
    deter = torch.randn(4, args.deter)
    with torch.autocast("cpu", torch.bfloat16):
        x = rssm.gru_mlp(torch.cat([stoch, action], -1))
        h = rssm.deter_step(stoch, action, deter)
        post, _ = rssm.observe(torch.randn(3, 4, args.embed), torch.zeros(3, 4, 6))
    assert x.dtype == torch.bfloat16  # GRU_MLP does run in bf16
    assert len(seen) == 1 + 3 and all(s == (False, torch.float32, torch.float32) for s in seen)
    assert h.dtype == post["deter"].dtype == torch.float32
    torch.testing.assert_close(h, gru_cell(rssm.cell, x.float(), deter), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Run behaviour (issue 12)
# ---------------------------------------------------------------------------------------------


def test_nan_reward_stops_the_run_with_a_checkpoint_from_before_the_bad_update(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sample, update = core.Replay.sample, core.Agent.update
    calls, before = {"n": 0}, {}

    def bad_sample(self, *a, **kw):
        batch = sample(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 3:  # the third mini-batch carries a NaN reward
            batch["reward"][1, 0] = float("nan")
        return batch

    def spying_update(self, batch):
        if calls["n"] == 3 and not before:
            before.update({f"{m}.{k}": v.clone() for m in ("wm", "actor", "critics", "target_critics")
                           for k, v in getattr(self, m).state_dict().items()})
        return update(self, batch)

    monkeypatch.setattr(core.Replay, "sample", bad_sample)
    monkeypatch.setattr(core.Agent, "update", spying_update)
    flags = core.parse_args(["--env", "toy-reach-center", "--preset", "tiny", "--total-steps", "600"])
    with pytest.raises(SystemExit) as exit_info:
        core.main(*flags)
    # SystemExit with a message: Python prints it to stderr and exits with status 1
    message = exit_info.value.code
    # the NaN reward enters J_M (reward prediction) and J_Q (the TD target)
    assert message.startswith("error: non-finite model_loss, critic_loss at update 3 (env step 400); "
                              "checkpoint from before it:")
    (run_dir,) = (tmp_path / "runs").iterdir()
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)["agent"]
    after = {f"{m}.{k}": v for m in ("wm", "actor", "critics", "target_critics") for k, v in saved[m].items()}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a parameter moved in the bad update"


# ---------------------------------------------------------------------------------------------
# Fidelity (issue 13)
# ---------------------------------------------------------------------------------------------


def test_core_defaults_match_paper():
    a = core.Args()
    # Paper, appendix A.3 (observations, data collection, model updates)
    assert (a.render_width, a.render_height, a.render_size, a.crop_size) == (320, 240, 100, 84)
    assert (a.batch_size, a.seq_len, a.updates_per_step) == (32, 32, 0.5)
    # Paper, Table 2 ("Initial steps 1000": ml-core train.py counts them in agent steps)
    assert (a.replay_capacity, a.prefill) == (100_000, 1000)
    assert (a.model_lr, a.critic_lr, a.actor_lr, a.tau) == (3e-4, 1e-3, 1e-3, 0.005)
    assert (a.beta, a.alpha_r, a.alpha_a) == (0.01, 1.0, 1.0)
    assert (a.critic_clip, a.actor_clip, a.model_clip) == (100, 10, 10)
    # Paper, Table 1 (architecture)
    assert (a.cnn_filters, a.embed, a.obs_mlp, a.gru_mlp, a.deter) == (32, 50, 256, 400, 200)
    assert (a.prior_mlp, a.posterior_mlp, a.decoder_mlp, a.reward_mlp, a.inverse_mlp) == (400, 400, 256, 128, 128)
    assert a.ac_hidden == 1024
    # Paper, Sec. 2.2 / Eq. 2: plain KL, no free nats
    assert a.free_nats == 0.0 and a.objective == "contrastive" and a.predict_from == "prior"
    # Where the paper is silent, apple/ml-core (configs/dcs/core.yaml, train.py, world_model.py):
    assert a.stoch == 64 and a.gamma == 0.99  # latent_dims, gamma
    assert a.critic_model_lr == 1e-3  # include_model_params_in_critic: Theta in the critic's Adam (lr_critic)
    assert a.critic_model_clip == 0.0  # max_grad_norm_critic clips the critic's parameters only
    assert a.kl_first_step is False  # loss_fwd_dynamics skips t = 0
    assert a.eval_split == "val"  # paper Sec. 3: scores on the validation videos
    assert core.TOTAL_STEPS == core.RunSettings().total_steps == 500_000
    assert preset_flags(core, "tiny")[1].total_steps == 2000


def test_update_never_synchronises_with_the_host(dcs_replay):
    device = sync_test_device()  # CUDA where there is one, else CPU (see without_host_sync)
    agent = tiny_agent(device=device)
    args = agent.args
    shape = dcs_replay.shapes["obs"]
    replay = core.Replay(1000, shape, 6, seed=0, device=device)
    n = dcs_replay.size
    replay.add_episode(*(dcs_replay.data[k][:n].cpu().numpy() for k in ("obs", "action", "reward", "cont")))
    # the training loop's device work: sampling, the update, acting (up to its numpy action)
    without_host_sync(lambda: agent.update(core.to_torch(replay.sample(args.batch_size, args.seq_len),
                                                         device)))
    obs = np.zeros(shape, np.uint8)
    state = agent.act(obs, None, explore=True)[1]
    without_host_sync(agent.act, obs, state, True, returns_to_host=True)


def test_cuda_graph_modes_keep_the_losses_and_survive_overwritten_outputs(cuda_graph_steps):
    """--compile-mode reduce-overhead: each compiled call begins a CUDA-graph step and what outlives
    one is copied first (the SAC states z from J_Q into J_pi, the metrics read after the next
    update), so the losses equal the eager ones under the conftest simulation, which turns any use
    of an overwritten output into NaN. 'max-autotune' compiles without CUDA graphs."""
    kw = dict(seq_len=4, batch_size=2)
    tiny_agent(compile=True, compile_mode="max-autotune", **kw)
    assert cuda_graph_steps.modes == ["max-autotune-no-cudagraphs"] * 3
    args = tiny_args(**kw)
    replay = core.Replay(100, (3, args.render_size, args.render_size), 6, seed=0)
    rng = np.random.default_rng(0)
    replay.add_episode(rng.integers(0, 255, (20, 3, args.render_size, args.render_size), dtype=np.uint8),
                       rng.uniform(-1, 1, (20, 6)).astype(np.float32),
                       rng.uniform(0, 1, 20).astype(np.float32), np.ones(20, np.float32))
    batch, runs = batch_from(replay, args), []
    for compile in (False, True):
        torch.manual_seed(0)
        agent = tiny_agent(compile=compile, compile_mode="reduce-overhead", **kw)
        runs.append([])
        for seed in (1, 2):
            torch.manual_seed(seed)
            runs[-1].append(agent.update(batch))
    assert cuda_graph_steps.marks == 6
    for want, got in zip(*runs):  # the first update's metrics are read after the second update
        for key in ("model_loss", "contrastive_loss", "kl_loss", "critic_loss", "actor_loss", "alpha_loss"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
