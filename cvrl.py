"""CVRL: contrastive variational reinforcement learning, in one file.

Paper: Xiao Ma, Siwei Chen, David Hsu, Wee Sun Lee, "Contrastive Variational Reinforcement Learning
for Complex Observations", CoRL 2020. Authors' code (TensorFlow 2, built on Dreamer's):
github.com/Yusufma03/CVRL. Documentation: docs/cvrl.md.

The idea. A Dreamer-v1 world model (Gaussian RSSM) is trained without reconstructing pixels: the
observation likelihood of the ELBO is replaced by the mutual information I(s_t, o_t), estimated
with InfoNCE by scoring each (state, observation) pair of a replayed batch against all other
observations of the batch (Sec. 3.2). Behaviour is learned by a hybrid actor-critic: Dreamer's
analytic gradients of imagined lambda-returns plus SAC on the real posterior trajectories of the
replay (Sec. 3.3). Actions are chosen by latent-guided MPC: the actor's plan is refined by
gradient ascent on the imagined value (Sec. 3.4, App. A.3).

The defaults are the paper's (Natural Mujoco, Table 1), else the authors' code's, else ours; each
Args field names its source (docs/cvrl.md, "Deviations"). Where the paper and the authors' code
differ, the paper's is the default: the bilinear score of App. B.5, SAC's actor loss applied to the
actor (Sec. 3.3; --no-sac-updates-actor gives theirs), MPC moving the whole plan (App. A.3;
--mpc-first-action-only gives theirs).

Paper map (equation -> where it is implemented), in the order of this file:
- RSSM (Sec. 3.1, App. B.4): h_t = GRU(h_{t-1}, s_{t-1}, a_{t-1}), prior p(s_t | h_t), posterior
  q(s_t | h_t, o_t), diagonal Gaussians: `RSSM`.
- Eq. 5, InfoNCE (App. B.1, B.5): log f(s_t, o_t) - log sum_{o' in O} f(s_t, o'), the bilinear
  f(s, o) = exp(z_o^T W s'), O = all B*T observations of the batch: `ContrastiveHead`, `infonce`.
- Eq. 6, CELBO: InfoNCE + ln p(r_t | s_t) - KL[q || p] (free nats 3): `celbo_loss`; Table 2's
  ablations: ln p(o_t | s_t) instead (Eq. 2, `--objective generative`) or neither (`reward`).
- App. A.1, latent imagination: `imagine`; App. A.2, V_lambda: `lambda_return`.
- Eq. 7, L_Dreamer: actor -V_lambda (dynamics backpropagation), critic 1/2 (v - V_lambda)^2:
  `dreamer_actor_loss`, `value_loss_fn`.
- Sec. 3.3, L_CVRL = L_Dreamer + alpha L_SAC, SAC on the real posterior transitions (s_t, a_t,
  r_{t+1}, s_{t+1}) of the batch, two Q-networks (App. B.6): `sac_q_loss`, `sac_actor_loss`,
  `sac_losses`.
- App. B.7, one optimiser per network, every loss taken before any step: `cvrl_losses`,
  `Agent.update`; the data it runs on (prefill, pretrain, an update every 5 agent steps): `main`.
- Sec. 3.4 / App. A.3 / B.8, latent-guided MPC: a~ <- a~ + lr grad_a~ V_lambda(s_t) over the
  15-step action sequence, from the actor's plan; execute a~_0: `Agent.plan`, `optimise_plan`.

The method runs from here to the APPENDIX banner; below it, the same text in all five scripts:
run settings, the run object, the compute object (device, precision, speed), the replay.
Shapes are time-major: replay sequences (T, B, ...), imagined rollouts (H + 1, N, ...) with
N = T * B start states.

    python cvrl.py --env natural-walker-walk
    python cvrl.py --env dcs-walker-walk --distraction medium --preset small
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

# Argument validation of torch.distributions checks every sample; it costs time and host syncs.
td.Distribution.set_default_validate_args(False)


@dataclass
class Args:
    """The algorithm: every default is CVRL's setting for Natural Mujoco (paper Table 1), from the
    paper or, where it is silent, the authors' code, or says why not. How a run is carried out
    (device, budget, evaluation, checkpoints): `RunSettings`, in the appendix."""

    # Environment.
    env: str = "natural-walker-walk"  # paper Table 1 (Natural Mujoco); any id of envs.make
    distraction: str = "none"  # ours: natural-* always has its videos; dcs-*: easy ... background
    dynamic: bool = True  # paper Sec. 4.1: the background videos move within an episode
    video_dir: Optional[str] = None  # ours: a video folder (the paper's ILSVRC videos: not shipped)
    eval_split: Literal["train", "val"] = "val"  # ours: evaluate on held-out videos
    seed: int = 1  # ours: seeds the networks, the replay and every episode (CleanRL's default)
    action_repeat: Optional[int] = 2  # authors' code: 2 for every task; None or 0: the env's own
    preset: Literal["paper", "small", "tiny"] = "paper"  # ours: these defaults, or PRESETS below

    # Replay and training schedule.
    replay_capacity: int = 1_000_000  # ours: env steps (memory; the authors' code keeps them all)
    batch_size: int = 50  # App. B.1's B: Dreamer-v1's 50 (ours; the authors' code samples 60)
    batch_length: int = 50  # App. B.1's T, authors' code 50: B*T - 1 negatives per pair
    prefill: int = 2500  # authors' code: 5000 env steps of uniform random actions, in agent steps
    pretrain: int = 100  # authors' code pretrain 100: updates once, after the prefill
    train_every: int = 5  # ours: the authors' 100 updates per 1000 env steps, spread out
    updates_per_step: int = 1  # ours: updates per training round (see train_every)

    # World model: the CELBO (Eq. 6).
    objective: Literal["contrastive", "generative", "reward"] = "contrastive"  # Eq. 6; Table 2
    cnn_depth: int = 32  # App. B.3: encoder channels 32/64/128/256
    deter: int = 200  # App. B.4: GRU (deterministic) state h_t
    hidden: int = 200  # App. B.4: the RSSM's input and output layers
    stoch: int = 30  # App. B.4: Gaussian stochastic state s_t
    contrast_units: int = 200  # App. B.5: observation and state embeddings, W 200 x 200
    mlp_units: int = 400  # App. B.6: reward, value, actor and Q MLPs
    free_nats: float = 3.0  # authors' code free_nats 3, on the batch-mean KL
    kl_scale: float = 1.0  # authors' code kl_scale 1 (Eq. 6 has no weight)
    model_lr: float = 6e-4  # App. B.7

    # Behaviour: hybrid actor-critic (Eq. 7, Sec. 3.3) and latent-guided MPC (Sec. 3.4).
    horizon: int = 15  # App. B.8, authors' code horizon 15: imagination and MPC
    gamma: float = 0.99  # authors' code discount 0.99
    return_lambda: float = 0.95  # App. A.2, authors' code disclam 0.95: lambda of V_lambda
    actor_lr: float = 8e-5  # App. B.7
    value_lr: float = 8e-5  # App. B.7
    sac: bool = True  # Sec. 3.3: add alpha L_SAC on real trajectories (False: Table 2's no-SAC)
    sac_weight: float = 1.0  # ours: alpha of L_CVRL = L_Dreamer + alpha L_SAC (the paper: none)
    sac_updates_actor: bool = True  # Sec. 3.3; False: the authors' code (SAC's actor loss unused)
    q_lr: float = 8e-5  # App. B.7's SAC optimiser
    learn_temperature: bool = False  # authors' code: fixed; True: SAC v2's, towards entropy -|A|
    temperature_lr: float = 3e-4  # ours: SAC v2's, with --learn-temperature
    init_temperature: float = 1.0  # authors' code: 1, never updated
    tau: float = 0.005  # authors' code (soft_actor_critic.py) tau 5e-3: target Q-nets' Polyak rate
    mpc: bool = True  # Sec. 3.4: latent-guided MPC (False: Table 2's no-MPC, the actor alone)
    mpc_iterations: int = 1  # App. A.3, authors' code: one ascent step of the action sequence
    mpc_lr: float = 0.003  # App. B.8: SGD learning rate of the MPC
    mpc_first_action_only: bool = False  # App. A.3: the whole plan moves; True: the authors' code
    expl_noise: float = 0.3  # authors' code expl_amount 0.3: Gaussian noise on the action taken
    adam_eps: float = 1e-5  # ours: the paper does not say (the authors' code: TensorFlow's)
    grad_clip: float = 100.0  # authors' code grad_clip 100: gradient norm, every optimiser


TOTAL_STEPS = 5_000_000  # paper Table 1, authors' code steps 5e6 (env steps, after action repeat)

# Every setting other than the paper's (flags you set win); why and what it measured: docs/cvrl.md.
PRESETS = {
    # ours: the same algorithm sized for a 2-core CPU, 100K env steps of dmc-cartpole-swingup:
    "small": dict(
        action_repeat=0,  # the env's per-task repeat (8 for cartpole: DMC-100K); frames cost ~30 ms
        cnn_depth=16, deter=128, hidden=128, stoch=16, contrast_units=128,
        mlp_units=128,  # 0.74M parameters
        batch_size=16, batch_length=16, train_every=3, prefill=1000,  # ~0.6 s an update, one thread
        actor_lr=3e-4, value_lr=3e-4, q_lr=3e-4,  # few, small updates
        total_steps=100_000, eval_episodes=5, replay_capacity=100_000),
    # ours: end to end in well under a minute (smoke tests on the toy envs)
    "tiny": dict(cnn_depth=4, deter=32, hidden=32, stoch=4, contrast_units=16, mlp_units=32,
                 batch_size=4, batch_length=8, prefill=100, pretrain=2, horizon=5, mpc_iterations=2,
                 total_steps=2000, eval_every=1000, eval_episodes=1, replay_capacity=100_000),
}


def presets(args: Args) -> dict:
    """The PRESETS entries a run applies, by name, in order (later wins): here the one --preset names."""
    return {args.preset: PRESETS[args.preset]} if args.preset in PRESETS else {}


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


class MLP(nn.Sequential):
    """`layers` hidden ELU layers of `units`, then a linear output (Dreamer-v1's dense heads). The
    output layer runs in fp32 also under --precision bf16: rewards, values, Q and action
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
        with full_precision(x):
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
        # On its 1x1 input the first transposed conv is a matmul: one GEMM, the same parameters
        # (and inductor's crash in its backward avoided: results/speed/h100-2026-11-23.md).
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
        with full_precision(feat):
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
        elif args.objective == "generative":  # CVRL-generative; CVRL-reward-only has neither
            self.decoder = Decoder(feat, args.cnn_depth)


# ---------------------------------------------------------------------------------------------
# World-model objective: the CELBO (Eq. 6)
# ---------------------------------------------------------------------------------------------

# Index conventions, in the paper's notation (Eq. 6; App. A.1: imagined s~, a~, r~).
# Replay (appendix): step t of a sampled sequence (T, B) holds o_t (obs), a_{t-1} (action: the one
#     that led to o_t; zeros at t = 0), r_t (reward on arriving at o_t; 0 at t = 0), cont_t (0 if
#     the episode terminated at o_t). The RSSM filters with action[t] from the zero state, and the
#     reward head at step t predicts reward[t] from s_t (Eq. 6).
# SAC's transitions (s_t, a_t, r_{t+1}, s_{t+1}) pair step t with step t+1: feat[:-1], feat[1:],
#     and action[1:], reward[1:], cont[1:] (step t+1 holds a_t and r_{t+1}).
# Imagination from a start state s~_t (a posterior s_t of the batch): feats[k] = s~_{t+k},
#     k = 0 .. H (H+1, N, F); actions[k] = a~_{t+k} ~ pi(s~_{t+k}), k < H. Rewards and values are
#     taken on feats[1:]: reward[k] = r~_{t+k+1}, value[k] = v(s~_{t+k+1}).
# Lambda-return: lambda_return(reward, value)[k] = V_lambda(s~_{t+k}), k = 0 .. H-1 (App. A.2),
#     in line with feats[:-1]; returns[0] = V_lambda(s_t) of the start, what MPC maximises.


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
    post, prior = wm.rssm.observe(embed, batch["action"])  # action[t] = a_{t-1}
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
    reward_term = gaussian_log_prob(batch["reward"], wm.reward(feat).squeeze(-1)).mean()  # r_t | s_t
    kl = gaussian_kl(post, prior).mean()
    loss = -observation_term - reward_term + args.kl_scale * kl.clamp_min(args.free_nats)
    metrics.update(observation_loss=-observation_term.detach(), reward_loss=-reward_term.detach(),
                   kl=kl.detach(), model_loss=loss.detach())
    return loss, post, metrics


# ---------------------------------------------------------------------------------------------
# Behaviour: imagination, V_lambda, the hybrid actor-critic, latent-guided MPC
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
    (s_t, a_t, r_{t+1}, s_{t+1}); step t+1 of the batch holds a_t and r_{t+1}. States are detached:
    SAC trains the actor, the Q-nets and the temperature, not the world model."""
    feat = feat.detach()
    s, s_next = feat[:-1], feat[1:]  # s_t, s_{t+1} for t = 0 .. T-2
    # a_t, r_{t+1}, cont_{t+1} for t = 0 .. T-2
    action, reward, cont = batch["action"][1:], batch["reward"][1:], batch["cont"][1:]
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


def sac_losses(actor: Actor, q: QNetworks, target_q: QNetworks, log_temperature: torch.Tensor,
               feat: torch.Tensor, batch: dict, args: Args):
    """Sec. 3.3: SAC on the real posterior states `feat` (T, B, F) of the batch: its actor loss
    (with the Q-nets frozen: it trains the actor only), the Q loss, the temperature loss, metrics."""
    q_loss, metrics = sac_q_loss(actor, q, target_q, log_temperature, feat, batch, args)
    with frozen(q):
        pi_loss, log_prob = sac_actor_loss(actor, q, log_temperature, feat)
    target_entropy = -float(batch["action"].shape[-1])  # SAC v2: towards entropy -|A|
    temperature_loss = -(log_temperature * (log_prob + target_entropy)).mean()
    if not (args.learn_temperature and args.sac_updates_actor):  # fixed, as the authors' code
        temperature_loss = torch.zeros_like(q_loss)
    metrics.update(sac_actor_loss=pi_loss.detach(), sac_entropy=-log_prob.mean(),
                   temperature=log_temperature.exp().detach())
    return pi_loss, q_loss, temperature_loss, metrics


def cvrl_losses(wm: WorldModel, actor: Actor, value: nn.Module, q: QNetworks, target_q: QNetworks,
                log_temperature: torch.Tensor, batch: dict, args: Args):
    """Every loss of one update (App. B.7), from the parameters before it, as the authors' code
    takes the behaviour gradients before the model step: the CELBO (Eq. 6), L_CVRL's actor loss
    (Eq. 7 + alpha L_SAC, Sec. 3.3), the value loss (Eq. 7), SAC's Q and temperature losses (zero
    without --sac; zero: no gradient, no step). Each trains its own network only: the others are
    frozen inside it."""
    model_loss, post, metrics = celbo_loss(wm, batch, args)  # Eq. 6
    with frozen(wm), frozen(value):  # Eq. 7's actor loss trains the actor, through the latents
        actor_loss, feats, returns, m = dreamer_actor_loss(wm, actor, value, post, args)
    value_loss = value_loss_fn(value, feats, returns, args)  # Eq. 7's critic
    metrics.update(m)
    q_loss = temperature_loss = torch.zeros((), device=feats.device)
    if args.sac:  # Sec. 3.3: L_CVRL = L_Dreamer + alpha L_SAC
        pi_loss, q_loss, temperature_loss, m = sac_losses(actor, q, target_q, log_temperature,
                                                          RSSM.feat(post), batch, args)
        metrics.update(m)
        if args.sac_updates_actor:  # else the authors' code: computed, never applied
            # ours: the actor's one optimiser steps the sum (B.7 names a separate SAC optimiser)
            actor_loss = actor_loss + args.sac_weight * pi_loss
    metrics.update(actor_loss=actor_loss.detach(), value_loss=value_loss.detach())
    return model_loss, actor_loss, value_loss, q_loss, temperature_loss, metrics


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


def mpc_objective(wm: WorldModel, value: nn.Module, start: dict, actions: torch.Tensor,
                  noise: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """What MPC ascends: the sum of `plan_value` over the start states (one gradient for all)."""
    return plan_value(wm, value, start, actions, noise, gamma, lam).sum()


def actor_plan(wm: WorldModel, actor: Actor, start: dict, noise: torch.Tensor, explore: bool):
    """The actor's plan: roll the prior under the actor (samples, or modes at evaluation)."""
    state, actions = start, []
    for t in range(noise.shape[0]):
        dist = actor(RSSM.feat(state))
        actions.append(dist.rsample() if explore else dist.mode())
        state = wm.rssm.img_step(state, actions[-1], noise[t])
    return torch.stack(actions)  # a~_t .. a~_{t+H-1}, (H, N, A)


