"""BLAST: Latent Dynamics Models from Bootstrapping.

Keiran Paster, Lev McKinney, Sheila A. McIlraith, Jimmy Ba. Deep Reinforcement Learning Workshop
at NeurIPS 2021. Authors' code: https://github.com/keirp/blast (built on danijar/dreamerv2).

The idea: DreamerV2 without reconstruction. The world model learns its latent state from the
reward and from predicting its own future latents: the prior p(z_t | h_t) is trained towards the
posterior of a slowly moving (EMA) target encoder, with no gradient into that posterior, as BYOL
trains a predictor towards a target network (Sec. 2.3). An autoregressive prior fits the joint
distribution of the categoricals that the posterior is no longer pushed to make independent, and
BatchNorm in the encoder, as in BYOL, makes it stable (Sec. 2.3.3). The script is
`dreamerv2.py` with five switches, one per rung of the paper's cumulative ablation ladder (Sec. 3.3,
Fig. 3 and 4), `--ladder`:

  dreamerv2  DreamerV2 (Eq. 2.3): image + reward log losses + KL balanced 0.8 / 0.2.
  no-recon   - the image decoder in the loss (`--no-recon`; `--probe-decoder` trains one on
             stop-gradient features only, to look at what the latent holds, Fig. 8 / App. A.5).
  sg         + KL balance 1.0: KL(sg(q(z|h,x)) || p(z|h)), no gradient into the posterior (2.3.1).
  ema        + target encoder xi <- tau xi + (1 - tau) theta, tau = 0.99 (Sec. 3.3: "an
             exponential moving average for the encoder"); its embeddings go through the online
             posterior layer and the target posteriors are the KL targets (Eq. 2.4);
             `target_input_p` of the batch rolls the deterministic path on target posteriors, the
             rest on online ones (Sec. 2.3.2, A.2).
  bn         + BatchNorm in every encoder conv layer and in the posterior's observation layer (2.3.3).
  ar         + autoregressive prior: p(z_t | h_t) = prod_k p(z_t^k | h_t, z_t^{<k}) over `ar_steps`
             chunks of categoricals (2.3.2). The full method, BLAST; the default.

The paper, and where this file implements it (in the file's order):
- App. A.2 (hyperparameters): `Args` defaults are the DMC column with the BLAST block; the grid
  world column, the ladder's rungs and our CPU sizes are the entries of `PRESETS`.
- Eq. 2.2, the RSSM: h_t = f(h_{t-1}, z_{t-1}, a_{t-1}) `RSSM.recurrent`; q(z_t | h_t, x_t)
  `Posterior` (`RSSM.observe` filters a sequence); p(z_t | h_t) `Prior` (Sec. 2.3.2: independent
  categoricals, or autoregressive over chunks); reward (and discount) heads in `WorldModel`.
- The replay and the index conventions (which slot holds o_t, a_{t-1}, r_t): `Replay`.
- Eq. 2.3 (dreamerv2 rung) / Eq. 2.4 (BLAST), the world-model loss: `world_model_loss`, with
  `bootstrapped_posteriors` (the KL targets q_xi, Sec. 2.3.1-2.3.2) and `kl_balance` (alpha).
- xi <- tau xi + (1 - tau) theta (Sec. 2.3.1): in `Agent.update`, after the world-model step.
- Behaviour learning is DreamerV2's (its Eq. 4-6; the BLAST paper's Eq. 2.1 is the objective it
  maximises): `imagine`, `lambda_return`, `behaviour_losses`.
- The update, in the algorithm's order: `Agent.update`; acting and evaluation: `Agent.act`,
  `evaluate`; the loop: `main`. Everything after `main` is plumbing shared by the five scripts.

Shapes are time-major throughout: replay sequences are (T, B, ...), imagined rollouts (H + 1, N, ...)
with N = T * B start states. Images are uint8 (3, 64, 64) until the encoder maps them to [-0.5, 0.5].
docs/blast.md has the usage, the implementation details with their sources and the deviations.

    python blast.py --env dcs-walker-walk --distraction medium
    python blast.py --env minigrid-dynamic-obstacles-6x6 --distraction video
    python blast.py --env dmc-cartpole-swingup --ladder sg
    python blast.py --env dmc-cartpole-swingup --preset small
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch import distributions as td
from torch.utils.tensorboard import SummaryWriter

import envs

# Argument validation of torch.distributions checks every sample; it costs ~20% of an update.
td.Distribution.set_default_validate_args(False)

# ---------------------------------------------------------------------------------------------
# Hyperparameters: Args defaults are A.2's DMC column with its BLAST block (the paper's main
# setting); every other setting is one entry of PRESETS below, applied over the defaults.
# ---------------------------------------------------------------------------------------------


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """ours: name of this experiment (part of the run name, as CleanRL's)"""
    env: str = "dmc-walker-walk"
    """env id (ours: a DMC task, the paper's Sec. 3.5 suite): minigrid-<name> (discrete actions,
    e.g. minigrid-dynamic-obstacles-6x6), dmc-<domain>-<task>, dcs-<domain>-<task>,
    natural-<domain>-<task>, toy-reach, toy-reach-center (docs/envs.md). minigrid-* takes
    PRESETS["minigrid"] (A.2's grid-world column), every other id the defaults (A.2's DMC column)"""
    distraction: str = "none"
    """paper Sec. 3.1.1 (minigrid-*: none | color_direction | smaller_agent | random_frames | video);
    ours for dcs-*: none | easy | medium | hard | background"""
    dynamic: bool = True
    """ours: distractions move within an episode (False: static per episode)"""
    video_dir: Optional[str] = None
    """ours: video folder for backgrounds (default: built-in offline pool)"""
    eval_split: Literal["train", "val"] = "val"
    """ours: background videos used for evaluation"""
    seed: int = 1
    """ours: seed of the experiment (CleanRL's default)"""
    torch_deterministic: bool = True
    """ours: sets `torch.backends.cudnn.deterministic` (and cudnn.benchmark off)"""
    device: str = "auto"
    """ours: 'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ..."""
    compile: bool = False
    """ours: torch.compile the whole world-model and behaviour loss functions"""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """ours: torch.compile mode (CUDA: 'reduce-overhead' uses CUDA graphs; 'max-autotune' means
    max-autotune-no-cudagraphs until a GPU run has shown CUDA graphs work with it)"""
    precision: Literal["fp32", "bf16"] = "fp32"
    """ours: bf16 autocast for the networks; KL, log-probs, values and loss reductions stay fp32"""
    preset: Literal["paper", "small", "tiny"] = "paper"
    """ours: 'paper' = A.2; 'small': the same algorithm sized for a 2-core CPU (100K steps of
    dmc-cartpole-swingup in under an hour); 'tiny': narrow nets, short sequences, 2000 env steps,
    for smoke tests. The override dicts are PRESETS["small"] / PRESETS["tiny"]; flags you set
    explicitly win over them"""
    ladder: Literal["dreamerv2", "no-recon", "sg", "ema", "bn", "ar"] = "ar"
    """paper Fig. 3, 4: rung of the cumulative ablation ladder; 'ar' (all five changes) is BLAST, the
    defaults; the other rungs' overrides of the five switches are PRESETS[<rung>]. Switch flags
    given explicitly win over the rung"""
    total_steps: int = 2_000_000
    """App. A.2 (DMC `steps 1e6`): environment steps to train for, counted after action repeat
    (simulator steps), as in the other scripts here. A.2's `steps` is DreamerV2's config key, which
    counts agent steps (train.py increments its counter once per step of the action-repeat wrapper),
    so the paper's DMC runs are 2e6 simulator steps at action repeat 2"""
    action_repeat: Optional[int] = None
    """DreamerV2 configs.yaml dmc (action_repeat 2, which A.2 keeps): simulator steps per action;
    None = 2 for every dmc/dcs/natural task, the env's default elsewhere (e.g. 1 for MiniGrid);
    0 = the env's own default (PlaNet's per-task repeat for DMC)"""
    eval_every: int = 10_000
    """ours: environment steps between evaluations (0: never, except at the end)"""
    eval_episodes: int = 10
    """ours: episodes per evaluation, deterministic (mode) actions"""
    eval_action: Literal["mode", "mean"] = "mode"
    """continuous actions in evaluation: 'mode', as DreamerV2's code (the truncated normal's
    location clipped to [-1, 1]: a full push once the actor's tanh mean saturates), or 'mean'
    (ours: the distribution's mean, the average of the samples the actor is trained on;
    deterministic too). results/cpu/behaviour_check compares them on the CPU runs' checkpoints"""
    log_every: int = 1_000
    """ours: environment steps between metric logs and progress lines (also every 30 s)"""
    save_model: bool = False
    """ours: write checkpoint.pt (networks, optimisers, counters, RNG states) at every evaluation,
    and replay.pt beside it at the end and every --replay-checkpoint-every evaluations (an
    interrupt or a non-finite loss always writes both)"""
    checkpoint_replay: bool = True
    """ours: write the replay to replay.pt (see save_checkpoint), so that --resume keeps the same
    data; --no-checkpoint-replay: never, a resumed run starts with an empty replay"""
    replay_checkpoint_every: int = 10
    """evaluations between the periodic replay.pt writes (0: only at the end, on an interrupt or a
    non-finite stop). ours: the replay is gigabytes on a GPU run and writing it pauses training
    (checkpoint.pt is megabytes); at every 10th evaluation (100K env steps at --eval-every 10000)
    the pause is a small fraction of the time between writes, and a hard kill (SIGKILL, a lost
    node) costs at most 10 evaluations' worth of replay, never the networks"""
    resume: Optional[str] = None
    """ours: path of a checkpoint to continue from (its args are the defaults; same schedule)"""
    measure_updates: int = 0
    """ours: if > 0, time this many updates on a synthetic batch and 50 acting steps, print one JSON
    line and exit (benchmark.sh speed)"""
    capture_video: bool = False
    """ours: save an mp4 of the first eval episode (runs/<run>/videos) and a frame strip to
    TensorBoard"""

    # Replay and schedule (A.2 DMC; see PRESETS for the grid world).
    replay_capacity: int = 1_000_000
    """ours: replay capacity in environment steps (stored per agent step as uint8 images): half a
    DMC run (5e5 agent steps, 6 GB of frames); DreamerV2's configs.yaml keeps 2e6 agent steps"""
    replay_device: Literal["auto", "cpu", "cuda"] = "auto"
    """ours: where the replay's arrays live: auto = the training device when it is CUDA"""
    prioritize_ends: bool = False
    """sample the last window of each episode more often (see `Replay.draw_starts`). Off: the
    authors' DMC runs (experiments/configs/dmc_exps.yaml) use `--configs defaults dmc_vision`, and
    dmc_vision sets replay.prioritize_ends False (True in DreamerV2's defaults)"""
    batch_size: int = 16
    """DreamerV2 configs.yaml dataset.batch: sequences per mini-batch"""
    batch_length: int = 50
    """DreamerV2 configs.yaml dataset.length: steps per sequence"""
    prefill: int = 1000
    """App. A.2 (DMC prefill): agent steps with uniform random actions before training starts"""
    pretrain: int = 100
    """DreamerV2 configs.yaml pretrain: updates made once, right after the prefill"""
    train_every: int = 5
    """App. A.2 (DMC train_every): agent steps between training rounds"""
    updates_per_step: int = 1
    """DreamerV2 configs.yaml train_steps: updates per training round"""

    # World model.
    cnn_depth: int = 48
    """DreamerV2 configs.yaml encoder/decoder cnn_depth: channels of the first layer (doubling:
    48/96/192/384)"""
    deter: int = 200
    """App. A.2 (DMC rssm.deter): GRU (deterministic) state size"""
    hidden: int = 200
    """App. A.2 (DMC rssm.hidden): hidden units of the RSSM's input and output layers"""
    stoch: int = 8
    """App. A.2 (DMC rssm.stoch): categorical latent variables"""
    classes: int = 64
    """App. A.2 (DMC rssm.discrete): classes per categorical variable"""
    mlp_units: int = 400
    """DreamerV2 configs.yaml (reward/discount/actor/critic units): units of those MLPs"""
    mlp_layers: int = 4
    """DreamerV2 configs.yaml (reward/discount/actor/critic layers): hidden layers of those MLPs"""
    free_nats: float = 1.0
    """DreamerV2 configs.yaml kl.free: free nats, applied to the batch-mean KL"""
    kl_scale: float = 1.0
    """App. A.2 (DMC loss_scales.kl): beta_KL, the KL weight"""
    reward_scale: float = 1.0
    """App. A.2 (DMC loss_scales.reward): beta_r, the reward log-loss weight"""
    reward_clamp: Literal["none", "tanh"] = "none"
    """App. A.2 (DMC reward_clamp): squash the reward target with tanh (the imagined reward is the
    head's)"""
    pred_discount: bool = False
    """App. A.2 (pred_discount False for both families): learn a discount (continuation) head"""
    model_lr: float = 3e-4
    """DreamerV2 configs.yaml dmc model_opt.lr: world-model learning rate"""

    # The five BLAST switches: A.2's "BLAST" block (the ladder's lower rungs: PRESETS).
    recon: bool = False
    """paper Sec. 3.3 (-recon): image log loss in the world-model objective (DreamerV2's Eq. 2.3);
    off from the no-recon rung on"""
    probe_decoder: bool = False
    """paper Fig. 8 / App. A.5: train a decoder on stop-gradient features (it never shapes the
    latent)"""
    kl_balance: float = 1.0
    """App. A.2 (BLAST kl.balance 1.0; DreamerV2 0.8): KL balancing alpha, the prior side's weight;
    1.0 = KL(sg(q) || p) (Sec. 2.3.1, sg rung)"""
    target_encoder: bool = True
    """App. A.2 (BLAST use_target_encoder true): EMA target encoder whose posteriors are the KL
    targets (Eq. 2.4, ema rung)"""
    target_obs_out: bool = False
    """authors' code (configs use_target_rssm False; Sec. 3.3 "+EMA" averages the encoder): False =
    target embeddings go through the online posterior layer, with full gradients into it, and
    acting uses it. True: the target also has its own EMA copy of that layer (obs_out), which then
    acts"""
    target_init: Literal["random", "copy"] = "random"
    """authors' code (update_targets mixes with weight 1.0 on the target at the first update; the
    paper is silent): the target's initial weights; 'random' = its own random draw; 'copy' = a copy
    of the online nets (BYOL)"""
    target_ema: float = 0.99
    """App. A.2 (BLAST target_ema): tau of xi <- tau xi + (1 - tau) theta (Sec. 2.3.1)"""
    target_input_p: float = 0.5
    """App. A.2 (BLAST target_input_p): fraction of the batch whose deterministic path rolls on
    target posteriors (Sec. 2.3.2)"""
    encoder_norm: Literal["none", "bn"] = "bn"
    """App. A.2 (BLAST encoder.norm bn; Sec. 2.3.3): normalisation after every encoder conv (bn rung)"""
    obs_out_norm: Literal["none", "bn"] = "bn"
    """App. A.2 (BLAST rssm.obs_out_norm bn; Sec. 2.3.3): normalisation in the posterior's
    observation layer (bn rung)"""
    ar_steps: Optional[int] = None
    """App. A.2 (BLAST rssm.ar_steps "same as rssm.stoch"): chunks of the autoregressive prior
    (Sec. 2.3.2). None is A.2's entry: equal to --stoch, one categorical per step, whatever --stoch
    is; 1 = DreamerV2's independent prior (the rungs below ar)"""

    # Behaviour (DreamerV2's, unchanged by BLAST).
    horizon: int = 15
    """DreamerV2 configs.yaml imag_horizon: imagination horizon H"""
    gamma: float = 0.99
    """App. A.2 (discount gamma 0.99, both families): discount"""
    return_lambda: float = 0.95
    """DreamerV2 configs.yaml discount_lambda: lambda of the lambda-return"""
    actor_lr: float = 8e-5
    """DreamerV2 configs.yaml dmc actor_opt.lr: actor learning rate"""
    critic_lr: float = 8e-5
    """DreamerV2 configs.yaml dmc critic_opt.lr: critic learning rate"""
    actor_entropy: float = 1e-4
    """DreamerV2 configs.yaml dmc actor_ent: entropy regulariser eta"""
    actor_grad: Literal["auto", "dynamics", "reinforce"] = "dynamics"
    """App. A.2 (DMC actor_grad dynamics, grid world reinforce): 'dynamics' backpropagation or
    'reinforce'; 'auto' (ours): by action space"""
    target_update_every: int = 100
    """DreamerV2 configs.yaml slow_target_update: updates between copies of the critic into the
    slow target critic"""
    adam_eps: float = 1e-5
    """DreamerV2 configs.yaml *_opt.eps: Adam epsilon"""
    grad_clip: float = 100.0
    """DreamerV2 configs.yaml *_opt.clip: gradient-norm clip of every optimiser"""
    weight_decay: float = 1e-6
    """DreamerV2 configs.yaml *_opt.wd: weight decay of every optimiser, as DreamerV2's: each
    variable times (1 - wd) per step"""
    init: Literal["glorot", "torch"] = "glorot"
    """authors' code (and DreamerV2's: Keras defaults): weight init; 'glorot' = Glorot-uniform
    weights, zero biases; 'torch' = PyTorch's layer defaults"""


LADDER_RUNGS = ("dreamerv2", "no-recon", "sg", "ema", "bn", "ar")

# Every setting other than the defaults, as overrides of Args, applied in this order (later wins):
#   1. the env family: "minigrid" for minigrid-* env ids; every other id keeps the defaults (A.2 DMC);
#   2. the ladder rung (--ladder): "ar" = BLAST keeps the defaults;
#   3. the size (--preset): "paper" keeps the values above; "small", "tiny";
#   4. flags given on the command line.
# The run header prints the entries it applied (`overrides`). None of them shares a key with an
# earlier kind, except the sizes, which resize the family's networks and schedule.
PRESETS = {
    # 1. App. A.2 "Gym-MiniGrid" column: where it differs from the DMC column. stoch 16 is A.2's
    #    (with ar_steps = stoch, 16 AR steps); the authors' grid_exps.yaml runs stoch 8 with
    #    ar_steps 8: the paper wins. The last two lines: authors' configs.yaml minigrid-repeat,
    #    values A.2 does not list.
    "minigrid": dict(deter=600, hidden=600, stoch=16, kl_scale=0.1, reward_scale=100.0,
                     reward_clamp="tanh", train_every=1, prefill=10_000, actor_grad="reinforce",
                     total_steps=50_000,  # A.2 steps 5e4 (action repeat 1)
                     model_lr=4e-4, critic_lr=1e-4, actor_entropy=0.1, free_nats=0.0,
                     pretrain=1, eval_every=2500, eval_episodes=5,
                     prioritize_ends=True),  # authors' configs.yaml defaults (no dmc_vision here)
    # 2. The ablation ladder (paper Sec. 3.3, Fig. 3 and 4), cumulative from DreamerV2 to BLAST:
    #    DreamerV2 (image loss, alpha 0.8) -> -recon -> +SG (alpha 1) -> +EMA target encoder ->
    #    +BN -> +AR prior (= BLAST, the defaults).
    "dreamerv2": dict(recon=True, kl_balance=0.8, target_encoder=False, encoder_norm="none",
                      obs_out_norm="none", ar_steps=1),
    "no-recon": dict(kl_balance=0.8, target_encoder=False, encoder_norm="none", obs_out_norm="none",
                     ar_steps=1),
    "sg": dict(target_encoder=False, encoder_norm="none", obs_out_norm="none", ar_steps=1),
    "ema": dict(encoder_norm="none", obs_out_norm="none", ar_steps=1),
    "bn": dict(ar_steps=1),
    # 3. Sizes. ours: 'small', the same algorithm sized for a 2-core CPU, 100K env steps of
    #    dmc-cartpole-swingup in under an hour (docs/blast.md); values measured on one CPU thread:
    #    - action_repeat 0: the env's per-task repeat (PlaNet's, 8 for cartpole), the DMC-100K
    #      setting; a frame costs ~20-30 ms to render here.
    #    - 16-channel CNN, 128-unit GRU/MLPs, 8 x 32 latents (8 autoregressive prior steps, as
    #      A.2's DMC 8 x 64): 0.79M trained parameters on cartpole.
    #    - batch 16 x 16 every 5 agent steps, A.2's DMC train_every (1.5 s an update on one thread:
    #      the AR prior and the target encoder make it the slowest of the DreamerV2 family here).
    #      An update every 8 agent steps (1,537 updates in 100K env steps) ended at 198 +- 8 over
    #      three seeds on dmc-cartpole-swingup, every 5 (2,400) at 272 +- 30 (results/cpu; the
    #      former runs: results/cpu/variants).
    #    - learning rates raised (model 1e-3, actor and critic 3e-4), as for few, small updates.
    #    - prioritize_ends on (DreamerV2's default outside dmc_vision): the CPU results in
    #      results/cpu were measured with it; 'tiny' keeps it on too (smoke tests on toy envs).
    "small": dict(action_repeat=0, cnn_depth=16, deter=128, hidden=128, stoch=8, classes=32,
                  mlp_units=128, mlp_layers=2, batch_size=16, batch_length=16, train_every=5,
                  model_lr=1e-3, actor_lr=3e-4, critic_lr=3e-4, total_steps=100_000,
                  eval_episodes=5, replay_capacity=100_000, prioritize_ends=True),
    #    ours: 'tiny' runs end to end in about a minute on 2 CPU cores (smoke tests).
    "tiny": dict(cnn_depth=4, deter=32, hidden=32, stoch=4, classes=4, mlp_units=32, mlp_layers=2,
                 batch_size=4, batch_length=8, prefill=100, pretrain=2, horizon=5, train_every=5,
                 total_steps=2000, eval_every=1000, eval_episodes=1, replay_capacity=100_000,
                 prioritize_ends=True),
}
SIZES = ("paper", "small", "tiny")

# Flags that may differ from the checkpoint's on --resume: schedule, logging and where/how fast
# the same computation runs (compile_mode, replay_device do not change the algorithm).
SCHEDULE_FLAGS = {"total_steps", "eval_every", "eval_episodes", "eval_action", "log_every",
                  "save_model", "checkpoint_replay", "replay_checkpoint_every", "resume",
                  "capture_video", "device", "compile", "precision", "measure_updates", "exp_name",
                  "compile_mode", "replay_device"}


def family_preset(env_id: str) -> str:
    """A.2 names two settings: MiniGrid and DMC; every continuous-control family takes DMC's."""
    return "minigrid" if env_id.startswith("minigrid-") else "dmc"


def overrides(preset: str = "paper", env: str = Args.env, ladder: str = "ar") -> dict:
    """{name: overrides} of the PRESETS entries a run with this preset, env and rung applies, in
    order (the defaults' own names, "dmc", "ar" and "paper", apply nothing)."""
    names = (family_preset(env), ladder, preset)
    return {name: PRESETS[name] for name in names if name in PRESETS}


def preset_args(preset: str = "paper", env: str = Args.env, ladder: str = "ar", **flags) -> Args:
    """Args: the defaults, then the PRESETS entries of `env`'s family, the ladder rung and the
    size preset, then `flags` (as CLI flags after them)."""
    if preset not in SIZES:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(SIZES)}")
    if ladder not in LADDER_RUNGS:
        raise ValueError(f"unknown ladder rung {ladder!r}; known: {', '.join(LADDER_RUNGS)}")
    values = {k: v for entry in overrides(preset, env, ladder).values() for k, v in entry.items()}
    return Args(**{**values, **flags, "preset": preset, "env": env, "ladder": ladder})


