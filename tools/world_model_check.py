"""How well a trained Dreamer-family agent's world model and critic predict what really happens.

    MUJOCO_GL=egl python tools/world_model_check.py <run>/checkpoint.pt [--episodes 3] [--horizon 15]

For `dreamerv2.py`, `dreamingv2.py` and `blast.py` checkpoints (their agents share `wm.rssm`,
`wm.reward`, `ac.actor`, `ac.critic` and `act`). It plays evaluation episodes with the mode
actions, as the scripts' `evaluate` does, keeps the posterior state z_t of every step, and
compares, over every start t with H real steps after it:

- reward, one step: the reward head at the posterior z_{t+1} against the reward r_t that a_t got;
- reward, open loop: the prior rolled H steps from z_t with the actions really taken; the sum of
  predicted rewards against the real sum r_t + ... + r_{t+H-1};
- imagined return: the prior rolled H steps from z_t under the actor's own mode actions (what the
  behaviour learner optimises, without its sampling); predicted sum against the same real sum
  (the real episode followed the same policy);
- value: the critic v(z_t) against the real discounted return of the rest of the episode plus
  gamma^(T-t) v(z_T) (the critic has no episode end; the bootstrap is reported separately);
- state probe (DeepMind Control tasks): how much of the true physical state the posterior feature
  holds. A ridge regression from the feature of z_t to the task's state observation at t
  (for cartpole: cart position, cos and sin of the pole angle, cart and pole velocities), fit
  on the even episodes and scored (R^2 per state variable) on the odd ones. A model that cannot
  tell the pole's angular velocity cannot plan the balance.

With `--policy random` the episodes are played with uniform random actions instead, and with
`--policy <other checkpoint.pt>` by another run's agent (mode actions); the model filters the
actions really taken. The same data for every checkpoint, so models whose own policies visit
different states can be compared; only the two reward measures apply then.

Prints one JSON object: per measure the mean prediction, the mean real value, the mean absolute
error and the correlation over all starts.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("dreamerv2", "dreamingv2", "blast")


def load_agent(path: str, script: str | None, scripts: tuple = SCRIPTS):
    """(module, args, checkpoint) of a checkpoint written by one of `scripts` (its `exp_name`, or
    `script` where the run was renamed). Checkpoints keep the algorithm's flags in `args` and the
    run settings in `settings` (earlier versions: all flags in `args`)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    saved = {**checkpoint.get("settings", {}), **checkpoint["args"]}
    name = script or saved.get("exp_name")
    if name not in scripts:
        raise SystemExit(f"error: {path}: a checkpoint of {name!r}; this check reads {', '.join(scripts)}"
                         " (pass --script if the run was renamed with --exp-name)")
    sys.path.insert(0, str(ROOT))
    module = importlib.import_module(name)
    fields = set(module.Args.__dataclass_fields__)
    args = module.Args(**{k: v for k, v in saved.items() if k in fields})
    return module, args, checkpoint


def eval_env(module, args):
    """The environment a run's evaluations use: the script's own `make_env` on its eval split."""
    return module.make_env(args, getattr(args, "eval_split", "val"))


def build_agent(module, args, checkpoint: dict, action_space):
    """The checkpoint's trained agent on the CPU, built as the script builds it."""
    compute = module.Compute(module.RunSettings(device="cpu"), args.seed)
    agent = module.Agent(args, action_space, compute)
    agent.load_state_dict(checkpoint["agent"])
    return agent


def compare(pred, real) -> dict:
    pred, real = np.asarray(pred, float), np.asarray(real, float)
    corr = float(np.corrcoef(pred, real)[0, 1]) if pred.std() > 0 and real.std() > 0 else float("nan")
    return dict(predicted=round(float(pred.mean()), 3), real=round(float(real.mean()), 3),
                mean_abs_error=round(float(np.abs(pred - real).mean()), 3),
                correlation=round(corr, 3), n=int(pred.size))


def batch_states(states: list) -> dict:
    """Latent states of batch 1 (one per step) as one batch: dict of (N, ...)."""
    return {key: torch.cat([state[key] for state in states]) for key in states[0]}


def physical_state(env) -> dict | None:
    """The DeepMind Control task's state observation of the current physics, one float64 entry per
    variable ('position[0]', ..., 'velocity[1]' for cartpole), or None for envs without one."""
    base = env.unwrapped
    task = getattr(getattr(base, "_env", None), "task", None)
    if task is None or not hasattr(task, "get_observation"):
        return None
    return {f"{key}[{i}]": float(x) for key, value in task.get_observation(base.physics).items()
            for i, x in enumerate(np.asarray(value, float).ravel())}


