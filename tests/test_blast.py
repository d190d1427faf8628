"""Specification of blast.py: the five BLAST switches (Sec. 2.3), A.2 presets, shapes, the fast
update pattern's invariants, and the CLI (run, resume)."""

import copy
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import benchmark
import blast
from conftest import (check_beats_random, smoke_args, without_host_sync, sync_test_device,
                      check_dreamerv2_weight_decay, check_output_layer_in_fp32,
                      check_behaviour_step_freezes_world_model,
                      check_decoder_stem_equals_the_transposed_conv, preset_flags, make_agent)

LADDER_RUNGS = ("dreamerv2", "no-recon", "sg", "ema", "bn", "ar")  # paper Sec. 3.3, in its order


def tiny_agent(ladder="ar", discrete=False, device="cpu", **kw):
    """A `--preset tiny` agent on toy-reach (2 actions) at `ladder`, `kw` set (Args or RunSettings
    fields, e.g. compile=True)."""
    args, settings = preset_flags(blast, "tiny", "--env", "toy-reach", "--ladder", ladder, **kw)
    return make_agent(blast, args, settings, 2, discrete, device)


def cli(*argv):
    """Args and RunSettings of a command line, read as one namespace."""
    args, settings = blast.parse_args(list(argv))
    return SimpleNamespace(**vars(settings), **vars(args))


def categoricals(logits):
    """The RSSM's latent as torch.distributions: independent one-hot categoricals."""
    return torch.distributions.Independent(torch.distributions.OneHotCategorical(logits=logits), 1)


def ema_params(wm):
    """(target parameters, online parameters) of the world model's EMA pairs."""
    pairs = wm.ema_pairs()
    return [p for t, _ in pairs for p in t.parameters()], [p for _, o in pairs for p in o.parameters()]


@pytest.fixture(scope="module")
def toy_batch():
    """Real pixels: random-action sequences of toy-reach, time-major (T=8, B=4)."""
    replay = blast.Replay(500, (3, 64, 64), 2, seed=0)
    env = blast.envs.make("toy-reach", seed=0)
    rng = np.random.default_rng(0)
    for _ in range(3):
        obs, _ = env.reset()
        ep = dict(obs=[obs], action=[np.zeros(2, np.float32)], reward=[0.0], cont=[1.0])
        done = False
        while not done:
            action = rng.uniform(-1, 1, 2).astype(np.float32)
            obs, reward, terminated, truncated, _ = env.step(action)
            for key, value in zip(ep, (obs, action, reward, 1.0 - terminated)):
                ep[key].append(value)
            done = terminated or truncated
        replay.add_episode(*(np.asarray(ep[k]) for k in ep))
    return replay.sample(4, 8)


def grads(loss, params):
    """Gradients of loss w.r.t. params (zeros where it does not depend on them)."""
    out = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(out, params)]


def depends(loss, module) -> bool:
    return any(g.abs().sum() > 0 for g in grads(loss, list(module.parameters())))


# --- ladder and presets --------------------------------------------------------------------


def test_ladder_rungs_are_cumulative_and_explicit_switch_flags_win():
    rungs = {r: blast.parse_args(["--env", "toy-reach", "--ladder", r])[0] for r in LADDER_RUNGS}
    assert rungs["dreamerv2"].recon and rungs["dreamerv2"].kl_balance == 0.8
    assert not rungs["no-recon"].recon and rungs["no-recon"].kl_balance == 0.8
    assert rungs["sg"].kl_balance == 1.0 and not rungs["sg"].target_encoder
    assert rungs["ema"].target_encoder and rungs["ema"].encoder_norm == "none"
    assert rungs["bn"].encoder_norm == rungs["bn"].obs_out_norm == "bn" and rungs["bn"].ar_steps == 1
    assert rungs["ar"].ar_steps is None  # = stoch, one categorical per step (A.2)
    assert blast.parse_args(["--env", "toy-reach"])[0].ladder == "ar"
    mixed = blast.parse_args(["--ladder", "sg", "--encoder-norm", "bn", "--kl-balance", "0.9"])[0]
    assert mixed.encoder_norm == "bn" and mixed.kl_balance == 0.9 and not mixed.target_encoder