# ---------------------------------------------------------------------------------------------
# Agent: the training step and acting
# ---------------------------------------------------------------------------------------------


class Agent:
    """The world model, the actor, the value, SAC's Q-nets (and targets) and their optimisers;
    `update` is one training step (App. B.7), `act` one acting step with latent-guided MPC."""

    def __init__(self, args: Args, action_space, compute: Compute):
        self.args, self.compute, self.device = args, compute, compute.device
        self.discrete, self.action_dim = action_size(action_space)
        self.wm = WorldModel(args, self.action_dim).to(self.device)
        feat = self.wm.rssm.feat_dim
        self.actor = Actor(feat, self.action_dim, args.mlp_units).to(self.device)
        self.value = MLP(feat, 1, args.mlp_units, 3).to(self.device)
        self.q = QNetworks(feat, self.action_dim, args.mlp_units).to(self.device)
        self.target_q = QNetworks(feat, self.action_dim, args.mlp_units).to(self.device)
        self.target_q.load_state_dict(self.q.state_dict())
        self.target_q.requires_grad_(False)
        temperature = torch.tensor(math.log(args.init_temperature), device=self.device)
        self.log_temperature = nn.Parameter(temperature)  # ln alpha of SAC
        # App. B.7: one optimiser per network (and SAC's temperature), stepped in this order.
        opt = dict(eps=args.adam_eps, clip=args.grad_clip)
        self.model_opt = compute.optimizer("model", self.wm.parameters(), args.model_lr, **opt)
        self.actor_opt = compute.optimizer("actor", self.actor.parameters(), args.actor_lr, **opt)
        self.value_opt = compute.optimizer("value", self.value.parameters(), args.value_lr, **opt)
        self.q_opt = compute.optimizer("q", self.q.parameters(), args.q_lr, **opt)
        self.temperature_opt = compute.optimizer("temperature", [self.log_temperature],
                                                 args.temperature_lr, **opt)
        self.losses = compute.loss(cvrl_losses)
        self.mpc_objective = compute.loss(mpc_objective)
        self.updates = 0

    def update(self, batch: dict) -> dict:
        """One training step (App. B.7): every loss from the parameters before it (`cvrl_losses`),
        then one step per optimiser, in order, and the target Q-nets' Polyak step (Sec. 3.3)."""
        model_loss, actor_loss, value_loss, q_loss, temperature_loss, metrics = self.losses(
            self.wm, self.actor, self.value, self.q, self.target_q, self.log_temperature, batch,
            self.args)
        norms = optimise((self.model_opt, model_loss), (self.actor_opt, actor_loss),
                         (self.value_opt, value_loss), (self.q_opt, q_loss),
                         (self.temperature_opt, temperature_loss))
        if self.args.sac:
            self.compute.update_target(self.target_q, self.q, self.args.tau)
        self.updates += 1
        logged = ("model_grad_norm", "actor_grad_norm", "value_grad_norm")  # the CELBO's and Eq. 7's
        return metrics | {k: norms[k] for k in logged}

    def plan(self, latent: dict, explore: bool) -> torch.Tensor:
        """Latent-guided MPC (Sec. 3.4, App. A.3, B.8): the actor's plan, refined by
        `optimise_plan`; returns the first action (N, A). The imagined state noise is drawn once
        per call, so every iteration ascends the same objective."""
        start = {k: v.detach() for k, v in latent.items()}
        noise = torch.randn(self.args.horizon, *start["stoch"].shape, device=self.device)
        with torch.no_grad(), self.compute.precision():
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
            # Only the actions are differentiated: the world model and the value are frozen; the
            # gradient is taken under --precision too (with bf16, its rounding depends on that).
            with torch.enable_grad(), self.compute.precision(), frozen(self.wm), frozen(self.value):
                objective = self.mpc_objective(self.wm, self.value, start, actions, noise, args.gamma,
                                               args.return_lambda)
                (grad,) = torch.autograd.grad(objective, actions)
            if args.mpc_first_action_only:
                grad = torch.cat([grad[:1], torch.zeros_like(grad[1:])])
            actions = (actions + args.mpc_lr * grad).clamp(-1, 1)
        return actions.detach()

    @torch.no_grad()
    def act(self, obs: np.ndarray, state, explore: bool, mpc: Optional[bool] = None):
        """One filtering step and an action, planned with --mpc in training and evaluation alike;
        state = (posterior, previous action) or None."""
        mpc = self.args.mpc if mpc is None else mpc
        if state is None:
            latent = self.wm.rssm.initial(1, self.device)
            prev = torch.zeros(1, self.action_dim, device=self.device)
        else:
            latent, prev = state
        obs_t = torch.as_tensor(obs, device=self.device)[None]
        with self.compute.precision():
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


