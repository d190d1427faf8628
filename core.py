"""CoRe: contrastive recurrent state-space model + SAC, one file.

Paper: Nitish Srivastava, Walter Talbott, Martin Bertran Lopez, Shuangfei Zhai and Joshua M.
Susskind, "Robust Robotic Control from Pixels using Contrastive Recurrent State-Space Models",
NeurIPS Deep Reinforcement Learning Workshop 2021, arXiv:2112.01163. Authors' code: apple/ml-core
(`train.py`, `world_model.py`, `configs/dcs/core.yaml`). Tables 1-3 are the appendix's
architecture, hyper-parameter and action-repeat tables (in the full text: Tables 4-6).

The idea: a recurrent state-space model is trained without reconstructing pixels. The *prior*
latent state (the model's prediction before it sees the observation) is decoded to a 50-d vector
y_t that must pick out the encoding x_t of the real observation among all other observations of
the mini-batch (InfoNCE). Distractions that the dynamics cannot predict (video backgrounds, camera
shake, colour drift) are of no use for that, so the representation learns to ignore them. SAC is
trained on the posterior latent state, and its critic loss also trains the encoder and the RSSM.

The paper, in its order, and where each part is implemented:
- RSSM (App. A.1): h_t = GRUCell(h_{t-1}, GRU_MLP(s_{t-1}, a_{t-1})); prior
  (mu^, sigma^) = PriorMLP(h_t); posterior (mu, sigma) = PosteriorMLP(h_t, ObsMLP(x_t)); prior
  state z^_t = [h_t, s^_t], posterior state z_t = [h_t, s_t]; h_t propagated without sampling.
  `RSSM` (`observe` for a sequence, `obs_step` while acting); encoder x_t = f(o_t): `Encoder`.
- Eq. 1, contrastive loss: L_c = -sum log softmax over observations - sum log softmax over
  predictions of lambda x_{i,t}^T y_{i,t}, with y_t = g(z^_t) and lambda a learned inverse
  temperature. `contrastive_loss` (scores: `contrastive_scores`).
- Eq. 2, L_KL = KL(q(z_t | z^_t, x_t) || p(z^_t | z_{t-1}, a_{t-1})). `kl_loss`.
- Sec. 2.2, J_M = L_c + beta L_KL + alpha_r (r_t - r^_t)^2 + alpha_a ||a_t - a^_t||^2, with the
  inverse dynamics a^_{t-1} = a(z_t, z_{t-1}). `model_loss`.
- Eq. 3-4, critic: J_Q(theta_i, Theta) = (Q_i(z_t, a_t) - sg(r + gamma V_target(z_{t+1})))^2,
  V_target = min_i Qbar_i(z_{t+1}, a') - alpha log pi(a' | z_{t+1}); trains the critics *and*
  the encoder/RSSM parameters Theta (Sec. 2.3, C.2). `critic_loss` on `sac_states`.
- Eq. 5, actor: J_pi = alpha log pi(a_t | z_t) - min_i Q_i(z_t, a_t), on detached states;
  automatic entropy temperature with target entropy -|A| (Table 2). `actor_loss`, `alpha_loss`.
- Algorithm 1 / App. A.3: collect one episode, then 0.5 x (episode length) gradient steps, each
  mini-batch used for J_M, J_Q and J_pi in turn. `Agent.update` (one gradient step), `main`.

Shapes are time-major: replay sequences (T, B, ...), states (T, B, D). The index conventions
(what slot t of a sequence holds) are stated once, above `Replay`. Control-suite frames are
rendered at 320x240 and resized to 100x100 uint8 (A.3), then randomly cropped to 84x84 with the
same crop for a whole sequence; acting uses the centre crop.

Where the speed comes from (each is a named place below): `RSSM.observe` keeps only the recurrence
in its time loop (ObsMLP, the observation half of PosteriorMLP's first layer and PriorMLP run once
over all T x B); `Agent.__init__` optionally compiles the three loss computations as wholes
(`--compile`); `Agent.update` never waits for the GPU (`Optimizer` at the end of the file: fused Adam
steps that skip themselves on a non-finite loss; `lerp_` targets; metrics kept on the device);
`Replay` keeps the frames on the GPU when training there and crops there; `configure_torch` turns
on TF32/cudnn autotuning. Measured seconds per update: results/speed/h100-2026-11-23.md (one
H100), results/speed/cpu-2cores.md (CPU).

Everything after `main` is plumbing (logging, progress, signals, checkpoints, devices, the
optimiser helper), the same text in every script of this repository.

    python core.py --env dcs-walker-walk --distraction medium
    python core.py --env dcs-walker-walk --distraction medium --preset small   # a 2-core CPU
    python core.py --env dcs-walker-walk --distraction medium --preset tiny    # smoke test
"""

from __future__ import annotations

import contextlib
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

# Argument validation of torch.distributions checks every sample; it is pure overhead here.
td.Distribution.set_default_validate_args(False)


