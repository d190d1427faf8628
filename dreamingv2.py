"""DreamingV2: DreamerV2's discrete world model, trained without reconstruction.

Paper: M. Okada and T. Taniguchi, "DreamingV2: Reinforcement Learning with Discrete World Models
without Reconstruction". Built on the official DreamerV2 code (github.com/danijar/dreamerv2,
Sec. III-G), which this file follows where the paper is silent: `diff dreamerv2.py dreamingv2.py`
shows what DreamingV2 changes. "DreamerV2 Eq. n" are Hafner et al.'s (ICLR 2021, `dreamerv2.py`).

The idea. DreamerV2's RSSM keeps 32 categorical variables of 32 classes (Sec. III-A), but the
image decoder gives way to contrastive learning (Dreaming's J_NCE): from every posterior state z_t
the auxiliary dynamics (the RSSM prior, Sec. III-B) predicts z_{t+1..t+K} open loop with the real
actions, and each prediction must pick out its own future observation among the mini-batch's, by
log p(z | x') under a "critic" PMF, a softmax of W e' per variable, e' the embedding of a slowly
updated momentum encoder CNN' (Sec. III-C, III-E, Fig. 2c). The actor and critic are unchanged.

Paper map (equation -> where it is implemented), in the order of this file:
- Eq. 1, RSSM with straight-through categorical samples (Sec. III-A): `RSSM`, `sample_one_hot`;
  k-step predictions of the auxiliary dynamics p~ (Sec. III-B, Fig. 2a): `multi_step_priors`,
  with the RSSM prior or Dreaming's `LinearDynamics` (Table III).
- Eq. 3, J_Dreaming = sum_{k=0..K} (J_NCE_k + J_KL_k): J_KL_0 `kl_balance` (DreamerV2's), J_KL_k
  `overshooting_kl` (PlaNet's latent overshooting, ICML 2019, Eq. 7), J_NCE_k `nce_objectives`.
- Eq. 5, the critic p(z_t | x_t) ∝ exp(z_t^T W e_t) as categorical PMFs (Sec. III-C, Fig. 2c):
  `pmf_critic_log_pmf`, `contrastive_logits`; Eq. 6, J_NCE_aux (Fig. 2b): `nce_objectives`.
- Sec. III-F, random shift: `random_shift`; Eq. 4, J_DreamingV2 = J_Dreaming + J_NCE_aux, plus the
  reward likelihood: `world_model_loss`. Behaviour, DreamerV2's (Sec. III-G): `behaviour_losses`.
- The training step (Sec. II-B; the momentum encoder, Sec. III-E): `Agent.update`; the data it is
  called on (prefill, pretrain, an update every 5 agent steps): `main`.

The method runs from here to the APPENDIX banner; below it, the same text in all five scripts:
run settings, the run object, the compute object (device, precision, speed), the replay.
Shapes are time-major: sequences (T, B, ...), imagined rollouts (H + 1, N, ...) with N = T * B.

    python dreamingv2.py --env dmc-walker-walk
    python dreamingv2.py --env dcs-walker-walk --distraction medium --preset small
"""

from __future__ import annotations

import contextlib
import copy
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

# Argument validation of torch.distributions checks every sample; it costs ~20% of an update.
td.Distribution.set_default_validate_args(False)