def test_a2_presets_follow_the_env_family_and_explicit_flags_win():
    """The values themselves: test_blast_defaults_match_paper."""
    grid = cli("--env", "minigrid-dynamic-obstacles-6x6")
    dmc = blast.parse_args(["--env", "dmc-cartpole-swingup"])[0]
    assert all(getattr(grid, k) == v for k, v in blast.PRESETS["minigrid"].items())
    assert vars(dmc) == vars(blast.Args(env="dmc-cartpole-swingup"))  # A.2 DMC: the defaults themselves
    agent = tiny_agent("ar")
    assert all(torch.all(m.bias == 0) for m in agent.ac.modules() if isinstance(m, torch.nn.Linear))
    # (1 - wd) per step, as DreamerV2's optimiser (the Optimizer's fused AdamW, stepped directly)
    check_dreamerv2_weight_decay(SimpleNamespace(ac=agent.ac, critic_opt=agent.critic_opt.opt))
    assert cli("--env", "minigrid-dynamic-obstacles-6x6", "--deter", "64").deter == 64
    small = cli("--env", "minigrid-dynamic-obstacles-6x6", "--preset", "tiny")
    assert small.total_steps == 2000 and small.reward_scale == 100.0 and small.deter == 32
    assert cli("--preset", "tiny", "--total-steps", "500").total_steps == 500


# --- shapes --------------------------------------------------------------------------------


@pytest.mark.parametrize("ladder", ["dreamerv2", "ema", "ar"])
def test_world_model_and_behaviour_terms_are_finite_scalars_with_documented_shapes(toy_batch, ladder):
    agent = tiny_agent(ladder)
    args = agent.args
    T, B = args.batch_length, args.batch_size
    post, target = blast.bootstrapped_posteriors(agent.wm, toy_batch, args)
    for states in (post, target):
        assert states["stoch"].shape == states["logits"].shape == (T, B, args.stoch, args.classes)
        assert states["deter"].shape == (T, B, args.deter)
        assert torch.all(states["stoch"].sum(-1) == 1)  # one-hot samples
    assert agent.wm.rssm.feat(post).shape == (T, B, args.stoch * args.classes + args.deter)
    loss, _, start, metrics = blast.world_model_loss(agent.wm, toy_batch, args)
    assert start["deter"].flatten(0, 1).shape == (T * B, args.deter)  # a start state per (t, b)
    for name, value in metrics.items():
        assert value.shape == () and torch.isfinite(value), name
    actor_loss, critic_loss, ac_metrics = blast.behaviour_losses(agent.wm, agent.ac, start, args, False)
    for name, value in {"actor": actor_loss, "critic": critic_loss, **ac_metrics}.items():
        assert value.shape == () and torch.isfinite(value), name


# --- no-recon ------------------------------------------------------------------------------


def test_only_the_dreamerv2_rung_has_a_pixel_term_in_the_loss(toy_batch):
    torch.manual_seed(0)
    agent = tiny_agent("dreamerv2")
    dv2 = agent.args
    decoded = []  # the decoder's output, with its graph (the returned metrics are detached)
    agent.wm.decoder.register_forward_hook(lambda module, inputs, out: decoded.append(out))
    loss, _, _, m = blast.world_model_loss(agent.wm, toy_batch, dv2)
    torch.testing.assert_close(loss, m["image_loss"] + dv2.reward_scale * m["reward_loss"] + dv2.kl_scale * m["kl_loss"])
    image_loss = blast.gaussian_nll(decoded[0], toy_batch["obs"].float() / 255 - 0.5).sum((-3, -2, -1)).mean()
    torch.testing.assert_close(image_loss, m["image_loss"])
    assert depends(image_loss, agent.wm.encoder)
    for ladder in LADDER_RUNGS[1:]:
        agent = tiny_agent(ladder)
        args = agent.args
        assert agent.wm.decoder is None
        loss, _, _, m = blast.world_model_loss(agent.wm, toy_batch, args)
        assert "image_loss" not in m
        torch.testing.assert_close(loss, args.reward_scale * m["reward_loss"] + args.kl_scale * m["kl_loss"])


def test_probe_decoder_first_layer_is_the_transposed_conv_it_replaces():
    """Issue 22 item 5: the decoder's first transposed conv on a 1x1 input is written as a matmul;
    with the same weights it computes what the conv computes (output and every gradient)."""
    check_decoder_stem_equals_the_transposed_conv(blast.Decoder)


