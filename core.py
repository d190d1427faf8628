"""CoRe: Robust Robotic Control from Pixels using Contrastive Recurrent State-Space Models
(Srivastava, Saran, Jaitly, Sohl-Dickstein et al., 2021; ../shared/papers/core.txt).

A recurrent state-space model is trained without reconstructing pixels: the *prior* latent state
(the model's prediction before it sees the observation) is decoded to a 50-d vector y_t that must
pick out the encoding x_t of the real observation among all other observations of the mini-batch
(InfoNCE). Distractions that the dynamics cannot predict (video backgrounds, camera shake, colour
drift) are of no use for that, so the representation learns to ignore them. SAC is trained on
the posterior latent state, and its critic loss also trains the encoder and the RSSM.

Equations implemented, in the paper's order:
- RSSM (appendix A.1): h_t = GRUCell(h_{t-1}, GRU_MLP(s_{t-1}, a_{t-1})); prior
  (mu^, sigma^) = PriorMLP(h_t); posterior (mu, sigma) = PosteriorMLP(h_t, ObsMLP(x_t)); prior
  state z^_t = [h_t, s^_t], posterior state z_t = [h_t, s_t]; h_t propagated without sampling.
  `RSSM`.
- Eq. 1, contrastive loss: L_c = -sum log softmax over observations - sum log softmax over
  predictions of lambda x_{i,t}^T y_{i,t}, with y_t = g(z^_t) and lambda a learned inverse
  temperature. `contrastive_loss`.
- Eq. 2, L_KL = KL(q(z_t | z^_t, x_t) || p(z^_t | z_{t-1}, a_{t-1})). `kl_loss`.
- J_M = L_c + beta L_KL + alpha_r (r_t - r^_t)^2 + alpha_a ||a_t - a^_t||^2 (Sec. 2.2), with the
  inverse dynamics a^_{t-1} = a(z_t, z_{t-1}). `model_loss`.
- Eq. 3-4, critic: J_Q(theta_i, Theta) = (Q_i(z_t, a_t) - sg(r + gamma V_target(z_{t+1})))^2,
  V_target = min_i Qbar_i(z_{t+1}, a') - alpha log pi(a' | z_{t+1}); trains the critics *and*
  the encoder/RSSM parameters Theta (Sec. 2.3, C.2). `critic_loss`.
- Eq. 5, actor: J_pi = alpha log pi(a_t | z_t) - min_i Q_i(z_t, a_t), on detached states;
  automatic entropy temperature with target entropy -|A|. `actor_loss`, `alpha_loss`.
- Algorithm 1 / A.3: collect one episode, then 0.5 x (episode length) gradient steps, each
  mini-batch used for J_M, J_Q and J_pi in turn. `main`.

Shapes are time-major: replay sequences (T, B, ...), states (T, B, D). Observations are rendered at
100x100 uint8 and randomly cropped to 84x84 with the same crop for a whole sequence; acting uses
the centre crop.

    python core.py --env dcs-walker-walk --distraction medium
    python core.py --env dcs-walker-walk --distraction medium --preset tiny --total-steps 600
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
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

# Argument validation of torch.distributions checks every sample; it is pure overhead here.
td.Distribution.set_default_validate_args(False)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment (part of the run name)"""
    env: str = "dcs-walker-walk"
    """env id: dcs-<domain>-<task>, dmc-<domain>-<task>, natural-<domain>-<task>,
    manipulation-<task>, robosuite-<task>-<robot>, pybullet-boxpush, toy-reach, toy-reach-center
    (README, "Environments")"""
    distraction: Optional[str] = None
    """dcs-*: none | easy | medium | hard | background; robosuite-*: none | color-lighting |
    color-lighting-camera; None: medium for dcs-* (the paper's setting), none otherwise"""
    dynamic: bool = True
    """distractions move within an episode (False: static per episode)"""
    video_dir: Optional[str] = None
    """DAVIS 2017 or video folder for backgrounds (default: built-in offline pool)"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ..."""
    compile: bool = False
    """torch.compile the networks (GPU; the first updates are slow while it compiles)"""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast for the networks"""
    preset: Literal["paper", "tiny"] = "paper"
    """'tiny': narrow nets, short sequences and episodes, for smoke tests; flags you set
    explicitly win over the preset (see PRESETS)"""
    total_steps: int = 500_000
    """environment steps to train for, counted after action repeat (simulator steps)"""
    action_repeat: Optional[int] = None
    """simulator steps per action (default: the per-task value of Table 3, see envs)"""
    time_limit: Optional[int] = None
    """episode length in simulator steps (default: the env's, 1000 for the control suite)"""
    eval_every: int = 10_000
    """environment steps between evaluations (0: only at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation, deterministic policy, on the validation videos"""
    log_every: int = 1_000
    """environment steps between progress lines and training-metric logs"""
    save_model: bool = False
    """write checkpoints (model, optimisers, counters, replay) every eval and at the end"""
    checkpoint_replay: bool = True
    """include the replay buffer in checkpoints so that --resume keeps the same data"""
    resume: Optional[str] = None
    """path of a checkpoint to continue from (same schedule and step counters)"""
    measure_updates: int = 0
    """if > 0: time this many updates on a synthetic batch at the configured sizes and 50 steps of
    the acting loop on --env, print one JSON line and exit (benchmark.sh speed)"""
    capture_video: bool = False
    """save an mp4 of the first eval episode (runs/<run>/videos) and a frame strip to TensorBoard"""

    # Observations (A.3).
    render_size: int = 100
    """side of the rendered observation (the paper resizes 320x240 renders to 100x100)"""
    crop_size: int = 84
    """side of the random crop fed to the encoder (same crop for the whole sequence)"""

    # Replay and schedule (A.3, Table 2).
    replay_capacity: int = 100_000
    """replay capacity in agent steps"""
    batch_size: int = 32
    """sequences per mini-batch (N)"""
    seq_len: int = 32
    """steps per sequence (T)"""
    prefill: int = 1000
    """environment steps of uniform random actions before the actor takes over"""
    updates_per_step: float = 0.5
    """gradient steps per agent step of each collected episode"""

    # World model (Table 1).
    cnn_filters: int = 32
    """filters of the 4 encoder conv layers"""
    embed: int = 50
    """encoder output x_t (the contrastive target), LayerNorm'd"""
    obs_mlp: int = 256
    """ObsMLP units ([256, 256] + LayerNorm)"""
    gru_mlp: int = 400
    """GRU_MLP units ([400, 400])"""
    deter: int = 200
    """GRUCell hidden units h_t"""
    gru: Literal["layernorm", "plain"] = "layernorm"
    """GRU cell: LayerNorm GRU (authors' code) or torch.nn.GRUCell"""
    prior_mlp: int = 400
    """PriorMLP units ([400, 400, 400])"""
    posterior_mlp: int = 400
    """PosteriorMLP units ([400, 400])"""
    stoch: int = 64
    """stochastic state size (not given in the paper; the authors' code uses 64)"""
    decoder_mlp: int = 256
    """observation-representation decoder g units ([256, 256, embed] + LayerNorm)"""
    reward_mlp: int = 128
    """reward predictor units ([128, 128, 1])"""
    inverse_mlp: int = 128
    """inverse dynamics units ([128, 128, |A|])"""
    min_std: float = 0.1
    """minimum std of the prior and posterior (softplus(x) + min_std)"""

    # Objective (Table 2) and ablations.
    beta: float = 0.01
    """KL weight"""
    alpha_r: float = 1.0
    """reward prediction weight"""
    alpha_a: float = 1.0
    """inverse dynamics weight"""
    free_nats: float = 0.0
    """clamp of the per-step KL from below (paper: none; the authors' code: 1.0)"""
    objective: Literal["contrastive", "reconstruction"] = "contrastive"
    """'reconstruction': the "Recon" baseline of Table 3, pixels decoded from the posterior"""
    negatives: Literal["batch", "same-sequence"] = "batch"
    """contrastive negatives from the whole batch, or only from the same sequence (Fig. 3)"""
    predict_from: Literal["prior", "posterior"] = "prior"
    """state that y_t is decoded from (C.3)"""
    no_inverse_dynamics: bool = False
    """drop the inverse dynamics loss (C.1)"""
    no_reward_loss: bool = False
    """drop the reward prediction loss (C.1)"""
    no_critic_grad_to_model: bool = False
    """keep the critic loss out of the encoder and RSSM (C.2)"""
    gating: bool = False
    """pixel-level gating CNN in front of the encoder (Sec. 3.5); masks are logged as images"""

    # Behaviour: SAC (Table 2).
    ac_hidden: int = 1024
    """units of the actor and critic MLPs (3 layers)"""
    sac_state: Literal["sample", "mean"] = "sample"
    """posterior state fed to SAC: a sample z_t ~ q (paper Eq. 3) or its mean (authors' code)"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """target critic soft-update rate"""
    init_alpha: float = 0.1
    """initial entropy temperature (authors' code: log alpha = -2.3)"""
    model_lr: float = 3e-4
    """learning rate of J_M (encoder, RSSM, heads, inverse temperature)"""
    inverse_temperature_lr: float = 3e-4
    """learning rate of lambda (paper: part of Theta; authors' code: 2e-3)"""
    critic_model_lr: float = 3e-4
    """learning rate of J_Q's gradient into the encoder and RSSM (authors' code: 1e-3, the critic's)"""
    critic_lr: float = 1e-3
    """critic learning rate"""
    actor_lr: float = 1e-3
    """actor learning rate"""
    alpha_lr: float = 1e-3
    """entropy temperature learning rate"""
    model_clip: float = 10.0
    """gradient-norm clip of the model"""
    critic_clip: float = 100.0
    """gradient-norm clip of the critic"""
    actor_clip: float = 10.0
    """gradient-norm clip of the actor"""


PRESETS = {
    "tiny": dict(cnn_filters=8, embed=16, obs_mlp=32, gru_mlp=32, deter=32, prior_mlp=32,
                 posterior_mlp=32, stoch=8, decoder_mlp=32, reward_mlp=16, inverse_mlp=16,
                 ac_hidden=32, batch_size=4, seq_len=8, render_size=48, crop_size=40,
                 prefill=200, eval_episodes=1, time_limit=200, replay_capacity=10_000),
}


def preset_args(preset: str = "paper", **overrides) -> Args:
    """Args with a preset's values as defaults; `overrides` (and CLI flags) win over them."""
    if preset not in ("paper", *PRESETS):
        raise ValueError(f"unknown preset {preset!r}; known: paper, {', '.join(PRESETS)}")
    return Args(**{**PRESETS.get(preset, {}), **overrides, "preset": preset})


def parse_args(argv=None) -> Args:
    """Read --preset first, then parse every flag with that preset's values as defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    preset = "paper"
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
    default = preset_args(preset) if preset in ("paper", *PRESETS) else Args()
    return tyro.cli(Args, args=argv, default=default)


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


class RSSM(nn.Module):
    """Appendix A.1. A state is a dict of (…, D) tensors: deter h, stoch s, mean, std."""

    def __init__(self, args: Args, action_dim: int):
        super().__init__()
        self.deter, self.stoch, self.min_std = args.deter, args.stoch, args.min_std
        self.obs_mlp = mlp(args.embed, [args.obs_mlp, args.obs_mlp], layer_norm=True)
        self.gru_mlp = mlp(args.stoch + action_dim, [args.gru_mlp, args.gru_mlp])
        self.gru_mlp.append(nn.ELU())  # its output feeds the GRU (ELU everywhere, A.2)
        cell = LayerNormGRUCell if args.gru == "layernorm" else nn.GRUCell
        self.cell = cell(args.gru_mlp, args.deter)
        self.prior_mlp = mlp(args.deter, [args.prior_mlp] * 3, 2 * args.stoch)
        self.posterior_mlp = mlp(args.deter + args.obs_mlp, [args.posterior_mlp] * 2, 2 * args.stoch)

    @property
    def state_dim(self) -> int:
        return self.deter + self.stoch

    def initial(self, batch: int, device) -> dict:
        zeros = lambda d: torch.zeros(batch, d, device=device)  # noqa: E731
        return dict(deter=zeros(self.deter), stoch=zeros(self.stoch), mean=zeros(self.stoch),
                    std=torch.ones(batch, self.stoch, device=device))

    def _gaussian(self, out: torch.Tensor, deter: torch.Tensor) -> dict:
        # The paper does not say how sigma is parameterised; softplus + min std as in Dreamer
        # (the authors' code: exp of a clamped log-std).
        mean, std = out.float().chunk(2, -1)
        std = F.softplus(std) + self.min_std
        return dict(deter=deter, stoch=mean + std * torch.randn_like(std), mean=mean, std=std)

    def prior_step(self, state: dict, action: torch.Tensor) -> dict:
        """h_t = GRUCell(h_{t-1}, GRU_MLP(s_{t-1}, a_{t-1})); (mu^, sigma^) = PriorMLP(h_t)."""
        deter = self.cell(self.gru_mlp(torch.cat([state["stoch"], action], -1)), state["deter"])
        return self._gaussian(self.prior_mlp(deter), deter)

    def posterior_step(self, prior: dict, x: torch.Tensor) -> dict:
        """(mu, sigma) = PosteriorMLP(h_t, ObsMLP(x_t)): the correction model q(z_t | z^_t, x_t)."""
        return self._gaussian(self.posterior_mlp(torch.cat([prior["deter"], self.obs_mlp(x)], -1)),
                              prior["deter"])

    def observe(self, x: torch.Tensor, action: torch.Tensor):
        """x (T, B, embed); action (T, B, A) is a_{t-1}. Returns posteriors, priors: (T, B, ...)."""
        state = self.initial(x.shape[1], x.device)
        posts, priors = [], []
        for t in range(x.shape[0]):
            prior = self.prior_step(state, action[t])
            state = self.posterior_step(prior, x[t])
            posts.append(state)
            priors.append(prior)
        stack = lambda states: {k: torch.stack([s[k] for s in states]) for k in states[0]}  # noqa: E731
        return stack(posts), stack(priors)

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
        mean, log_std = self.net(z).float().chunk(2, -1)
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
        za = torch.cat([z, a], -1)
        return self.q1(za).squeeze(-1).float(), self.q2(za).squeeze(-1).float()


# ---------------------------------------------------------------------------------------------
# Replay buffer
# ---------------------------------------------------------------------------------------------


class Replay:
    """Whole episodes in a flat ring of uint8 images; uniform sampling of in-episode sequences.

    Slot t of an episode holds obs_t, the action a_{t-1} that led to it (zeros at t = 0), the
    reward r_t received on arriving there (0 at t = 0) and cont_t = 0 if the episode terminated
    there. A sequence never crosses an episode boundary.
    """

    def __init__(self, capacity: int, obs_shape, action_dim: int, seed: int):
        self.capacity = capacity
        self.obs = np.zeros((capacity, *obs_shape), np.uint8)  # pages are allocated as they fill
        self.action = np.zeros((capacity, action_dim), np.float32)
        self.reward = np.zeros(capacity, np.float32)
        self.cont = np.ones(capacity, np.float32)
        self.episode = np.full(capacity, -1, np.int64)  # episode id per slot, -1 = empty
        self.pos = self.size = self.episodes = 0
        self.rng = np.random.default_rng(seed)
        self._starts, self._starts_length = np.zeros(0, np.int64), None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.obs, self.action, self.reward, self.cont, self.episode))

    def add_episode(self, obs, action, reward, cont):
        n = len(obs)
        if n > self.capacity:
            raise ValueError(f"episode of {n} steps does not fit a replay of {self.capacity}")
        idx = (self.pos + np.arange(n)) % self.capacity
        self.obs[idx], self.action[idx], self.reward[idx], self.cont[idx] = obs, action, reward, cont
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
        """Time-major numpy arrays; obs (T, B, 3, crop, crop) uint8 with one random crop per
        sequence (A.3: the same crop position across the entire sequence)."""
        starts = self.rng.choice(self.valid_starts(length), size=batch)
        idx = (starts[None, :] + np.arange(length)[:, None]) % self.capacity  # (T, B)
        obs = self.obs[idx]  # (T, B, 3, S, S)
        side = obs.shape[-1]
        oy, ox = self.rng.integers(0, side - crop + 1, size=(2, batch))
        windows = np.lib.stride_tricks.sliding_window_view(obs, (crop, crop), axis=(3, 4))
        obs = np.ascontiguousarray(windows[:, np.arange(batch), :, oy, ox].transpose(1, 0, 2, 3, 4))
        return dict(obs=obs, action=self.action[idx], reward=self.reward[idx], cont=self.cont[idx])

    def state_dict(self) -> dict:
        keep = slice(0, self.size)
        return dict(obs=self.obs[keep], action=self.action[keep], reward=self.reward[keep],
                    cont=self.cont[keep], episode=self.episode[keep], pos=self.pos,
                    size=self.size, episodes=self.episodes, rng=self.rng.bit_generator.state)

    def load_state_dict(self, state: dict):
        n = state["size"]
        for key in ("obs", "action", "reward", "cont", "episode"):
            getattr(self, key)[:n] = state[key]
        self.pos, self.size, self.episodes = state["pos"], n, state["episodes"]
        self.rng.bit_generator.state = state["rng"]
        self._starts_length = None


def centre_crop(obs: np.ndarray, crop: int) -> np.ndarray:
    """(…, 3, S, S) -> (…, 3, crop, crop): the view used for acting and evaluation."""
    off = (obs.shape[-1] - crop) // 2
    return obs[..., off:off + crop, off:off + crop]


def to_torch(batch: dict, device: torch.device) -> dict:
    """Host numpy batch -> device tensors; images stay uint8 over the bus (4x less to copy)."""
    pin = device.type == "cuda"
    out = {}
    for key, value in batch.items():
        t = torch.from_numpy(value)
        out[key] = (t.pin_memory() if pin else t).to(device, non_blocking=pin)
    return out


# ---------------------------------------------------------------------------------------------
# World-model objective J_M (Sec. 2.2)
# ---------------------------------------------------------------------------------------------


def contrastive_loss(x: torch.Tensor, y: torch.Tensor, inverse_temperature: torch.Tensor,
                     same_sequence: torch.Tensor | None = None):
    """Eq. 1 over N (sequence, time) pairs: x, y (N, D). Scores lambda x_i^T y_j; the positive of
    row i is column i. Softmax over observations and over predictions, averaged; each term is a
    mean over pairs (the paper writes sums: a constant factor), so uninformative scores give
    log N. `same_sequence` (N, N) bool restricts negatives to the same sequence (Fig. 3).
    Returns (loss, top-1 accuracy of the positive among its row)."""
    scores = inverse_temperature * x.float() @ y.float().T
    if same_sequence is not None:
        scores = scores.masked_fill(~same_sequence, float("-inf"))
    target = torch.arange(len(x), device=x.device)
    loss = 0.5 * (F.cross_entropy(scores, target) + F.cross_entropy(scores.T, target))
    accuracy = (scores.argmax(1) == target).float().mean()
    return loss, accuracy


def kl_loss(post: dict, prior: dict, free_nats: float) -> torch.Tensor:
    """Eq. 2: KL(q(s_t) || p(s^_t)) summed over latent dimensions, mean over (t, b)."""
    q = td.Independent(td.Normal(post["mean"], post["std"]), 1)
    p = td.Independent(td.Normal(prior["mean"], prior["std"]), 1)
    kl = td.kl_divergence(q, p)
    return kl.clamp_min(free_nats).mean() if free_nats > 0 else kl.mean()


def world_model_forward(wm: WorldModel, batch: dict):
    """Encode and filter a time-major batch: x (T, B, embed), posteriors, priors, gating mask."""
    x, mask = wm.encoder(batch["obs"])
    post, prior = wm.rssm.observe(x, batch["action"])
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
        y = wm.decoder(source[1:])
        same = None
        if args.negatives == "same-sequence":
            seq = torch.arange(B, device=x.device).repeat(T - 1)
            same = seq[:, None] == seq[None, :]
        l_c, accuracy = contrastive_loss(x[1:].flatten(0, 1), y.flatten(0, 1), wm.inverse_temperature, same)
        metrics.update(contrastive_loss=l_c, contrastive_accuracy=accuracy,
                       inverse_temperature=wm.inverse_temperature.detach())
    else:
        # The "Recon" baseline: reconstruct the (cropped) pixels from the posterior, as a
        # sequential VAE does; unit-variance Gaussian, summed over pixels.
        target = batch["obs"].float() / 255.0
        l_c = 0.5 * ((wm.pixel_decoder(z).float() - target) ** 2).sum((-3, -2, -1)).mean()
        metrics["reconstruction_loss"] = l_c
    l_kl = kl_loss(post, prior, args.free_nats)
    loss = l_c + args.beta * l_kl
    metrics["kl_loss"] = l_kl
    if not args.no_reward_loss:
        reward_loss = ((batch["reward"] - wm.reward(z).squeeze(-1).float()) ** 2).mean()
        loss = loss + args.alpha_r * reward_loss
        metrics["reward_loss"] = reward_loss
    if not args.no_inverse_dynamics:
        # a^_{t-1} = a(z_t, z_{t-1}); slot t of the batch holds a_{t-1}. tanh: actions in [-1, 1].
        predicted = torch.tanh(wm.inverse(torch.cat([z[1:], z[:-1]], -1)).float())
        inverse_loss = ((batch["action"][1:] - predicted) ** 2).sum(-1).mean()
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
    Theta (Algorithm 1 trains the model, then the critic, on the same mini-batch)."""
    with torch.set_grad_enabled(grad_to_model):
        _, post, _, _ = world_model_forward(wm, batch)
        return RSSM.latent(post, mean=args.sac_state == "mean")


def critic_loss(critics: Critics, target_critics: Critics, actor: Actor, log_alpha, z, batch, args):
    """Eq. 3-4 on the transitions (z_t, a_t, r_{t+1}, z_{t+1}) of the sequences; slot t+1 of the
    batch holds a_t and r_{t+1}."""
    action, reward, cont = batch["action"][1:], batch["reward"][1:], batch["cont"][1:]
    with torch.no_grad():
        next_z = z[1:].detach()
        dist = actor(next_z)
        next_action = dist.rsample()
        target_q = torch.min(*target_critics(next_z, next_action))
        v_target = target_q - log_alpha.exp() * dist.log_prob(next_action)  # Eq. 4
        y = reward + args.gamma * cont * v_target
    q1, q2 = critics(z[:-1], action)
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


class Agent:
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
        temperature = [self.wm.inverse_temperature_raw]
        self.theta = [p for p in self.wm.parameters() if p is not self.wm.inverse_temperature_raw]
        self.model_opt = torch.optim.Adam([{"params": self.theta},
                                           {"params": temperature, "lr": args.inverse_temperature_lr}],
                                          lr=args.model_lr)
        # J_Q trains the critics and Theta (Sec. 2.3); Theta's step comes from its own Adam so
        # that its moments are not mixed with J_M's. The authors' code puts Theta into the
        # critic optimiser at the critic's learning rate.
        self.critic_opt = torch.optim.Adam(self.critics.parameters(), lr=args.critic_lr)
        self.critic_model_opt = torch.optim.Adam(self.theta, lr=args.critic_model_lr)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=args.alpha_lr, betas=(0.5, 0.999))
        self.updates = 0
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
        if args.compile:
            rssm = self.wm.rssm
            rssm.prior_step, rssm.posterior_step = torch.compile(rssm.prior_step), torch.compile(rssm.posterior_step)
            for net in (self.wm.encoder, self.wm.decoder, self.actor, self.critics):
                net.compile()

    def update(self, batch: dict) -> dict:
        """The three updates of Algorithm 1 on one mini-batch: J_M, J_Q, J_pi (and alpha)."""
        args = self.args
        with self.autocast:
            loss, metrics = model_loss(self.wm, batch, args)
        self.model_opt.zero_grad(set_to_none=True)
        loss.backward()
        metrics["model_grad_norm"] = nn.utils.clip_grad_norm_(self.wm.parameters(), args.model_clip)
        self.model_opt.step()

        grad_to_model = not args.no_critic_grad_to_model
        with self.autocast:
            z = sac_states(self.wm, batch, args, grad_to_model)
            q_loss, q_metrics = critic_loss(self.critics, self.target_critics, self.actor, self.log_alpha,
                                            z, batch, args)
        self.critic_opt.zero_grad(set_to_none=True)
        self.critic_model_opt.zero_grad(set_to_none=True)
        q_loss.backward()
        metrics["critic_grad_norm"] = nn.utils.clip_grad_norm_(self.critics.parameters(), args.critic_clip)
        self.critic_opt.step()
        if grad_to_model:
            nn.utils.clip_grad_norm_(self.theta, args.model_clip)
            self.critic_model_opt.step()

        with self.autocast:
            pi_loss, log_prob = actor_loss(self.critics, self.actor, self.log_alpha, z[:-1])
        self.actor_opt.zero_grad(set_to_none=True)
        pi_loss.backward(inputs=list(self.actor.parameters()))
        metrics["actor_grad_norm"] = nn.utils.clip_grad_norm_(self.actor.parameters(), args.actor_clip)
        self.actor_opt.step()

        a_loss = alpha_loss(self.log_alpha, log_prob, self.target_entropy)
        self.alpha_opt.zero_grad(set_to_none=True)
        a_loss.backward()
        self.alpha_opt.step()

        with torch.no_grad():  # Polyak averaging of the target critics (tau = 0.005, every update)
            for p, tp in zip(self.critics.parameters(), self.target_critics.parameters()):
                tp.lerp_(p, args.tau)
        self.updates += 1
        metrics.update(q_metrics, actor_loss=pi_loss, alpha=self.log_alpha.exp().detach(),
                       alpha_loss=a_loss, entropy=-log_prob.mean())
        return metrics

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
            post = self.wm.rssm.posterior_step(self.wm.rssm.prior_step(post, prev), x)
            dist = self.actor(RSSM.latent(post, mean=self.args.sac_state == "mean"))
        action = dist.sample() if explore else deterministic_action(dist)
        return action[0].float().cpu().numpy(), (post, action.float())

    def num_parameters(self) -> int:
        """Trained parameters: world model, actor, critics (not the target critics)."""
        return sum(p.numel() for m in (self.wm, self.actor, self.critics) for p in m.parameters())

    def modules(self) -> dict:
        return dict(wm=self.wm, actor=self.actor, critics=self.critics, target_critics=self.target_critics,
                    model_opt=self.model_opt, critic_opt=self.critic_opt,
                    critic_model_opt=self.critic_model_opt, actor_opt=self.actor_opt, alpha_opt=self.alpha_opt)

    def state_dict(self) -> dict:
        state = {k: m.state_dict() for k, m in self.modules().items()}
        return dict(state, log_alpha=self.log_alpha.detach().cpu(), updates=self.updates)

    def load_state_dict(self, state: dict):
        for key, module in self.modules().items():
            module.load_state_dict(state[key])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.updates = state["updates"]


def evaluate(agent: Agent, env, episodes: int, record: bool = False):
    """Mean return of `episodes` episodes with the deterministic policy; frames of the first."""
    returns, frames = [], []
    for ep in range(episodes):
        obs, _ = env.reset()
        state, total, done = None, 0.0, False
        while not done:
            if record and ep == 0:
                frames.append(obs.transpose(1, 2, 0))
            action, state = agent.act(obs, state, explore=False)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns)), frames


