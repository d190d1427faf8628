"""What a trained agent does in its evaluation episodes: how often its actions sit at the bounds of
the action box, and where the task's physical state spends the episode.

    MUJOCO_GL=egl python tools/behaviour_check.py <run>/checkpoint.pt [--episodes 3]

Reads a checkpoint of any of the five scripts and plays evaluation episodes with the agent's mode
actions, as the scripts' evaluations do (CVRL plans with MPC where its run did), or with
`--actions explore` the actions its training episodes take (a sample of the policy; CVRL adds its
Gaussian exploration noise), or, for the Dreamer family's truncated-normal actor, with
`--actions mean` the distribution's mean (the scripts' `--eval-action mean`): deterministic like
the mode, but where the mode is the location clipped to the box (a full push once the tanh
saturates), the mean is the average of the samples the actor was trained with. The same networks
in all three, so the returns show how much of a score is the evaluation's choice of action.
Prints one JSON object:

- episode_returns;
- action_abs_mean: the mean |a| over all steps and action components (continuous actions lie in
  [-1, 1]; omitted for discrete actions, as the next);
- action_saturation: the fraction of those with |a| >= 0.95: near 1 the policy controls bang-bang,
  a full push one way or the other at every decision, which at a long action repeat (cartpole's 8:
  one decision per 0.08 s) can swing the pole up but cannot hold it;
- state_abs_mean (DeepMind Control tasks): per variable of the task's state observation, its mean
  absolute value over the episodes' steps (cartpole: position[0] the cart's position on its
  +-1.8 rail, position[1..2] cos and sin of the pole's angle, velocity[0..1] the cart's and the
  pole's velocities): a cart parked near the end of the rail, where the fixed camera loses it, or a
  pole kept spinning, shows here.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from world_model_check import build_agent, eval_env, load_agent, physical_state  # noqa: E402

SCRIPTS = ("dreamerv2", "dreamingv2", "blast", "cvrl", "core")


def load(path: str, script: str | None):
    """(module, args, env, agent, discrete) of a checkpoint written by one of SCRIPTS, on the CPU,
    with the environment its evaluations use."""
    module, args, checkpoint = load_agent(path, script, SCRIPTS)
    env = eval_env(module, args)
    discrete = hasattr(env.action_space, "n")
    return module, args, env, build_agent(module, args, checkpoint, env.action_space), discrete


@torch.no_grad()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--script", choices=SCRIPTS, default=None,
                        help="the script that wrote the checkpoint, for a run renamed with --exp-name")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--actions", choices=("mode", "explore", "mean"), default="mode",
                        help="the evaluation's mode (default), training's samples, or the "
                             "truncated normal's mean (dreamerv2, dreamingv2, blast)")
    opts = parser.parse_args(argv)
    module, args, env, agent, discrete = load(opts.checkpoint, opts.script)
    torch.manual_seed(opts.seed)  # after the agent is built (building seeds with the run's seed)
    if opts.actions == "mean" and (discrete or not hasattr(args, "eval_action")):
        sys.exit(f"--actions mean: {module.__name__}'s actor has no truncated-normal mean (the "
                 "Dreamer family's continuous actor has); use mode or explore")
    if hasattr(args, "eval_action"):  # what --eval-action makes the script's evaluations play;
        # --actions decides here, not the flag the run was trained with
        args.eval_action = "mean" if opts.actions == "mean" else "mode"
    to_env = module.env_action
    returns, actions, states = [], [], []
    try:
        for episode in range(opts.episodes):
            obs, _ = env.reset(seed=opts.seed + episode)
            state, done, total = None, False, 0.0
            while not done:
                action, state = agent.act(obs, state, explore=opts.actions == "explore")
                actions.append(np.asarray(action, float).ravel())
                physics = physical_state(env)
                if physics is not None:
                    states.append(physics)
                obs, reward, terminated, truncated, _ = env.step(to_env(action, env.action_space))
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
    finally:
        env.close()
    report = dict(checkpoint=str(opts.checkpoint), script=module.__name__, env=args.env,
                  actions=opts.actions, episodes=opts.episodes,
                  steps=len(actions),
                  episode_returns=[round(x, 1) for x in returns])
    if not discrete:
        magnitude = np.abs(np.concatenate(actions))
        report["action_abs_mean"] = round(float(magnitude.mean()), 3)
        report["action_saturation"] = round(float((magnitude >= 0.95).mean()), 3)
    if states:
        report["state_abs_mean"] = {key: round(float(np.mean([abs(s[key]) for s in states])), 3)
                                    for key in states[0]}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
