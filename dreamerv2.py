"""DreamerV2: Mastering Atari with Discrete World Models (Hafner et al., 2021).

The reconstruction baseline of this project. A recurrent state-space model (RSSM) with a
deterministic GRU state h_t and a stochastic state z_t of 32 categorical variables with 32 classes
is trained on replayed sequences to reconstruct images and predict rewards; an actor and a critic
are trained purely in imagination, on 15-step latent rollouts of that model. BLAST and DreamingV2
are modifications of exactly this file's world model (blast.txt Sec. 2.3, dreamingv2.txt Sec. II-B).

Equations implemented (numbers of the DreamerV2 paper; DMC-from-pixels defaults of the official
implementation):
- RSSM (Sec. 2.1): h_t = f(h_{t-1}, z_{t-1}, a_{t-1}) (LayerNorm GRU), prior p(z_t | h_t),
  posterior q(z_t | h_t, e_t) with e_t = enc(x_t); straight-through gradients for samples. `RSSM`.
- World-model loss (Eq. 2): -ln p(x_t | h_t, z_t) - ln p(r_t | h_t, z_t) + beta KL[q || p],
  with KL balancing (Sec. 2.2, Algorithm 2): 0.8 KL(sg(q) || p) + 0.2 KL(q || sg(p)), free nats
  1.0 applied to the batch mean. `world_model_loss`, `kl_balance`.
- Lambda-return (Eq. 4): V_t = r_t + gamma_t ((1 - lambda) v(z_{t+1}) + lambda V_{t+1}),
  V_H = v(z_H). `lambda_return`.
- Actor loss (Eq. 6): -sum_t [ rho V_t + (1-rho) ln pi(a_t|z_t) sg(V_t - v(z_t)) + eta H[pi] ],
  rho = 1 (dynamics backpropagation) for continuous actions and 0 (REINFORCE) for discrete
  ones, eta = 1e-4. Critic loss (Eq. 5): (v(z_t) - sg(V_t))^2 / 2 against a slow target critic
  copied every 100 updates. `behaviour_losses`.

Shapes are time-major throughout: replay sequences are (T, B, ...), imagined rollouts (H + 1, N, ...)
with N = T * B start states. Images are uint8 (3, 64, 64) until the encoder, which maps them to
[-0.5, 0.5].

    python dreamerv2.py --env dmc-walker-walk
    python dreamerv2.py --env dcs-walker-walk --distraction medium --preset tiny --total-steps 2000
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

# Argument validation of torch.distributions checks every sample; it costs ~20% of an update.
td.Distribution.set_default_validate_args(False)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment (part of the run name)"""
    env: str = "dmc-walker-walk"
    """env id: dmc-<domain>-<task>, dcs-<domain>-<task>, natural-<domain>-<task>,
    manipulation-<task>, robosuite-<task>-<robot>, pybullet-boxpush, minigrid-<name> (discrete
    actions), toy-reach, toy-reach-center (README, "Environments")"""
    distraction: str = "none"
    """dcs-*: none | easy | medium | hard | background; robosuite-*: none | color-lighting |
    color-lighting-camera; minigrid-*: none | color_direction | smaller_agent | random_frames |
    video"""
    dynamic: bool = True
    """distractions move within an episode (False: static per episode)"""
    video_dir: Optional[str] = None
    """DAVIS 2017 or video folder for backgrounds (default: built-in offline pool)"""
    eval_split: Literal["train", "val"] = "val"
    """background videos used for evaluation"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ..."""
    compile: bool = False
    """torch.compile the networks (GPU; the first updates are slow while it compiles)"""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast for the networks (fp16 is known to diverge in Dreamer)"""
    preset: Literal["paper", "tiny"] = "paper"
    """'tiny': narrow nets, short sequences, small batch and prefill, for smoke tests; flags you
    set explicitly win over the preset (see PRESETS)"""
    total_steps: int = 1_000_000
    """environment steps to train for, counted after action repeat (simulator steps)"""
    action_repeat: Optional[int] = None
    """simulator steps per action (default: the per-task literature value, see envs)"""
    eval_every: int = 10_000
    """environment steps between evaluations (0: never, except at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation, deterministic (mode) actions"""
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

    # Replay and schedule.
    replay_capacity: int = 1_000_000
    """replay capacity in environment steps (stored per agent step as uint8 images)"""
    batch_size: int = 16
    """sequences per mini-batch"""
    batch_length: int = 50
    """steps per sequence"""
    prefill: int = 1000
    """agent steps with uniform random actions before training starts"""
    pretrain: int = 100
    """updates made once, right after the prefill"""
    train_every: int = 5
    """agent steps between training rounds"""
    updates_per_step: int = 1
    """updates per training round"""

    # World model.
    cnn_depth: int = 48
    """encoder/decoder channels of the first layer (doubling: 48/96/192/384)"""
    deter: int = 200
    """GRU (deterministic) state size"""
    hidden: int = 200
    """hidden units of the RSSM's input and output layers"""
    stoch: int = 32
    """categorical latent variables"""
    classes: int = 32
    """classes per categorical variable"""
    mlp_units: int = 400
    """units of the reward, discount, actor and critic MLPs"""
    mlp_layers: int = 4
    """hidden layers of those MLPs"""
    kl_balance: float = 0.8
    """KL balancing alpha: weight of the prior's side"""
    free_nats: float = 1.0
    """free nats, applied to the batch-mean KL"""
    kl_scale: float = 1.0
    """beta, the KL weight"""
    pred_discount: bool = False
    """learn a discount (episode continuation) head; off for DMC, which never terminates"""
    model_lr: float = 3e-4
    """world-model learning rate"""

    # Behaviour.
    horizon: int = 15
    """imagination horizon"""
    gamma: float = 0.99
    """discount"""
    return_lambda: float = 0.95
    """lambda of the lambda-return"""
    actor_lr: float = 8e-5
    """actor learning rate"""
    critic_lr: float = 8e-5
    """critic learning rate"""
    actor_entropy: float = 1e-4
    """entropy regulariser eta"""
    actor_grad: Literal["auto", "dynamics", "reinforce"] = "auto"
    """'auto': dynamics backpropagation for continuous actions, REINFORCE for discrete"""
    target_update_every: int = 100
    """updates between copies of the critic into the slow target critic"""
    adam_eps: float = 1e-5
    """Adam epsilon"""
    grad_clip: float = 100.0
    """gradient-norm clip of every optimiser"""
    weight_decay: float = 1e-6
    """decoupled weight decay of every optimiser"""


# The tiny preset: runs end to end in well under a minute on 2 CPU cores.
PRESETS = {
    "tiny": dict(cnn_depth=4, deter=32, hidden=32, stoch=4, classes=4, mlp_units=32, mlp_layers=2,
                 batch_size=4, batch_length=8, prefill=100, pretrain=2, horizon=5,
                 eval_episodes=1, replay_capacity=100_000),
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
# Networks
# ---------------------------------------------------------------------------------------------


def mlp(inp: int, out: int, units: int, layers: int) -> nn.Sequential:
    """`layers` hidden ELU layers of `units`, then a linear output."""
    mods, d = [], inp
    for _ in range(layers):
        mods += [nn.Linear(d, units), nn.ELU()]
        d = units
    mods.append(nn.Linear(d, out))
    return nn.Sequential(*mods)


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
        x = self.linear(feat).reshape(-1, 32 * self.depth, 1, 1)
        return self.net(x).reshape(*feat.shape[:-1], 3, 64, 64)


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
    """Recurrent state-space model with categorical stochastic states (Sec. 2.1).

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
        self.obs_out = nn.Sequential(nn.Linear(deter + embed_dim, hidden), nn.ELU(),
                                     nn.Linear(hidden, stoch * classes))  # posterior q(z_t | h_t, e_t)

    @property
    def feat_dim(self) -> int:
        return self.deter + self.stoch * self.classes

    def initial(self, batch: int, device) -> dict:
        zeros = torch.zeros(batch, self.stoch, self.classes, device=device)
        return dict(deter=torch.zeros(batch, self.deter, device=device), stoch=zeros, logits=zeros)

    def dist(self, logits: torch.Tensor) -> td.Distribution:
        """32 independent categoricals; rsample() is one-hot with straight-through gradients."""
        return td.Independent(td.OneHotCategoricalStraightThrough(logits=logits.float()), 1)

    def _stochastic(self, logits: torch.Tensor, deter: torch.Tensor) -> dict:
        logits = logits.reshape(*logits.shape[:-1], self.stoch, self.classes)
        return dict(deter=deter, stoch=self.dist(logits).rsample(), logits=logits)

    def img_step(self, state: dict, action: torch.Tensor) -> dict:
        """Prior step: h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}]), z_t ~ p(z_t | h_t)."""
        x = self.img_in(torch.cat([state["stoch"].flatten(-2), action], -1))
        deter = self.cell(x, state["deter"])
        return self._stochastic(self.img_out(deter), deter)

    def obs_step(self, state: dict, action: torch.Tensor, embed: torch.Tensor) -> tuple[dict, dict]:
        """Prior step, then the posterior z_t ~ q(z_t | h_t, e_t)."""
        prior = self.img_step(state, action)
        post = self._stochastic(self.obs_out(torch.cat([prior["deter"], embed], -1)), prior["deter"])
        return post, prior

    def observe(self, embed: torch.Tensor, action: torch.Tensor):
        """Filter a sequence from the zero state. embed (T, B, E); action (T, B, A) is a_{t-1}, the
        action that led to observation t. Returns posteriors and priors as dicts of (T, B, ...)."""
        state = self.initial(embed.shape[1], embed.device)
        posts, priors = [], []
        for t in range(embed.shape[0]):
            state, prior = self.obs_step(state, action[t], embed[t])
            posts.append(state)
            priors.append(prior)
        stack = lambda states: {k: torch.stack([s[k] for s in states]) for k in states[0]}  # noqa: E731
        return stack(posts), stack(priors)

    def feat(self, state: dict) -> torch.Tensor:
        """Model state [z_t, h_t] fed to every head: (…, stoch * classes + deter)."""
        return torch.cat([state["stoch"].flatten(-2), state["deter"]], -1)


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


class Actor(nn.Module):
    """pi(a_t | z_t): truncated normal (mean tanh, std 2 sigmoid(x/2) + 0.1) or one-hot categorical."""

    def __init__(self, feat_dim: int, action_dim: int, discrete: bool, units: int, layers: int):
        super().__init__()
        self.discrete = discrete
        self.net = mlp(feat_dim, action_dim if discrete else 2 * action_dim, units, layers)

    def forward(self, feat: torch.Tensor) -> td.Distribution:
        out = self.net(feat).float()
        if self.discrete:
            return td.OneHotCategoricalStraightThrough(logits=out)
        mean, std = out.chunk(2, -1)
        return td.Independent(TruncatedNormal(torch.tanh(mean), 2 * torch.sigmoid(std / 2) + 0.1), 1)


def mode(dist: td.Distribution) -> torch.Tensor:
    """Deterministic action for evaluation."""
    if isinstance(dist, td.OneHotCategorical):
        return F.one_hot(dist.logits.argmax(-1), dist.logits.shape[-1]).float()
    return dist.base_dist.mode


class WorldModel(nn.Module):
    def __init__(self, args: Args, action_dim: int):
        super().__init__()
        self.encoder = Encoder(args.cnn_depth)
        self.rssm = RSSM(self.encoder.out_dim, action_dim, args.deter, args.hidden, args.stoch,
                         args.classes)
        feat = self.rssm.feat_dim
        self.decoder = Decoder(feat, args.cnn_depth)
        self.reward = mlp(feat, 1, args.mlp_units, args.mlp_layers)
        self.discount = mlp(feat, 1, args.mlp_units, args.mlp_layers) if args.pred_discount else None


class ActorCritic(nn.Module):
    def __init__(self, args: Args, feat_dim: int, action_dim: int, discrete: bool):
        super().__init__()
        self.actor = Actor(feat_dim, action_dim, discrete, args.mlp_units, args.mlp_layers)
        self.critic = mlp(feat_dim, 1, args.mlp_units, args.mlp_layers)
        self.target_critic = mlp(feat_dim, 1, args.mlp_units, args.mlp_layers)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Replay buffer
# ---------------------------------------------------------------------------------------------


class Replay:
    """Whole episodes in a flat ring of uint8 images; uniform sampling of in-episode sequences.

    Slot t of an episode holds obs_t, the action a_{t-1} that led to it (zeros at t = 0), the
    reward r_t received on arriving there (0 at t = 0) and cont_t = 0 if the episode terminated
    there. A sequence never crosses an episode boundary, so the RSSM starts each one from zeros.
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
        self._starts = np.zeros(0, np.int64)
        self._starts_length = None

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
        return self._starts

    def can_sample(self, length: int) -> bool:
        return len(self.valid_starts(length)) > 0

    def sample(self, batch: int, length: int) -> dict:
        """Numpy arrays, time-major: obs (T, B, 3, H, W) uint8, action (T, B, A), reward, cont."""
        starts = self.rng.choice(self.valid_starts(length), size=batch)
        idx = (starts[None, :] + np.arange(length)[:, None]) % self.capacity  # (T, B)
        return dict(obs=self.obs[idx], action=self.action[idx], reward=self.reward[idx],
                    cont=self.cont[idx])

    def state_dict(self) -> dict:
        keep = slice(0, self.size)  # only the filled part
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