# ---------------------------------------------------------------------------------------------
# Hyperparameters: the defaults are the paper's setting for its main benchmark (Distracting
# Control Suite, dynamic medium distractions, 500K env steps); every other setting is a dict of
# overrides in PRESETS below. Each field's docstring names the source of its default.
# ---------------------------------------------------------------------------------------------


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment (part of the run name; ours: CleanRL's naming)"""
    env: str = "dcs-walker-walk"
    """env id: dcs-<domain>-<task>, dmc-<domain>-<task>, natural-<domain>-<task>,
    manipulation-<task>, robosuite-<task>-<robot>, pybullet-boxpush, toy-reach, toy-reach-center
    (docs/envs.md; paper Sec. 3: walker-walk is one of DCS's six tasks)"""
    distraction: Optional[str] = None
    """dcs-*: none | easy | medium | hard | background; robosuite-*: none | color-lighting |
    color-lighting-camera; None: medium for dcs-* (the paper's setting), none otherwise"""
    dynamic: bool = True
    """distractions move within an episode (False: static per episode)
    (paper Sec. 3.1: the dynamic setting)"""
    video_dir: Optional[str] = None
    """DAVIS 2017 or video folder for backgrounds (default: the built-in offline pool, which is
    not DAVIS: runs name their video source in the header and in every evaluation record;
    paper: DAVIS 2017 train videos; ours: a pool that needs no download)"""
    seed: int = 1
    """seed of the experiment (ours: CleanRL's default)"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic` (and turns cudnn autotuning off)
    (ours: CleanRL's default)"""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ... (ours)"""
    replay_device: Literal["auto", "cpu", "cuda"] = "auto"
    """where the replay's frames live; auto: the training device if it is CUDA (sampling and
    cropping then run on the GPU), else host memory
    (ours: no host-to-device copy of the batch on a GPU)"""
    compile: bool = False
    """torch.compile the three loss computations (J_M incl. the observe loop, J_Q incl. the
    re-filtering, J_pi); the first update compiles (its time is printed)
    (ours: off, compiled was no faster on one H100, results/speed/h100-2026-11-23.md)"""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """torch.compile mode (CUDA: 'reduce-overhead' uses CUDA graphs; 'max-autotune' means
    max-autotune-no-cudagraphs until a GPU run has shown CUDA graphs work with it) (ours)"""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast for the networks (critic and reward outputs, the plain GRU's state, targets,
    log-probs, KL, contrastive scores and loss reductions stay fp32)
    (ours: fp32 as the paper; bf16 was slower on one H100, results/speed/h100-2026-11-23.md)"""
    preset: Literal["paper", "small", "tiny"] = "paper"
    """'small': the same algorithm sized for a 2-core CPU (100K steps of dmc-cartpole-swingup in
    under an hour); 'tiny': narrow nets, short sequences and episodes, 2000 steps, for smoke tests; flags you
    set explicitly win over the preset (see PRESETS) (ours)"""
    total_steps: int = 500_000
    """environment steps to train for, counted after action repeat (simulator steps)
    (paper Sec. 3: results at 500K steps)"""
    action_repeat: Optional[int] = None
    """simulator steps per action (default: the per-task value of Table 3, see envs)"""
    time_limit: Optional[int] = None
    """episode length in simulator steps (default: the env's, 1000 for the control suite)
    (paper App. A.3: 1000 simulator steps)"""
    eval_every: int = 10_000
    """environment steps between evaluations (0: only at the end) (ours: 10K env steps)"""
    eval_episodes: int = 10
    """episodes per evaluation, deterministic policy, on the validation videos (ours)"""
    log_every: int = 1_000
    """environment steps between progress lines and training-metric logs (a progress line also
    comes at least every 30 s) (ours)"""
    save_model: bool = False
    """write checkpoint.pt (networks, optimisers, counters, RNG states) at every evaluation, and
    replay.pt beside it at the end and every --replay-checkpoint-every evaluations (an interrupt
    or a non-finite loss always writes both) (ours)"""
    checkpoint_replay: bool = True
    """write the replay to replay.pt (see save_checkpoint), so that --resume keeps the same data;
    --no-checkpoint-replay: never, a resumed run starts with an empty replay
    (ours: a resumed run trains on the same data)"""
    replay_checkpoint_every: int = 10
    """evaluations between the periodic replay.pt writes (0: only at the end, on an interrupt or a
    non-finite stop). ours: the replay is gigabytes on a GPU run and writing it pauses training
    (checkpoint.pt is megabytes); at every 10th evaluation (100K env steps at --eval-every 10000)
    the pause is a small fraction of the time between writes, and a hard kill (SIGKILL, a lost
    node) costs at most 10 evaluations' worth of replay, never the networks"""
    resume: Optional[str] = None
    """path of a checkpoint to continue from: its flags become the defaults; schedule flags
    (SCHEDULE_FLAGS) may be changed, others must match (ours)"""
    measure_updates: int = 0
    """if > 0: time this many updates on a synthetic batch at the configured sizes and 50 steps of
    the acting loop on --env, print one JSON line and exit (benchmark.sh speed) (ours)"""
    capture_video: bool = False
    """save an mp4 of the first eval episode (runs/<run>/videos) and a frame strip to TensorBoard
    (ours)"""

    # Observations (A.3).
    render_size: int = 100
    """side of the square observation (App. A.3: 100x100)"""
    render_height: Optional[int] = 240
    """height the control suite renders at before the frame is resized to render_size square
    (App. A.3: 320x240 renders); None or 0: render the square directly (narrower field of view)"""
    render_width: Optional[int] = 320
    """width of the render before the resize (App. A.3: 320)"""
    crop_size: int = 84
    """side of the random crop fed to the encoder (same crop for the whole sequence)
    (App. A.3: 84x84)"""

    # Replay and schedule (A.3, Table 2).
    replay_capacity: int = 100_000
    """replay capacity in agent steps (Table 2: 100,000)"""
    batch_size: int = 32
    """sequences per mini-batch (N) (App. A.3: N = 32)"""
    seq_len: int = 32
    """steps per sequence (T) (App. A.3: T = 32)"""
    prefill: int = 1000
    """agent steps (after action repeat) of uniform random actions, in whole episodes, with no
    updates (App. A.3 "first 1000 steps"; ml-core counts initial_data_steps in agent steps and starts
    updating after the first actor episode)"""
    updates_per_step: float = 0.5
    """gradient steps per agent step of each collected episode
    (App. A.3: 0.5 x the steps of an episode)"""

    # World model (Table 1).
    cnn_filters: int = 32
    """filters of the 4 encoder conv layers (Table 1)"""
    embed: int = 50
    """encoder output x_t (the contrastive target), LayerNorm'd (Table 1)"""
    obs_mlp: int = 256
    """ObsMLP units ([256, 256] + LayerNorm) (Table 1)"""
    gru_mlp: int = 400
    """GRU_MLP units ([400, 400]) (Table 1)"""
    deter: int = 200
    """GRUCell hidden units h_t (Table 1)"""
    gru: Literal["layernorm", "plain"] = "layernorm"
    """GRU cell: LayerNorm GRU (authors' code) or torch.nn.GRUCell"""
    prior_mlp: int = 400
    """PriorMLP units ([400, 400, 400]) (Table 1)"""
    posterior_mlp: int = 400
    """PosteriorMLP units ([400, 400]) (Table 1)"""
    stoch: int = 64
    """stochastic state size (not given in the paper; the authors' code uses 64)"""
    decoder_mlp: int = 256
    """observation-representation decoder g units ([256, 256, embed] + LayerNorm) (Table 1)"""
    reward_mlp: int = 128
    """reward predictor units ([128, 128, 1]) (Table 1)"""
    inverse_mlp: int = 128
    """inverse dynamics units ([128, 128, |A|]) (Table 1)"""
    min_std: float = 0.1
    """minimum std of the prior and posterior (softplus(x) + min_std)
    (ours: Dreamer's softplus + min std; the authors' code clamps a log-std)"""

    # Objective (Table 2) and ablations.
    beta: float = 0.01
    """KL weight (Table 2)"""
    alpha_r: float = 1.0
    """reward prediction weight (Table 2)"""
    alpha_a: float = 1.0
    """inverse dynamics weight (Table 2)"""
    free_nats: float = 0.0
    """clamp of the per-step KL from below (paper: none; the authors' code: 1.0)"""
    kl_first_step: bool = False
    """include t = 0 in L_KL (earlier versions of this script; ml-core and the default leave it
    out, see `model_loss`; authors' code: world_model.py)"""
    objective: Literal["contrastive", "reconstruction"] = "contrastive"
    """'reconstruction': the "Recon" baseline of Table 3, pixels decoded from the posterior"""
    negatives: Literal["batch", "same-sequence"] = "batch"
    """contrastive negatives from the whole batch, or only from the same sequence (Fig. 3)"""
    predict_from: Literal["prior", "posterior"] = "prior"
    """state that y_t is decoded from (C.3; paper Sec. 2.2: the prior)"""
    no_inverse_dynamics: bool = False
    """drop the inverse dynamics loss (C.1; paper Sec. 2.2 keeps it)"""
    no_reward_loss: bool = False
    """drop the reward prediction loss (C.1; paper Sec. 2.2 keeps it)"""
    no_critic_grad_to_model: bool = False
    """keep the critic loss out of the encoder and RSSM (C.2; paper Sec. 2.3 keeps it)"""
    gating: bool = False
    """pixel-level gating CNN in front of the encoder (Sec. 3.5); masks are logged as images"""

    # Behaviour: SAC (Table 2).
    ac_hidden: int = 1024
    """units of the actor and critic MLPs (3 layers) (Table 1)"""
    sac_state: Literal["sample", "mean"] = "sample"
    """posterior state fed to SAC: a sample z_t ~ q (paper Eq. 3) or its mean (authors' code)"""
    gamma: float = 0.99
    """discount (authors' code: configs/dcs/core.yaml)"""
    tau: float = 0.005
    """target critic soft-update rate (Table 2)"""
    init_alpha: float = 0.1
    """initial entropy temperature (authors' code: log alpha = -2.3)"""
    model_lr: float = 3e-4
    """learning rate of J_M (encoder, RSSM, heads) (Table 2)"""
    inverse_temperature_lr: float = 3e-4
    """learning rate of lambda (paper: part of Theta; authors' code: 2e-3)"""
    critic_model_lr: float = 1e-3
    """learning rate of J_Q's step on the encoder and RSSM. The paper gives none; ml-core puts
    Theta into the critic's Adam (lr 1e-3). Earlier versions of this script: 3e-4"""
    critic_model_clip: float = 0.0
    """gradient-norm clip of J_Q's gradient on Theta; 0: none (ml-core clips only the critics).
    Earlier versions of this script: 10 (authors' code: max_grad_norm_critic, configs/dcs/core.yaml)"""
    critic_lr: float = 1e-3
    """critic learning rate (Table 2)"""
    actor_lr: float = 1e-3
    """actor learning rate (Table 2)"""
    alpha_lr: float = 1e-3
    """entropy temperature learning rate (authors' code: configs/dcs/core.yaml)"""
    model_clip: float = 10.0
    """gradient-norm clip of the model (Table 2)"""
    critic_clip: float = 100.0
    """gradient-norm clip of the critic (Table 2)"""
    actor_clip: float = 10.0
    """gradient-norm clip of the actor (Table 2)"""


# Presets: values that replace the paper's (flags you set still win).
# 'small': the same algorithm sized for a 2-core CPU, 100K env steps of dmc-cartpole-swingup in
#   under an hour (docs/core.md, results/cpu/summary.md); values measured on one CPU thread:
#   - renders 96x72 -> 72x72 -> 64 crops (App. A.3's 320x240 -> 100 -> 84, scaled down: a 320x240
#     frame costs ~40 ms to render here).
#   - 16-filter CNN, 128-unit model MLPs and GRU, 32 latents, 256-unit actor/critic: 1.4M
#     parameters instead of 10.9M.
#   - batch 8 x 16, 0.4 updates per agent step (0.45 s an update on one thread, two jobs on the
#     two cores): 5K updates in 100K env steps. Batch 16 x 16 at 0.16 updates per step (0.83 s an
#     update) left the critic far from its fixed point after 2K updates (169 at 100K).
# 'tiny': narrow nets, short sequences and episodes, 2000 steps (smoke tests).
PRESETS = {
    "small": dict(cnn_filters=16, obs_mlp=128, gru_mlp=128, deter=128, prior_mlp=128,
                  posterior_mlp=128, stoch=32, decoder_mlp=128, reward_mlp=64, inverse_mlp=64,
                  ac_hidden=256, batch_size=8, seq_len=16, render_size=72, render_height=72,
                  render_width=96, crop_size=64, updates_per_step=0.4, total_steps=100_000,
                  eval_episodes=5),
    "tiny": dict(cnn_filters=8, embed=16, obs_mlp=32, gru_mlp=32, deter=32, prior_mlp=32,
                 posterior_mlp=32, stoch=8, decoder_mlp=32, reward_mlp=16, inverse_mlp=16,
                 ac_hidden=32, batch_size=4, seq_len=8, render_size=48, render_height=None,
                 render_width=None, crop_size=40, prefill=100, eval_episodes=1, time_limit=200,
                 replay_capacity=10_000, total_steps=2000),
}

