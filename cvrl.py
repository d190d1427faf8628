"""CVRL: contrastive variational reinforcement learning, in one file.

Paper: Xiao Ma, Siwei Chen, David Hsu, Wee Sun Lee, "Contrastive Variational Reinforcement Learning
for Complex Observations", Conference on Robot Learning (CoRL) 2020. Authors' code (TensorFlow 2,
built on Dreamer's): https://github.com/Yusufma03/CVRL. Documentation: docs/cvrl.md.

The idea. A Dreamer-v1 world model (Gaussian RSSM) is trained without reconstructing pixels: the
observation likelihood of the ELBO is replaced by the mutual information I(s_t, o_t), estimated
with InfoNCE by scoring each (state, observation) pair of a replayed batch against all other
observations of the batch (Sec. 3.2). Behaviour is learned by a hybrid actor-critic: Dreamer's
analytic gradients of imagined lambda-returns plus SAC on the real posterior trajectories of the
replay (Sec. 3.3). Actions are chosen by latent-guided MPC: the actor's plan is refined by
gradient ascent on the imagined value (Sec. 3.4, App. A.3).

The paper, equation by equation, and where it is implemented:
- RSSM (Sec. 3.1, App. B.4): h_t = GRU(h_{t-1}, s_{t-1}, a_{t-1}), prior p(s_t | h_t), posterior
  q(s_t | h_t, o_t), diagonal Gaussians, stoch 30, deter 200: `RSSM`.
- Eq. 5, InfoNCE (App. B.1, B.5): log f(s_t, o_t) - log sum_{o' in O} f(s_t, o'), with the
  bilinear f(s, o) = exp(z_o^T W s'), z_o and s' 200-unit embeddings of the observation and the
  state, W 200 x 200, O = all B*T observations of the batch: `ContrastiveHead`, `infonce`.
- Eq. 6, CELBO: InfoNCE + ln p(r_t | s_t) - KL[q(s_t | ...) || p(s_t | s_{t-1}, a_{t-1})] (free
  nats 3): `celbo_loss`. `--objective generative` uses ln p(o_t | s_t) instead (Eq. 2, Table 2's
  CVRL-generative), `--objective reward` neither (CVRL-reward-only).
- App. A.1, latent imagination: `imagine`. App. A.2, V_lambda (Dreamer's exponentially weighted
  k-step returns): `lambda_return`.
- Eq. 7, L_Dreamer: actor -sum V_lambda (dynamics backpropagation), critic 1/2 (v - V_lambda)^2:
  `dreamer_actor_loss`, `value_loss_fn`.
- Sec. 3.3, hybrid actor-critic: L_CVRL = L_Dreamer + alpha L_SAC, SAC on real posterior
  transitions (s_t, a_t, r_{t+1}, s_{t+1}) of the batch, two Q-networks (App. B.6): `sac_q_loss`,
  `sac_actor_loss`, `Agent.sac_losses`.
- App. B.7, four optimisers (model, value, actor, SAC), every loss taken before any step:
  `Agent.update`.
- Sec. 3.4 / App. A.3 / B.8, latent-guided MPC: a~ <- a~ + lr grad_a~ V_lambda(s_t) over the whole
  15-step action sequence, starting from the actor's plan, SGD lr 0.003; execute a~_0:
  `Agent.plan`, `actor_plan`, `plan_value`, `Agent.optimise_plan`.

Shapes are time-major: replay sequences (T, B, ...), imagined rollouts (H + 1, N, ...) with
N = T * B start states. What slot t of a sequence holds, and how imagined rollouts and
lambda-returns are indexed, is stated once next to `Replay` ("Index conventions"). Images are
uint8 (3, 64, 64) until the encoder, which maps them to [-0.5, 0.5]. Everything after `main`
(logging, progress, signals, checkpoints, devices, the optimiser helper) is plumbing, the same
text in every script of this repository.

    python cvrl.py --env natural-walker-walk
    python cvrl.py --env dcs-walker-walk --distraction medium --preset small
    python cvrl.py --env toy-reach-center --preset tiny
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass
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

# Argument validation of torch.distributions checks every sample; it costs time and host syncs.
td.Distribution.set_default_validate_args(False)


# Args: the defaults are CVRL's setting for its main benchmark, Natural Mujoco (Table 1), as far as
# the paper and the authors' code give it; each docstring names its source. Where the defaults are
# NOT that setting, the defaults are kept, because changing them would change every run made so
# far and the results measured with them (docs/cvrl.md, "Deviations"):
#   - batch_size 50: the authors' code samples 60 sequences (config.batch_size = 60; the paper's
#     App. B.1 names only "B"); 50 is Dreamer-v1's.
#   - train_every 5 / updates_per_step 1: the authors' code (Dreamer-v1's loop) makes 100 updates
#     in one burst every 1000 env steps; 1 update every 5 agent steps (10 env steps at action
#     repeat 2) is the same number of updates per env step, spread out.
#   - precision fp32: the authors' code trains in mixed fp16 (config.precision = 16).
#   - replay_capacity 1e6 env steps: the authors' code (Dreamer-v1's) keeps every episode of the
#     5e6-step run; ours caps the replay (memory), so a 5e6-step run forgets its oldest 4e6 steps.
#   - the natural-* backgrounds: the paper's are ILSVRC videos (Sec. 4.1); envs' come from its
#     built-in offline pool unless --video-dir names a folder of videos.
#   - eval_episodes 10: ours (the paper averages 3 seeds and does not say how many episodes).
# And where the defaults follow the paper rather than the authors' code: the bilinear
# f(s, o) = exp(z^T W s') of App. B.5 (ContrastiveHead), SAC's actor loss applied to the actor
# (Sec. 3.3; --no-sac-updates-actor gives the authors'), MPC updating the whole plan (App. A.3;
# --mpc-first-action-only gives the authors'), SAC transitions of consecutive time steps.
@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment (part of the run name; ours: CleanRL's convention)"""
    env: str = "natural-walker-walk"
    """env id: natural-<domain>-<task> (Table 1, Natural Mujoco; the paper's main benchmark),
    pybullet-boxpush (Sec. 4.2), dmc-<domain>-<task>, dcs-<domain>-<task>, toy-reach,
    toy-reach-center (docs/envs.md)"""
    distraction: str = "none"
    """dcs-*: none | easy | medium | hard | background; other families: none (ours: natural-*
    always has its video backgrounds, Sec. 4.1)"""
    dynamic: bool = True
    """distractions move within an episode (False: static per episode; paper Sec. 4.1: videos)"""
    video_dir: Optional[str] = None
    """DAVIS 2017 or video folder for backgrounds (default: built-in offline pool; ours: the
    paper's ILSVRC videos, Sec. 4.1, are not shipped)"""
    eval_split: Literal["train", "val"] = "val"
    """background videos used for evaluation (ours: held-out videos)"""
    seed: int = 1
    """seed of the experiment (ours)"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic` (ours: CleanRL's default)"""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ... (ours)"""
    compile: bool = False
    """torch.compile the loss computations and the MPC unroll (ours: the first updates are slow)"""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """torch.compile mode (ours; CUDA: 'reduce-overhead' uses CUDA graphs; 'max-autotune' means
    max-autotune-no-cudagraphs until a GPU run has shown CUDA graphs work with it)"""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast for the networks; KL, log-probs, values and score matrices stay fp32 (ours:
    fp32; the authors' code trains in mixed fp16, config.precision = 16)"""
    preset: Literal["paper", "small", "tiny"] = "paper"
    """'paper': these defaults; 'small': the same algorithm sized for a 2-core CPU (100K steps of
    dmc-cartpole-swingup in under an hour); 'tiny': smoke tests; flags you set explicitly win
    over the preset (ours; see PRESETS)"""
    total_steps: int = 5_000_000
    """environment steps to train for, counted after action repeat (simulator steps): Table 1's
    5e6 (authors' code: steps = 5e6)"""
    action_repeat: Optional[int] = 2
    """simulator steps per action (authors' code: 2 for every task; None or 0: the per-task
    default of envs, PlaNet's: cartpole 8, walker 2, ...)"""
    eval_every: int = 10_000
    """environment steps between evaluations (0: never, except at the end; authors' code: 1e4)"""
    eval_episodes: int = 10
    """episodes per evaluation (mode actions, no exploration noise, MPC as in training; ours: the
    paper does not say)"""
    log_every: int = 1_000
    """environment steps between training-metric logs, progress lines also every 30 s (authors'
    code: 1e3)"""
    save_model: bool = False
    """write checkpoint.pt (networks, optimisers, counters, RNG states) at every evaluation, and
    replay.pt beside it at the end and every --replay-checkpoint-every evaluations (ours; an
    interrupt or a non-finite loss always writes both)"""
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
    """path of a checkpoint to continue from; its saved flags are the defaults (ours)"""
    measure_updates: int = 0
    """if > 0: time this many updates on a synthetic batch and 50 acting steps (with and without
    MPC) on --env, print one JSON line and exit (ours: benchmark.sh speed)"""
    capture_video: bool = False
    """save an mp4 of the first eval episode (runs/<run>/videos) and a frame strip to TensorBoard
    (ours)"""
    replay_device: Literal["auto", "cpu", "cuda"] = "auto"
    """where the replay's arrays live; auto = the training device when it is CUDA (ours: sampling
    is one gather there)"""

    # Replay and schedule.
    replay_capacity: int = 1_000_000
    """replay capacity in environment steps, stored per agent step as uint8 images (ours: memory;
    the authors' code keeps every episode)"""
    batch_size: int = 50
    """sequences per mini-batch (App. B.1's B; ours: Dreamer-v1's 50, the authors' code uses 60)"""
    batch_length: int = 50
    """steps per sequence (App. B.1's T; authors' code: 50); B*T - 1 negatives per pair"""
    prefill: int = 2500
    """agent steps with uniform random actions before training (authors' code: 5000 env steps)"""
    pretrain: int = 100
    """updates made once, right after the prefill (authors' code: pretrain = 100)"""
    train_every: int = 5
    """agent steps between training rounds (ours: the authors' code's 100 updates per 1000 env
    steps, at action repeat 2, spread out as one update every 5 agent steps)"""
    updates_per_step: int = 1
    """updates per training round (ours: see train_every)"""

    # World model.
    objective: Literal["contrastive", "generative", "reward"] = "contrastive"
    """contrastive: CELBO (Eq. 6); generative: pixel reconstruction ELBO (Eq. 2, Table 2's
    CVRL-generative); reward: no observation term, the latent learns from the reward and the KL
    only (Table 2's CVRL-reward-only)"""
    cnn_depth: int = 32
    """encoder channels of the first layer (doubling: 32/64/128/256, App. B.3)"""
    deter: int = 200
    """GRU (deterministic) state size (App. B.4)"""
    hidden: int = 200
    """hidden units of the RSSM's input and output layers (App. B.4)"""
    stoch: int = 30
    """Gaussian stochastic state size (App. B.4)"""
    contrast_units: int = 200
    """size of the observation and state embeddings and of W (App. B.5: 200, W 200 x 200)"""
    mlp_units: int = 400
    """units of the reward, value, actor and Q MLPs (App. B.6)"""
    free_nats: float = 3.0
    """free nats, applied to the batch-mean KL (authors' code: free_nats = 3)"""
    kl_scale: float = 1.0
    """weight of the KL term (authors' code: kl_scale = 1; Eq. 6 has none)"""
    model_lr: float = 6e-4
    """world-model learning rate (App. B.7)"""

    # Behaviour.
    horizon: int = 15
    """imagination (and MPC) horizon H (App. B.8: 15; authors' code: horizon = 15)"""
    gamma: float = 0.99
    """discount (authors' code: discount = 0.99)"""
    return_lambda: float = 0.95
    """lambda of V_lambda (App. A.2; authors' code: disclam = 0.95)"""
    actor_lr: float = 8e-5
    """actor learning rate (App. B.7)"""
    value_lr: float = 8e-5
    """value learning rate (App. B.7)"""
    sac: bool = True
    """hybrid actor-critic: add alpha * L_SAC on real trajectories (Sec. 3.3; False: CVRL-no-SAC,
    Table 2)"""
    sac_weight: float = 1.0
    """alpha of L_CVRL = L_Dreamer + alpha L_SAC (Sec. 3.3). Ours: the paper gives no value and the
    authors' code never applies L_SAC to the actor, so there is none to copy; 1 weighs both equally"""
    sac_updates_actor: bool = True
    """SAC's actor loss updates the actor (Sec. 3.3, B.7). False reproduces one thing of the authors'
    code: their SAC actor (and temperature) losses are computed but never applied, so only the
    Q-nets learn from SAC. It does not reproduce the rest of their SAC: their temperature is fixed
    at 1 (that is our default, --learn-temperature off) and their transitions pair batch rows
    (s of sequence b with s of sequence b + 1), not consecutive time steps as here"""
    q_lr: float = 8e-5
    """Q-network learning rate (App. B.7's SAC optimiser)"""
    learn_temperature: bool = False
    """tune the SAC temperature towards entropy -|A| (SAC v2). Off: fixed at init_temperature, as
    the authors' code (the paper does not say; B.7's SAC optimiser trains the actor and Q-nets only)"""
    temperature_lr: float = 3e-4
    """SAC temperature learning rate, with --learn-temperature (ours: SAC v2's 3e-4)"""
    init_temperature: float = 1.0
    """SAC entropy temperature (authors' code: 1, never updated)"""
    tau: float = 0.005
    """Polyak rate of the target Q-networks (authors' code, soft_actor_critic.py: tau = 5e-3)"""
    mpc: bool = True
    """latent-guided MPC for acting (Sec. 3.4; False: CVRL-no-MPC, Table 2: act with the actor
    alone)"""
    mpc_iterations: int = 1
    """gradient-ascent steps on the action sequence per acting step: App. A.3's one update of the
    whole sequence ("repeat this for all actions and return the first action after update"), as the
    authors' code; more is ours"""
    mpc_lr: float = 0.003
    """SGD learning rate of the MPC (App. B.8)"""
    mpc_first_action_only: bool = False
    """update only the first action of the plan (the authors' code; with --mpc-iterations 1 it is
    their planner). The paper (App. A.3) updates the whole sequence, the default"""
    expl_noise: float = 0.3
    """std of the additive Gaussian exploration noise on the executed action, clipped to [-1, 1]
    (authors' code: expl_amount = 0.3)"""
    adam_eps: float = 1e-5
    """Adam epsilon (ours: the paper does not say; the authors' code keeps TensorFlow's default)"""
    grad_clip: float = 100.0
    """gradient-norm clip of every optimiser (authors' code: grad_clip = 100)"""