def test_probe_decoder_learns_from_stop_gradient_features_only(toy_batch):
    agent = tiny_agent("ar", probe_decoder=True)
    args = agent.args
    loss, probe_loss, _, m = blast.world_model_loss(agent.wm, toy_batch, args)
    assert "image_loss" not in m and torch.isfinite(m["probe_loss"])
    torch.testing.assert_close(probe_loss, m["probe_loss"])
    torch.testing.assert_close(loss, m["model_loss"])  # the probe's loss is not the model's
    assert depends(probe_loss, agent.wm.decoder)
    for net in (agent.wm.encoder, agent.wm.posterior, agent.wm.rssm):
        assert not depends(probe_loss, net)
    # The probe has its own optimiser and clip: the world model's update is the same with it or
    # without it (a shared gradient clip would scale the model's step with the probe's gradient).
    torch.manual_seed(0)
    plain = tiny_agent("ar")
    state = {k: v for k, v in agent.wm.state_dict().items() if not k.startswith("decoder.")}
    plain.wm.load_state_dict(state)
    decoder_before = [p.detach().clone() for p in agent.wm.decoder.parameters()]
    for a in (agent, plain):
        torch.manual_seed(1)
        a.update(toy_batch)
    for key, value in plain.wm.state_dict().items():
        torch.testing.assert_close(agent.wm.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert any(not torch.equal(b, p) for b, p in zip(decoder_before, agent.wm.decoder.parameters()))


# --- sg ------------------------------------------------------------------------------------


def test_kl_balance_one_stops_the_gradient_into_the_posterior():
    torch.manual_seed(0)
    post = torch.randn(2, 3, 4, 5, requires_grad=True)
    prior = torch.randn(2, 3, 4, 5, requires_grad=True)
    loss, value = blast.kl_balance(post, prior, alpha=1.0, free=0.0)
    g_post, g_prior = grads(loss, [post, prior])
    assert torch.all(g_post == 0) and g_prior.abs().sum() > 0
    plain = torch.distributions.kl_divergence(categoricals(post), categoricals(prior))
    torch.testing.assert_close(loss, plain.mean())
    torch.testing.assert_close(value, plain.detach())
    # DreamerV2's 0.8 balance moves the posterior too
    loss08, _ = blast.kl_balance(post, prior, alpha=0.8, free=0.0)
    assert grads(loss08, [post])[0].abs().sum() > 0


# --- ema -----------------------------------------------------------------------------------


def test_target_nets_are_an_exponential_moving_average_of_the_online_nets(toy_batch):
    torch.manual_seed(0)
    agent = tiny_agent("ema", target_ema=0.9)
    wm = agent.wm
    with torch.no_grad():  # make target and online differ
        for p in wm.target_encoder.parameters():
            p.add_(1.0)
    targets, onlines = ema_params(wm)
    # Sec. 3.3 "+EMA": the encoder alone is averaged (the authors' use_target_rssm False)
    assert wm.target_posterior is None
    assert [o is p for o, p in zip(onlines, wm.encoder.parameters())] == [True] * len(targets)
    assert len(targets) == len(list(wm.encoder.parameters()))
    before = [t.clone() for t in targets]
    agent.update(toy_batch)
    for t, b, o in zip(targets, before, onlines):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)  # xi <- tau xi + (1 - tau) theta
    assert all(not p.requires_grad for p in targets)
    assert all(p.grad is None for p in targets)
    # --target-obs-out: the posterior's observation layer has an EMA copy too
    wm = tiny_agent("ema", target_obs_out=True).wm
    targets, _ = ema_params(wm)
    assert len(targets) == len(list(wm.encoder.parameters())) + len(list(wm.posterior.parameters()))


def test_the_target_starts_from_its_own_random_init_as_the_authors_code(toy_batch):
    """The paper is silent; keirp/blast's first update_targets keeps the target's own init."""
    torch.manual_seed(0)
    wm = tiny_agent("ema").wm
    pairs = list(zip(wm.target_encoder.parameters(), wm.encoder.parameters()))
    weights = [(t, o) for t, o in pairs if t.dim() > 1]
    assert weights and all(not torch.equal(t, o) for t, o in weights)
    # same initialiser (Glorot-uniform bound), different draw
    for t, o in weights:
        assert abs(t.abs().max().item() - o.abs().max().item()) < 0.2 * o.abs().max().item()
    wm = tiny_agent("ema", target_init="copy").wm
    assert all(torch.equal(t, o) for t, o in zip(wm.target_encoder.parameters(), wm.encoder.parameters()))


def test_target_input_p_splits_the_batch_between_online_and_target_paths(toy_batch):
    torch.manual_seed(0)
    B = 4
    for p, online_rows in ((0.5, 2), (0.25, 3), (0.0, 4), (1.0, 0)):
        agent = tiny_agent("ema", target_input_p=p)
        args, wm = agent.args, agent.wm
        post, target = blast.bootstrapped_posteriors(wm, toy_batch, args)
        for row in range(B):
            # h_t of the last step depends on the online encoder only on rows rolled on online
            # posteriors; the KL targets never do
            assert depends(post["deter"][-1, row].sum(), wm.encoder) == (row < online_rows), (p, row)
        assert not depends(target["logits"].sum(), wm.encoder)