# Flags that may differ from the checkpoint's on --resume: they change the schedule, logging or
# how fast the same computation runs, not the algorithm. Script-specific additions:
# replay_device, compile_mode, torch_deterministic (placement, compilation and kernel choice).
SCHEDULE_FLAGS = {"total_steps", "eval_every", "eval_episodes", "log_every", "save_model",
                  "checkpoint_replay", "replay_checkpoint_every", "resume", "capture_video", "device",
                  "compile", "precision",
                  "measure_updates", "exp_name", "replay_device", "compile_mode",
                  "torch_deterministic"}


def preset_args(preset: str = "paper", **overrides) -> Args:
    """Args with a preset's values as defaults; `overrides` (and CLI flags) win over them."""
    if preset not in ("paper", *PRESETS):
        raise ValueError(f"unknown preset {preset!r}; known: paper, {', '.join(PRESETS)}")
    return Args(**{**PRESETS.get(preset, {}), **overrides, "preset": preset})


def preset_overrides(args: Args) -> dict:
    """The preset's values that this run uses in place of the paper's (the run header prints them;
    flags given explicitly win over the preset and are not listed)."""
    return {k: v for k, v in PRESETS.get(args.preset, {}).items() if getattr(args, k) == v}


def _flag_value(argv: list[str], flag: str) -> str | None:
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def parse_args(argv=None) -> Args:
    """Flags over defaults. The defaults are the preset's (--preset), or with --resume PATH the
    checkpoint's own flags, so that `--resume PATH` alone continues the same run; a resumed run
    may change only SCHEDULE_FLAGS."""
    argv = list(sys.argv[1:] if argv is None else argv)
    resume = _flag_value(argv, "--resume")
    saved = None
    if resume:
        known = {f.name for f in fields(Args)}
        saved = {k: v for k, v in load_checkpoint(resume)["args"].items() if k in known}
        default = Args(**saved)
    else:
        preset = _flag_value(argv, "--preset") or "paper"
        default = preset_args(preset) if preset in ("paper", *PRESETS) else Args()
    args = tyro.cli(Args, args=argv, default=default)
    if saved is not None:
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (checkpoint {v})" for k, v in saved.items()
                   if k not in SCHEDULE_FLAGS and getattr(args, k) != v]
        if changed:
            raise SystemExit(f"error: --resume: these flags differ from the checkpoint's and change the "
                             f"algorithm: {', '.join(changed)}; drop them or start a new run")
    return args


# ---------------------------------------------------------------------------------------------
# Networks (Table 1)
# ---------------------------------------------------------------------------------------------


def mlp(inp: int, hidden: list[int], out: int | None = None, act=nn.ELU, layer_norm=False):
    """Fully-connected net: `hidden` layers with `act`, then an optional linear output, then an
    optional LayerNorm on the final layer."""
    mods, d = [], inp
    for units in hidden:
        mods += [nn.Linear(d, units), act()]
        d = units
    if out is not None:
        mods.append(nn.Linear(d, out))
        d = out
    elif mods:
        mods.pop()  # the last hidden layer is the output: no activation after it
    if layer_norm:
        mods.append(nn.LayerNorm(d))
    return nn.Sequential(*mods)


