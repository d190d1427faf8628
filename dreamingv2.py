"""DreamingV2 in one file: DreamerV2's discrete world model trained without reconstruction.

Paper: Masashi Okada and Tadahiro Taniguchi, "DreamingV2: Reinforcement Learning with Discrete
World Models without Reconstruction". The authors implemented it on the official DreamerV2 code
(github.com/danijar/dreamerv2, Sec. III-G), which this file follows where the paper is silent.
Section, equation, table and figure numbers below are that paper's; "DreamerV2 Eq. n" are Hafner
et al.'s "Mastering Atari with Discrete World Models" (ICLR 2021).

The idea. DreamerV2's RSSM keeps 32 categorical variables of 32 classes (Sec. III-A), but its
image decoder is replaced by contrastive learning (Dreaming's J_NCE): from every posterior state
z_t the auxiliary dynamics (the RSSM prior itself, Sec. III-B) predicts z_{t+1..t+K} open loop
with the real actions, and each prediction must pick out its own future observation among the
observations of the mini-batch. The score of a latent z against an observation x' is
log p(z | x') under a "critic" PMF, a per-variable softmax of a linear map W of the embedding of
x' by a slowly updated momentum encoder CNN' (Sec. III-C, III-E, Fig. 2c). An auxiliary term
(Eq. 6) contrasts the online encoder's own critic samples with the momentum PMFs; the paper needed
it for optimisation to start at all (Sec. III-D). The actor and critic are DreamerV2's, trained in
imagination, unchanged (Sec. III-G).

Paper map (equation -> function):
- Eq. 1, RSSM: h_t = f_GRU(h_{t-1}, z_{t-1}, a_{t-1}), prior p(z_t | h_t), posterior
  q(z_t | h_t, x_t); 32 x 32 categoricals with straight-through gradients (Sec. III-A).
  `RSSM` (`img_step`, `obs_step`, `observe`), `sample_one_hot`.
- Eq. 4, J_DreamingV2 = J_Dreaming (Eq. 3) + J_NCE_aux, plus the reward likelihood (Sec. II-A
  treats rewards as observations). `world_model_loss`.
- Eq. 3, J_Dreaming = sum_{k=0..K} (J_NCE_k + J_KL_k):
  - k-step predictions of the auxiliary dynamics p~ (Sec. III-B, Fig. 2a): `multi_step_priors`
    (the RSSM prior, `--aux-dynamics rssm`); `LinearDynamics` (Dreaming's, Table III).
  - J_NCE_k (Fig. 2a): `nce_objectives` with `window_logits` / `contrastive_logits` and
    `contrastive_nce`; negatives per Sec. III-E (`--negatives`).
  - J_KL_k: k = 0 is DreamerV2's KL balancing, `kl_balance`; k >= 1 PlaNet's latent overshooting
    (Hafner et al., "Learning Latent Dynamics for Planning from Pixels", ICML 2019, Sec. 4 /
    Eq. 7), `overshooting_kl`.
- Eq. 5, the critic p(z_t | x_t) ∝ exp(z_t^T W e_t), parameterised as categorical PMFs (Sec.
  III-C, Fig. 2c calc_pmf / calc_logit): `pmf_critic_log_pmf`, `contrastive_logits`.
- Eq. 6, J_NCE_aux (Fig. 2b): z_t ~ p(z_t | x_t) from the online CNN against the momentum PMFs,
  inside `nce_objectives`.
- Sec. III-E, momentum encoder theta' <- (1 - eta) theta' + eta theta: `momentum_update`.
- Sec. III-F, random shift (pad 4 by replicating the border, random 64 x 64 crop): `random_shift`.
- Behaviour (DreamerV2 Eq. 4-6, kept as-is, Sec. III-G): `imagine`, `lambda_return`,
  `behaviour_losses`.
- One training step in the order of Sec. II-B (train the RSSM, then the policy in imagination):
  `Agent.update`.

Our choices, where the paper is silent (each is a flag or a comment at its place):
- Windows: Fig. 2a draws one start time per sequence; every start time t with K steps after it
  in the sequence forms its own window of B x (K + 1) latents here (more windows per batch,
  the same negatives per window). `--negatives batch` scores every start time against all T x B
  momentum PMFs instead (~T / (K + 1) times more negatives, including same-episode frames).
- The k >= 1 KL terms are averaged over k with the posterior's gradient stopped (PlaNet's
  overshooting), so that the open-loop priors move towards the posteriors and not the reverse
  (`--overshooting-kl sum`: each k balanced like k = 0, summed).
- Shift offsets are drawn per frame, not per sequence; CNN' starts as a copy of CNN; W is shared
  by the online (Eq. 6) and momentum paths; one straight-through sample per prediction.
- `--aux-dynamics linear`: a linear map of [z, a] to categorical logits (Dreaming's p~ is
  Gaussian; ours is categorical so that it fits the discrete latent). It replaces p~ in J_NCE_k
  only: J_KL_k is the RSSM's overshooting objective, so the RSSM is still rolled open loop for it.
- DreamerV2's settings for everything the paper does not list: action repeat 2 (dmc_vision),
  Glorot init, weight decay (1 - 1e-6) per step, the actor/critic indexing of the official
  agent.py, prioritize_ends off (dmc_vision). The replay holds 1e6 simulator steps = 5e5 agent steps (ours: every
  step of the paper's 500K-step runs; DreamerV2's configs.yaml keeps 2e6 agent steps).
- Evaluation (the paper does not say how Table I is measured): every `eval_every` simulator steps,
  `eval_episodes` episodes with the mode action on separately seeded eval envs; the return
  reported is their mean (DreamerV2's eval_every 1e4, with 1 episode; ours: 10 for less noise).

Shapes are time-major throughout: replay sequences are (T, B, ...), imagined rollouts (H + 1, N, ...)
with N = T * B start states. The index conventions (what slot t holds, how k-step predictions,
contrastive candidates and imagined steps are indexed) are stated once, next to `Replay`. Images
stay uint8 (3, 64, 64) until the encoder. Everything after `main` is plumbing shared by the five
scripts of this repository (logging, progress, signals, checkpoints, devices, the optimiser
helper). Usage and implementation details: docs/dreamingv2.md.

    python dreamingv2.py --env dmc-walker-walk
    python dreamingv2.py --env dcs-walker-walk --distraction medium --preset small
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


@dataclass
class Args:
    """The defaults are the paper's setting (DMC from pixels, 500K steps, Table I); every other
    setting is a preset in PRESETS below. Each docstring names its value's source."""

    # Experiment and run (no effect on the algorithm).
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment (part of the run name; ours: CleanRL's run naming)"""
    env: str = "dmc-walker-walk"
    """env id (paper Table I (E): Walker-walk): dmc-<domain>-<task>, dcs-<domain>-<task>,
    robosuite-<task>-<robot> (the paper's manipulation setting, Fig. 3, rendered by MuJoCo instead
    of iGibson), toy-reach, toy-reach-center; the other families of `envs.make` work too"""
    distraction: str = "none"
    """dcs-*: none | easy | medium | hard | background; robosuite-*: none | color-lighting |
    color-lighting-camera (ours: the paper trains without distractions)"""
    dynamic: bool = True
    """distractions move within an episode (False: static per episode; ours: the DCS default)"""
    video_dir: Optional[str] = None
    """DAVIS 2017 or video folder for backgrounds (default: built-in offline pool; ours)"""
    eval_split: Literal["train", "val"] = "val"
    """background videos used for evaluation (ours: held-out videos, as the DCS benchmark)"""
    seed: int = 1
    """seed of the experiment (ours)"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic` (and turns cudnn.benchmark off; ours: CleanRL's)"""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ... (ours)"""
    compile: bool = False
    """torch.compile the whole world-model and behaviour losses (the first update compiles;
    ours: off, so that a first run starts at once)"""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """torch.compile mode (CUDA: 'reduce-overhead' uses CUDA graphs; 'max-autotune' means
    max-autotune-no-cudagraphs until a GPU run has shown CUDA graphs work with it; ours)"""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast for the networks; KL, log-probs, values and score matrices stay fp32
    (ours: fp32 on every device, so that CPU and GPU runs compute the same; DreamerV2 configs.yaml
    precision 16 is available as bf16)"""
    preset: Literal["paper", "small", "tiny"] = "paper"
    """'paper': these defaults; 'small': the same algorithm sized for a 2-core CPU (100K steps of
    dmc-cartpole-swingup in under an hour); 'tiny': narrow nets, short sequences, small batch and
    prefill, 2000 steps, for smoke tests; flags you set explicitly win over the preset (PRESETS;
    ours)"""
    total_steps: int = 500_000
    """environment steps to train for, counted after action repeat (simulator steps); paper
    Table I and Fig. 3 benchmark at 500K steps"""
    action_repeat: Optional[int] = None
    """simulator steps per action (default: 2 for every dmc/dcs/natural task, DreamerV2's
    configs.yaml dmc_vision; the paper does not say; the env's default elsewhere; 0: the env's
    default everywhere)"""
    eval_every: int = 10_000
    """environment steps between evaluations (0: never, except at the end; DreamerV2 configs.yaml
    eval_every 1e4)"""
    eval_episodes: int = 10
    """episodes per evaluation, deterministic (mode) actions (ours: 10 for less noise; DreamerV2
    evaluates 1)"""
    eval_action: Literal["mode", "mean"] = "mode"
    """continuous actions in evaluation: 'mode', as DreamerV2's code (the truncated normal's
    location clipped to [-1, 1]: a full push once the actor's tanh mean saturates), or 'mean'
    (ours: the distribution's mean, the average of the samples the actor is trained on;
    deterministic too). results/cpu/behaviour_check compares them on the CPU runs' checkpoints"""
    log_every: int = 1_000
    """environment steps between progress lines and training-metric logs (ours)"""
    save_model: bool = False
    """write checkpoint.pt (networks, optimisers, counters, RNG states) at every evaluation, and
    replay.pt beside it at the end and every --replay-checkpoint-every evaluations (an interrupt
    or a non-finite loss always writes both; ours)"""
    checkpoint_replay: bool = True
    """write the replay to replay.pt (see save_checkpoint), so that --resume keeps the same data;
    --no-checkpoint-replay: never, a resumed run starts with an empty replay (ours)"""
    replay_checkpoint_every: int = 10
    """evaluations between the periodic replay.pt writes (0: only at the end, on an interrupt or a
    non-finite stop). ours: the replay is gigabytes on a GPU run and writing it pauses training
    (checkpoint.pt is megabytes); at every 10th evaluation (100K env steps at --eval-every 10000)
    the pause is a small fraction of the time between writes, and a hard kill (SIGKILL, a lost
    node) costs at most 10 evaluations' worth of replay, never the networks"""
    resume: Optional[str] = None
    """path of a checkpoint to continue from (its args are the defaults; same schedule; ours)"""
    measure_updates: int = 0
    """if > 0: time this many updates on a synthetic batch at the configured sizes and 50 steps of
    the acting loop on --env, print one JSON line and exit (benchmark.sh speed; ours)"""
    capture_video: bool = False
    """save an mp4 of the first eval episode (runs/<run>/videos) and a frame strip to TensorBoard
    (ours)"""

    # Replay and schedule (DreamerV2's where the paper is silent: it kept DreamerV2's settings, Sec. III-G).
    replay_capacity: int = 1_000_000
    """replay capacity in simulator steps (stored per agent step as uint8 images). Ours: holds a
    whole 500K-step run (Table I); DreamerV2's configs.yaml keeps 2e6 agent steps"""
    replay_device: Literal["auto", "cpu", "cuda"] = "auto"
    """where the replay's arrays live ('auto': the training device when it is CUDA; ours)"""
    prioritize_ends: bool = False
    """sample the last window of each episode more often (`Replay.draw_starts`). Off: DreamerV2
    configs.yaml dmc_vision sets replay.prioritize_ends False (True in its defaults, for Atari);
    `--preset small` and `tiny` turn it on (see PRESETS)"""
    batch_size: int = 16
    """sequences per mini-batch, B (DreamerV2 configs.yaml dataset.batch 16)"""
    batch_length: int = 50
    """steps per sequence, T (DreamerV2 configs.yaml dataset.length 50)"""
    prefill: int = 1000
    """agent steps with uniform random actions before training starts (DreamerV2 configs.yaml
    dmc_vision prefill 1000)"""
    pretrain: int = 100
    """updates made once, right after the prefill (DreamerV2 configs.yaml pretrain 100)"""
    train_every: int = 5
    """agent steps between training rounds (DreamerV2 configs.yaml dmc_vision train_every 5)"""
    updates_per_step: int = 1
    """updates per training round (DreamerV2 configs.yaml train_steps 1)"""

    # World model (DreamerV2 sizes; Fig. 2c's 1536-d embedding and 1024 = 32 x 32 PMF).
    cnn_depth: int = 48
    """encoder channels of the first layer, doubling: 48/96/192/384, a 1536-d embedding (Fig. 2c;
    DreamerV2 configs.yaml encoder.cnn_depth 48)"""
    deter: int = 200
    """GRU (deterministic) state size (DreamerV2 configs.yaml dmc_vision rssm.deter 200)"""
    hidden: int = 200
    """hidden units of the RSSM's input and output layers (DreamerV2 configs.yaml dmc_vision
    rssm.hidden 200)"""
    stoch: int = 32
    """categorical latent variables (paper Sec. III-A: 32)"""
    classes: int = 32
    """classes per categorical variable (paper Sec. III-A: 32)"""
    mlp_units: int = 400
    """units of the reward, discount, actor and critic MLPs (DreamerV2 configs.yaml 400)"""
    mlp_layers: int = 4
    """hidden layers of those MLPs (DreamerV2 configs.yaml 4)"""
    kl_balance: float = 0.8
    """KL balancing alpha: weight of the prior's side (DreamerV2 configs.yaml kl.balance 0.8,
    kept by Sec. II-B)"""
    free_nats: float = 1.0
    """free nats, applied to the batch-mean KL of every J_KL_k (DreamerV2 configs.yaml kl.free 1.0)"""
    kl_scale: float = 1.0
    """weight of the KL terms (paper Eq. 3: 1; DreamerV2 configs.yaml loss_scales.kl 1.0)"""
    overshooting_kl: Literal["planet", "sum"] = "planet"
    """J_KL_k for k >= 1 (Eq. 3): 'planet' = PlaNet's latent overshooting (Sec. 4, Eq. 7), which
    Dreaming builds on: the mean over k of KL(sg(q) || p_k), the posterior's gradient stopped,
    free nats on each; 'sum' = each k with k = 0's KL balancing and free nats, summed unweighted
    (K + 1 times DreamerV2's KL pressure; ours)"""
    negatives: Literal["window", "batch"] = "window"
    """J_NCE negatives: 'window' = Fig. 2a / Sec. III-E, per start time the B x (K + 1) latents
    z_{t..t+K} scored pairwise against the PMFs of x'_{t..t+K}; 'batch' = every start time against
    all T x B momentum PMFs of the batch (ours)"""
    nce_steps: int = 3
    """K, the prediction horizon of J_NCE_k and J_KL_k, k = 0..K (paper Sec. III-G: 3; Table II)"""
    aux_dynamics: Literal["rssm", "linear"] = "rssm"
    """auxiliary dynamics p~ of J_NCE_k: the RSSM prior (paper Sec. III-B) or Dreaming's linear
    model (Table III); J_KL_k rolls the RSSM prior either way (it is the RSSM's overshooting term)"""
    momentum: float = 0.05
    """eta of the momentum encoder, theta' <- (1 - eta) theta' + eta theta (paper Sec. III-G: 0.05)"""
    aug_pad: int = 4
    """random-shift padding in pixels (paper Sec. III-F: 4)"""
    pred_discount: bool = False
    """learn a discount (episode continuation) head (DreamerV2 configs.yaml dmc_vision
    pred_discount False: DMC never terminates)"""
    model_lr: float = 3e-4
    """world-model learning rate (DreamerV2 configs.yaml dmc_vision model_opt.lr 3e-4)"""

    # Behaviour (DreamerV2's, unchanged by the paper, Sec. III-G).
    horizon: int = 15
    """imagination horizon H (DreamerV2 configs.yaml imag_horizon 15)"""
    gamma: float = 0.99
    """discount (DreamerV2 configs.yaml discount 0.99)"""
    return_lambda: float = 0.95
    """lambda of the lambda-return (DreamerV2 configs.yaml discount_lambda 0.95)"""
    actor_lr: float = 8e-5
    """actor learning rate (DreamerV2 configs.yaml dmc_vision actor_opt.lr 8e-5)"""
    critic_lr: float = 8e-5
    """critic learning rate (DreamerV2 configs.yaml dmc_vision critic_opt.lr 8e-5)"""
    actor_entropy: float = 1e-4
    """entropy regulariser eta (DreamerV2 configs.yaml dmc_vision actor_ent 1e-4)"""
    actor_grad: Literal["auto", "dynamics", "reinforce"] = "auto"
    """'auto': dynamics backpropagation for continuous actions, REINFORCE for discrete (DreamerV2
    configs.yaml actor_grad auto, resolved so by the official agent.py)"""
    target_update_every: int = 100
    """updates between copies of the critic into the slow target critic (DreamerV2 configs.yaml
    slow_target_update 100)"""
    adam_eps: float = 1e-5
    """Adam epsilon (DreamerV2 configs.yaml *_opt.eps 1e-5)"""
    grad_clip: float = 100.0
    """gradient-norm clip of every optimiser (DreamerV2 configs.yaml *_opt.clip 100)"""
    weight_decay: float = 1e-6
    """weight decay of every optimiser, as DreamerV2's official optimiser: each variable times
    (1 - wd) per step (DreamerV2 configs.yaml *_opt.wd 1e-6)"""
    init: Literal["glorot", "torch"] = "glorot"
    """weight init: 'glorot' = Glorot-uniform weights, zero biases (Keras defaults, DreamerV2's
    official code; the paper does not say); 'torch' = PyTorch's layer defaults"""


# Every setting other than the paper's, as overrides of the Args defaults (flags you set win;
# the run header prints the overrides a run applied). Values measured on one CPU thread.
# 'small': the same algorithm sized for a 2-core CPU, 100K env steps of dmc-cartpole-swingup in
#   under an hour (docs/dreamingv2.md, "Presets"):
#   - action_repeat 0: the env's per-task repeat (PlaNet's, 8 for cartpole), the DMC-100K setting;
#     a frame costs ~20-30 ms to render here.
#   - 16-channel CNN, 128-unit GRU/MLPs, 16 x 16 latents: 0.8M parameters.
#   - batch 16 x 16 every 4 agent steps (0.7 s an update on one thread: no decoder).
#   - learning rates raised (model 1e-3, actor and critic 3e-4), as for few, small updates.
#   - prioritize_ends on (DreamerV2's default outside dmc_vision): the CPU results in results/cpu
#     were measured with it; 'tiny' keeps it on too (smoke tests on toy envs).
# 'tiny': runs end to end in about a minute on 2 CPU cores (smoke tests).
# Per env family, the one rule is the action repeat (`action_repeat`): 2 on dmc/dcs/natural
# (DreamerV2 dmc_vision), the env's default elsewhere. The paper's ablations are single flags:
# --nce-steps (Table II), --aux-dynamics linear (Table III).
PRESETS = {
    "small": dict(action_repeat=0, cnn_depth=16, deter=128, hidden=128, stoch=16, classes=16,
                  mlp_units=128, mlp_layers=2, batch_size=16, batch_length=16, train_every=4,
                  model_lr=1e-3, actor_lr=3e-4, critic_lr=3e-4, total_steps=100_000,
                  eval_episodes=5, replay_capacity=100_000, prioritize_ends=True),
    "tiny": dict(cnn_depth=4, deter=32, hidden=32, stoch=4, classes=4, mlp_units=32, mlp_layers=2,
                 batch_size=4, batch_length=8, prefill=100, pretrain=2, horizon=5,
                 eval_episodes=1, eval_every=1000, replay_capacity=100_000, total_steps=2000,
                 prioritize_ends=True),
}
# Flags that may differ from the checkpoint's on --resume: schedule, logging and placement only.
# compile_mode and replay_device change where and how fast the same computation runs.
SCHEDULE_FLAGS = {"total_steps", "eval_every", "eval_episodes", "eval_action", "log_every",
                  "save_model", "checkpoint_replay", "replay_checkpoint_every", "resume",
                  "capture_video", "device", "compile", "precision", "measure_updates", "exp_name",
                  "compile_mode", "replay_device"}


def preset_args(preset: str = "paper", **overrides) -> Args:
    """Args with a preset's values as defaults; `overrides` (and CLI flags) win over them."""
    if preset not in ("paper", *PRESETS):
        raise ValueError(f"unknown preset {preset!r}; known: paper, {', '.join(PRESETS)}")
    return Args(**{**PRESETS.get(preset, {}), **overrides, "preset": preset})


def applied_overrides(args: Args) -> str:
    """The run header's account of the numbers: the preset's overrides in effect (those no flag
    replaced), e.g. 'preset small: cnn_depth=16, deter=128, ...'."""
    applied = {k: v for k, v in PRESETS.get(args.preset, {}).items() if getattr(args, k) == v}
    values = ", ".join(f"{k}={v}" for k, v in applied.items()) or "none (the paper's defaults)"
    return f"preset {args.preset}: {values}"


def _flag_value(argv: list, name: str):
    """The value of `--name v` or `--name=v` in argv (the last one, as the parser takes it)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def parse_args(argv=None) -> Args:
    """Read --preset (or --resume) first, then parse every flag over those defaults. With --resume,
    the checkpoint's args are the defaults and only SCHEDULE_FLAGS may change."""
    argv = list(sys.argv[1:] if argv is None else argv)
    resume = _flag_value(argv, "--resume")
    if resume is not None:
        saved = load_checkpoint(resume)["args"]
        known = {f.name for f in fields(Args)}
        default = Args(**{k: v for k, v in saved.items() if k in known})
        args = tyro.cli(Args, args=argv, default=default)
        diffs = [f"--{k.replace('_', '-')} {getattr(args, k)} (checkpoint {saved[k]})"
                 for k in sorted(known - SCHEDULE_FLAGS) if k in saved and getattr(args, k) != saved[k]]
        if diffs:
            raise SystemExit("error: --resume: these flags differ from the checkpoint's and change "
                             f"the algorithm: {', '.join(diffs)}; drop them or start a new run")
        return args
    preset = _flag_value(argv, "--preset") or "paper"
    default = preset_args(preset) if preset in ("paper", *PRESETS) else Args()
    return tyro.cli(Args, args=argv, default=default)


# ---------------------------------------------------------------------------------------------
# Networks: encoder, RSSM (Eq. 1), auxiliary dynamics (Sec. III-B), heads, actor and critic
# ---------------------------------------------------------------------------------------------


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


class Encoder(nn.Module):
    """CNN of Fig. 2: 4 conv layers, kernel 4, stride 2, ELU, depth 48/96/192/384:
    (…, 3, 64, 64) uint8 -> e (…, 1536)."""

    def __init__(self, depth: int):
        super().__init__()
        chans = [3, depth, 2 * depth, 4 * depth, 8 * depth]
        self.net = nn.Sequential(*[m for i in range(4) for m in
                                   (nn.Conv2d(chans[i], chans[i + 1], 4, 2), nn.ELU())])
        self.out_dim = 8 * depth * 2 * 2

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.reshape(-1, *obs.shape[-3:]).float() / 255.0 - 0.5
        return self.net(x).reshape(*obs.shape[:-3], -1)


def one_hot(index: torch.Tensor, classes: int) -> torch.Tensor:
    """F.one_hot as float, by comparison with arange: F.one_hot checks the index range by reading
    min and max to the host on CPU (on CUDA it skips the check), which the sync tests reject."""
    return (index.unsqueeze(-1) == torch.arange(classes, device=index.device)).float()


def gumbel_max_index(logits: torch.Tensor) -> torch.Tensor:
    """Speed: the index of one categorical draw per row, argmax(logits + Gumbel noise), the
    Gumbel-max trick: the distribution torch.multinomial samples, but it compiles and never
    reads a validity flag to the host (a GPU sync per sample)."""
    u = torch.rand_like(logits).clamp(1e-10, 1 - 1e-7)
    return (logits - torch.log(-torch.log(u))).argmax(-1)


def sample_one_hot(logits: torch.Tensor) -> torch.Tensor:
    """z ~ Cat(softmax(logits)), one-hot, for independent categoricals (last axis = classes),
    with straight-through gradients (Sec. III-A): the value is the sample, the gradient that of
    the probabilities."""
    logits = logits.float()
    sample = one_hot(gumbel_max_index(logits), logits.shape[-1])
    probs = logits.softmax(-1)
    return sample + (probs - probs.detach())


def categorical_kl(q_logits: torch.Tensor, p_logits: torch.Tensor) -> torch.Tensor:
    """KL[q || p] of independent categoricals, fp32, summed over variables: (…, S, C) -> (…)."""
    q_log, p_log = F.log_softmax(q_logits.float(), -1), F.log_softmax(p_logits.float(), -1)
    return (q_log.exp() * (q_log - p_log)).sum((-2, -1))


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(logits.float(), -1)
    return -(log_p.exp() * log_p).sum((-2, -1))


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


class RSSM(nn.Module):
    """Recurrent state-space model with categorical stochastic states (Eq. 1, Sec. III-A).

    A state is a dict: deter h (…, deter), stoch z (…, stoch, classes) one-hot samples, logits
    (…, stoch, classes) of the distribution the sample came from. The posterior's first layer is
    split into W_h h_t (inside the time loop) and W_e e_t + b (computed for all t at once).
    """

    def __init__(self, embed_dim: int, action_dim: int, deter: int, hidden: int, stoch: int,
                 classes: int):
        super().__init__()
        self.deter, self.stoch, self.classes = deter, stoch, classes
        self.img_in = nn.Sequential(nn.Linear(stoch * classes + action_dim, hidden), nn.ELU())
        self.cell = LayerNormGRUCell(hidden, deter)
        self.img_out = nn.Sequential(nn.Linear(deter, hidden), nn.ELU(),
                                     nn.Linear(hidden, stoch * classes))  # prior p(z_t | h_t)
        # posterior q(z_t | h_t, e_t): ELU(W_h h_t + W_e e_t + b), then a linear output
        self.obs_deter = nn.Linear(deter, hidden, bias=False)
        self.obs_embed = nn.Linear(embed_dim, hidden)
        self.obs_out = nn.Sequential(nn.ELU(), nn.Linear(hidden, stoch * classes))

    @property
    def feat_dim(self) -> int:
        return self.deter + self.stoch * self.classes

    def initial(self, batch: int, device) -> dict:
        zeros = torch.zeros(batch, self.stoch, self.classes, device=device)
        return dict(deter=torch.zeros(batch, self.deter, device=device), stoch=zeros, logits=zeros)

    def _shape(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.reshape(*logits.shape[:-1], self.stoch, self.classes)

    def deter_step(self, state: dict, action: torch.Tensor) -> torch.Tensor:
        """h_t = f_GRU(h_{t-1}, z_{t-1}, a_{t-1})."""
        x = self.img_in(torch.cat([state["stoch"].flatten(-2), action], -1))
        return self.cell(x, state["deter"])

    def prior_logits(self, deter: torch.Tensor) -> torch.Tensor:
        return self._shape(self.img_out(deter))

    def posterior_logits(self, deter: torch.Tensor, embed_part: torch.Tensor) -> torch.Tensor:
        """embed_part = obs_embed(e_t), computed outside the time loop."""
        return self._shape(self.obs_out(self.obs_deter(deter) + embed_part))

    def img_step(self, state: dict, action: torch.Tensor) -> dict:
        """Prior step: h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}]), z_t ~ p(z_t | h_t)."""
        deter = self.deter_step(state, action)
        logits = self.prior_logits(deter)
        return dict(deter=deter, stoch=sample_one_hot(logits), logits=logits)

    def obs_step(self, state: dict, action: torch.Tensor, embed: torch.Tensor) -> tuple[dict, dict]:
        """One filtering step (acting): the posterior z_t ~ q(z_t | h_t, e_t) and the prior's
        logits (no prior sample: nothing uses it)."""
        deter = self.deter_step(state, action)
        logits = self.posterior_logits(deter, self.obs_embed(embed))
        post = dict(deter=deter, stoch=sample_one_hot(logits), logits=logits)
        return post, dict(deter=deter, logits=self.prior_logits(deter))

    def observe(self, embed: torch.Tensor, action: torch.Tensor) -> tuple[dict, dict]:
        """Filter a sequence from the zero state: the same as obs_step for t = 0..T-1, with every
        non-recurrent layer out of the loop. embed (T, B, E); action (T, B, A) is a_{t-1}.
        Returns posteriors and priors (deter, logits) as dicts of (T, B, ...)."""
        embed_part = self.obs_embed(embed)  # (T, B, hidden)
        state = self.initial(embed.shape[1], embed.device)
        deters, stochs, logits = [], [], []
        for t in range(embed.shape[0]):
            deter = self.deter_step(state, action[t])
            logit = self.posterior_logits(deter, embed_part[t])
            state = dict(deter=deter, stoch=sample_one_hot(logit), logits=logit)
            deters.append(deter)
            stochs.append(state["stoch"])
            logits.append(logit)
        post = dict(deter=torch.stack(deters), stoch=torch.stack(stochs), logits=torch.stack(logits))
        prior = dict(deter=post["deter"], logits=self.prior_logits(post["deter"]))  # (T, B, S, C)
        return post, prior

    def feat(self, state: dict) -> torch.Tensor:
        """Model state [z_t, h_t] fed to every head: (…, stoch * classes + deter)."""
        return torch.cat([state["stoch"].flatten(-2), state["deter"]], -1)


def multi_step_priors(rssm: RSSM, post: dict, action: torch.Tensor, steps: int) -> list[dict]:
    """Open-loop predictions k = 1..K steps ahead of every posterior state at once (Fig. 2a):
    entry k-1 is a state dict of (T - k, B, ...) whose element t is p(z_{t+k} | z_t, a_{t:t+k}),
    i.e. k applications of `img_step` from z_t with the real actions. The Python loop runs over
    k only; all start times are one batch."""
    state, out = post, []
    for k in range(1, steps + 1):
        # z_{t+k-1} for t = 0..T-1-k: drop the start time whose target would leave the sequence
        state = {key: value[:-1] for key, value in state.items() if key in ("deter", "stoch")}
        state = rssm.img_step(state, action[k:])  # action[t + k] = a_{t+k-1}
        out.append(state)
    return out


class LinearDynamics(nn.Module):
    """Dreaming's auxiliary dynamics p~ (Table III, 'linear'): the logits of z_{t+1} are a linear
    map of [z_t, a_t]; our categorical, straight-through version of Dreaming's linear model."""

    def __init__(self, stoch: int, classes: int, action_dim: int):
        super().__init__()
        self.stoch, self.classes = stoch, classes
        self.net = nn.Linear(stoch * classes + action_dim, stoch * classes)

    def rollout(self, z: torch.Tensor, action: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """z (T, B, S, C) posterior samples -> predictions k = 1..K, each (T - k, B, S, C)."""
        out = []
        for k in range(1, steps + 1):
            # z_{t+k-1} (t = 0..T-1-k) and action[t + k] = a_{t+k-1} -> logits of z_{t+k}
            logits = self.net(torch.cat([z[:-1].flatten(-2), action[k:]], -1))
            z = sample_one_hot(logits.reshape(*logits.shape[:-1], self.stoch, self.classes))
            out.append(z)
        return out


class TruncatedNormal(td.Distribution):
    """Normal(loc, scale) truncated to [-1, 1], the DreamerV2 actor distribution for DMC.

    torch.distributions has no truncated normal; this samples by inverting the CDF, which keeps
    rsample() differentiable in loc and scale (needed for dynamics backpropagation).
    """

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
    sample is drawn by `sample_one_hot`, without torch.multinomial's validity check, which copies a flag
    to the host (a GPU sync per imagined step)."""

    def rsample(self, sample_shape=torch.Size()):
        return sample_one_hot(self.logits.expand(*sample_shape, *self.logits.shape))

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

    def dist(self, out: torch.Tensor) -> td.Distribution:
        """The distribution of the net's output (fp32)."""
        out = out.float()
        if self.discrete:
            return OneHotActionDist(logits=out)
        mean, std = out.chunk(2, -1)
        return td.Independent(TruncatedNormal(torch.tanh(mean), 2 * torch.sigmoid(std / 2) + 0.1), 1)

    def forward(self, feat: torch.Tensor) -> td.Distribution:
        return self.dist(self.net(feat))


def mode(dist: td.Distribution, continuous: str = "mode") -> torch.Tensor:
    """Deterministic action for evaluation; `continuous` ('mode' or 'mean': --eval-action) picks
    the truncated normal's mode or mean."""
    if isinstance(dist, td.OneHotCategorical):
        return one_hot(dist.logits.argmax(-1), dist.logits.shape[-1])
    return dist.base_dist.mean if continuous == "mean" else dist.base_dist.mode


def glorot_init(module: nn.Module):
    """DreamerV2's initialisation (Keras defaults): Glorot-uniform weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class WorldModel(nn.Module):
    """CNN, CNN' (momentum copy, no gradient), the critic's W (Fig. 2c), the RSSM, the reward
    head and the optional discount and linear auxiliary dynamics. No decoder."""

    def __init__(self, args: Args, action_dim: int):
        super().__init__()
        self.encoder = Encoder(args.cnn_depth)
        self.momentum_encoder = copy.deepcopy(self.encoder).requires_grad_(False)  # CNN'
        # Fig. 2c: x = W @ e_t, (stoch * classes) x embed, no bias
        self.pmf_critic_w = nn.Linear(self.encoder.out_dim, args.stoch * args.classes, bias=False)
        self.rssm = RSSM(self.encoder.out_dim, action_dim, args.deter, args.hidden, args.stoch,
                         args.classes)
        feat = self.rssm.feat_dim
        self.reward = MLP(feat, 1, args.mlp_units, args.mlp_layers)
        self.discount = MLP(feat, 1, args.mlp_units, args.mlp_layers) if args.pred_discount else None
        self.linear_dynamics = (LinearDynamics(args.stoch, args.classes, action_dim)
                                if args.aux_dynamics == "linear" else None)
        if args.init == "glorot":
            self.apply(glorot_init)
        self.momentum_encoder.load_state_dict(self.encoder.state_dict())  # CNN' starts as CNN


class ActorCritic(nn.Module):
    def __init__(self, args: Args, feat_dim: int, action_dim: int, discrete: bool):
        super().__init__()
        self.actor = Actor(feat_dim, action_dim, discrete, args.mlp_units, args.mlp_layers)
        self.critic = MLP(feat_dim, 1, args.mlp_units, args.mlp_layers)
        self.target_critic = MLP(feat_dim, 1, args.mlp_units, args.mlp_layers)
        if args.init == "glorot":
            self.apply(glorot_init)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Replay buffer and the index conventions
# ---------------------------------------------------------------------------------------------


# Index conventions, stated once (the paper's notation; every tensor is time-major).
#
# Replay slot t of an episode, and row t of a sampled (T, B) sequence, holds
#   obs[t]    = x_t          the observation at time t (uint8 (3, 64, 64))
#   action[t] = a_{t-1}      the action that led to x_t (zeros at t = 0)
#   reward[t] = r_t          the reward received on arriving at x_t (0 at t = 0)
#   cont[t]   = 1 - d_t      0 if the episode terminated at x_t
# so filtering step t reads (action[t], obs[t]): h_t = f_GRU(h_{t-1}, z_{t-1}, a_{t-1}),
# z_t ~ q(z_t | h_t, x_t) (Eq. 1), and the reward head at (h_t, z_t) predicts reward[t] = r_t.
# A sequence never crosses an episode boundary: the RSSM starts every one from zeros.
#
# k-step predictions (J_NCE_k, J_KL_k, k = 1..K): entry k - 1 of `multi_step_priors` is
# (T - k, B, ...) and its element t is z_{t+k} predicted from z_t with the real actions
# a_t .. a_{t+k-1} = action[t+1 .. t+k]; its target is the posterior / observation at t + k,
# i.e. rows k .. T - 1 of the sequence ([k:]).
# Contrastive candidates: --negatives batch flattens (T, B) to T * B, candidate = time * B + b;
# --negatives window: window t (t = 0..T-1-K) holds times t..t+K, row / column = k * B + b, and
# the positive of row k * B + b is column k * B + b (z_{t+k} of sequence b against x'_{t+k} of b).
#
# Imagination (behaviour): the start states s_0 are all T * B posterior states of the batch
# (N = T * B). feats[i] = s_i (i = 0..H), actions[i] = a_i taken in s_i (i = 0..H-1),
# reward[i] = r_i predicted at s_i, value[i] = v(s_i) by the slow critic. The lambda-return
# (DreamerV2 Eq. 4): V_i = r_i + gamma_i ((1 - lambda) v(s_{i+1}) + lambda V_{i+1}), i = 0..H-1,
# V_H = v(s_H). Like the official agent.py, the actor credits a_i with V_{i+1} (i = 0..H-2: the
# reward of reaching s_{i+1} onwards), and the critic regresses v(s_i) on V_i (i = 0..H-1).


class Replay:
    """Whole episodes in a flat ring of uint8 images; sampling of in-episode sequences, uniform or
    with episode ends preferred (`prioritize_ends`).

    Slot t of an episode holds obs_t, the action a_{t-1} that led to it (zeros at t = 0), the
    reward r_t received on arriving there (0 at t = 0) and cont_t = 0 if the episode terminated
    there. A sequence never crosses an episode boundary, so the RSSM starts each one from zeros.
    The arrays are torch tensors on `device` (the GPU on CUDA); episode ids and the sampling RNG
    stay on the host, and one small index tensor goes to the device per batch.
    """

    def __init__(self, capacity: int, obs_shape, action_dim: int, seed: int, device="cpu",
                 prioritize_ends: bool = False):
        self.capacity, self.device = capacity, torch.device(device)
        self.prioritize_ends = prioritize_ends
        # empty: on the CPU pages are only allocated as they fill
        self.obs = torch.empty((capacity, *obs_shape), dtype=torch.uint8, device=self.device)
        self.action = torch.zeros((capacity, action_dim), device=self.device)
        self.reward = torch.zeros(capacity, device=self.device)
        self.cont = torch.ones(capacity, device=self.device)
        self.episode = np.full(capacity, -1, np.int64)  # episode id per slot, -1 = empty
        self.pos = self.size = self.episodes = 0
        self.rng = np.random.default_rng(seed)
        self._ends = np.zeros(0, np.int64)
        self._starts = np.zeros(0, np.int64)
        self._starts_length = None

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in (self.obs, self.action, self.reward,
                                                          self.cont)) + self.episode.nbytes

    def add_episode(self, obs, action, reward, cont):
        n = len(obs)
        if n > self.capacity:
            raise ValueError(f"episode of {n} steps does not fit a replay of {self.capacity}")
        idx = (self.pos + np.arange(n)) % self.capacity
        index = torch.from_numpy(idx).to(self.device)
        for name, value, dtype in (("obs", obs, torch.uint8), ("action", action, torch.float32),
                                   ("reward", reward, torch.float32), ("cont", cont, torch.float32)):
            getattr(self, name)[index] = torch.as_tensor(np.asarray(value), dtype=dtype).to(self.device)
        self.episode[idx] = self.episodes
        self.episodes += 1
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self._starts_length = None  # valid starts changed

    def valid_starts(self, length: int) -> np.ndarray:
        """Slots i such that i .. i+length-1 lie in one stored episode."""
        if self._starts_length != length:
            last = np.roll(self.episode, -(length - 1))
            # Episodes are written contiguously, so equal ids at both ends means one episode,
            # unless the window wraps all the way round (impossible: episodes < capacity).
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
        """Device tensors, time-major: obs (T, B, 3, H, W) uint8, action (T, B, A), reward, cont."""
        starts = self.draw_starts(batch, length)
        idx = (starts[None, :] + np.arange(length)[:, None]) % self.capacity  # (T, B)
        index = to_device_async(idx, self.device)
        return dict(obs=self.obs[index], action=self.action[index], reward=self.reward[index],
                    cont=self.cont[index])

    def state_dict(self) -> dict:
        n = self.size  # copies of the filled part (a view would save the whole storage)
        copy = lambda t: t[:n].to("cpu", copy=True)  # noqa: E731
        return dict(obs=copy(self.obs), action=copy(self.action), reward=copy(self.reward),
                    cont=copy(self.cont), episode=self.episode[:n].copy(), pos=self.pos,
                    size=n, episodes=self.episodes, rng=self.rng.bit_generator.state)

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
# World-model objective: J_DreamingV2 (Eq. 3, 4, 5, 6), the augmentation (Sec. III-F)
# ---------------------------------------------------------------------------------------------


def random_shift(obs: torch.Tensor, pad: int) -> torch.Tensor:
    """Sec. III-F: pad every side by `pad` pixels repeating the border, then crop a random window
    of the original size, independently per image: (N, C, H, W) -> (N, C, H, W), dtype kept.
    Replicate padding followed by a crop at offset s equals indexing rows/columns
    clamp(i + s - pad, 0, H - 1), which is what this does (no padded copy is made)."""
    n, _, h, w = obs.shape
    shift = torch.randint(0, 2 * pad + 1, (n, 2), device=obs.device)
    rows = (torch.arange(h, device=obs.device) + shift[:, :1] - pad).clamp(0, h - 1)  # (N, H)
    cols = (torch.arange(w, device=obs.device) + shift[:, 1:] - pad).clamp(0, w - 1)  # (N, W)
    batch = torch.arange(n, device=obs.device)[:, None, None]
    return obs[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (N, C, H, W)


def gaussian_nll(mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-ln N(target; mean, 1), elementwise, fp32 (no Python-scalar distribution parameters)."""
    return 0.5 * (mean.float() - target.float()) ** 2 + 0.5 * math.log(2 * math.pi)


def kl_balance(post_logits: torch.Tensor, prior_logits: torch.Tensor, alpha: float,
               free: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KL balancing (DreamerV2 Sec. 2.2): alpha KL(sg(q) || p) trains the prior towards the
    posterior, (1 - alpha) KL(q || sg(p)) regularises the posterior; free nats on each side's
    batch mean. Returns (loss, per-element KL value (…))."""
    kl_prior = categorical_kl(post_logits.detach(), prior_logits)
    kl_post = categorical_kl(post_logits, prior_logits.detach())
    loss = alpha * kl_prior.mean().clamp_min(free) + (1 - alpha) * kl_post.mean().clamp_min(free)
    return loss, kl_prior.detach()


def overshooting_kl(post_logits: torch.Tensor, prior_logits: torch.Tensor, free: float) -> torch.Tensor:
    """One latent overshooting term (PlaNet Sec. 4): KL(sg(q) || p_k) with free nats on its batch
    mean; the posterior is a fixed target (PlaNet's stop-gradient on the overshooting posteriors),
    so only the k-step prior moves. fp32 scalar."""
    return categorical_kl(post_logits.detach(), prior_logits).mean().clamp_min(free)


def pmf_critic_log_pmf(pmf_critic_w: nn.Linear, embed: torch.Tensor, stoch: int, classes: int) -> torch.Tensor:
    """Fig. 2c calc_pmf: log p(z | x) = log softmax(reshape(W e, (stoch, classes)), classes),
    fp32: (…, E) -> (…, stoch, classes)."""
    x = pmf_critic_w(embed)
    return F.log_softmax(x.float().reshape(*x.shape[:-1], stoch, classes), -1)


def contrastive_logits(z: torch.Tensor, log_pmf: torch.Tensor) -> torch.Tensor:
    """Fig. 2c calc_logit for every pair: logit[i, j] = sum(z_i * log pmf_j) = log p(z_i | x'_j)
    (DreamingV2 Eq. 5 up to the normaliser). z (N, S, C), log_pmf (M, S, C) -> (N, M), fp32 (no autocast)."""
    with torch.autocast(z.device.type, enabled=False):
        return z.float().flatten(1) @ log_pmf.float().flatten(1).T


def windows(x: torch.Tensor, steps: int) -> torch.Tensor:
    """(T, B, ...) -> (T - K, K + 1, B, ...): window t holds x_t .. x_{t+K} (K = steps)."""
    T = x.shape[0]
    index = torch.arange(T - steps, device=x.device)[:, None] + torch.arange(steps + 1, device=x.device)
    return x[index]


def window_logits(z: torch.Tensor, log_pmf: torch.Tensor) -> torch.Tensor:
    """Fig. 2a scoring: per window, every latent against every PMF of that window.
    z, log_pmf (W, K + 1, B, S, C) -> (W, (K + 1) B, (K + 1) B), row/column index = k * B + b;
    the positive of row i is column i. fp32 (no autocast)."""
    with torch.autocast(z.device.type, enabled=False):
        return z.float().flatten(3).flatten(1, 2) @ log_pmf.float().flatten(3).flatten(1, 2).transpose(1, 2)


def contrastive_nce(logits: torch.Tensor, offset: int, period: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-J_NCE as a |D|-class cross-entropy (Sec. II-C): row i's positive is candidate i + offset
    (i mod period + offset with `period`, for stacked windows). Returns (loss, top-1 accuracy)."""
    labels = torch.arange(logits.shape[0], device=logits.device)
    return contrastive_nce_labels(logits, (labels % period if period else labels) + offset)


def contrastive_nce_labels(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of rows against their positive candidates `labels`; (loss, top-1 accuracy)."""
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return loss, accuracy


def nce_objectives(latents: list, z_online: torch.Tensor, log_pmf: torch.Tensor, negatives: str):
    """J_NCE_k for k = 0..K and J_NCE_aux as (loss, accuracy) pairs: ([term_k], aux).

    latents[k] (T - k, B, S, C): element t predicts time t + k (the posterior for k = 0);
    z_online (T, B, S, C): the online CNN's critic samples (Eq. 6); log_pmf (T, B, S, C): the
    momentum PMFs log p(z | x'_t). The positive of a latent for time t + k of sequence b is the
    PMF of x'_{t+k} of sequence b; negatives per `negatives` (Args.negatives)."""
    T, B = log_pmf.shape[:2]
    K = len(latents) - 1
    if negatives == "window":
        # Fig. 2a / Sec. III-E: window t holds, for all B sequences, z_{t+k} predicted from z_t,
        # k = 0..K, scored against the PMFs of x'_{t..t+K}: (B (K+1))^2 logits per window.
        # latents[k][t] = z_{t+k} predicted from z_t; start times t = 0..T-1-K
        z = torch.stack([x[:T - K] for x in latents], 1)  # (T-K, K+1, B, S, C)
        pmf = windows(log_pmf, K)  # (T-K, K+1, B, S, C)
        rows = window_logits(z, pmf).reshape(T - K, K + 1, B, (K + 1) * B)
        positive = (torch.arange(K + 1, device=rows.device)[:, None] * B
                    + torch.arange(B, device=rows.device))  # (K+1, B): column k * B + b
        terms = [contrastive_nce_labels(rows[:, k].flatten(0, 1), positive[k].repeat(T - K))
                 for k in range(K + 1)]
        # J_NCE_aux (Eq. 6, Fig. 2b) over the same windows
        aux = window_logits(windows(z_online, K), pmf).flatten(0, 1)  # rows (t, k, b)
        return terms, contrastive_nce(aux, 0, period=(K + 1) * B)
    # 'batch': every start time against all T * B PMFs, candidate index = time * B + sequence
    flat = log_pmf.flatten(0, 1)
    terms = [contrastive_nce(contrastive_logits(z.flatten(0, 1), flat), k * B) for k, z in enumerate(latents)]
    return terms, contrastive_nce(contrastive_logits(z_online.flatten(0, 1), flat), 0)


def world_model_loss(wm: WorldModel, batch: dict, args: Args):
    """-(J_DreamingV2) of Eq. 4 = -(sum_{k=0..K} J_NCE_k + J_KL_k) - J_NCE_aux, plus the reward
    NLL. batch is time-major; returns (loss, posterior states (T, B, ...), metrics)."""
    obs, action = batch["obs"], batch["action"]  # (T, B, 3, 64, 64) uint8, (T, B, A)
    T, B = action.shape[:2]
    S, C = args.stoch, args.classes
    # Sec. III-F: independent random shifts for the online view x and the momentum view x'.
    x = random_shift(obs.flatten(0, 1), args.aug_pad)
    x_prime = random_shift(obs.flatten(0, 1), args.aug_pad)
    embed = wm.encoder(x)  # e_t = CNN(x_t), (T*B, E)
    embed_prime = wm.momentum_encoder(x_prime).detach()  # Sec. III-E: stop-gradient after CNN'
    momentum_log_pmf = pmf_critic_log_pmf(wm.pmf_critic_w, embed_prime, S, C)  # log p(z | x'), (T*B, S, C)

    post, prior = wm.rssm.observe(embed.reshape(T, B, -1), action)
    priors = multi_step_priors(wm.rssm, post, action, args.nce_steps)  # k = 1..K, (T-k, B, ...)

    # J_KL_k (Eq. 3): k = 0 is DreamerV2's posterior-prior KL; k >= 1 the overshooting terms
    # against the open-loop k-step priors (Dreaming's J_KL_k, PlaNet's latent overshooting).
    kl_0, kl_value = kl_balance(post["logits"], prior["logits"], args.kl_balance, args.free_nats)
    if args.overshooting_kl == "planet":  # PlaNet Eq. 7: mean over distances, sg(posterior)
        # post[k:] = q(z_{t+k}), t = 0..T-1-k, against p["logits"][t] = p(z_{t+k} | z_t, a_{t..t+k-1})
        overshoot = [overshooting_kl(post["logits"][k:], p["logits"], args.free_nats)
                     for k, p in enumerate(priors, 1)]
        kl_loss = kl_0 + (sum(overshoot) / len(overshoot) if overshoot else 0.0)
    else:  # 'sum': each k balanced like k = 0, summed unweighted
        overshoot = [kl_balance(post["logits"][k:], p["logits"], args.kl_balance, args.free_nats)[0]
                     for k, p in enumerate(priors, 1)]
        kl_loss = kl_0 + sum(overshoot)

    # J_NCE_k (Eq. 3, Fig. 2a): z_t from the posterior (k = 0) and the auxiliary dynamics' k-step
    # predictions, scored by the PMF critic against momentum PMFs.
    if args.aux_dynamics == "rssm":  # Sec. III-B
        predictions = [p["stoch"] for p in priors]
    else:  # Table III, Dreaming's linear p~ (J_KL_k above still rolls the RSSM prior)
        predictions = wm.linear_dynamics.rollout(post["stoch"], action, args.nce_steps)
    z_online = sample_one_hot(pmf_critic_log_pmf(wm.pmf_critic_w, embed, S, C))  # Eq. 6, (T*B, S, C)
    nce_terms, (nce_aux_loss, aux_accuracy) = nce_objectives(
        [post["stoch"], *predictions], z_online.reshape(T, B, S, C),
        momentum_log_pmf.reshape(T, B, S, C), args.negatives)
    nce_loss = sum(loss for loss, _ in nce_terms)

    # Rewards as observations (Sec. II-A): -ln p(r_t | h_t, z_t), the heads once over (T, B).
    feat = wm.rssm.feat(post)  # (T, B, F)
    reward_loss = gaussian_nll(wm.reward(feat).squeeze(-1), batch["reward"]).mean()  # slot t: r_t
    loss = nce_loss + args.kl_scale * kl_loss + nce_aux_loss + reward_loss
    metrics = dict(nce_loss=nce_loss, nce_aux_loss=nce_aux_loss, kl_loss=kl_loss,
                   reward_loss=reward_loss, kl=kl_value.mean(),
                   nce_accuracy=nce_terms[0][1], nce_aux_accuracy=aux_accuracy,
                   prior_entropy=categorical_entropy(prior["logits"]).mean().detach(),
                   post_entropy=categorical_entropy(post["logits"]).mean().detach())
    for k, (term, accuracy) in enumerate(nce_terms):
        metrics[f"nce_loss_{k}"] = term.detach()
        metrics[f"nce_accuracy_{k}"] = accuracy
    if wm.discount is not None:
        # The discount head predicts episode continuation (Bernoulli), scaled by gamma when used.
        discount_loss = F.binary_cross_entropy_with_logits(
            wm.discount(feat).squeeze(-1).float(), batch["cont"].float())
        loss = loss + discount_loss
        metrics["discount_loss"] = discount_loss
    metrics["model_loss"] = loss
    return loss, post, metrics


def momentum_update(target: nn.Module, source: nn.Module, eta: torch.Tensor):
    """Sec. III-E: theta' <- (1 - eta) theta' + eta theta for every parameter, in place and
    outside autograd (CNN' never joins the graph). eta is a 0-dim device tensor, so that it can
    depend on a skipped step without a host sync (eta 0: the target stays); eta = 1 - skipped
    also copies the critic into the slow critic unless the critic's step was skipped."""
    with torch.no_grad():
        lerp_(list(target.parameters()), list(source.parameters()), eta)


# ---------------------------------------------------------------------------------------------
# Behaviour learning in imagination (DreamerV2 Eq. 4-6, unchanged, Sec. III-G)
# ---------------------------------------------------------------------------------------------


def lambda_return(reward, value, discount, bootstrap, lam: float):
    """DreamerV2 Eq. 4, time-major (H, N): V_t = r_t + gamma_t ((1 - lam) v_{t+1} + lam V_{t+1}),
    t = 0..H-1, V_H = bootstrap; reward[t], value[t], discount[t] belong to s_t."""
    next_values = torch.cat([value[1:], bootstrap[None]], 0)  # v_{t+1}, t = 0..H-1
    inputs = reward + discount * next_values * (1 - lam)
    returns, last = [], bootstrap
    for t in reversed(range(reward.shape[0])):
        last = inputs[t] + discount[t] * lam * last
        returns.append(last)
    return torch.stack(returns[::-1])


def imagine(wm: WorldModel, actor: Actor, start: dict, horizon: int):
    """Roll the prior forward from posterior states under the actor: feats (H+1, N, F) = s_0..s_H,
    actions (H, N, A) = a_0..a_{H-1}, actor outputs (H, N, ·); a_i is taken in s_i. Gradients flow through the
    dynamics into the actions (the actor sees detached features, as in DreamerV2)."""
    state, feats, actions, outs = start, [wm.rssm.feat(start)], [], []
    for _ in range(horizon):
        out = actor.net(feats[-1].detach())
        action = actor.dist(out).rsample()
        state = wm.rssm.img_step(state, action)
        feats.append(wm.rssm.feat(state))
        actions.append(action)
        outs.append(out)
    return torch.stack(feats), torch.stack(actions), torch.stack(outs)


def behaviour_losses(wm: WorldModel, ac: ActorCritic, post: dict, args: Args, discrete: bool):
    """Actor (DreamerV2 Eq. 6) and value critic (DreamerV2 Eq. 5) losses on imagined rollouts from every
    posterior state; values, returns and log-probs in fp32."""
    start = {k: post[k].detach().flatten(0, 1) for k in ("deter", "stoch")}  # (T*B, ...)
    feats, actions, outs = imagine(wm, ac.actor, start, args.horizon)
    reward = wm.reward(feats).squeeze(-1).float()  # r_i predicted at s_i, (H+1, N)
    if wm.discount is not None:
        discount = args.gamma * torch.sigmoid(wm.discount(feats).squeeze(-1).float())
    else:
        discount = torch.full_like(reward, args.gamma)
    value = ac.target_critic(feats).squeeze(-1).float()  # slow critic v(s_i), (H+1, N)
    # r_i, v(s_i), gamma_i for i = 0..H-1 and the bootstrap v(s_H): returns[i] = V_i, (H, N)
    returns = lambda_return(reward[:-1], value[:-1], discount[:-1], value[-1], args.return_lambda)
    # Imagined steps after a predicted episode end count less: weight_i = prod_{j<i} gamma_j, (H+1, N).
    weight = torch.cumprod(torch.cat([torch.ones_like(discount[:1]), discount[:-1]], 0), 0).detach()
    # Actor, indexed as DreamerV2's official agent.py, i = 0..H-2: a_i (actions[:-1]) is credited
    # with V_{i+1} (returns[1:]), baseline v(s_i) (value[:-2]), weight weight[:-2]; s_0 is a start
    # state from the replay, so V_0 trains nothing.
    policy = ac.actor.dist(outs[:-1])  # the in-loop actor outputs at s_0..s_{H-2}, no second forward
    grad = args.actor_grad if args.actor_grad != "auto" else ("reinforce" if discrete else "dynamics")
    if grad == "dynamics":
        objective = returns[1:]  # V_{i+1}; rho = 1: backpropagate it through the model into a_i
    else:  # rho = 0: REINFORCE, baseline the slow critic, advantage V_{i+1} - v(s_i) (official)
        objective = policy.log_prob(actions[:-1].detach()).float() * (returns[1:] - value[:-2]).detach()
    entropy = policy.entropy().float()
    actor_loss = -(weight[:-2] * (objective + args.actor_entropy * entropy)).mean()
    critic = ac.critic(feats[:-1].detach()).squeeze(-1).float()  # v(s_i), i = 0..H-1, (H, N)
    critic_loss = (gaussian_nll(critic, returns.detach()) * weight[:-1]).mean()  # against V_i
    metrics = dict(actor_loss=actor_loss, critic_loss=critic_loss, actor_entropy=entropy.mean(),
                   imagined_reward=reward.mean(), value=critic.mean(), lambda_return=returns.mean())
    return actor_loss, critic_loss, metrics


# ---------------------------------------------------------------------------------------------
# Agent: one training step in the paper's order, acting
# ---------------------------------------------------------------------------------------------

# The per-update non-finite flags that Agent.update returns, one per optimiser, named after its loss.
LOSS_NAMES = ("model_loss", "actor_loss", "critic_loss")


class Agent:
    def __init__(self, args: Args, action_dim: int, discrete: bool, device: torch.device):
        self.args, self.device, self.discrete, self.action_dim = args, device, discrete, action_dim
        self.wm = WorldModel(args, action_dim).to(device)
        self.ac = ActorCritic(args, self.wm.rssm.feat_dim, action_dim, discrete).to(device)
        # One optimiser per network (DreamerV2's model_opt, actor_opt, critic_opt): Adam with
        # gradient-norm clipping and DreamerV2's weight decay; CNN' has no optimiser (Sec. III-E).
        opt = lambda name, params, lr: Optimizer(name, params, lr, args.adam_eps, args.grad_clip,  # noqa: E731
                                                 args.weight_decay)
        self.model_opt = opt("model", [p for p in self.wm.parameters() if p.requires_grad], args.model_lr)
        self.actor_opt = opt("actor", self.ac.actor.parameters(), args.actor_lr)
        self.critic_opt = opt("critic", self.ac.critic.parameters(), args.critic_lr)
        self.updates = 0
        # Once an update has a non-finite loss, every later one is skipped too (a device flag): the
        # main loop reads the flags one update late, without waiting for the GPU, and then stops.
        self.halted = torch.zeros((), device=device)
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
        self.compile_seconds = None
        self._wm_loss, self._ac_loss = self._world_model_loss, self._behaviour_losses
        self.cudagraphs = args.compile and args.compile_mode == "reduce-overhead"
        if args.compile:
            # The whole loss computations (observe and imagine included) compile into one graph
            # each; the modules stay uncompiled, so state_dict keys and checkpoints are the same.
            mode = {"default": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(
                args.compile_mode, args.compile_mode)
            self._wm_loss = torch.compile(self._world_model_loss, dynamic=False, mode=mode)
            self._ac_loss = torch.compile(self._behaviour_losses, dynamic=False, mode=mode)

    def update(self, batch: dict) -> tuple[dict, torch.Tensor]:
        """One training step in the order of Sec. II-B's steps (i) and (ii): the world model on
        J_DreamingV2 (Eq. 4), the momentum encoder (Sec. III-E), then the actor and the critic on
        imagined rollouts (Sec. III-G) and, every `target_update_every` updates, the slow critic.
        Returns (metrics, the (3,) non-finite flags named by LOSS_NAMES), device tensors, with no
        host sync. A non-finite loss or norm skips its step (a skipped world-model step skips the
        whole update), and every later update (`halted`)."""
        start = time.perf_counter()
        model_loss, post, metrics = self.world_model_losses(batch)
        metrics |= self.model_opt(model_loss, skip=self.halted)
        skip = self.model_opt.skipped
        momentum_update(self.wm.momentum_encoder, self.wm.encoder, self.args.momentum * (1 - skip))

        actor_loss, critic_loss, behaviour_metrics = self.imagination_losses(post)
        backward(actor_loss + critic_loss, self.actor_opt, self.critic_opt)  # one compiled graph
        metrics |= behaviour_metrics | self.actor_opt.step(actor_loss, skip)
        metrics |= self.critic_opt.step(critic_loss, skip)
        if self.updates % self.args.target_update_every == 0:  # slow critic <- critic (eta 1)
            momentum_update(self.ac.target_critic, self.ac.critic, 1 - self.critic_opt.skipped)

        self.updates += 1
        self.report_compile_time(start)
        flags = torch.stack([skip, self.actor_opt.flag, self.critic_opt.flag])  # LOSS_NAMES
        self.halted = torch.maximum(self.halted, flags.max())
        return metrics, flags

    # Speed mechanics around the two loss functions, so that `update` reads as the algorithm.
    def _world_model_loss(self, batch):
        with self.autocast:
            return world_model_loss(self.wm, batch, self.args)

    def _behaviour_losses(self, post):
        with self.autocast:
            return behaviour_losses(self.wm, self.ac, post, self.args, self.discrete)

    def world_model_losses(self, batch: dict):
        """`world_model_loss` (compiled with --compile) and the posterior states, detached, that
        imagination starts from; under CUDA graphs the posterior and metrics are copied out of
        the graph pool, which the next compiled call overwrites (`cudagraph_step`)."""
        cudagraph_step(self.cudagraphs)
        loss, post, metrics = self._wm_loss(batch)
        post = outlive_step({k: post[k].detach() for k in ("deter", "stoch")}, self.cudagraphs)
        return loss, post, outlive_step(metrics, self.cudagraphs)

    def imagination_losses(self, post: dict):
        """`behaviour_losses` (compiled with --compile) with the world model frozen: the actor's
        gradient flows through the dynamics into the actions, but no world-model weight gradient
        is computed (the world model is not trained by them)."""
        cudagraph_step(self.cudagraphs)
        with frozen(self.wm):
            actor_loss, critic_loss, metrics = self._ac_loss(post)
        return actor_loss, critic_loss, outlive_step(metrics, self.cudagraphs)

    def report_compile_time(self, start: float):
        """--compile: print how long the first update (which compiles) took, once."""
        if self.args.compile and self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - start
            print(f"compiled in {self.compile_seconds:.1f} s", flush=True)

    @torch.no_grad()
    def act(self, obs: np.ndarray, state, explore: bool):
        """One filtering step and an action. state = (latent, previous action) or None. The
        observation is not augmented (the shift is a training-time regulariser)."""
        if state is None:
            latent = self.wm.rssm.initial(1, self.device)
            prev = torch.zeros(1, self.action_dim, device=self.device)
        else:
            latent, prev = state
        obs_t = torch.as_tensor(obs, device=self.device)[None]
        with self.autocast:
            # Latents are sampled in evaluation too (DreamerV2's eval_state_mean=False); only the
            # action is the mode.
            latent, _ = self.wm.rssm.obs_step(latent, prev, self.wm.encoder(obs_t))
            dist = self.ac.actor(self.wm.rssm.feat(latent))
        action = dist.sample() if explore else mode(dist, self.args.eval_action)
        return action[0].float().cpu().numpy(), (latent, action.float())

    def num_parameters(self) -> int:
        """Trained parameters: world model (not CNN'), actor, critic (not the target critic)."""
        return sum(p.numel() for m in (self.wm, self.ac.actor, self.ac.critic)
                   for p in m.parameters() if p.requires_grad)

    def state_dict(self) -> dict:
        return dict(wm=self.wm.state_dict(), ac=self.ac.state_dict(),
                    model_opt=self.model_opt.state_dict(), actor_opt=self.actor_opt.state_dict(),
                    critic_opt=self.critic_opt.state_dict(), updates=self.updates)

    def load_state_dict(self, state: dict):
        self.wm.load_state_dict(state["wm"])
        self.ac.load_state_dict(state["ac"])
        for key in ("model_opt", "actor_opt", "critic_opt"):
            getattr(self, key).load_state_dict(state[key])
        self.updates = state["updates"]


# ---------------------------------------------------------------------------------------------
# Acting in the env and evaluation
# ---------------------------------------------------------------------------------------------


def env_action(action: np.ndarray, discrete: bool):
    """The agent's action (continuous vector or one-hot) in the env's format."""
    return int(action.argmax()) if discrete else action


def evaluate(agent: Agent, env, episodes: int, discrete: bool, seeds: list[int],
             record: bool = False, stop: StopFlag | None = None):
    """Mean return of `episodes` episodes with mode actions (episode j reset with seeds[j]);
    frames of the first if `record`. None if a stop signal arrived."""
    returns, frames = [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seeds[ep])
        state, total, done = None, 0.0, False
        while not done:
            if record and ep == 0:
                frames.append(obs.transpose(1, 2, 0))
            action, state = agent.act(obs, state, explore=False)
            obs, reward, terminated, truncated, _ = env.step(env_action(action, discrete))
            total += reward
            done = terminated or truncated
            if stop is not None and stop.signum is not None:
                return None, []
        returns.append(total)
    return float(np.mean(returns)), frames


def action_repeat(args: Args) -> int:
    """--action-repeat, else 2 for every DMC-family task (DreamerV2's configs.yaml dmc:
    action_repeat 2; the paper gives none), else the env's default (e.g. robosuite's)."""
    if args.action_repeat:
        return args.action_repeat
    if args.action_repeat is None and args.env.partition("-")[0] in ("dmc", "dcs", "natural"):
        return 2
    return envs.default_action_repeat(args.env)


def make_env(args: Args, split: str, seed: int):
    """envs.make with this run's settings; bad input ends in SystemExit("error: ...")."""
    try:
        env = envs.make(args.env, distraction=args.distraction, dynamic=args.dynamic, seed=seed,
                        image_size=64, action_repeat=action_repeat(args), split=split,
                        video_dir=args.video_dir)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    if tuple(env.observation_space.shape or ()) != (3, 64, 64):
        env.close()
        raise SystemExit(f"error: {args.env}: observations of shape {env.observation_space.shape}; "
                         "dreamingv2 needs (3, 64, 64) uint8 images (robosuite: proprio=False)")
    return env


def measure_speed(args: Args, device: torch.device) -> dict:
    """Speed benchmark. Updates: median seconds per update over `args.measure_updates` updates
    (after 2 warm-ups) on a random batch of the configured size (model and optimisers only, no
    env, no replay). Acting: env steps per second of the acting loop (policy step + env step,
    exploration actions) over 50 agent steps on `args.env`."""
    configure_torch(args, device)
    env = make_env(args, "train", args.seed)
    discrete = hasattr(env.action_space, "n")
    action_dim = env.action_space.n if discrete else env.action_space.shape[0]
    agent = Agent(args, action_dim, discrete, device)
    T, B = args.batch_length, args.batch_size
    batch = dict(obs=torch.randint(0, 255, (T, B, 3, 64, 64), dtype=torch.uint8, device=device),
                 action=torch.rand(T, B, action_dim, device=device) * 2 - 1,
                 reward=torch.rand(T, B, device=device), cont=torch.ones(T, B, device=device))
    times = []
    for i in range(args.measure_updates + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        agent.update(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    obs, _ = env.reset(seed=args.seed)
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
                  device=str(device), precision=args.precision, compile=args.compile)
    if args.compile:
        result["compile_seconds"] = agent.compile_seconds
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    # peak resident memory of the process (Linux reports KiB): weights, optimisers, activations, env
    result["peak_host_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(result))
    return result


# ---------------------------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------------------------


def main(args: Args):
    if args.measure_updates > 0:
        return measure_speed(args, resolve_device(args.device))
    if args.nce_steps < 0 or args.nce_steps >= args.batch_length:
        raise SystemExit(f"error: --nce-steps {args.nce_steps} must lie in 0..batch_length - 1 "
                         f"({args.batch_length - 1})")
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    device = resolve_device(args.device)
    configure_torch(args, device)
    seed_everything(args.seed)

    # Every episode is reset with its own SeedSequence child (episode_seed), so the evaluation
    # env is reproducible after a resume without storing its RNG.
    env = make_env(args, "train", args.seed)
    eval_env = make_env(args, args.eval_split, args.seed + 10_000)
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
    counters = dict(env_steps=0, agent_steps=0, episodes=0, evals=0, next_eval=args.eval_every,
                    last_eval=-1, pretrain_updates=0)
    if checkpoint is not None:
        agent.load_state_dict(checkpoint["agent"])
        counters.update(checkpoint["counters"])
        load_replay(args.resume, checkpoint, replay, counters)
        seed_everything(args.seed, checkpoint["rng"])  # the RNG states where the run stopped
    logger = Logger(run_dir, args, counters["env_steps"] if checkpoint is not None else None)

    params = agent.num_parameters()
    ratio = args.updates_per_step * args.batch_size * args.batch_length / args.train_every
    print(f"run {run_dir} | action repeat {repeat} | device {device} | {params / 1e6:.1f}M parameters | replay "
          f"{replay.capacity:,} agent steps on {replay.device}, up to {replay.nbytes / 2**30:.2f} GiB "
          f"(filled lazily) | replay ratio {ratio:.0f} replayed steps per agent step | videos: "
          f"{envs.video_source(args.env, args.distraction, args.video_dir)}", flush=True)
    print(applied_overrides(args), flush=True)
    if checkpoint is not None:
        print(f"resumed from {args.resume} at env step {counters['env_steps']} (the interrupted "
              "episode was stored as truncated; a new episode starts)", flush=True)
    stop = StopFlag()
    checkpoint_path = run_dir / "checkpoint.pt"

    def new_episode():
        obs, _ = env.reset(seed=episode_seed(args.seed, "train", counters["episodes"]))
        return obs, dict(obs=[obs], action=[np.zeros(action_dim, np.float32)], reward=[0.0], cont=[1.0])

    def store(episode):
        replay.add_episode(*(np.asarray(episode[k]) for k in ("obs", "action", "reward", "cont")))
        counters["episodes"] += 1

    def write_checkpoint(with_replay: bool):
        """checkpoint.pt, and replay.pt if `with_replay` (see save_checkpoint)."""
        save_checkpoint(checkpoint_path, agent, replay if with_replay else None, counters, args)

    def finish(code: int, message: str):
        print(message, flush=True)
        logger.close()
        env.close()
        eval_env.close()
        sys.exit(code)

    def stop_if_interrupted():
        if stop.signum is None:
            return
        if len(ep["obs"]) >= 2:  # the episode so far, truncated (cont = 1 everywhere)
            store(ep)
        write_checkpoint(with_replay=True)
        finish(128 + stop.signum, f"interrupted at step {counters['env_steps']}; resume with: "
               f"python dreamingv2.py --resume {checkpoint_path}")

    watch = NonFiniteWatch(LOSS_NAMES)  # each update's flags, read before the next update
    metrics = {}

    def check_nonfinite():
        bad = watch.first_bad()
        if bad is not None:
            names, update, _ = bad
            # the bad update was skipped: these are the parameters before it
            write_checkpoint(with_replay=True)
            finish(1, f"error: non-finite {names[0]} at update {update} (env step {counters['env_steps']}); "
                   f"checkpoint from before it: {checkpoint_path}")

    def train_once():
        nonlocal metrics
        check_nonfinite()
        batch = to_device(replay.sample(args.batch_size, args.batch_length), device)
        start = time.perf_counter()
        metrics, nonfinite = agent.update(batch)
        progress.update_time += time.perf_counter() - start
        progress.updates += 1
        watch.push(nonfinite, agent.updates - 1, counters["env_steps"])

    def run_eval():
        seeds = [episode_seed(args.seed, "eval", counters["evals"] * 10_000 + j)
                 for j in range(args.eval_episodes)]
        ret, frames = evaluate(agent, eval_env, args.eval_episodes, discrete, seeds,
                               args.capture_video, stop)
        if ret is None:  # interrupted: not logged, reruns after resume
            stop_if_interrupted()
        logger.log(counters["env_steps"], {"eval/episodic_return": ret})
        if frames:
            save_video(frames, run_dir / "videos" / f"eval_{counters['env_steps']}.mp4")
            strip = np.concatenate(frames[:: max(1, len(frames) // 8)][:8], axis=1)
            logger.writer.add_image("eval/frames", strip, counters["env_steps"], dataformats="HWC")
        print(f"eval at {counters['env_steps']}: return {ret:.1f}", flush=True)
        counters["evals"] += 1
        counters["last_eval"] = counters["env_steps"]
        if args.save_model:
            write_checkpoint(with_replay=replay_due(args, counters["evals"], counters))

    progress = Progress(args, counters, args.updates_per_step / args.train_every)
    last_return = float("nan")  # of the last finished episode, for the progress line

    def show_progress(phase: str):
        progress.maybe_print(counters, phase, last_return, agent.updates,
                             pending_updates=max(args.pretrain - counters["pretrain_updates"], 0))

    obs, ep = new_episode()
    state, episode_return = None, 0.0
    phase = lambda: "prefill" if counters["agent_steps"] < args.prefill else "train"  # noqa: E731
    show_progress(phase())
    while counters["env_steps"] < args.total_steps:
        acting_start = time.perf_counter()
        if counters["agent_steps"] < args.prefill:
            action = (np.eye(action_dim, dtype=np.float32)[np.random.randint(action_dim)] if discrete
                      else np.random.uniform(-1, 1, action_dim).astype(np.float32))
        else:
            action, state = agent.act(obs, state, explore=True)
        obs, reward, terminated, truncated, info = env.step(env_action(action, discrete))
        progress.acting_time += time.perf_counter() - acting_start
        counters["agent_steps"] += 1
        counters["env_steps"] += info["env_steps"]
        episode_return += reward
        for key, value in zip(("obs", "action", "reward", "cont"), (obs, action, reward, 1.0 - terminated)):
            ep[key].append(value)
        if terminated or truncated:
            store(ep)
            last_return = episode_return
            logger.log(counters["env_steps"], {"charts/episodic_return": episode_return,
                                               "charts/episodic_length": len(ep["reward"]) - 1})
            obs, ep = new_episode()
            state, episode_return = None, 0.0
        stop_if_interrupted()

        # Train: once `prefill` steps are in, `pretrain` updates, then every `train_every` steps.
        if counters["agent_steps"] >= args.prefill and replay.can_sample(args.batch_length):
            if counters["pretrain_updates"] < args.pretrain:
                while counters["pretrain_updates"] < args.pretrain:
                    train_once()
                    counters["pretrain_updates"] += 1
                    show_progress("pretrain")
                    stop_if_interrupted()
            elif counters["agent_steps"] % args.train_every == 0:
                for _ in range(args.updates_per_step):
                    train_once()
                    stop_if_interrupted()

        if counters["env_steps"] // args.log_every != (counters["env_steps"] - info["env_steps"]) // args.log_every:
            logs = {f"losses/{k}": v for k, v in metrics.items()}
            logs.update({"charts/SPS": progress.sps(counters), "charts/updates": agent.updates})
            logger.log(counters["env_steps"], logs)
        show_progress(phase())
        if args.eval_every and counters["env_steps"] >= counters["next_eval"]:
            run_eval()
            counters["next_eval"] += args.eval_every

    check_nonfinite()
    if counters["last_eval"] != counters["env_steps"]:
        run_eval()
    stop.restore()
    env.close()
    eval_env.close()
    logger.close()
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
