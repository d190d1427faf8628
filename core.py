"""CoRe: a contrastive recurrent state-space model, and SAC on its latent state.

Paper: N. Srivastava, W. Talbott, M. Bertran Lopez, S. Zhai, J. M. Susskind, "Robust Robotic
Control from Pixels using Contrastive Recurrent State-Space Models", NeurIPS Deep RL Workshop
2021, arXiv:2112.01163. Authors' code: apple/ml-core (`train.py`, `world_model.py`,
`configs/dcs/core.yaml`). "Table 1-3" below are the appendix's architecture, hyper-parameter and
action-repeat tables; "main Table 2-3" and "Fig." are the paper's (variants, results).

The idea. A recurrent state-space model is trained without reconstructing pixels: the *prior*
latent state (the model's prediction before it sees the observation) is decoded to a vector y_t
that must pick out the encoding x_t of the real observation among all other observations of the
mini-batch (InfoNCE). Distractions that the dynamics cannot predict (video backgrounds, camera
shake, colour drift) are of no use for that, so the representation learns to ignore them. SAC is
trained on the posterior latent state, and its critic loss also trains the encoder and the RSSM.

Paper map (equation -> where it is implemented), in the order of this file:
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
  the encoder/RSSM parameters Theta (Sec. 2.3, C.2). `critic_loss` (states: `sac_states`).
- Eq. 5, actor: J_pi = alpha log pi(a_t | z_t) - min_i Q_i(z_t, a_t), on detached states;
  automatic entropy temperature with target entropy -|A| (Table 2). `actor_loss`.
- Algorithm 1 / App. A.3: collect one episode, then 0.5 x (episode length) gradient steps, each
  mini-batch used for J_M, J_Q and J_pi in turn. `Agent.update` (one gradient step), `main`.

The method runs from here to the APPENDIX banner; below it, the same text in all five scripts:
run settings, the run object, the compute object (device, precision, speed), the replay.
Shapes are time-major: replay sequences (T, B, ...), states (T, B, D). Control-suite frames are
rendered at 320x240 and resized to 100x100 uint8 (App. A.3), then randomly cropped to 84x84 with
the same crop for a whole sequence; acting uses the centre crop.

    python core.py --env dcs-walker-walk --distraction medium
    python core.py --env dcs-walker-walk --distraction medium --preset small   # a 2-core CPU
    python core.py --env dcs-walker-walk --distraction medium --preset tiny    # smoke test
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass, replace
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


@dataclass
class Args:
    """The algorithm: every default is the paper's setting for its main benchmark (Distracting
    Control Suite, dynamic medium distractions, App. A.3 and Tables 1-3) or says why not. How a
    run is carried out (device, budget, evaluation, checkpoints): `RunSettings`, in the appendix."""

    # Environment and observations (App. A.3).
    env: str = "dcs-walker-walk"  # paper Sec. 3: one of DCS's six tasks; any id of envs.make
    distraction: Optional[str] = None  # paper Sec. 3: None is medium for dcs-*, none otherwise
    dynamic: bool = True  # paper Sec. 3.1: distractions move within an episode (dynamic setting)
    video_dir: Optional[str] = None  # ours: DAVIS 2017 or video folder (default: the built-in pool)
    eval_split: Literal["train", "val"] = "val"  # paper Sec. 3: scores on the validation videos
    seed: int = 1  # ours: seeds the networks, the replay and every episode (CleanRL's default)
    action_repeat: Optional[int] = None  # paper Table 3: per task (None or 0: the env's default)
    preset: Literal["paper", "small", "tiny"] = "paper"  # ours: these defaults, or PRESETS below
    time_limit: Optional[int] = None  # paper App. A.3: 1000 simulator steps (None: the env's)
    render_size: int = 100  # paper App. A.3: frames resized to 100 x 100
    render_height: Optional[int] = 240  # paper App. A.3: rendered 320 x 240 (None or 0: square)
    render_width: Optional[int] = 320  # paper App. A.3: the render's width before the resize
    crop_size: int = 84  # paper App. A.3: random 84 x 84 crops, one per sequence; acting: centre

    # Replay and schedule (App. A.3, Table 2).
    replay_capacity: int = 100_000  # paper Table 2: 100,000 agent steps
    batch_size: int = 32  # paper App. A.3: N = 32 sequences
    seq_len: int = 32  # paper App. A.3: T = 32 steps
    prefill: int = 1000  # paper Table 2: initial agent steps of random actions, whole episodes
    updates_per_step: float = 0.5  # paper App. A.3: 0.5 x an episode's agent steps after it

    # World model (Table 1).
    cnn_filters: int = 32  # paper Table 1: filters of the 4 encoder conv layers
    embed: int = 50  # paper Table 1: encoder output x_t (the contrastive target), LayerNorm
    obs_mlp: int = 256  # paper Table 1: ObsMLP [256, 256] + LayerNorm
    gru_mlp: int = 400  # paper Table 1: GRU_MLP [400, 400]
    deter: int = 200  # paper Table 1: GRUCell hidden units h_t
    gru: Literal["layernorm", "plain"] = "layernorm"  # authors' code: LayerNorm GRU; plain: torch's
    prior_mlp: int = 400  # paper Table 1: PriorMLP [400, 400, 400]
    posterior_mlp: int = 400  # paper Table 1: PosteriorMLP [400, 400]
    stoch: int = 64  # authors' code: stochastic state size (latent_dims; the paper gives none)
    decoder_mlp: int = 256  # paper Table 1: decoder g [256, 256, embed] + LayerNorm
    reward_mlp: int = 128  # paper Table 1: reward predictor [128, 128, 1]
    inverse_mlp: int = 128  # paper Table 1: inverse dynamics [128, 128, |A|]
    min_std: float = 0.1  # ours: sigma = softplus(x) + min_std (Dreamer's; authors' code: log-std)

    # Objective J_M (Sec. 2.2, Table 2) and the paper's ablations (App. C).
    beta: float = 0.01  # paper Table 2: KL weight
    alpha_r: float = 1.0  # paper Table 2: reward prediction weight
    alpha_a: float = 1.0  # paper Table 2: inverse dynamics weight
    free_nats: float = 0.0  # paper Eq. 2: none (authors' code: 1.0, a clamp of the per-step KL)
    kl_first_step: bool = False  # False: L_KL from t = 1, as world_model.py (Eq. 2 reads z_{t-1})
    objective: Literal["contrastive", "reconstruction"] = "contrastive"  # main Table 2-3: "Recon"
    negatives: Literal["batch", "same-sequence"] = "batch"  # paper Fig. 3: negatives' source
    predict_from: Literal["prior", "posterior"] = "prior"  # paper Sec. 2.2, App. C.3: y_t = g(z^_t)
    no_inverse_dynamics: bool = False  # paper App. C.1: ablation (Sec. 2.2 keeps the loss)
    no_reward_loss: bool = False  # paper App. C.1: ablation (Sec. 2.2 keeps the loss)
    no_critic_grad_to_model: bool = False  # paper App. C.2: ablation (Sec. 2.3 trains Theta by J_Q)
    gating: bool = False  # paper Sec. 3.5: a gating CNN before the encoder; masks logged at eval

    # Behaviour: SAC (Sec. 2.3, Table 2).
    ac_hidden: int = 1024  # paper Table 1: actor and critic MLPs [1024] x 3
    sac_state: Literal["sample", "mean"] = "sample"  # paper Eq. 3: z_t ~ q (authors' code: mean)
    gamma: float = 0.99  # authors' code (configs/dcs/core.yaml): discount
    tau: float = 0.005  # paper Table 2: target critic update rate, every update
    init_alpha: float = 0.1  # authors' code: initial entropy temperature (log alpha = -2.3)
    model_lr: float = 3e-4  # paper Table 2: J_M's rate (encoder, RSSM, heads)
    inverse_temperature_lr: float = 3e-4  # paper: lambda is part of Theta (authors' code: 2e-3)
    critic_model_lr: float = 1e-3  # authors' code: J_Q's rate on Theta (Theta in the critic's Adam)
    critic_model_clip: float = 0.0  # authors' code: J_Q's gradient on Theta unclipped (0: none)
    critic_lr: float = 1e-3  # paper Table 2: critic learning rate
    actor_lr: float = 1e-3  # paper Table 2: actor learning rate
    alpha_lr: float = 1e-3  # authors' code (configs/dcs/core.yaml): temperature learning rate
    model_clip: float = 10.0  # paper Table 2: model max grad norm
    critic_clip: float = 100.0  # paper Table 2: critic max grad norm
    actor_clip: float = 10.0  # paper Table 2: actor max grad norm


TOTAL_STEPS = 500_000  # paper Sec. 3: results at 500K env steps (--total-steps)

# Every setting other than the paper's (flags you set win); why and what it measured: docs/core.md.
PRESETS = {
    # ours: the same algorithm sized for a 2-core CPU, 100K env steps of dmc-cartpole-swingup:
    "small": dict(
        cnn_filters=16, obs_mlp=128, gru_mlp=128, deter=128, prior_mlp=128, posterior_mlp=128,
        stoch=32, decoder_mlp=128, reward_mlp=64, inverse_mlp=64,
        ac_hidden=256,  # 1.4M parameters instead of 10.9M
        batch_size=8, seq_len=16, updates_per_step=0.4,  # ~0.45 s an update on one CPU thread
        render_size=72, render_height=72, render_width=96,  # A.3's 320x240 renders take ~40 ms
        crop_size=64, total_steps=100_000, eval_episodes=5),
    # ours: end to end in well under a minute (smoke tests)
    "tiny": dict(cnn_filters=8, embed=16, obs_mlp=32, gru_mlp=32, deter=32, prior_mlp=32,
                 posterior_mlp=32, stoch=8, decoder_mlp=32, reward_mlp=16, inverse_mlp=16,
                 ac_hidden=32, batch_size=4, seq_len=8, render_size=48, render_height=None,
                 render_width=None, crop_size=40, prefill=100, eval_episodes=1, time_limit=200,
                 replay_capacity=10_000, total_steps=2000),
}


def presets(args: Args) -> dict:
    """The PRESETS entries a run applies, by name, in order (later wins): here the one --preset names."""
    return {args.preset: PRESETS[args.preset]} if args.preset in PRESETS else {}


# ---------------------------------------------------------------------------------------------
# Networks (Table 1)
# ---------------------------------------------------------------------------------------------


def mlp(inp: int, hidden: list[int], out: int | None = None, act=nn.ELU, layer_norm=False):
    """Fully-connected net: `hidden` layers with `act`, then an optional linear output, then an
    optional LayerNorm on the final layer (ELU everywhere but the encoder, App. A.2)."""
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
    """net(x) with its output layer in fp32 also under --precision bf16: a reward or a Q near 500
    would be resolved to 2-4 units in bf16, coarser than the errors it is trained on."""
    hidden = net[:-1](x)
    with full_precision(x):
        return net[-1](hidden.float())


def weight_init(m: nn.Module):
    """The CURL / SAC-AE initialisation that CoRe borrows with the encoder (App. A.2): orthogonal
    linear layers, delta-orthogonal convolutions (only the kernel centre is non-zero), zero biases
    (with PyTorch's default the contrastive loss sits at log N for ~150 updates)."""
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
        mask = self.gate(image) if self.gate is not None else None
        x = self.fc(self.convs(image if mask is None else image * mask).flatten(1))
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
    and Dreamer). The paper only says "GRUCell" (--gru plain: torch.nn.GRUCell)."""

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
    """torch.nn.GRUCell (`--gru plain`) in fp32 also under --precision bf16, which would otherwise
    carry h_t rounded to 8 bits of mantissa through every step (the LayerNorm cell's state is fp32
    already: LayerNorm and the gates' arithmetic run in fp32)."""

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        with full_precision(x):
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
        """x (T, B, embed); action (T, B, A) is a_{t-1}. Posteriors and priors (or None) (T, B, ...):
        T calls of `obs_step`, with ObsMLP, the observation half of PosteriorMLP and PriorMLP run
        once over all T x B, outside the time loop; the noise of both drawn in one call."""
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
    """pi(a | z): tanh-squashed Gaussian, [1024] x3, log-std squashed into [-10, 2] (Table 2)."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(state_dim, [hidden] * 3, 2 * action_dim)
        self.apply(weight_init)

    def forward(self, z: torch.Tensor) -> td.Distribution:
        mean, log_std = self.net(z).float().chunk(2, -1)  # log-probs are computed in fp32
        log_std = -10 + 0.5 * (2 - (-10)) * (torch.tanh(log_std) + 1)
        base = td.Normal(mean, log_std.exp())
        return td.Independent(td.TransformedDistribution(base, td.TanhTransform(cache_size=1)), 1)


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
# World-model objective J_M (Sec. 2.2)
# ---------------------------------------------------------------------------------------------
#
# Index conventions. Time-major sequences of T steps (T = seq_len), t = 0 .. T-1. Slot t of a
# replayed sequence holds
#   o_t       the observation (uint8 pixels, cropped),
#   a_{t-1}   the action that led to o_t (zeros at an episode's first slot),
#   r_t       the reward received with o_t, i.e. for a_{t-1} (0 at an episode's first slot),
#   cont_t    0 if the episode terminated at o_t, else 1.
# We write r_{t+1} for the reward that follows a_t (Sutton and Barto; the paper's Sec. 2 too, its
# Eq. 3 writes r_t). J_M's reward head r(z_t) predicts slot t's reward, the one received with o_t,
# as in ml-core. For a transition (z_t, a_t, r_{t+1}, z_{t+1}) SAC reads a_t and r_{t+1} from
# slot t+1 and the states from slots t and t+1 ([:-1] and [1:]). States from `RSSM.observe` are
# indexed like the slots: post[t] = z_t = [h_t, s_t] (has seen o_0 .. o_t), prior[t] = z^_t (has
# seen o_0 .. o_{t-1} and a_{t-1}); y_t = g(z^_t) predicts x_t = f(o_t). There is no imagination:
# CoRe's behaviour learning is SAC on replayed posterior states, with one-step targets (Eq. 3-4).


def centre_crop(obs: np.ndarray, crop: int) -> np.ndarray:
    """(…, 3, S, S) -> (…, 3, crop, crop): the view used for acting and evaluation."""
    off = (obs.shape[-1] - crop) // 2
    return obs[..., off:off + crop, off:off + crop]


def random_crop(batch: dict, rng: np.random.Generator, crop: int) -> dict:
    """App. A.3: one random crop position for a whole sequence, obs (T, B, 3, S, S) -> (T, B, 3,
    crop, crop), drawn from `rng` (the replay's, right after it drew the sequences)."""
    obs = batch["obs"]
    T, B, C, S = *obs.shape[:3], obs.shape[-1]
    offsets = to_device_async(rng.integers(0, S - crop + 1, size=(2, B)), obs.device)  # (y, x)
    span = torch.arange(crop, device=obs.device)
    rows = (offsets[0][:, None] + span)[None, :, None, :, None]  # (1, B, 1, crop, 1)
    cols = (offsets[1][:, None] + span)[None, :, None, None, :]  # (1, B, 1, 1, crop)
    at = (torch.arange(T, device=obs.device)[:, None, None, None, None],
          torch.arange(B, device=obs.device)[None, :, None, None, None],
          torch.arange(C, device=obs.device)[None, None, :, None, None])
    return dict(batch, obs=obs[at[0], at[1], at[2], rows, cols])


def contrastive_scores(x: torch.Tensor, y: torch.Tensor, inverse_temperature: torch.Tensor) -> torch.Tensor:
    """lambda x_i^T y_j for all pairs (N, N), in fp32 also under --precision bf16 (the logits
    reach tens; bf16 would resolve them to ~0.25)."""
    with full_precision(x):
        return inverse_temperature.float() * x.float() @ y.float().T


def contrastive_loss(x: torch.Tensor, y: torch.Tensor, inverse_temperature: torch.Tensor,
                     same_sequence: torch.Tensor | None = None):
    """Eq. 1 over N (sequence, time) pairs: x, y (N, D). Scores lambda x_i^T y_j; the positive of
    row i is column i. Softmax over observations and over predictions, averaged (0.5 (l + l^T):
    ml-core's, so L_c weighs half of the paper's sum of the two against beta L_KL); each term a
    mean over pairs (the paper writes sums: a constant factor): uninformative scores give log N.
    `same_sequence` (N, N) bool restricts negatives to the same sequence (Fig. 3). Returns (loss,
    top-1 accuracy of the positive among its row)."""
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
                       inverse_temperature=wm.inverse_temperature)
    else:
        # The "Recon" baseline: reconstruct the (cropped) pixels from the posterior, as a
        # sequential VAE does; unit-variance Gaussian, summed over pixels.
        target = batch["obs"].float() / 255.0
        l_c = 0.5 * ((wm.pixel_decoder(z).float() - target) ** 2).sum((-3, -2, -1)).mean()
        metrics["reconstruction_loss"] = l_c
    # Eq. 2 from t = 1 on: the prior at t = 0 comes from the zero initial state (and a_{-1}),
    # not from anything the sequence has shown, so pulling the first posterior towards it would
    # only teach q to ignore o_0. ml-core leaves t = 0 out ("prior is uninformative").
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
    return loss, {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# Behaviour learning: SAC on the posterior latent (Sec. 2.3)
# ---------------------------------------------------------------------------------------------


def sac_states(wm: WorldModel, batch: dict, args: Args) -> torch.Tensor:
    """Posterior states z_t (T, B, D) of the batch, differentiable in Theta unless
    --no-critic-grad-to-model. The batch is filtered again after the J_M step: J_Q(theta_i, Theta)
    is a loss of the updated Theta (Algorithm 1 trains the model, then the critic, on the same
    mini-batch). No priors: J_Q does not use them."""
    with torch.set_grad_enabled(not args.no_critic_grad_to_model):
        _, post, _, _ = world_model_forward(wm, batch, priors=False)
        return RSSM.latent(post, mean=args.sac_state == "mean")


def critic_loss(wm: WorldModel, critics: Critics, target_critics: Critics, actor: Actor, log_alpha,
                batch: dict, args: Args):
    """Eq. 3-4 on the transitions (z_t, a_t, r_{t+1}, z_{t+1}) of the sequences; slot t+1 of the
    batch holds a_t and r_{t+1}. Q values and targets in fp32. Returns (loss, states z, metrics)."""
    z = sac_states(wm, batch, args)
    # slots 1 .. T-1: a_t, r_{t+1}, cont_{t+1} for t = 0 .. T-2 (the paper's a_t, r_t)
    action, reward, cont = batch["action"][1:], batch["reward"][1:], batch["cont"][1:]
    with torch.no_grad():
        next_z = z[1:].detach()  # z_{t+1}
        dist = actor(next_z)
        next_action = dist.rsample()
        target_q = torch.min(*target_critics(next_z, next_action))
        v_target = target_q - log_alpha.exp() * dist.log_prob(next_action)  # Eq. 4
        td_target = reward + args.gamma * cont * v_target
    q1, q2 = critics(z[:-1], action)  # Q_i(z_t, a_t), t = 0 .. T-2
    loss = F.mse_loss(q1, td_target) + F.mse_loss(q2, td_target)
    return loss, z, dict(critic_loss=loss.detach(), q=q1.mean().detach(), target_q=td_target.mean())


def actor_loss(critics: Critics, actor: Actor, log_alpha, z: torch.Tensor, target_entropy: float):
    """Eq. 5 on detached states, alpha log pi(a|z) - min_i Q_i(z, a), and the automatic entropy
    temperature's loss, which pushes the policy's entropy towards -|A| (Table 2). Returns (actor
    loss, temperature loss, metrics)."""
    dist = actor(z.detach())
    action = dist.rsample()
    log_prob = dist.log_prob(action)
    loss = (log_alpha.exp().detach() * log_prob - torch.min(*critics(z.detach(), action))).mean()
    temperature_loss = -(log_alpha * (log_prob.detach() + target_entropy)).mean()
    return loss, temperature_loss, dict(actor_loss=loss.detach(), alpha_loss=temperature_loss.detach(),
                                        entropy=-log_prob.detach().mean())


# ---------------------------------------------------------------------------------------------
# Agent: the training step and acting
# ---------------------------------------------------------------------------------------------


class Agent:
    """The world model Theta, the actor phi, the critics theta_1, theta_2 and their targets, the
    temperature alpha; one optimiser per loss; the training step and acting."""

    def __init__(self, args: Args, action_space, compute: Compute):
        self.args, self.compute, self.device = args, compute, compute.device
        self.discrete, self.action_dim = action_size(action_space)
        if self.discrete:
            raise SystemExit(f"error: {args.env} has discrete actions; CoRe's SAC needs a Box action space")
        self.wm = WorldModel(args, self.action_dim).to(self.device)
        d, hidden = self.wm.rssm.state_dim, args.ac_hidden
        self.actor = Actor(d, self.action_dim, hidden).to(self.device)
        self.critics = Critics(d, self.action_dim, hidden).to(self.device)
        self.target_critics = Critics(d, self.action_dim, hidden).to(self.device)
        self.target_critics.load_state_dict(self.critics.state_dict())
        self.target_critics.requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(args.init_alpha), device=self.device, requires_grad=True)
        self.target_entropy = -float(self.action_dim)
        # Theta: encoder, RSSM and heads; lambda (the inverse temperature) has a rate of its own.
        lam = self.wm.inverse_temperature_raw
        self.theta = [p for p in self.wm.parameters() if p is not lam]
        # J_M: Theta and lambda, the gradient norm clipped over the whole world model (Table 2).
        self.model_opt = compute.optimizer(
            "model", [dict(params=self.theta), dict(params=[lam], lr=args.inverse_temperature_lr)],
            args.model_lr, clip=args.model_clip, clip_params=self.wm.parameters())
        # J_Q trains the critics and Theta (Sec. 2.3). As in ml-core, Theta is a parameter group of
        # the critic's Adam (moments of its own, apart from J_M's) at its own rate; the clip (Table
        # 2: 100) is the critics' only, Theta's share is clipped at --critic-model-clip (0: none).
        share = [] if args.no_critic_grad_to_model else [dict(params=self.theta, lr=args.critic_model_lr)]
        share_clip = [("critic_model_grad_norm", self.theta, args.critic_model_clip)] if share else []
        self.critic_opt = compute.optimizer("critic", [dict(params=self.critics.parameters()), *share],
                                            args.critic_lr, clip=args.critic_clip,
                                            clip_params=self.critics.parameters(), extra_clips=share_clip)
        self.actor_opt = compute.optimizer("actor", self.actor.parameters(), args.actor_lr, clip=args.actor_clip)
        self.alpha_opt = compute.optimizer("alpha", [self.log_alpha], args.alpha_lr,
                                           betas=(0.5, 0.999))  # authors' code: momentum_alpha 0.5
        self.model_loss, self.critic_loss = compute.loss(model_loss), compute.loss(critic_loss)
        self.actor_loss = compute.loss(actor_loss)
        if args.gating:  # the evaluation then also logs what the gating CNN lets through
            self.eval_images = self.gating_masks
        self.crop_rng, self.updates = np.random.default_rng(args.seed), 0  # main: the replay's

    def update(self, batch: dict) -> dict:
        """One gradient step of Algorithm 1 on one mini-batch: J_M, then J_Q on the updated Theta,
        then J_pi and the temperature, then the target critics (Polyak averaging, Table 2)."""
        batch = random_crop(batch, self.crop_rng, self.args.crop_size)  # App. A.3
        loss, metrics = self.model_loss(self.wm, batch, self.args)  # J_M (Sec. 2.2)
        metrics |= self.model_opt(loss)
        q_loss, z, q_metrics = self.critic_loss(self.wm, self.critics, self.target_critics, self.actor,
                                                self.log_alpha, batch, self.args)  # J_Q (Eq. 3-4)
        metrics |= self.critic_opt(q_loss)
        # J_pi (Eq. 5) and the temperature on the states of J_Q's transitions, z_t, t = 0 .. T-2
        pi_loss, alpha_loss, pi_metrics = self.actor_loss(self.critics, self.actor, self.log_alpha,
                                                          z[:-1], self.target_entropy)
        metrics |= optimise((self.actor_opt, pi_loss), (self.alpha_opt, alpha_loss))
        del metrics["alpha_grad_norm"]  # (the temperature's gradient norm is not logged)
        self.compute.update_target(self.target_critics, self.critics, self.args.tau)
        self.updates += 1
        return metrics | q_metrics | pi_metrics | dict(alpha=self.log_alpha.exp().detach())

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
        with self.compute.precision():
            x, _ = self.wm.encoder(obs_t)
            post = self.wm.rssm.obs_step(post, prev, x)
            dist = self.actor(RSSM.latent(post, mean=self.args.sac_state == "mean"))
        action = dist.sample() if explore else torch.tanh(dist.base_dist.base_dist.loc)  # tanh(mean)
        return action[0].float().cpu().numpy(), (post, action.float())

    @torch.no_grad()
    def gating_masks(self, frames: list) -> dict:
        """--gating (Sec. 3.5): eight centre-cropped frames of an evaluation episode (HWC) above
        the masks the gating CNN multiplies into them, as one HWC uint8 image."""
        picks = np.stack([centre_crop(f.transpose(2, 0, 1), self.args.crop_size)
                          for f in frames[:: max(1, len(frames) // 8)][:8]])
        _, mask = self.wm.encoder(torch.as_tensor(picks, device=self.device))
        masks = (mask.float().cpu().numpy() * 255).astype(np.uint8).repeat(3, axis=1)
        grid = np.concatenate([np.concatenate(list(picks), axis=2), np.concatenate(list(masks), axis=2)], 1)
        return {"eval/gating_mask": grid.transpose(1, 2, 0)}

    def num_parameters(self) -> int:
        """Trained parameters: world model, actor, critics (not the target critics)."""
        return sum(p.numel() for m in (self.wm, self.actor, self.critics) for p in m.parameters())

    PARTS = ("wm", "actor", "critics", "target_critics", "model_opt", "critic_opt", "actor_opt", "alpha_opt")

    def state_dict(self) -> dict:
        state = {k: getattr(self, k).state_dict() for k in self.PARTS}
        return dict(state, log_alpha=self.log_alpha.detach().cpu(), updates=self.updates)

    def load_state_dict(self, state: dict):
        for key in self.PARTS:
            getattr(self, key).load_state_dict(state[key])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.updates = state["updates"]


# ---------------------------------------------------------------------------------------------
# Main loop (Algorithm 1)
# ---------------------------------------------------------------------------------------------


def action_repeat(args: Args) -> int:
    """--action-repeat, else (and for 0) the task's value of Table 3 (the env's default)."""
    return args.action_repeat or envs.default_action_repeat(args.env)


def make_env(args: Args, split: str):
    """The env at the paper's observation settings: control-suite families render at
    render_height x render_width and are resized to render_size square (App. A.3); `split`'s
    background videos. The agent sees crop_size crops of it."""
    if args.crop_size > args.render_size:
        raise ValueError(f"--crop-size {args.crop_size} must not exceed --render-size {args.render_size}")
    distraction = args.distraction or ("medium" if args.env.startswith("dcs-") else "none")
    render = args.render_height and args.render_width and args.env.split("-")[0] in ("dmc", "dcs", "natural")
    return envs.make(args.env, distraction=distraction, dynamic=args.dynamic, seed=args.seed,
                     image_size=args.render_size, action_repeat=action_repeat(args), split=split,
                     video_dir=args.video_dir, time_limit=args.time_limit,
                     render_shape=(args.render_height, args.render_width) if render else None)


def episode_slots(env) -> int:
    """Replay slots of one whole episode (its agent steps and the first observation) where the env
    has a time limit: episodes are stored whole, so the replay holds one also on a shorter budget."""
    env = env.unwrapped
    return -(-getattr(env, "time_limit", 0) // getattr(env, "action_repeat", 1)) + 1


def updates_due(args: Args, run: Run, episode_start: int) -> int:
    """Updates after the episode that began at agent step `episode_start` (App. A.3): none for the
    random episodes of the prefill, then updates_per_step x its length in agent steps (ml-core:
    updates start after the first episode of the actor)."""
    if episode_start < args.prefill or not run.replay.can_sample(args.seq_len):
        return 0
    return int(round(args.updates_per_step * (run.agent_steps - episode_start)))


def main(args: Args, settings: RunSettings):
    compute = Compute(settings, args.seed)  # device, precision, speed; seeds every RNG
    env, eval_env = make_envs(make_env, args)  # for training, and on --eval-split's videos
    agent = Agent(args, env.action_space, compute)
    slots = replay_slots(args.replay_capacity, settings.total_steps, action_repeat(args),
                         max(args.seq_len, episode_slots(env)))
    replay = Replay(slots, env.observation_space.shape, agent.action_dim, args.seed, compute.replay_device)
    agent.crop_rng = replay.rng  # crops drawn right after their sequences, saved with the replay
    run = Run(args, settings, compute, agent, replay, env, eval_env,
              batch=(args.batch_size, args.seq_len), updates_per_step=args.updates_per_step)
    if settings.evaluate or settings.measure_updates:  # no training: score a checkpoint, time updates
        return run.evaluate_checkpoint() if settings.evaluate else run.measure_speed()

    obs, state = run.start(), None  # the run folder, --resume, the first observation
    run.train(0)  # after --resume: the updates still owed to the last episode, then an evaluation
    run.log_and_evaluate()
    episode_start = run.agent_steps
    # Whole episodes (App. A.3): one that began within the budget runs to its end.
    while run.env_steps < settings.total_steps or run.agent_steps > episode_start:
        if episode_start < args.prefill:  # the prefill's episodes act uniformly at random
            action = random_action(env.action_space)
        else:
            action, state = agent.act(obs, state, explore=True)
        obs, reward, terminated, truncated, info = env.step(action)
        if run.record(obs, action, reward, terminated, truncated, info):  # stored in the replay
            run.train(updates_due(args, run, episode_start))
            run.log_and_evaluate()
            obs, state, episode_start = run.reset(), None, run.agent_steps
    return run.finish()


# =============================================================================================
# APPENDIX: the same text in all five scripts of this repository (tests/test_plumbing.py compares
# them; `python tools/sync_plumbing.py` copies a fix from one into the others). None of it is the
# method: run settings and the command line; the run object `main` calls; acting helpers; the
# compute object the Agent is built with (device, precision, torch.compile, CUDA graphs, the
# optimiser helper, the non-finite skip); the replay buffer; logging, files and devices.
# =============================================================================================


@dataclass
class RunSettings:
    """How a run is carried out, not what is learned: these may change on --resume (Args may not)."""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # part of the run folder's name
    device: str = "auto"  # 'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ...
    compile: bool = False  # torch.compile each loss function whole (the first update compiles)
    # torch.compile mode: reduce-overhead replays CUDA graphs, max-autotune runs without them
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: networks autocast; values, losses fp32
    torch_deterministic: bool = True  # cudnn.deterministic, cudnn.benchmark off (CleanRL's)
    replay_device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the training GPU, else the host
    total_steps: int = TOTAL_STEPS  # env steps to train for, after action repeat (paper's budget)
    eval_every: int = 10_000  # env steps between evaluations (0: only at the end)
    eval_episodes: int = 10  # episodes per evaluation, deterministic actions, seeds of their own
    log_every: int = 1_000  # env steps between metric logs and progress lines (also every 30 s)
    save_model: bool = False  # checkpoint.pt at every evaluation (CleanRL's; an interrupt always)
    checkpoint_replay: bool = True  # replay.pt beside it, so that --resume keeps the same data
    replay_checkpoint_every: int = 10  # evaluations between replay.pt writes (0: end, interrupt)
    resume: Optional[str] = None  # continue this checkpoint.pt's run (its Args may not change)
    evaluate: Optional[str] = None  # no training: score this checkpoint.pt on --env/--distraction
    measure_updates: int = 0  # > 0: time that many updates and 50 acting steps, print JSON, exit
    capture_video: bool = False  # an mp4 of each evaluation's first episode, TensorBoard frames
    track: bool = False  # mirror scalars, flags and videos to Weights & Biases (CleanRL's)
    wandb_project_name: str = "rfwm"  # the Weights & Biases project (CleanRL's flag)
    wandb_entity: Optional[str] = None  # the Weights & Biases team or user (CleanRL's flag)


@dataclass
class Flags:
    args: Args
    run: RunSettings


SCRIPTS = ("dreamerv2.py", "core.py", "cvrl.py", "dreamingv2.py", "blast.py")  # this repository's
# Args fields --evaluate may set apart from the checkpoint's: where and how the agent is scored.
EVALUATION_FLAGS = {"env", "distraction", "dynamic", "video_dir", "eval_split", "eval_action", "seed"}
# Numbers that must be positive wherever a script has them (and every learning rate, *_lr: AdamW's
# weight decay is divided by it); every other number must be >= 0.
POSITIVE = {"total_steps", "eval_episodes", "log_every", "batch_size", "batch_length", "seq_len",
            "horizon", "train_every", "updates_per_step", "replay_capacity", "deter", "hidden",
            "stoch", "classes", "mlp_units", "cnn_depth", "cnn_filters", "embed", "crop_size",
            "render_size", "contrast_units", "ac_hidden", "obs_mlp", "gru_mlp", "prior_mlp",
            "posterior_mlp", "decoder_mlp", "reward_mlp", "inverse_mlp", "target_update_every"}


def parse_args(argv=None) -> tuple[Args, RunSettings]:
    """Every field of Args and RunSettings as a flat flag (`--batch-size`, `--compile`). Defaults:
    the presets the run applies (`presets`, later wins), or the checkpoint's flags with --resume
    (no Args field may differ) or --evaluate (only EVALUATION_FLAGS may). Numbers are checked
    here, before anything is built or written."""
    argv = list(sys.argv[1:] if argv is None else argv)
    asked = _cli(argv, Flags(Args(), RunSettings()))
    path = asked.run.resume or asked.run.evaluate
    if asked.run.evaluate and (asked.run.resume or asked.run.track):  # both belong to training runs
        raise SystemExit("error: --evaluate scores a checkpoint without training: drop "
                         f"--{'resume' if asked.run.resume else 'track'}")
    if path is None:
        values = {k: v for entry in presets(asked.args).values() for k, v in entry.items()}
        flags = _cli(argv, split_flags(values, Flags(Args(), RunSettings())))
    else:
        checkpoint, script = load_checkpoint(path), os.path.basename(__file__)
        saved = {**checkpoint.get("settings", {}), **checkpoint["args"]}  # older ones: all in args
        other = checkpoint.get("script") or f"{saved.get('exp_name')}.py"  # older: the default name
        if other != script and (other in SCRIPTS or not set(saved) & set(Args.__dataclass_fields__)):
            raise SystemExit(f"error: {path} is a checkpoint of {other}, not {script}: give it to the "
                             "script that wrote it")
        run = RunSettings() if asked.run.evaluate else split_flags(saved, Flags(Args(), RunSettings())).run
        try:
            flags = _cli(argv, split_flags(saved, Flags(Args(), run)))
        except (TypeError, ValueError) as error:  # a flag of the checkpoint this script cannot take
            raise SystemExit(f"error: {path}: its flags do not fit {script} ({error}); is it a "
                             "checkpoint of another script?") from None
        free = EVALUATION_FLAGS if asked.run.evaluate else set()
        changed = [f"--{k.replace('_', '-')} {v} (checkpoint {saved[k]})" for k, v in
                   vars(flags.args).items() if k in saved and k not in free and saved[k] != v]
        if changed:  # a flag the checkpoint lacks (added later) takes its default
            raise SystemExit(f"error: --{'evaluate' if asked.run.evaluate else 'resume'}: these flags "
                             f"differ from the checkpoint's and change the algorithm: "
                             f"{', '.join(changed)}; drop them or start a new run")
    for part in (flags.args, flags.run):
        for name, value in vars(part).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flag = f"error: --{name.replace('_', '-')} {value}: must"
                if not math.isfinite(value):
                    raise SystemExit(f"{flag} be a finite number")
                positive = name in POSITIVE or name.endswith("_lr")
                if value <= 0 and positive or value < 0:
                    raise SystemExit(f"{flag} {'be positive' if positive else 'not be negative'}")
    if flags.run.track and importlib.util.find_spec("wandb") is None:
        raise SystemExit("error: --track needs the wandb package: pip install wandb (or drop --track)")
    return flags.args, flags.run


def _cli(argv: list, default: Flags) -> Flags:
    return tyro.cli(Flags, args=argv, default=default, description=__doc__.split("\n\n")[0],
                    config=(tyro.conf.OmitArgPrefixes,))


def split_flags(values: dict, flags: Flags) -> Flags:
    """`flags` with `values` set, each in whichever of Args and RunSettings has the field."""
    known = {name: {k: v for k, v in values.items() if k in type(part).__dataclass_fields__}
             for name, part in vars(flags).items()}
    return Flags(replace(flags.args, **known["args"]), replace(flags.run, **known["run"]))


def describe_presets(args: Args, settings: RunSettings) -> str:
    """The run header's account of the presets: each value applied, and each one a flag replaced."""
    values = {k: v for entry in presets(args).values() for k, v in entry.items()}
    if not values:
        return "no overrides (every default is the paper's setting, see Args)"
    now = {**vars(settings), **vars(args)}
    used = [f"{k}={v}" for k, v in values.items() if now[k] == v]
    replaced = [f"{k}={now[k]} (preset {v})" for k, v in values.items() if now[k] != v]
    return ", ".join(used) + (f"; flags replaced {', '.join(replaced)}" if replaced else "")


class Run:
    """What a run promises besides the algorithm: a run folder of its own; episodes with seeds of
    their own, stored in the replay; updates on replayed batches, the non-finite stop; logs and
    progress; evaluation rounds; atomic checkpoints, --resume (no evaluation repeated); Ctrl-C and
    SIGTERM; --evaluate, --measure-updates. `counters` is checkpointed (scripts may add their own)."""

    def __init__(self, args: Args, settings: RunSettings, compute: Compute, agent: Agent,
                 replay: Replay, env, eval_env, batch: tuple, updates_per_step: float):
        self.args, self.settings, self.compute, self.agent = args, settings, compute, agent
        self.replay, self.env, self.eval_env, self.batch = replay, env, eval_env, batch
        self.updates_per_step, self.metrics, self.episode, self.dir = updates_per_step, {}, None, None
        self.counters = dict(env_steps=0, agent_steps=0, episodes=0, updates_due=0, eval_rounds=0,
                             next_eval=settings.eval_every, last_eval=-1, last_log=0)
        self.last_return, self.pending = float("nan"), []  # last episode's return; unread flags

    @property
    def env_steps(self) -> int:
        return self.counters["env_steps"]

    @property
    def agent_steps(self) -> int:
        return self.counters["agent_steps"]

    def start(self) -> np.ndarray:
        """Make the run folder (or continue --resume's), print the header; the first observation."""
        resume = self.settings.resume
        checkpoint = load_checkpoint(resume) if resume else None
        if checkpoint is not None:  # networks, optimisers, counters, replay.pt, then RNG states
            self.agent.load_state_dict(checkpoint["agent"])
            counters = dict(checkpoint["counters"])
            counters.setdefault("eval_rounds", counters.pop("evals", 0))  # older checkpoints' names
            self.counters.update(counters, last_log=counters.get("last_log", counters["env_steps"]))
            load_replay(resume, checkpoint, self.replay, self.counters)
            seed_everything(self.args.seed, checkpoint["rng"])
        name = f"{self.args.env}__{self.settings.exp_name}__{self.args.seed}__{int(time.time())}"
        self.dir = Path(resume).parent if resume else new_run_dir(name)
        self.logger = Logger(self.dir, self.args, self.settings, self.env_steps if resume else None)
        self.signum, self.handlers = None, {s: signal.signal(s, self.on_signal) for s in (
            signal.SIGINT, signal.SIGTERM)}  # Ctrl-C, SIGTERM: noted, acted on after the step
        self.progress = Progress(self.settings, self.args.preset, self.counters, self.updates_per_step)
        replay, ratio = self.replay, self.updates_per_step * math.prod(self.batch[:2])
        print(f"run {self.dir} | device {self.compute.device} | {self.agent.num_parameters() / 1e6:.1f}M "
              f"parameters | action repeat {getattr(self.env.unwrapped, 'action_repeat', 1)} | replay "
              f"{replay.capacity:,} agent steps on {replay.device.type}, up to {replay.nbytes / 2**30:.2f} "
              f"GiB | replay ratio {ratio:.0f} replayed steps per agent step | videos: "
              f"{envs.video_source(self.args.env, self.args.distraction, self.args.video_dir)}", flush=True)
        print(f"presets {', '.join(presets(self.args)) or 'none'}: "
              f"{describe_presets(self.args, self.settings)}", flush=True)
        if checkpoint is not None:
            c = checkpoint["counters"]  # (older checkpoints say nothing of what wrote them)
            by = checkpoint.get("saved_by") or ("evaluation" if c.get("last_eval") == c["env_steps"]
                                                else "interrupt")
            kept = ("the interrupted episode was stored as truncated" if by == "interrupt" else
                    f"the checkpoint written at the {by} at that step: steps the run made after it, "
                    "if it was killed, are not kept")
            print(f"resumed from {resume} at env step {self.env_steps} ({kept}; a new episode starts)",
                  flush=True)
        self.log_mark = (time.time(), self.agent.updates)
        obs = self.reset()
        self.progress.maybe_print(self.counters, self.phase(), self.last_return, self.agent.updates, force=True)
        return obs

    def phase(self) -> str:
        return "train" if self.agent.updates else "prefill"

    def reset(self) -> np.ndarray:
        """A new training episode, reset with its own seed (episode_seed: the same after a resume)."""
        obs, _ = self.env.reset(seed=episode_seed(self.args.seed, "train", self.counters["episodes"]))
        zeros = np.zeros(self.agent.action_dim, np.float32)
        self.episode, self.episode_return = dict(obs=[obs], action=[zeros], reward=[0.0], cont=[1.0]), 0.0
        self.acted = time.perf_counter()
        return obs

    def record(self, obs, action, reward, terminated, truncated, info) -> bool:
        """Count the step and add it to the episode (slot t: x_t, a_{t-1}, r_t, cont_t). True if the
        episode ended: it is then in the replay and `reset` starts the next one."""
        self.progress.acting_time += time.perf_counter() - self.acted
        self.counters["agent_steps"] += 1
        self.counters["env_steps"] += info["env_steps"]
        self.episode_return += reward
        for key, value in zip(("obs", "action", "reward", "cont"), (obs, action, reward, 1.0 - terminated)):
            self.episode[key].append(value)
        if terminated or truncated:
            length = self.store_episode()
            self.last_return = self.episode_return
            self.logger.log(self.env_steps, {"charts/episodic_return": self.episode_return,
                                             "charts/episodic_length": length})
        if self.signum is not None:
            self.interrupted()
        self.acted = time.perf_counter()
        return terminated or truncated

    def store_episode(self) -> int:
        """The running episode into the replay (ended, or truncated by an interrupt); its length."""
        episode, self.episode = self.episode, None
        if len(episode["obs"]) > self.replay.capacity:
            raise SystemExit(f"error: an episode of {len(episode['obs'])} agent steps does not fit a "
                             f"replay of {self.replay.capacity}; give --replay-capacity at least that")
        self.replay.add_episode(*(np.asarray(episode[k]) for k in ("obs", "action", "reward", "cont")))
        self.counters["episodes"] += 1
        return len(episode["reward"]) - 1

    def train(self, updates: int):
        """`updates` more updates, each on a fresh replayed batch. Owed ones are checkpointed (an
        interrupted burst is made up after --resume) and wait while no whole sequence is stored."""
        self.counters["updates_due"] += updates
        while self.counters["updates_due"] > 0 and self.replay.can_sample(self.batch[1]):
            self.check_finite(keep=1 if self.compute.device.type == "cuda" else 0)
            batch = to_torch(self.replay.sample(*self.batch), self.compute.device)
            start = time.perf_counter()
            self.metrics = self.agent.update(batch)
            flags = self.compute.flags()  # read an update late: the host does not wait for the GPU
            event = torch.cuda.Event() if flags.is_cuda else None
            self.pending.append((flags.to("cpu", non_blocking=True), event, self.agent.updates, self.env_steps))
            if event is not None:
                event.record()
            self.counters["updates_due"] -= 1
            if self.settings.compile and not self.progress.compiled:  # the first update compiles
                self.check_finite()  # waits for it: its wall time is the compile time
                self.progress.compiled = True
                print(f"compiled in {time.perf_counter() - start:.1f} s", flush=True)
            else:
                self.progress.update_time += time.perf_counter() - start
                self.progress.updates += 1
            if self.signum is not None:
                self.interrupted()
            if self.counters["updates_due"]:  # inside a burst (pretraining): a line every 30 s
                self.progress.maybe_print(self.counters, "train", self.last_return, self.agent.updates,
                                          pending_updates=self.counters["updates_due"])

    def log_and_evaluate(self):
        """Training metrics when a multiple of --log-every env steps was crossed, a progress line,
        an evaluation round when one is due."""
        step, every = self.env_steps, self.settings.log_every
        crossed = step // every != self.counters["last_log"] // every
        if crossed:
            (then, before), now, updates = self.log_mark, time.time(), self.agent.updates
            logs = {f"losses/{k}": v for k, v in self.metrics.items()}
            logs.update({"charts/SPS": self.progress.sps(self.counters), "charts/updates": updates,
                         "charts/updates_per_second": (updates - before) / max(now - then, 1e-9)})
            self.logger.log(step, logs)
            self.counters["last_log"], self.log_mark = step, (now, updates)
        self.progress.maybe_print(self.counters, self.phase(), self.last_return, self.agent.updates,
                                  force=crossed, pending_updates=self.counters["updates_due"])
        if self.settings.eval_every and step >= self.counters["next_eval"]:
            self.evaluate_round()

    def evaluate_round(self):
        """Round e: episode j is reset with episode_seed(seed, 'eval', e * 10000 + j), the same after
        a resume; `next_eval` moves on before the checkpoint is written."""
        self.check_finite()
        c, step, images = self.counters, self.env_steps, hasattr(self.agent, "eval_images")
        seeds = [episode_seed(self.args.seed, "eval", c["eval_rounds"] * 10_000 + j)
                 for j in range(self.settings.eval_episodes)]
        returns, frames = evaluate(self.agent, self.eval_env, seeds, self.settings.capture_video or images,
                                   self)
        if returns is None:
            self.interrupted()
        self.logger.log(step, {"eval/episodic_return": float(np.mean(returns))}, videos=envs.video_source(
            self.args.env, self.args.distraction, self.args.video_dir))
        if self.settings.capture_video:
            self.logger.frames(frames, step, self.dir / "videos" / f"eval_{step}.mp4")
        for name, image in (self.agent.eval_images(frames) if images else {}).items():  # CoRe's mask
            self.logger.writer.add_image(name, image, step, dataformats="HWC")
        print(f"eval at {step}: return {np.mean(returns):.1f}", flush=True)
        c["last_eval"], c["eval_rounds"] = step, c["eval_rounds"] + 1
        while self.settings.eval_every and c["next_eval"] <= step:
            c["next_eval"] += self.settings.eval_every
        if self.settings.save_model:
            self.save(replay_due(self.settings, c["eval_rounds"], step), saved_by="evaluation")

    def finish(self) -> Path:
        """The last evaluation (unless one was just made) and the last updates' check; closes."""
        if self.counters["last_eval"] != self.env_steps:
            self.evaluate_round()
        self.check_finite()
        self.close()
        return self.dir

    def on_signal(self, signum, frame):
        self.signum = self.signum or signum  # the first; a second one (while saving) is ignored

    def close(self):
        for sig, handler in self.handlers.items():  # the caller's handlers back
            signal.signal(sig, handler)
        self.logger.close()
        self.env.close()
        self.eval_env.close()

    def save(self, with_replay: bool, saved_by: str):
        """checkpoint.pt (megabytes: networks, optimisers, counters, RNG states, flags) and, if
        `with_replay` and --checkpoint-replay, replay.pt (gigabytes on a GPU run) after it: a kill
        between the two leaves an older replay (which --resume reports), never a newer one."""
        path, space = self.dir / "checkpoint.pt", self.env.observation_space
        rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        try:
            atomic_save(dict(agent=self.agent.state_dict(), counters=dict(self.counters), rng=rng,
                             args=vars(self.args), settings=vars(self.settings), saved_by=saved_by,
                             script=os.path.basename(__file__),
                             spaces=dict(obs=tuple(space.shape), action=self.agent.action_dim)), path)
            if with_replay and self.settings.checkpoint_replay:
                atomic_save(dict(replay=self.replay.state_dict(), env_steps=self.env_steps),
                            path.with_name("replay.pt"))
        except SystemExit:  # a full disk: give the signal handlers back, close what can be closed
            with contextlib.suppress(Exception):
                self.close()
            raise

    def interrupted(self):
        """Ctrl-C or SIGTERM: the episode so far into the replay as truncated, a checkpoint with the
        replay, exit 130 (SIGINT) or 143 (SIGTERM)."""
        self.check_finite()
        if self.episode is not None and len(self.episode["reward"]) >= 2:
            self.store_episode()
        self.save(with_replay=True, saved_by="interrupt")
        print(f"interrupted at step {self.env_steps}; resume with: python "
              f"{os.path.basename(__file__)} --resume {self.dir / 'checkpoint.pt'}", flush=True)
        self.close()
        sys.exit(128 + self.signum)

    def check_finite(self, keep: int = 0):
        """Read the flags of all updates but the newest `keep`; stop at a non-finite one (its steps
        and all later ones were skipped: the checkpoint has the parameters from before it)."""
        while len(self.pending) > keep:
            flags, event, update, step = self.pending.pop(0)
            if event is not None:
                event.synchronize()  # normally long done: the copy was queued an update ago
            if flags.any():
                names = [f"{opt.name}_loss" for opt, bad in zip(self.compute.optimizers, flags.tolist()) if bad]
                self.save(with_replay=True, saved_by="non-finite stop")
                self.close()
                raise SystemExit(f"error: non-finite {', '.join(names)} at update {update} (env step "
                                 f"{step}); checkpoint from before it: {self.dir / 'checkpoint.pt'}")

    def evaluate_checkpoint(self) -> dict:
        """--evaluate: --eval-episodes episodes of the checkpoint's agent on this env (any level, either
        video split); each return, mean +- standard error, in evaluation.json (with --capture-video an
        mp4 and a frame strip) in a folder of its own; nothing of the run is touched."""
        path, env, a = self.settings.evaluate, self.eval_env, self.args
        checkpoint = load_checkpoint(path)
        try:
            if tuple(checkpoint.get("spaces", {}).get("obs", env.observation_space.shape)) != env.observation_space.shape:
                raise RuntimeError("observation shape")
            self.agent.load_state_dict(checkpoint["agent"])
        except (RuntimeError, KeyError):
            raise SystemExit(f"error: --evaluate {path}: its networks do not fit {a.env} (observations "
                             f"{tuple(env.observation_space.shape)}, {self.agent.action_dim} actions); "
                             "evaluate it on an env of the task it was trained on") from None
        seeds = [episode_seed(a.seed, "eval", j) for j in range(self.settings.eval_episodes)]
        returns, frames = evaluate(self.agent, env, seeds, self.settings.capture_video)
        n, mean = len(returns), float(np.mean(returns))
        se = float(np.std(returns, ddof=1) / math.sqrt(n)) if n > 1 else None
        report = dict(checkpoint=str(path), env_steps=checkpoint["counters"]["env_steps"],
                      trained_on=dict(env=checkpoint["args"]["env"],
                                      distraction=checkpoint["args"].get("distraction")),
                      env=a.env, distraction=a.distraction, dynamic=a.dynamic, split=a.eval_split,
                      video_dir=a.video_dir, seeds=seeds, returns=[float(r) for r in returns],
                      mean=mean, standard_error=se)
        for j, value in enumerate(returns):
            print(f"episode {j}: return {value:.1f}", flush=True)
        where = new_run_dir(f"{Path(path).parent.name}__eval__{a.env}__{a.distraction}__{a.eval_split}"
                            f"__{int(time.time())}")
        (where / "evaluation.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
        writer = SummaryWriter(str(where))
        writer.add_scalar("eval/episodic_return", mean, report["env_steps"])
        if frames:
            write_frames(writer, frames, report["env_steps"], where / "video.mp4")
        writer.close()
        self.env.close()
        env.close()
        videos = envs.video_source(a.env, a.distraction, a.video_dir) != "none"
        print(f"return {mean:.1f}" + (f" +- {se:.1f} (mean +- standard error over {n} episodes)" if n > 1
              else " (one episode: no standard error)") + f" on {a.env} {a.distraction}"
              f"{f' ({a.eval_split} videos)' if videos else ''}; written to {where}", flush=True)
        return report

    def measure_speed(self) -> dict:
        """--measure-updates: median seconds per update (after 2 warm-ups, the first compiles) on
        random frames at the configured sizes; env steps per second of acting over 50 steps."""
        agent, env, device, length = self.agent, self.env, self.compute.device, max(self.batch[1], 2)
        actions = np.stack([random_action(env.action_space) for _ in range(length)])
        self.replay.add_episode(np.random.randint(0, 255, (length, *env.observation_space.shape),
                                                  dtype=np.uint8), actions, np.random.rand(length),
                                np.ones(length))
        times = []
        for _ in range(self.settings.measure_updates + 2):
            batch = to_torch(self.replay.sample(*self.batch), device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            agent.update(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result = dict(seconds_per_update=float(np.median(times[2:])), updates=len(times) - 2,
                      parameters=agent.num_parameters(), env=self.args.env, device=str(device),
                      precision=self.settings.precision, compile=self.settings.compile)
        plans = [""] + ["_no_mpc"] * ("mpc" in inspect.signature(agent.act).parameters)  # CVRL's MPC
        for plan in plans:
            (obs, _), state, env_steps, policy_time = env.reset(seed=self.args.seed), None, 0, 0.0
            for i in range(52):
                if i == 2:  # the first two steps are warm-up: the clock starts here
                    start, env_steps, policy_time = time.perf_counter(), 0, 0.0
                t = time.perf_counter()
                action, state = agent.act(obs, state, True, **(dict(mpc=False) if plan else {}))
                policy_time += time.perf_counter() - t
                obs, _, terminated, truncated, info = env.step(env_action(action, env.action_space))
                env_steps += info["env_steps"]
                if terminated or truncated:
                    (obs, _), state = env.reset(), None
            result[f"policy_ms{plan}"] = 1000 * policy_time / 50
            result.setdefault("env_steps_per_second", env_steps / (time.perf_counter() - start))
        env.close()
        if self.settings.compile:
            result["compile_seconds"] = times[0]
        if device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        # peak resident memory of the process (Linux reports KiB): weights, optimisers, activations, env
        result["peak_host_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(json.dumps(result))
        return result


def replay_due(settings: RunSettings, evals: int, env_steps: int) -> bool:
    """Whether the checkpoint after evaluation number `evals` (from 1) writes replay.pt too: the
    run's last one and every --replay-checkpoint-every-th."""
    every = settings.replay_checkpoint_every
    return env_steps >= settings.total_steps or (every > 0 and evals % every == 0)


def new_run_dir(name: str) -> Path:
    """runs/<name>, made here and never shared: if it exists (a second run started in the same
    second), the next free suffix _2, _3, ...; a slash or colon in the name (gym:ALE/Pong-v5)
    becomes '-' (a colon would split TensorBoard's `--logdir_spec name:path`)."""
    for k in range(1, 1000):
        path = Path("runs") / (name.replace("/", "-").replace(":", "-") + (f"_{k}" if k > 1 else ""))
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
        except OSError as error:
            raise SystemExit(f"error: cannot make the run folder {path} ({error.strerror}); run from a "
                             "folder you can write to") from None
    raise SystemExit(f"error: runs/{name}: a thousand run folders of that name exist already")


def make_envs(make_env, args: Args):
    """The training env and the evaluation env (--eval-split's videos); bad input (env id,
    distraction, video folder) ends here in one line."""
    try:
        return make_env(args, "train"), make_env(args, args.eval_split)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


def action_size(space) -> tuple[bool, int]:
    """(discrete, size of an action vector): one-hot over a Discrete space's n, else the Box's."""
    discrete = hasattr(space, "n")
    return discrete, int(space.n) if discrete else int(space.shape[0])


def random_action(space) -> np.ndarray:
    """Uniform over the actions (prefill): a one-hot vector, or uniform in [-1, 1] per component."""
    discrete, dim = action_size(space)
    if discrete:
        return np.eye(dim, dtype=np.float32)[np.random.randint(dim)]
    return np.random.uniform(-1, 1, dim).astype(np.float32)


def env_action(action: np.ndarray, space):
    """The agent's action (continuous vector or one-hot) in the env's format."""
    return int(action.argmax()) if hasattr(space, "n") else action


def evaluate(agent: Agent, env, seeds: list, record: bool = False, stop=None):
    """The return of one episode per seed with deterministic actions, and the first one's frames
    if `record`; (None, frames) if `stop` (the run) caught a signal before they are done."""
    returns, frames = [], []
    for ep, seed in enumerate(seeds):
        (obs, _), state, total, done = env.reset(seed=seed), None, 0.0, False
        while not done:
            if record and ep == 0:
                frames.append(obs.transpose(1, 2, 0))
            action, state = agent.act(obs, state, explore=False)
            obs, reward, terminated, truncated, _ = env.step(env_action(action, env.action_space))
            total += reward
            done = terminated or truncated
            if stop is not None and stop.signum is not None:
                return None, frames
        returns.append(total)
    return returns, frames


class Compute:
    """Where and how the method's tensors are computed: the device, --precision, --compile, CUDA
    graphs, and the optimisers, which share one device flag, `skip`: from the first non-finite loss
    or norm on, every step is skipped on the device, without a host sync (the run reads `flags()`
    an update late and stops with the checkpoint from before)."""

    def __init__(self, settings: RunSettings, seed: int):
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.replay_device = replay_device(settings, self.device)
        configure_torch(settings, self.device)
        seed_everything(seed)
        self.skip, self.optimizers = torch.zeros((), device=self.device), []
        self.graphs = settings.compile and settings.compile_mode == "reduce-overhead"

    def precision(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.settings.precision == "bf16")

    def loss(self, fn) -> Loss:
        return Loss(fn, self)

    def optimizer(self, name: str, params, lr: float, **kw) -> Optimizer:
        self.optimizers.append(Optimizer(name, params, lr, self, **kw))
        return self.optimizers[-1]

    def flags(self) -> torch.Tensor:
        """The last step's non-finite flag of every optimiser, in their order (a device tensor)."""
        return torch.stack([opt.flag for opt in self.optimizers])

    @torch.no_grad()  # in place and outside autograd: a target network carries no history
    def update_target(self, target, source, fraction: float):
        """target <- target + fraction (source - target), parameters of two modules (or two lists of
        tensors); not at all if this update's steps were skipped (the weight is a device tensor)."""
        pairs = [list(m.parameters()) if isinstance(m, nn.Module) else list(m) for m in (target, source)]
        torch._foreach_lerp_(pairs[0], pairs[1], [fraction * (1 - self.skip)] * len(pairs[0]))


class Loss:
    """A loss function under --precision; with --compile compiled whole (the RSSM's loops unrolled:
    a few fused kernels); with reduce-overhead replayed as CUDA graphs, whose outputs the next call
    overwrites: each call marks a step and copies every output but the losses (top-level 0-dim
    tensors that require grad, backpropagated before the next call)."""

    def __init__(self, fn, compute: Compute):
        self.fn, self.compute, self.run = fn, compute, self.eager
        if compute.settings.compile:
            mode = compute.settings.compile_mode
            mode = {"default": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)
            self.run = torch.compile(self.eager, dynamic=False, mode=mode)

    def eager(self, *args):
        with self.compute.precision():
            return self.fn(*args)

    def __call__(self, *args):
        if not self.compute.graphs:
            return self.run(*args)
        torch.compiler.cudagraph_mark_step_begin()
        return outlive(self.run(*args))


def outlive(value, top: bool = True):
    """Detached copies, outside the CUDA-graph pool, of every tensor in `value` but the losses."""
    if torch.is_tensor(value):
        return value if top and value.requires_grad and value.dim() == 0 else value.detach().clone()
    if isinstance(value, dict):
        return {k: outlive(v, False) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(outlive(v, top) for v in value)
    return value


def full_precision(x: torch.Tensor):
    """fp32 inside, also under --precision bf16 (for outputs that feed returns and log-probs)."""
    return torch.autocast(x.device.type, enabled=False)


class Optimizer:
    """One network's optimiser (danijar/dreamerv2's `common.Optimizer`): `metrics |= opt(loss)`
    backpropagates, clips, checks loss and norm, and takes a fused Adam step, skipped on the device
    (`found_inf`, as GradScaler sets it) once this or an earlier loss or norm was not finite.
    weight_decay multiplies parameters by (1 - wd) per step (official common/other.py: AdamW with
    wd / lr); clip <= 0: measured only. `params`: tensors or groups (dicts with their own lr)."""

    def __init__(self, name: str, params, lr: float, compute: Compute, eps: float = 1e-8,
                 clip: float = 0.0, weight_decay: float = 0.0, clip_params=None,
                 betas: tuple = (0.9, 0.999), extra_clips=()):
        groups = [dict(g, params=list(g["params"])) if isinstance(g, dict) else g for g in params]
        self.name, self.compute, self.flag = name, compute, None
        self.params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
        self.clips = [(f"{name}_grad_norm", self.params if clip_params is None else list(clip_params), clip)]
        self.clips += [(key, list(ps), max_norm) for key, ps, max_norm in extra_clips]
        if weight_decay > 0:
            self.opt = torch.optim.AdamW(groups, lr=lr, eps=eps, betas=betas,
                                         weight_decay=weight_decay / lr, fused=True)
        else:
            self.opt = torch.optim.Adam(groups, lr=lr, eps=eps, betas=betas, fused=True)

    def __call__(self, loss: torch.Tensor) -> dict:
        return optimise((self, loss))

    def clip_and_step(self, loss: torch.Tensor) -> dict:
        norms = {key: nn.utils.clip_grad_norm_(params, max_norm) if max_norm > 0 else
                 nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                 for key, params, max_norm in self.clips}
        self.flag = (~torch.isfinite(torch.stack([v.detach().float() for v in (loss, *norms.values())]))
                     ).any().float()  # 1.0 if the loss or a norm is NaN or inf: a device tensor
        self.compute.skip = torch.maximum(self.compute.skip, self.flag)
        self.opt.found_inf = self.compute.skip
        self.opt.step()
        return norms

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict):
        self.opt.load_state_dict(state)


def optimise(*pairs) -> dict:
    """(optimiser, loss) pairs: one backward pass of the losses' sum into the optimisers'
    parameters only (a compiled graph can be backpropagated once; each network's gradient is its
    own loss's), then each optimiser clips and steps, in order. Returns their metrics."""
    total = pairs[0][1]
    for _, loss in pairs[1:]:
        total = total + loss
    for opt, _ in pairs:
        opt.opt.zero_grad(set_to_none=True)
    total.backward(inputs=[p for opt, _ in pairs for p in opt.params])
    metrics = {}
    for opt, loss in pairs:
        metrics |= opt.clip_and_step(loss)
    return metrics


@contextlib.contextmanager
def frozen(module: nn.Module):
    """`module`'s parameters frozen inside: a loss still backpropagates through it into its inputs
    (the actor's gradient through the dynamics) but a compiled backward computes no weight
    gradient for it, which `backward(inputs=...)` prunes only in eager mode."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class Replay:
    """Whole episodes in a ring of uint8 images. Slot t of an episode: x_t, a_{t-1} (zeros at t = 0),
    r_t (0 at t = 0), cont_t (0 where it terminated), is_first_t. A sampled window lies inside one
    episode, never across the write position (newest slot into oldest). With `prioritize_ends` an
    episode's last start counts length + 1 times (official replay.py, which picks episodes first:
    the same for equal-length episodes). Tensors on `device` (a batch is one gather there),
    allocated once (`replay_slots`); on the host numpy zeros, whose pages fill as episodes come."""

    def __init__(self, capacity: int, obs_shape, action_dim: int, seed: int, device="cpu",
                 prioritize_ends: bool = False):
        self.capacity, self.device, self.prioritize_ends = capacity, torch.device(device), prioritize_ends
        self.shapes = dict(obs=tuple(obs_shape), action=(action_dim,), reward=(), cont=(), is_first=())
        self.dtypes = dict(obs=torch.uint8, action=torch.float32, reward=torch.float32,
                           cont=torch.float32, is_first=torch.float32)
        self.data = {k: torch.zeros((capacity, *s), dtype=self.dtypes[k], device=self.device)
                     if self.device.type != "cpu" else torch.from_numpy(
                         np.zeros((capacity, *s), np.uint8 if k == "obs" else np.float32))
                     for k, s in self.shapes.items()}
        self.episode = np.full(capacity, -1, np.int64)  # episode id per slot (host), -1 = empty
        self.pos = self.size = self.episodes = 0
        self.rng = np.random.default_rng(seed)
        self._starts = self._ends = np.zeros(0, np.int64)
        self._starts_length = None

    @property
    def nbytes(self) -> int:
        """Bytes at full capacity."""
        per_slot = sum(math.prod(s) * self.dtypes[k].itemsize for k, s in self.shapes.items())
        return self.capacity * (per_slot + self.episode.itemsize)

    def add_episode(self, obs, action, reward, cont):
        n = len(obs)
        if n > self.capacity:
            raise ValueError(f"episode of {n} steps does not fit a replay of {self.capacity}")
        idx = (self.pos + np.arange(n)) % self.capacity
        is_first = np.zeros(n, np.float32)
        is_first[0] = 1.0
        index = torch.from_numpy(idx).to(self.device)
        for key, value in zip(self.data, (obs, action, reward, cont, is_first)):
            value = torch.as_tensor(np.asarray(value)).to(self.device, self.dtypes[key])
            self.data[key][index] = value.reshape(n, *self.shapes[key])
        self.episode[idx] = self.episodes
        self.episodes += 1
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        self._starts_length = None  # valid starts changed

    def valid_starts(self, length: int) -> np.ndarray:
        """Slots i such that i .. i+length-1 lie in one stored episode, not across the write position."""
        if self._starts_length != length:
            # Episodes are written contiguously: equal ids at both ends mean one episode, unless
            # the window runs from the newest slot (pos - 1) into the oldest (pos).
            ok = (self.episode >= 0) & (self.episode == np.roll(self.episode, -(length - 1)))
            ok &= (np.arange(self.capacity) - self.pos) % self.capacity + length - 1 < self.capacity
            self._starts, self._starts_length = np.flatnonzero(ok), length
            # Each episode's last valid start: its successor is no valid start of the same episode.
            after = (self._starts + 1) % self.capacity
            self._ends = self._starts[~ok[after] | (self.episode[after] != self.episode[self._starts])]
        return self._starts

    def can_sample(self, length: int) -> bool:
        return len(self.valid_starts(length)) > 0

    def draw_starts(self, batch: int, length: int) -> np.ndarray:
        starts = self.valid_starts(length)
        if not self.prioritize_ends:
            return self.rng.choice(starts, size=batch)
        u = self.rng.integers(len(starts) + length * len(self._ends), size=batch)
        extra = np.minimum(np.maximum(u - len(starts), 0) // length, len(self._ends) - 1)
        return np.where(u < len(starts), starts[np.minimum(u, len(starts) - 1)], self._ends[extra])

    def sample(self, batch: int, length: int) -> dict:
        """Time-major tensors on the replay's device: obs (T, B, 3, H, W) uint8, action (T, B, A),
        reward, cont, is_first (T, B); one gather, the start slots sent as one small copy."""
        starts = self.draw_starts(batch, length)
        index = to_device_async((starts[None, :] + np.arange(length)[:, None]) % self.capacity, self.device)
        return {key: value[index] for key, value in self.data.items()}

    def state_dict(self) -> dict:
        keep = slice(0, self.size)  # a copy of the filled part (a view saves the whole storage)
        return dict(**{k: v[keep].to("cpu", copy=True) for k, v in self.data.items()},
                    episode=self.episode[keep].copy(), pos=self.pos, size=self.size,
                    episodes=self.episodes, rng=self.rng.bit_generator.state)

    def load_state_dict(self, state: dict):
        n, ids = state["size"], np.asarray(state["episode"])
        if "is_first" not in state:  # written before the replay stored it: an episode's first slot
            state = dict(state, is_first=np.r_[True, ids[1:] != ids[:-1]].astype(np.float32))
        for key in self.data:
            self.data[key][:n] = torch.as_tensor(np.asarray(state[key])).reshape(
                n, *self.shapes[key]).to(self.device)
        self.episode[:n] = ids
        self.pos, self.size, self.episodes = state["pos"], n, state["episodes"]
        self.rng.bit_generator.state = state["rng"]
        self._starts_length = None


def replay_slots(capacity: int, total_steps: int, repeat: int, length: int) -> int:
    """The replay's size in agent steps: `capacity`, capped at what the run can fill (total_steps /
    repeat agent steps, plus an episode's first observation), at least one sequence of `length`."""
    return max(min(capacity, -(-total_steps // repeat) + 1), length)


def to_torch(batch: dict, device: torch.device) -> dict:
    """Batch (tensors or numpy arrays) -> tensors on `device`; images stay uint8 (4x less to copy)."""
    return {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in batch.items()}


def to_device_async(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device` without waiting for the GPU: pinned memory, a non-blocking copy (a
    copy from pageable memory first waits for the stream, i.e. for the previous update)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


STREAMS = {"train": 0, "eval": 1}


def episode_seed(seed: int, stream: str, index: int) -> int:
    """Seed of one episode: a child of SeedSequence(seed), so runs with different seeds never
    share episodes (seed + k schemes overlap: run s, episode 1 == run s+1, episode 0)."""
    return int(np.random.SeedSequence(seed, spawn_key=(STREAMS[stream], index)).generate_state(1)[0])


class Logger:
    """TensorBoard, metrics.jsonl (non-finite values as null: NaN is not JSON), W&B with --track; on
    resume, records after the checkpoint's step are dropped."""

    def __init__(self, run_dir: Path, args: Args, settings: RunSettings, resume_step: int | None = None):
        path, flags = run_dir / "metrics.jsonl", {**vars(args), **vars(settings)}
        if resume_step is not None and path.exists():
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))
        self.writer = SummaryWriter(str(run_dir), purge_step=None if resume_step is None else resume_step + 1)
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
            f"|{k}|{v}|" for k, v in flags.items()))
        self.jsonl, self.wandb = open(path, "a"), None
        if settings.track:
            import wandb

            self.wandb = wandb.init(project=settings.wandb_project_name, entity=settings.wandb_entity,
                                    name=run_dir.name, id=run_dir.name.replace(":", "-")[-128:],
                                    resume="allow", config=flags, dir=str(run_dir))

    def log(self, step: int, scalars: dict, **text):
        """Scalars (numbers, or device tensors copied in one transfer) to all; `text` to the jsonl."""
        record = {"step": step, "time": time.time()}
        tensors = {k: v for k, v in scalars.items() if torch.is_tensor(v)}
        if tensors:
            values = torch.stack([v.detach().float() for v in tensors.values()]).cpu().tolist()
            scalars = {**scalars, **dict(zip(tensors, values))}
        for key, value in scalars.items():
            self.writer.add_scalar(key, float(value), step)
            record[key] = float(value) if math.isfinite(value) else None
        self.jsonl.write(json.dumps({**record, **text}, allow_nan=False) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=step)

    def frames(self, frames: list, step: int, path: Path):
        """An evaluation's first episode: an mp4 and a frame strip to TensorBoard (and W&B)."""
        write_frames(self.writer, frames, step, path)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"eval/video": wandb.Video(str(path), format="mp4")}, step=step)

    def close(self):
        self.writer.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def write_frames(writer: SummaryWriter, frames: list, step: int, path: Path):
    """An episode's frames as an mp4 at `path` and a strip of eight to TensorBoard."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=30)
        stream.height, stream.width, stream.pix_fmt = *frames[0].shape[:2], "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        out.mux(stream.encode())
    strip = np.concatenate(frames[:: max(1, len(frames) // 8)][:8], axis=1)
    writer.add_image("eval/frames", strip, step, dataformats="HWC")


class Progress:
    """The progress line, every `log_every` env steps or 30 s; the ETA counts acting and updates
    (`updates_per_agent_step`, plus `pending_updates`) at this process's measured speeds."""

    def __init__(self, settings: RunSettings, preset: str, counters: dict, updates_per_agent_step: float):
        self.settings, self.preset, self.ratio = settings, preset, updates_per_agent_step
        self.start, self.start_steps = time.time(), counters["env_steps"]
        self.start_agent_steps, self.last_time, self.last_step = counters["agent_steps"], 0.0, None
        self.acting_time = self.update_time = 0.0
        self.updates, self.compiled = 0, False

    def sps(self, counters: dict) -> float:
        return (counters["env_steps"] - self.start_steps) / max(time.time() - self.start, 1e-9)

    def eta(self, counters: dict, pending_updates: int = 0) -> float | None:
        remaining = self.settings.total_steps - counters["env_steps"]
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
        if not (force or self.last_step is None or step - self.last_step >= self.settings.log_every
                or now - self.last_time >= 30):
            return
        self.last_step, self.last_time = step, now
        spu = f"{self.update_time / self.updates:.2f}" if self.updates else "-"
        eta = self.eta(counters, pending_updates)
        preset_hint(self.preset, eta)
        print(f"step {step}/{self.settings.total_steps} | {phase} | return {episode_return:.1f} | "
              f"SPS {self.sps(counters):.1f} | updates {updates} ({spu} s/update) | "
              f"ETA {format_eta(eta)}", flush=True)


def format_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return (f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600
            else f"{seconds // 60}m{seconds % 60:02d}s")


def preset_hint(preset: str, eta: float | None):
    """Once per process, when a CPU run at the paper's sizes would take many hours: which preset
    finishes in about an hour, and what it trades."""
    if (eta is not None and eta > 6 * 3600 and preset == "paper"
            and not getattr(preset_hint, "shown", False) and not torch.cuda.is_available()):
        preset_hint.shown = True
        print(f"note: at the paper's sizes this CPU needs about {format_eta(eta)}; --preset small "
              "(the same algorithm with smaller networks and batches, fewer updates per step and "
              "PlaNet's action repeat) trains 100K steps of dmc-cartpole-swingup in under an hour "
              "on 2 cores", flush=True)


def atomic_save(state: dict, path: Path):
    """Via a temporary file, flushed and renamed: a kill leaves the old file or the new one; a full
    disk or an unwritable folder ends the run in one line, the last good file as it was."""
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"error: cannot write {path} ({error.strerror or error}); the last good "
                         f"{path.name} is unchanged; free space or make the folder writable, then "
                         "resume from it") from None


def load_checkpoint(path: str) -> dict:
    """A checkpoint.pt, its tensors read from disk as used (mmap); missing or damaged: one line."""
    if not Path(path).is_file():
        raise SystemExit(f"error: {path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if not isinstance(checkpoint, dict) or not {"agent", "args", "counters"} <= set(checkpoint):
            raise ValueError("not a checkpoint of these scripts")
    except Exception as error:  # torch raises many kinds for a truncated or corrupted file
        raise SystemExit(f"error: {path} is damaged or not a checkpoint ("
                         f"{(str(error).splitlines() or [type(error).__name__])[0][:120]}); use an "
                         "earlier copy or start a new run") from None
    return checkpoint


def load_replay(path: str, checkpoint: dict, replay: Replay, counters: dict):
    """--resume: `replay` from replay.pt beside the checkpoint (or from the checkpoint itself, if
    older); without one, or with a damaged one, empty. One line says what it holds."""
    replay_path = Path(path).with_name("replay.pt")
    if checkpoint.get("replay") is None and not replay_path.is_file():
        print(f"no {replay_path}: the replay starts empty (updates resume once it holds a training "
              "sequence)", flush=True)
        return
    try:  # mmap: frames are read from disk as they are copied into the replay
        saved = (dict(replay=checkpoint["replay"], env_steps=counters["env_steps"])
                 if checkpoint.get("replay") is not None
                 else torch.load(replay_path, map_location="cpu", weights_only=False, mmap=True))
        replay.load_state_dict(saved["replay"])
    except Exception as error:  # a truncated or corrupted replay.pt
        replay.__init__(replay.capacity, replay.shapes["obs"], replay.shapes["action"][0], 0,
                        replay.device, replay.prioritize_ends)
        print(f"{replay_path} is damaged ({(str(error).splitlines() or [type(error).__name__])[0][:120]}"
              "): the replay starts empty (updates resume once it holds a training sequence)", flush=True)
        return
    note = "" if saved["env_steps"] == counters["env_steps"] else (
        f", written at env step {saved['env_steps']}, older than the checkpoint (env step "
        f"{counters['env_steps']}): the episodes in between are not in it")
    print(f"replay: {replay.size} agent steps from {replay_path}{note}", flush=True)


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


def replay_device(settings: RunSettings, device: torch.device) -> torch.device:
    """--replay-device auto keeps the replay on the training GPU (no copy of a batch), else the host."""
    if settings.replay_device == "cuda" and device.type != "cuda":
        raise SystemExit("error: --replay-device cuda needs training on CUDA (--device cuda or auto on a GPU)")
    on_gpu = settings.replay_device == "cuda" or settings.replay_device == "auto" and device.type == "cuda"
    return device if on_gpu else torch.device("cpu")


def configure_torch(settings: RunSettings, device: torch.device):
    """Determinism; on CUDA, TF32 (fp32 matmuls on tensor cores, ~1e-3 relative precision)."""
    torch.backends.cudnn.deterministic = settings.torch_deterministic
    if device.type == "cuda":  # once: CUDA events, synchronize() and tensors made on "cuda" then
        torch.cuda.set_device(device)  # all mean --device's GPU (cuda:1 too), not cuda:0
        torch.set_float32_matmul_precision("high")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not settings.torch_deterministic


if __name__ == "__main__":
    main(*parse_args())