def fp32_output(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """net(x) with its output layer in fp32 also under bf16 autocast: a reward or a Q near 500
    would be resolved to 2-4 units in bf16, coarser than the errors it is trained on."""
    hidden = net[:-1](x)
    with torch.autocast(x.device.type, enabled=False):
        return net[-1](hidden.float())


def weight_init(m: nn.Module):
    """Initialisation of the CURL / SAC-AE encoder that CoRe borrows as-is (A.2): orthogonal
    linear layers, delta-orthogonal convolutions (only the kernel centre is non-zero), zero biases.
    With PyTorch's default init the encoder's outputs barely differ between images and the
    contrastive loss sits on a plateau at log N for ~150 updates."""
    if isinstance(m, nn.Linear):
        nn.init.orthogonal_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.zeros_(m.weight)
        centre = m.weight.shape[2] // 2
        nn.init.orthogonal_(m.weight[:, :, centre, centre], gain=nn.init.calculate_gain("relu"))
        nn.init.zeros_(m.bias)


class GatingCNN(nn.Module):
    """Sec. 3.5: [16, 5x5, 1] x3, [1, 1x1, 1], sigmoid: a full-resolution mask multiplied into
    the observation before the encoder."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 5, 1, 2), nn.ELU(), nn.Conv2d(16, 16, 5, 1, 2), nn.ELU(),
                                 nn.Conv2d(16, 16, 5, 1, 2), nn.ELU(), nn.Conv2d(16, 1, 1))

    def forward(self, image):
        return torch.sigmoid(self.net(image))


class Encoder(nn.Module):
    """f: [32, 3x3, 2], [32, 3x3, 1] x3, ReLU, then 50 fully-connected + LayerNorm -> x_t."""

    def __init__(self, size: int, filters: int, embed: int, gating: bool):
        super().__init__()
        self.gate = GatingCNN() if gating else None
        self.convs = nn.Sequential(nn.Conv2d(3, filters, 3, 2), nn.ReLU(),
                                   nn.Conv2d(filters, filters, 3, 1), nn.ReLU(),
                                   nn.Conv2d(filters, filters, 3, 1), nn.ReLU(),
                                   nn.Conv2d(filters, filters, 3, 1), nn.ReLU())
        self.conv_side = (size - 3) // 2 + 1 - 6
        self.fc = nn.Sequential(nn.Linear(filters * self.conv_side ** 2, embed), nn.LayerNorm(embed))

    def forward(self, obs: torch.Tensor):
        """obs (..., 3, S, S) uint8 -> x (..., embed), gating mask (..., 1, S, S) or None."""
        image = obs.reshape(-1, *obs.shape[-3:]).float() / 255.0
        mask = None
        if self.gate is not None:
            mask = self.gate(image)
            image = image * mask
        x = self.fc(self.convs(image).flatten(1))
        mask = mask.reshape(*obs.shape[:-3], *mask.shape[1:]) if mask is not None else None
        return x.reshape(*obs.shape[:-3], -1), mask


class PixelDecoder(nn.Module):
    """Mirror of the encoder, for the reconstruction ("Recon") baseline only."""

    def __init__(self, state_dim: int, size: int, filters: int, conv_side: int):
        super().__init__()
        self.filters, self.side = filters, conv_side
        self.fc = nn.Linear(state_dim, filters * conv_side ** 2)
        pad = size - ((conv_side + 6 - 1) * 2 + 3)  # output_padding that lands exactly on `size`
        self.net = nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(filters, filters, 3, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(filters, filters, 3, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(filters, filters, 3, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(filters, 3, 3, 2, output_padding=pad))

    def forward(self, state):
        image = self.net(self.fc(state).reshape(-1, self.filters, self.side, self.side))
        return image.reshape(*state.shape[:-1], *image.shape[1:])


class LayerNormGRUCell(nn.Module):
    """GRU cell with LayerNorm on the gate pre-activations and update bias -1 (the authors' code
    and Dreamer). The paper only says "GRUCell"; with torch.nn.GRUCell's small uniform init the
    contrastive loss learns several times slower early on (--gru plain to compare)."""

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


class FP32GRUCell(nn.GRUCell):
    """torch.nn.GRUCell (`--gru plain`) run in fp32 also under bf16 autocast, which would otherwise
    run it in bf16 and carry h_t rounded to 8 bits of mantissa through every step (the LayerNorm
    cell's state is fp32 already: LayerNorm and the gates' arithmetic run in fp32 under autocast)."""

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float(), h.float())


class RSSM(nn.Module):
    """Appendix A.1. A state is a dict of (…, D) tensors: deter h, stoch s, mean, std."""

    def __init__(self, args: Args, action_dim: int):
        super().__init__()
        self.deter, self.stoch, self.min_std = args.deter, args.stoch, args.min_std
        self.obs_mlp = mlp(args.embed, [args.obs_mlp, args.obs_mlp], layer_norm=True)
        self.gru_mlp = mlp(args.stoch + action_dim, [args.gru_mlp, args.gru_mlp])
        self.gru_mlp.append(nn.ELU())  # its output feeds the GRU (ELU everywhere, A.2)
        cell = LayerNormGRUCell if args.gru == "layernorm" else FP32GRUCell
        self.cell = cell(args.gru_mlp, args.deter)
        self.prior_mlp = mlp(args.deter, [args.prior_mlp] * 3, 2 * args.stoch)
        self.posterior_mlp = mlp(args.deter + args.obs_mlp, [args.posterior_mlp] * 2, 2 * args.stoch)

    @property
    def state_dim(self) -> int:
        return self.deter + self.stoch

    def initial(self, batch: int, device) -> dict:
        """The state before the first step: h = 0, s = 0."""
        return dict(deter=torch.zeros(batch, self.deter, device=device),
                    stoch=torch.zeros(batch, self.stoch, device=device))

    def _gaussian(self, out: torch.Tensor, deter: torch.Tensor, noise: torch.Tensor) -> dict:
        # The paper does not say how sigma is parameterised; softplus + min std as in Dreamer
        # (the authors' code: exp of a clamped log-std). Statistics in fp32 also under bf16.
        mean, std = out.float().chunk(2, -1)
        std = F.softplus(std) + self.min_std
        return dict(deter=deter, stoch=mean + std * noise, mean=mean, std=std)

    def deter_step(self, stoch: torch.Tensor, action: torch.Tensor, deter: torch.Tensor) -> torch.Tensor:
        """h_t = GRUCell(h_{t-1}, GRU_MLP(s_{t-1}, a_{t-1}))."""
        return self.cell(self.gru_mlp(torch.cat([stoch, action], -1)), deter)

    def prior(self, deter: torch.Tensor, noise: torch.Tensor) -> dict:
        """(mu^, sigma^) = PriorMLP(h_t): the prediction before o_t is seen (any leading shape)."""
        return self._gaussian(self.prior_mlp(deter), deter, noise)

    def posterior_embed(self, x: torch.Tensor) -> torch.Tensor:
        """PosteriorMLP's first layer acts on [h_t, ObsMLP(x_t)]: W [h; e] + b = W_h h + (W_e e + b).
        This is the observation's half, W_e ObsMLP(x_t) + b, which does not depend on h_t."""
        first = self.posterior_mlp[0]
        return F.linear(self.obs_mlp(x), first.weight[:, self.deter:], first.bias)

    def posterior(self, deter: torch.Tensor, embed: torch.Tensor, noise: torch.Tensor) -> dict:
        """(mu, sigma) = PosteriorMLP(h_t, ObsMLP(x_t)), the correction model q(z_t | z^_t, x_t);
        `embed` = posterior_embed(x_t)."""
        first = self.posterior_mlp[0]
        out = self.posterior_mlp[1:](F.linear(deter, first.weight[:, :self.deter]) + embed)
        return self._gaussian(out, deter, noise)

    def obs_step(self, state: dict, action: torch.Tensor, x: torch.Tensor, noise=None) -> dict:
        """One filtering step (acting): posterior z_t from z_{t-1}, a_{t-1} and x_t. No prior:
        nothing uses it while acting."""
        deter = self.deter_step(state["stoch"], action, state["deter"])
        noise = torch.randn_like(deter[..., :self.stoch]) if noise is None else noise
        return self.posterior(deter, self.posterior_embed(x), noise)

    def observe(self, x: torch.Tensor, action: torch.Tensor, priors: bool = True):
        """x (T, B, embed); action (T, B, A) is a_{t-1}. Returns posteriors and priors (T, B, ...)
        (priors None if not asked for). The same computation as T calls of `obs_step`.

        Speed: only what depends on h_{t-1} stays in the time loop (GRU_MLP, GRUCell, W_h h_t and
        the rest of PosteriorMLP). ObsMLP and the observation half of PosteriorMLP's first layer
        run once over all T x B before the loop, PriorMLP once after it: on a GPU the loop's
        kernel launches, not its arithmetic, set the time. The noise of the priors and posteriors
        is drawn in one call (the same numbers as drawing it step by step, prior then posterior)."""
        T, B = x.shape[:2]
        noise = torch.randn(T, 2, B, self.stoch, device=x.device)  # (T, prior/posterior, B, stoch)
        embed = self.posterior_embed(x)  # (T, B, posterior_mlp)
        state, posts = self.initial(B, x.device), []
        for t in range(T):  # the recurrence: fixed shapes, no data-dependent control flow
            deter = self.deter_step(state["stoch"], action[t], state["deter"])  # h_t from a_{t-1}
            state = self.posterior(deter, embed[t], noise[t, 1])  # z_t, having seen x_t
            posts.append(state)
        post = {k: torch.stack([s[k] for s in posts]) for k in posts[0]}
        return post, self.prior(post["deter"], noise[:, 0]) if priors else None

    @staticmethod
    def latent(state: dict, mean: bool = False) -> torch.Tensor:
        """z = [h, s] (or [h, mu] with mean=True): (…, deter + stoch)."""
        return torch.cat([state["deter"], state["mean"] if mean else state["stoch"]], -1)


class WorldModel(nn.Module):
    """Theta: encoder f, RSSM, decoder g, reward r, inverse dynamics a, inverse temperature."""

    def __init__(self, args: Args, action_dim: int):
        super().__init__()
        self.encoder = Encoder(args.crop_size, args.cnn_filters, args.embed, args.gating)
        self.rssm = RSSM(args, action_dim)
        d = self.rssm.state_dim
        self.decoder = mlp(d, [args.decoder_mlp] * 2, args.embed, layer_norm=True)  # y_t = g(z^_t)
        self.reward = mlp(d, [args.reward_mlp] * 2, 1)
        self.inverse = mlp(2 * d, [args.inverse_mlp] * 2, action_dim)  # a^_{t-1} = a(z_t, z_{t-1})
        # lambda = softplus(rho) > 0; rho starts at 1.0 as in the authors' code.
        self.inverse_temperature_raw = nn.Parameter(torch.tensor(1.0))
        self.pixel_decoder = (PixelDecoder(d, args.crop_size, args.cnn_filters, self.encoder.conv_side)
                              if args.objective == "reconstruction" else None)
        self.apply(weight_init)

    @property
    def inverse_temperature(self):
        return F.softplus(self.inverse_temperature_raw)


class Actor(nn.Module):
    """pi(a | z): tanh-squashed Gaussian, [1024] x3, log-std squashed into [-10, 2]."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(state_dim, [hidden] * 3, 2 * action_dim)
        self.apply(weight_init)

    def forward(self, z: torch.Tensor) -> td.Distribution:
        mean, log_std = self.net(z).float().chunk(2, -1)  # log-probs are computed in fp32
        log_std = -10 + 0.5 * (2 - (-10)) * (torch.tanh(log_std) + 1)
        base = td.Normal(mean, log_std.exp())
        return td.Independent(td.TransformedDistribution(base, td.TanhTransform(cache_size=1)), 1)


def deterministic_action(dist: td.Distribution) -> torch.Tensor:
    """tanh of the Gaussian mean: the evaluation action."""
    return torch.tanh(dist.base_dist.base_dist.loc)


class Critics(nn.Module):
    """Two Q networks [1024] x3 -> 1 on [z, a]."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int):
        super().__init__()
        self.q1 = mlp(state_dim + action_dim, [hidden] * 3, 1)
        self.q2 = mlp(state_dim + action_dim, [hidden] * 3, 1)
        self.apply(weight_init)

    def forward(self, z, a):
        za = torch.cat([z, a], -1)  # output layers in fp32 also under bf16 (fp32_output)
        return fp32_output(self.q1, za).squeeze(-1), fp32_output(self.q2, za).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Replay buffer, and the index conventions of the whole file
# ---------------------------------------------------------------------------------------------
#
# Time-major sequences of T steps (T = seq_len), t = 0 .. T-1. Slot t of a sampled sequence holds
#   o_t       the observation (uint8 pixels, cropped),
#   a_{t-1}   the action that led to o_t (zeros at an episode's first slot),
#   r_t       the reward received with o_t, i.e. for a_{t-1} (0 at an episode's first slot),
#   cont_t    0 if the episode terminated at o_t, else 1.
# We write r_{t+1} for the reward that follows a_t (Sutton and Barto); the paper writes it r_t
# (Eq. 3, J_M). So for a transition (z_t, a_t, r_{t+1}, z_{t+1}) SAC reads a_t and r_{t+1} from
# slot t+1 and the states from slots t and t+1 ([:-1] and [1:]). States from `RSSM.observe` are
# indexed like the slots: post[t] = z_t = [h_t, s_t] (has seen o_0 .. o_t), prior[t] = z^_t (has
# seen o_0 .. o_{t-1} and a_{t-1}); y_t = g(z^_t) predicts x_t = f(o_t). There is no imagination:
# CoRe's behaviour learning is SAC on replayed posterior states, with one-step targets (Eq. 3-4).


class Replay:
    """Whole episodes in a flat ring of uint8 images; uniform sampling of in-episode sequences.

    Slot t of an episode holds o_t, a_{t-1}, r_t and cont_t (the conventions above). A sequence
    never crosses an episode boundary.

    Speed: the arrays are torch tensors on `device`. On CUDA the frames live on the GPU (paper
    sizes: 3 GB) and a mini-batch is gathered and cropped there in one indexing op, so only the
    sampled indices (a few hundred integers) cross the bus. On the host the frames are a numpy
    array viewed as a tensor, whose pages are allocated only as episodes arrive.
    """

    def __init__(self, capacity: int, obs_shape, action_dim: int, seed: int,
                 device: torch.device = torch.device("cpu")):
        self.capacity, self.device = capacity, torch.device(device)
        if self.device.type == "cpu":
            self.obs = torch.from_numpy(np.zeros((capacity, *obs_shape), np.uint8))
        else:
            self.obs = torch.zeros((capacity, *obs_shape), dtype=torch.uint8, device=self.device)
        self.action = torch.zeros(capacity, action_dim, device=self.device)
        self.reward = torch.zeros(capacity, device=self.device)
        self.cont = torch.ones(capacity, device=self.device)
        self.episode = np.full(capacity, -1, np.int64)  # episode id per slot, -1 = empty (host)
        self.pos = self.size = self.episodes = 0
        self.rng = np.random.default_rng(seed)
        self._starts, self._starts_length = np.zeros(0, np.int64), None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.obs, self.action, self.reward, self.cont)) \
            + self.episode.nbytes

    def add_episode(self, obs, action, reward, cont):
        n = len(obs)
        if n > self.capacity:
            raise ValueError(f"episode of {n} steps does not fit a replay of {self.capacity}")
        idx = (self.pos + np.arange(n)) % self.capacity
        slots = torch.as_tensor(idx, device=self.device)
        for store, value in ((self.obs, obs), (self.action, action), (self.reward, reward), (self.cont, cont)):
            store[slots] = torch.as_tensor(np.asarray(value), dtype=store.dtype).to(self.device)
        self.episode[idx] = self.episodes
        self.episodes += 1
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self._starts_length = None

    def valid_starts(self, length: int) -> np.ndarray:
        """Slots i such that i .. i+length-1 lie in one stored episode (episodes are contiguous)."""
        if self._starts_length != length:
            ok = (self.episode >= 0) & (self.episode == np.roll(self.episode, -(length - 1)))
            ok &= (np.arange(self.capacity) + length - 1 < self.capacity) | (self.size == self.capacity)
            self._starts, self._starts_length = np.flatnonzero(ok), length
        return self._starts

    def can_sample(self, length: int) -> bool:
        return len(self.valid_starts(length)) > 0

    def sample(self, batch: int, length: int, crop: int) -> dict:
        """Time-major tensors on the replay's device; obs (T, B, 3, crop, crop) uint8 with one
        random crop per sequence (A.3: the same crop position across the entire sequence)."""
        starts = self.rng.choice(self.valid_starts(length), size=batch)
        oy, ox = self.rng.integers(0, self.obs.shape[-1] - crop + 1, size=(2, batch))
        idx = (starts[None, :] + np.arange(length)[:, None]) % self.capacity  # (T, B)
        # one small host -> device copy: slots (T*B), then the crop offsets (B each)
        index = to_device_async(np.concatenate([idx.ravel(), oy, ox]), self.device)
        slots, oy, ox = index[:length * batch].view(length, batch), index[-2 * batch:-batch], index[-batch:]
        side = torch.arange(crop, device=self.device)
        rows = (oy[:, None] + side)[None, :, None, :, None]  # (1, B, 1, crop, 1)
        cols = (ox[:, None] + side)[None, :, None, None, :]  # (1, B, 1, 1, crop)
        channels = torch.arange(self.obs.shape[1], device=self.device)[None, None, :, None, None]
        obs = self.obs[slots[:, :, None, None, None], channels, rows, cols]  # (T, B, C, crop, crop)
        return dict(obs=obs, action=self.action[slots], reward=self.reward[slots], cont=self.cont[slots])

    def state_dict(self) -> dict:
        keep = slice(0, self.size)  # copies of the filled part (a view saves the whole storage)
        copy = lambda t: t[keep].to("cpu", copy=True)  # noqa: E731
        return dict(obs=copy(self.obs), action=copy(self.action), reward=copy(self.reward),
                    cont=copy(self.cont), episode=self.episode[keep], pos=self.pos,
                    size=self.size, episodes=self.episodes, rng=self.rng.bit_generator.state)

    def load_state_dict(self, state: dict):
        n = state["size"]
        for key in ("obs", "action", "reward", "cont"):
            getattr(self, key)[:n] = torch.as_tensor(state[key]).to(self.device)
        self.episode[:n] = state["episode"]
        self.pos, self.size, self.episodes = state["pos"], n, state["episodes"]
        self.rng.bit_generator.state = state["rng"]
        self._starts_length = None


