"""BLAST: DreamerV2 without reconstruction, its latent state learned by bootstrapping.

Paper: K. Paster, L. McKinney, S. A. McIlraith, J. Ba, "BLAST: Latent Dynamics Models from
Bootstrapping", Deep RL Workshop at NeurIPS 2021. Authors' code: github.com/keirp/blast (built on
danijar/dreamerv2; the defaults here are App. A.2's DMC column with its BLAST block). This is
`dreamerv2.py` with BLAST's changes, and `diff dreamerv2.py blast.py` shows what they change.

The idea. The world model learns its latent state from the reward and from predicting its own
future latents instead of the images: the prior p(z_t | h_t) is trained towards the posterior of a
slowly moving (EMA) target encoder, with no gradient into that posterior, as BYOL trains a
predictor towards a target network (Sec. 2.3). An autoregressive prior fits the joint distribution
of the categoricals, and BatchNorm in the encoder, as in BYOL, makes it stable (Sec. 2.3.3). The
paper's cumulative ablation ladder (Sec. 3.3, Fig. 3 and 4) is `--ladder`, one PRESETS entry each:
  dreamerv2  DreamerV2 (Eq. 2.3): image + reward log losses + KL balanced 0.8 / 0.2;
  no-recon   - the image loss (`--probe-decoder`: a decoder on stop-gradient features, Fig. 8);
  sg         + KL balance 1: KL(sg(q(z|h,x)) || p(z|h)), no gradient into the posterior (2.3.1);
  ema        + target encoder xi <- tau xi + (1 - tau) theta (Sec. 2.3.1), whose posteriors (through
             the online posterior layer) are the KL targets (Eq. 2.4) and start imagination;
  bn         + BatchNorm in every encoder conv and in the posterior's layer (2.3.3);
  ar         + autoregressive prior over `ar_steps` chunks of categoricals (2.3.2): BLAST.

Paper map (equation -> where it is implemented), in the order of this file:
- App. A.2: `Args` (DMC, BLAST block); the grid-world column, the rungs, our sizes: `PRESETS`.
- RSSM (Eq. 2.2): h_t = f(h_{t-1}, z_{t-1}, a_{t-1}), q(z_t | h_t, x_t) `Posterior`, p(z_t | h_t)
  `Prior` (chunk by chunk, Sec. 2.3.2); `RSSM`, `Encoder` ([BatchNorm]), `WorldModel` (targets).
- World-model loss (Eq. 2.4): beta_r reward log loss + beta_KL KL(sg(q_xi) || p_theta), the KL
  targets q_xi from `bootstrapped_posteriors` (Sec. 2.3.1-2.3.2). `world_model_loss`, `kl_balance`.
- xi <- tau xi + (1 - tau) theta (Sec. 2.3.1) after the world-model step: `Agent.update`.
- Behaviour learning is DreamerV2's, from the target posteriors (dreamerv2.py's docstring): the
  lambda-return V_t = r_t + gamma ((1 - lambda) v(z_{t+1}) + lambda V_{t+1}) (its Eq. 4), the critic
  (v(z_t) - sg(V_t))^2 / 2 against a slow copy (Eq. 5), the actor's -V_{t+1} - eta H[pi] by dynamics
  backpropagation (Eq. 6): `imagine`, `lambda_return`, `behaviour_losses`; acting: `Agent.act`.
- The training step (world model, then actor and critic, one optimiser each): `Agent.update`;
  the data it is called on (prefill, pretrain, an update every 5 agent steps): `main`.
"Eq. 2.x" and "Sec." are BLAST's; the bare "Eq. 4-6" are DreamerV2's (arXiv:2010.02193).

The method runs from here to the APPENDIX banner; below it, the same text in all five scripts:
run settings, the run object, the compute object (device, precision, speed), the replay.
Shapes are time-major: sequences (T, B, ...), imagined rollouts (H + 1, N, ...) with N = T * B.

    python blast.py --env dcs-walker-walk --distraction medium
    python blast.py --env minigrid-dynamic-obstacles-6x6 --distraction video --ladder sg
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
    """The algorithm: every default is App. A.2's (DMC column, BLAST block), else DreamerV2's for
    DMC from pixels (official configs.yaml, dmc_vision, which A.1 keeps) or says why not. How a run
    is carried out (device, budget, evaluation, checkpoints): `RunSettings`, in the appendix."""

    # Environment.
    env: str = "dmc-walker-walk"  # ours: a DMC task (Sec. 3.5); minigrid-*: PRESETS["minigrid"]
    distraction: str = "none"  # paper Sec. 3.1.1 for minigrid-* (video, ...); ours: the clean task
    dynamic: bool = True  # ours: distractions move within an episode (DCS's dynamic setting)
    video_dir: Optional[str] = None  # ours: DAVIS 2017 or video folder (default: the built-in pool)
    eval_split: Literal["train", "val"] = "val"  # ours: evaluate on held-out videos (DCS protocol)
    seed: int = 1  # ours: seeds the networks, the replay and every episode (CleanRL's default)
    action_repeat: Optional[int] = None  # official dmc: 2 (None); 0: the env's per-task (PlaNet's)
    eval_action: Literal["mode", "mean"] = "mode"  # official agent.py; 'mean': the dist.'s (ours)
    preset: Literal["paper", "small", "tiny"] = "paper"  # ours: these defaults, or PRESETS below
    ladder: Literal["dreamerv2", "no-recon", "sg", "ema", "bn", "ar"] = "ar"  # paper Sec. 3.3

    # Replay and training schedule.
    replay_capacity: int = 1_000_000  # ours: env steps, half a DMC run (official: 2e6 agent steps)
    prioritize_ends: bool = False  # authors' dmc_exps.yaml: dmc_vision's replay.prioritize_ends
    batch_size: int = 16  # official configs.yaml dataset.batch 16 sequences
    batch_length: int = 50  # official configs.yaml dataset.length 50 steps
    prefill: int = 1000  # official dmc_vision prefill: agent steps of uniform random actions
    pretrain: int = 100  # official dmc_vision pretrain: updates once, after the prefill
    train_every: int = 5  # official configs.yaml train_every 5 agent steps between training rounds
    updates_per_step: int = 1  # official configs.yaml train_steps 1 update per training round

    # World model (Eq. 2.4).
    cnn_depth: int = 48  # official configs.yaml encoder.cnn_depth 48 (channels 48/96/192/384)
    deter: int = 200  # official configs.yaml dmc_vision rssm.deter 200 (GRU state h_t)
    hidden: int = 200  # official dmc_vision rssm.hidden 200 (RSSM input and output layers)
    stoch: int = 8  # paper App. A.2 (DMC rssm.stoch 8) categorical variables
    classes: int = 64  # paper App. A.2 (DMC rssm.discrete 64) classes per variable
    mlp_units: int = 400  # official configs.yaml *_head.units 400 (reward, discount, actor, critic)
    mlp_layers: int = 4  # official configs.yaml *_head.layers 4
    init: Literal["glorot", "torch"] = "glorot"  # official (Keras): Glorot-uniform, zero biases
    kl_balance: float = 1.0  # paper App. A.2 (BLAST kl.balance 1.0, Sec. 2.3.1): KL(sg(q) || p)
    free_nats: float = 1.0  # official dmc_vision kl.free 1.0 on the batch mean (kl.free_avg)
    kl_scale: float = 1.0  # paper App. A.2 (DMC loss_scales.kl 1.0): beta_KL of Eq. 2.4
    reward_scale: float = 1.0  # paper App. A.2 (DMC loss_scales.reward 1.0): beta_r of Eq. 2.4
    reward_clamp: Literal["none", "tanh"] = "none"  # paper App. A.2 (DMC): no tanh on rewards
    pred_discount: bool = False  # official dmc_vision pred_discount (DMC episodes never end)
    model_lr: float = 3e-4  # official configs.yaml dmc_vision model_opt.lr 3e-4

    # BLAST's changes: App. A.2's BLAST block (the ladder's lower rungs: PRESETS).
    recon: bool = False  # paper Sec. 3.3 (-recon): the image log loss of Eq. 2.3 (dreamerv2 rung)
    probe_decoder: bool = False  # paper Fig. 8, App. A.5: a decoder on stop-gradient features
    target_encoder: bool = True  # paper App. A.2 (use_target_encoder): EMA encoder, KL targets
    target_obs_out: bool = False  # authors' code (use_target_rssm False): no EMA posterior layer
    target_init: Literal["random", "copy"] = "random"  # authors' code: the target's own random init
    target_ema: float = 0.99  # paper App. A.2 (target_ema): tau of xi <- tau xi + (1 - tau) theta
    target_input_p: float = 0.5  # paper App. A.2: share of rows rolled on target posteriors
    encoder_norm: Literal["none", "bn"] = "bn"  # paper App. A.2 (encoder.norm), Sec. 2.3.3
    obs_out_norm: Literal["none", "bn"] = "bn"  # paper App. A.2 (rssm.obs_out_norm), Sec. 2.3.3
    ar_steps: Optional[int] = None  # paper App. A.2 (None: = stoch); 1: DreamerV2's prior

    # Behaviour (Eqs. 4-6).
    horizon: int = 15  # DreamerV2 Sec. 2.2, official imag_horizon 15
    gamma: float = 0.99  # official configs.yaml discount 0.99
    return_lambda: float = 0.95  # official configs.yaml discount_lambda 0.95: lambda of Eq. 4
    actor_lr: float = 8e-5  # official configs.yaml dmc_vision actor_opt.lr 8e-5
    critic_lr: float = 8e-5  # official configs.yaml dmc_vision critic_opt.lr 8e-5
    actor_entropy: float = 1e-4  # official configs.yaml dmc_vision actor_ent 1e-4: eta of Eq. 6
    actor_grad: Literal["auto", "dynamics", "reinforce"] = "dynamics"  # paper App. A.2 (DMC)
    target_update_every: int = 100  # official slow_target_update 100 (slow_target_fraction 1)
    adam_eps: float = 1e-5  # official configs.yaml *_opt.eps 1e-5
    grad_clip: float = 100.0  # official configs.yaml *_opt.clip 100 (gradient norm)
    weight_decay: float = 1e-6  # official *_opt.wd 1e-6, as common/other.py applies it (Optimizer)


TOTAL_STEPS = 2_000_000  # paper App. A.2 (DMC steps 1e6 agent steps, action repeat 2): env steps

# Every setting other than the paper's (flags you set win); why and what it measured: docs/blast.md.
PRESETS = {
    # paper App. A.2 "Gym-MiniGrid" column (stoch 16: A.2's, the authors' grid_exps.yaml runs 8;
    # total_steps: A.2 steps 5e4 at action repeat 1), then authors' configs.yaml (minigrid-repeat,
    # defaults: prioritize_ends) where A.2 is silent. For minigrid-* envs.
    "minigrid": dict(deter=600, hidden=600, stoch=16, kl_scale=0.1, reward_scale=100.0,
                     reward_clamp="tanh", train_every=1, prefill=10_000, actor_grad="reinforce",
                     total_steps=50_000, model_lr=4e-4, critic_lr=1e-4, actor_entropy=0.1,
                     free_nats=0.0, pretrain=1, eval_every=2500, eval_episodes=5,
                     prioritize_ends=True),
    # paper Sec. 3.3: the ablation ladder's rungs below "ar" (BLAST, the defaults), cumulative
    "dreamerv2": dict(recon=True, kl_balance=0.8, target_encoder=False, encoder_norm="none",
                      obs_out_norm="none", ar_steps=1),
    "no-recon": dict(kl_balance=0.8, target_encoder=False, encoder_norm="none", obs_out_norm="none",
                     ar_steps=1),
    "sg": dict(target_encoder=False, encoder_norm="none", obs_out_norm="none", ar_steps=1),
    "ema": dict(encoder_norm="none", obs_out_norm="none", ar_steps=1),
    "bn": dict(ar_steps=1),
    # ours: the same algorithm sized for a 2-core CPU, 100K env steps of dmc-cartpole-swingup:
    "small": dict(
        action_repeat=0,  # the env's per-task repeat (8 for cartpole: DMC-100K); frames cost ~30 ms
        cnn_depth=16, deter=128, hidden=128, stoch=8, classes=32, mlp_units=128,
        mlp_layers=2,  # 0.79M trained parameters; 8 AR prior steps, as A.2's DMC 8 x 64
        batch_size=16, batch_length=16, train_every=5,  # A.2's; ~1.5 s an update on one CPU thread
        model_lr=1e-3, actor_lr=3e-4, critic_lr=3e-4,  # few, small updates
        replay_capacity=100_000, total_steps=100_000, eval_episodes=5,
        prioritize_ends=True),  # the official default outside DMC, the same in the family
    # ours: end to end in about a minute (smoke tests on the toy envs)
    "tiny": dict(cnn_depth=4, deter=32, hidden=32, stoch=4, classes=4, mlp_units=32, mlp_layers=2,
                 batch_size=4, batch_length=8, prefill=100, pretrain=2, horizon=5, train_every=5,
                 replay_capacity=100_000, total_steps=2000, eval_every=1000, eval_episodes=1,
                 prioritize_ends=True),
}


def presets(args: Args) -> dict:
    """The PRESETS entries a run applies, by name, in order (later wins): the env family's (A.2:
    "minigrid" for minigrid-* envs, the DMC defaults for every other), --ladder's, --preset's."""
    names = ("minigrid" if args.env.startswith("minigrid-") else "dmc", args.ladder, args.preset)
    return {name: PRESETS[name] for name in names if name in PRESETS}


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


def norm_layer(kind: str, channels: int, conv: bool) -> nn.Module:
    """BatchNorm (Sec. 2.3.3) with the authors' tfkl.BatchNormalization() defaults (Keras': running
    averages with momentum 0.99, eps 1e-3), or nothing."""
    if kind == "none":
        return nn.Identity()
    return (nn.BatchNorm2d if conv else nn.BatchNorm1d)(channels, momentum=0.01, eps=1e-3)


class Encoder(nn.Module):
    """4 conv layers, kernel 4, stride 2, [BatchNorm], ELU, depth 48 to 384: (…, 3, 64, 64) -> (…, 1536)."""

    def __init__(self, depth: int, norm: str = "none"):
        super().__init__()
        chans = [3, depth, 2 * depth, 4 * depth, 8 * depth]
        self.net = nn.Sequential(*[m for i in range(4) for m in (nn.Conv2d(chans[i], chans[i + 1], 4, 2),
                                   norm_layer(norm, chans[i + 1], True), nn.ELU())])
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
        # On its 1x1 input the first transposed conv is a matmul: one GEMM, the same parameters
        # (and inductor's crash in its backward avoided: results/speed/h100-2026-11-23.md).
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
    """F.one_hot as float, without its range check (a host sync on CPU)."""
    return (index.unsqueeze(-1) == torch.arange(classes, device=index.device)).float()


def sample_one_hot(logits: torch.Tensor) -> torch.Tensor:
    """One-hot sample over the last axis, straight-through gradients (sample + p - sg(p)).
    Gumbel-max, argmax(logits + Gumbel noise): torch.multinomial's draw without its check."""
    logits = logits.float()
    u = torch.rand_like(logits).clamp(1e-20, 1 - 1e-7)
    index = (logits - torch.log(-torch.log(u))).argmax(-1)
    probs = logits.softmax(-1)
    return one_hot(index, probs.shape[-1]) + (probs - probs.detach())