# ---------------------------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------------------------


def action_repeat(args: Args) -> int:
    """--action-repeat (the authors' 2 on every task), else (None or 0) the env's own default."""
    return args.action_repeat or envs.default_action_repeat(args.env)


def make_env(args: Args, split: str):
    """The env the agent sees: 64 x 64 pixels, `split`'s background videos, continuous actions."""
    env = envs.make(args.env, distraction=args.distraction, dynamic=args.dynamic, seed=args.seed,
                    image_size=64, action_repeat=action_repeat(args), split=split,
                    video_dir=args.video_dir)
    if hasattr(env.action_space, "n"):
        env.close()
        raise ValueError(f"{args.env} has discrete actions; CVRL's tanh-Gaussian actor and its MPC "
                         "need a continuous (Box) action space: use dmc-*, dcs-*, natural-*, "
                         "pybullet-boxpush or toy-*")
    return env


def updates_due(args: Args, run: Run) -> int:
    """Updates after this agent step: `pretrain` once, when training starts (after the prefill),
    then `updates_per_step` every `train_every` agent steps (authors' code: pretrain, train_every)."""
    if not run.counters.get("pretrained", False):
        run.counters["pretrained"] = True
        return args.pretrain
    return args.updates_per_step if run.agent_steps % args.train_every == 0 else 0


def main(args: Args, settings: RunSettings):
    compute = Compute(settings, args.seed)  # device, precision, speed; seeds every RNG
    env, eval_env = make_envs(make_env, args)  # for training, and on --eval-split's videos
    agent = Agent(args, env.action_space, compute)
    repeat = action_repeat(args)  # --replay-capacity counts env steps: capacity / repeat agent steps
    slots = replay_slots(args.replay_capacity // repeat, settings.total_steps, repeat, args.batch_length)
    replay = Replay(slots, env.observation_space.shape, agent.action_dim, args.seed, compute.replay_device)
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
            action, state = agent.act(obs, state, explore=True)  # latent-guided MPC (Sec. 3.4)
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