def to_torch(batch: dict, device: torch.device) -> dict:
    """Host numpy batch -> device tensors; images stay uint8 over the bus (4x less to copy)."""
    pin = device.type == "cuda"
    out = {}
    for key, value in batch.items():
        t = torch.from_numpy(value)
        out[key] = (t.pin_memory() if pin else t).to(device, non_blocking=pin)
    return out


# ---------------------------------------------------------------------------------------------
# World-model objective
# ---------------------------------------------------------------------------------------------


def kl_balance(post_logits: torch.Tensor, prior_logits: torch.Tensor, rssm: RSSM, alpha: float,
               free: float) -> tuple[torch.Tensor, torch.Tensor]:
    """KL balancing (Sec. 2.2): alpha KL(sg(q) || p) trains the prior towards the posterior,
    (1 - alpha) KL(q || sg(p)) regularises the posterior; free nats on each side's batch mean.
    Returns (loss, per-step KL value (T, B))."""
    kl_prior = td.kl_divergence(rssm.dist(post_logits.detach()), rssm.dist(prior_logits))
    kl_post = td.kl_divergence(rssm.dist(post_logits), rssm.dist(prior_logits.detach()))
    loss = alpha * kl_prior.mean().clamp_min(free) + (1 - alpha) * kl_post.mean().clamp_min(free)
    return loss, kl_prior.detach()