def centre_crop(obs: np.ndarray, crop: int) -> np.ndarray:
    """(…, 3, S, S) -> (…, 3, crop, crop): the view used for acting and evaluation."""
    off = (obs.shape[-1] - crop) // 2
    return obs[..., off:off + crop, off:off + crop]



def to_device(batch: dict, device: torch.device) -> dict:
    """A sampled batch on the training device (a no-op when the replay lives there)."""
    return {key: value.to(device) for key, value in batch.items()}



# ---------------------------------------------------------------------------------------------
# World-model objective J_M (Sec. 2.2)
# ---------------------------------------------------------------------------------------------


def contrastive_scores(x: torch.Tensor, y: torch.Tensor, inverse_temperature: torch.Tensor) -> torch.Tensor:
    """lambda x_i^T y_j for all pairs (N, N), in fp32 also under bf16 autocast (the logits reach
    tens; bf16 would resolve them to ~0.25)."""
    with torch.autocast(x.device.type, enabled=False):
        return inverse_temperature.float() * x.float() @ y.float().T


def contrastive_loss(x: torch.Tensor, y: torch.Tensor, inverse_temperature: torch.Tensor,
                     same_sequence: torch.Tensor | None = None):
    """Eq. 1 over N (sequence, time) pairs: x, y (N, D). Scores lambda x_i^T y_j; the positive of
    row i is column i. Softmax over observations and over predictions, averaged; each term is a
    mean over pairs (the paper writes sums: a constant factor), so uninformative scores give
    log N. `same_sequence` (N, N) bool restricts negatives to the same sequence (Fig. 3).
    Returns (loss, top-1 accuracy of the positive among its row)."""
    scores = contrastive_scores(x, y, inverse_temperature)
    if same_sequence is not None:
        scores = scores.masked_fill(~same_sequence, float("-inf"))
    target = torch.arange(len(x), device=x.device)
    loss = 0.5 * (F.cross_entropy(scores, target) + F.cross_entropy(scores.T, target))
    accuracy = (scores.argmax(1) == target).float().mean()
    return loss, accuracy


def kl_loss(post: dict, prior: dict, free_nats: float) -> torch.Tensor:
    """Eq. 2: KL(q(s_t) || p(s^_t)) summed over latent dimensions, mean over (t, b); fp32."""
    q = td.Independent(td.Normal(post["mean"].float(), post["std"].float()), 1)
    p = td.Independent(td.Normal(prior["mean"].float(), prior["std"].float()), 1)
    kl = td.kl_divergence(q, p)
    return kl.clamp_min(free_nats).mean() if free_nats > 0 else kl.mean()


def world_model_forward(wm: WorldModel, batch: dict, priors: bool = True):
    """Encode and filter a time-major batch: x (T, B, embed), posteriors, priors, gating mask."""
    x, mask = wm.encoder(batch["obs"])
    post, prior = wm.rssm.observe(x, batch["action"], priors)
    return x, post, prior, mask