def test_target_embeddings_train_the_online_posterior_layer_unless_it_has_an_ema_copy(toy_batch):
    """Default (authors' use_target_rssm False): the target rows go through the online posterior
    layer with full gradients, W_e included. With --target-obs-out they go through its EMA copy and
    the online layer gets nothing from them. (Random weights on the one-hot: the class sum of a
    straight-through sample has zero gradient by construction.)"""
    for obs_out, expect in ((False, True), (True, False)):
        torch.manual_seed(0)
        agent = tiny_agent("ema", target_input_p=1.0, target_obs_out=obs_out)  # every row: target
        args, wm = agent.args, agent.wm
        _, target = blast.bootstrapped_posteriors(wm, toy_batch, args)
        weights = torch.randn_like(target["stoch"])
        assert depends((weights * target["stoch"]).sum(), wm.posterior.embed_in) == expect, obs_out
        assert depends(target["logits"].sum(), wm.posterior.embed_in) == expect, obs_out
        assert not depends((weights * target["stoch"]).sum(), wm.encoder)  # the online encoder: never


def test_the_prior_is_teacher_forced_on_the_target_samples(toy_batch):
    """Sec. 2.3.2 / the authors' teacher_forcing = sg(target_post['stoch']): the KL in
    world_model_loss is that of the prior conditioned on the target samples, not the online ones."""
    agent = tiny_agent("ar", target_input_p=0.5)
    args, wm = agent.args, agent.wm
    torch.manual_seed(5)
    post, target = blast.bootstrapped_posteriors(wm, toy_batch, args)
    torch.manual_seed(5)
    _, _, _, m = blast.world_model_loss(wm, toy_batch, args)
    kl = lambda z: blast.categorical_kl(target["logits"], wm.rssm.prior(post["deter"], z)[0]).mean()  # noqa: E731
    torch.testing.assert_close(m["kl"], kl(target["stoch"]))
    assert not torch.allclose(m["kl"], kl(post["stoch"]))  # online samples would give another KL


def test_imagination_starts_from_the_target_posteriors(toy_batch, monkeypatch):
    """The authors imagine from outputs['target_posts']: the start states are the target rows."""
    agent = tiny_agent("ar", target_input_p=0.5)
    args, wm = agent.args, agent.wm
    torch.manual_seed(5)
    post, target = blast.bootstrapped_posteriors(wm, toy_batch, args)
    torch.manual_seed(5)
    _, _, states, _ = blast.world_model_loss(wm, toy_batch, args)
    starts, imagine = [], blast.imagine  # the start states the behaviour losses imagine from
    monkeypatch.setattr(blast, "imagine", lambda *a: (starts.append(a[2]), imagine(*a))[1])
    blast.behaviour_losses(wm, agent.ac, states, args, False)
    (start,) = starts
    for key in ("deter", "stoch"):
        torch.testing.assert_close(start[key], target[key].flatten(0, 1))
    assert not torch.equal(start["deter"], post["deter"].flatten(0, 1))  # the online rows differ
    assert not start["deter"].requires_grad


def test_acting_filters_with_the_target_encoder_and_the_online_posterior_layer(toy_batch):
    """The authors' policy: target_encoder, then target_rssm (= the online rssm by default)."""
    agent = tiny_agent("ar")
    obs = toy_batch["obs"][0, 0].numpy()

    def acting_logits():
        torch.manual_seed(0)
        _, (latent, _) = agent.act(obs, None, explore=False)
        return latent["logits"].clone()

    base = acting_logits()
    with torch.no_grad():
        for p in agent.wm.encoder.parameters():  # the online encoder does not act
            p.add_(1.0)
        assert torch.equal(acting_logits(), base)
        agent.wm.posterior.embed_in.weight.mul_(2.0)  # the online posterior layer does
        changed = acting_logits()
        assert not torch.equal(changed, base)
        for p in agent.wm.target_encoder.parameters():  # and so does the target encoder
            p.add_(0.1)
        assert not torch.equal(acting_logits(), changed)


# --- ar ------------------------------------------------------------------------------------


def ar_prior(steps=4):
    torch.manual_seed(0)
    return blast.Prior(deter=6, hidden=8, stoch=4, classes=3, steps=steps)


def all_latents(stoch, classes):
    """Every one-hot latent (classes ** stoch, stoch, classes)."""
    index = torch.cartesian_prod(*[torch.arange(classes)] * stoch).reshape(-1, stoch)
    return torch.nn.functional.one_hot(index, classes).float()


def strongly_dependent(prior):
    """Larger weights: chunk k's distribution moves a lot with the chunks before it."""
    with torch.no_grad():
        for layer in (prior.chunk_in, prior.cell.linear, prior.ar_in, prior.hidden, prior.out):
            layer.weight.mul_(4.0)
    return prior