def world_model_loss(wm: WorldModel, batch: dict, args: Args):
    """Eq. 2: image and reward negative log-likelihoods + beta * balanced KL. batch is time-major."""
    embed = wm.encoder(batch["obs"])  # (T, B, E)
    post, prior = wm.rssm.observe(embed, batch["action"])
    feat = wm.rssm.feat(post)  # (T, B, F)
    target = batch["obs"].float() / 255.0 - 0.5
    image_nll = -td.Independent(td.Normal(wm.decoder(feat).float(), 1.0), 3).log_prob(target).mean()
    reward_nll = -td.Normal(wm.reward(feat).squeeze(-1).float(), 1.0).log_prob(batch["reward"]).mean()
    kl_loss, kl_value = kl_balance(post["logits"], prior["logits"], wm.rssm, args.kl_balance,
                                   args.free_nats)
    loss = image_nll + reward_nll + args.kl_scale * kl_loss
    metrics = dict(image_loss=image_nll, reward_loss=reward_nll, kl_loss=kl_loss,
                   kl=kl_value.mean(),
                   prior_entropy=wm.rssm.dist(prior["logits"]).entropy().mean().detach(),
                   post_entropy=wm.rssm.dist(post["logits"]).entropy().mean().detach())
    if wm.discount is not None:
        # The discount head predicts episode continuation (Bernoulli), scaled by gamma when used.
        discount_nll = -td.Bernoulli(logits=wm.discount(feat).squeeze(-1).float()).log_prob(
            batch["cont"]).mean()
        loss = loss + discount_nll
        metrics["discount_loss"] = discount_nll
    metrics["model_loss"] = loss
    return loss, post, metrics