def model_loss(wm: WorldModel, batch: dict, args: Args):
    """J_M = L_c + beta L_KL + alpha_r (r - r^)^2 + alpha_a ||a - a^||^2. Returns (loss, metrics)."""
    x, post, prior, _ = world_model_forward(wm, batch)
    z = RSSM.latent(post)  # posterior z_t (T, B, D)
    T, B = x.shape[:2]
    metrics = {}
    if args.objective == "contrastive":
        # y_t decoded from the prior z^_t: a prediction of x_t made before seeing o_t (C.3). At
        # t = 0 the prior has seen nothing of the sequence, so that step is left out of L_c (the
        # authors' code does the same); every other (i, t) pair enters Eq. 1.
        source = RSSM.latent(prior) if args.predict_from == "prior" else z
        y = wm.decoder(source[1:])  # y_t = g(z^_t), t = 1 .. T-1: (T-1, B, embed)
        same = None
        if args.negatives == "same-sequence":
            seq = torch.arange(B, device=x.device).repeat(T - 1)
            same = seq[:, None] == seq[None, :]
        # x_t, t = 1 .. T-1, the positives of y_t; N = (T-1) x B pairs, (t, b) flattened t-major
        l_c, accuracy = contrastive_loss(x[1:].flatten(0, 1), y.flatten(0, 1), wm.inverse_temperature, same)
        metrics.update(contrastive_loss=l_c, contrastive_accuracy=accuracy,
                       inverse_temperature=wm.inverse_temperature.detach())
    else:
        # The "Recon" baseline: reconstruct the (cropped) pixels from the posterior, as a
        # sequential VAE does; unit-variance Gaussian, summed over pixels.
        target = batch["obs"].float() / 255.0
        l_c = 0.5 * ((wm.pixel_decoder(z).float() - target) ** 2).sum((-3, -2, -1)).mean()
        metrics["reconstruction_loss"] = l_c
    # Eq. 2 from t = 1 on: the prior at t = 0 comes from the zero initial state and a zero
    # action, not from anything in the sequence, so pulling the first posterior towards it
    # would only teach q to ignore o_0. ml-core leaves t = 0 out ("prior is uninformative").
    first = 0 if args.kl_first_step else 1
    l_kl = kl_loss({k: v[first:] for k, v in post.items()}, {k: v[first:] for k, v in prior.items()},
                   args.free_nats)  # q(z_t) against p(z^_t), t = first .. T-1
    loss = l_c + args.beta * l_kl
    metrics["kl_loss"] = l_kl
    if not args.no_reward_loss:
        # r_t (slot t, received with o_t) against r^_t = r(z_t), every t (posterior, as ml-core)
        reward_loss = ((batch["reward"] - fp32_output(wm.reward, z).squeeze(-1)) ** 2).mean()
        loss = loss + args.alpha_r * reward_loss
        metrics["reward_loss"] = reward_loss
    if not args.no_inverse_dynamics:
        # a^_{t-1} = a(z_t, z_{t-1}); slot t of the batch holds a_{t-1}. tanh: actions in [-1, 1].
        predicted = torch.tanh(wm.inverse(torch.cat([z[1:], z[:-1]], -1)).float())  # (z_t, z_{t-1}), t >= 1
        inverse_loss = ((batch["action"][1:] - predicted) ** 2).sum(-1).mean()  # a_{t-1}, t >= 1
        loss = loss + args.alpha_a * inverse_loss
        metrics["inverse_dynamics_loss"] = inverse_loss
    metrics["model_loss"] = loss
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# Behaviour learning: SAC on the posterior latent (Sec. 2.3)
# ---------------------------------------------------------------------------------------------


def sac_states(wm: WorldModel, batch: dict, args: Args, grad_to_model: bool) -> torch.Tensor:
    """Posterior states z_t (T, B, D) of the batch, differentiable in Theta if `grad_to_model`.
    The batch is filtered again after the J_M step: J_Q(theta_i, Theta) is a loss of the updated
    Theta (Algorithm 1 trains the model, then the critic, on the same mini-batch). No priors:
    J_Q does not use them."""
    with torch.set_grad_enabled(grad_to_model):
        _, post, _, _ = world_model_forward(wm, batch, priors=False)
        return RSSM.latent(post, mean=args.sac_state == "mean")


def critic_loss(critics: Critics, target_critics: Critics, actor: Actor, log_alpha, z, batch, args):
    """Eq. 3-4 on the transitions (z_t, a_t, r_{t+1}, z_{t+1}) of the sequences; slot t+1 of the
    batch holds a_t and r_{t+1}. Q values and targets in fp32."""
    # slots 1 .. T-1: a_t, r_{t+1}, cont_{t+1} for t = 0 .. T-2 (the paper's a_t, r_t)
    action, reward, cont = batch["action"][1:], batch["reward"][1:], batch["cont"][1:]
    with torch.no_grad():
        next_z = z[1:].detach()  # z_{t+1}
        dist = actor(next_z)
        next_action = dist.rsample()
        target_q = torch.min(*target_critics(next_z, next_action))
        v_target = target_q - log_alpha.exp() * dist.log_prob(next_action)  # Eq. 4
        y = reward + args.gamma * cont * v_target
    q1, q2 = critics(z[:-1], action)  # Q_i(z_t, a_t), t = 0 .. T-2
    loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
    return loss, dict(critic_loss=loss, q=q1.mean().detach(), target_q=y.mean())


def actor_loss(critics: Critics, actor: Actor, log_alpha, z):
    """Eq. 5 on detached states: alpha log pi(a|z) - min_i Q_i(z, a)."""
    dist = actor(z.detach())
    action = dist.rsample()
    log_prob = dist.log_prob(action)
    loss = (log_alpha.exp().detach() * log_prob - torch.min(*critics(z.detach(), action))).mean()
    return loss, log_prob.detach()


def alpha_loss(log_alpha, log_prob, target_entropy: float):
    """Automatic entropy temperature: push the policy entropy towards -|A|."""
    return -(log_alpha * (log_prob + target_entropy)).mean()


# ---------------------------------------------------------------------------------------------
# Agent: one update, acting
# ---------------------------------------------------------------------------------------------

LOSS_NAMES = ("model_loss", "critic_loss", "actor_loss", "alpha_loss")  # one non-finite flag each