# ---------------------------------------------------------------------------------------------
# Logging and checkpoints
# ---------------------------------------------------------------------------------------------


class Logger:
    """TensorBoard plus metrics.jsonl (one json object per log event)."""

    def __init__(self, run_dir: Path, args: Args):
        self.writer = SummaryWriter(str(run_dir))
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(
            f"|{k}|{v}|" for k, v in vars(args).items()))
        self.jsonl = open(run_dir / "metrics.jsonl", "a")

    def log(self, step: int, scalars: dict):
        record = {"step": step, "time": time.time()}
        for key, value in scalars.items():
            value = float(value.detach()) if torch.is_tensor(value) else float(value)
            self.writer.add_scalar(key, value, step)
            record[key] = value
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def close(self):
        self.writer.close()
        self.jsonl.close()


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
    """Atomic: write to a temporary file, then rename over the old checkpoint."""
    state = dict(agent=agent.state_dict(), counters=counters, args=vars(args),
                 replay=replay.state_dict() if replay is not None else None,
                 rng=dict(python=random.getstate(), numpy=np.random.get_state(),
                          torch=torch.get_rng_state()))
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name}: CUDA is not available here; use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: only {torch.cuda.device_count()} CUDA devices here")
    return device


def measure_speed(args: Args, device: torch.device) -> dict:
    """Speed benchmark. Updates: median seconds per update over `args.measure_updates` updates
    (after 2 warm-ups) on a random batch of the configured size (model and optimisers only, no
    env, no replay). Acting: env steps per second of the acting loop (policy step + env step,
    exploration actions) over 50 agent steps on `args.env`."""
    distraction = args.distraction or ("medium" if args.env.startswith("dcs-") else "none")
    env = envs.make(args.env, distraction=distraction, dynamic=args.dynamic, seed=args.seed,
                    image_size=args.render_size, action_repeat=args.action_repeat,
                    video_dir=args.video_dir, time_limit=args.time_limit)
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
    checkpoint = None
    if args.resume:
        if not Path(args.resume).is_file():
            raise SystemExit(f"--resume {args.resume}: no such checkpoint file")
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=False)
    if args.crop_size > args.render_size:
        raise SystemExit(f"--crop-size {args.crop_size} must not exceed --render-size {args.render_size}")
    device = resolve_device(args.device)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    distraction = args.distraction or ("medium" if args.env.startswith("dcs-") else "none")
    make = lambda split, seed: envs.make(args.env, distraction=distraction, dynamic=args.dynamic,  # noqa: E731
                                         seed=seed, image_size=args.render_size,
                                         action_repeat=args.action_repeat, split=split,
                                         video_dir=args.video_dir, time_limit=args.time_limit)
    # Evaluation on the validation videos, as the paper does.
    try:  # bad input (env id, distraction, video folder) ends here with a message, not a traceback
        env, eval_env = make("train", args.seed), make("val", args.seed + 10_000)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    if hasattr(env.action_space, "n"):
        raise SystemExit(f"error: {args.env} has discrete actions; CoRe's SAC needs a Box action space")
    run_name = f"{args.env}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.resume).parent if args.resume else Path("runs") / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = Logger(run_dir, args)
    action_dim = env.action_space.shape[0]

    agent = Agent(args, action_dim, device)
    replay = Replay(max(args.replay_capacity, args.seq_len), env.observation_space.shape, action_dim, args.seed)
    counters = dict(env_steps=0, agent_steps=0, episodes=0, next_eval=args.eval_every, last_eval=-1)
    if checkpoint is not None:
        agent.load_state_dict(checkpoint["agent"])
        if checkpoint["replay"] is not None:
            replay.load_state_dict(checkpoint["replay"])
        counters.update(checkpoint["counters"])
        random.setstate(checkpoint["rng"]["python"])
        np.random.set_state(checkpoint["rng"]["numpy"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        print(f"resumed from {args.resume} at env step {counters['env_steps']}")

    params = agent.num_parameters()
    print(f"run {run_dir} | device {device} | {params / 1e6:.1f}M parameters | replay "
          f"{replay.capacity:,} agent steps, up to {replay.nbytes / 2**30:.2f} GiB (filled lazily) | "
          f"{args.updates_per_step} updates per agent step, batch {args.batch_size}x{args.seq_len}")

    def checkpoint_now():
        if args.save_model:
            save_checkpoint(run_dir / "checkpoint.pt", agent, replay if args.checkpoint_replay else None,
                            counters, args)

    def run_eval():
        ret, frames = evaluate(agent, eval_env, args.eval_episodes, args.capture_video or args.gating)
        step = counters["env_steps"]
        logger.log(step, {"eval/episodic_return": ret})
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
        print(f"eval at {step}: return {ret:.1f}")
        counters["last_eval"] = step
        checkpoint_now()

    start_time, start_steps = time.time(), counters["env_steps"]
    last_log_step, last_log_time, last_updates = counters["env_steps"], time.time(), agent.updates
    while counters["env_steps"] < args.total_steps:
        # Collect one whole episode (first `prefill` env steps: uniform random actions).
        obs, _ = env.reset(seed=args.seed + counters["episodes"])
        ep = dict(obs=[obs], action=[np.zeros(action_dim, np.float32)], reward=[0.0], cont=[1.0])
        state, done, episode_return = None, False, 0.0
        while not done:
            if counters["env_steps"] < args.prefill:
                action = np.random.uniform(-1, 1, action_dim).astype(np.float32)
            else:
                action, state = agent.act(obs, state, explore=True)
            obs, reward, terminated, truncated, info = env.step(action)
            counters["env_steps"] += info["env_steps"]
            counters["agent_steps"] += 1
            episode_return += reward
            for key, value in zip(("obs", "action", "reward", "cont"), (obs, action, reward, 1.0 - terminated)):
                ep[key].append(value)
            done = terminated or truncated
        replay.add_episode(*(np.asarray(ep[k]) for k in ("obs", "action", "reward", "cont")))
        counters["episodes"] += 1
        length = len(ep["reward"]) - 1
        logger.log(counters["env_steps"], {"charts/episodic_return": episode_return,
                                           "charts/episodic_length": length})

        # Then 0.5 x (episode length) gradient steps, each on a fresh mini-batch.
        metrics = {}
        if replay.can_sample(args.seq_len):
            for _ in range(int(round(args.updates_per_step * length))):
                batch = to_torch(replay.sample(args.batch_size, args.seq_len, args.crop_size), device)
                metrics = agent.update(batch)

        now = time.time()
        if counters["env_steps"] - last_log_step >= args.log_every or counters["env_steps"] >= args.total_steps:
            sps = (counters["env_steps"] - start_steps) / (now - start_time)
            ups = (agent.updates - last_updates) / (now - last_log_time)
            last_log_step, last_log_time, last_updates = counters["env_steps"], now, agent.updates
            logs = {f"losses/{k}": v for k, v in metrics.items()}
            logs.update({"charts/SPS": sps, "charts/updates_per_second": ups, "charts/updates": agent.updates})
            logger.log(counters["env_steps"], logs)
            eta = (args.total_steps - counters["env_steps"]) / max(sps, 1e-9)
            print(f"step {counters['env_steps']:>8}/{args.total_steps} | return {episode_return:8.1f} | "
                  f"SPS {sps:6.1f} | updates {agent.updates} | ETA {eta / 60:6.1f} min", flush=True)
        if args.eval_every and counters["env_steps"] >= counters["next_eval"]:
            while counters["next_eval"] <= counters["env_steps"]:
                counters["next_eval"] += args.eval_every
            run_eval()

    if counters["last_eval"] != counters["env_steps"]:
        run_eval()
    env.close()
    eval_env.close()
    logger.close()
    return run_dir


if __name__ == "__main__":
    main(parse_args())