# ---------------------------------------------------------------------------------------------
# Behaviour learning in imagination
# ---------------------------------------------------------------------------------------------


def lambda_return(reward, value, discount, bootstrap, lam: float):
    """Eq. 4, time-major (H, N): V_t = r_t + gamma_t ((1 - lam) v_{t+1} + lam V_{t+1}), V_H = bootstrap."""
    next_values = torch.cat([value[1:], bootstrap[None]], 0)
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
    start = {k: v.detach().flatten(0, 1) for k, v in post.items()}  # (T*B, ...)
    feats, actions = imagine(wm, ac.actor, start, args.horizon)
    # Paper Eq. 4 uses r_t = E[p(r_t | z_t)] of the state the action is taken in.
    reward = wm.reward(feats).squeeze(-1).float()  # (H+1, N)
    if wm.discount is not None:
        discount = args.gamma * torch.sigmoid(wm.discount(feats).squeeze(-1).float())
    else:
        discount = torch.full_like(reward, args.gamma)
    value = ac.target_critic(feats).squeeze(-1).float()
    target = lambda_return(reward[:-1], value[:-1], discount[:-1], value[-1], args.return_lambda)
    # Imagined steps after a predicted episode end count less: weight_t = prod_{k<t} gamma_k.
    weight = torch.cumprod(torch.cat([torch.ones_like(discount[:1]), discount[:-2]], 0), 0).detach()
    policy = ac.actor(feats[:-1].detach())
    critic = ac.critic(feats[:-1].detach()).squeeze(-1).float()  # v(z_t), also the baseline
    grad = args.actor_grad if args.actor_grad != "auto" else ("reinforce" if discrete else "dynamics")
    if grad == "dynamics":
        objective = target  # rho = 1: backpropagate V_t through the model into the actions
    else:  # rho = 0: REINFORCE with the critic as baseline
        objective = policy.log_prob(actions.detach()) * (target - critic).detach()
    entropy = policy.entropy()
    actor_loss = -(weight * (objective + args.actor_entropy * entropy)).mean()
    critic_loss = -(td.Normal(critic, 1.0).log_prob(target.detach()) * weight).mean()
    metrics = dict(actor_loss=actor_loss, critic_loss=critic_loss, actor_entropy=entropy.mean(),
                   imagined_reward=reward.mean(), value=critic.mean(), lambda_return=target.mean())
    return actor_loss, critic_loss, metrics