# Every other setting is a dict of overrides of the Args defaults (flags you set still win); the
# run header prints the overrides applied.
# 'small': the same algorithm sized for a 2-core CPU, 100K env steps of dmc-cartpole-swingup in
#   under an hour (docs/cvrl.md, "Presets"); values measured on one CPU thread:
#   - action_repeat 0: the env's per-task repeat (PlaNet's, 8 for cartpole), the DMC-100K setting;
#     a frame costs ~20-30 ms to render here.
#   - 16-channel CNN, 128-unit GRU/MLPs and score layers, 16 latents: 0.74M parameters.
#   - batch 16 x 16 every 3 agent steps (0.6 s an update on one thread: 3,933 updates in
#     100K env steps), prefill 1000 steps. An update every 5 steps (2,400) ended at 234 +- 21 over
#     three seeds, every 3 at 266 +- 25 (results/cpu; the former runs: results/cpu/variants).
#   - learning rates of the actor, value and Q networks raised to 3e-4, as for few, small updates.
# 'tiny': runs end to end in well under a minute on 2 CPU cores (smoke tests).
PRESETS = {
    "small": dict(action_repeat=0, cnn_depth=16, deter=128, hidden=128, stoch=16, contrast_units=128,
                  mlp_units=128, batch_size=16, batch_length=16, train_every=3, prefill=1000,
                  actor_lr=3e-4, value_lr=3e-4, q_lr=3e-4, total_steps=100_000,
                  eval_episodes=5, replay_capacity=100_000),
    "tiny": dict(cnn_depth=4, deter=32, hidden=32, stoch=4, contrast_units=16, mlp_units=32,
                 batch_size=4, batch_length=8, prefill=100, pretrain=2, horizon=5, mpc_iterations=2,
                 total_steps=2000, eval_every=1000, eval_episodes=1, replay_capacity=100_000),
}

# Flags that may differ from the checkpoint's on --resume: they change the schedule, the logging
# or the hardware, not the algorithm. Script-specific: replay_device (where the same data lives),
# compile_mode (same numbers as plain compile up to float rounding).
SCHEDULE_FLAGS = {"total_steps", "eval_every", "eval_episodes", "log_every", "save_model",
                  "checkpoint_replay", "replay_checkpoint_every", "resume", "capture_video", "device",
                  "compile", "precision",
                  "measure_updates", "exp_name", "compile_mode", "replay_device"}