class Agent:
    """The networks (world model Theta, actor phi, critics theta_1, theta_2 and their targets, the
    temperature alpha), one `Optimizer` per loss, `update` (one gradient step of Algorithm 1) and
    `act` (filtering and acting). `state_dict` is the checkpoint's `agent` entry."""

    def __init__(self, args: Args, action_dim: int, device: torch.device):
        self.args, self.device, self.action_dim = args, device, action_dim
        self.wm = WorldModel(args, action_dim).to(device)
        d = self.wm.rssm.state_dim
        self.actor = Actor(d, action_dim, args.ac_hidden).to(device)
        self.critics = Critics(d, action_dim, args.ac_hidden).to(device)
        self.target_critics = Critics(d, action_dim, args.ac_hidden).to(device)
        self.target_critics.load_state_dict(self.critics.state_dict())
        self.target_critics.requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(args.init_alpha), device=device, requires_grad=True)
        self.target_entropy = -float(action_dim)
        # Theta: encoder, RSSM and heads; lambda (the inverse temperature) has a rate of its own.
        self.theta = [p for p in self.wm.parameters() if p is not self.wm.inverse_temperature_raw]
        # One optimiser per loss (`Optimizer`, defined at the end of the file: fused Adam, clipping,
        # the non-finite skip).
        # J_M: Theta and lambda, the gradient norm clipped over the whole world model (Table 2).
        self.model_opt = Optimizer("model", [dict(params=self.theta), dict(
            params=[self.wm.inverse_temperature_raw], lr=args.inverse_temperature_lr)],
            args.model_lr, clip=args.model_clip, clip_params=self.wm.parameters())
        # J_Q trains the critics and Theta (Sec. 2.3). As in ml-core, Theta is a parameter group
        # of the critic's Adam (moments of its own, apart from J_M's) at its own rate; the clip
        # (Table 2: 100) is the critics' only, Theta's share is clipped by `clip_theta_share`.
        theta_share = [] if args.no_critic_grad_to_model else [dict(params=self.theta, lr=args.critic_model_lr)]
        self.critic_opt = Optimizer("critic", [dict(params=self.critics.parameters()), *theta_share],
                                    args.critic_lr, clip=args.critic_clip, clip_params=self.critics.parameters())
        self.actor_opt = Optimizer("actor", self.actor.parameters(), args.actor_lr, clip=args.actor_clip)
        self.alpha_opt = Optimizer("alpha", [self.log_alpha], args.alpha_lr,
                                   betas=(0.5, 0.999))  # authors' code: momentum_alpha 0.5
        self.updates = 0
        # 1.0 once a term of some update was non-finite: every later step is skipped as well
        self.halted = torch.zeros((), device=device)
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
        # The three loss computations of an update. Speed: with --compile each is compiled as a
        # whole (forward and backward, the 32-step observe loop unrolled), fixed shapes.
        self.model_losses, self.critic_losses, self.actor_losses = (
            self._model_losses, self._critic_losses, self._actor_losses)
        self.compile_seconds = None
        self.cudagraphs = args.compile and args.compile_mode == "reduce-overhead"
        if args.compile:
            mode = {"default": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(
                args.compile_mode, args.compile_mode)
            self.model_losses, self.critic_losses, self.actor_losses = (
                torch.compile(f, dynamic=False, mode=mode)
                for f in (self._model_losses, self._critic_losses, self._actor_losses))

    def _model_losses(self, batch: dict):
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.args.precision == "bf16"):
            return model_loss(self.wm, batch, self.args)

    def _critic_losses(self, batch: dict):
        args = self.args
        with torch.autocast(self.device.type, torch.bfloat16, enabled=args.precision == "bf16"):
            z = sac_states(self.wm, batch, args, not args.no_critic_grad_to_model)
            loss, metrics = critic_loss(self.critics, self.target_critics, self.actor, self.log_alpha,
                                        z, batch, args)
        return loss, metrics, z

    def _actor_losses(self, z: torch.Tensor):
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.args.precision == "bf16"):
            # z_t, t = 0 .. T-2: the states of J_Q's transitions
            pi_loss, log_prob = actor_loss(self.critics, self.actor, self.log_alpha, z[:-1])
        return pi_loss, alpha_loss(self.log_alpha, log_prob, self.target_entropy), log_prob

    def clip_theta_share(self) -> dict:
        """J_Q's gradient on Theta (Sec. 2.3, C.2): clipped at --critic-model-clip (0: measured
        only; ml-core clips only the critics) and checked with the critic's step. {} with
        --no-critic-grad-to-model."""
        if self.args.no_critic_grad_to_model:
            return {}
        if self.args.critic_model_clip > 0:
            norm = nn.utils.clip_grad_norm_(self.theta, self.args.critic_model_clip)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in self.theta if p.grad is not None])
        return {"critic_model_grad_norm": norm}

    def note_compile_time(self, start: float):
        """--compile: the first update's wall time, compilation included (printed by main)."""
        if self.compile_seconds is None and self.args.compile:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compile_seconds = time.perf_counter() - start

    def update(self, batch: dict):
        """One gradient step of Algorithm 1 on one mini-batch: J_M, then J_Q on the updated Theta,
        then J_pi and the temperature, then the target critics. Each step is skipped on the device
        if its loss or gradient norm is not finite, and so is every later one (`halted`). Returns
        (metrics, one non-finite flag per LOSS_NAMES entry): device tensors, no host sync."""
        start, graphs = time.perf_counter(), self.cudagraphs
        cudagraph_step(graphs)
        loss, metrics = self.model_losses(batch)  # J_M (Sec. 2.2)
        metrics |= self.model_opt(loss, self.halted)
        metrics = outlive_step(metrics, graphs)

        cudagraph_step(graphs)
        q_loss, q_metrics, z = self.critic_losses(batch)  # J_Q (Eq. 3-4), trains critics and Theta
        backward(q_loss, self.critic_opt)
        theta = self.clip_theta_share()
        metrics |= theta | self.critic_opt.step(q_loss, self.model_opt.skipped, *theta.values())
        # z goes into J_pi, which trains only the actor and alpha: a detached copy is the same input
        q_metrics, z = outlive_step(q_metrics, graphs), outlive_step(z, graphs)

        cudagraph_step(graphs)
        pi_loss, a_loss, log_prob = self.actor_losses(z)  # J_pi (Eq. 5) and the temperature loss
        # one backward: neither loss reaches the other's parameter (alpha is detached in J_pi)
        backward(pi_loss + a_loss, self.actor_opt, self.alpha_opt)
        metrics |= self.actor_opt.step(pi_loss, self.critic_opt.skipped)
        self.alpha_opt.step(a_loss, self.actor_opt.skipped)  # (its gradient norm is not logged)
        self.halted = self.alpha_opt.skipped
        with torch.no_grad():  # Polyak averaging (Table 2: tau every update), none once halted
            lerp_(list(self.target_critics.parameters()), list(self.critics.parameters()),
                  self.args.tau * (1 - self.halted))
        self.updates += 1
        metrics.update(q_metrics, actor_loss=pi_loss.detach(), alpha=self.log_alpha.exp().detach(),
                       alpha_loss=a_loss.detach(), entropy=-log_prob.mean())
        self.note_compile_time(start)
        flags = [opt.flag for opt in (self.model_opt, self.critic_opt, self.actor_opt, self.alpha_opt)]
        return {k: v.detach() for k, v in outlive_step(metrics, graphs).items()}, torch.stack(flags)

    @torch.no_grad()
    def act(self, obs: np.ndarray, state, explore: bool):
        """Filter one centre-cropped observation and pick an action; state = (posterior, a_{t-1})."""
        if state is None:
            post = self.wm.rssm.initial(1, self.device)
            prev = torch.zeros(1, self.action_dim, device=self.device)
        else:
            post, prev = state
        obs_t = torch.as_tensor(np.ascontiguousarray(centre_crop(obs, self.args.crop_size)),
                                device=self.device)[None]
        with self.autocast:
            x, _ = self.wm.encoder(obs_t)
            post = self.wm.rssm.obs_step(post, prev, x)
            dist = self.actor(RSSM.latent(post, mean=self.args.sac_state == "mean"))
        action = dist.sample() if explore else deterministic_action(dist)
        return action[0].float().cpu().numpy(), (post, action.float())

    def num_parameters(self) -> int:
        """Trained parameters: world model, actor, critics (not the target critics)."""
        return sum(p.numel() for m in (self.wm, self.actor, self.critics) for p in m.parameters())

    def modules(self) -> dict:
        return dict(wm=self.wm, actor=self.actor, critics=self.critics, target_critics=self.target_critics,
                    model_opt=self.model_opt, critic_opt=self.critic_opt, actor_opt=self.actor_opt,
                    alpha_opt=self.alpha_opt)

    def state_dict(self) -> dict:
        state = {k: m.state_dict() for k, m in self.modules().items()}
        return dict(state, log_alpha=self.log_alpha.detach().cpu(), updates=self.updates)

    def load_state_dict(self, state: dict):
        for key, module in self.modules().items():
            module.load_state_dict(state[key])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.updates = state["updates"]


def evaluate(agent: Agent, env, episodes: int, seeds: list[int], record: bool = False, stop=None):
    """Mean return of `episodes` episodes with the deterministic policy, episode j reset with
    seeds[j]; frames of the first. None if `stop` was raised (the evaluation then reruns)."""
    returns, frames = [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seeds[ep])
        state, total, done = None, 0.0, False
        while not done:
            if record and ep == 0:
                frames.append(obs.transpose(1, 2, 0))
            action, state = agent.act(obs, state, explore=False)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated
            if stop is not None and stop.signum is not None:
                return None
        returns.append(total)
    return float(np.mean(returns)), frames



# ---------------------------------------------------------------------------------------------
# Environments and the speed benchmark
# ---------------------------------------------------------------------------------------------


def make_env(args: Args, split: str, seed: int):
    """The env at the paper's observation settings: control-suite families render at
    render_height x render_width and are resized to render_size square (A.3)."""
    distraction = args.distraction or ("medium" if args.env.startswith("dcs-") else "none")
    kw = {}
    if args.render_height and args.render_width and args.env.split("-")[0] in ("dmc", "dcs", "natural"):
        kw["render_shape"] = (args.render_height, args.render_width)
    return envs.make(args.env, distraction=distraction, dynamic=args.dynamic, seed=seed,
                     image_size=args.render_size, action_repeat=args.action_repeat, split=split,
                     video_dir=args.video_dir, time_limit=args.time_limit, **kw)


def video_source(args: Args) -> str:
    """Where background videos come from (the papers use DAVIS 2017)."""
    return envs.video_source(args.env, args.distraction, args.video_dir)