# ---------------------------------------------------------------------------------------------
# Agent: one update, acting, evaluation
# ---------------------------------------------------------------------------------------------


class Agent:
    def __init__(self, args: Args, action_dim: int, discrete: bool, device: torch.device):
        self.args, self.device, self.discrete, self.action_dim = args, device, discrete, action_dim
        self.wm = WorldModel(args, action_dim).to(device)
        self.ac = ActorCritic(args, self.wm.rssm.feat_dim, action_dim, discrete).to(device)
        adam = lambda params, lr: torch.optim.AdamW(params, lr=lr, eps=args.adam_eps,  # noqa: E731
                                                    weight_decay=args.weight_decay)
        self.model_opt = adam(self.wm.parameters(), args.model_lr)
        self.actor_opt = adam(self.ac.actor.parameters(), args.actor_lr)
        self.critic_opt = adam(self.ac.critic.parameters(), args.critic_lr)
        self.updates = 0
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
        if args.compile:
            # Compile the pieces that run many times per update (the per-step RSSM functions and
            # the conv nets) in place, so that state_dict keys and checkpoints stay the same.
            rssm = self.wm.rssm
            rssm.img_step, rssm.obs_step = torch.compile(rssm.img_step), torch.compile(rssm.obs_step)
            for net in (self.wm.encoder, self.wm.decoder, self.wm.reward, self.ac.actor, self.ac.critic):
                net.compile()

    def update(self, batch: dict) -> dict:
        """One world-model update, then one actor and one critic update on imagined rollouts."""
        with self.autocast:
            model_loss, post, metrics = world_model_loss(self.wm, batch, self.args)
        self.model_opt.zero_grad(set_to_none=True)
        model_loss.backward()
        metrics["model_grad_norm"] = nn.utils.clip_grad_norm_(self.wm.parameters(), self.args.grad_clip)
        self.model_opt.step()

        with self.autocast:
            actor_loss, critic_loss, ac_metrics = behaviour_losses(self.wm, self.ac, post, self.args,
                                                                   self.discrete)
        self.actor_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        # Each loss updates only its own network: the actor's gradient flows through the world
        # model into the actions, but the world model is not updated by it.
        actor_loss.backward(inputs=list(self.ac.actor.parameters()))
        critic_loss.backward(inputs=list(self.ac.critic.parameters()))
        metrics["actor_grad_norm"] = nn.utils.clip_grad_norm_(self.ac.actor.parameters(), self.args.grad_clip)
        metrics["critic_grad_norm"] = nn.utils.clip_grad_norm_(self.ac.critic.parameters(), self.args.grad_clip)
        self.actor_opt.step()
        self.critic_opt.step()
        metrics.update(ac_metrics)
        if self.updates % self.args.target_update_every == 0:
            self.ac.target_critic.load_state_dict(self.ac.critic.state_dict())
        self.updates += 1
        return metrics

    @torch.no_grad()
    def act(self, obs: np.ndarray, state, explore: bool):
        """One filtering step and an action. state = (latent, previous action) or None."""
        if state is None:
            latent = self.wm.rssm.initial(1, self.device)
            prev = torch.zeros(1, self.action_dim, device=self.device)
        else:
            latent, prev = state
        obs_t = torch.as_tensor(obs, device=self.device)[None]
        with self.autocast:
            # Latents are sampled in evaluation too (official eval_state_mean=False); only the
            # action is the mode.
            latent, _ = self.wm.rssm.obs_step(latent, prev, self.wm.encoder(obs_t))
            dist = self.ac.actor(self.wm.rssm.feat(latent))
        action = dist.sample() if explore else mode(dist)
        return action[0].float().cpu().numpy(), (latent, action.float())

    def num_parameters(self) -> int:
        """Trained parameters: world model, actor, critic (not the slow target critic)."""
        return sum(p.numel() for m in (self.wm, self.ac.actor, self.ac.critic) for p in m.parameters())

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