def categorical_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of independent categoricals (…, stoch, classes), summed: (…), fp32 (written out:
    torch's version indexes by data, a host sync)."""
    log_p, log_q = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum((-2, -1))


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    return td.Independent(td.OneHotCategoricalStraightThrough(logits=logits.float()), 1).entropy()


class Posterior(nn.Module):
    """q(z_t | h_t, x_t), e_t = enc(x_t): DreamerV2's obs_out, Linear([h_t, e_t]) -> ELU -> logits,
    with BatchNorm before the ELU (Sec. 2.3.3). `embed_in` (W_e e_t + b) runs for all t at once;
    W_h h_t and BatchNorm (per step over the batch, as the authors' scan) run in the time loop."""

    def __init__(self, deter: int, embed_dim: int, hidden: int, stoch: int, classes: int, norm: str):
        super().__init__()
        self.stoch, self.classes = stoch, classes
        self.embed_in = nn.Linear(embed_dim, hidden)
        self.deter_in = nn.Linear(deter, hidden, bias=False)
        self.norm = norm_layer(norm, hidden, False)
        self.out = nn.Linear(hidden, stoch * classes)

    def forward(self, deter: torch.Tensor, embed_proj: torch.Tensor) -> torch.Tensor:
        x = F.elu(self.norm(self.deter_in(deter) + embed_proj))
        return self.out(x).reshape(*deter.shape[:-1], self.stoch, self.classes)


class Prior(nn.Module):
    """p(z_t | h_t) = prod_k p(z_t^k | g_k) over `steps` chunks of categoricals (Sec. 2.3.2), with
    g_0 = h_t, g_{k+1} = GRU(g_k, z_t^k). Chunk k's logits: two ELU layers shared by all steps (the
    authors' ar_img_in and img_out) and the k-th row block of one output layer (the authors' predict
    every chunk at every step and keep the k-th). steps = 1: DreamerV2's prior (one ELU layer)."""

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

    def forward(self, deter: torch.Tensor, target: Optional[torch.Tensor] = None):
        """(logits, stoch), both (..., stoch, classes): teacher-forced on `target` (the KL targets,
        training) if given, else each chunk sampled and fed back (imagination)."""
        g, logits, chunks, rows = deter, [], [], self.chunk * self.classes
        for k in range(self.steps):
            x = F.elu(self.ar_in(g)) if self.ar_in is not None else g
            out = F.linear(F.elu(self.hidden(x)), self.out.weight[k * rows:(k + 1) * rows],
                           self.out.bias[k * rows:(k + 1) * rows])
            logits.append(out.reshape(*g.shape[:-1], self.chunk, self.classes))  # chunk k
            chunks.append(sample_one_hot(logits[-1]) if target is None
                          else target[..., k * self.chunk:(k + 1) * self.chunk, :])  # z_t^k
            if k + 1 < self.steps:  # g_{k+1} = GRU(g_k, z_t^k)
                g = self.cell(F.elu(self.chunk_in(chunks[-1].flatten(-2).to(g.dtype))), g)
        return torch.cat(logits, -2), torch.cat(chunks, -2)

    def log_prob(self, deter: torch.Tensor, stoch: torch.Tensor) -> torch.Tensor:
        """ln p(z | h) = sum_k ln p(z^k | h, z^{<k}) (teacher forcing), fp32 (...)."""
        return (stoch.float() * self(deter, stoch)[0].float().log_softmax(-1)).sum((-2, -1))


class RSSM(nn.Module):
    """Recurrent state-space model with categorical stochastic states (Eq. 2.2).

    A state is a dict: deter (…, deter), stoch (…, stoch, classes) one-hot samples, logits
    (…, stoch, classes) of the distribution the sample came from.
    """

    def __init__(self, action_dim: int, deter: int, hidden: int, stoch: int, classes: int,
                 ar_steps: int):
        super().__init__()
        self.deter, self.stoch, self.classes = deter, stoch, classes
        self.img_in = nn.Sequential(nn.Linear(stoch * classes + action_dim, hidden), nn.ELU())
        self.cell = LayerNormGRUCell(hidden, deter)
        self.prior = Prior(deter, hidden, stoch, classes, ar_steps)  # p(z_t | h_t)

    @property
    def feat_dim(self) -> int:
        return self.deter + self.stoch * self.classes

    def initial(self, batch: int, device) -> dict:
        zeros = torch.zeros(batch, self.stoch, self.classes, device=device)
        return dict(deter=torch.zeros(batch, self.deter, device=device), stoch=zeros, logits=zeros)

    def _recurrent(self, state: dict, action: torch.Tensor) -> torch.Tensor:
        """h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}])."""
        x = self.img_in(torch.cat([state["stoch"].flatten(-2).to(action.dtype), action], -1))
        return self.cell(x, state["deter"])

    def img_step(self, state: dict, action: torch.Tensor) -> dict:
        """Prior step: h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}]), z_t ~ p(z_t | h_t)."""
        deter = self._recurrent(state, action)
        logits, stoch = self.prior(deter)
        return dict(deter=deter, stoch=stoch, logits=logits)

    def obs_step(self, state: dict, action: torch.Tensor, embed_proj: torch.Tensor,
                 posterior: Posterior) -> dict:
        """Posterior step (acting): h_t, then z_t ~ q(z_t | h_t, e_t)."""
        deter = self._recurrent(state, action)
        logits = posterior(deter, embed_proj)
        return dict(deter=deter, stoch=sample_one_hot(logits), logits=logits)

    def observe(self, groups: list) -> dict:
        """Filter a sequence from the zero state: the same posteriors as calling `obs_step` for
        t = 0..T-1. `groups`: [(posterior layer, its projected embeddings (T, b, hidden), actions
        a_{t-1} (T, b, A))], parts of a batch with their own posterior layer (online, target).
        Returns posteriors (deter, stoch, logits) as dicts of (T, sum of b, ...), groups in order."""
        sizes = [x.shape[1] for _, x, _ in groups]
        action = torch.cat([a for _, _, a in groups], 1)
        state = self.initial(sum(sizes), action.device)
        out = {"deter": [], "stoch": [], "logits": []}
        for t in range(action.shape[0]):
            deter = self._recurrent(state, action[t])
            parts = deter.split(sizes) if len(groups) > 1 else (deter,)
            logits = torch.cat([post(h, x[t]) for (post, x, _), h in zip(groups, parts)], 0)
            state = dict(deter=deter, stoch=sample_one_hot(logits), logits=logits)
            for key in out:
                out[key].append(state[key])
        return {k: torch.stack(v) for k, v in out.items()}

    def feat(self, state: dict) -> torch.Tensor:
        """Model state [z_t, h_t] fed to every head: (…, stoch * classes + deter)."""
        return torch.cat([state["stoch"].flatten(-2).to(state["deter"].dtype), state["deter"]], -1)


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
        out = self.net(feat)  # fp32
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
        if module.bias is not None:  # the posterior's W_h h_t has none
            nn.init.zeros_(module.bias)


class WorldModel(nn.Module):
    def __init__(self, args: Args, action_dim: int):
        super().__init__()
        self.encoder = Encoder(args.cnn_depth, args.encoder_norm)
        self.posterior = Posterior(args.deter, self.encoder.out_dim, args.hidden, args.stoch,
                                   args.classes, args.obs_out_norm)
        self.rssm = RSSM(action_dim, args.deter, args.hidden, args.stoch, args.classes,
                         args.ar_steps or args.stoch)
        feat = self.rssm.feat_dim
        self.reward = MLP(feat, 1, args.mlp_units, args.mlp_layers)
        self.discount = MLP(feat, 1, args.mlp_units, args.mlp_layers) if args.pred_discount else None
        self.decoder = Decoder(feat, args.cnn_depth) if args.recon or args.probe_decoder else None
        if args.init == "glorot":
            self.apply(glorot_init)
        self.target_encoder = self.target_posterior = None
        if args.target_encoder:
            self.target_encoder = self._target_of(self.encoder, args)
            if args.target_obs_out:
                self.target_posterior = self._target_of(self.posterior, args)

    @staticmethod
    def _target_of(online: nn.Module, args: Args) -> nn.Module:
        """An EMA copy of `online` (no gradients): its own random init (the authors' first EMA step
        keeps the target's init; the paper is silent) or, with --target-init copy, `online`'s."""
        target = copy.deepcopy(online)
        if args.target_init == "random":
            for module in target.modules():
                if module is not target and hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            if args.init == "glorot":
                target.apply(glorot_init)
        return target.requires_grad_(False)

    def ema_pairs(self) -> list:
        """(target, online) module pairs of the EMA (Sec. 2.3.1)."""
        pairs = [(self.target_encoder, self.encoder), (self.target_posterior, self.posterior)]
        return [(t, o) for t, o in pairs if t is not None]

    def acting_nets(self) -> tuple[Encoder, Posterior]:
        """The encoder and posterior layer that act and start imagination: the target's if any."""
        if self.target_encoder is None:
            return self.encoder, self.posterior
        posterior = self.posterior if self.target_posterior is None else self.target_posterior
        return self.target_encoder, posterior


class ActorCritic(nn.Module):
    def __init__(self, args: Args, feat_dim: int, action_dim: int, discrete: bool):
        super().__init__()
        self.actor = Actor(feat_dim, action_dim, discrete, args.mlp_units, args.mlp_layers)
        self.critic = MLP(feat_dim, 1, args.mlp_units, args.mlp_layers)
        if args.init == "glorot":
            self.apply(glorot_init)
        self.target_critic = copy.deepcopy(self.critic).requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# World-model loss (Eq. 2.4)
# ---------------------------------------------------------------------------------------------

# Index conventions, in the paper's notation (every slicing site below names what it picks).
# Replay (appendix): slot t of an episode, and step t of a sampled sequence (T, B), holds
#     x_t (obs), a_{t-1} (action: the one that led to x_t; zeros at t = 0), r_t (reward: received
#     on arriving at x_t; 0 at t = 0), cont_t (0 if the episode terminated at x_t), is_first_t.
# World model: the posterior at step t has seen (h_{t-1}, z_{t-1}, action[t] = a_{t-1}, x_t) and the
#     reward head at the model state (h_t, z_t), written z_t below, is trained on reward[t] = r_t.
# Imagination from a start state z_0 (each target posterior of the batch, N = T * B of them):
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
    """KL balancing (DreamerV2 Sec. 2.2): alpha KL(sg(q) || p) trains the prior towards the
    posterior, (1 - alpha) KL(q || sg(p)) regularises the posterior; free nats on each side's batch
    mean. alpha = 1 (Sec. 2.3.1) is KL(sg(q) || p): no gradient reaches the posterior at all.
    Returns (loss, per-step KL value (T, B)), fp32."""
    kl_prior = categorical_kl(post_logits.detach(), prior_logits)
    loss = alpha * kl_prior.mean().clamp_min(free)
    if alpha < 1:
        kl_post = categorical_kl(post_logits, prior_logits.detach())
        loss = loss + (1 - alpha) * kl_post.mean().clamp_min(free)
    return loss, kl_prior.detach()


def bootstrapped_posteriors(wm: WorldModel, batch: dict, args: Args) -> tuple[dict, dict]:
    """Posteriors of a replayed batch: (post, kl_target), dicts of (T, B, ...); both the online
    ones without a target encoder. With one (Sec. 2.3.1-2.3.2), the target encoder embeds the
    whole batch and its posterior layer filters it: the KL targets. `post`, which the prior's h_t
    and the heads read, is rolled on online posteriors for the first round(B (1 - target_input_p))
    rows and on the target posteriors for the rest; all rows in one loop over time."""
    embed = wm.encoder(batch["obs"])  # (T, B, E)
    # The action into the first step of an episode is zero (official RSSM.obs_step with is_first;
    # the replay already stores zeros there, this keeps it so for any batch).
    action = batch["action"] * (1 - batch["is_first"])[..., None]  # action[t] = a_{t-1}
    if wm.target_encoder is None:
        post = wm.rssm.observe([(wm.posterior, wm.posterior.embed_in(embed), action)])
        return post, post
    B = action.shape[1]
    n = round(B * (1 - args.target_input_p))
    _, target_posterior = wm.acting_nets()
    with torch.no_grad():
        target_embed = wm.target_encoder(batch["obs"])  # (T, B, E)
    # The online layer's W_e learns from the target rows too (the authors' online rssm.post on
    # target_embed, use_target_rssm False); an EMA copy has no gradient anyway.
    groups = [(target_posterior, target_posterior.embed_in(target_embed), action)]
    if n > 0:  # rows 0..n-1 on online embeddings too (BatchNorm cannot normalise an empty group)
        groups.insert(0, (wm.posterior, wm.posterior.embed_in(embed[:, :n]), action[:, :n]))
    states = wm.rssm.observe(groups)  # (T, n + B, ...): [online rows 0..n-1 | target rows 0..B-1]
    target = {k: v[:, n:] for k, v in states.items()}  # q_xi for all B rows: the KL targets
    # post: online states for rows 0..n-1, target-rolled states for rows n..B-1
    post = {k: torch.cat([v[:, :n], v[:, 2 * n:]], 1) for k, v in states.items()}
    return post, target


def world_model_loss(wm: WorldModel, batch: dict, args: Args):
    """Eq. 2.4 (Eq. 2.3 on the dreamerv2 rung): reward log loss + beta KL(sg(q_xi) || p) [+ image
    log loss]. Returns (loss, the probe decoder's loss or None, the posteriors that imagination
    starts from and the actor acts on: the target's if any (Agent.act), metrics). Time-major."""
    post, kl_target = bootstrapped_posteriors(wm, batch, args)
    # Sec. 2.3.2: the prior is teacher-forced on the KL targets' samples, chunk by chunk, in one
    # batched pass over all T * B steps after the filtering loop.
    # Eq. 2.4's shared h_t holds on rows n..B-1; rows 0..n-1 read the online-rolled h_t instead.
    prior_logits, _ = wm.rssm.prior(post["deter"], kl_target["stoch"].detach())
    # With a target encoder the targets are sg(q_xi) (Eq. 2.4): their h_t still carries gradient.
    target_logits = kl_target["logits"].detach() if wm.target_encoder is not None else kl_target["logits"]
    kl_loss, kl_value = kl_balance(target_logits, prior_logits, args.kl_balance, args.free_nats)
    feat = wm.rssm.feat(post)  # (T, B, F)
    reward = batch["reward"].tanh() if args.reward_clamp == "tanh" else batch["reward"]
    reward_nll = gaussian_nll(wm.reward(feat).squeeze(-1), reward).mean()  # p(r_t | z_t)
    loss = args.reward_scale * reward_nll + args.kl_scale * kl_loss
    metrics = dict(reward_loss=reward_nll, kl_loss=kl_loss, kl=kl_value.mean(),
                   prior_entropy=categorical_entropy(prior_logits).mean(),
                   post_entropy=categorical_entropy(kl_target["logits"]).mean())
    if wm.discount is not None:
        # The discount head predicts episode continuation (Bernoulli), scaled by gamma when used.
        discount_nll = F.binary_cross_entropy_with_logits(wm.discount(feat).squeeze(-1),
                                                          batch["cont"].float())
        loss = loss + discount_nll
        metrics["discount_loss"] = discount_nll
    probe_nll = None
    if wm.decoder is not None:
        target = batch["obs"].float() / 255.0 - 0.5
        if args.recon:  # the dreamerv2 rung: the image log loss shapes the latent
            image_nll = gaussian_nll(wm.decoder(feat), target).sum((-3, -2, -1)).mean()
            loss = loss + image_nll
            metrics["image_loss"] = image_nll
        else:  # the probe (Fig. 8): stop-gradient features, its own optimiser, not in `loss`
            probe_nll = gaussian_nll(wm.decoder(feat.detach()), target).sum((-3, -2, -1)).mean()
            metrics["probe_loss"] = probe_nll
    metrics["model_loss"] = loss
    return loss, probe_nll, kl_target, {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------
# Behaviour learning in imagination (Eqs. 4-6)
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
    actions (H, N, A), action a_t taken at feat_t. Gradients flow through the dynamics into the
    actions (the actor sees detached features, as in the official implementation)."""
    state, feats, actions = start, [wm.rssm.feat(start)], []
    for _ in range(horizon):
        action = actor(feats[-1].detach()).rsample()
        state = wm.rssm.img_step(state, action)
        feats.append(wm.rssm.feat(state))
        actions.append(action)
    return torch.stack(feats), torch.stack(actions)


def behaviour_losses(wm: WorldModel, ac: ActorCritic, post: dict, args: Args, discrete: bool):
    """Actor (Eq. 6) and critic (Eq. 5) losses on imagined rollouts from every posterior state."""
    start = {k: post[k].detach().flatten(0, 1) for k in ("deter", "stoch")}  # (T*B, ...)
    feats, actions = imagine(wm, ac.actor, start, args.horizon)
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
    policy = ac.actor(feats[:-2].detach())  # pi(a_t | z_t), t = 0..H-2
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
        # The probe decoder has its own optimiser and clip, so that it cannot shape the latent in
        # any way (a shared clip would scale the world model's gradient with the probe's).
        self.probe = args.probe_decoder and not args.recon
        self.model_params = [p for n, p in self.wm.named_parameters()
                             if p.requires_grad and not (self.probe and n.startswith("decoder."))]
        # One Adam per network, with DreamerV2's clip and weight decay (configs.yaml *_opt).
        opt = dict(eps=args.adam_eps, clip=args.grad_clip, weight_decay=args.weight_decay)
        self.model_opt = compute.optimizer("model", self.model_params, args.model_lr, **opt)
        self.actor_opt = compute.optimizer("actor", self.ac.actor.parameters(), args.actor_lr, **opt)
        self.critic_opt = compute.optimizer("critic", self.ac.critic.parameters(), args.critic_lr, **opt)
        self.probe_opt = (compute.optimizer("probe", self.wm.decoder.parameters(), args.model_lr, **opt)
                          if self.probe else None)
        self.world_model_loss = compute.loss(world_model_loss)
        self.behaviour_losses = compute.loss(behaviour_losses)
        self.updates = 0

    def update(self, batch: dict) -> dict:
        """One training step: world-model learning on a replayed batch (Eq. 2.4) and the EMA of the
        target encoder (Sec. 2.3.1), then DreamerV2's behaviour learning in imagination from the
        target posteriors (its Eqs. 4-6)."""
        self.wm.train()  # BatchNorm: batch statistics (online and target), running statistics move
        # post: the target posteriors kl_target (the authors' start of imagination), not Eq. 2.4's
        model_loss, probe_loss, post, metrics = self.world_model_loss(self.wm, batch, self.args)
        if self.probe:  # Fig. 8: the probe's own optimiser, one backward pass with the model's loss
            metrics |= optimise((self.model_opt, model_loss), (self.probe_opt, probe_loss))
        else:
            metrics |= self.model_opt(model_loss)
        for target, online in self.wm.ema_pairs():  # Sec. 2.3.1: xi <- tau xi + (1 - tau) theta
            self.compute.update_target(target, online, fraction=1 - self.args.target_ema)
        self.wm.eval()  # BatchNorm on running statistics outside the world-model step
        with frozen(self.wm):  # the actor's gradient flows through the model; no model weight learns
            actor_loss, critic_loss, behaviour = self.behaviour_losses(self.wm, self.ac, post,
                                                                       self.args, self.discrete)
        metrics |= optimise((self.actor_opt, actor_loss), (self.critic_opt, critic_loss))
        if self.updates % self.args.target_update_every == 0:  # Eq. 5's slow critic: a copy
            self.compute.update_target(self.ac.target_critic, self.ac.critic, fraction=1.0)
        self.updates += 1
        return metrics | behaviour

    @torch.no_grad()
    def act(self, obs: np.ndarray, state, explore: bool):
        """One filtering step and an action. state = (latent, previous action) or None. The target
        encoder's posteriors act, as imagination starts from them (the authors' policy)."""
        self.wm.eval()  # BatchNorm: its running statistics (one frame has no batch statistics)
        encoder, posterior = self.wm.acting_nets()
        if state is None:
            latent = self.wm.rssm.initial(1, self.device)
            prev = torch.zeros(1, self.action_dim, device=self.device)
        else:
            latent, prev = state
        obs_t = torch.as_tensor(obs, device=self.device)[None]
        with self.compute.precision():
            # Latents are sampled in evaluation too (official eval_state_mean=False); only the
            # action is the mode.
            latent = self.wm.rssm.obs_step(latent, prev, posterior.embed_in(encoder(obs_t)), posterior)
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
    if not 0 <= args.target_input_p <= 1 or not 0 <= args.target_ema <= 1:
        raise SystemExit("error: --target-input-p and --target-ema must lie in [0, 1]")
    compute = Compute(settings, args.seed)  # device, precision, speed; seeds every RNG
    env, eval_env = make_envs(make_env, args)  # for training, and on --eval-split's videos
    agent = Agent(args, env.action_space, compute)
    repeat = action_repeat(args)  # --replay-capacity counts env steps: // repeat agent steps
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