def preset_args(preset: str = "paper", **overrides) -> Args:
    """Args with a preset's values as defaults; `overrides` (and CLI flags) win over them."""
    if preset not in ("paper", *PRESETS):
        raise ValueError(f"unknown preset {preset!r}; known: paper, {', '.join(PRESETS)}")
    return Args(**{**PRESETS.get(preset, {}), **overrides, "preset": preset})


def preset_overrides(args: Args) -> str:
    """For the run header: the preset and the overrides of the Args defaults it applied (those a
    flag did not replace)."""
    applied = {k: v for k, v in PRESETS.get(args.preset, {}).items() if getattr(args, k) == v}
    if not applied:
        return f"preset {args.preset}: the Args defaults"
    return f"preset {args.preset}: " + ", ".join(f"{k}={v}" for k, v in applied.items())


def _flag_value(argv: list[str], flag: str) -> Optional[str]:
    """The value of `--name v` or `--name=v` in argv (the last one, as the parser takes it)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def parse_args(argv=None) -> Args:
    """Parse flags over the preset's defaults, or with --resume over the checkpoint's saved args
    (so `--resume P` alone continues the same run); only SCHEDULE_FLAGS may then differ."""
    argv = list(sys.argv[1:] if argv is None else argv)
    resume = _flag_value(argv, "--resume")
    if resume is None:
        preset = _flag_value(argv, "--preset") or "paper"
        default = preset_args(preset) if preset in ("paper", *PRESETS) else Args()
        return tyro.cli(Args, args=argv, default=default)
    if not Path(resume).is_file():
        raise SystemExit(f"error: --resume {resume}: no such checkpoint file")
    saved = torch.load(resume, map_location="cpu", weights_only=False, mmap=True)["args"]
    names = {f.name for f in dataclasses.fields(Args)}
    args = tyro.cli(Args, args=argv, default=Args(**{k: v for k, v in saved.items() if k in names}))
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (checkpoint {saved[k]})"
               for k in sorted(names - SCHEDULE_FLAGS) if k in saved and getattr(args, k) != saved[k]]
    if changed:
        raise SystemExit("error: --resume: these flags differ from the checkpoint's and change the "
                         f"algorithm: {', '.join(changed)}; drop them or start a new run")
    return args


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


class MLP(nn.Sequential):
    """`layers` hidden ELU layers of `units`, then a linear output (Dreamer-v1's dense heads). The output layer runs
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
    """App. B.3: 4 convs, kernel 4, stride 2, ReLU, 32/64/128/256 channels:
    (…, 3, 64, 64) -> (…, 1024)."""

    def __init__(self, depth: int):
        super().__init__()
        chans = [3, depth, 2 * depth, 4 * depth, 8 * depth]
        self.net = nn.Sequential(*[m for i in range(4) for m in
                                   (nn.Conv2d(chans[i], chans[i + 1], 4, 2), nn.ReLU())])
        self.out_dim = 8 * depth * 2 * 2

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.reshape(-1, *obs.shape[-3:]).float() / 255.0 - 0.5
        return self.net(x).reshape(*obs.shape[:-3], -1)


class Decoder(nn.Module):
    """Dreamer-v1's transposed-conv decoder (ReLU), only for `--objective generative`."""

    def __init__(self, feat_dim: int, depth: int):
        super().__init__()
        self.depth = depth
        self.linear = nn.Linear(feat_dim, 32 * depth)
        chans, kernels = [32 * depth, 4 * depth, 2 * depth, depth, 3], [5, 5, 6, 6]
        layers = []
        for i, k in enumerate(kernels):
            layers.append(nn.ConvTranspose2d(chans[i], chans[i + 1], k, 2))
            if i < 3:
                layers.append(nn.ReLU())
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


class RSSM(nn.Module):
    """Recurrent state-space model with diagonal Gaussian stochastic states (Sec. 3.1, App. B.4).

    A state is a dict: deter h (…, deter), stoch s sample (…, stoch), mean and std (…, stoch) of the
    distribution the sample came from. The posterior's first layer W [h, e] + b is split into
    W_h h (inside the time loop) and W_e e + b (for all steps at once, `embed_proj`).
    """

    def __init__(self, embed_dim: int, action_dim: int, deter: int, hidden: int, stoch: int):
        super().__init__()
        self.deter, self.stoch = deter, stoch
        self.img_in = nn.Sequential(nn.Linear(stoch + action_dim, hidden), nn.ELU())
        self.cell = nn.GRUCell(hidden, deter)
        self.img_out = nn.Sequential(nn.Linear(deter, hidden), nn.ELU(),
                                     nn.Linear(hidden, 2 * stoch))  # prior p(s_t | h_t)
        self.obs_deter = nn.Linear(deter, hidden, bias=False)  # posterior q(s_t | h_t, o_t): W_h h
        self.obs_embed = nn.Linear(embed_dim, hidden)  # W_e e + b
        self.obs_out = nn.Linear(hidden, 2 * stoch)

    @property
    def feat_dim(self) -> int:
        return self.deter + self.stoch

    def initial(self, batch: int, device) -> dict:
        zeros = torch.zeros(batch, self.stoch, device=device)
        return dict(deter=torch.zeros(batch, self.deter, device=device), stoch=zeros, mean=zeros,
                    std=torch.ones_like(zeros))

    def _gaussian(self, out: torch.Tensor, deter: torch.Tensor, noise=None) -> dict:
        """Dreamer-v1: std = softplus(x) + 0.1; reparameterised sample (noise ~ N(0, I) if given)."""
        mean, std = out.float().chunk(2, -1)
        std = F.softplus(std) + 0.1
        noise = torch.randn_like(mean) if noise is None else noise
        return dict(deter=deter, stoch=mean + std * noise, mean=mean, std=std)

    def img_step(self, state: dict, action: torch.Tensor, noise=None) -> dict:
        """Prior step: h_t = GRU(h_{t-1}, [s_{t-1}, a_{t-1}]), s_t ~ p(s_t | h_t)."""
        deter = self._deter_step(state, action)
        return self._gaussian(self.img_out(deter), deter, noise)

    def _deter_step(self, state: dict, action: torch.Tensor) -> torch.Tensor:
        x = self.img_in(torch.cat([state["stoch"], action], -1).to(state["deter"].dtype))
        return self.cell(x, state["deter"]).float()

    def _posterior(self, deter, embed_proj, noise=None) -> dict:
        return self._gaussian(self.obs_out(F.elu(self.obs_deter(deter) + embed_proj)), deter, noise)

    def obs_step(self, state: dict, action: torch.Tensor, embed: torch.Tensor, noise=None):
        """One filtering step (acting): prior step, then s_t ~ q(s_t | h_t, e_t)."""
        prior = self.img_step(state, action)
        return self._posterior(prior["deter"], self.obs_embed(embed), noise), prior

    def observe(self, embed: torch.Tensor, action: torch.Tensor, noise=None):
        """Filter sequences from the zero state. embed (T, B, E); action (T, B, A) is a_{t-1}, the
        action that led to observation t; noise (T, B, stoch) optional. Only the GRU and W_h h stay
        in the loop; the prior head runs once on all h_t afterwards. Returns posteriors and prior
        statistics as dicts of (T, B, ...)."""
        embed_proj = self.obs_embed(embed)  # (T, B, hidden), all steps at once
        state = self.initial(embed.shape[1], embed.device)
        posts = []
        for t in range(embed.shape[0]):
            deter = self._deter_step(state, action[t])
            state = self._posterior(deter, embed_proj[t], None if noise is None else noise[t])
            posts.append(state)
        post = {k: torch.stack([s[k] for s in posts]) for k in posts[0]}
        mean, std = self.img_out(post["deter"]).float().chunk(2, -1)  # prior p(s_t | h_t)
        return post, dict(mean=mean, std=F.softplus(std) + 0.1)

    @staticmethod
    def feat(state: dict) -> torch.Tensor:
        """Model state [s_t, h_t] fed to every head: (…, stoch + deter)."""
        return torch.cat([state["stoch"], state["deter"]], -1)


class ContrastiveHead(nn.Module):
    """App. B.5: log f(s, o) = z_o^T W s' with z_o = ELU(Linear_200(e_o)), s' = ELU(Linear_200([s, h])),
    W 200 x 200. The authors' code uses two ELU layers per side (the observation side 400 then 200
    units) and a plain dot product z^T s' without W; the paper's bilinear form is used here."""

    def __init__(self, embed_dim: int, feat_dim: int, units: int):
        super().__init__()
        self.obs = nn.Sequential(nn.Linear(embed_dim, units), nn.ELU())
        self.state = nn.Sequential(nn.Linear(feat_dim, units), nn.ELU())
        self.W = nn.Parameter(torch.empty(units, units))
        nn.init.xavier_uniform_(self.W)

    def forward(self, feat: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """Score matrix (N, N) in fp32: row i = state i, column j = observation j."""
        s, z = self.state(feat.flatten(0, -2)), self.obs(embed.flatten(0, -2))
        with torch.autocast(feat.device.type, enabled=False):
            return (s.float() @ self.W.float().T) @ z.float().T  # s'_i^T W^T z_j = z_j^T W s'_i


class TanhNormal:
    """Dreamer-v1's actor distribution: a = tanh(u), u ~ N(mean, std). Log-probs in fp32 via the
    change of variables ln|d tanh(u)/du| = 2 (ln 2 - u - softplus(-2u))."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean, std

    def rsample_with_log_prob(self):
        u = self.mean + self.std * torch.randn_like(self.mean)
        log_prob = (-0.5 * ((u - self.mean) / self.std) ** 2 - self.std.log()
                    - 0.5 * math.log(2 * math.pi) - 2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
        return torch.tanh(u), log_prob

    def rsample(self) -> torch.Tensor:
        return torch.tanh(self.mean + self.std * torch.randn_like(self.mean))

    def mode(self) -> torch.Tensor:
        # Dreamer-v1 takes the most likely of 100 samples; tanh of the Gaussian's mode is the
        # deterministic choice here (no sampling at evaluation).
        return torch.tanh(self.mean)


class Actor(nn.Module):
    """App. B.6: 4 ELU layers of 400 on [s, h]; mean 5 tanh(x / 5), std softplus(x + c) + 1e-4 with
    c such that the initial std is 5 (Dreamer-v1's tanh_normal)."""

    def __init__(self, feat_dim: int, action_dim: int, units: int):
        super().__init__()
        self.net = MLP(feat_dim, 2 * action_dim, units, 4)
        self.raw_init_std = math.log(math.exp(5.0) - 1)

    def forward(self, feat: torch.Tensor) -> TanhNormal:
        mean, std = self.net(feat).float().chunk(2, -1)
        return TanhNormal(5 * torch.tanh(mean / 5), F.softplus(std + self.raw_init_std) + 1e-4)


class QNetworks(nn.Module):
    """App. B.6: two Q-networks, 3 ELU layers of 400 on [s, h, a]."""

    def __init__(self, feat_dim: int, action_dim: int, units: int):
        super().__init__()
        self.q1 = MLP(feat_dim + action_dim, 1, units, 3)
        self.q2 = MLP(feat_dim + action_dim, 1, units, 3)

    def forward(self, feat: torch.Tensor, action: torch.Tensor):
        x = torch.cat([feat, action.to(feat.dtype)], -1)
        return self.q1(x).squeeze(-1).float(), self.q2(x).squeeze(-1).float()


class WorldModel(nn.Module):
    """Encoder, RSSM, reward model p(r_t | s_t, h_t) (2 ELU layers of 400, as the authors' code), and
    the observation model: the contrastive head (CELBO) or the pixel decoder (generative ELBO)."""

    def __init__(self, args: Args, action_dim: int):
        super().__init__()
        self.encoder = Encoder(args.cnn_depth)
        self.rssm = RSSM(self.encoder.out_dim, action_dim, args.deter, args.hidden, args.stoch)
        feat = self.rssm.feat_dim
        self.reward = MLP(feat, 1, args.mlp_units, 2)
        if args.objective == "contrastive":
            self.contrastive = ContrastiveHead(self.encoder.out_dim, feat, args.contrast_units)
        elif args.objective == "reward":  # CVRL-reward-only: no observation model
            pass
        else:
            self.decoder = Decoder(feat, args.cnn_depth)


# ---------------------------------------------------------------------------------------------
# Replay buffer, and the index conventions of the whole file
# ---------------------------------------------------------------------------------------------
#
# Index conventions, in the paper's notation (Eq. 6: r_t ~ p(r_t | s_t), s_t ~ p(s_t | s_{t-1},
# a_{t-1}); App. A.1: imagined s~_tau, a~_tau, r~_tau for tau = t .. t+H):
#
#   Replay, slot t of an episode (and of a sampled sequence, (T, B, ...) time-major):
#       obs[t]    = o_t
#       action[t] = a_{t-1}, the action that led to o_t (zeros at the episode's first slot)
#       reward[t] = r_t, the reward received on arriving at o_t (0 at the first slot)
#       cont[t]   = 0 if the episode terminated at o_t, else 1
#     so the RSSM filters with action[t] (h_t = GRU(h_{t-1}, s_{t-1}, a_{t-1})) and the reward
#     head at slot t predicts reward[t] from s_t (Eq. 6). A sequence starts from the zero state.
#   SAC's transitions (s_t, a_t, r_{t+1}, s_{t+1}) pair slot t with slot t+1: states feat[:-1] and
#     feat[1:], and action[1:], reward[1:], cont[1:] (slot t+1 holds a_t and r_{t+1}).
#   Imagination from a start state s~_t (= a posterior s_t of the batch), k = 0 .. H:
#       feats[k]   = s~_{t+k}            (H+1, N, F), feats[0] the start
#       actions[k] = a~_{t+k} ~ pi(s~_{t+k}), k < H       (H, N, A)
#     rewards and values are taken on feats[1:], so reward[k] = r~_{t+k+1} and
#     value[k] = v(s~_{t+k+1}) (the "value[t] = v(s_{t+1})").
#   lambda_return(reward, value)[k] = V_lambda(s~_{t+k}), k = 0 .. H-1 (App. A.2): returns[0] is
#     V_lambda(s_t) of the start, which MPC maximises; returns line up with feats[:-1].


class Replay:
    """Whole episodes in a flat ring of uint8 images; uniform sampling of in-episode sequences.

    Slot t of an episode holds o_t, a_{t-1}, r_t and cont_t (index conventions above). A sequence
    never crosses an episode boundary, so the RSSM starts each one from zeros.
    The arrays are torch tensors on `device` (the GPU for CUDA training: sampling is one gather
    there); start indices are drawn with numpy on the host and sent as one small tensor.
    """

    def __init__(self, capacity: int, obs_shape, action_dim: int, seed: int, device=torch.device("cpu")):
        self.capacity, self.device = capacity, torch.device(device)
        if self.device.type == "cpu":  # numpy zeros: pages are allocated as they fill
            zeros = lambda shape, dt: torch.from_numpy(np.zeros(shape, dt))  # noqa: E731
            self.obs = zeros((capacity, *obs_shape), np.uint8)
            self.action, self.reward = zeros((capacity, action_dim), np.float32), zeros(capacity, np.float32)
        else:
            self.obs = torch.zeros((capacity, *obs_shape), dtype=torch.uint8, device=self.device)
            self.action = torch.zeros((capacity, action_dim), device=self.device)
            self.reward = torch.zeros(capacity, device=self.device)
        self.cont = torch.ones(capacity, device=self.device)
        self.episode = np.full(capacity, -1, np.int64)  # episode id per slot (host), -1 = empty
        self.pos = self.size = self.episodes = 0
        self.rng = np.random.default_rng(seed)
        self._starts_length, self._starts = None, np.zeros(0, np.int64)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() for a in (self.obs, self.action, self.reward, self.cont))

    def add_episode(self, obs, action, reward, cont):
        n = len(obs)
        if n > self.capacity:
            raise ValueError(f"episode of {n} steps does not fit a replay of {self.capacity}")
        idx = (self.pos + np.arange(n)) % self.capacity
        t = torch.from_numpy(idx).to(self.device)
        for key, value, dtype in (("obs", obs, np.uint8), ("action", action, np.float32),
                                  ("reward", reward, np.float32), ("cont", cont, np.float32)):
            getattr(self, key)[t] = torch.from_numpy(np.asarray(value, dtype)).to(self.device)
        self.episode[idx] = self.episodes
        self.episodes += 1
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self._starts_length = None

    def valid_starts(self, length: int) -> np.ndarray:
        """Slots i such that i .. i+length-1 lie in one stored episode."""
        if self._starts_length != length:
            last = np.roll(self.episode, -(length - 1))
            ok = (self.episode >= 0) & (self.episode == last)
            ok &= (np.arange(self.capacity) + length - 1 < self.capacity) | (self.size == self.capacity)
            self._starts, self._starts_length = np.flatnonzero(ok), length
        return self._starts

    def can_sample(self, length: int) -> bool:
        return len(self.valid_starts(length)) > 0

    def sample(self, batch: int, length: int, device) -> dict:
        """Device tensors, time-major: obs (T, B, 3, H, W) uint8, action (T, B, A), reward, cont."""
        starts = self.rng.choice(self.valid_starts(length), size=batch)
        idx = to_device_async((starts[None, :] + np.arange(length)[:, None]) % self.capacity, self.device)
        return {k: getattr(self, k)[idx].to(device, non_blocking=True)
                for k in ("obs", "action", "reward", "cont")}

    def state_dict(self) -> dict:
        n = self.size
        return dict({k: getattr(self, k)[:n].cpu().numpy() for k in ("obs", "action", "reward", "cont")},
                    episode=self.episode[:n].copy(), pos=self.pos, size=n, episodes=self.episodes,
                    rng=self.rng.bit_generator.state)

    def load_state_dict(self, state: dict):
        n = state["size"]
        for key in ("obs", "action", "reward", "cont"):
            getattr(self, key)[:n] = torch.from_numpy(state[key]).to(self.device)
        self.episode[:n] = state["episode"]
        self.pos, self.size, self.episodes = state["pos"], n, state["episodes"]
        self.rng.bit_generator.state = state["rng"]
        self._starts_length = None


# ---------------------------------------------------------------------------------------------
# World-model objective: CELBO (Eq. 6)
# ---------------------------------------------------------------------------------------------


def infonce(scores: torch.Tensor) -> torch.Tensor:
    """Eq. 5 per pair: log f(s_i, o_i) - log sum_j f(s_i, o_j) for scores[i, j] = log f(s_i, o_j),
    the positive on the diagonal and every other observation of the batch a negative (App. B.1).
    Each term is <= 0; log N + its mean is the InfoNCE lower bound on I(s, o), <= log N."""
    scores = scores.float()
    return scores.diagonal() - torch.logsumexp(scores, 1)


def gaussian_kl(post: dict, prior: dict) -> torch.Tensor:
    """KL[q(s_t | h_t, o_t) || p(s_t | h_t)] summed over the state, in fp32: (T, B)."""
    q = td.Independent(td.Normal(post["mean"].float(), post["std"].float()), 1)
    p = td.Independent(td.Normal(prior["mean"].float(), prior["std"].float()), 1)
    return td.kl_divergence(q, p)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """ln N(x; mean, 1), written out (no Python-scalar scale tensor: no host copy on CUDA)."""
    return -0.5 * (x.float() - mean.float()) ** 2 - 0.5 * math.log(2 * math.pi)


def celbo_loss(wm: WorldModel, batch: dict, args: Args):
    """Eq. 6, negated: -(InfoNCE + ln p(r_t | s_t) - max(KL, free nats)), each a mean over (t, b)
    as in the authors' code. With `--objective generative`, ln p(o_t | s_t) (Eq. 2) replaces
    InfoNCE. Returns (loss, posterior states (T, B, ...), metrics)."""
    embed = wm.encoder(batch["obs"])  # (T, B, E)
    post, prior = wm.rssm.observe(embed, batch["action"])
    feat = RSSM.feat(post)  # (T, B, F)
    metrics = {}
    if args.objective == "reward":  # Table 2, CVRL-reward-only: no observation term
        observation_term = torch.zeros((), device=feat.device)
    elif args.objective == "contrastive":
        scores = wm.contrastive(feat, embed)  # (T*B, T*B)
        observation_term = infonce(scores).mean()
        metrics["infonce_bound"] = math.log(scores.shape[0]) + observation_term.detach()
        metrics["contrastive_accuracy"] = (scores.argmax(1) == torch.arange(
            scores.shape[0], device=scores.device)).float().mean()
    else:
        target = batch["obs"].float() / 255.0 - 0.5
        observation_term = gaussian_log_prob(target, wm.decoder(feat)).sum((-3, -2, -1)).mean()
    reward_term = gaussian_log_prob(batch["reward"], wm.reward(feat).squeeze(-1)).mean()
    kl = gaussian_kl(post, prior).mean()
    loss = -observation_term - reward_term + args.kl_scale * kl.clamp_min(args.free_nats)
    metrics.update(observation_loss=-observation_term.detach(), reward_loss=-reward_term.detach(),
                   kl=kl.detach(), model_loss=loss.detach())
    return loss, post, metrics


# ---------------------------------------------------------------------------------------------
# Behaviour: imagination, V_lambda, hybrid actor-critic, latent-guided MPC
# ---------------------------------------------------------------------------------------------


def lambda_return(reward: torch.Tensor, value: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """App. A.2, recursively: V_lambda(s_k) = r_{k+1} + gamma ((1 - lam) v(s_{k+1})
    + lam V_lambda(s_{k+1})), with V_lambda(s_H) = v(s_H). reward[k] = r_{k+1} and value[k] =
    v(s_{k+1}), (H, N), of the states s_1..s_H reached; returns V_lambda(s_0..s_{H-1}), (H, N)."""
    last, returns = value[-1], []  # v(s_H)
    for t in reversed(range(reward.shape[0])):
        # value[t] = v(s_{t+1}); `last` = V_lambda(s_{t+1}) (at t = H-1: bootstrap with v(s_H) alone)
        nxt = value[t] if t == reward.shape[0] - 1 else (1 - lam) * value[t] + lam * last
        last = reward[t] + gamma * nxt  # V_lambda(s_t), reward[t] = r_{t+1}
        returns.append(last)
    return torch.stack(returns[::-1])


def imagine(wm: WorldModel, actor: Actor, start: dict, horizon: int):
    """App. A.1: s~_tau ~ p(s~_tau | s~_{tau-1}, a~_{tau-1}), a~_tau ~ q(a~ | s~_tau). feats[k] =
    s~_{t+k}, (H+1, N, F) including the start; actions[k] = a~_{t+k}, (H, N, A). The actor sees
    detached states (Dreamer); gradients flow through the dynamics into the actions."""
    state, feats, actions = start, [RSSM.feat(start)], []
    for _ in range(horizon):
        action = actor(feats[-1].detach()).rsample()
        state = wm.rssm.img_step(state, action)
        feats.append(RSSM.feat(state))
        actions.append(action)
    return torch.stack(feats), torch.stack(actions)


def dreamer_actor_loss(wm: WorldModel, actor: Actor, value: nn.Module, post: dict, args: Args):
    """Eq. 7, actor part, on imagined rollouts from every posterior state: -V_lambda weighted by the
    discount so far (Dreamer-v1). Returns the loss, the imagined states and V_lambda (detached, for
    the critic), metrics."""
    start = {k: v.detach().flatten(0, 1) for k, v in post.items()}  # every s_t of the batch, (T*B, ...)
    feats, _ = imagine(wm, actor, start, args.horizon)  # s~_t .. s~_{t+H}, (H+1, N, F)
    reward = wm.reward(feats[1:]).squeeze(-1).float()  # r~_{t+1} .. r~_{t+H}, (H, N)
    # value of s~_{t+1} .. s~_{t+H}; returns: V_lambda(s~_t) .. V_lambda(s~_{t+H-1}), (H, N)
    returns = lambda_return(reward, value(feats[1:]).squeeze(-1).float(), args.gamma, args.return_lambda)
    loss = -(discount_weights(args, reward) * returns).mean()  # gamma^k weighs V_lambda(s~_{t+k})
    metrics = dict(dreamer_actor_loss=loss.detach(), imagined_reward=reward.mean().detach(),
                   lambda_return=returns.mean().detach())
    return loss, feats[:-1].detach(), returns.detach(), metrics  # s~_t .. s~_{t+H-1}: the critic's inputs


def discount_weights(args: Args, like: torch.Tensor) -> torch.Tensor:
    """gamma^k for k = 0 .. H-1, (H, 1): the weight of V_lambda(s~_{t+k}); imagined steps further
    ahead count less (Dreamer-v1)."""
    return (args.gamma ** torch.arange(args.horizon, device=like.device, dtype=torch.float32))[:, None]


def value_loss_fn(value: nn.Module, feats: torch.Tensor, returns: torch.Tensor, args: Args):
    """Eq. 7, critic part: 1/2 (v(s~_tau) - sg(V_lambda(s~_tau)))^2, discount-weighted; feats and
    returns are s~_t .. s~_{t+H-1} and their V_lambda, (H, N)."""
    v = value(feats).squeeze(-1).float()
    return (discount_weights(args, v) * 0.5 * (v - returns) ** 2).mean()


def sac_q_loss(actor: Actor, q: QNetworks, target_q: QNetworks, log_temperature: torch.Tensor,
               feat: torch.Tensor, batch: dict, args: Args):
    """SAC [33] critic on the real posterior trajectory of the batch (Sec. 3.3): transitions
    (s_t, a_t, r_{t+1}, s_{t+1}); slot t+1 of the batch holds a_t and r_{t+1}. States are detached:
    SAC trains the actor, the Q-nets and the temperature, not the world model."""
    feat = feat.detach()
    s, s_next = feat[:-1], feat[1:]  # s_t, s_{t+1} for t = 0 .. T-2
    action, reward, cont = batch["action"][1:], batch["reward"][1:], batch["cont"][1:]  # a_t, r_{t+1}, cont_{t+1}
    with torch.no_grad():
        next_action, next_log_prob = actor(s_next).rsample_with_log_prob()
        target = torch.min(*target_q(s_next, next_action)) - log_temperature.exp() * next_log_prob
        y = reward.float() + args.gamma * cont.float() * target
    q1, q2 = q(s, action)
    loss = 0.5 * ((q1 - y) ** 2 + (q2 - y) ** 2).mean()
    return loss, dict(q_loss=loss.detach(), q=q1.mean().detach())


def sac_actor_loss(actor: Actor, q: QNetworks, log_temperature: torch.Tensor, feat: torch.Tensor):
    """SAC's policy loss on the real states: temperature ln pi(a|s) - min_i Q_i(s, a), a ~ pi.
    Returns the loss and ln pi (detached, for the temperature loss)."""
    # s_t for t = 0 .. T-2, the states sac_q_loss trains Q on (the last has no successor there)
    action, log_prob = actor(feat[:-1].detach()).rsample_with_log_prob()
    loss = (log_temperature.exp().detach() * log_prob - torch.min(*q(feat[:-1].detach(), action))).mean()
    return loss, log_prob.detach()


def plan_value(wm: WorldModel, value: nn.Module, start: dict, actions: torch.Tensor, noise: torch.Tensor,
               gamma: float, lam: float) -> torch.Tensor:
    """V_lambda(s_t) of an action sequence (H, N, A) from start states, with fixed state noise
    (H, N, stoch) so that the objective is a deterministic function of the actions: (N,)."""
    state, feats = start, []
    for t in range(actions.shape[0]):
        state = wm.rssm.img_step(state, actions[t], noise[t])  # a~_t -> s~_{t+1}
        feats.append(RSSM.feat(state))
    feats = torch.stack(feats)  # s~_1 .. s~_H (no start: it has no reward of its own here)
    reward = wm.reward(feats).squeeze(-1).float()  # r~_1 .. r~_H
    return lambda_return(reward, value(feats).squeeze(-1).float(), gamma, lam)[0]  # V_lambda(s_0)


def actor_plan(wm: WorldModel, actor: Actor, start: dict, noise: torch.Tensor, explore: bool):
    """The actor's plan: roll the prior under the actor (samples, or modes at evaluation)."""
    state, actions = start, []
    for t in range(noise.shape[0]):
        dist = actor(RSSM.feat(state))
        actions.append(dist.rsample() if explore else dist.mode())
        state = wm.rssm.img_step(state, actions[-1], noise[t])
    return torch.stack(actions)  # a~_t .. a~_{t+H-1}, (H, N, A)


# ---------------------------------------------------------------------------------------------
# Agent: one update, acting
# ---------------------------------------------------------------------------------------------

# The per-update non-finite flags (`Agent.nonfinite`), one per loss, in the order of the optimisers.
LOSS_NAMES = ("model_loss", "actor_loss", "value_loss", "q_loss", "temperature_loss")


class Agent:
    """The world model, the actor, the value, SAC's Q-nets (and targets) and their optimisers;
    `update` is one training step (App. B.7), `act` one acting step with latent-guided MPC."""

    def __init__(self, args: Args, action_dim: int, device: torch.device):
        self.args, self.device, self.action_dim = args, device, action_dim
        self.wm = WorldModel(args, action_dim).to(device)
        feat = self.wm.rssm.feat_dim
        self.actor = Actor(feat, action_dim, args.mlp_units).to(device)
        self.value = MLP(feat, 1, args.mlp_units, 3).to(device)
        self.q = QNetworks(feat, action_dim, args.mlp_units).to(device)
        self.target_q = QNetworks(feat, action_dim, args.mlp_units).to(device)
        self.target_q.load_state_dict(self.q.state_dict())
        self.target_q.requires_grad_(False)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(args.init_temperature), device=device))
        self.target_entropy = -float(action_dim)
        # App. B.7: separate optimisers for the model, the value, the actor and SAC's Q-nets (and
        # the temperature with --learn-temperature); `opts`: those this run steps, by their loss.
        opt = lambda name, params, lr: Optimizer(name, params, lr, args.adam_eps, args.grad_clip)  # noqa: E731
        self.model_opt = opt("model", self.wm.parameters(), args.model_lr)
        self.value_opt = opt("value", self.value.parameters(), args.value_lr)
        self.actor_opt = opt("actor", self.actor.parameters(), args.actor_lr)
        self.q_opt = opt("q", self.q.parameters(), args.q_lr)
        self.temperature_opt = opt("temperature", [self.log_temperature], args.temperature_lr)
        self.opts = dict(model_loss=self.model_opt, actor_loss=self.actor_opt, value_loss=self.value_opt)
        if args.sac:
            self.opts["q_loss"] = self.q_opt
            if args.sac_updates_actor and args.learn_temperature:
                self.opts["temperature_loss"] = self.temperature_opt
        self.updates = 0
        # Once an update has a non-finite loss, every later one is skipped too (a device flag): the
        # main loop reads the flags one update late, without waiting for the GPU, and then stops.
        self.halted = torch.zeros((), device=device)
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
        self._model_loss, self._dreamer_actor_loss = celbo_loss, dreamer_actor_loss
        self._value_loss = value_loss_fn
        self._sac_q_loss, self._sac_actor_loss, self._plan_value = sac_q_loss, sac_actor_loss, plan_value
        self.cudagraphs = args.compile and args.compile_mode == "reduce-overhead"
        if args.compile:
            mode = {"default": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(
                args.compile_mode, args.compile_mode)
            compile_fn = lambda fn: torch.compile(fn, dynamic=False, mode=mode)  # noqa: E731
            for name in ("_model_loss", "_dreamer_actor_loss", "_value_loss", "_sac_q_loss",
                         "_sac_actor_loss", "_plan_value"):
                setattr(self, name, compile_fn(getattr(self, name)))

    def sac_losses(self, feat: torch.Tensor, batch: dict, actor_loss: torch.Tensor, metrics: dict):
        """Sec. 3.3, the hybrid actor-critic: SAC on the real posterior states `feat` (T, B, F) of
        the batch. Returns L_Dreamer's actor loss plus alpha times SAC's actor part (Sec. 3.3:
        L_CVRL = L_Dreamer + alpha L_SAC), SAC's Q loss and the temperature loss (zeros without
        SAC); adds SAC's metrics to `metrics`."""
        args = self.args
        q_loss = temperature_loss = torch.zeros((), device=self.device)
        if not args.sac:
            return actor_loss, q_loss, temperature_loss
        q_loss, m = self._sac_q_loss(self.actor, self.q, self.target_q, self.log_temperature, feat, batch, args)
        pi_loss, log_prob = self._sac_actor_loss(self.actor, self.q, self.log_temperature, feat)
        temperature_loss = -(self.log_temperature * (log_prob + self.target_entropy)).mean()
        metrics.update(m, sac_actor_loss=pi_loss.detach(), sac_entropy=-log_prob.mean(),
                       temperature=self.log_temperature.exp().detach())
        if args.sac_updates_actor:
            # Ours: one actor optimiser steps the sum. B.7 names a separate "SAC optimizer" for the
            # actor and the Q-nets (both lr 8e-5); two Adams stepping the same actor weights would
            # each normalise their own part, a detail the paper leaves open; the Q-nets do have
            # their own optimiser (q_opt).
            actor_loss = actor_loss + args.sac_weight * pi_loss
        # else the authors' code: SAC's actor and temperature losses are computed, never applied
        return actor_loss, q_loss, temperature_loss

    def update(self, batch: dict) -> dict:
        """One update (App. B.7): every loss from the parameters before the update, as in the
        authors' code (the behaviour gradients are taken before the model step), then one step
        per optimiser, all or none: a non-finite loss or gradient norm anywhere skips every step
        of this update and of all later ones (`halted`), the target Q-nets' Polyak step too."""
        args = self.args
        cudagraph_step(self.cudagraphs)  # one CUDA-graph step: every forward's outputs live to the end
        with self.autocast:
            model_loss, post, metrics = self._model_loss(self.wm, batch, args)  # CELBO, Eq. 6
            with frozen(self.wm):  # Eq. 7's actor loss trains the actor, not the world model
                actor_loss, feats, returns, m = self._dreamer_actor_loss(self.wm, self.actor, self.value,
                                                                         post, args)
            value_loss = self._value_loss(self.value, feats, returns, args)  # Eq. 7, critic
            metrics.update(m)
            actor_loss, q_loss, temperature_loss = self.sac_losses(RSSM.feat(post), batch, actor_loss,
                                                                   metrics)  # Sec. 3.3
        losses = dict(zip(LOSS_NAMES, (model_loss, actor_loss, value_loss, q_loss, temperature_loss)))
        for name, opt in self.opts.items():  # each loss trains its own network only
            backward(losses[name], opt)
        norms = {name: opt.check(losses[name]) for name, opt in self.opts.items()}  # clip, flag
        # One flag per LOSS_NAMES: the loss or its optimiser's gradient norm is not finite.
        self.nonfinite = torch.stack([self.opts[name].flag if name in self.opts else nonfinite(loss)
                                      for name, loss in losses.items()])
        self.halted = torch.maximum(self.halted, self.nonfinite.max())  # sticky
        for opt in self.opts.values():
            opt.apply(self.halted)
        if args.sac:  # Polyak averaging of the target Q-nets, skipped with the update
            with torch.no_grad():
                lerp_(list(self.target_q.parameters()), list(self.q.parameters()), args.tau * (1 - self.halted))
        metrics.update(norms["model_loss"] | norms["actor_loss"] | norms["value_loss"],
                       actor_loss=actor_loss.detach(), value_loss=value_loss.detach())
        self.updates += 1
        return outlive_step(metrics, self.cudagraphs)

    def plan(self, latent: dict, explore: bool) -> torch.Tensor:
        """Latent-guided MPC (Sec. 3.4, App. A.3, B.8): the actor's plan, refined by
        `optimise_plan`; returns the first action (N, A). The imagined state noise is drawn once
        per call, so every iteration ascends the same objective."""
        start = {k: v.detach() for k, v in latent.items()}
        noise = torch.randn(self.args.horizon, *start["stoch"].shape, device=self.device)
        with torch.no_grad(), self.autocast:
            actions = actor_plan(self.wm, self.actor, start, noise, explore).float()
        return self.optimise_plan(start, actions, noise)[0]

    def optimise_plan(self, start: dict, actions: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """App. A.3: a~ <- a~ + lr grad_a~ V_lambda(s_t) for the whole sequence (H, N, A), plain SGD
        (lr 0.003, App. B.8), `mpc_iterations` times, kept in the action box [-1, 1]. The authors'
        code takes a single step from a freshly sampled actor plan, on the first action only
        (`--mpc-first-action-only --mpc-iterations 1`)."""
        args = self.args
        for _ in range(args.mpc_iterations):
            actions = actions.detach().requires_grad_(True)
            cudagraph_step(self.cudagraphs)  # a step per iteration: its backward runs at once
            # Only the actions are differentiated: the world model and the value are frozen.
            with torch.enable_grad(), self.autocast, frozen(self.wm), frozen(self.value):
                v = self._plan_value(self.wm, self.value, start, actions, noise, args.gamma,
                                     args.return_lambda).sum()
                (grad,) = torch.autograd.grad(v, actions)
            if args.mpc_first_action_only:
                grad = torch.cat([grad[:1], torch.zeros_like(grad[1:])])
            actions = (actions + args.mpc_lr * grad).clamp(-1, 1)
        return actions.detach()

    @torch.no_grad()
    def act(self, obs: np.ndarray, state, explore: bool, mpc: Optional[bool] = None):
        """One filtering step and an action; state = (posterior, previous action) or None."""
        mpc = self.args.mpc if mpc is None else mpc
        if state is None:
            latent = self.wm.rssm.initial(1, self.device)
            prev = torch.zeros(1, self.action_dim, device=self.device)
        else:
            latent, prev = state
        obs_t = torch.as_tensor(obs, device=self.device)[None]
        with self.autocast:
            latent, _ = self.wm.rssm.obs_step(latent, prev, self.wm.encoder(obs_t))
            if not mpc:
                dist = self.actor(RSSM.feat(latent))
                action = dist.rsample() if explore else dist.mode()
        if mpc:
            action = self.plan(latent, explore)
        action = action.float()
        if explore:  # additive Gaussian exploration (Dreamer-v1, amount 0.3)
            action = (action + self.args.expl_noise * torch.randn_like(action)).clamp(-1, 1)
        return action[0].cpu().numpy(), (latent, action)

    def num_parameters(self) -> int:
        """Trained parameters: world model, actor, value, Q-nets (not the targets)."""
        mods = (self.wm, self.actor, self.value) + ((self.q,) if self.args.sac else ())
        return sum(p.numel() for m in mods for p in m.parameters())

    def modules(self) -> dict:
        return dict(wm=self.wm, actor=self.actor, value=self.value, q=self.q, target_q=self.target_q,
                    model_opt=self.model_opt, value_opt=self.value_opt, actor_opt=self.actor_opt,
                    q_opt=self.q_opt, temperature_opt=self.temperature_opt)

    def state_dict(self) -> dict:
        state = {k: m.state_dict() for k, m in self.modules().items()}
        return dict(state, log_temperature=self.log_temperature.detach().cpu(), updates=self.updates)

    def load_state_dict(self, state: dict):
        for key, module in self.modules().items():
            module.load_state_dict(state[key])
        with torch.no_grad():
            self.log_temperature.copy_(state["log_temperature"])
        self.updates = state["updates"]


def evaluate(agent: Agent, env, seeds: list[int], record: bool = False, stop=lambda: False):
    """Mean return of one episode per seed with mode actions (MPC as configured), frames of the
    first if `record`; None if `stop()` turned true (an interrupted evaluation is not logged)."""
    returns, frames = [], []
    for ep, seed in enumerate(seeds):
        obs, _ = env.reset(seed=seed)
        state, total, done = None, 0.0, False
        while not done:
            if stop():
                return None, frames
            if record and ep == 0:
                frames.append(obs.transpose(1, 2, 0))
            action, state = agent.act(obs, state, explore=False)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns)), frames


def make_env(args: Args, split: str, seed: int):
    try:  # bad input (env id, distraction, video folder) ends here with a message, not a traceback
        env = envs.make(args.env, distraction=args.distraction, dynamic=args.dynamic, seed=seed,
                        image_size=64, action_repeat=args.action_repeat or None, split=split,
                        video_dir=args.video_dir)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    if hasattr(env.action_space, "n"):
        env.close()
        raise SystemExit(f"error: {args.env} has discrete actions; CVRL's tanh-Gaussian actor and "
                         "its MPC need a continuous (Box) action space: use dmc-*, dcs-*, natural-*, "
                         "pybullet-boxpush or toy-*")
    return env


def synthetic_batch(args: Args, action_dim: int, device) -> dict:
    T, B = args.batch_length, args.batch_size
    return dict(obs=torch.randint(0, 255, (T, B, 3, 64, 64), dtype=torch.uint8, device=device),
                action=torch.rand(T, B, action_dim, device=device) * 2 - 1,
                reward=torch.rand(T, B, device=device), cont=torch.ones(T, B, device=device))


def measure_speed(args: Args, device: torch.device) -> dict:
    """Speed benchmark. Updates: median seconds per update over `args.measure_updates` updates
    (after 2 warm-ups) on a random batch of the configured size. Acting: 50 agent steps on
    `args.env` (after 2 warm-ups) with exploration, with MPC as configured and without MPC
    (policy_ms, policy_ms_no_mpc)."""
    configure_torch(args, device)
    env = make_env(args, "train", args.seed)
    action_dim = env.action_space.shape[0]
    agent = Agent(args, action_dim, device)
    batch = synthetic_batch(args, action_dim, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, compile_seconds = [], None
    for i in range(args.measure_updates + 2):
        sync()
        start = time.perf_counter()
        agent.update(batch)
        sync()
        if i == 0 and args.compile:
            compile_seconds = time.perf_counter() - start
            print(f"compiled in {compile_seconds:.1f} s", flush=True)
        if i >= 2:
            times.append(time.perf_counter() - start)

    def acting(mpc: bool):
        obs, _ = env.reset(seed=args.seed)
        state, env_steps, policy_time = None, 0, 0.0
        for i in range(52):
            if i == 2:  # the first two steps are warm-up (and compilation): the clock starts here
                start, env_steps, policy_time = time.perf_counter(), 0, 0.0
            t = time.perf_counter()
            action, state = agent.act(obs, state, explore=True, mpc=mpc)
            policy_time += time.perf_counter() - t
            obs, _, terminated, truncated, info = env.step(action)
            env_steps += info["env_steps"]
            if terminated or truncated:
                (obs, _), state = env.reset(), None
        return env_steps / (time.perf_counter() - start), 1000 * policy_time / 50

    sps, policy_ms = acting(args.mpc)
    _, policy_ms_no_mpc = acting(False)
    env.close()
    result = dict(seconds_per_update=float(np.median(times)), updates=len(times),
                  parameters=agent.num_parameters(), env=args.env, env_steps_per_second=sps,
                  policy_ms=policy_ms, policy_ms_no_mpc=policy_ms_no_mpc, mpc=args.mpc,
                  mpc_iterations=args.mpc_iterations, device=str(device), precision=args.precision,
                  compile=args.compile)
    if compile_seconds is not None:
        result["compile_seconds"] = compile_seconds
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
    device = resolve_device(args.device)
    if args.measure_updates > 0:
        return measure_speed(args, device)
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    seed_everything(args.seed)
    configure_torch(args, device)

    env = make_env(args, "train", args.seed)
    # The evaluation env is reseeded per episode from episode_seed, so it is reproducible after a
    # resume without storing its RNG.
    eval_env = make_env(args, args.eval_split, args.seed + 10_000)
    run_name = f"{args.env}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.resume).parent if args.resume else Path("runs") / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    stop_flag = StopFlag()
    action_dim = env.action_space.shape[0]
    repeat = args.action_repeat or envs.default_action_repeat(args.env)
    replay_on = replay_device(args, device)

    agent = Agent(args, action_dim, device)
    replay = Replay(replay_slots(args.replay_capacity // repeat, args.total_steps, repeat, args.batch_length),
                    env.observation_space.shape, action_dim, args.seed, replay_on)
    counters = dict(env_steps=0, agent_steps=0, episodes=0, eval_rounds=0, next_eval=args.eval_every,
                    last_eval=-1, pretrained=False)
    if checkpoint is not None:
        agent.load_state_dict(checkpoint["agent"])
        counters.update(checkpoint["counters"])
        load_replay(args.resume, checkpoint, replay, counters)
        seed_everything(args.seed, checkpoint["rng"])  # after the networks' initialisation drew
    logger = Logger(run_dir, args, counters["env_steps"] if checkpoint is not None else None)

    params = agent.num_parameters()
    ratio = args.updates_per_step * args.batch_size * args.batch_length / args.train_every
    videos = envs.video_source(args.env, args.distraction, args.video_dir)
    print(f"run {run_dir} | action repeat {repeat} | device {device} | {params / 1e6:.1f}M parameters | replay "
          f"{replay.capacity:,} agent steps, up to {replay.nbytes / 2**30:.2f} GiB on {replay_on} | "
          f"replay ratio {ratio:.0f} replayed steps per agent step | videos: {videos} | "
          f"{preset_overrides(args)}", flush=True)
    if checkpoint is not None:
        print(f"resumed from {args.resume} at env step {counters['env_steps']} (the interrupted "
              "episode was stored as truncated; a new episode starts)", flush=True)

    # Progress: a line at step 0, then every log_every env steps or 30 s, also inside the pretrain
    # burst; the ETA counts acting and updates separately once updates have started.
    progress = Progress(args, counters, args.updates_per_step / args.train_every)
    watch = NonFiniteWatch(LOSS_NAMES)  # each update's flags, read one update late
    last_return = float("nan")

    def write_checkpoint(with_replay: bool):
        """checkpoint.pt, and replay.pt if `with_replay` (see save_checkpoint)."""
        save_checkpoint(ckpt_path, agent, replay if with_replay else None, counters, args)

    def close():
        stop_flag.restore()  # the caller's signal handlers back (main() may run again in-process)
        logger.close()
        env.close()
        eval_env.close()

    def check_nonfinite():
        """Stop at the first non-finite update: its steps (and all later ones) were skipped on the
        device, so the checkpoint written here is the state from before it."""
        bad = watch.first_bad()
        if bad is not None:
            names, update, _ = bad
            write_checkpoint(with_replay=True)
            print(f"error: non-finite {names[0]} at update {update} (env step "
                  f"{counters['env_steps']}); checkpoint from before it: {ckpt_path}", flush=True)
            close()
            sys.exit(1)

    def train_step():
        check_nonfinite()  # the previous update's flags: their copy has long arrived
        start = time.perf_counter()
        batch = replay.sample(args.batch_size, args.batch_length, device)
        metrics = agent.update(batch)
        watch.push(agent.nonfinite, agent.updates, counters["env_steps"])
        if progress.updates == 0 and args.compile:
            print(f"compiled in {time.perf_counter() - start:.1f} s", flush=True)
        else:
            progress.update_time += time.perf_counter() - start
        progress.updates += 1
        return metrics

    def new_episode():
        obs, _ = env.reset(seed=episode_seed(args.seed, "train", counters["episodes"]))
        return obs, dict(obs=[obs], action=[np.zeros(action_dim, np.float32)], reward=[0.0], cont=[1.0])

    def stop(ep: dict):
        """Interrupted: store the running episode as truncated, checkpoint, exit 130/143."""
        if len(ep["obs"]) >= 2:
            replay.add_episode(*(np.asarray(ep[k]) for k in ("obs", "action", "reward", "cont")))
            counters["episodes"] += 1
        write_checkpoint(with_replay=True)
        print(f"interrupted at step {counters['env_steps']}; resume with: python "
              f"{os.path.basename(__file__)} --resume {ckpt_path}", flush=True)
        close()
        sys.exit(128 + stop_flag.signum)

    def run_eval(ep: dict):
        seeds = [episode_seed(args.seed, "eval", counters["eval_rounds"] * 10_000 + j)
                 for j in range(args.eval_episodes)]
        ret, frames = evaluate(agent, eval_env, seeds, args.capture_video, lambda: stop_flag.signum is not None)
        if ret is None:
            stop(ep)
        logger.log(counters["env_steps"], {"eval/episodic_return": ret})
        if frames:
            save_video(frames, run_dir / "videos" / f"eval_{counters['env_steps']}.mp4")
            strip = np.concatenate(frames[:: max(1, len(frames) // 8)][:8], axis=1)
            logger.writer.add_image("eval/frames", strip, counters["env_steps"], dataformats="HWC")
        print(f"eval at {counters['env_steps']}: return {ret:.1f}", flush=True)
        counters["last_eval"] = counters["env_steps"]
        counters["eval_rounds"] += 1
        if args.save_model:
            write_checkpoint(with_replay=replay_due(args, counters["eval_rounds"], counters))

    obs, ep = new_episode()
    state, episode_return, metrics = None, 0.0, {}
    progress.maybe_print(counters, "prefill" if counters["agent_steps"] < args.prefill else "train",
                         last_return, agent.updates, force=True)
    while counters["env_steps"] < args.total_steps:
        if stop_flag.signum is not None:
            stop(ep)
        t = time.perf_counter()
        if counters["agent_steps"] < args.prefill:
            action = np.random.uniform(-1, 1, action_dim).astype(np.float32)
        else:
            action, state = agent.act(obs, state, explore=True)
        obs, reward, terminated, truncated, info = env.step(action)
        progress.acting_time += time.perf_counter() - t
        counters["agent_steps"] += 1
        counters["env_steps"] += info["env_steps"]
        episode_return += reward
        # slot t of the episode: o_t, a_{t-1}, r_t, cont_t (index conventions, next to Replay)
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

        # Train: once `prefill` steps are in, `pretrain` updates, then every `train_every` steps.
        phase = "prefill"
        if counters["agent_steps"] >= args.prefill and replay.can_sample(args.batch_length):
            phase = "train"
            if not counters["pretrained"]:
                for i in range(args.pretrain):
                    metrics = train_step()
                    if stop_flag.signum is not None:
                        stop(ep)
                    progress.maybe_print(counters, "pretrain", last_return, agent.updates,
                                         pending_updates=args.pretrain - i - 1)
                counters["pretrained"] = True
            elif counters["agent_steps"] % args.train_every == 0:
                for _ in range(args.updates_per_step):
                    metrics = train_step()

        before = counters["env_steps"] - info["env_steps"]
        crossed = counters["env_steps"] // args.log_every != before // args.log_every
        if crossed:
            elapsed = max(time.time() - progress.start, 1e-9)
            logs = {f"losses/{k}": v for k, v in metrics.items()}
            logs.update({"charts/SPS": (counters["env_steps"] - progress.start_steps) / elapsed,
                         "charts/updates": agent.updates})
            logger.log(counters["env_steps"], logs)
        progress.maybe_print(counters, phase, last_return, agent.updates, force=crossed)
        if args.eval_every and counters["env_steps"] >= counters["next_eval"]:
            run_eval(ep)
            counters["next_eval"] += args.eval_every  # advanced only once the evaluation completed

    check_nonfinite()  # the last update's flags
    if counters["last_eval"] != counters["env_steps"]:
        run_eval(ep)
    close()
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