def ridge_r2(train_x, train_y, test_x, test_y, penalty: float = 1.0) -> np.ndarray:
    """R^2 on (test_x, test_y) of a ridge regression fit on (train_x, train_y), one per column of
    y; inputs standardised with the training statistics, `penalty` per standardised feature."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    x, tx = (train_x - mean) / std, (test_x - mean) / std
    x, tx = np.c_[x, np.ones(len(x))], np.c_[tx, np.ones(len(tx))]
    reg = penalty * np.eye(x.shape[1])
    reg[-1, -1] = 0.0  # no penalty on the intercept
    w = np.linalg.solve(x.T @ x + reg, x.T @ train_y)
    sse = ((tx @ w - test_y) ** 2).sum(0)
    sst = ((test_y - test_y.mean(0)) ** 2).sum(0)
    return 1.0 - sse / np.maximum(sst, 1e-12)


def predicted_sums(wm, actor, start: dict, actions, horizon: int, mode) -> torch.Tensor:
    """Summed predicted rewards of `horizon` prior steps from each of the N start states, all
    rolled at once: actions (H, N, A), or None for the actor's mode actions. Returns (N,)."""
    state, total = start, 0.0
    for k in range(horizon):
        action = mode(actor(wm.rssm.feat(state))) if actions is None else actions[k]
        state = wm.rssm.img_step(state, action)
        total = total + wm.reward(wm.rssm.feat(state)).squeeze(-1)
    return total


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--horizon", type=int, default=15)
    parser.add_argument("--script", choices=SCRIPTS, default=None)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--policy", default="agent",
                        help="who acts: 'agent' (its mode actions), 'random' (uniform) or the path "
                             "of another checkpoint.pt whose agent acts")
    opts = parser.parse_args(argv)
    module, args, checkpoint = load_agent(opts.checkpoint, opts.script)
    env = eval_env(module, args)
    discrete = hasattr(env.action_space, "n")
    action_dim = env.action_space.n if discrete else env.action_space.shape[0]
    agent = build_agent(module, args, checkpoint, env.action_space)
    actor = None  # another run's agent that plays the episodes
    if opts.policy not in ("agent", "random"):
        other, other_args, other_checkpoint = load_agent(opts.policy, None)
        if other_args.env != args.env:
            raise SystemExit(f"error: --policy {opts.policy}: an agent for {other_args.env}, not {args.env}")
        actor = build_agent(other, other_args, other_checkpoint, env.action_space)
    torch.manual_seed(opts.seed)  # the prior's samples: the same numbers on every run
    wm, ac, H, gamma = agent.wm, agent.ac, opts.horizon, args.gamma
    wm.eval()
    rows = {k: ([], []) for k in ("reward_one_step", "reward_open_loop", "imagined_return",
                                  "value")}
    returns, bootstraps = [], []
    probe = {"feat": [[], []], "state": [[], []]}  # [even episodes, odd episodes]
    rng = np.random.default_rng(opts.seed)
    for episode in range(opts.episodes):
        obs, _ = env.reset(seed=opts.seed + episode)
        state, other_state, done, latents, actions, rewards = None, None, False, [], [], []
        physics = [physical_state(env)]  # the state that obs_t shows, aligned with z_t
        while not done:
            action, state = agent.act(obs, state, explore=False)
            if actor is not None:
                action, other_state = actor.act(obs, other_state, explore=False)
            elif opts.policy == "random":
                action = (np.eye(action_dim, dtype=np.float32)[rng.integers(action_dim)] if discrete
                          else rng.uniform(-1, 1, action_dim).astype(np.float32))
            state = (state[0], torch.as_tensor(action, dtype=torch.float32)[None])  # the action taken
            latents.append(state[0])
            actions.append(state[1])
            obs, reward, terminated, truncated, _ = env.step(module.env_action(action, env.action_space))
            rewards.append(float(reward))
            physics.append(physical_state(env))
            done = terminated or truncated
        # z_T: the posterior of the last observation (the action chosen there is not taken)
        latents.append(agent.act(obs, state, explore=False)[1][0])
        T, r = len(rewards), np.asarray(rewards)
        z, a = batch_states(latents), torch.cat(actions)  # z_0..z_T, a_0..a_{T-1}
        feat = wm.rssm.feat(z)
        reward_hat = wm.reward(feat).squeeze(-1).numpy()
        value = ac.critic(feat).squeeze(-1).numpy()
        if physics[0] is not None:
            probe["feat"][episode % 2].append(feat.numpy())
            probe["state"][episode % 2].append(np.array([list(p.values()) for p in physics]))
        returns.append(r.sum())
        bootstraps.append(value[T])
        to_go, real_value = value[T], np.empty(T)  # sum_k gamma^k r_{t+k} + gamma^(T-t) v(z_T)
        for t in reversed(range(T)):
            to_go = real_value[t] = r[t] + gamma * to_go
        rows["reward_one_step"][0].extend(reward_hat[1:])  # the head at z_{t+1} predicts r_t
        rows["reward_one_step"][1].extend(r)
        rows["value"][0].extend(value[:T])
        rows["value"][1].extend(real_value)
        N = T - H + 1  # starts with H real steps after them
        if N > 0:
            starts = {key: x[:N] for key, x in z.items()}
            real = np.convolve(r, np.ones(H), "valid")  # r_t + ... + r_{t+H-1}
            taken = torch.stack([a[k:k + N] for k in range(H)])  # (H, N, A): a_{t+k}
            rows["reward_open_loop"][0].extend(predicted_sums(wm, ac.actor, starts, taken, H, module.mode).numpy())
            rows["reward_open_loop"][1].extend(real)
            if opts.policy == "agent":  # (its own policy: the real episode followed it)
                rows["imagined_return"][0].extend(predicted_sums(wm, ac.actor, starts, None, H, module.mode).numpy())
                rows["imagined_return"][1].extend(real)
    if opts.policy != "agent":  # the imagined return and the value are the agent's policy's
        del rows["imagined_return"], rows["value"]
    report = dict(checkpoint=str(opts.checkpoint), script=module.__name__, env=args.env,
                  policy=opts.policy, episodes=opts.episodes, horizon=H,
                  episode_returns=[round(float(x), 1) for x in returns],
                  **({} if opts.policy != "agent" else
                     dict(end_bootstrap_value=round(float(np.mean(bootstraps)), 2))),
                  **{k: compare(*v) for k, v in rows.items()})
    if probe["feat"][1]:  # at least two episodes of a task with a physical state
        fit, score = ([np.concatenate(probe[k][i]) for k in ("feat", "state")] for i in (0, 1))
        r2 = ridge_r2(*fit, *score)
        report["state_probe_r2"] = {name: round(float(v), 3) for name, v in zip(physics[0], r2)}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