def test_ar_prior_is_a_normalised_joint_distribution_that_is_not_a_product():
    """ln p(z | h) summed over every z gives 1, and the joint differs from the product of its
    marginals (an autoregressive prior can model correlations between chunks)."""
    prior = strongly_dependent(ar_prior(steps=2))
    z = all_latents(4, 3)  # (81, 4, 3)
    h = torch.randn(6).expand(len(z), 6)
    p = prior.log_prob(h, z).exp()
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    pz = p.reshape(9, 9)  # chunk 0 (two categoricals) x chunk 1
    assert (pz - pz.sum(1, keepdim=True) * pz.sum(0, keepdim=True)).abs().max() > 1e-3


def test_ar_prior_samples_follow_its_teacher_forced_log_prob():
    """Sampling (each chunk fed back) and the teacher-forced log_prob describe one distribution:
    the frequencies of 40000 samples match exp(log_prob) over all 9 latents."""
    torch.manual_seed(0)
    prior = strongly_dependent(blast.Prior(deter=6, hidden=8, stoch=2, classes=3, steps=2))
    h = torch.randn(6).expand(40_000, 6)
    with torch.no_grad():
        _, z = prior(h)
        index = z.argmax(-1) @ torch.tensor([3, 1])
        freq = torch.bincount(index, minlength=9).float() / len(z)
        p = prior.log_prob(h[:9], all_latents(2, 3)).exp()
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)


def test_ar_prior_chunk_k_depends_only_on_earlier_chunks():
    prior = ar_prior()
    h = torch.randn(5, 6)
    z = torch.nn.functional.one_hot(torch.randint(0, 3, (5, 4)), 3).float().requires_grad_()
    logits, _ = prior(h, z)
    for k in range(4):
        (g,) = grads(logits[:, k].sum(), [z])
        assert torch.all(g[:, k:] == 0) and (k == 0 or g[:, :k].abs().sum() > 0), k


def test_ar_steps_one_is_dreamerv2s_independent_prior_and_ar_steps_use_two_hidden_layers():
    deep = ar_prior(steps=4)  # the authors' ar_img_in and img_out layers per step
    assert [m.out_features for m in (deep.ar_in, deep.hidden)] == [8, 8]
    prior = ar_prior(steps=1)
    assert not hasattr(prior, "cell") and prior.ar_in is None
    h = torch.randn(5, 6)
    logits, _ = prior(h)
    expected = prior.out(torch.nn.functional.elu(prior.hidden(h))).reshape(5, 4, 3)
    torch.testing.assert_close(logits, expected)


# --- bn ------------------------------------------------------------------------------------