def describe(args: Args) -> str:
    """What the run header says about the method and where its numbers come from: the five
    switches, the PRESETS entries applied (name and values) and the flags that differ from them."""
    switches = (f"recon {'on' if args.recon else 'off'}, kl balance {args.kl_balance}, target "
                f"{'ema ' + str(args.target_ema) if args.target_encoder else 'off'}, norm "
                f"{args.encoder_norm}/{args.obs_out_norm}, ar steps {args.ar_steps or args.stoch}")
    applied = overrides(args.preset, args.env, args.ladder)
    text = "; ".join(f"{name} {' '.join(f'{k}={v}' for k, v in entry.items())}"
                     for name, entry in applied.items()) or "none"
    resolved = vars(preset_args(args.preset, args.env, args.ladder))
    flags = " ".join(f"{k}={v}" for k, v in vars(args).items()
                     if resolved[k] != v and k not in ("resume", "measure_updates"))
    return (f"ladder {args.ladder} ({switches}) | A.2 family {family_preset(args.env)} | "
            f"overrides of the Args defaults: {text} | flags: {flags or 'none'}")


def _flag(argv: list, name: str):
    """The value of `--name v` or `--name=v` in argv (the last one), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def parse_args(argv=None) -> Args:
    """Read --preset/--env/--ladder first and parse every flag over their defaults. With --resume,
    the checkpoint's args are the defaults; flags that change the algorithm may not differ."""
    argv = list(sys.argv[1:] if argv is None else argv)
    resume = _flag(argv, "--resume")
    if resume is None:
        preset, ladder = _flag(argv, "--preset") or "paper", _flag(argv, "--ladder") or "ar"
        env = _flag(argv, "--env") or Args.env
        ok = preset in SIZES and ladder in LADDER_RUNGS
        default = preset_args(preset, env, ladder) if ok else Args()  # tyro reports bad values
        return tyro.cli(Args, args=argv, default=default)
    saved = load_checkpoint(resume)["args"]
    known = {f.name for f in fields(Args)}
    args = tyro.cli(Args, args=argv, default=Args(**{k: v for k, v in saved.items() if k in known}))
    differ = [f"--{k.replace('_', '-')} {v} (checkpoint {saved[k]})" for k, v in vars(args).items()
              if k not in SCHEDULE_FLAGS and k in saved and saved[k] != v]  # absent: a newer flag
    if differ:
        raise SystemExit(f"error: --resume: these flags differ from the checkpoint's and change the "
                         f"algorithm: {', '.join(differ)}; drop them or start a new run")
    return args


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------