@dataclass
class Args:
    """The algorithm: every default is the paper's setting (DMC from pixels, Table I), else
    DreamerV2's (official configs.yaml, dmc_vision), which the paper kept (Sec. III-G), or says why
    not. How a run is carried out (device, budget, evaluation, checkpoints): `RunSettings`."""

    # Environment.
    env: str = "dmc-walker-walk"  # paper Table I (E); any id of envs.make (docs/envs.md)
    distraction: str = "none"  # ours: the clean task; dcs-*: easy, medium, hard, background
    dynamic: bool = True  # ours: distractions move within an episode (DCS's dynamic setting)
    video_dir: Optional[str] = None  # ours: DAVIS 2017 or video folder (default: the built-in pool)
    eval_split: Literal["train", "val"] = "val"  # ours: evaluate on held-out videos (DCS protocol)
    seed: int = 1  # ours: seeds the networks, the replay and every episode (CleanRL's default)
    action_repeat: Optional[int] = None  # official dmc: 2 (None); 0: the env's per-task (PlaNet's)
    eval_action: Literal["mode", "mean"] = "mode"  # official agent.py; 'mean': the dist.'s (ours)
    preset: Literal["paper", "small", "tiny"] = "paper"  # ours: these defaults, or PRESETS below

    # Replay and training schedule.
    replay_capacity: int = 1_000_000  # ours, in simulator steps: a whole 500K-step run
    prioritize_ends: bool = False  # official dmc_vision replay.prioritize_ends (True by default)
    batch_size: int = 16  # official configs.yaml dataset.batch 16 sequences
    batch_length: int = 50  # official configs.yaml dataset.length 50 steps
    prefill: int = 1000  # official dmc_vision prefill: agent steps of uniform random actions
    pretrain: int = 100  # official dmc_vision pretrain: updates once, after the prefill
    train_every: int = 5  # official configs.yaml train_every 5 agent steps between training rounds
    updates_per_step: int = 1  # official configs.yaml train_steps 1 update per training round

    # World model (Eqs. 1, 3-6).
    cnn_depth: int = 48  # official configs.yaml encoder.cnn_depth 48 (channels 48/96/192/384)
    deter: int = 200  # official configs.yaml dmc_vision rssm.deter 200 (GRU state h_t)
    hidden: int = 200  # official dmc_vision rssm.hidden 200 (RSSM input and output layers)
    stoch: int = 32  # paper Sec. III-A, official rssm.stoch 32 categorical variables
    classes: int = 32  # paper Sec. III-A, official rssm.discrete 32 classes per variable
    mlp_units: int = 400  # official configs.yaml *_head.units 400 (reward, discount, actor, critic)
    mlp_layers: int = 4  # official configs.yaml *_head.layers 4
    init: Literal["glorot", "torch"] = "glorot"  # official (Keras): Glorot-uniform, zero biases
    kl_balance: float = 0.8  # DreamerV2 Alg. 2, official kl.balance 0.8: the prior's share alpha
    free_nats: float = 1.0  # official dmc_vision kl.free 1.0 on the batch mean (kl.free_avg)
    kl_scale: float = 1.0  # paper Eq. 3, official configs.yaml loss_scales.kl 1.0: the J_KL weight
    reward_scale: float = 1.0  # official loss_scales.reward 1.0: the reward term's weight
    pred_discount: bool = False  # official dmc_vision pred_discount (DMC episodes never end)
    model_lr: float = 3e-4  # official configs.yaml dmc_vision model_opt.lr 3e-4
    nce_steps: int = 3  # paper Sec. III-G, Table II: K, the horizon of J_NCE_k and J_KL_k, k = 0..K
    negatives: Literal["window", "batch"] = "window"  # paper Fig. 2a; batch: all T x B PMFs (ours)
    overshooting_kl: Literal["planet", "sum"] = "planet"  # J_KL_k, k >= 1: PlaNet Eq. 7; sum (ours)
    aux_dynamics: Literal["rssm", "linear"] = "rssm"  # paper Sec. III-B; linear: Table III
    momentum: float = 0.05  # paper Sec. III-G: eta of the momentum encoder CNN' (Sec. III-E)
    aug_pad: int = 4  # paper Sec. III-F: random-shift padding in pixels

    # Behaviour (DreamerV2 Eqs. 4-6, unchanged by the paper, Sec. III-G).
    horizon: int = 15  # DreamerV2 Sec. 2.2, official imag_horizon 15
    gamma: float = 0.99  # official configs.yaml discount 0.99
    return_lambda: float = 0.95  # official configs.yaml discount_lambda 0.95: lambda of Eq. 4
    actor_lr: float = 8e-5  # official configs.yaml dmc_vision actor_opt.lr 8e-5
    critic_lr: float = 8e-5  # official configs.yaml dmc_vision critic_opt.lr 8e-5
    actor_entropy: float = 1e-4  # official configs.yaml dmc_vision actor_ent 1e-4: eta of Eq. 6
    actor_grad: Literal["auto", "dynamics", "reinforce"] = "auto"  # official: per action type
    target_update_every: int = 100  # official slow_target_update 100 (slow_target_fraction 1)
    adam_eps: float = 1e-5  # official configs.yaml *_opt.eps 1e-5
    grad_clip: float = 100.0  # official configs.yaml *_opt.clip 100 (gradient norm)
    weight_decay: float = 1e-6  # official *_opt.wd 1e-6, as common/other.py applies it (Optimizer)


TOTAL_STEPS = 500_000  # paper Table I and Fig. 3: 500K env steps (--total-steps)

# Every setting other than the paper's (flags you set win); why and what it measured: docs/dreamingv2.md.
PRESETS = {
    # ours: the same algorithm sized for a 2-core CPU, 100K env steps of dmc-cartpole-swingup:
    "small": dict(
        action_repeat=0,  # the env's per-task repeat (8 for cartpole: DMC-100K); frames cost ~30 ms
        cnn_depth=16, deter=128, hidden=128, stoch=16, classes=16, mlp_units=128,
        mlp_layers=2,  # 0.8M parameters instead of 7.3M
        batch_size=16, batch_length=16, train_every=4,  # ~0.7 s an update (no decoder)
        model_lr=1e-3, actor_lr=3e-4, critic_lr=3e-4,  # few, small updates
        replay_capacity=100_000, total_steps=100_000, eval_episodes=5,
        prioritize_ends=True),  # the official default outside DMC, the same in the family
    # ours: end to end in well under a minute (smoke tests on the toy envs)
    "tiny": dict(cnn_depth=4, deter=32, hidden=32, stoch=4, classes=4, mlp_units=32, mlp_layers=2,
                 batch_size=4, batch_length=8, prefill=100, pretrain=2, horizon=5,
                 replay_capacity=100_000, total_steps=2000, eval_every=1000, eval_episodes=1,
                 prioritize_ends=True),
}


def presets(args: Args) -> dict:
    """The PRESETS entries a run applies, by name, in order (later wins): here the one --preset names."""
    return {args.preset: PRESETS[args.preset]} if args.preset in PRESETS else {}


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


class MLP(nn.Sequential):
    """`layers` hidden ELU layers of `units`, then a linear output. The output layer runs in fp32
    also under --precision bf16: rewards, values and action parameters feed returns and log-probs."""

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
        with full_precision(x):
            return out(x.float())