def batch_norms(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def test_batchnorm_sits_in_every_encoder_conv_and_the_posterior_layer():
    wm = tiny_agent("bn", target_obs_out=True).wm
    assert len(batch_norms(wm.encoder)) == 4 and len(batch_norms(wm.posterior)) == 1
    assert all(m.eps == 1e-3 and m.momentum == 0.01 for m in batch_norms(wm))  # Keras defaults
    assert len(batch_norms(wm.target_encoder)) == 4 and len(batch_norms(wm.target_posterior)) == 1
    assert not batch_norms(wm.rssm) and not batch_norms(tiny_agent("ema").wm)


def test_batchnorm_trains_on_batches_and_acting_and_imagination_run_in_eval_mode(toy_batch):
    agent = tiny_agent("ar")
    wm, seen = agent.wm, {}
    bns = batch_norms(wm)

    def record(name):
        return lambda module, inputs: seen.setdefault(name, []).append([m.training for m in bns])

    hooks = [wm.encoder.register_forward_pre_hook(record("world model")),
             wm.rssm.prior.register_forward_pre_hook(record("prior"))]
    agent.update(toy_batch)
    assert all(all(modes) for modes in seen["world model"])  # batch statistics in the loss
    assert all(not any(modes) for modes in seen["prior"][1:])  # imagination (first call: the loss)
    seen.clear()
    hooks.append(wm.target_encoder.register_forward_pre_hook(record("acting")))
    running = [m.running_mean.clone() for m in bns]
    agent.act(toy_batch["obs"][0, 0].numpy(), None, explore=True)
    assert all(not any(modes) for modes in seen["acting"])
    assert all(torch.equal(r, m.running_mean) for r, m in zip(running, bns))  # acting changes none
    for h in hooks:
        h.remove()


def test_target_batchnorm_keeps_its_own_running_statistics(toy_batch):
    agent = tiny_agent("ar", target_ema=0.5)
    online, target = batch_norms(agent.wm.encoder)[0], batch_norms(agent.wm.target_encoder)[0]
    with torch.no_grad():
        online.running_mean.fill_(5.0)  # an EMA of buffers would move the target's towards 5
    agent.update(toy_batch)
    assert target.running_mean.abs().max() < 1.0


# --- fast-pattern invariants ---------------------------------------------------------------


def test_batched_observe_equals_the_step_by_step_acting_loop(toy_batch):
    agent = tiny_agent("sg")
    args, wm = agent.args, agent.wm
    proj = wm.posterior.embed_in(wm.encoder(toy_batch["obs"]))
    torch.manual_seed(3)
    post = wm.rssm.observe([(wm.posterior, proj, toy_batch["action"])])
    torch.manual_seed(3)
    state = wm.rssm.initial(args.batch_size, torch.device("cpu"))
    for t in range(args.batch_length):
        state = wm.rssm.obs_step(state, toy_batch["action"][t], proj[t], wm.posterior)
        for key in ("deter", "logits", "stoch"):
            torch.testing.assert_close(post[key][t], state[key], atol=1e-5, rtol=1e-5)


def test_behaviour_step_leaves_the_world_model_out_and_the_actor_gradient_through_the_latents(toy_batch):
    """Issue 22 item 9: with --compile, `backward(inputs=...)` does not prune a compiled backward, so
    the behaviour losses run with the world model frozen; the loss and the actor's gradient are
    unchanged. With no entropy bonus and dynamics gradients, the actor reaches its loss only
    through the imagined latents, so its non-zero gradient has come through them."""
    agent = tiny_agent("ar", actor_entropy=0.0, actor_grad="dynamics")
    check_behaviour_step_freezes_world_model(agent, "behaviour_losses", lambda: agent.update(toy_batch),
                                             agent.wm, agent.ac.actor, blast.frozen)


def test_a_non_finite_loss_skips_every_step_and_is_flagged(toy_batch):
    agent = tiny_agent("ar")
    bad = dict(toy_batch, reward=toy_batch["reward"].clone())
    bad["reward"][0, 0] = float("nan")
    before = copy.deepcopy(agent.state_dict())
    metrics = agent.update(bad)
    assert agent.compute.flags().tolist()[0] == 1.0  # the model loss (model, actor, critic)
    assert not torch.isfinite(metrics["model_loss"])
    for key, value in agent.wm.state_dict().items():  # parameters and EMA targets unchanged
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(value, before["wm"][key]), key
    assert agent.model_opt.state_dict()["state"][0]["exp_avg"].abs().sum() == 0  # Adam moments too
    for key, value in agent.ac.state_dict().items():  # the actor and critic steps are skipped too
        assert torch.equal(value, before["ac"][key]), key
    agent.update(toy_batch)  # later updates stay skipped: the loop stops on the flags
    assert agent.compute.skip.item() == 1.0
    for key, value in agent.ac.state_dict().items():
        assert torch.equal(value, before["ac"][key]), key


def test_bf16_keeps_kl_log_probs_values_and_losses_in_fp32(toy_batch):
    agent = tiny_agent("ar", precision="bf16")
    args = agent.args
    with agent.compute.precision():
        loss, _, start, m = blast.world_model_loss(agent.wm, toy_batch, args)
        actor_loss, critic_loss, am = blast.behaviour_losses(agent.wm, agent.ac, start, args, False)
        log_prob = agent.wm.rssm.prior.log_prob(start["deter"], start["stoch"])
    for value in (loss, m["kl_loss"], m["kl"], actor_loss, critic_loss, am["value"], am["lambda_return"], log_prob):
        assert value.dtype == torch.float32
    # reward and values are computed in fp32 (the output layer), not rounded to bf16 and cast
    feat = 3 * torch.randn(16, agent.wm.rssm.feat_dim)
    for net in (agent.wm.reward, agent.ac.critic, agent.ac.target_critic):
        check_output_layer_in_fp32(net, net, feat)


@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "discrete"])  # discrete: REINFORCE
def test_an_update_never_syncs_with_the_host(toy_batch, discrete):
    device = sync_test_device()  # CUDA where there is one, else CPU (see without_host_sync)
    agent = tiny_agent("ar", discrete, device)
    replay = blast.Replay(200, (3, 64, 64), 2, seed=0, device=device)
    replay.add_episode(*(toy_batch[k][:, 0].cpu().numpy() for k in ("obs", "action", "reward", "cont")))
    # the training loop's device work: sampling, the update, acting (up to its numpy action)
    without_host_sync(lambda: agent.update(blast.to_torch(replay.sample(4, 8), device)))
    state = agent.act(np.zeros((3, 64, 64), np.uint8), None, explore=True)[1]
    without_host_sync(agent.act, np.zeros((3, 64, 64), np.uint8), state, True, returns_to_host=True)


# --- CLI and the paper's defaults --------------------------------------------------------