BN_MOMENTUM = 0.01  # Keras' BatchNormalization default (momentum 0.99 of the running average)
BN_EPS = 1e-3  # Keras' default epsilon, which the authors' tfkl.BatchNormalization() keeps


class MLP(nn.Sequential):
    """`layers` hidden ELU layers of `units`, then a linear output. The output layer runs
    in fp32 also under bf16 autocast (as dreamerv2.py's MLP): rewards, values, Q and action
    parameters feed returns and log-probs, and bf16 would resolve a value of 500 in steps of 2."""

    def __init__(self, inp: int, out: int, units: int, layers: int):
        mods, d = [], inp
        for _ in range(layers):
            mods += [nn.Linear(d, units), nn.ELU()]
            d = units
        super().__init__(*mods, nn.Linear(d, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *hidden, out = self
        for layer in hidden:
            x = layer(x)
        with torch.autocast(x.device.type, enabled=False):
            return out(x.float())


def norm_layer(kind: str, channels: int, conv: bool) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    return (nn.BatchNorm2d if conv else nn.BatchNorm1d)(channels, momentum=BN_MOMENTUM, eps=BN_EPS)


class Encoder(nn.Module):
    """4 conv layers, kernel 4, stride 2, [BatchNorm], ELU: (..., 3, 64, 64) -> (..., 32 depth).
    With BatchNorm (Sec. 2.3.3) the statistics of a training batch are taken over all T * B
    frames, since the encoder runs once over the whole sequence batch."""

    def __init__(self, depth: int, norm: str = "none"):
        super().__init__()
        chans = [3, depth, 2 * depth, 4 * depth, 8 * depth]
        self.net = nn.Sequential(*[m for i in range(4) for m in (
            nn.Conv2d(chans[i], chans[i + 1], 4, 2), norm_layer(norm, chans[i + 1], True), nn.ELU())])
        self.out_dim = 8 * depth * 2 * 2

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.reshape(-1, *obs.shape[-3:]).float() / 255.0 - 0.5
        return self.net(x).reshape(*obs.shape[:-3], -1)


class Decoder(nn.Module):
    """Mirror of the encoder with transposed convs of kernels 5, 5, 6, 6: feature -> image mean."""

    def __init__(self, feat_dim: int, depth: int):
        super().__init__()
        self.depth = depth
        self.linear = nn.Linear(feat_dim, 32 * depth)
        chans, kernels = [32 * depth, 4 * depth, 2 * depth, depth, 3], [5, 5, 6, 6]
        layers = []
        for i, k in enumerate(kernels):
            layers.append(nn.ConvTranspose2d(chans[i], chans[i + 1], k, 2))
            if i < 3:
                layers.append(nn.ELU())
        self.net = nn.Sequential(*layers)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        x = self.linear(feat).reshape(-1, 32 * self.depth)
        # The first transposed conv sees a 1x1 input, where it is exactly a matmul (as in
        # dreamerv2.py's Decoder): out[n, o, i, j] = sum_c x[n, c] W[c, o, i, j] + b[o]. Written as
        # one (same parameters), it is one GEMM, and torch.compile's inductor no longer crashes in
        # this conv's backward (a stride assertion, results/speed/h100-2026-11-23.md).
        first = self.net[0]
        x = (x @ first.weight.flatten(1)).view(-1, *first.weight.shape[1:]) + first.bias[:, None, None]
        return self.net[1:](x).reshape(*feat.shape[:-1], 3, 64, 64)


class LayerNormGRUCell(nn.Module):
    """GRU with LayerNorm on the gate pre-activations and update bias -1 (DreamerV2's cell)."""

    def __init__(self, inp: int, size: int):
        super().__init__()
        self.linear = nn.Linear(inp + size, 3 * size)
        self.norm = nn.LayerNorm(3 * size)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        reset, cand, update = self.norm(self.linear(torch.cat([x, h], -1))).chunk(3, -1)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1)
        return update * cand + (1 - update) * h


def one_hot(index: torch.Tensor, classes: int) -> torch.Tensor:
    """F.one_hot as float, by comparison with arange: F.one_hot checks the index range by reading
    min and max to the host on CPU (on CUDA it skips the check), which the sync tests reject."""
    return (index.unsqueeze(-1) == torch.arange(classes, device=index.device)).float()


def sample_onehot(logits: torch.Tensor) -> torch.Tensor:
    """One-hot sample of each categorical (Gumbel-max: no host sync, compiles), with
    straight-through gradients: the value is the sample, the gradient that of the probabilities."""
    logits = logits.float()
    u = torch.rand_like(logits).clamp(1e-20, 1 - 1e-7)
    index = (logits - torch.log(-torch.log(u))).argmax(-1)
    probs = logits.softmax(-1)
    return one_hot(index, logits.shape[-1]) + (probs - probs.detach())  # exact one-hot value


def categorical_dist(logits: torch.Tensor) -> td.Distribution:
    """Independent categoricals over the second-last axis (for entropies and tests)."""
    return td.Independent(td.OneHotCategoricalStraightThrough(logits=logits.float()), 1)


def categorical_kl(logits_q: torch.Tensor, logits_p: torch.Tensor) -> torch.Tensor:
    """KL(q || p) of independent categoricals (..., stoch, classes) -> (...), in fp32."""
    log_q, log_p = logits_q.float().log_softmax(-1), logits_p.float().log_softmax(-1)
    return (log_q.exp() * (log_q - log_p)).sum((-2, -1))


class Posterior(nn.Module):
    """q(z_t | h_t, x_t) from e_t = enc(x_t): Linear([h_t, e_t]) -> [BatchNorm] -> ELU -> logits
    (DreamerV2's obs_out; Sec. 2.3.3 puts BatchNorm in it). The first layer is split into
    W_e e_t + b, computed for all t at once (`project`), and W_h h_t, the only part in the loop."""

    def __init__(self, deter: int, embed_dim: int, hidden: int, stoch: int, classes: int, norm: str):
        super().__init__()
        self.stoch, self.classes = stoch, classes
        self.embed_in = nn.Linear(embed_dim, hidden)
        self.deter_in = nn.Linear(deter, hidden, bias=False)
        # BatchNorm statistics are per time step over the batch rows of this layer (as in the
        # authors' scan), so it cannot leave the loop.
        self.norm = norm_layer(norm, hidden, False)
        self.out = nn.Linear(hidden, stoch * classes)

    def project(self, embed: torch.Tensor) -> torch.Tensor:
        return self.embed_in(embed)

    def forward(self, deter: torch.Tensor, embed_proj: torch.Tensor) -> torch.Tensor:
        x = F.elu(self.norm(self.deter_in(deter) + embed_proj))
        return self.out(x).reshape(*deter.shape[:-1], self.stoch, self.classes)


class Prior(nn.Module):
    """p(z_t | h_t) over `steps` chunks of stoch / steps categoricals (Sec. 2.3.2):

        p(z_t | h_t) = prod_k p(z_t^k | g_k),  g_0 = h_t,  g_{k+1} = GRU(g_k, z_t^k),

    a second small recurrent net started from h_t. Chunk k's logits come from two ELU layers
    shared by all steps, ELU(W_2 ELU(W_1 g_k)), and the k-th block of rows of one output layer:
    the authors' depth (their ar_img_in then img_out layer per step; the paper does not say).
    steps = 1 is DreamerV2's independent prior (one hidden layer, no GRU). (The authors' ar prior
    predicts all categoricals at every step and keeps chunk k; the k-th row block is the same
    parametrisation without the unused outputs.)"""

    def __init__(self, deter: int, hidden: int, stoch: int, classes: int, steps: int):
        super().__init__()
        if steps < 1 or stoch % steps:
            raise SystemExit(f"error: --ar-steps {steps} must divide --stoch {stoch}")
        self.steps, self.chunk, self.classes = steps, stoch // steps, classes
        self.ar_in = nn.Linear(deter, hidden) if steps > 1 else None  # authors' ar_img_in
        self.hidden = nn.Linear(hidden if steps > 1 else deter, hidden)  # DreamerV2's img_out
        self.out = nn.Linear(hidden, stoch * classes)
        if steps > 1:
            self.chunk_in = nn.Linear(self.chunk * classes, hidden)
            self.cell = LayerNormGRUCell(hidden, deter)

    def chunk_logits(self, g: torch.Tensor, k: int) -> torch.Tensor:
        """Logits of chunk k given the AR state g_k: (..., chunk, classes)."""
        rows = slice(k * self.chunk * self.classes, (k + 1) * self.chunk * self.classes)
        x = F.elu(self.ar_in(g)) if self.ar_in is not None else g
        out = F.linear(F.elu(self.hidden(x)), self.out.weight[rows], self.out.bias[rows])
        return out.reshape(*g.shape[:-1], self.chunk, self.classes)

    def next_state(self, g: torch.Tensor, z_k: torch.Tensor) -> torch.Tensor:
        """g_{k+1} = GRU(g_k, z_t^k)."""
        return self.cell(F.elu(self.chunk_in(z_k.flatten(-2).to(g.dtype))), g)

    def forward(self, deter: torch.Tensor, target: Optional[torch.Tensor] = None):
        """(logits, stoch), both (..., stoch, classes). Teacher-forced on `target` (the KL
        targets, training) when given: then stoch is `target` and chunk k's logits are
        p(z^k | h, target^{<k}). Otherwise each chunk is sampled and fed back (imagination)."""
        g, logits, chunks = deter, [], []
        for k in range(self.steps):
            lk = self.chunk_logits(g, k)
            # z_t^k: sampled, or the k-th chunk of the teacher-forcing target's categoricals
            zk = sample_onehot(lk) if target is None else target[..., k * self.chunk:(k + 1) * self.chunk, :]
            logits.append(lk)
            chunks.append(zk)
            if k + 1 < self.steps:
                g = self.next_state(g, zk)
        return torch.cat(logits, -2), torch.cat(chunks, -2)

    def log_prob(self, deter: torch.Tensor, stoch: torch.Tensor) -> torch.Tensor:
        """ln p(z | h) = sum_k ln p(z^k | h, z^{<k}) (teacher forcing), fp32 (...)."""
        logits, _ = self.forward(deter, stoch)
        return (stoch.float() * logits.float().log_softmax(-1)).sum((-2, -1))


class RSSM(nn.Module):
    """Recurrent state-space model (Eq. 2.2). A state is a dict: deter h_t (..., deter), stoch
    z_t (..., stoch, classes) one-hot, logits (..., stoch, classes) of its distribution."""

    def __init__(self, action_dim: int, deter: int, hidden: int, stoch: int, classes: int,
                 ar_steps: int):
        super().__init__()
        self.deter, self.stoch, self.classes = deter, stoch, classes
        self.img_in = nn.Sequential(nn.Linear(stoch * classes + action_dim, hidden), nn.ELU())
        self.cell = LayerNormGRUCell(hidden, deter)
        self.prior = Prior(deter, hidden, stoch, classes, ar_steps)

    @property
    def feat_dim(self) -> int:
        return self.deter + self.stoch * self.classes

    def initial(self, batch: int, device) -> dict:
        zeros = torch.zeros(batch, self.stoch, self.classes, device=device)
        return dict(deter=torch.zeros(batch, self.deter, device=device), stoch=zeros, logits=zeros)

    def recurrent(self, state: dict, action: torch.Tensor) -> torch.Tensor:
        """h_t = f(h_{t-1}, z_{t-1}, a_{t-1})."""
        x = self.img_in(torch.cat([state["stoch"].flatten(-2).to(action.dtype), action], -1))
        return self.cell(x, state["deter"])

    def img_step(self, state: dict, action: torch.Tensor) -> dict:
        """Prior step (imagination): h_t, then z_t ~ p(z_t | h_t), chunk by chunk."""
        deter = self.recurrent(state, action)
        logits, stoch = self.prior(deter)
        return dict(deter=deter, stoch=stoch, logits=logits)

    def obs_step(self, state: dict, action: torch.Tensor, embed_proj: torch.Tensor,
                 posterior: Posterior) -> dict:
        """Filtering step (acting): h_t, then z_t ~ q(z_t | h_t, x_t). The prior is not needed."""
        deter = self.recurrent(state, action)
        logits = posterior(deter, embed_proj)
        return dict(deter=deter, stoch=sample_onehot(logits), logits=logits)

    def observe(self, groups: list) -> dict:
        """Filter sequences from the zero state. `groups`: [(posterior layer, projected embeddings
        (T, b, hidden), actions a_{t-1} (T, b, A))], batch parts that share the dynamics but have
        their own posterior layer (online / target, Sec. 2.3.2). Returns the posterior states as
        (T, N, ...), N = sum of b, groups in order. Only h_t's update and W_h h_t are in the loop."""
        sizes = [x.shape[1] for _, x, _ in groups]
        action = torch.cat([a for _, _, a in groups], 1)
        state = self.initial(sum(sizes), action.device)
        out = {"deter": [], "stoch": [], "logits": []}
        for t in range(action.shape[0]):
            deter = self.recurrent(state, action[t])
            parts = deter.split(sizes) if len(groups) > 1 else (deter,)
            logits = torch.cat([post(h, x[t]) for (post, x, _), h in zip(groups, parts)], 0)
            state = dict(deter=deter, stoch=sample_onehot(logits), logits=logits)
            for key in out:
                out[key].append(state[key])
        return {k: torch.stack(v) for k, v in out.items()}

    def feat(self, state: dict) -> torch.Tensor:
        """Model state [z_t, h_t] fed to every head: (..., stoch * classes + deter)."""
        return torch.cat([state["stoch"].flatten(-2).to(state["deter"].dtype), state["deter"]], -1)


class TruncatedNormal(td.Distribution):
    """Normal(loc, scale) truncated to [-1, 1], the DreamerV2 actor distribution for DMC; rsample
    inverts the CDF, so it is differentiable in loc and scale (dynamics backpropagation)."""

    arg_constraints = {"loc": td.constraints.real, "scale": td.constraints.positive}
    support = td.constraints.interval(-1.0, 1.0)
    has_rsample = True

    def __init__(self, loc, scale, validate_args=False):
        self.loc, self.scale = loc, scale
        self._alpha, self._beta = (-1 - loc) / scale, (1 - loc) / scale
        self._cdf_a, self._cdf_b = torch.special.ndtr(self._alpha), torch.special.ndtr(self._beta)
        self._z = (self._cdf_b - self._cdf_a).clamp_min(1e-6)
        super().__init__(loc.shape, validate_args=validate_args)

    @property
    def mean(self):
        phi = lambda x: torch.exp(-0.5 * x ** 2) / math.sqrt(2 * math.pi)  # noqa: E731
        return self.loc + self.scale * (phi(self._alpha) - phi(self._beta)) / self._z

    @property
    def mode(self):
        return self.loc.clamp(-1, 1)

    def rsample(self, sample_shape=torch.Size()):
        u = torch.rand(self._extended_shape(sample_shape), device=self.loc.device)
        p = (self._cdf_a + u * self._z).clamp(1e-6, 1 - 1e-6)
        x = self.loc + self.scale * torch.special.ndtri(p)
        return x.clamp(-1 + 1e-6, 1 - 1e-6)

    def log_prob(self, value):
        x = (value - self.loc) / self.scale
        return -0.5 * x ** 2 - 0.5 * math.log(2 * math.pi) - self.scale.log() - self._z.log()

    def entropy(self):
        phi = lambda x: torch.exp(-0.5 * x ** 2) / math.sqrt(2 * math.pi)  # noqa: E731
        return (0.5 * math.log(2 * math.pi * math.e) + self.scale.log() + self._z.log()
                + (self._alpha * phi(self._alpha) - self._beta * phi(self._beta)) / (2 * self._z))


class OneHotActionDist(td.OneHotCategoricalStraightThrough):
    """The actor's distribution over discrete actions: a one-hot categorical whose straight-through
    sample is drawn by `sample_onehot`, without torch.multinomial's validity check, which copies a flag
    to the host (a GPU sync per imagined step)."""

    def rsample(self, sample_shape=torch.Size()):
        return sample_onehot(self.logits.expand(*sample_shape, *self.logits.shape))

    def sample(self, sample_shape=torch.Size()):
        """Acting: the same draw as torch.multinomial (which `sample` would call), without its
        validity check's host sync."""
        return self.rsample(sample_shape).detach()


class Actor(nn.Module):
    """pi(a_t | z_t): truncated normal (mean tanh, std 2 sigmoid(x/2) + 0.1) or one-hot categorical."""

    def __init__(self, feat_dim: int, action_dim: int, discrete: bool, units: int, layers: int):
        super().__init__()
        self.discrete = discrete
        self.net = MLP(feat_dim, action_dim if discrete else 2 * action_dim, units, layers)

    def forward(self, feat: torch.Tensor) -> td.Distribution:
        out = self.net(feat).float()
        if self.discrete:
            return OneHotActionDist(logits=out)
        mean, std = out.chunk(2, -1)
        return td.Independent(TruncatedNormal(torch.tanh(mean), 2 * torch.sigmoid(std / 2) + 0.1), 1)


def mode(dist: td.Distribution, continuous: str = "mode") -> torch.Tensor:
    """Deterministic action for evaluation; `continuous` ('mode' or 'mean': --eval-action) picks
    the truncated normal's mode or mean."""
    if isinstance(dist, td.OneHotCategorical):
        return one_hot(dist.logits.argmax(-1), dist.logits.shape[-1])
    return dist.base_dist.mean if continuous == "mean" else dist.base_dist.mode


def glorot_init(module: nn.Module):
    """Keras' defaults, as in the TensorFlow code BLAST builds on: Glorot-uniform weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class WorldModel(nn.Module):
    """Encoder, posterior layer, RSSM, reward (and discount) head; with the ema rung the target
    encoder and target posterior layer (EMA copies, no gradients); a decoder for the dreamerv2
    rung or as a probe."""

    def __init__(self, args: Args, action_dim: int):
        super().__init__()
        stoch, classes = args.stoch, args.classes
        self.encoder = Encoder(args.cnn_depth, args.encoder_norm)
        self.posterior = Posterior(args.deter, self.encoder.out_dim, args.hidden, stoch, classes,
                                   args.obs_out_norm)
        self.rssm = RSSM(action_dim, args.deter, args.hidden, stoch, classes, args.ar_steps or stoch)
        feat = self.rssm.feat_dim
        self.reward = MLP(feat, 1, args.mlp_units, args.mlp_layers)
        self.discount = MLP(feat, 1, args.mlp_units, args.mlp_layers) if args.pred_discount else None
        self.decoder = Decoder(feat, args.cnn_depth) if args.recon or args.probe_decoder else None
        if args.init == "glorot":
            self.apply(glorot_init)
        # The target's initial weights: the paper is silent; the authors' update_targets mixes with
        # weight 1.0 on the target at the first update, so their target keeps its own random
        # initialisation (target_init 'random'); 'copy' starts it equal to the online nets (BYOL).
        self.target_encoder = self.target_posterior = None
        if args.target_encoder:
            self.target_encoder = self._target_of(self.encoder, args)
            if args.target_obs_out:
                self.target_posterior = self._target_of(self.posterior, args)

    @staticmethod
    def _target_of(online: nn.Module, args: Args) -> nn.Module:
        """An EMA target of `online`: same architecture, no gradients, initialised per target_init."""
        target = copy.deepcopy(online)
        if args.target_init == "random":  # a fresh draw of the same initialiser
            for module in target.modules():
                if module is not target and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            if args.init == "glorot":
                target.apply(glorot_init)
        return target.requires_grad_(False)

    def ema_pairs(self) -> tuple[list, list]:
        """(target parameters, online parameters) of the EMA; BatchNorm running statistics are not
        averaged: each target BN layer keeps its own, collected in its own train-mode forward passes
        on the same batches (the authors skip the 'moving' variables in the EMA the same way)."""
        pairs = [(self.target_encoder, self.encoder), (self.target_posterior, self.posterior)]
        pairs = [(t, o) for t, o in pairs if t is not None]
        return ([p for t, _ in pairs for p in t.parameters()],
                [p for _, o in pairs for p in o.parameters()])

    def acting_nets(self) -> tuple[Encoder, Posterior]:
        """The encoder and posterior layer that act and start imagination (see Agent.act)."""
        if self.target_encoder is None:
            return self.encoder, self.posterior
        # the target posterior layer exists only with --target-obs-out; else the online one acts
        return self.target_encoder, (self.posterior if self.target_posterior is None else self.target_posterior)


class ActorCritic(nn.Module):
    def __init__(self, args: Args, feat_dim: int, action_dim: int, discrete: bool):
        super().__init__()
        self.actor = Actor(feat_dim, action_dim, discrete, args.mlp_units, args.mlp_layers)
        self.critic = MLP(feat_dim, 1, args.mlp_units, args.mlp_layers)
        if args.init == "glorot":
            self.apply(glorot_init)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)

    @torch.no_grad()
    def update_target(self, weight: torch.Tensor):
        """The slow critic: target <- target + weight (critic - target); weight 1 copies, 0 keeps."""
        lerp_(list(self.target_critic.parameters()), list(self.critic.parameters()), weight)


# ---------------------------------------------------------------------------------------------
# Replay buffer
# ---------------------------------------------------------------------------------------------


# Index conventions, in the paper's notation (Eq. 2.2), stated once for the whole file:
# - Replay slot t of an episode holds o_t (the paper's x_t), a_{t-1} (the action that led to it;
#   zeros at t = 0), r_t (the reward received on arriving at o_t; 0 at t = 0) and cont_t (0 if the
#   episode terminated at o_t). A sequence is T consecutive slots of one episode, time-major
#   (T, B, ...), and the RSSM starts it from zeros: row t computes h_t = f(h_{t-1}, z_{t-1}, a_{t-1})
#   from batch["action"][t], then z_t ~ q(z_t | h_t, x_t) from batch["obs"][t], and the reward
#   head on [z_t, h_t] predicts batch["reward"][t] = r_t (Eq. 2.3, 2.4).
# - Imagination (`imagine`) from a start state s_0 = (h_0, z_0): feats[t] = s_t for t = 0..H,
#   actions[t] = a_t ~ pi(a_t | s_t) for t = 0..H-1, and s_{t+1} = (h_{t+1}, z_{t+1}) with
#   h_{t+1} = f(h_t, z_t, a_t), z_{t+1} ~ p(z | h_{t+1}). As in the replay, reward[t] = r_t is the
#   reward predicted for arriving at s_t; discount[t] = gamma_t = gamma * P(cont | s_t);
#   value[t] = v(s_t) of the slow critic.
# - Lambda-returns (`lambda_return`, DreamerV2's Eq. 4), t = 0..H-1:
#   V_t = r_t + gamma_t ((1 - lambda) v(s_{t+1}) + lambda V_{t+1}), V_H = v(s_H).
#   V_t includes r_t, which arriving at s_t earned, so the action a_t taken at s_t is credited with
#   V_{t+1} (t = 0..H-2, DreamerV2's official agent.py); the critic regresses v(s_t) on V_t.


class Replay:
    """Whole episodes in a flat ring of uint8 images; sampling of in-episode sequences, uniform or
    with episode ends preferred (`prioritize_ends`).

    Slot t of an episode holds o_t, a_{t-1}, r_t and cont_t (the index conventions above). A
    sequence never crosses an episode boundary, so the RSSM starts each one from zeros.
    The arrays are torch tensors on `device` (on CUDA the images live on the GPU and a batch is
    gathered there); the episode ids stay on the host, where start indices are drawn.
    """

    def __init__(self, capacity: int, obs_shape, action_dim: int, seed: int, device=torch.device("cpu"),
                 prioritize_ends: bool = False):
        self.capacity, self.device = capacity, torch.device(device)
        self.prioritize_ends = prioritize_ends
        if self.device.type == "cpu":  # numpy zeros: pages are allocated as they fill
            self.obs = torch.from_numpy(np.zeros((capacity, *obs_shape), np.uint8))
        else:
            self.obs = torch.zeros((capacity, *obs_shape), dtype=torch.uint8, device=self.device)
        self.action = torch.zeros(capacity, action_dim, device=self.device)
        self.reward = torch.zeros(capacity, device=self.device)
        self.cont = torch.ones(capacity, device=self.device)
        self.episode = np.full(capacity, -1, np.int64)  # episode id per slot, -1 = empty
        self.pos = self.size = self.episodes = 0
        self.rng = np.random.default_rng(seed)
        self._ends = np.zeros(0, np.int64)
        self._starts, self._starts_length = np.zeros(0, np.int64), None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.obs, self.action, self.reward, self.cont))

    def add_episode(self, obs, action, reward, cont):
        n = len(obs)
        if n > self.capacity:
            raise ValueError(f"episode of {n} steps does not fit a replay of {self.capacity}")
        idx = (self.pos + np.arange(n)) % self.capacity
        tidx = torch.from_numpy(idx).to(self.device)
        for name, value in zip(("obs", "action", "reward", "cont"), (obs, action, reward, cont)):
            dest = getattr(self, name)
            dest[tidx] = torch.as_tensor(np.asarray(value)).to(self.device, dest.dtype)
        self.episode[idx] = self.episodes
        self.episodes += 1
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self._starts_length = None  # valid starts changed

    def valid_starts(self, length: int) -> np.ndarray:
        """Slots i such that i .. i+length-1 lie in one stored episode."""
        if self._starts_length != length:
            last = np.roll(self.episode, -(length - 1))
            ok = (self.episode >= 0) & (self.episode == last)
            ok &= (np.arange(self.capacity) + length - 1 < self.capacity) | (self.size == self.capacity)
            self._starts, self._starts_length = np.flatnonzero(ok), length
            # The last valid start of each episode (for prioritize_ends): its successor slot is no
            # valid start of the same episode.
            after = (self._starts + 1) % self.capacity
            last = ~ok[after] | (self.episode[after] != self.episode[self._starts])
            self._ends = self._starts[last]
        return self._starts

    def draw_starts(self, batch: int, length: int) -> np.ndarray:
        """Start slots of `batch` sequences. Uniform over valid starts; with prioritize_ends, each
        episode's last start counts `length` + 1 times (official replay.py: the start is drawn from
        [0, total - length + 1 + minlen) and clipped to the last one, so episode ends, rare under
        uniform windows, are seen as often as DreamerV2 sees them). The official sampler first picks
        an episode uniformly; here every valid start is equally likely, the same for equal-length
        episodes (every DMC task)."""
        starts = self.valid_starts(length)
        if not self.prioritize_ends:
            return self.rng.choice(starts, size=batch)
        u = self.rng.integers(len(starts) + length * len(self._ends), size=batch)
        extra = np.minimum(np.maximum(u - len(starts), 0) // length, len(self._ends) - 1)
        return np.where(u < len(starts), starts[np.minimum(u, len(starts) - 1)], self._ends[extra])

    def can_sample(self, length: int) -> bool:
        return len(self.valid_starts(length)) > 0

    def sample(self, batch: int, length: int) -> dict:
        """Time-major tensors on the replay's device: obs (T, B, 3, H, W) uint8, action (T, B, A),
        reward, cont (T, B). One small index tensor crosses to the device; no loop over the batch."""
        starts = self.draw_starts(batch, length)
        # idx[t, b] = slot starts[b] + t (time-major): o_t, a_{t-1}, r_t, cont_t of sequence b
        idx = to_device_async((starts[None, :] + np.arange(length)[:, None]) % self.capacity, self.device)
        return dict(obs=self.obs[idx], action=self.action[idx], reward=self.reward[idx], cont=self.cont[idx])

    def state_dict(self) -> dict:
        # Copies of only the filled part (a view would save the whole preallocated storage).
        filled = {k: getattr(self, k)[: self.size].to("cpu", copy=True) for k in ("obs", "action", "reward", "cont")}
        return dict(**filled,
                    episode=self.episode[: self.size], pos=self.pos, size=self.size,
                    episodes=self.episodes, rng=self.rng.bit_generator.state)

    def load_state_dict(self, state: dict):
        n = state["size"]
        for key in ("obs", "action", "reward", "cont"):
            getattr(self, key)[:n] = torch.as_tensor(state[key]).to(self.device)
        self.episode[:n] = state["episode"]
        self.pos, self.size, self.episodes = state["pos"], n, state["episodes"]
        self.rng.bit_generator.state = state["rng"]
        self._starts_length = None


def to_device(batch: dict, device: torch.device) -> dict:
    """Replay batch -> training device (a no-op when the replay lives there)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# World-model objective