class Encoder(nn.Module):
    """4 conv layers, kernel 4, stride 2, ELU, depth 48/96/192/384: (…, 3, 64, 64) -> (…, 1536)."""

    def __init__(self, depth: int):
        super().__init__()
        chans = [3, depth, 2 * depth, 4 * depth, 8 * depth]
        self.net = nn.Sequential(*[m for i in range(4) for m in
                                   (nn.Conv2d(chans[i], chans[i + 1], 4, 2), nn.ELU())])
        self.out_dim = 8 * depth * 2 * 2

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.reshape(-1, *obs.shape[-3:]).float() / 255.0 - 0.5
        return self.net(x).reshape(*obs.shape[:-3], -1)


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
    """F.one_hot as float, without its range check (a host sync on CPU)."""
    return (index.unsqueeze(-1) == torch.arange(classes, device=index.device)).float()


def sample_one_hot(logits: torch.Tensor) -> torch.Tensor:
    """One-hot sample over the last axis, straight-through gradients (sample + p - sg(p)).
    argmax(logits + G), G ~ Gumbel: torch.multinomial's draw without its check (a GPU sync)."""
    probs = torch.softmax(logits.float(), -1)
    u = torch.rand_like(probs).clamp(1e-10, 1 - 1e-7)
    index = (logits.float() - torch.log(-torch.log(u))).argmax(-1)
    return one_hot(index, probs.shape[-1]) + (probs - probs.detach())