def test_blast_defaults_match_paper():
    """Each value's source: the paper (A.2, Sec.), the authors' keirp/blast code or configs, the
    DreamerV2 config (danijar/dreamerv2 configs.yaml, which A.1 says DMC runs keep), or ours."""
    dmc, grid = cli(), cli("--env", "minigrid-dynamic-obstacles-6x6")
    assert dmc.ladder == "ar" and LADDER_BLAST(dmc)  # A.2 "BLAST" block (below)
    # A.2 DMC block
    assert (dmc.prefill, dmc.train_every, dmc.pred_discount, dmc.gamma) == (1000, 5, False, 0.99)
    assert (dmc.hidden, dmc.deter, dmc.stoch, dmc.classes) == (200, 200, 8, 64)
    assert (dmc.actor_grad, dmc.kl_scale, dmc.reward_scale, dmc.reward_clamp) == ("dynamics", 1.0, 1.0, "none")
    # A.2 steps 1e6 counts agent steps (DreamerV2 train.py): 2e6 simulator steps at repeat 2
    assert dmc.total_steps == 2_000_000 and blast.action_repeat(dmc) == 2
    # A.2 Gym-MiniGrid block; stoch 16 is A.2's (the authors' grid configs ran 8, ar_steps 8)
    assert (grid.prefill, grid.train_every, grid.total_steps, grid.gamma) == (10_000, 1, 50_000, 0.99)
    assert (grid.hidden, grid.deter, grid.stoch, grid.classes) == (600, 600, 16, 64)
    assert (grid.actor_grad, grid.kl_scale, grid.reward_scale, grid.reward_clamp) == ("reinforce", 0.1, 100.0, "tanh")
    assert blast.action_repeat(grid) == 1 and LADDER_BLAST(grid)
    # authors' configs.yaml minigrid values A.2 does not list
    assert (grid.model_lr, grid.critic_lr, grid.actor_entropy, grid.free_nats) == (4e-4, 1e-4, 0.1, 0.0)
    assert (grid.pretrain, grid.eval_every, grid.eval_episodes) == (1, 2500, 5)
    # authors' code where the paper is silent: encoder-only EMA (use_target_rssm False), the
    # target's own random init, two hidden layers per AR step (Prior), Keras BatchNorm eps
    assert dmc.target_obs_out is False and dmc.target_init == "random"
    assert blast.norm_layer("bn", 1, True).eps == 1e-3
    # DreamerV2 configs.yaml (A.1: "default hyperparameters for DreamerV2 on DMC")
    assert (dmc.batch_size, dmc.batch_length) == (16, 50)
    # authors' DMC runs: `--configs defaults dmc_vision`, replay.prioritize_ends False there;
    # their grid world keeps DreamerV2's default True
    assert not dmc.prioritize_ends and grid.prioritize_ends
    assert (dmc.model_lr, dmc.actor_lr, dmc.critic_lr, dmc.actor_entropy) == (3e-4, 8e-5, 8e-5, 1e-4)
    assert (dmc.horizon, dmc.return_lambda, dmc.free_nats, dmc.target_update_every) == (15, 0.95, 1.0, 100)
    assert (dmc.adam_eps, dmc.grad_clip, dmc.weight_decay, dmc.init) == (1e-5, 100.0, 1e-6, "glorot")
    # ours: replay capacity 1e6 simulator steps (DreamerV2: 2e6 agent steps), see Args
    assert dmc.replay_capacity == 1_000_000


def test_one_place_for_the_numbers_args_defaults_then_presets_then_flags():
    """Args defaults are A.2's DMC column and BLAST block; every other setting is one PRESETS entry
    (family, rung, size), applied in that order and named with its values in the run header."""
    assert vars(blast.parse_args([])[0]) == vars(blast.Args())
    names = {f.name for part in (blast.Args, blast.RunSettings) for f in dataclasses.fields(part)}
    assert set(blast.PRESETS) == {"minigrid", *LADDER_RUNGS[:-1], "small", "tiny"}
    assert all(set(entry) <= names for entry in blast.PRESETS.values())
    args, settings = blast.parse_args(["--env", "minigrid-dynamic-obstacles-6x6", "--ladder", "sg",
                                       "--preset", "tiny", "--deter", "64"])
    assert list(blast.presets(args)) == ["minigrid", "sg", "tiny"]
    assert args.deter == 64 and args.stoch == 4 and args.reward_scale == 100.0 and not args.target_encoder
    header = blast.describe_presets(args, settings)  # the run header's line on the presets
    # values of the minigrid, sg and tiny entries, and the flag that replaced one
    assert "reward_scale=100.0" in header and "target_encoder=False" in header and "stoch=4" in header
    assert "flags replaced deter=64 (preset 32)" in header
    assert "no overrides" in blast.describe_presets(*blast.parse_args([]))