# ---------------------------------------------------------------------------------------------

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def kl_balance(post_logits: torch.Tensor, prior_logits: torch.Tensor, alpha: float, free: float):
    """KL balancing (DreamerV2 Sec. 2.2): alpha KL(sg(q) || p) trains the prior towards the
    posterior, (1 - alpha) KL(q || sg(p)) the posterior towards the prior; free nats on each side's
    batch mean. alpha = 1 (Sec. 2.3.1) is KL(sg(q) || p): no gradient reaches the posterior at all.
    Returns (loss, per-step KL value (T, B)), fp32."""
    kl_prior = categorical_kl(post_logits.detach(), prior_logits)
    loss = alpha * kl_prior.mean().clamp_min(free)
    if alpha < 1:
        kl_post = categorical_kl(post_logits, prior_logits.detach())
        loss = loss + (1 - alpha) * kl_post.mean().clamp_min(free)
    return loss, kl_prior.detach()


def bootstrapped_posteriors(wm: WorldModel, batch: dict, args: Args) -> tuple[dict, dict]:
    """Posteriors of a replayed batch: (post, kl_target), dicts of (T, B, ...).

    Without a target encoder both are the online posteriors. With one (Sec. 2.3.1-2.3.2), the
    target encoder (no gradient: an EMA) embeds the whole batch and the posterior layer (the
    online one, with its gradients, unless target_obs_out gives the target its own EMA copy)
    filters it: these target posteriors are the KL targets.
    The online nets filter the first round(B (1 - target_input_p)) sequences; `post`, which the
    prior is conditioned on (through h_t) and the heads read, takes the deterministic path rolled
    on online posteriors for those rows and the one rolled on target posteriors for the rest.
    All rows run in one loop over time (the GRU is shared)."""
    embed = wm.encoder(batch["obs"])  # (T, B, E)
    action = batch["action"]
    if wm.target_encoder is None:
        post = wm.rssm.observe([(wm.posterior, wm.posterior.project(embed), action)])
        return post, post
    B = action.shape[1]
    n = round(B * (1 - args.target_input_p))
    _, target_posterior = wm.acting_nets()
    with torch.no_grad():
        target_embed = wm.target_encoder(batch["obs"])  # (T, B, E)
    # The online layer's W_e learns from the target rows too (the authors' online rssm.post on
    # target_embed, use_target_rssm False); an EMA copy has no gradient anyway.
    target_proj = target_posterior.project(target_embed)
    groups = [(target_posterior, target_proj, action)]
    if n > 0:  # (BatchNorm cannot normalise an empty group)
        # batch rows 0..n-1 (all t): their online embeddings and a_{t-1}
        groups.insert(0, (wm.posterior, wm.posterior.project(embed[:, :n]), action[:, :n]))
    states = wm.rssm.observe(groups)  # (T, n + B, ...)
    # rows of `states`: [online rows 0..n-1 | target rows 0..B-1]
    target = {k: v[:, n:] for k, v in states.items()}  # q_xi for all B rows: the KL targets
    # post: online states for rows 0..n-1, target-rolled states for rows n..B-1
    post = {k: torch.cat([v[:, :n], v[:, 2 * n:]], 1) for k, v in states.items()}
    return post, target