def categorical_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of independent categoricals (…, stoch, classes), summed: (…), fp32 (written out:
    torch's version indexes by data, a host sync)."""
    log_p, log_q = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum((-2, -1))


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(logits.float(), -1)
    return -(log_p.exp() * log_p).sum((-2, -1))


class RSSM(nn.Module):
    """Recurrent state-space model with categorical stochastic states (Eq. 1, Sec. III-A).

    A state is a dict: deter (…, deter), stoch (…, stoch, classes) one-hot samples, logits
    (…, stoch, classes) of the distribution the sample came from.
    """

    def __init__(self, embed_dim: int, action_dim: int, deter: int, hidden: int, stoch: int,
                 classes: int):
        super().__init__()
        self.deter, self.stoch, self.classes = deter, stoch, classes
        self.img_in = nn.Sequential(nn.Linear(stoch * classes + action_dim, hidden), nn.ELU())
        self.cell = LayerNormGRUCell(hidden, deter)
        self.img_out = nn.Sequential(nn.Linear(deter, hidden), nn.ELU(),
                                     nn.Linear(hidden, stoch * classes))  # prior p(z_t | h_t)
        self.obs_deter = nn.Linear(deter, hidden, bias=False)  # posterior: ELU(W_h h_t + W_e e_t + b)
        self.obs_embed = nn.Linear(embed_dim, hidden)
        self.obs_out = nn.Sequential(nn.ELU(), nn.Linear(hidden, stoch * classes))

    @property
    def feat_dim(self) -> int:
        return self.deter + self.stoch * self.classes

    def initial(self, batch: int, device) -> dict:
        zeros = torch.zeros(batch, self.stoch, self.classes, device=device)
        return dict(deter=torch.zeros(batch, self.deter, device=device), stoch=zeros, logits=zeros)

    def _stochastic(self, logits: torch.Tensor, deter: torch.Tensor) -> dict:
        logits = logits.reshape(*logits.shape[:-1], self.stoch, self.classes)
        return dict(deter=deter, stoch=sample_one_hot(logits), logits=logits)

    def _recurrent(self, state: dict, action: torch.Tensor) -> torch.Tensor:
        """h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}])."""
        x = self.img_in(torch.cat([state["stoch"].flatten(-2).to(action.dtype), action], -1))
        return self.cell(x, state["deter"])

    def img_step(self, state: dict, action: torch.Tensor) -> dict:
        """Prior step: h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}]), z_t ~ p(z_t | h_t)."""
        deter = self._recurrent(state, action)
        return self._stochastic(self.img_out(deter), deter)

    def obs_step(self, state: dict, action: torch.Tensor, embed: torch.Tensor) -> dict:
        """Posterior step (acting): h_t, then z_t ~ q(z_t | h_t, e_t)."""
        deter = self._recurrent(state, action)
        return self._stochastic(self.obs_out(self.obs_deter(deter) + self.obs_embed(embed)), deter)

    def observe(self, embed: torch.Tensor, action: torch.Tensor):
        """Filter a sequence from the zero state: the same posteriors as calling `obs_step` for
        t = 0..T-1. embed (T, B, E); action (T, B, A) is a_{t-1}, the action that led to observation
        t. Returns posteriors (deter, stoch, logits) and priors (deter, logits) as dicts of (T, B, ...).
        Speed: the embedding part W_e e_t + b and the prior network run once over all T*B steps."""
        embed_part = self.obs_embed(embed)  # (T, B, hidden)
        state = self.initial(embed.shape[1], embed.device)
        deters, stochs, logits = [], [], []
        for t in range(embed.shape[0]):
            deter = self._recurrent(state, action[t])
            state = self._stochastic(self.obs_out(self.obs_deter(deter) + embed_part[t]), deter)
            deters.append(deter)
            stochs.append(state["stoch"])
            logits.append(state["logits"])
        deter = torch.stack(deters)  # (T, B, deter)
        post = dict(deter=deter, stoch=torch.stack(stochs), logits=torch.stack(logits))
        prior_logits = self.img_out(deter)
        prior = dict(deter=deter, logits=prior_logits.reshape(*prior_logits.shape[:-1], self.stoch,
                                                              self.classes))
        return post, prior

    def feat(self, state: dict) -> torch.Tensor:
        """Model state [z_t, h_t] fed to every head: (…, stoch * classes + deter)."""
        return torch.cat([state["stoch"].flatten(-2).to(state["deter"].dtype), state["deter"]], -1)


def multi_step_priors(dynamics: RSSM, post: dict, action: torch.Tensor, steps: int) -> list[dict]:
    """Open-loop predictions of the auxiliary dynamics p~ (the RSSM, Sec. III-B, or LinearDynamics)
    from every posterior state (Fig. 2a): entry k-1 (T - k, B, ...), element t: p(z_{t+k} | z_t)."""
    state, out = post, []
    for k in range(1, steps + 1):  # z_{t+k-1}, t = 0..T-1-k, and action[t + k] = a_{t+k-1}
        state = {key: value[:-1] for key, value in state.items() if key in ("deter", "stoch")}
        state = dynamics.img_step(state, action[k:])
        out.append(state)
    return out


class LinearDynamics(nn.Module):
    """Dreaming's p~ (Table III): logits of z_{t+1} linear in [z_t, a_t] (ours: categorical)."""

    def __init__(self, stoch: int, classes: int, action_dim: int):
        super().__init__()
        self.net = nn.Linear(stoch * classes + action_dim, stoch * classes)

    def img_step(self, state: dict, action: torch.Tensor) -> dict:
        logits = self.net(torch.cat([state["stoch"].flatten(-2), action], -1))
        return dict(stoch=sample_one_hot(logits.unflatten(-1, state["stoch"].shape[-2:])))


class TruncatedNormal(td.Distribution):
    """Normal(loc, scale) truncated to [-1, 1], DreamerV2's actor distribution for DMC, sampled by
    inverting the CDF: rsample() is differentiable in loc and scale (dynamics backpropagation)."""

    arg_constraints = {"loc": td.constraints.real, "scale": td.constraints.positive}
    support = td.constraints.interval(-1.0, 1.0)
    has_rsample = True

    def __init__(self, loc, scale, validate_args=False):
        self.loc, self.scale = loc, scale
        self._alpha, self._beta = (-1 - loc) / scale, (1 - loc) / scale
        self._cdf_a, self._cdf_b = torch.special.ndtr(self._alpha), torch.special.ndtr(self._beta)
        self._z = (self._cdf_b - self._cdf_a).clamp_min(1e-6)
        super().__init__(loc.shape, validate_args=validate_args)

    @staticmethod
    def _phi(x):
        return torch.exp(-0.5 * x ** 2) / math.sqrt(2 * math.pi)

    @property
    def mean(self):
        return self.loc + self.scale * (self._phi(self._alpha) - self._phi(self._beta)) / self._z

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
        phi = self._phi
        return (0.5 * math.log(2 * math.pi * math.e) + self.scale.log() + self._z.log()
                + (self._alpha * phi(self._alpha) - self._beta * phi(self._beta)) / (2 * self._z))


class OneHotActionDist(td.OneHotCategoricalStraightThrough):
    """The actor's discrete actions: one-hot, straight-through, drawn by `sample_one_hot`."""

    def rsample(self, sample_shape=torch.Size()):
        return sample_one_hot(self.logits.expand(*sample_shape, *self.logits.shape))

    def sample(self, sample_shape=torch.Size()):
        return self.rsample(sample_shape).detach()


class Actor(nn.Module):
    """pi(a_t | z_t): truncated normal (mean tanh, std 2 sigmoid(x/2) + 0.1) or one-hot categorical."""

    def __init__(self, feat_dim: int, action_dim: int, discrete: bool, units: int, layers: int):
        super().__init__()
        self.discrete = discrete
        self.net = MLP(feat_dim, action_dim if discrete else 2 * action_dim, units, layers)

    def forward(self, feat: torch.Tensor) -> td.Distribution:
        return self.dist(self.net(feat))  # fp32

    def dist(self, out: torch.Tensor) -> td.Distribution:  # imagination reuses the net's outputs
        if self.discrete:
            return OneHotActionDist(logits=out)
        mean, std = out.chunk(2, -1)
        return td.Independent(TruncatedNormal(torch.tanh(mean), 2 * torch.sigmoid(std / 2) + 0.1), 1)


def mode(dist: td.Distribution, continuous: str = "mode") -> torch.Tensor:
    """The deterministic action of evaluation (--eval-action: the truncated normal's mode or mean)."""
    if isinstance(dist, td.OneHotCategorical):
        return one_hot(dist.logits.argmax(-1), dist.logits.shape[-1])
    return dist.base_dist.mean if continuous == "mean" else dist.base_dist.mode


def glorot_init(module: nn.Module):
    """The official initialisation (Keras defaults): Glorot-uniform weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class WorldModel(nn.Module):
    def __init__(self, args: Args, action_dim: int):
        super().__init__()
        self.encoder = Encoder(args.cnn_depth)
        self.momentum_encoder = copy.deepcopy(self.encoder).requires_grad_(False)  # CNN'
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
# World-model loss: J_DreamingV2 (Eqs. 3-6) on augmented views (Sec. III-F)
# ---------------------------------------------------------------------------------------------

# Index conventions, in the paper's notation (every slicing site below names what it picks).
# Replay (appendix): slot t of an episode, and step t of a sampled sequence (T, B), holds
#     x_t (obs), a_{t-1} (action: the one that led to x_t; zeros at t = 0), r_t (reward: received
#     on arriving at x_t; 0 at t = 0), cont_t (0 if the episode terminated at x_t), is_first_t.
# World model: the posterior at step t has seen (h_{t-1}, z_{t-1}, action[t] = a_{t-1}, x_t) and the
#     reward head at the model state (h_t, z_t), written z_t below, is trained on reward[t] = r_t.
# k-step predictions (J_NCE_k, J_KL_k, k = 1..K): element t of entry k - 1 is z_{t+k}, from z_t with
#     action[t+1 .. t+k] = a_t .. a_{t+k-1}; its target is step t + k ([k:]). Contrastive candidates:
#     time * B + b (--negatives batch); window t: row and column k * B + b hold z_{t+k}, x'_{t+k} of b.
# Imagination from a start state z_0 (each posterior state of the batch, N = T * B of them):
#     feats[t] = z_t for t = 0..H (H + 1 of them); actions[t] = a_t ~ pi(a | z_t) for t = 0..H-1,
#     which leads to z_{t+1}; reward[t] = r_t = E p(r | z_t); value[t] = v(z_t), the slow critic.
# Lambda-return: lambda_return(reward[:-1], value[:-1], discount[:-1], bootstrap=value[-1]) is
#     target[t] = V_t for t = 0..H-1: V_t = r_t + gamma ((1 - lambda) v(z_{t+1}) + lambda V_{t+1}),
#     V_H = v(z_H). The actor is credited for a_t (t = 0..H-2) with V_{t+1}, the return of the
#     state its action leads to (official agent.py); the critic regresses v(z_t) on V_t.


def gaussian_nll(mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-ln N(target | mean, 1), elementwise, fp32 (td.Normal(mean, 1.0) would copy 1.0 to the GPU)."""
    return 0.5 * (target.float() - mean.float()) ** 2 + 0.5 * math.log(2 * math.pi)


def kl_balance(post_logits: torch.Tensor, prior_logits: torch.Tensor, alpha: float,
               free: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KL balancing (Sec. 2.2): alpha KL(sg(q) || p) trains the prior towards the posterior,
    (1 - alpha) KL(q || sg(p)) regularises the posterior; free nats on each side's batch mean.
    Returns (loss, per-step KL value (T, B)), fp32."""
    kl_prior = categorical_kl(post_logits.detach(), prior_logits)
    kl_post = categorical_kl(post_logits, prior_logits.detach())
    loss = alpha * kl_prior.mean().clamp_min(free) + (1 - alpha) * kl_post.mean().clamp_min(free)
    return loss, kl_prior.detach()


def overshooting_kl(post_logits: torch.Tensor, prior_logits: torch.Tensor, free: float) -> torch.Tensor:
    """PlaNet's latent overshooting term (Sec. 4): KL(sg(q) || p_k), free nats on its batch mean."""
    return categorical_kl(post_logits.detach(), prior_logits).mean().clamp_min(free)


def pmf_critic_log_pmf(pmf_critic_w: nn.Linear, embed: torch.Tensor, stoch: int, classes: int):
    """Fig. 2c calc_pmf: log p(z | x) = log softmax over classes of W e, fp32: (…, E) -> (…, S, C)."""
    x = pmf_critic_w(embed)
    return F.log_softmax(x.float().reshape(*x.shape[:-1], stoch, classes), -1)


def contrastive_logits(z: torch.Tensor, log_pmf: torch.Tensor) -> torch.Tensor:
    """Fig. 2c calc_logit for every pair: logit[..., i, j] = sum(z_i * log pmf_j) = log p(z_i | x'_j)
    (Eq. 5 up to the normaliser). z (..., N, S, C), log_pmf (..., M, S, C) -> (..., N, M), fp32."""
    with full_precision(z):
        return z.float().flatten(-2) @ log_pmf.float().flatten(-2).transpose(-1, -2)


def windows(x: torch.Tensor, steps: int) -> torch.Tensor:
    """(T, B, ...) -> (T - K, K + 1, B, ...): window t holds x_t .. x_{t+K} (K = steps)."""
    index = torch.arange(x.shape[0] - steps, device=x.device)
    return x[index[:, None] + torch.arange(steps + 1, device=x.device)]


def contrastive_nce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-J_NCE, a cross-entropy over the candidates (Sec. II-C), row i's positive labels[i]; accuracy."""
    return F.cross_entropy(logits, labels), (logits.argmax(-1) == labels).float().mean()


def nce_objectives(latents: list, z_online: torch.Tensor, log_pmf: torch.Tensor, negatives: str):
    """([J_NCE_k, k = 0..K], J_NCE_aux), (loss, accuracy) each. latents[k] (T - k, B, S, C): element t
    predicts t + k; z_online: the online CNN's samples (Eq. 6); log_pmf: momentum log p(z | x'_t)."""
    (T, B), K = log_pmf.shape[:2], len(latents) - 1
    if negatives == "window":
        # Fig. 2a / Sec. III-E: z_{t+k} from z_t, k = 0..K, all B sequences, against x'_{t..t+K}
        z = torch.stack([x[:T - K] for x in latents], 1)  # (T-K, K+1, B, S, C), start times t
        pmf = windows(log_pmf, K).flatten(1, 2)  # (T-K, (K+1) B, S, C)
        rows = contrastive_logits(z.flatten(1, 2), pmf).reshape(T - K, K + 1, B, (K + 1) * B)
        positive = torch.arange((K + 1) * B, device=rows.device)  # column k * B + b
        terms = [contrastive_nce(rows[:, k].flatten(0, 1), positive.view(K + 1, B)[k].repeat(T - K))
                 for k in range(K + 1)]
        # J_NCE_aux (Eq. 6, Fig. 2b) over the same windows, rows (t, k, b)
        aux = contrastive_logits(windows(z_online, K).flatten(1, 2), pmf).flatten(0, 1)
        return terms, contrastive_nce(aux, positive.repeat(T - K))
    # 'batch': every start time against all T * B PMFs, candidate index = time * B + sequence
    flat, rows = log_pmf.flatten(0, 1), torch.arange(T * B, device=log_pmf.device)
    terms = [contrastive_nce(contrastive_logits(z.flatten(0, 1), flat), rows[:len(z) * B] + k * B)
             for k, z in enumerate(latents)]
    return terms, contrastive_nce(contrastive_logits(z_online.flatten(0, 1), flat), rows)


def random_shift(obs: torch.Tensor, pad: int) -> torch.Tensor:
    """Sec. III-F: pad by `pad` pixels repeating the border, crop the original size at a random
    offset s per image (as indexing clamp(i + s - pad, 0, H - 1): no padded copy), (N, C, H, W)."""
    n, _, h, w = obs.shape
    shift = torch.randint(0, 2 * pad + 1, (n, 2), device=obs.device)
    rows = (torch.arange(h, device=obs.device) + shift[:, :1] - pad).clamp(0, h - 1)  # (N, H)
    cols = (torch.arange(w, device=obs.device) + shift[:, 1:] - pad).clamp(0, w - 1)  # (N, W)
    batch = torch.arange(n, device=obs.device)[:, None, None]
    return obs[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (N, C, H, W)


def world_model_loss(wm: WorldModel, batch: dict, args: Args):
    """Eq. 4: -J_DreamingV2 = -sum_{k=0..K} (J_NCE_k + J_KL_k) - J_NCE_aux, + reward NLL; time-major."""
    # Sec. III-F: independent random shifts for the online view x and the momentum view x'.
    x, x_prime = (random_shift(batch["obs"].flatten(0, 1), args.aug_pad) for _ in range(2))
    embed = wm.encoder(x)  # e_t = CNN(x_t), (T*B, E)
    embed_prime = wm.momentum_encoder(x_prime).detach()  # Sec. III-E: stop-gradient after CNN'
    momentum_log_pmf = pmf_critic_log_pmf(wm.pmf_critic_w, embed_prime, args.stoch, args.classes)
    # The action into the first step of an episode is zero (official RSSM.obs_step with is_first;
    # the replay already stores zeros there, this keeps it so for any batch).
    action = batch["action"] * (1 - batch["is_first"])[..., None]  # action[t] = a_{t-1}
    post, prior = wm.rssm.observe(embed.view(*action.shape[:2], -1), action)
    priors = multi_step_priors(wm.rssm, post, action, args.nce_steps)  # k = 1..K, (T-k, B, ...)
    # J_KL_k (Eq. 3): k = 0 DreamerV2's KL; k >= 1 q(z_{t+k}) = post[k:] against p(z_{t+k} | z_t) = p[t]
    kl_0, kl_value = kl_balance(post["logits"], prior["logits"], args.kl_balance, args.free_nats)
    pairs = [(post["logits"][k:], p["logits"]) for k, p in enumerate(priors, 1)]
    if args.overshooting_kl == "planet":  # PlaNet Eq. 7: mean over distances, sg(posterior)
        overshoot = sum(overshooting_kl(q, p, args.free_nats) for q, p in pairs)
        kl_loss = kl_0 + (overshoot / len(pairs) if pairs else 0.0)
    else:  # 'sum': each k balanced like k = 0, summed unweighted
        kl_loss = kl_0 + sum(kl_balance(q, p, args.kl_balance, args.free_nats)[0] for q, p in pairs)
    # J_NCE_k (Eq. 3, Fig. 2a): the posterior (k = 0) and the k-step predictions of p~ (Sec. III-B)
    if args.aux_dynamics == "linear":  # Table III (J_KL_k above still rolls the RSSM prior)
        priors = multi_step_priors(wm.linear_dynamics, post, action, args.nce_steps)
    z_online = sample_one_hot(pmf_critic_log_pmf(wm.pmf_critic_w, embed, args.stoch, args.classes))  # Eq. 6
    latents = [post["stoch"], *(p["stoch"] for p in priors)]  # k = 0..K
    nce_terms, (nce_aux_loss, aux_accuracy) = nce_objectives(
        latents, z_online.view_as(post["stoch"]), momentum_log_pmf.view_as(post["stoch"]), args.negatives)
    nce_loss = sum(loss for loss, _ in nce_terms)
    feat = wm.rssm.feat(post)  # (T, B, F)
    reward_nll = gaussian_nll(wm.reward(feat).squeeze(-1), batch["reward"]).mean()  # p(r_t | z_t)
    loss = nce_loss + args.kl_scale * kl_loss + nce_aux_loss + args.reward_scale * reward_nll
    metrics = dict(nce_loss=nce_loss, nce_aux_loss=nce_aux_loss, nce_accuracy=nce_terms[0][1],
                   nce_aux_accuracy=aux_accuracy, reward_loss=reward_nll, kl_loss=kl_loss,
                   kl=kl_value.mean(), prior_entropy=categorical_entropy(prior["logits"]).mean(),
                   post_entropy=categorical_entropy(post["logits"]).mean())
    for k, (term, accuracy) in enumerate(nce_terms):
        metrics[f"nce_loss_{k}"], metrics[f"nce_accuracy_{k}"] = term, accuracy
    if wm.discount is not None:
        # The discount head predicts episode continuation (Bernoulli), scaled by gamma when used.
        discount_nll = F.binary_cross_entropy_with_logits(wm.discount(feat).squeeze(-1),
                                                          batch["cont"].float())
        loss = loss + discount_nll
        metrics["discount_loss"] = discount_nll
    metrics["model_loss"] = loss
    return loss, post, {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# Behaviour learning in imagination (DreamerV2 Eqs. 4-6, unchanged: Sec. III-G)
# ---------------------------------------------------------------------------------------------


def lambda_return(reward, value, discount, bootstrap, lam: float):
    """Eq. 4, time-major (H, N): V_t = r_t + gamma_t ((1 - lam) v_{t+1} + lam V_{t+1}), V_H = bootstrap.
    reward[t] = r_t, value[t] = v(s_t), discount[t] = gamma_t for t = 0..H-1; returns V_0..V_{H-1}."""
    next_values = torch.cat([value[1:], bootstrap[None]], 0)  # v(s_{t+1}), t = 0..H-1
    inputs = reward + discount * next_values * (1 - lam)
    returns, last = [], bootstrap
    for t in reversed(range(reward.shape[0])):
        last = inputs[t] + discount[t] * lam * last
        returns.append(last)
    return torch.stack(returns[::-1])


def imagine(wm: WorldModel, actor: Actor, start: dict, horizon: int):
    """Roll the prior forward from posterior states under the actor: feats (H+1, N, F),
    actions (H, N, A), action a_t taken at feat_t, actor outputs (H, N, ·). Gradients flow through
    the dynamics into the actions (the actor sees detached features, as in the official code)."""
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
    """Actor (Eq. 6) and critic (Eq. 5) losses on imagined rollouts from every posterior state."""
    start = {k: post[k].detach().flatten(0, 1) for k in ("deter", "stoch")}  # (T*B, ...)
    feats, actions, outs = imagine(wm, ac.actor, start, args.horizon)
    # Paper Eq. 4 uses r_t = E[p(r_t | z_t)] of the state the action is taken in.
    reward = wm.reward(feats).squeeze(-1)  # r_t, t = 0..H: (H+1, N), fp32 like every value below
    if wm.discount is not None:
        discount = args.gamma * torch.sigmoid(wm.discount(feats).squeeze(-1))
    else:
        discount = torch.full_like(reward, args.gamma)
    value = ac.target_critic(feats).squeeze(-1)  # slow critic v(z_t), (H+1, N)
    # r_t, v(z_t), gamma_t for t = 0..H-1 and the bootstrap v(z_H): target[t] = V_t, (H, N)
    target = lambda_return(reward[:-1], value[:-1], discount[:-1], value[-1], args.return_lambda)
    # Imagined steps after a predicted episode end count less: weight_t = prod_{k<t} gamma_k for
    # t = 0..H, (H+1, N).
    weight = torch.cumprod(torch.cat([torch.ones_like(discount[:1]), discount[:-1]], 0), 0).detach()
    # Actor, indexed as the official agent.py actor_loss: the action taken at z_t (t = 0..H-2) is
    # credited with V_{t+1}; z_0 comes from the replay, so V_0 trains nothing, and z_{H-1}'s action
    # leads to the bootstrap state only.
    policy = ac.actor.dist(outs[:-1])  # pi(a_t | z_t), t = 0..H-2: the in-loop outputs
    grad = args.actor_grad if args.actor_grad != "auto" else ("reinforce" if discrete else "dynamics")
    if grad == "dynamics":
        objective = target[1:]  # V_{t+1}, t = 0..H-2; rho = 1: backpropagated through the model into a_t
    else:  # rho = 0: REINFORCE, baseline the slow critic, advantage V_{t+1} - v(z_t) (official)
        # a_t, V_{t+1} and v(z_t) for t = 0..H-2
        objective = policy.log_prob(actions[:-1].detach()) * (target[1:] - value[:-2]).detach()
    entropy = policy.entropy()
    actor_loss = -(weight[:-2] * (objective + args.actor_entropy * entropy)).mean()  # weight_t, t = 0..H-2
    critic = ac.critic(feats[:-1].detach()).squeeze(-1)  # v(z_t), t = 0..H-1: (H, N), fp32
    critic_loss = (gaussian_nll(critic, target.detach()) * weight[:-1]).mean()  # against V_t, weight_t
    metrics = dict(actor_loss=actor_loss, critic_loss=critic_loss, actor_entropy=entropy.mean(),
                   imagined_reward=reward.mean(), value=critic.mean(), lambda_return=target.mean())
    return actor_loss, critic_loss, {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# Agent: the training step and acting
# ---------------------------------------------------------------------------------------------


class Agent:
    """The world model, the actor and the critic, one optimiser each, the training step, acting."""

    def __init__(self, args: Args, action_space, compute: Compute):
        self.args, self.compute, self.device = args, compute, compute.device
        self.discrete, self.action_dim = action_size(action_space)
        self.wm = WorldModel(args, self.action_dim).to(self.device)
        self.ac = ActorCritic(args, self.wm.rssm.feat_dim, self.action_dim, self.discrete).to(self.device)
        # One Adam per network, with DreamerV2's clip and weight decay (configs.yaml *_opt).
        opt = dict(eps=args.adam_eps, clip=args.grad_clip, weight_decay=args.weight_decay)
        trained = [p for p in self.wm.parameters() if p.requires_grad]  # not CNN'
        self.model_opt = compute.optimizer("model", trained, args.model_lr, **opt)
        self.actor_opt = compute.optimizer("actor", self.ac.actor.parameters(), args.actor_lr, **opt)
        self.critic_opt = compute.optimizer("critic", self.ac.critic.parameters(), args.critic_lr, **opt)
        self.world_model_loss = compute.loss(world_model_loss)
        self.behaviour_losses = compute.loss(behaviour_losses)
        self.updates = 0

    def update(self, batch: dict) -> dict:
        """One training step in the order of Sec. II-B: the world model on a replayed batch (Eq. 4),
        CNN' (Sec. III-E), then behaviour in imagination from its posterior states (Sec. III-G)."""
        model_loss, post, metrics = self.world_model_loss(self.wm, batch, self.args)
        metrics |= self.model_opt(model_loss)
        # CNN' <- (1 - eta) CNN' + eta CNN, the momentum encoder (Sec. III-E)
        self.compute.update_target(self.wm.momentum_encoder, self.wm.encoder, self.args.momentum)
        with frozen(self.wm):  # the actor's gradient flows through the model; no model weight learns
            actor_loss, critic_loss, behaviour = self.behaviour_losses(self.wm, self.ac, post,
                                                                       self.args, self.discrete)
        metrics |= optimise((self.actor_opt, actor_loss), (self.critic_opt, critic_loss))
        if self.updates % self.args.target_update_every == 0:  # DreamerV2 Eq. 5's slow critic: a copy
            self.compute.update_target(self.ac.target_critic, self.ac.critic, fraction=1.0)
        self.updates += 1
        return metrics | behaviour

    @torch.no_grad()
    def act(self, obs: np.ndarray, state, explore: bool):
        """One filtering step and an action. state = (latent, previous action) or None."""
        if state is None:
            latent = self.wm.rssm.initial(1, self.device)
            prev = torch.zeros(1, self.action_dim, device=self.device)
        else:
            latent, prev = state
        obs_t = torch.as_tensor(obs, device=self.device)[None]
        with self.compute.precision():
            # Latents are sampled in evaluation too (official eval_state_mean=False); only the
            # action is the mode.
            latent = self.wm.rssm.obs_step(latent, prev, self.wm.encoder(obs_t))
            dist = self.ac.actor(self.wm.rssm.feat(latent))
        action = dist.sample() if explore else mode(dist, self.args.eval_action)
        return action[0].float().cpu().numpy(), (latent, action.float())

    def num_parameters(self) -> int:
        """Trained parameters: world model (not CNN'), actor, critic (not the slow target critic)."""
        return sum(p.numel() for m in (self.wm, self.ac.actor, self.ac.critic) for p in m.parameters()
                   if p.requires_grad)

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
# Main loop
# ---------------------------------------------------------------------------------------------


def action_repeat(args: Args) -> int:
    """--action-repeat, else 2 on every DMC-family task (official configs.yaml dmc: PlaNet's
    per-task values are not DreamerV2's), else (and for 0) the env's own default."""
    if args.action_repeat:
        return args.action_repeat
    if args.action_repeat is None and args.env.partition("-")[0] in ("dmc", "dcs", "natural"):
        return 2
    return envs.default_action_repeat(args.env)


def make_env(args: Args, split: str):
    """The env the agent sees: 64 x 64 pixels, `split`'s background videos."""
    return envs.make(args.env, distraction=args.distraction, dynamic=args.dynamic, seed=args.seed,
                     image_size=64, action_repeat=action_repeat(args), split=split,
                     video_dir=args.video_dir)


def updates_due(args: Args, run: Run) -> int:
    """Updates after this agent step: `pretrain` once, when the prefill is done, then
    `updates_per_step` every `train_every` agent steps (official agent.py: train_every, train_steps)."""
    done = run.counters.get("pretrain_updates", 0)
    if done < args.pretrain:
        run.counters["pretrain_updates"] = args.pretrain
        return args.pretrain - done
    return args.updates_per_step if run.agent_steps % args.train_every == 0 else 0


def main(args: Args, settings: RunSettings):
    if args.nce_steps >= args.batch_length:  # K steps after a start time, inside one sequence
        raise SystemExit(f"error: --nce-steps {args.nce_steps} must lie in 0..{args.batch_length - 1}")
    compute = Compute(settings, args.seed)  # device, precision, speed; seeds every RNG
    env, eval_env = make_envs(make_env, args)  # for training, and on --eval-split's videos
    agent = Agent(args, env.action_space, compute)
    repeat = action_repeat(args)  # --replay-capacity counts simulator steps
    slots = replay_slots(args.replay_capacity // repeat, settings.total_steps, repeat, args.batch_length)
    replay = Replay(slots, env.observation_space.shape, agent.action_dim, args.seed,
                    compute.replay_device, args.prioritize_ends)
    run = Run(args, settings, compute, agent, replay, env, eval_env,
              batch=(args.batch_size, args.batch_length),
              updates_per_step=args.updates_per_step / args.train_every)
    if settings.evaluate or settings.measure_updates:  # no training: score a checkpoint, time updates
        return run.evaluate_checkpoint() if settings.evaluate else run.measure_speed()

    obs, state = run.start(), None  # the run folder, --resume, the first observation
    while run.env_steps < settings.total_steps:
        if run.agent_steps < args.prefill:
            action = random_action(env.action_space)
        else:
            action, state = agent.act(obs, state, explore=True)
        obs, reward, terminated, truncated, info = env.step(env_action(action, env.action_space))
        if run.record(obs, action, reward, terminated, truncated, info):  # stored in the replay
            obs, state = run.reset(), None
        if run.agent_steps >= args.prefill and replay.can_sample(args.batch_length):
            run.train(updates_due(args, run))
        run.log_and_evaluate()
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