def LADDER_BLAST(args):
    """A.2 "BLAST" block: kl.balance 1.0, encoder.norm and rssm.obs_out_norm bn, target_ema 0.99,
    target_input_p 0.5, rssm.ar_steps = rssm.stoch, use_target_encoder true; no reconstruction."""
    return (args.kl_balance == 1.0 and args.encoder_norm == args.obs_out_norm == "bn"
            and args.target_ema == 0.99 and args.target_input_p == 0.5 and args.ar_steps is None
            and args.target_encoder and not args.recon)


def test_cli_switch_flags_parse_and_reach_the_agent():
    args, settings = blast.parse_args(["--preset", "tiny", "--env", "toy-reach", "--target-obs-out",
                                       "--target-init", "copy", "--no-prioritize-ends"])
    assert args.target_obs_out and args.target_init == "copy" and not args.prioritize_ends
    wm = make_agent(blast, args, settings, 2).wm
    assert wm.target_posterior is not None
    assert all(torch.equal(t, o) for t, o in zip(wm.target_posterior.parameters(), wm.posterior.parameters()))




@pytest.mark.slow
def test_blast_beats_random_on_toy_reach_center(tmp_path, monkeypatch):
    """Criterion: conftest.check_beats_random (benchmark.sh smoke's)."""
    monkeypatch.chdir(tmp_path)
    run_dir = blast.main(*smoke_args(blast, "blast"))
    check_beats_random(run_dir, benchmark.SMOKE_ENV)


@pytest.mark.slow
def test_blast_beats_random_on_minigrid(tmp_path, monkeypatch):
    """MiniGrid dynamic obstacles with the A.2 grid-world settings at small sizes."""
    monkeypatch.chdir(tmp_path)
    env = "minigrid-dynamic-obstacles-6x6"
    args = blast.parse_args(["--env", env, "--preset", "tiny", "--cnn-depth", "8", "--deter", "64",
                             "--hidden", "64", "--stoch", "8", "--classes", "8", "--mlp-units", "64",
                             "--batch-size", "8", "--batch-length", "16", "--prefill", "1000",
                             "--train-every", "2", "--total-steps", "6000", "--eval-every", "1000",
                             "--eval-episodes", "20"])
    run_dir = blast.main(*args)
    check_beats_random(run_dir, env)


def test_compiled_losses_equal_eager_ones(toy_batch, compile_backend):
    """--compile compiles the whole loss functions (per `compile_backend`; inductor is slow on CPU); with inductor's random
    numbers replaced by eager's (fallback_random) the losses agree to 1e-4 relative."""
    import torch._inductor.config as inductor

    short = {k: v[:3] for k, v in toy_batch.items()}
    agent = tiny_agent("ar", compile=True, horizon=2)
    args = agent.args
    eager, compiled = {}, {}
    for out, wm_loss, ac_loss in ((eager, blast.world_model_loss, blast.behaviour_losses),
                                  (compiled, agent.world_model_loss, agent.behaviour_losses)):
        torch.manual_seed(1)
        with inductor.patch(fallback_random=True):
            loss, _, start, m = wm_loss(agent.wm, short, args)
            actor_loss, critic_loss, _ = ac_loss(agent.wm, agent.ac, start, args, False)
        out.update(model=loss, kl=m["kl_loss"], actor=actor_loss, critic=critic_loss)
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)


def test_cuda_graph_modes_keep_the_losses_and_survive_overwritten_outputs(toy_batch, cuda_graph_steps):
    """--compile-mode reduce-overhead: each compiled call begins a CUDA-graph step and what outlives
    one is copied first (the imagination start states, the metrics read after the next update), so
    the losses equal the eager ones under the conftest simulation, which turns any use of an
    overwritten output into NaN. 'max-autotune' compiles without CUDA graphs."""
    tiny_agent("dreamerv2", compile=True, compile_mode="max-autotune")
    assert cuda_graph_steps.modes == ["max-autotune-no-cudagraphs"] * 2
    short, runs = {k: v[:3] for k, v in toy_batch.items()}, []
    for compile in (False, True):
        agent = tiny_agent("ar", compile=compile, compile_mode="reduce-overhead", probe_decoder=True,
                           horizon=2)
        runs.append([])
        for seed in (1, 2):
            torch.manual_seed(seed)
            runs[-1].append(agent.update(short))
    assert cuda_graph_steps.marks == 4
    for want, got in zip(*runs):  # the first update's metrics are read after the second update
        for key in ("kl_loss", "probe_loss", "actor_loss", "critic_loss", "actor_grad_norm"):
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