def gaussian_nll(mean: torch.Tensor, target: torch.Tensor, dims: int = 0) -> torch.Tensor:
    """-ln N(target; mean, 1) summed over the last `dims` axes, fp32 (no Python-scalar Normal)."""
    nll = 0.5 * (mean.float() - target.float()) ** 2 + HALF_LOG_2PI
    return nll.sum(tuple(range(-dims, 0))) if dims else nll


def world_model_loss(wm: WorldModel, batch: dict, args: Args):
    """Eq. 2.3 (dreamerv2 rung) / Eq. 2.4 (BLAST): beta_r reward log loss [+ discount log loss]
    [+ image log loss] + beta_KL KL(sg(q_xi) || p_theta). Returns (loss to minimise, imagination
    start states, metrics). The probe decoder's loss is in the metrics (`probe_loss`), not in the loss."""
    post, kl_target = bootstrapped_posteriors(wm, batch, args)
    # Sec. 2.3.2: the prior is teacher-forced on the KL targets' samples, chunk by chunk, in one
    # batched pass over all T * B steps after the filtering loop.
    prior_logits, _ = wm.rssm.prior(post["deter"], kl_target["stoch"].detach())
    # With a target encoder the targets are sg(q_xi) (Eq. 2.4): their h_t still carries gradient.
    target_logits = kl_target["logits"].detach() if wm.target_encoder is not None else kl_target["logits"]
    kl_loss, kl_value = kl_balance(target_logits, prior_logits, args.kl_balance, args.free_nats)
    feat = wm.rssm.feat(post)  # (T, B, F)
    reward = batch["reward"].tanh() if args.reward_clamp == "tanh" else batch["reward"]
    reward_nll = gaussian_nll(wm.reward(feat).squeeze(-1), reward).mean()
    loss = args.reward_scale * reward_nll + args.kl_scale * kl_loss
    metrics = dict(reward_loss=reward_nll, kl_loss=kl_loss, kl=kl_value.mean(),
                   prior_entropy=categorical_dist(prior_logits).entropy().mean().detach(),
                   post_entropy=categorical_dist(kl_target["logits"]).entropy().mean().detach())
    if wm.discount is not None:
        discount_nll = F.binary_cross_entropy_with_logits(
            wm.discount(feat).squeeze(-1).float(), batch["cont"].float())
        loss = loss + discount_nll
        metrics["discount_loss"] = discount_nll
    if wm.decoder is not None:
        image = batch["obs"].float() / 255.0 - 0.5
        if args.recon:  # the dreamerv2 rung: the image log loss shapes the latent
            image_nll = gaussian_nll(wm.decoder(feat), image, 3).mean()
            loss = loss + image_nll
            metrics["image_loss"] = image_nll
    metrics["model_loss"] = loss
    if wm.decoder is not None and not args.recon:  # probe (Fig. 8): stop-gradient features
        probe_nll = gaussian_nll(wm.decoder(feat.detach()), image, 3).mean()
        metrics["probe_loss"] = probe_nll  # not in `loss`: the probe has its own optimiser
    # Imagination starts from the posteriors the prior was trained to predict and the actor acts
    # on: the target posteriors when there is a target (see Agent.act).
    start = {k: kl_target[k].detach().flatten(0, 1) for k in ("deter", "stoch")}  # every (t, b): (T*B, ...)
    return loss, start, metrics


# ---------------------------------------------------------------------------------------------
# Behaviour learning in imagination (DreamerV2, unchanged)
# ---------------------------------------------------------------------------------------------


def lambda_return(reward, value, discount, bootstrap, lam: float):
    """Time-major (H, N): V_t = r_t + gamma_t ((1 - lam) v_{t+1} + lam V_{t+1}), V_H = bootstrap."""
    next_values = torch.cat([value[1:], bootstrap[None]], 0)  # v(s_{t+1}), t = 0..H-1
    inputs = reward + discount * next_values * (1 - lam)
    returns, last = [], bootstrap
    for t in reversed(range(reward.shape[0])):
        last = inputs[t] + discount[t] * lam * last
        returns.append(last)
    return torch.stack(returns[::-1])


def imagine(wm: WorldModel, actor: Actor, start: dict, horizon: int):
    """Roll the prior forward from start states under the actor: feats (H+1, N, F), actions
    (H, N, A). Each step samples the prior's chunks in order (Sec. 2.3.2). Gradients flow through
    the dynamics into the actions (the actor sees detached features)."""
    state, feats, actions = start, [wm.rssm.feat(start)], []
    for _ in range(horizon):
        action = actor(feats[-1].detach()).rsample()
        state = wm.rssm.img_step(state, action.to(feats[-1].dtype))
        feats.append(wm.rssm.feat(state))
        actions.append(action)
    return torch.stack(feats), torch.stack(actions)