def env_action(action: np.ndarray, discrete: bool):
    """The agent's action (continuous vector or one-hot) in the env's format."""
    return int(action.argmax()) if discrete else action


def evaluate(agent: Agent, env, episodes: int, discrete: bool, record: bool = False):
    """Mean return of `episodes` episodes with mode actions; frames of the first if `record`."""
    returns, frames = [], []
    for ep in range(episodes):
        obs, _ = env.reset()
        state, total, done = None, 0.0, False
        while not done:
            if record and ep == 0:
                frames.append(obs.transpose(1, 2, 0))
            action, state = agent.act(obs, state, explore=False)
            obs, reward, terminated, truncated, _ = env.step(env_action(action, discrete))
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
    env = envs.make(args.env, distraction=args.distraction, dynamic=args.dynamic, seed=args.seed,
                    image_size=64, action_repeat=args.action_repeat, video_dir=args.video_dir)
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
    checkpoint = None
    if args.resume:
        if not Path(args.resume).is_file():
            raise SystemExit(f"--resume {args.resume}: no such checkpoint file")
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=False)
    device = resolve_device(args.device)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    make = lambda split, seed: envs.make(args.env, distraction=args.distraction,  # noqa: E731
                                         dynamic=args.dynamic, seed=seed, image_size=64,
                                         action_repeat=args.action_repeat, split=split,
                                         video_dir=args.video_dir)
    try:  # bad input (env id, distraction, video folder) ends here with a message, not a traceback
        env, eval_env = make("train", args.seed), make(args.eval_split, args.seed + 10_000)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    run_name = f"{args.env}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.resume).parent if args.resume else Path("runs") / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = Logger(run_dir, args)
    discrete = hasattr(env.action_space, "n")
    action_dim = env.action_space.n if discrete else env.action_space.shape[0]
    repeat = args.action_repeat or envs.default_action_repeat(args.env)

    agent = Agent(args, action_dim, discrete, device)
    replay = Replay(max(args.replay_capacity // repeat, args.batch_length), env.observation_space.shape,
                    action_dim, args.seed)
    counters = dict(env_steps=0, agent_steps=0, episodes=0, next_eval=args.eval_every,
                    last_eval=-1, pretrained=False)
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
    ratio = args.updates_per_step * args.batch_size * args.batch_length / args.train_every
    print(f"run {run_dir} | device {device} | {params / 1e6:.1f}M parameters | replay "
          f"{replay.capacity:,} agent steps, up to {replay.nbytes / 2**30:.2f} GiB (filled lazily) | "
          f"replay ratio {ratio:.0f} replayed steps per agent step")

    def checkpoint_now():
        if args.save_model:
            save_checkpoint(run_dir / "checkpoint.pt", agent, replay if args.checkpoint_replay else None,
                            counters, args)

    def run_eval():
        ret, frames = evaluate(agent, eval_env, args.eval_episodes, discrete, args.capture_video)
        logger.log(counters["env_steps"], {"eval/episodic_return": ret})
        if frames:
            save_video(frames, run_dir / "videos" / f"eval_{counters['env_steps']}.mp4")
            strip = np.concatenate(frames[:: max(1, len(frames) // 8)][:8], axis=1)
            logger.writer.add_image("eval/frames", strip, counters["env_steps"], dataformats="HWC")
        print(f"eval at {counters['env_steps']}: return {ret:.1f}")
        counters["last_eval"] = counters["env_steps"]
        checkpoint_now()
        return ret

    obs, _ = env.reset(seed=args.seed + counters["episodes"])
    state, episode_return = None, 0.0
    ep = dict(obs=[obs], action=[np.zeros(action_dim, np.float32)], reward=[0.0], cont=[1.0])
    start_time, start_steps, last_log, last_updates = time.time(), counters["env_steps"], time.time(), agent.updates
    last_return, metrics = float("nan"), {}
    while counters["env_steps"] < args.total_steps:
        if counters["agent_steps"] < args.prefill:
            action = (np.eye(action_dim, dtype=np.float32)[np.random.randint(action_dim)] if discrete
                      else np.random.uniform(-1, 1, action_dim).astype(np.float32))
        else:
            action, state = agent.act(obs, state, explore=True)
        obs, reward, terminated, truncated, info = env.step(env_action(action, discrete))
        counters["agent_steps"] += 1
        counters["env_steps"] += info["env_steps"]
        episode_return += reward
        for key, value in zip(("obs", "action", "reward", "cont"), (obs, action, reward, 1.0 - terminated)):
            ep[key].append(value)
        if terminated or truncated:
            replay.add_episode(*(np.asarray(ep[k]) for k in ("obs", "action", "reward", "cont")))
            counters["episodes"] += 1
            last_return = episode_return
            logger.log(counters["env_steps"], {"charts/episodic_return": episode_return,
                                               "charts/episodic_length": len(ep["reward"]) - 1})
            obs, _ = env.reset(seed=args.seed + counters["episodes"])
            state, episode_return = None, 0.0
            ep = dict(obs=[obs], action=[np.zeros(action_dim, np.float32)], reward=[0.0], cont=[1.0])

        # Train: once `prefill` steps are in, `pretrain` updates, then every `train_every` steps.
        if counters["agent_steps"] >= args.prefill and replay.can_sample(args.batch_length):
            rounds = 0
            if not counters["pretrained"]:
                rounds, counters["pretrained"] = args.pretrain, True
            elif counters["agent_steps"] % args.train_every == 0:
                rounds = args.updates_per_step
            for _ in range(rounds):
                metrics = agent.update(to_torch(replay.sample(args.batch_size, args.batch_length), device))

        if counters["env_steps"] // args.log_every != (counters["env_steps"] - info["env_steps"]) // args.log_every:
            now = time.time()
            sps = (counters["env_steps"] - start_steps) / (now - start_time)
            ups = (agent.updates - last_updates) / (now - last_log)
            last_log, last_updates = now, agent.updates
            logs = {f"losses/{k}": v for k, v in metrics.items()}
            logs.update({"charts/SPS": sps, "charts/updates_per_second": ups,
                         "charts/updates": agent.updates})
            logger.log(counters["env_steps"], logs)
            eta = (args.total_steps - counters["env_steps"]) / max(sps, 1e-9)
            print(f"step {counters['env_steps']:>8}/{args.total_steps} | return {last_return:8.1f} | "
                  f"SPS {sps:6.1f} | updates {agent.updates} | ETA {eta / 60:6.1f} min", flush=True)
        if args.eval_every and counters["env_steps"] >= counters["next_eval"]:
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
