"""DreamerV2: a world model with discrete latents, and behaviour learned inside it.

Paper: D. Hafner, T. Lillicrap, M. Norouzi, J. Ba, "Mastering Atari with Discrete World Models",
ICLR 2021, arXiv:2010.02193. Authors' code: github.com/danijar/dreamerv2 (the defaults here are
its DMC-from-pixels setting, `configs.yaml` dmc_vision). The reconstruction baseline of this
project: BLAST (`blast.py`) and DreamingV2 (`dreamingv2.py`) modify exactly this world model.

The idea. A recurrent state-space model (RSSM) with a deterministic GRU state h_t and a stochastic
state z_t of 32 categorical variables with 32 classes is trained on replayed sequences to
reconstruct the images and predict the rewards. An actor and a critic never see real data: they
learn on 15-step rollouts imagined by the model from every replayed posterior state, the actor by
backpropagating lambda-returns through the model's dynamics (continuous actions) or by
REINFORCE (discrete ones), the critic by regressing the lambda-returns of a slow target critic.

Paper map (equation -> where it is implemented), in the order of this file:
- RSSM: h_t = f(h_{t-1}, z_{t-1}, a_{t-1}) (LayerNorm GRU), prior p(z_t | h_t), posterior
  q(z_t | h_t, e_t) with e_t = enc(x_t); straight-through gradients for samples.
  `RSSM` (`img_step`, `obs_step`, `observe`), `Encoder`, `Decoder`, `sample_one_hot`.
- World-model loss (Eq. 2): -ln p(x_t | h_t, z_t) - ln p(r_t | h_t, z_t) + beta KL[q || p].
  `world_model_loss`.
- KL balancing (Algorithm 2): alpha KL(sg(q) || p) + (1 - alpha) KL(q || sg(p)), alpha = 0.8,
  free nats 1.0 on the batch mean. `kl_balance`.
- Imagination: z_{t+1} ~ p(z_{t+1} | h_{t+1}), a_t ~ pi(a_t | z_t), t = 0..H-1. `imagine`.
- Lambda-return (Eq. 4): V_t = r_t + gamma_t ((1 - lambda) v(z_{t+1}) + lambda V_{t+1}),
  V_H = v(z_H), with the slow target critic v. `lambda_return`.
- Critic loss (Eq. 5): (v(z_t) - sg(V_t))^2 / 2; the slow critic is copied from the critic every
  100 updates. `behaviour_losses`, `Agent.update_slow_critic`.
- Actor loss (Eq. 6): -sum_t [ rho V_{t+1} + (1 - rho) ln pi(a_t | z_t) sg(V_{t+1} - v(z_t))
  + eta H[pi(a_t | z_t)] ], indexed as the official agent.py (the action taken at z_t is credited
  with V_{t+1}); rho = 1 (dynamics backpropagation) for continuous actions, 0 (REINFORCE) for
  discrete ones; eta = 1e-4. `behaviour_losses`.
- The training step (world model, then actor and critic, one optimiser each): `Agent.update`.

Shapes are time-major throughout: replay sequences are (T, B, ...), imagined rollouts
(H + 1, N, ...) with N = T * B start states. Images are uint8 (3, 64, 64) until the encoder, which
maps them to [-0.5, 0.5]. Index conventions: beside `Replay`.

Speed (what makes an update fast on a GPU, each in one named place): nothing non-recurrent runs
inside a time loop (`RSSM.observe` computes the posterior's embedding branch and the priors over
all T*B steps at once); `--compile` compiles the two loss functions as wholes (`Agent.__init__`);
no host synchronisation inside `Agent.update` (metrics stay on the device until log time,
non-finite losses skip the fused optimiser step on the device: `Optimizer`); the replay's images
live on the GPU (`Replay`); TF32 on CUDA (`configure_torch`). Everything after `main` is the
plumbing block, the same text in all five scripts of this repository.

    python dreamerv2.py --env dmc-walker-walk
    python dreamerv2.py --env dcs-walker-walk --distraction medium --preset small
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

# Argument validation of torch.distributions checks every sample; it costs ~20% of an update.
td.Distribution.set_default_validate_args(False)


@dataclass
class Args:
    """Every default is the DreamerV2 setting for DMC from pixels (the official configuration,
    danijar/dreamerv2 `configs.yaml`, section dmc_vision over its defaults), or says why not.
    Other settings (`--preset small`, `--preset tiny`) are the overrides in PRESETS below."""

    # Experiment, environment, hardware.
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of this experiment (part of the run name; ours: CleanRL's convention)"""
    env: str = "dmc-walker-walk"
    """env id (official configs.yaml task dmc_walker_walk): dmc-<domain>-<task>,
    dcs-<domain>-<task>, natural-<domain>-<task>, manipulation-<task>, robosuite-<task>-<robot>,
    pybullet-boxpush, minigrid-<name> (discrete actions), toy-reach, toy-reach-center (docs/envs.md)"""
    distraction: str = "none"
    """ours (none: the clean benchmark). dcs-*: none | easy | medium | hard | background;
    robosuite-*: none | color-lighting | color-lighting-camera; minigrid-*: none | color_direction |
    smaller_agent | random_frames | video"""
    dynamic: bool = True
    """distractions move within an episode (False: static per episode); ours: the Distracting
    Control Suite's dynamic setting"""
    video_dir: Optional[str] = None
    """DAVIS 2017 or video folder for backgrounds (default, ours: the built-in offline pool)"""
    eval_split: Literal["train", "val"] = "val"
    """background videos used for evaluation (ours: held-out videos, the DCS protocol)"""
    seed: int = 1
    """seed of the experiment (ours: CleanRL's default)"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic` (and leaves cudnn.benchmark off); ours: CleanRL's"""
    device: str = "auto"
    """'auto' (CUDA if available), 'cpu', 'cuda', 'cuda:1', ... (ours)"""
    compile: bool = False
    """torch.compile the world-model loss and the behaviour losses as wholes (CPU and CUDA; the
    first update compiles them and prints how long it took). ours: off, compiling takes minutes"""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """torch.compile mode (CUDA: 'reduce-overhead' uses CUDA graphs; 'max-autotune' means
    max-autotune-no-cudagraphs until a GPU run has shown CUDA graphs work with it); ours"""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast for the networks; values, returns, log-probs, KL and losses stay fp32. ours:
    fp32 (official configs.yaml precision 16 is mixed fp16, which is known to diverge in Dreamer)"""
    preset: Literal["paper", "small", "tiny"] = "paper"
    """'paper': these defaults; 'small': the same algorithm sized for a 2-core CPU (100K steps of
    dmc-cartpole-swingup in under an hour); 'tiny': narrow nets, short sequences, 2000 steps, for
    smoke tests. Flags you set explicitly win over the preset (ours, see PRESETS)"""

    # Schedule, evaluation, logging, checkpoints.
    total_steps: int = 1_000_000
    """environment steps to train for, counted after action repeat (simulator steps); ours: the
    1M steps of the official DMC curves (reference/dreamerv2-dmc-vision-scores.json)"""
    action_repeat: Optional[int] = None
    """simulator steps per action; None: 2 for every dmc/dcs/natural task (official DreamerV2
    configs.yaml dmc_vision: action_repeat 2), the env's own default otherwise; 0: the env's own
    per-task default (PlaNet's: cartpole 8, walker 2, ...; `--preset small`)"""
    eval_every: int = 10_000
    """environment steps between evaluations (0: never, except at the end). The official
    implementation evaluates 1 episode every 1e4 agent steps (configs.yaml eval_every 1e4,
    eval_eps 1); ours: 10 episodes every 1e4 environment steps, and `benchmark.sh dmc` 20 episodes
    every 10K environment steps: one episode's return is too noisy to compare curves with the
    published ones from a few seeds"""
    eval_episodes: int = 10
    """episodes per evaluation, deterministic (mode) actions (ours: see eval_every)"""
    eval_action: Literal["mode", "mean"] = "mode"
    """continuous actions in evaluation: 'mode', as DreamerV2's code (the truncated normal's
    location clipped to [-1, 1]: a full push once the actor's tanh mean saturates), or 'mean'
    (ours: the distribution's mean, the average of the samples the actor is trained on;
    deterministic too). results/cpu/behaviour_check compares them on the CPU runs' checkpoints"""
    log_every: int = 1_000
    """environment steps between training-metric logs and progress lines (a progress line is also
    printed at least every 30 s); ours: 10x the official log_every 1e4, for short CPU runs"""
    save_model: bool = False
    """write checkpoint.pt (networks, optimisers, counters, RNG states) at every evaluation, and
    replay.pt beside it at the end and every --replay-checkpoint-every evaluations (an interrupt
    or a non-finite loss always writes both); ours: CleanRL's default"""
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
    """path of a checkpoint to continue from: its flags are the defaults, schedule flags may change
    (ours)"""
    measure_updates: int = 0
    """if > 0: time this many updates on a synthetic batch at the configured sizes and 50 steps of
    the acting loop on --env, print one JSON line and exit (benchmark.sh speed; ours)"""
    capture_video: bool = False
    """save an mp4 of the first eval episode (runs/<run>/videos) and a frame strip to TensorBoard
    (ours: off, encoding costs time)"""

    # Replay and training schedule.
    replay_capacity: int = 2_000_000
    """replay capacity in agent steps (official configs.yaml replay capacity 2e6), capped at what
    the run can fill (total_steps / action repeat) and allocated once"""
    replay_device: Literal["auto", "cpu", "cuda"] = "auto"
    """where the replay's arrays live: 'auto' (the training device when it is CUDA, else cpu),
    'cpu', 'cuda' (ours: on the GPU a batch needs no host-to-device copy)"""
    prioritize_ends: bool = False
    """sample the last window of each episode more often (`Replay.draw_starts`). Off: DreamerV2
    configs.yaml dmc_vision sets replay.prioritize_ends False (True in its defaults, for Atari);
    --prioritize-ends turns it on (`--preset small` does, see PRESETS)"""
    batch_size: int = 16
    """sequences per mini-batch (official configs.yaml dataset.batch 16)"""
    batch_length: int = 50
    """steps per sequence (official configs.yaml dataset.length 50)"""
    prefill: int = 1000
    """agent steps with uniform random actions before training starts (official configs.yaml
    dmc_vision prefill 1000)"""
    pretrain: int = 100
    """updates made once, right after the prefill (official configs.yaml dmc_vision pretrain 100)"""
    train_every: int = 5
    """agent steps between training rounds (official configs.yaml train_every 5)"""
    updates_per_step: int = 1
    """updates per training round (official configs.yaml train_steps 1)"""

    # World model.
    cnn_depth: int = 48
    """encoder/decoder channels of the first layer (doubling: 48/96/192/384; official configs.yaml
    encoder.cnn_depth 48)"""
    deter: int = 200
    """GRU (deterministic) state size (official configs.yaml dmc_vision rssm.deter 200)"""
    hidden: int = 200
    """hidden units of the RSSM's input and output layers (official configs.yaml dmc_vision
    rssm.hidden 200)"""
    stoch: int = 32
    """categorical latent variables (paper Sec. 2.1; official configs.yaml rssm.stoch 32)"""
    classes: int = 32
    """classes per categorical variable (paper Sec. 2.1; official configs.yaml rssm.discrete 32)"""
    mlp_units: int = 400
    """units of the reward, discount, actor and critic MLPs (official configs.yaml *_head.units 400)"""
    mlp_layers: int = 4
    """hidden layers of those MLPs (official configs.yaml *_head.layers 4)"""
    init: Literal["glorot", "torch"] = "glorot"
    """weight init: 'glorot' = Glorot-uniform weights, zero biases (Keras defaults, the official
    implementation); 'torch' = PyTorch's layer defaults"""
    kl_balance: float = 0.8
    """KL balancing alpha, the weight of the prior's side (paper Algorithm 2; official configs.yaml
    kl.balance 0.8)"""
    free_nats: float = 1.0
    """free nats, applied to the batch-mean KL (official configs.yaml dmc_vision kl.free 1.0,
    kl.free_avg True)"""
    kl_scale: float = 1.0
    """beta, the KL weight of Eq. 2 (official configs.yaml loss_scales.kl 1.0)"""
    reward_scale: float = 1.0
    """weight of the reward log-loss in Eq. 2 (official configs.yaml loss_scales.reward 1.0)"""
    pred_discount: bool = False
    """learn a discount (episode continuation) head; off for DMC, which never terminates (official
    configs.yaml dmc_vision pred_discount False)"""
    model_lr: float = 3e-4
    """world-model learning rate (official configs.yaml dmc_vision model_opt.lr 3e-4)"""

    # Behaviour.
    horizon: int = 15
    """imagination horizon H (paper; official configs.yaml imag_horizon 15)"""
    gamma: float = 0.99
    """discount (official configs.yaml discount 0.99)"""
    return_lambda: float = 0.95
    """lambda of the lambda-return, Eq. 4 (official configs.yaml discount_lambda 0.95)"""
    actor_lr: float = 8e-5
    """actor learning rate (official configs.yaml dmc_vision actor_opt.lr 8e-5)"""
    critic_lr: float = 8e-5
    """critic learning rate (official configs.yaml dmc_vision critic_opt.lr 8e-5)"""
    actor_entropy: float = 1e-4
    """entropy regulariser eta of Eq. 6 (official configs.yaml dmc_vision actor_ent 1e-4)"""
    actor_grad: Literal["auto", "dynamics", "reinforce"] = "auto"
    """'auto': dynamics backpropagation for continuous actions, REINFORCE for discrete (official
    configs.yaml actor_grad auto, agent.py)"""
    target_update_every: int = 100
    """updates between copies of the critic into the slow target critic (official configs.yaml
    slow_target_update 100, slow_target_fraction 1)"""
    adam_eps: float = 1e-5
    """Adam epsilon (official configs.yaml *_opt.eps 1e-5)"""
    grad_clip: float = 100.0
    """gradient-norm clip of every optimiser (official configs.yaml *_opt.clip 100)"""
    weight_decay: float = 1e-6
    """weight decay of every optimiser as the official one applies it: every parameter is multiplied
    by (1 - weight_decay) once per step, independent of the learning rate (official configs.yaml
    *_opt.wd 1e-6; common/other.py)"""


# Every setting other than the paper's, in one place: values that replace Args defaults (flags
# you set still win; the run header prints what was applied).
# 'small': the same algorithm, sized for a 2-core CPU: 100K env steps of dmc-cartpole-swingup in
#   under an hour (docs/dreamerv2.md, "Presets"). Chosen by measuring seconds per update on one CPU
#   thread; what each value trades:
#   - action_repeat 0: the env's per-task repeat (PlaNet's, 8 for cartpole), the DMC-100K setting
#     of the CURL/PlaNet benchmarks; rendering a frame costs ~30 ms here, so 4x fewer frames than
#     DreamerV2's repeat 2 leave the time to the updates.
#   - nets 16-channel CNN, 128-unit GRU/MLPs, 16x16 latents: 1.8M parameters instead of 15.6M.
#   - batch 16 x 16 steps every 3 agent steps (3,933 updates in 100K env steps, ~1 s per update
#     on one thread): 85 replayed frames per agent step, against the official 160. Every 5 (2,400
#     updates) ended at 205 +- 32 over three seeds, every 6 at 229 (one seed), every 3 with the
#     paper's reward weight at 226 +- 13 (results/cpu/variants/README.md).
#   - learning rates raised (model 1e-3, actor and critic 3e-4), as for few, small updates.
#   - reward_scale 100 (the paper's 1): beside the image's 64 x 64 x 3 log-likelihood, the small
#     reward head weighted 1 fits the reward worse than BLAST's (which has no image term): one-step
#     correlation 0.88 against BLAST's 0.95-0.98; weighted 100x, 0.98-0.99. That alone ends at
#     242 +- 26 over three seeds (every 5 agent steps); with an update every 3 agent steps at
#     280 +- 18 (252, 315, 273), the one combination measured above the 250 bar
#     (results/cpu/runs/dreamerv2; the former preset, every 5 and weight 1:
#     results/cpu/variants/dreamerv2-former-preset).
#   - prioritize_ends on (the official default outside DMC; dmc_vision turns it off): the CPU
#     results in results/cpu were measured with it.
# 'tiny': runs end to end in well under a minute on 2 CPU cores (smoke tests on the toy envs,
#   prioritize_ends on as in the official defaults outside DMC).
PRESETS = {
    "small": dict(action_repeat=0, cnn_depth=16, deter=128, hidden=128, stoch=16, classes=16,
                  mlp_units=128, mlp_layers=2, batch_size=16, batch_length=16, train_every=3,
                  model_lr=1e-3, actor_lr=3e-4, critic_lr=3e-4,
                  total_steps=100_000, eval_episodes=5, replay_capacity=100_000,
                  prioritize_ends=True),
    "tiny": dict(cnn_depth=4, deter=32, hidden=32, stoch=4, classes=4, mlp_units=32, mlp_layers=2,
                 batch_size=4, batch_length=8, prefill=100, pretrain=2, horizon=5,
                 total_steps=2000, eval_every=1000, eval_episodes=1, replay_capacity=100_000,
                 prioritize_ends=True),
}

# Flags that may differ from the checkpoint's on --resume: they change the schedule, the logging or
# how fast the same computation runs, not the algorithm. Script-specific ones: compile_mode,
# replay_device (where the same data lives), torch_deterministic (cuDNN algorithm choice).
SCHEDULE_FLAGS = {"total_steps", "eval_every", "eval_episodes", "eval_action", "log_every",
                  "save_model", "checkpoint_replay", "replay_checkpoint_every", "resume",
                  "capture_video", "device", "compile", "precision", "measure_updates", "exp_name",
                  "compile_mode", "replay_device", "torch_deterministic"}


def preset_args(preset: str = "paper", **overrides) -> Args:
    """Args with a preset's values as defaults; `overrides` (and CLI flags) win over them."""
    if preset not in ("paper", *PRESETS):
        raise ValueError(f"unknown preset {preset!r}; known: paper, {', '.join(PRESETS)}")
    return Args(**{**PRESETS.get(preset, {}), **overrides, "preset": preset})


def preset_overrides(args: Args) -> str:
    """The run header's account of the preset: each value it set that this run uses, and each one
    a flag (or the resumed checkpoint) replaced."""
    preset = PRESETS.get(args.preset, {})
    if not preset:
        return "no overrides (every default is the paper's setting, see Args)"
    used = [f"{k}={v}" for k, v in preset.items() if getattr(args, k) == v]
    replaced = [f"{k}={getattr(args, k)} (preset {v})" for k, v in preset.items() if getattr(args, k) != v]
    return ", ".join(used) + (f"; flags replaced {', '.join(replaced)}" if replaced else "")


def _flag_value(argv: list, flag: str) -> Optional[str]:
    """The value of `--name v` or `--name=v` in argv (the last one, as the parser takes it)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def parse_args(argv=None) -> Args:
    """Read --resume or --preset first, then parse every flag with the checkpoint's (or the
    preset's) values as defaults. On --resume, flags outside SCHEDULE_FLAGS must not change; a flag
    the checkpoint lacks (added after it was written) takes its default."""
    argv = list(sys.argv[1:] if argv is None else argv)
    resume = _flag_value(argv, "--resume")
    if resume is not None:
        saved = load_checkpoint(resume)["args"]
        known = {f.name for f in fields(Args)}
        args = tyro.cli(Args, args=argv, default=Args(**{k: v for k, v in saved.items() if k in known}))
        changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (checkpoint {saved[k]})"
                   for k in sorted(known - SCHEDULE_FLAGS)
                   if k in saved and getattr(args, k) != saved[k]]
        if changed:
            raise SystemExit("error: --resume: these flags differ from the checkpoint's and change the "
                             f"algorithm: {', '.join(changed)}; drop them or start a new run")
        return args
    preset = _flag_value(argv, "--preset") or "paper"
    default = preset_args(preset) if preset in ("paper", *PRESETS) else Args()
    return tyro.cli(Args, args=argv, default=default)


def action_repeat(args: Args) -> int:
    """--action-repeat, else 2 for every DMC-family task (official configs.yaml dmc: action_repeat
    2; PlaNet's per-task values 4/8 are not DreamerV2's), else the env's default."""
    if args.action_repeat:
        return args.action_repeat
    if args.action_repeat is None and args.env.partition("-")[0] in ("dmc", "dcs", "natural"):
        return 2
    return envs.default_action_repeat(args.env)



# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


def glorot_init(module: nn.Module):
    """The official initialisation (Keras defaults): Glorot-uniform weights, zero biases. Glorot's
    bound depends on fan_in + fan_out only, so PyTorch's transposed-conv fan order does not matter."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


class MLP(nn.Sequential):
    """`layers` hidden ELU layers of `units`, then a linear output. The output layer runs in fp32
    also under bf16 autocast: rewards, values and action parameters feed returns and log-probs."""

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
        x = self.linear(feat).reshape(-1, 32 * self.depth)
        # The first transposed conv sees a 1x1 input, where it is exactly a matmul:
        # out[n, o, i, j] = sum_c x[n, c] W[c, o, i, j] + b[o]. Written as one (same parameters),
        # it is one GEMM instead of a convolution, and torch.compile's inductor no longer crashes
        # in this conv's backward (a stride assertion, results/speed/h100-2026-11-23.md).
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


def sample_one_hot(logits: torch.Tensor) -> torch.Tensor:
    """One-hot sample of categoricals over the last axis with straight-through gradients
    (sample + p - sg(p)). argmax(p / E), E ~ Exp(1), is what torch.multinomial does for one sample
    (the same draws as OneHotCategoricalStraightThrough.rsample()), minus its validity check, which
    copies a flag to the host: a GPU sync per RSSM step."""
    probs = torch.softmax(logits.float(), -1)
    index = (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)
    return one_hot(index, probs.shape[-1]) + (probs - probs.detach())


def categorical_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of the independent categoricals (…, stoch, classes), summed over the variables:
    (…). fp32, written out (torch's version masks with data-dependent indexing, a host sync)."""
    log_p, log_q = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum((-2, -1))


def categorical_entropy(logits: torch.Tensor) -> torch.Tensor:
    log_p = F.log_softmax(logits.float(), -1)
    return -(log_p.exp() * log_p).sum((-2, -1))


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
        return self._stochastic(self.obs_out(torch.cat([deter, embed], -1)), deter)

    def observe(self, embed: torch.Tensor, action: torch.Tensor):
        """Filter a sequence from the zero state: the same posteriors as calling `obs_step` for
        t = 0..T-1. embed (T, B, E); action (T, B, A) is a_{t-1}, the action that led to observation
        t. Returns posteriors (deter, stoch, logits) and priors (deter, logits) as dicts of (T, B, ...).

        Speed: only what depends on h_t stays in the loop. The posterior's first layer
        W [h_t; e_t] + b is split into W_h h_t + (W_e e_t + b); the embedding part, and the whole
        prior network p(z_t | h_t), run once over all T*B steps (a few large matmuls instead of T
        small ones)."""
        first = self.obs_out[0]
        embed_part = F.linear(embed, first.weight[:, self.deter:], first.bias)  # (T, B, hidden)
        state = self.initial(embed.shape[1], embed.device)
        deters, stochs, logits = [], [], []
        for t in range(embed.shape[0]):
            deter = self._recurrent(state, action[t])
            hidden = self.obs_out[1](F.linear(deter, first.weight[:, :self.deter]) + embed_part[t])
            state = self._stochastic(self.obs_out[2](hidden), deter)
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

    def forward(self, feat: torch.Tensor) -> td.Distribution:
        out = self.net(feat)  # fp32
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


class WorldModel(nn.Module):
    def __init__(self, args: Args, action_dim: int):
        super().__init__()
        self.encoder = Encoder(args.cnn_depth)
        self.rssm = RSSM(self.encoder.out_dim, action_dim, args.deter, args.hidden, args.stoch,
                         args.classes)
        feat = self.rssm.feat_dim
        self.decoder = Decoder(feat, args.cnn_depth)
        self.reward = MLP(feat, 1, args.mlp_units, args.mlp_layers)
        self.discount = MLP(feat, 1, args.mlp_units, args.mlp_layers) if args.pred_discount else None
        if args.init == "glorot":
            self.apply(glorot_init)


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
# Replay buffer
# ---------------------------------------------------------------------------------------------

# Index conventions, in the paper's notation (stated once; every slicing site names what it picks).
# Replay: slot t of an episode, and step t of a sampled sequence (T, B), holds
#     x_t (obs), a_{t-1} (action: the one that led to x_t; zeros at t = 0), r_t (reward: received
#     on arriving at x_t; 0 at t = 0), cont_t (0 if the episode terminated at x_t), is_first_t.
#   so the RSSM's step t reads (h_{t-1}, z_{t-1}, action[t] = a_{t-1}, x_t) and the reward head at
#   the model state (h_t, z_t), written z_t below, is trained on reward[t] = r_t.
# Imagination from a start state z_0 (each posterior state of the batch, N = T * B of them):
#     feats[t] = z_t for t = 0..H (H + 1 of them); actions[t] = a_t ~ pi(a | z_t) for t = 0..H-1,
#     which leads to z_{t+1}; reward[t] = r_t = E p(r | z_t); value[t] = v(z_t), the slow critic.
# Lambda-return: lambda_return(reward[:-1], value[:-1], discount[:-1], bootstrap=value[-1]) is
#     target[t] = V_t for t = 0..H-1: V_t = r_t + gamma ((1 - lambda) v(z_{t+1}) + lambda V_{t+1}),
#     V_H = v(z_H). The actor is credited for a_t (t = 0..H-2) with V_{t+1}, the return of the
#     state its action leads to (official agent.py); the critic regresses v(z_t) on V_t.


class Replay:
    """Whole episodes in a flat ring of uint8 images; sampling of in-episode sequences, uniform or
    with episode ends preferred (`prioritize_ends`).

    Slot t of an episode holds obs_t, the action a_{t-1} that led to it (zeros at t = 0), the
    reward r_t received on arriving there (0 at t = 0), cont_t = 0 if the episode terminated
    there and is_first_t = 1 at t = 0. A sequence never crosses an episode boundary, so the RSSM
    starts each one from zeros. (Index conventions: the comment above.)

    Speed: the arrays are torch tensors on `device`; on a GPU the images never cross the bus
    again after they are stored, and sampling is one gather on the device (start indices are drawn
    with numpy on the host and sent as one small tensor). The arrays are allocated once, at the
    capacity the run can fill (`replay_slots`): growing them by doubling held the old and the new
    block at once (1.5x at peak) and left the old one in the CUDA cache.
    """

    def __init__(self, capacity: int, obs_shape, action_dim: int, seed: int, device="cpu",
                 prioritize_ends: bool = False):
        self.capacity, self.device = capacity, torch.device(device)
        self.prioritize_ends = prioritize_ends
        self.shapes = dict(obs=tuple(obs_shape), action=(action_dim,), reward=(), cont=(), is_first=())
        self.dtypes = dict(obs=torch.uint8, action=torch.float32, reward=torch.float32,
                           cont=torch.float32, is_first=torch.float32)
        self.data = {k: torch.empty((capacity, *s), dtype=self.dtypes[k], device=self.device)
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
        for key, value in zip(("obs", "action", "reward", "cont", "is_first"),
                              (obs, action, reward, cont, is_first)):
            value = torch.as_tensor(np.asarray(value)).to(self.device, self.dtypes[key])
            self.data[key][index] = value.reshape(n, *self.shapes[key])
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
        """Tensors on the replay's device, time-major: obs (T, B, 3, H, W) uint8, action (T, B, A),
        reward, cont, is_first (T, B)."""
        starts = self.draw_starts(batch, length)
        idx = (starts[None, :] + np.arange(length)[:, None]) % self.capacity  # (T, B)
        index = to_device_async(idx, self.device)
        return {key: value[index] for key, value in self.data.items()}

    def state_dict(self) -> dict:
        keep = slice(0, self.size)  # a copy of the filled part (a view saves the whole storage)
        return dict(**{k: v[keep].to("cpu", copy=True) for k, v in self.data.items()},
                    episode=self.episode[keep],
                    pos=self.pos, size=self.size, episodes=self.episodes,
                    rng=self.rng.bit_generator.state)

    def load_state_dict(self, state: dict):
        n = state["size"]
        for key in self.data:
            self.data[key][:n] = torch.as_tensor(state[key]).to(self.device)
        self.episode[:n] = state["episode"]
        self.pos, self.size, self.episodes = state["pos"], n, state["episodes"]
        self.rng.bit_generator.state = state["rng"]
        self._starts_length = None


def to_torch(batch: dict, device: torch.device) -> dict:
    """Batch (tensors or numpy arrays) -> tensors on `device`; images stay uint8 (4x less to copy)."""
    return {k: torch.as_tensor(v).to(device, non_blocking=True) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------
# World-model objective
# ---------------------------------------------------------------------------------------------


def gaussian_nll(mean: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-ln N(target | mean, 1), elementwise, fp32 (written out: td.Normal(mean, 1.0) would copy the
    Python scale to the GPU, a host sync, on every call)."""
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


def world_model_loss(wm: WorldModel, batch: dict, args: Args):
    """Eq. 2: image and reward negative log-likelihoods + beta * balanced KL. batch is time-major."""
    embed = wm.encoder(batch["obs"])  # (T, B, E)
    # The action into the first step of an episode is zero (official RSSM.obs_step with is_first;
    # the replay already stores zeros there, this keeps it so for any batch).
    action = batch["action"]  # action[t] = a_{t-1}, zeros at an episode start
    if "is_first" in batch:
        action = action * (1 - batch["is_first"])[..., None]
    post, prior = wm.rssm.observe(embed, action)
    feat = wm.rssm.feat(post)  # (T, B, F)
    target = batch["obs"].float() / 255.0 - 0.5
    image_nll = gaussian_nll(wm.decoder(feat), target).sum((-3, -2, -1)).mean()
    reward_nll = gaussian_nll(wm.reward(feat).squeeze(-1), batch["reward"]).mean()  # p(r_t | s_t)
    kl_loss, kl_value = kl_balance(post["logits"], prior["logits"], args.kl_balance, args.free_nats)
    loss = image_nll + args.reward_scale * reward_nll + args.kl_scale * kl_loss
    metrics = dict(image_loss=image_nll, reward_loss=reward_nll, kl_loss=kl_loss,
                   kl=kl_value.mean(),
                   prior_entropy=categorical_entropy(prior["logits"]).mean().detach(),
                   post_entropy=categorical_entropy(post["logits"]).mean().detach())
    if wm.discount is not None:
        # The discount head predicts episode continuation (Bernoulli), scaled by gamma when used.
        discount_nll = F.binary_cross_entropy_with_logits(wm.discount(feat).squeeze(-1),
                                                          batch["cont"].float())
        loss = loss + discount_nll
        metrics["discount_loss"] = discount_nll
    metrics["model_loss"] = loss
    return loss, post, metrics


# ---------------------------------------------------------------------------------------------
# Behaviour learning in imagination
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
    return actor_loss, critic_loss, metrics


# ---------------------------------------------------------------------------------------------
# Agent: one update, acting, evaluation
# ---------------------------------------------------------------------------------------------


# The names of the per-update non-finite flags (`metrics["nonfinite"]`, read by NonFiniteWatch).
LOSS_NAMES = ("model_loss", "actor_loss", "critic_loss")


class Agent:
    """The world model, the actor and the critic, their optimisers, one training step, acting."""

    def __init__(self, args: Args, action_dim: int, discrete: bool, device: torch.device):
        self.args, self.device, self.discrete, self.action_dim = args, device, discrete, action_dim
        self.wm = WorldModel(args, action_dim).to(device)
        self.ac = ActorCritic(args, self.wm.rssm.feat_dim, action_dim, discrete).to(device)
        # One Adam per network, with DreamerV2's clip and weight decay (configs.yaml *_opt).
        opt = dict(eps=args.adam_eps, clip=args.grad_clip, weight_decay=args.weight_decay)
        self.model_opt = Optimizer("model", self.wm.parameters(), args.model_lr, **opt)
        self.actor_opt = Optimizer("actor", self.ac.actor.parameters(), args.actor_lr, **opt)
        self.critic_opt = Optimizer("critic", self.ac.critic.parameters(), args.critic_lr, **opt)
        self.updates = 0
        # Once an update has a non-finite loss, every later one is skipped too (a device flag):
        # the main loop reads the flags one update late on a GPU, without waiting for the GPU.
        self.halted = torch.zeros((), device=device)
        self.model_loss, self.behaviour_losses = self._model_loss, self._behaviour_losses
        self.cudagraphs = args.compile and args.compile_mode == "reduce-overhead"
        if args.compile:
            # Speed: each loss function compiled as a whole, the observe and imagine loops unrolled
            # into one graph each (fixed shapes), so an update is a few fused kernels instead of
            # thousands of small launches. Parameters stay the same modules: checkpoints unchanged.
            mode = {"default": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(
                args.compile_mode, args.compile_mode)
            self.model_loss = torch.compile(self._model_loss, dynamic=False, mode=mode)
            self.behaviour_losses = torch.compile(self._behaviour_losses, dynamic=False, mode=mode)

    def _model_loss(self, batch: dict):
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.args.precision == "bf16"):
            return world_model_loss(self.wm, batch, self.args)

    def _behaviour_losses(self, post: dict):
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.args.precision == "bf16"):
            return behaviour_losses(self.wm, self.ac, post, self.args, self.discrete)

    def update(self, batch: dict) -> dict:
        """One training step of the paper's Algorithm 1: world-model learning on a replayed batch
        (Eq. 2), then behaviour learning in imagination from its posterior states (Eqs. 5, 6).
        Returns device tensors: the metrics and `nonfinite`, one flag per name in LOSS_NAMES. A
        non-finite world-model step skips the whole update, and every later one (`halted`)."""
        cudagraph_step(self.cudagraphs)
        model_loss, post, metrics = self.model_loss(batch)
        metrics |= self.model_opt(model_loss, skip=self.halted)
        post, metrics = outlive_step(post, self.cudagraphs), outlive_step(metrics, self.cudagraphs)

        cudagraph_step(self.cudagraphs)
        with frozen(self.wm):  # the actor's gradient flows through the model; no model weight learns
            actor_loss, critic_loss, behaviour_metrics = self.behaviour_losses(post)
        # One backward pass of the sum (a compiled graph is backpropagated once): each network's
        # gradient is its own loss's (the critic loss sees detached features and targets).
        backward(actor_loss + critic_loss, self.actor_opt, self.critic_opt)
        metrics |= self.actor_opt.step(actor_loss, self.model_opt.skipped)
        metrics |= self.critic_opt.step(critic_loss, self.model_opt.skipped)
        metrics |= outlive_step(behaviour_metrics, self.cudagraphs)
        if self.updates % self.args.target_update_every == 0:
            self.update_slow_critic(copied=1 - self.critic_opt.skipped)
        self.updates += 1
        flags = [self.model_opt.flag, self.actor_opt.flag, self.critic_opt.flag]
        metrics["nonfinite"] = torch.stack(flags)  # in the order of LOSS_NAMES
        self.halted = torch.maximum(self.halted, metrics["nonfinite"].max())
        return metrics

    @torch.no_grad()  # in place and outside autograd: the slow critic carries no history
    def update_slow_critic(self, copied: torch.Tensor):
        """Copy the critic into the slow critic of Eq. 5: lerp weight `copied` = 1 copies exactly,
        0 (after a skipped critic step) leaves it as it was; a device tensor, no host sync."""
        lerp_(list(self.ac.target_critic.parameters()), list(self.ac.critic.parameters()), copied)

    @torch.no_grad()
    def act(self, obs: np.ndarray, state, explore: bool):
        """One filtering step and an action. state = (latent, previous action) or None."""
        if state is None:
            latent = self.wm.rssm.initial(1, self.device)
            prev = torch.zeros(1, self.action_dim, device=self.device)
        else:
            latent, prev = state
        obs_t = torch.as_tensor(obs, device=self.device)[None]
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.args.precision == "bf16"):
            # Latents are sampled in evaluation too (official eval_state_mean=False); only the
            # action is the mode.
            latent = self.wm.rssm.obs_step(latent, prev, self.wm.encoder(obs_t))
            dist = self.ac.actor(self.wm.rssm.feat(latent))
        action = dist.sample() if explore else mode(dist, self.args.eval_action)
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


def evaluate(agent: Agent, env, seeds: list, discrete: bool, record: bool = False, stop=lambda: False):
    """Mean return of one episode per seed with mode actions; frames of the first if `record`.
    Returns (None, frames) if `stop()` turns true (an interrupt) before the episodes are done."""
    returns, frames = [], []
    for ep, seed in enumerate(seeds):
        obs, _ = env.reset(seed=seed)
        state, total, done = None, 0.0, False
        while not done:
            if record and ep == 0:
                frames.append(obs.transpose(1, 2, 0))
            action, state = agent.act(obs, state, explore=False)
            obs, reward, terminated, truncated, _ = env.step(env_action(action, discrete))
            total += reward
            done = terminated or truncated
            if stop():
                return None, frames
        returns.append(total)
    return float(np.mean(returns)), frames



def synthetic_batch(args: Args, action_dim: int, device: torch.device) -> dict:
    T, B = args.batch_length, args.batch_size
    return dict(obs=torch.randint(0, 255, (T, B, 3, 64, 64), dtype=torch.uint8, device=device),
                action=torch.rand(T, B, action_dim, device=device) * 2 - 1,
                reward=torch.rand(T, B, device=device), cont=torch.ones(T, B, device=device),
                is_first=torch.zeros(T, B, device=device))


def measure_speed(args: Args, device: torch.device) -> dict:
    """Speed benchmark. Updates: median seconds per update over `args.measure_updates` updates
    (after 2 warm-ups) on a random batch of the configured size (model and optimisers only, no
    env, no replay). Acting: env steps per second of the acting loop (policy step + env step,
    exploration actions) over 50 agent steps on `args.env`."""
    configure_torch(args, device)
    env = envs.make(args.env, distraction=args.distraction, dynamic=args.dynamic, seed=args.seed,
                    image_size=64, action_repeat=action_repeat(args), video_dir=args.video_dir)
    discrete = hasattr(env.action_space, "n")
    action_dim = env.action_space.n if discrete else env.action_space.shape[0]
    agent = Agent(args, action_dim, discrete, device)
    batch = synthetic_batch(args, action_dim, device)
    times = []
    for i in range(args.measure_updates + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        agent.update(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
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
    result = dict(seconds_per_update=float(np.median(times[2:])), updates=len(times) - 2,
                  parameters=agent.num_parameters(), env=args.env,
                  env_steps_per_second=env_steps / acting_time, policy_ms=1000 * policy_time / 50,
                  device=str(device), precision=args.precision, compile=args.compile)
    if args.compile:
        result["compile_seconds"] = times[0]  # the first update compiles both loss functions
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
    checkpoint = load_checkpoint(args.resume) if args.resume else None
    device = resolve_device(args.device)
    replay_on = replay_device(args, device)
    configure_torch(args, device)
    seed_everything(args.seed)

    repeat = action_repeat(args)
    make = lambda split: envs.make(args.env, distraction=args.distraction,  # noqa: E731
                                   dynamic=args.dynamic, seed=args.seed, image_size=64,
                                   action_repeat=repeat, split=split, video_dir=args.video_dir)
    try:  # bad input (env id, distraction, video folder) ends here with a message, not a traceback
        env, eval_env = make("train"), make(args.eval_split)
    except ValueError as error:
        raise SystemExit(f"error: {error}")
    run_name = f"{args.env}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.resume).parent if args.resume else Path("runs") / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    discrete = hasattr(env.action_space, "n")
    action_dim = env.action_space.n if discrete else env.action_space.shape[0]

    agent = Agent(args, action_dim, discrete, device)
    replay = Replay(replay_slots(args.replay_capacity, args.total_steps, repeat, args.batch_length),
                    env.observation_space.shape,
                    action_dim, args.seed, replay_on, args.prioritize_ends)
    counters = dict(env_steps=0, agent_steps=0, episodes=0, next_eval=args.eval_every,
                    last_eval=-1, eval_rounds=0, pretrain_updates=0)
    if checkpoint is not None:
        agent.load_state_dict(checkpoint["agent"])
        counters.update(checkpoint["counters"])
        load_replay(args.resume, checkpoint, replay, counters)
        seed_everything(args.seed, checkpoint["rng"])  # after the networks are built: as saved
    logger = Logger(run_dir, args, counters["env_steps"] if checkpoint is not None else None)
    interrupt = StopFlag()

    params = agent.num_parameters()
    ratio = args.updates_per_step * args.batch_size * args.batch_length / args.train_every
    print(f"run {run_dir} | device {device} | {params / 1e6:.1f}M parameters | action repeat {repeat} | "
          f"replay {replay.capacity:,} agent steps on {replay_on}, up to "
          f"{replay.nbytes / 2**30:.2f} GiB (allocated once) | replay ratio {ratio:.0f} "
          f"replayed steps per agent step | videos: {envs.video_source(args.env, args.distraction, args.video_dir)}", flush=True)
    print(f"preset {args.preset}: {preset_overrides(args)}", flush=True)
    if checkpoint is not None:
        print(f"resumed from {args.resume} at env step {counters['env_steps']} (the interrupted "
              "episode was stored as truncated; a new episode starts)", flush=True)
    ckpt_path = run_dir / "checkpoint.pt"
    progress = Progress(args, counters, args.updates_per_step / args.train_every)
    last_return, metrics = float("nan"), {}
    # Each update's non-finite flags, read late: on a GPU the newest update stays unread, so that
    # the next one is queued while the GPU still runs it (the agent's `halted` flag makes it a no-op
    # if needed).
    watch = NonFiniteWatch(LOSS_NAMES)

    def finish():
        interrupt.restore()
        env.close()
        eval_env.close()
        logger.close()

    def write_checkpoint(with_replay: bool):
        """checkpoint.pt, and replay.pt if `with_replay` (see save_checkpoint)."""
        save_checkpoint(ckpt_path, agent, replay if with_replay else None, counters, args)

    def check_finite(keep: int = 0):
        """Read the flags of all but the newest `keep` updates; stop on a non-finite loss."""
        bad = watch.first_bad(keep)
        if bad is None:
            return
        names, update, step = bad
        # that update (and any after it) was skipped: parameters from before it
        write_checkpoint(with_replay=True)
        finish()
        raise SystemExit(f"error: non-finite {', '.join(names)} at update {update} (env step "
                         f"{step}); checkpoint from before it: {ckpt_path}")

    compiled = [not args.compile]

    def train_once():
        nonlocal metrics
        check_finite(keep=1 if device.type == "cuda" else 0)
        batch = to_torch(replay.sample(args.batch_size, args.batch_length), device)
        start = time.perf_counter()
        metrics = agent.update(batch)
        watch.push(metrics["nonfinite"], agent.updates, counters["env_steps"])
        if not compiled[0]:  # the first update of this process compiles (also after a resume)
            compiled[0] = True
            check_finite()  # waits for the first update: its wall time is the compile time
            print(f"compiled in {time.perf_counter() - start:.1f} s", flush=True)
        else:
            progress.update_time += time.perf_counter() - start
            progress.updates += 1

    def stop(episode: dict):
        """Interrupted: store the episode so far as truncated, checkpoint, exit 130/143."""
        check_finite()
        if len(episode["reward"]) >= 2:
            replay.add_episode(*(np.asarray(episode[k]) for k in ("obs", "action", "reward", "cont")))
            counters["episodes"] += 1
        write_checkpoint(with_replay=True)
        print(f"interrupted at step {counters['env_steps']}; resume with: python "
              f"{os.path.basename(__file__)} --resume {ckpt_path}", flush=True)
        finish()
        sys.exit(128 + interrupt.signum)

    def run_eval():
        """Evaluation round e: episode j is reset with episode_seed(seed, 'eval', e * 10000 + j), so
        it is reproducible after a resume without storing the eval env's RNG. None if interrupted."""
        check_finite()
        seeds = [episode_seed(args.seed, "eval", counters["eval_rounds"] * 10_000 + j)
                 for j in range(args.eval_episodes)]
        ret, frames = evaluate(agent, eval_env, seeds, discrete, args.capture_video,
                               stop=lambda: interrupt.signum is not None)
        if ret is None:
            return None
        logger.log(counters["env_steps"], {"eval/episodic_return": ret})
        if frames:
            save_video(frames, run_dir / "videos" / f"eval_{counters['env_steps']}.mp4")
            strip = np.concatenate(frames[:: max(1, len(frames) // 8)][:8], axis=1)
            logger.writer.add_image("eval/frames", strip, counters["env_steps"], dataformats="HWC")
        print(f"eval at {counters['env_steps']}: return {ret:.1f}", flush=True)
        counters["last_eval"], counters["eval_rounds"] = counters["env_steps"], counters["eval_rounds"] + 1
        while args.eval_every and counters["next_eval"] <= counters["env_steps"]:
            counters["next_eval"] += args.eval_every
        if args.save_model:
            write_checkpoint(with_replay=replay_due(args, counters["eval_rounds"], counters))
        return ret

    def new_episode():
        obs, _ = env.reset(seed=episode_seed(args.seed, "train", counters["episodes"]))
        return obs, dict(obs=[obs], action=[np.zeros(action_dim, np.float32)], reward=[0.0], cont=[1.0])

    obs, ep = new_episode()
    state, episode_return = None, 0.0
    phase = lambda: "prefill" if counters["agent_steps"] < args.prefill else "train"  # noqa: E731
    pretrain_left = lambda: max(args.pretrain - counters["pretrain_updates"], 0)  # noqa: E731
    progress.maybe_print(counters, phase(), last_return, agent.updates)
    while counters["env_steps"] < args.total_steps:
        start = time.perf_counter()
        if counters["agent_steps"] < args.prefill:
            action = (np.eye(action_dim, dtype=np.float32)[np.random.randint(action_dim)] if discrete
                      else np.random.uniform(-1, 1, action_dim).astype(np.float32))
        else:
            action, state = agent.act(obs, state, explore=True)
        obs, reward, terminated, truncated, info = env.step(env_action(action, discrete))
        progress.acting_time += time.perf_counter() - start
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
            (obs, ep), state, episode_return = new_episode(), None, 0.0
        if interrupt.signum:
            stop(ep)

        # Train: once `prefill` steps are in, `pretrain` updates, then every `train_every` steps.
        if counters["agent_steps"] >= args.prefill and replay.can_sample(args.batch_length):
            if counters["pretrain_updates"] < args.pretrain:
                while counters["pretrain_updates"] < args.pretrain:
                    train_once()
                    counters["pretrain_updates"] += 1
                    progress.maybe_print(counters, "pretrain", last_return, agent.updates,
                                         pending_updates=pretrain_left())
                    if interrupt.signum:
                        stop(ep)
            elif counters["agent_steps"] % args.train_every == 0:
                for _ in range(args.updates_per_step):
                    train_once()

        crossed = counters["env_steps"] // args.log_every != (counters["env_steps"] - info["env_steps"]) // args.log_every
        if crossed:
            logs = {f"losses/{k}": v for k, v in metrics.items() if k != "nonfinite"}
            logs.update({"charts/SPS": progress.sps(counters), "charts/updates": agent.updates})
            logger.log(counters["env_steps"], logs)
        progress.maybe_print(counters, phase(), last_return, agent.updates, force=crossed,
                             pending_updates=pretrain_left())
        if args.eval_every and counters["env_steps"] >= counters["next_eval"]:
            if run_eval() is None:
                stop(ep)

    if counters["last_eval"] != counters["env_steps"] and run_eval() is None:
        stop(ep)
    check_finite()
    finish()
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