def behaviour_losses(wm: WorldModel, ac: ActorCritic, start: dict, args: Args, discrete: bool):
    """Actor and critic losses (DreamerV2 Eq. 5, 6) on imagined rollouts from every start state."""
    feats, actions = imagine(wm, ac.actor, start, args.horizon)  # s_0..s_H, a_0..a_{H-1}
    reward = wm.reward(feats).squeeze(-1).float()  # r_t, of arriving at s_t, (H+1, N)
    if wm.discount is not None:
        discount = args.gamma * torch.sigmoid(wm.discount(feats).squeeze(-1).float())
    else:
        discount = torch.full_like(reward, args.gamma)
    value = ac.target_critic(feats).squeeze(-1).float()  # slow critic v(s_t), (H+1, N)
    # V_0..V_{H-1} from r_t, v(s_t), gamma_t for t = 0..H-1, bootstrapped with V_H = v(s_H)
    target = lambda_return(reward[:-1], value[:-1], discount[:-1], value[-1], args.return_lambda)
    # Imagined steps after a predicted episode end count less: weight_t = prod_{k<t} gamma_k, (H+1, N).
    # (weight_0 = 1; gamma_0..gamma_{H-1} shifted by one step)
    weight = torch.cumprod(torch.cat([torch.ones_like(discount[:1]), discount[:-1]], 0), 0).detach()
    # Actor, indexed as DreamerV2's official agent.py (which BLAST's code keeps): the action taken
    # at z_t (t = 0..H-2) is credited with V_{t+1}; z_0 is a start state, so V_0 trains nothing.
    policy = ac.actor(feats[:-2].detach())  # pi(. | s_t), t = 0..H-2
    grad = args.actor_grad if args.actor_grad != "auto" else ("reinforce" if discrete else "dynamics")
    if grad == "dynamics":
        objective = target[1:]  # V_{t+1}, t = 0..H-2; rho = 1: backpropagated through the model into a_t
    else:  # rho = 0: REINFORCE, baseline the slow critic, advantage V_{t+1} - v(s_t) (official)
        # ln pi(a_t | s_t) (V_{t+1} - v(s_t)), t = 0..H-2
        objective = policy.log_prob(actions[:-1].detach()) * (target[1:] - value[:-2]).detach()
    entropy = policy.entropy()
    actor_loss = -(weight[:-2] * (objective + args.actor_entropy * entropy)).mean()  # weights of s_0..s_{H-2}
    critic = ac.critic(feats[:-1].detach()).squeeze(-1).float()  # v(s_t), t = 0..H-1, (H, N)
    critic_loss = (gaussian_nll(critic, target.detach()) * weight[:-1]).mean()  # against V_t
    metrics = dict(actor_loss=actor_loss, critic_loss=critic_loss, actor_entropy=entropy.mean(),
                   imagined_reward=reward.mean(), value=critic.mean(), lambda_return=target.mean())
    return actor_loss, critic_loss, metrics


# ---------------------------------------------------------------------------------------------
# Agent: one update, acting
# ---------------------------------------------------------------------------------------------


LOSS_NAMES = ("model_loss", "actor_loss", "critic_loss")  # the per-update non-finite flags


class Agent:
    def __init__(self, args: Args, action_dim: int, discrete: bool, device: torch.device):
        self.args, self.device, self.discrete, self.action_dim = args, device, discrete, action_dim
        self.wm = WorldModel(args, action_dim).to(device)
        self.ac = ActorCritic(args, self.wm.rssm.feat_dim, action_dim, discrete).to(device)
        self.probe = args.probe_decoder and not args.recon
        # The probe decoder has its own optimiser and clip, so that it cannot shape the latent in
        # any way (a shared clip would scale the world model's gradient with the probe's).
        self.probe_params = list(self.wm.decoder.parameters()) if self.probe else []
        self.model_params = [p for n, p in self.wm.named_parameters()
                             if p.requires_grad and not (self.probe and n.startswith("decoder."))]
        # DreamerV2's optimiser: Adam, clip 100, each variable times (1 - wd) per step.
        opt = lambda name, params, lr: Optimizer(name, params, lr, args.adam_eps, args.grad_clip,  # noqa: E731
                                                 args.weight_decay)
        self.model_opt = opt("model", self.model_params, args.model_lr)
        self.probe_opt = opt("probe", self.probe_params, args.model_lr) if self.probe else None
        self.actor_opt = opt("actor", self.ac.actor.parameters(), args.actor_lr)
        self.critic_opt = opt("critic", self.ac.critic.parameters(), args.critic_lr)
        self.updates = 0
        # Once an update has a non-finite loss, every later one is skipped too (a device flag): the
        # main loop reads the flags one update late, without waiting for the GPU, and then stops.
        self.halted = torch.zeros((), device=device)
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
        self.wm_loss, self.ac_loss = world_model_loss, behaviour_losses
        self.cudagraphs = args.compile and args.compile_mode == "reduce-overhead"
        if args.compile:
            mode = {"default": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(
                args.compile_mode, args.compile_mode)
            self.wm_loss = torch.compile(world_model_loss, dynamic=False, mode=mode)
            self.ac_loss = torch.compile(behaviour_losses, dynamic=False, mode=mode)

    def update(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """One world-model step (Eq. 2.4) and the EMA of the target encoder (Sec. 2.3.1), then one
        actor and one critic step on imagined rollouts (DreamerV2). Returns (metrics, non-finite
        flags per LOSS_NAMES). A bad world-model step skips the whole update and all later ones."""
        args, graphs = self.args, self.cudagraphs
        self.wm.train()  # BatchNorm: batch statistics (online and target), running stats update
        cudagraph_step(graphs)
        with self.autocast:
            model_loss, start, metrics = self.wm_loss(self.wm, batch, args)
        if self.probe:  # its own parameters and clip: one backward pass, two steps
            backward(model_loss + metrics["probe_loss"], self.model_opt, self.probe_opt)
            metrics |= self.model_opt.step(model_loss, self.halted)
            self.probe_opt.step(metrics["probe_loss"], self.model_opt.skipped)
        else:
            metrics |= self.model_opt(model_loss, self.halted)
        targets, onlines = self.wm.ema_pairs()
        if targets:  # Sec. 2.3.1: xi <- tau xi + (1 - tau) theta, not after a skipped step
            with torch.no_grad():
                lerp_(targets, onlines, (1 - args.target_ema) * (1 - self.model_opt.skipped))
        self.wm.eval()  # imagination: no BatchNorm statistics of imagined states
        start, metrics = outlive_step(start, graphs), outlive_step(metrics, graphs)
        cudagraph_step(graphs)
        with self.autocast, frozen(self.wm):  # the behaviour losses do not train the world model
            actor_loss, critic_loss, ac_metrics = self.ac_loss(self.wm, self.ac, start, args, self.discrete)
        backward(actor_loss + critic_loss, self.actor_opt, self.critic_opt)  # each its own network
        metrics |= self.actor_opt.step(actor_loss, self.model_opt.skipped)
        metrics |= self.critic_opt.step(critic_loss, self.model_opt.skipped)
        metrics |= outlive_step(ac_metrics, graphs)
        if self.updates % args.target_update_every == 0:  # copy, unless the critic step was skipped
            self.ac.update_target(1 - self.critic_opt.skipped)
        self.updates += 1
        flags = torch.stack([self.model_opt.skipped, self.actor_opt.flag, self.critic_opt.flag])
        self.halted = torch.maximum(self.halted, flags.max())
        return metrics, flags

    @torch.no_grad()
    def act(self, obs: np.ndarray, state, explore: bool):
        """One filtering step and an action; state = (latent, previous action) or None.

        Which posteriors act: the target's when there is a target encoder. The actor and critic
        are trained on imagined states that start from target posteriors and follow a prior
        trained to predict target posteriors (Eq. 2.4), so the target posterior is the state
        distribution the policy knows; the EMA encoder is also the smoother of the two (BYOL
        evaluates its target-like average too). The authors' code does the same: it acts with
        target_encoder/target_rssm and imagines from target_posts. Eval mode: BatchNorm uses its
        running statistics (one frame has no batch statistics)."""
        self.wm.eval()
        encoder, posterior = self.wm.acting_nets()
        if state is None:
            latent = self.wm.rssm.initial(1, self.device)
            prev = torch.zeros(1, self.action_dim, device=self.device)
        else:
            latent, prev = state
        obs_t = torch.as_tensor(obs, device=self.device)[None]
        with self.autocast:
            # Latents are sampled in evaluation too (official eval_state_mean=False); only the
            # action is the mode.
            latent = self.wm.rssm.obs_step(latent, prev, posterior.project(encoder(obs_t)), posterior)
            dist = self.ac.actor(self.wm.rssm.feat(latent))
        action = dist.sample() if explore else mode(dist, self.args.eval_action)
        return action[0].float().cpu().numpy(), (latent, action.float())

    def num_parameters(self) -> int:
        """Trained parameters: world model, actor, critic (not the target encoder or critic)."""
        return sum(p.numel() for p in [*self.model_params, *self.ac.actor.parameters(),
                                        *self.ac.critic.parameters()])

    def state_dict(self) -> dict:
        return dict(wm=self.wm.state_dict(), ac=self.ac.state_dict(),
                    model_opt=self.model_opt.state_dict(), actor_opt=self.actor_opt.state_dict(),
                    critic_opt=self.critic_opt.state_dict(), updates=self.updates,
                    probe_opt=self.probe_opt.state_dict() if self.probe else None)

    def load_state_dict(self, state: dict):
        self.wm.load_state_dict(state["wm"])
        self.ac.load_state_dict(state["ac"])
        for key in ("model_opt", "actor_opt", "critic_opt") + (("probe_opt",) if self.probe else ()):
            getattr(self, key).load_state_dict(state[key])
        self.updates = state["updates"]


def env_action(action: np.ndarray, discrete: bool):
    """The agent's action (continuous vector or one-hot) in the env's format."""
    return int(action.argmax()) if discrete else action


def random_action(action_dim: int, discrete: bool) -> np.ndarray:
    if discrete:
        return np.eye(action_dim, dtype=np.float32)[np.random.randint(action_dim)]
    return np.random.uniform(-1, 1, action_dim).astype(np.float32)


def evaluate(agent: Agent, env, episodes: int, discrete: bool, seed: int, round_: int,
             stop: StopFlag, record: bool = False):
    """Mean return of `episodes` episodes with mode actions, frames of the first if `record`;
    None if a signal arrived. Episode j of round e is reset with episode_seed(seed, "eval",
    e * 10_000 + j), so the evaluation env is reproducible after a resume without storing its RNG."""
    returns, frames = [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=episode_seed(seed, "eval", round_ * 10_000 + ep))
        state, total, done = None, 0.0, False
        while not done:
            if stop.signum is not None:
                return None
            if record and ep == 0:
                frames.append(obs.transpose(1, 2, 0))
            action, state = agent.act(obs, state, explore=False)
            obs, reward, terminated, truncated, _ = env.step(env_action(action, discrete))
            total += reward
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns)), frames


# ---------------------------------------------------------------------------------------------
# Logging, progress and checkpoints
# ---------------------------------------------------------------------------------------------


def action_repeat(args: Args) -> int:
    """--action-repeat, else 2 for every DMC-family task (DreamerV2's configs.yaml dmc:
    action_repeat 2, which BLAST's A.2 keeps; not PlaNet's per-task 4/8), else the env's default."""
    if args.action_repeat:
        return args.action_repeat
    if args.action_repeat is None and args.env.partition("-")[0] in ("dmc", "dcs", "natural"):
        return 2
    return envs.default_action_repeat(args.env)


def make_env(args: Args, split: str, seed: int):
    return envs.make(args.env, distraction=args.distraction, dynamic=args.dynamic, seed=seed,
                     image_size=64, action_repeat=action_repeat(args), split=split,
                     video_dir=args.video_dir)