def measure_speed(args: Args, device: torch.device) -> dict:
    """Speed benchmark. Updates: median seconds per update over `args.measure_updates` updates
    (after 2 warm-ups, the first of which compiles with --compile) on a random batch of the
    configured size (model and optimisers only, no env, no replay). Acting: env steps per second
    of the acting loop (policy step + env step, exploration actions) over 50 agent steps."""
    configure_torch(args, device)
    env = make_env(args, "train", args.seed)
    action_dim = env.action_space.shape[0]
    agent = Agent(args, action_dim, device)
    T, B, S = args.seq_len, args.batch_size, args.crop_size
    batch = dict(obs=torch.randint(0, 255, (T, B, 3, S, S), dtype=torch.uint8, device=device),
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
        obs, _, terminated, truncated, info = env.step(action)
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
# Main loop (Algorithm 1)
# ---------------------------------------------------------------------------------------------


def main(args: Args):
    if args.measure_updates > 0:
        return measure_speed(args, resolve_device(args.device))
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if args.crop_size > args.render_size:
        raise SystemExit(f"error: --crop-size {args.crop_size} must not exceed --render-size {args.render_size}")
    device = resolve_device(args.device)

    seed_everything(args.seed)
    configure_torch(args, device)

    # Evaluation on the validation videos, as the paper does. Every episode is reset with its own
    # seed (episode_seed), so the evaluation env needs no stored RNG state to resume exactly.
    try:  # bad input (env id, distraction, video folder, shapes) ends here with a message
        env, eval_env = make_env(args, "train", args.seed), make_env(args, "val", args.seed + 10_000)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    if hasattr(env.action_space, "n"):
        raise SystemExit(f"error: {args.env} has discrete actions; CoRe's SAC needs a Box action space")
    run_name = f"{args.env}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.resume).parent if args.resume else Path("runs") / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "checkpoint.pt"
    action_dim = env.action_space.shape[0]

    agent = Agent(args, action_dim, device)
    repeat = args.action_repeat or envs.default_action_repeat(args.env)  # None: the task's (envs)
    replay = Replay(replay_slots(args.replay_capacity, args.total_steps, repeat, args.seq_len),
                    env.observation_space.shape, action_dim,
                    args.seed, replay_device(args, device))
    # updates_due: gradient steps still owed to the last collected episode (a resumed run makes
    # up those an interrupt cut short); evals: completed evaluations (seeds their episodes).
    counters = dict(env_steps=0, agent_steps=0, episodes=0, evals=0, next_eval=args.eval_every,
                    last_eval=-1, last_log=0, updates_due=0)
    if checkpoint is not None:
        agent.load_state_dict(checkpoint["agent"])
        counters.update(checkpoint["counters"])
        load_replay(args.resume, checkpoint, replay, counters)
        seed_everything(args.seed, checkpoint["rng"])  # the RNG states where the checkpoint left them
        del checkpoint
    logger = Logger(run_dir, args, resume_step=counters["env_steps"] if args.resume else None)
    stop = StopFlag()

    params = agent.num_parameters()
    print(f"run {run_dir} | device {device} | {params / 1e6:.1f}M parameters | replay "
          f"{replay.capacity:,} agent steps on {replay.device.type}, up to {replay.nbytes / 2**30:.2f} GiB | "
          f"{args.updates_per_step} updates per agent step, batch {args.batch_size}x{args.seq_len} | "
          f"videos: {video_source(args)}", flush=True)
    overrides = preset_overrides(args)
    print(f"preset {args.preset}: " + (", ".join(f"{k}={v}" for k, v in overrides.items()) or
                                       "the paper's settings (Args defaults)"), flush=True)
    if args.resume:
        print(f"resumed from {args.resume} at env step {counters['env_steps']} (the interrupted episode "
              f"was stored as truncated; a new episode starts)", flush=True)

    progress, watch = Progress(args, counters, args.updates_per_step), NonFiniteWatch(LOSS_NAMES)
    run = dict(last_return=0.0, metrics={}, log_time=time.time(), log_updates=agent.updates)

    def write_checkpoint(with_replay: bool):
        """checkpoint.pt, and replay.pt if `with_replay` (see save_checkpoint)."""
        save_checkpoint(ckpt_path, agent, replay if with_replay else None, counters, args)

    def close():
        stop.restore()
        logger.close()
        env.close()
        eval_env.close()

    def interrupted():
        write_checkpoint(with_replay=True)
        print(f"interrupted at step {counters['env_steps']}; resume with: python "
              f"{os.path.basename(__file__)} --resume {ckpt_path}", flush=True)
        close()
        sys.exit(128 + stop.signum)  # 130 for SIGINT, 143 for SIGTERM

    def check_finite(keep: int):
        bad = watch.first_bad(keep)
        if bad is not None:
            names, update, step = bad
            name = names[0]  # the first of the update's non-finite losses, in the order of LOSS_NAMES
            write_checkpoint(with_replay=True)
            print(f"error: non-finite {name} at update {update} (env step {step}); checkpoint from "
                  f"before it: {ckpt_path}", file=sys.stderr, flush=True)
            close()
            sys.exit(1)

    def train_burst():
        """The gradient steps owed to the last episode, each on a fresh mini-batch. A run resumed
        without replay.pt may owe updates from before the interrupt to an empty replay: they wait
        until the replay holds a sequence again (the next episode's end sets a new count)."""
        while counters["updates_due"] > 0 and replay.can_sample(args.seq_len):
            check_finite(keep=1)
            start = time.perf_counter()
            batch = to_device(replay.sample(args.batch_size, args.seq_len, args.crop_size), device)
            run["metrics"], flags = agent.update(batch)
            watch.push(flags, agent.updates, counters["env_steps"])
            counters["updates_due"] -= 1
            if args.compile and progress.updates == 0 and "compiled" not in run:
                run["compiled"] = True
                print(f"compiled in {agent.compile_seconds:.1f} s", flush=True)
            else:  # the compiling update is not counted in s/update
                progress.update_time += time.perf_counter() - start
                progress.updates += 1
            progress.maybe_print(counters, "train", run["last_return"], agent.updates)
            if stop.signum is not None:
                interrupted()
        check_finite(keep=0)

    def run_eval():
        """One evaluation round; `next_eval` moves on only once it completed."""
        seeds = [episode_seed(args.seed, "eval", counters["evals"] * 10_000 + j) for j in range(args.eval_episodes)]
        result = evaluate(agent, eval_env, args.eval_episodes, seeds, args.capture_video or args.gating, stop)
        if result is None:
            interrupted()
        ret, frames = result
        step = counters["env_steps"]
        logger.log(step, {"eval/episodic_return": ret}, videos=video_source(args))
        if frames and args.capture_video:
            save_video(frames, run_dir / "videos" / f"eval_{step}.mp4")
            strip = np.concatenate(frames[:: max(1, len(frames) // 8)][:8], axis=1)
            logger.writer.add_image("eval/frames", strip, step, dataformats="HWC")
        if frames and args.gating:  # what the gating CNN lets through, next to the input
            picks = np.stack([centre_crop(f.transpose(2, 0, 1), args.crop_size)
                              for f in frames[:: max(1, len(frames) // 8)][:8]])
            with torch.no_grad():
                _, mask = agent.wm.encoder(torch.as_tensor(picks, device=device))
            masks = (mask.float().cpu().numpy() * 255).astype(np.uint8).repeat(3, axis=1)
            grid = np.concatenate([np.concatenate(list(picks), axis=2), np.concatenate(list(masks), axis=2)], 1)
            logger.writer.add_image("eval/gating_mask", grid, step, dataformats="CHW")
        print(f"eval at {step}: return {ret:.1f}", flush=True)
        counters["last_eval"], counters["evals"] = step, counters["evals"] + 1
        while args.eval_every and counters["next_eval"] <= step:
            counters["next_eval"] += args.eval_every
        if args.save_model:
            write_checkpoint(with_replay=replay_due(args, counters["evals"], counters))

    def collect_episode():
        """One whole episode; the first `prefill` agent steps' episodes act uniformly at random
        and earn no updates (ml-core), later ones earn 0.5 x (episode length) updates."""
        obs, _ = env.reset(seed=episode_seed(args.seed, "train", counters["episodes"]))
        random_episode = counters["agent_steps"] < args.prefill
        phase = "prefill" if random_episode else "train"
        ep = dict(obs=[obs], action=[np.zeros(action_dim, np.float32)], reward=[0.0], cont=[1.0])
        state, done, episode_return = None, False, 0.0
        while not done:
            start = time.perf_counter()
            if random_episode:
                action = np.random.uniform(-1, 1, action_dim).astype(np.float32)
            else:
                action, state = agent.act(obs, state, explore=True)
            obs, reward, terminated, truncated, info = env.step(action)
            progress.acting_time += time.perf_counter() - start
            counters["env_steps"] += info["env_steps"]
            counters["agent_steps"] += 1
            episode_return += reward
            for key, value in zip(("obs", "action", "reward", "cont"), (obs, action, reward, 1.0 - terminated)):
                ep[key].append(value)
            done = terminated or truncated
            progress.maybe_print(counters, phase, run["last_return"], agent.updates)
            if stop.signum is not None and not done:
                if len(ep["obs"]) >= 2:  # kept as a truncated episode (it did not terminate)
                    replay.add_episode(*(np.asarray(ep[k]) for k in ("obs", "action", "reward", "cont")))
                    counters["episodes"] += 1
                interrupted()
        replay.add_episode(*(np.asarray(ep[k]) for k in ("obs", "action", "reward", "cont")))
        counters["episodes"] += 1
        length = len(ep["reward"]) - 1
        run["last_return"] = episode_return
        logger.log(counters["env_steps"], {"charts/episodic_return": episode_return,
                                           "charts/episodic_length": length})
        if not random_episode and replay.can_sample(args.seq_len):
            counters["updates_due"] = int(round(args.updates_per_step * length))
        if stop.signum is not None:
            interrupted()

    phase = "prefill" if counters["agent_steps"] < args.prefill else "train"
    progress.maybe_print(counters, phase, run["last_return"], agent.updates, force=True)
    while True:
        train_burst()
        step = counters["env_steps"]
        if step > counters["last_log"] and (step - counters["last_log"] >= args.log_every or step >= args.total_steps):
            now = time.time()
            logs = {f"losses/{k}": v for k, v in run["metrics"].items()}
            logs.update({"charts/SPS": progress.sps(counters), "charts/updates": agent.updates,
                         "charts/updates_per_second": (agent.updates - run["log_updates"]) / (now - run["log_time"])})
            logger.log(step, logs)
            counters["last_log"], run["log_time"], run["log_updates"] = step, now, agent.updates
        if args.eval_every and counters["env_steps"] >= counters["next_eval"]:
            run_eval()
        if counters["env_steps"] >= args.total_steps:
            break
        collect_episode()

    if counters["last_eval"] != counters["env_steps"]:
        run_eval()
    progress.maybe_print(counters, "train", run["last_return"], agent.updates, force=True)
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