def measure_speed(args: Args, device: torch.device) -> dict:
    """Speed benchmark. Updates: median seconds per update over `args.measure_updates` updates
    (after 2 warm-ups) on a random batch of the configured size (model and optimisers only, no
    env, no replay). Acting: env steps per second of the acting loop over 50 agent steps."""
    configure_torch(args, device)
    env = make_env(args, "train", args.seed)
    discrete = hasattr(env.action_space, "n")
    action_dim = env.action_space.n if discrete else env.action_space.shape[0]
    agent = Agent(args, action_dim, discrete, device)
    T, B = args.batch_length, args.batch_size
    batch = dict(obs=torch.randint(0, 255, (T, B, 3, 64, 64), dtype=torch.uint8, device=device),
                 action=torch.rand(T, B, action_dim, device=device) * 2 - 1,
                 reward=torch.rand(T, B, device=device), cont=torch.ones(T, B, device=device))
    times, compile_seconds = [], None
    for i in range(args.measure_updates + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        agent.update(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i == 0 and args.compile:
            compile_seconds = time.perf_counter() - start
            print(f"compiled in {compile_seconds:.1f} s", file=sys.stderr)
        if i >= 2:
            times.append(time.perf_counter() - start)
    obs, _ = env.reset(seed=episode_seed(args.seed, "train", 0))
    state, env_steps, policy_time = None, 0, 0.0
    for i in range(52):
        if i == 2:  # the first two steps are warm-up: the clock starts here
            start, env_steps, policy_time = time.perf_counter(), 0, 0.0
        t = time.perf_counter()
        action, state = agent.act(obs, state, explore=True)
        policy_time += time.perf_counter() - t
        obs, _, terminated, truncated, info = env.step(env_action(action, discrete))
        env_steps += info["env_steps"]
        if terminated or truncated:
            (obs, _), state = env.reset(), None
    acting_time = time.perf_counter() - start
    env.close()
    result = dict(seconds_per_update=float(np.median(times)), updates=len(times),
                  parameters=agent.num_parameters(), env=args.env,
                  env_steps_per_second=env_steps / acting_time, policy_ms=1000 * policy_time / 50,
                  device=str(device), precision=args.precision, compile=args.compile,
                  ladder=args.ladder)
    if compile_seconds is not None:
        result["compile_seconds"] = compile_seconds
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    result["peak_host_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result))
    return result


# ---------------------------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------------------------


def main(args: Args):
    if args.measure_updates > 0:
        return measure_speed(args, resolve_device(args.device))
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    device = resolve_device(args.device)
    configure_torch(args, device)
    if not 0 <= args.target_input_p <= 1 or not 0 <= args.target_ema <= 1:
        raise SystemExit("error: --target-input-p and --target-ema must lie in [0, 1]")

    seed_everything(args.seed)
    try:  # bad input (env id, distraction, video folder) ends here with a message, not a traceback
        env, eval_env = make_env(args, "train", args.seed), make_env(args, args.eval_split, args.seed + 10_000)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    run_name = f"{args.env}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.resume).parent if args.resume else Path("runs") / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    discrete = hasattr(env.action_space, "n")
    action_dim = env.action_space.n if discrete else env.action_space.shape[0]
    repeat = action_repeat(args)

    agent = Agent(args, action_dim, discrete, device)
    replay = Replay(replay_slots(args.replay_capacity // repeat, args.total_steps, repeat, args.batch_length),
                    env.observation_space.shape,
                    action_dim, args.seed, replay_device(args, device), args.prioritize_ends)
    counters = dict(env_steps=0, agent_steps=0, episodes=0, next_eval=args.eval_every,
                    last_eval=-1, eval_rounds=0, pretrain_updates=0)
    if checkpoint is not None:
        agent.load_state_dict(checkpoint["agent"])
        counters.update(checkpoint["counters"])
        load_replay(args.resume, checkpoint, replay, counters)
        seed_everything(args.seed, checkpoint["rng"])  # the RNG states from where the run stopped
    logger = Logger(run_dir, args, counters["env_steps"] if checkpoint is not None else None)
    stop = StopFlag()

    if checkpoint is not None:
        print(f"resumed from {args.resume} at env step {counters['env_steps']} (the interrupted "
              f"episode was stored as truncated; a new episode starts)")
    ratio = args.updates_per_step * args.batch_size * args.batch_length / args.train_every
    videos = envs.video_source(args.env, args.distraction, args.video_dir)
    print(f"run {run_dir} | {describe(args)} | action repeat {repeat} | device {device} | "
          f"{agent.num_parameters() / 1e6:.1f}M "
          f"parameters | replay {replay.capacity:,} agent steps on {replay.device}, up to "
          f"{replay.nbytes / 2**30:.2f} GiB | replay ratio {ratio:.0f} | videos: {videos}", flush=True)
    progress = Progress(args, counters, args.updates_per_step / args.train_every)
    watch = NonFiniteWatch(LOSS_NAMES)
    last_return = float("nan")

    def phase() -> str:
        return "prefill" if counters["agent_steps"] < args.prefill else "train"

    progress.maybe_print(counters, phase(), last_return, agent.updates, force=True)
    ckpt_path = run_dir / "checkpoint.pt"

    def write_checkpoint(with_replay: bool):
        """checkpoint.pt, and replay.pt if `with_replay` (see save_checkpoint)."""
        save_checkpoint(ckpt_path, agent, replay if with_replay else None, counters, args)

    def new_episode():
        obs, _ = env.reset(seed=episode_seed(args.seed, "train", counters["episodes"]))
        return obs, dict(obs=[obs], action=[np.zeros(action_dim, np.float32)], reward=[0.0], cont=[1.0])

    def finish(code: int, message: str):
        print(message, flush=True)
        logger.close()
        env.close()
        eval_env.close()
        stop.restore()
        sys.exit(code)

    def interrupt():
        """Store the episode so far as truncated, checkpoint, exit 130 (SIGINT) / 143 (SIGTERM)."""
        if len(ep["reward"]) >= 2:
            replay.add_episode(*(np.asarray(ep[k]) for k in ("obs", "action", "reward", "cont")))
        write_checkpoint(with_replay=True)
        code = 130 if stop.signum == signal.SIGINT else 143
        finish(code, f"interrupted at step {counters['env_steps']}; resume with: python "
                     f"{Path(__file__).name} --resume {ckpt_path}")

    def check_finite():
        """Stop on a non-finite update: its flags were copied an update ago (no stall)."""
        bad = watch.first_bad()
        if bad is not None:
            names, update, step = bad
            write_checkpoint(with_replay=True)  # parameters from before the bad update: its steps were skipped
            finish(1, f"error: non-finite {names[0]} at update {update} (env step {step}); "
                      f"checkpoint from before it: {ckpt_path}")

    compiled = [not args.compile]  # the first update of this process compiles (also after a resume)

    def train_step():
        nonlocal metrics
        check_finite()
        batch = to_device(replay.sample(args.batch_size, args.batch_length), device)
        start = time.perf_counter()
        metrics, flags = agent.update(batch)
        if not compiled[0]:
            compiled[0] = True
            print(f"compiled in {time.perf_counter() - start:.1f} s", flush=True)
        else:  # the compile time would distort s/update
            progress.update_time += time.perf_counter() - start
            progress.updates += 1
        watch.push(flags, agent.updates, counters["env_steps"])

    def run_eval():
        result = evaluate(agent, eval_env, args.eval_episodes, discrete, args.seed,
                          counters["eval_rounds"], stop, args.capture_video)
        if result is None:
            return False  # interrupted: not logged, reruns after resume
        ret, frames = result
        logger.log(counters["env_steps"], {"eval/episodic_return": ret})
        if frames:
            save_video(frames, run_dir / "videos" / f"eval_{counters['env_steps']}.mp4")
            strip = np.concatenate(frames[:: max(1, len(frames) // 8)][:8], axis=1)
            logger.writer.add_image("eval/frames", strip, counters["env_steps"], dataformats="HWC")
        print(f"eval at {counters['env_steps']}: return {ret:.1f}", flush=True)
        counters["last_eval"] = counters["env_steps"]
        counters["eval_rounds"] += 1
        return True

    obs, ep = new_episode()
    state, episode_return, metrics = None, 0.0, {}
    while counters["env_steps"] < args.total_steps:
        if stop.signum is not None:
            interrupt()
        acting_start = time.perf_counter()
        if counters["agent_steps"] < args.prefill:
            action = random_action(action_dim, discrete)
        else:
            action, state = agent.act(obs, state, explore=True)
        obs, reward, terminated, truncated, info = env.step(env_action(action, discrete))
        counters["agent_steps"] += 1
        counters["env_steps"] += info["env_steps"]
        episode_return += reward
        # slot t of the episode: o_t, a_{t-1}, r_t, cont_t (see Replay)
        for key, value in zip(("obs", "action", "reward", "cont"), (obs, action, reward, 1.0 - terminated)):
            ep[key].append(value)
        if terminated or truncated:
            replay.add_episode(*(np.asarray(ep[k]) for k in ("obs", "action", "reward", "cont")))
            counters["episodes"] += 1
            last_return = episode_return
            logger.log(counters["env_steps"], {"charts/episodic_return": episode_return,
                                               "charts/episodic_length": len(ep["reward"]) - 1})
            obs, ep = new_episode()
            state, episode_return = None, 0.0
        progress.acting_time += time.perf_counter() - acting_start

        # Train: once `prefill` steps are in, `pretrain` updates, then every `train_every` steps.
        if counters["agent_steps"] >= args.prefill and replay.can_sample(args.batch_length):
            if counters["pretrain_updates"] < args.pretrain:
                while counters["pretrain_updates"] < args.pretrain:
                    train_step()
                    counters["pretrain_updates"] += 1
                    if stop.signum is not None:
                        check_finite()
                        interrupt()
                    progress.maybe_print(counters, "pretrain", last_return, agent.updates,
                                         pending_updates=args.pretrain - counters["pretrain_updates"])
            elif counters["agent_steps"] % args.train_every == 0:
                for _ in range(args.updates_per_step):
                    train_step()

        crossed = counters["env_steps"] // args.log_every != (counters["env_steps"] - info["env_steps"]) // args.log_every
        if crossed:
            logs = {f"losses/{k}": v for k, v in metrics.items()}
            logs.update({"charts/SPS": progress.sps(counters), "charts/updates": agent.updates})
            logger.log(counters["env_steps"], logs)
        progress.maybe_print(counters, phase(), last_return, agent.updates, force=crossed)
        if args.eval_every and counters["env_steps"] >= counters["next_eval"]:
            check_finite()
            if not run_eval():
                interrupt()
            counters["next_eval"] += args.eval_every
            if args.save_model:
                write_checkpoint(with_replay=replay_due(args, counters["eval_rounds"], counters))

    check_finite()
    if counters["last_eval"] != counters["env_steps"]:
        if not run_eval():
            interrupt()
        if args.save_model:
            write_checkpoint(with_replay=replay_due(args, counters["eval_rounds"], counters))
    env.close()
    eval_env.close()
    logger.close()
    stop.restore()
    return run_dir


# =============================================================================================
# Plumbing: identical in every script (tests/test_plumbing.py compares the five copies byte for
# byte, so a fix made here is made in all of them). Nothing below is part of the method: replay
# seeding, device copies, the optimiser helper, logging, progress, signals, checkpoints, devices.
# =============================================================================================

STREAMS = {"train": 0, "eval": 1}


def episode_seed(seed: int, stream: str, index: int) -> int:
    """Seed of one episode: a child of SeedSequence(seed), so runs with different seeds never
    share episodes (seed + k schemes overlap: run s, episode 1 == run s+1, episode 0)."""
    return int(np.random.SeedSequence(seed, spawn_key=(STREAMS[stream], index)).generate_state(1)[0])


def to_device_async(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device` without waiting for the GPU: staged through pinned (page-locked)
    memory, copied non-blocking. A copy from pageable memory first waits for all work queued on
    the stream (CUDA's rule), i.e. for the previous update, and the host could not run ahead."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def replay_slots(capacity: int, total_steps: int, repeat: int, length: int) -> int:
    """The replay's size in agent steps, allocated once: `capacity` (agent steps)
    capped at what this run can fill, total_steps / repeat agent steps plus the first observation
    of an episode, and at least one training sequence of `length`."""
    return max(min(capacity, -(-total_steps // repeat) + 1), length)


def lerp_(targets: list, sources: list, weight: torch.Tensor):
    """targets <- targets + weight * (sources - targets), in place, for a 0-dim device tensor
    `weight`. The weight goes in as a list of tensors: the overload that takes one number would
    read the tensor to the host (a GPU sync every update)."""
    torch._foreach_lerp_(targets, sources, [weight] * len(targets))


def nonfinite(*values: torch.Tensor) -> torch.Tensor:
    """1.0 if any value is NaN/inf, else 0.0: a 0-dim fp32 device tensor (no host sync)."""
    return (~torch.isfinite(torch.stack([v.detach().float() for v in values]))).any().float()


def cudagraph_step(enabled: bool):
    """--compile-mode reduce-overhead: the compiled losses replay CUDA graphs whose outputs live in
    a memory pool that the next step's graphs overwrite. Called before a compiled call: a step
    begins, and outputs of earlier compiled calls are no longer valid (what is still needed was
    copied by `outlive_step`). Unmarked, CUDA graph trees begin a step at any compiled call made
    with no backward pending, freeing outputs that are still in use."""
    if enabled:
        torch.compiler.cudagraph_mark_step_begin()


def outlive_step(value, enabled: bool):
    """Detached copies, outside the CUDA-graph pool, of a tensor or a dict of tensors that is used
    after the next `cudagraph_step` (inputs of a later compiled call, metrics the logger reads);
    `value` itself when not `enabled` (no CUDA graphs: no copy)."""
    if not enabled:
        return value
    if isinstance(value, dict):
        return {k: outlive_step(v, True) for k, v in value.items()}
    return value.detach().clone()


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Speed: `module`'s trainable parameters with requires_grad off for the forwards inside (and
    on again after). A loss computed inside still backpropagates through `module` into its
    inputs (the actor's gradient through the dynamics into the actions: the same loss, the same
    gradients) but records no weight gradients for it. `backward(inputs=...)` prunes those in
    eager mode, but a compiled graph's backward computes a gradient for every input that
    requires one, here the whole world model's, for nothing."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class Optimizer:
    """One network's optimiser, called with its loss, as danijar/dreamerv2's `common.Optimizer`:
    `metrics |= opt(loss, skip)` zeroes the gradients, backpropagates, clips the gradient norm and
    takes a fused Adam step. The step is skipped on the device, with no host sync, when the loss
    or the gradient norm is not finite or when `skip` (a 0-dim device tensor, e.g. an earlier
    optimiser's `skipped`) is 1: fused Adam honours `found_inf` as GradScaler sets it, leaving
    parameters and moments as they were. After a step, `flag` is 1.0 if this loss or norm was not
    finite and `skipped` is 1.0 if the step was skipped. Returns {"<name>_grad_norm": norm}.

    weight_decay > 0: every parameter is multiplied by (1 - weight_decay) once per step, as the
    official DreamerV2 optimiser does (common/other.py); AdamW multiplies by (1 - lr * wd'), so
    wd' = weight_decay / lr. clip <= 0: no clipping (the norm is still measured and checked).
    `params` may be torch parameter groups (dicts with their own "lr"), stepped and skipped together.
    Losses that share one backward pass: `backward(loss, opt_a, opt_b)`, then `opt_a.step(...)`."""

    def __init__(self, name: str, params, lr: float, eps: float = 1e-8, clip: float = 0.0,
                 weight_decay: float = 0.0, clip_params=None, betas: tuple = (0.9, 0.999)):
        # `params`: tensors, or torch's parameter groups (dicts with their own "lr", ...)
        groups = [dict(g, params=list(g["params"])) if isinstance(g, dict) else g for g in params]
        self.name, self.clip = name, clip
        self.params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
        # the parameters whose gradient norm is clipped and checked (default: all of them)
        self.clip_params = self.params if clip_params is None else list(clip_params)
        if weight_decay > 0:
            self.opt = torch.optim.AdamW(groups, lr=lr, eps=eps, betas=betas,
                                         weight_decay=weight_decay / lr, fused=True)
        else:
            self.opt = torch.optim.Adam(groups, lr=lr, eps=eps, betas=betas, fused=True)
        self.flag = self.skipped = None

    def __call__(self, loss: torch.Tensor, skip: torch.Tensor | None = None) -> dict:
        backward(loss, self)
        return self.step(loss, skip)

    def step(self, loss: torch.Tensor, skip: torch.Tensor | None = None, *checked: torch.Tensor) -> dict:
        """Clip, check `loss`, the norm and any `checked` values, and step (gradients in place)."""
        return self.apply(skip, self.check(loss, *checked))

    def check(self, loss: torch.Tensor, *checked: torch.Tensor) -> dict:
        """Clip and measure: sets `flag`; returns the metrics. `apply` steps."""
        if self.clip > 0:
            norm = nn.utils.clip_grad_norm_(self.clip_params, self.clip)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in self.clip_params if p.grad is not None])
        self.flag = nonfinite(loss, norm, *checked)
        return {f"{self.name}_grad_norm": norm}

    def apply(self, skip: torch.Tensor | None, metrics: dict | None = None) -> dict:
        """The fused step, skipped on the device if `flag` or `skip` is set; returns `metrics`."""
        self.skipped = self.flag if skip is None else torch.maximum(skip, self.flag)
        self.opt.found_inf = self.skipped
        self.opt.step()
        return metrics or {}

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict):
        self.opt.load_state_dict(state)


def backward(loss: torch.Tensor, *opts: Optimizer):
    """Zero the gradients of `opts` and backpropagate `loss` into their parameters only (a
    compiled graph can be backpropagated once: losses of different networks that come out of one
    compiled call share one backward pass of their sum)."""
    for opt in opts:
        opt.opt.zero_grad(set_to_none=True)
    loss.backward(inputs=[p for opt in opts for p in opt.params])


class Logger:
    """TensorBoard plus metrics.jsonl (one json object per log event). On resume, the records after
    the checkpoint's step are dropped from both."""

    def __init__(self, run_dir: Path, args: Args, resume_step: int | None = None):
        path = run_dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(run_dir), purge_step=purge)
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
            f"|{k}|{v}|" for k, v in vars(args).items()))
        self.jsonl = open(path, "a")

    def log(self, step: int, scalars: dict, **text):
        """Scalars (numbers or device tensors, copied to the host in one transfer) to both;
        `text` fields only to metrics.jsonl."""
        record = {"step": step, "time": time.time()}
        tensors = {k: v for k, v in scalars.items() if torch.is_tensor(v)}
        if tensors:
            values = torch.stack([v.detach().float() for v in tensors.values()]).cpu().tolist()
            scalars = {**scalars, **dict(zip(tensors, values))}
        for key, value in scalars.items():
            self.writer.add_scalar(key, float(value), step)
            record[key] = float(value)
        self.jsonl.write(json.dumps({**record, **text}) + "\n")
        self.jsonl.flush()

    def close(self):
        self.writer.close()
        self.jsonl.close()


def format_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def preset_hint(args, eta: float | None):
    """Once per process, when a CPU run at the paper's sizes would take many hours: say which
    preset finishes in about an hour, and what it trades."""
    if (eta is not None and eta > 6 * 3600 and args.preset == "paper" and not preset_hint.shown
            and not torch.cuda.is_available()):
        preset_hint.shown = True
        print(f"note: at the paper's sizes this CPU needs about {format_eta(eta)}; --preset small "
              "(the same algorithm with smaller networks and batches, fewer updates per step and "
              "PlaNet's action repeat) trains 100K steps of dmc-cartpole-swingup in under an hour "
              "on 2 cores", flush=True)


preset_hint.shown = False


class Progress:
    """The progress line: at the first call, then every `log_every` env steps or 30 s (also between
    the updates of a burst). s/update is this process's measured mean (the main loop adds to
    `acting_time`, `update_time` and `updates`); the ETA counts `updates_per_agent_step` updates
    per remaining agent step plus `pending_updates` (e.g. pretraining) once updates have started."""

    def __init__(self, args: Args, counters: dict, updates_per_agent_step: float):
        self.args, self.ratio = args, updates_per_agent_step
        self.start, self.start_steps = time.time(), counters["env_steps"]
        self.start_agent_steps = counters["agent_steps"]
        self.last_time, self.last_step = 0.0, None
        self.acting_time = self.update_time = 0.0
        self.updates = 0

    def sps(self, counters: dict) -> float:
        return (counters["env_steps"] - self.start_steps) / max(time.time() - self.start, 1e-9)

    def eta(self, counters: dict, pending_updates: int = 0) -> float | None:
        remaining = self.args.total_steps - counters["env_steps"]
        acted = counters["agent_steps"] - self.start_agent_steps
        if acted == 0:
            return None
        if self.updates == 0:
            sps = self.sps(counters)
            return remaining / sps if sps > 0 else None
        repeat = max(counters["env_steps"] - self.start_steps, 1) / acted  # env steps per agent step
        spu = self.update_time / self.updates
        return remaining / repeat * (self.acting_time / acted + self.ratio * spu) + pending_updates * spu

    def maybe_print(self, counters: dict, phase: str, episode_return: float, updates: int,
                    force: bool = False, pending_updates: int = 0):
        step, now = counters["env_steps"], time.time()
        due = (self.last_step is None or step - self.last_step >= self.args.log_every
               or now - self.last_time >= 30)
        if not (due or force):
            return
        self.last_step, self.last_time = step, now
        spu = f"{self.update_time / self.updates:.2f}" if self.updates else "-"
        eta = self.eta(counters, pending_updates)
        preset_hint(self.args, eta)
        print(f"step {step}/{self.args.total_steps} | {phase} | return {episode_return:.1f} | "
              f"SPS {self.sps(counters):.1f} | updates {updates} ({spu} s/update) | "
              f"ETA {format_eta(eta)}", flush=True)


class StopFlag:
    """SIGINT/SIGTERM handler that only records the first signal; the loops check `signum` after
    each step or update (exit code 128 + signum). A second signal, e.g. while the checkpoint is
    written, is recorded and ignored. `restore()` puts the previous handlers back."""

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}

    def __call__(self, signum, frame):
        if self.signum is None:
            self.signum = signum

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class NonFiniteWatch:
    """Reads each update's non-finite flags (one per name in `names`) late: copied non-blocking,
    with a CUDA event, so the host never waits for the device it feeds. Once an update is
    non-finite the agent skips every later step on the device (its `halted` flag), so what is
    saved when the host notices is the state from before the bad update."""

    def __init__(self, names: tuple):
        self.names, self.pending = names, []

    def push(self, flags: torch.Tensor, update: int, step: int):
        host = flags.to("cpu", non_blocking=True)
        event = None
        if flags.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending.append((host, event, update, step))

    def first_bad(self, keep: int = 0):
        """(names of the non-finite losses, update, env step) of the first non-finite update among
        the pending ones but the newest `keep`; None if they are all finite."""
        while len(self.pending) > keep:
            host, event, update, step = self.pending.pop(0)
            if event is not None:
                event.synchronize()  # normally long done: the copy was queued an update ago
            if host.any():
                return [n for n, flag in zip(self.names, host.tolist()) if flag], update, step
        return None


def save_video(frames: list, path: Path, fps: int = 30):
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        out.mux(stream.encode())


def save_checkpoint(path: Path, agent: Agent, replay: Replay | None, counters: dict, args: Args):
    """checkpoint.pt at `path`: networks, optimisers, counters, RNG states (megabytes: written at
    every evaluation). Given a replay, and unless --no-checkpoint-replay, replay.pt beside it too:
    the filled replay and the env step it was written at (gigabytes on a GPU run, copied to the
    host: written only at the end, on an interrupt or a non-finite stop and every
    --replay-checkpoint-every evaluations). The checkpoint goes first, so that a kill between the
    two leaves an older replay (which --resume reports), never one newer than the checkpoint."""
    rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    atomic_save(dict(agent=agent.state_dict(), counters=dict(counters), args=vars(args), rng=rng), path)
    if replay is not None and args.checkpoint_replay:
        atomic_save(dict(replay=replay.state_dict(), env_steps=counters["env_steps"]),
                    path.with_name("replay.pt"))


def atomic_save(state: dict, path: Path):
    """Write to a temporary file, flush it to disk, then rename it over the old file: a kill leaves
    the old file or the new one, never part of one."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replay_due(args: Args, evals: int, counters: dict) -> bool:
    """Whether the checkpoint after evaluation number `evals` (counted from 1) writes replay.pt
    too: the run's last one and every --replay-checkpoint-every-th."""
    every = args.replay_checkpoint_every
    return counters["env_steps"] >= args.total_steps or (every > 0 and evals % every == 0)


def load_replay(path: str, checkpoint: dict, replay: Replay, counters: dict):
    """--resume: fill `replay` from replay.pt beside the checkpoint at `path` (or from the
    checkpoint itself if it was written before replay.pt existed); without one it stays empty.
    `counters` are the checkpoint's. Prints one line on what the replay holds."""
    replay_path = Path(path).with_name("replay.pt")
    if checkpoint.get("replay") is not None:
        saved = dict(replay=checkpoint["replay"], env_steps=counters["env_steps"])
    elif replay_path.is_file():  # mmap: frames are read from disk as they are copied into the replay
        saved = torch.load(replay_path, map_location="cpu", weights_only=False, mmap=True)
    else:
        print(f"no {replay_path}: the replay starts empty (updates resume once it holds a "
              "training sequence)", flush=True)
        return
    replay.load_state_dict(saved["replay"])
    note = "" if saved["env_steps"] == counters["env_steps"] else (
        f", written at env step {saved['env_steps']}, older than the checkpoint (env step "
        f"{counters['env_steps']}): the episodes in between are not in it")
    print(f"replay: {replay.size} agent steps from {replay_path}{note}", flush=True)


def load_checkpoint(path: str) -> dict:
    """--resume: the checkpoint at `path`, its tensors read from disk as they are used (mmap)."""
    if not Path(path).is_file():
        raise SystemExit(f"error: --resume {path}: no such checkpoint file")
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def seed_everything(seed: int, rng: dict | None = None):
    """Seed Python, NumPy and torch, or restore their states from a checkpoint's `rng`."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if rng is not None:
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name}: expected auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: CUDA is not available here; use --device cpu or auto")
    if device.type == "cuda" and device.index is None:  # torch.cuda.set_device refuses a bare "cuda"
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: only {torch.cuda.device_count()} CUDA devices here")
    return device


def replay_device(args: Args, device: torch.device) -> torch.device:
    """Where the replay's arrays live: --replay-device auto keeps them on the training GPU (no
    host-to-device copy of the batch), on the host otherwise."""
    if args.replay_device == "auto":
        return device if device.type == "cuda" else torch.device("cpu")
    if args.replay_device == "cuda" and device.type != "cuda":
        raise SystemExit("error: --replay-device cuda needs training on CUDA (--device cuda or auto on a GPU)")
    return device if args.replay_device == "cuda" else torch.device("cpu")


def configure_torch(args: Args, device: torch.device):
    """Determinism and, on CUDA, TF32: fp32 matmuls and convolutions on tensor cores (several
    times faster on Ampere and later, ~1e-3 relative precision, which the losses tolerate)."""
    if device.type == "cuda":  # once: CUDA events, synchronize() and tensors made on "cuda" then
        torch.cuda.set_device(device)  # all mean --device's GPU (cuda:1 too), not cuda:0
    torch.backends.cudnn.deterministic = args.torch_deterministic
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not args.torch_deterministic


if __name__ == "__main__":
    main(parse_args())
