"""Shared test helpers: the repository root on sys.path, real-data collection, reference returns."""

import dataclasses
import os
import sys
from pathlib import Path

# `pytest -n 2` runs two workers on CI's 2 cores, and many tests start a script as a subprocess
# beside the other worker. With torch's default of one OpenMP thread per core that is four
# spinning threads on two cores: the Ctrl-C/resume test of core.py took 323 s in the suite
# (300 s is its timeout) and 58 s with one thread each. One thread per process (torch and
# Mesa's llvmpipe renderer), set before torch is imported and inherited by every subprocess;
# a value the caller exports wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("LP_NUM_THREADS", "1")

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import envs  # noqa: E402


# Python that counts its own starts in starts.txt of the working folder (`n`: this start's number);
# the crash-retry tests of benchmark.sh's local runner and Slurm array script start it.
COUNT_STARTS = ("from pathlib import Path\np = Path('starts.txt')\n"
                "n = int(p.read_text()) + 1 if p.exists() else 1\np.write_text(str(n))\n")


def collect_episodes(env_id: str, episodes: int, seed: int = 0, **make_kw):
    """Random-action episodes in the replay layout of the algorithm scripts: per episode
    (obs (T+1, 3, H, W) uint8, action a_{t-1} (T+1, A), reward r_t (T+1,), cont (T+1,))."""
    env = envs.make(env_id, seed=seed, **make_kw)
    rng = np.random.default_rng(seed)
    out = []
    try:
        for _ in range(episodes):
            obs, _ = env.reset()
            dim = env.action_space.shape[0]
            ep = dict(obs=[obs], action=[np.zeros(dim, np.float32)], reward=[0.0], cont=[1.0])
            done = False
            while not done:
                action = rng.uniform(-1, 1, dim).astype(np.float32)
                obs, reward, terminated, truncated, _ = env.step(action)
                for key, value in zip(ep, (obs, action, reward, 1.0 - terminated)):
                    ep[key].append(value)
                done = terminated or truncated
            out.append(tuple(np.asarray(ep[k], dtype=np.uint8 if k == "obs" else np.float32)
                             for k in ("obs", "action", "reward", "cont")))
    finally:
        env.close()
    return out


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_run_then_resume(script: str, flags: list[str], first: int, second: int, cwd: Path,
                          loss_key: str):
    """Run `script` to `first` env steps with --save-model, then --resume it to `second`; check the
    outputs every script promises: TensorBoard events, metrics.jsonl with evaluation returns and a
    finite `loss_key`, a checkpoint whose counters and update count the resumed run continues."""
    import subprocess

    import torch

    def run(total, *extra):
        cmd = [sys.executable, str(ROOT / script), *flags, "--total-steps", str(total), "--save-model", *extra]
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    run(first)
    (run_dir,) = (cwd / "runs").iterdir()
    n_first = len(read_metrics(run_dir))
    ckpt_first = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    out = run(second, "--resume", str(run_dir / "checkpoint.pt"))
    assert "resumed from" in out.stdout
    ckpt_second = torch.load(run_dir / "checkpoint.pt", weights_only=False)

    assert list(run_dir.glob("events.out.tfevents.*"))
    records = read_metrics(run_dir)
    assert any("eval/episodic_return" in r for r in records[:n_first])
    assert any(np.isfinite(r.get(loss_key, np.nan)) for r in records[:n_first])
    assert any("charts/SPS" in r for r in records[:n_first])
    assert ckpt_first["counters"]["env_steps"] == first and ckpt_first["agent"]["updates"] > 0
    # the resumed run continues the step counter and the schedule
    assert ckpt_second["counters"]["env_steps"] == second
    assert ckpt_second["agent"]["updates"] > ckpt_first["agent"]["updates"]
    steps = [r["step"] for r in records[n_first:]]
    assert min(steps) > first and max(steps) == second


def check_beats_random(run_dir: Path, env_id: str):
    """The learning-check criterion of `benchmark.sh smoke` (benchmark.beats_random) on one run.
    Prints the curve (visible with pytest -s)."""
    import benchmark

    evals = [r["eval/episodic_return"] for r in read_metrics(run_dir) if "eval/episodic_return" in r]
    baseline = benchmark.policy_return(env_id)
    print(f"eval returns every 1000 steps: {[round(e, 1) for e in evals]}; random policy {baseline:.1f}")
    assert benchmark.beats_random(evals, baseline), (evals, baseline)


def smoke_args(module, algo: str):
    """(Args, RunSettings) of `benchmark.sh smoke`'s first job for `algo` (seed 1), parsed by the
    script: `module.main(*smoke_args(module, algo))`."""
    import benchmark

    job = benchmark.suite_jobs("smoke", [algo], seeds=1, budget=None)[0]
    return module.parse_args(["--env", job.env, "--seed", str(job.seed), *job.flags])


def check_bad_cli_input(script: str, flags: list[str], message: str, cwd: Path):
    """`python <script> --preset tiny <flags>` ends with SystemExit("error: ... <message> ...")
    (Python prints that message without a traceback) and leaves no run folder behind. Run in
    process: the same code path as the command line, without a second interpreter's start-up."""
    import importlib
    import os

    import pytest

    module = importlib.import_module(Path(script).stem)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with pytest.raises(SystemExit) as error:
            module.main(*module.parse_args(["--preset", "tiny", *flags]))
    finally:
        os.chdir(old)
    text = str(error.value.code)
    assert text.startswith("error") and message in text, text
    assert not (cwd / "runs").exists()


# Operators that make the host wait for a CUDA device: reading a value (`.item()`, `float(t)`,
# `if t:`, a tensor passed where a number is expected), or producing a shape that depends on the
# data (nonzero, boolean-mask indexing, unique), or checking a distribution on the host.
SYNCING_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
               "aten::unique_dim", "aten::unique_consecutive", "aten::multinomial"}


def check_dreamerv2_weight_decay(agent, wd: float = 1e-6):
    """DreamerV2's optimiser (common/other.py) multiplies each variable by (1 - wd) once per step,
    whatever the learning rate: one critic step with zero gradients (a zero Adam step) must do
    exactly that; `agent` has `ac.critic` and `critic_opt`."""
    import torch

    before = [p.detach().clone() for p in agent.ac.critic.parameters()]
    for p in agent.ac.critic.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: the Adam step is zero, only the decay acts
    getattr(agent.critic_opt, "opt", agent.critic_opt).step()  # the torch optimiser inside the Optimizer helper
    for b, p in zip(before, agent.ac.critic.parameters()):
        torch.testing.assert_close(p.detach(), b * (1 - wd), rtol=1e-7, atol=0)


def check_output_layer_in_fp32(forward, net, x):
    """Issue 22 item 6: under bf16 autocast, `forward(x)` (the code path under test: a head, a
    critic's forward) returns `net`'s last layer computed in fp32 from the bf16 hidden
    activations: exactly that product, and not the bf16 product cast to fp32 afterwards (which
    rounds a value of 500 to steps of 2)."""
    import torch

    *hidden, last = net
    with torch.autocast(x.device.type, torch.bfloat16):
        out = forward(x)
        h = x
        for layer in hidden:
            h = layer(h)
        rounded = last(h).float()
    assert h.dtype == torch.bfloat16  # the hidden layers do run in bf16
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, last(h.float()).reshape(out.shape), rtol=0, atol=0)
    assert not torch.equal(out, rounded.reshape(out.shape))


def graph_leaves(loss) -> set:
    """ids of the leaf tensors (parameters) that `loss`'s autograd graph accumulates into."""
    leaves, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if hasattr(node, "variable"):  # AccumulateGrad
            leaves.add(id(node.variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def check_behaviour_step_freezes_world_model(agent, loss_name, run_update, world_model, actor, frozen,
                                             grads_kept=True):
    """Issue 22 item 9. In `run_update()`, the actor loss (the first output of `agent.<loss_name>`)
    is computed with `world_model`'s parameters frozen: none of them is in its graph (so neither
    an eager nor a compiled backward computes their gradients), they are trainable again after
    the update, and (`grads_kept`) their .grad is what the model step left. The same call with
    and without `frozen` (same inputs, same seed) gives the same loss and the same non-zero actor
    gradient: it reaches the actor through the imagined latents as before."""
    import contextlib

    import torch

    calls, original = [], getattr(agent, loss_name)

    def spy(*args):
        out = original(*args)
        wm = list(world_model.parameters())
        calls.append(dict(args=args, leaves=graph_leaves(out[0]), trainable=[p.requires_grad for p in wm],
                          grads=[None if p.grad is None else p.grad.clone() for p in wm]))
        return out

    trainable = [p.requires_grad for p in world_model.parameters()]
    setattr(agent, loss_name, spy)
    try:
        run_update()
    finally:
        setattr(agent, loss_name, original)
    assert len(calls) == 1 and any(trainable)
    call = calls[0]
    wm_ids = {id(p) for p in world_model.parameters()}
    assert not any(call["trainable"])  # frozen during the behaviour losses
    assert not call["leaves"] & wm_ids  # the actor loss accumulates into no world-model weight
    assert {id(p) for p in actor.parameters()} <= call["leaves"]
    assert [p.requires_grad for p in world_model.parameters()] == trainable  # restored
    if grads_kept:
        for before, p in zip(call["grads"], world_model.parameters()):
            assert (before is None and p.grad is None) or torch.equal(before, p.grad)
    results = []
    for freeze in (True, False):
        torch.manual_seed(0)
        with frozen(world_model) if freeze else contextlib.nullcontext():
            loss = original(*call["args"])[0]
        leaves = graph_leaves(loss)
        assert bool(leaves & wm_ids) is not freeze  # unfrozen, the world model is in the graph
        results.append((loss.detach(), torch.autograd.grad(loss, list(actor.parameters()), allow_unused=True)))
    (loss_frozen, grads_frozen), (loss_free, grads_free) = results
    assert torch.equal(loss_frozen, loss_free)
    assert all(g is not None for g in grads_frozen) and any(g.abs().sum() > 0 for g in grads_frozen)
    for a, b in zip(grads_frozen, grads_free):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def without_host_sync(update, *args, returns_to_host: bool = False):
    """Call `update(*args)` once to warm up (lazy initialisations may synchronise), then again
    and return that call's result, failing on any host-device synchronisation in it. On every
    device, a dispatch mode rejects the operators that synchronise on CUDA (SYNCING_OPS) and
    host-to-device copies that are blocking or from pageable memory (CUDA makes those wait for the
    stream), so the check runs on CPU too, where a sync costs nothing and would go unnoticed; on
    CUDA, also CUDA's sync debug mode 'error', which catches every synchronising call, unless the
    call ends by design with a copy to the host (`returns_to_host`: acting returns a numpy action)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class RejectSyncs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func._schema.name in SYNCING_OPS:
                raise AssertionError(f"{func._schema.name} inside an update: a host sync on CUDA")
            if func._schema.name in ("aten::_to_copy", "aten::copy_"):
                src = args[1] if func._schema.name == "aten::copy_" else args[0]
                dst = args[0].device if func._schema.name == "aten::copy_" else kwargs.get("device")
                to_gpu = src.device.type == "cpu" and dst is not None and torch.device(dst).type == "cuda"
                if to_gpu and not (src.is_pinned() and kwargs.get("non_blocking", False)):
                    raise AssertionError("a blocking or pageable host-to-device copy: the host waits")
            return func(*args, **kwargs)

    update(*args)
    cuda = (torch.cuda.is_available() and torch.cuda.is_initialized()) and not returns_to_host
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        with RejectSyncs():
            return update(*args)
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")


def sync_test_device():
    """CUDA where there is one (the sync tests then use CUDA's own sync check too), else CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def compile_backend(request, monkeypatch):
    """Runs a test once per torch.compile backend. `aot_eager` (CI) traces the loss functions
    through TorchDynamo and AOTAutograd exactly as `--compile` does and runs the traced graphs with
    eager kernels, which catches graph breaks, recompiles and tracing errors in seconds; `inductor`
    (marked slow: its C++ code generation takes many minutes on 2 CPU cores) is what `--compile`
    uses."""
    import functools

    import torch

    if request.param != "inductor":
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=request.param))
    torch._dynamo.reset()
    yield request.param
    torch._dynamo.reset()


@pytest.fixture
def cuda_graph_steps(monkeypatch):
    """`--compile-mode reduce-overhead` as CUDA graph trees treat the outputs of compiled calls,
    simulated on CPU. torch.compile traces with aot_eager (the mode is recorded in `.modes`), and
    a compiled call that begins a new step overwrites the outputs of every earlier compiled call
    with NaN bytes, as replaying a CUDA graph overwrites its memory pool. A step begins at a
    compiled call after `torch.compiler.cudagraph_mark_step_begin()` once that has been called,
    else (CUDA graph trees' own rule) at any compiled call made while no backward is pending.
    Outputs that alias an input are not in the pool and are left alone."""
    import functools
    import types

    import torch
    from torch.utils._pytree import tree_flatten

    sim = types.SimpleNamespace(modes=[], marks=0, marked=False, pending=False, outputs=[])
    compile = torch.compile

    def poison(t):
        storage = t.untyped_storage()
        torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),)).fill_(255)

    def fake_compile(fn, *, mode=None, **kw):
        sim.modes.append(mode)
        compiled = compile(fn, backend="aot_eager", **kw)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            new_step = sim.marked if sim.marks else not sim.pending
            sim.marked = False
            if new_step:
                with torch.no_grad():
                    for t in sim.outputs:
                        poison(t)
                sim.outputs.clear()
            out = compiled(*args, **kwargs)
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if torch.is_tensor(t)}
            tensors = [t for t in tree_flatten(out)[0] if torch.is_tensor(t)]
            sim.outputs += [t for t in tensors if t.untyped_storage().data_ptr() not in inputs]
            graded = [t for t in tensors if t.requires_grad]
            if graded:  # a backward is pending until gradients reach this call's first output
                sim.pending = True
                graded[0].register_hook(lambda grad: setattr(sim, "pending", False))
            return out

        return run

    def mark_step_begin():
        sim.marks += 1
        sim.marked = True

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", mark_step_begin)
    torch._dynamo.reset()
    yield sim
    torch._dynamo.reset()


def check_decoder_stem_equals_the_transposed_conv(decoder_cls):
    """A decoder whose first transposed conv on a 1x1 input is written as a matmul (`linear`, then
    `net` from the first conv on) computes what the conv computes: output and every gradient."""
    import torch

    torch.manual_seed(0)
    decoder = decoder_cls(10, 2)
    feat = torch.randn(3, 2, 10, requires_grad=True)
    out = decoder(feat)
    conv_input = decoder.linear(feat).reshape(-1, 32 * decoder.depth, 1, 1)
    reference = decoder.net(conv_input).reshape(3, 2, 3, 64, 64)
    assert out.shape == (3, 2, 3, 64, 64)
    torch.testing.assert_close(out, reference)
    weight = torch.randn_like(out)
    params = [feat, *decoder.parameters()]
    got = torch.autograd.grad((out * weight).sum(), params)
    want = torch.autograd.grad((reference * weight).sum(), params)
    assert got[1].abs().sum() > 0  # the first layer's weight is trained through the matmul
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def preset_flags(module, preset: str = "tiny", *flags, **values):
    """(Args, RunSettings) of `module`'s `preset` (parsed as the command line does, with `flags`),
    then `values` set, each in whichever of the two has the field."""
    args, settings = module.parse_args(["--preset", preset, *flags])
    both = module.split_flags(values, module.Flags(args, settings))
    unknown = set(values) - set(vars(both.args)) - set(vars(both.run))
    assert not unknown, f"{module.__name__} has no flags {unknown}"
    return both.args, both.run


def action_space(action_dim: int, discrete: bool = False):
    import gymnasium as gym

    if discrete:
        return gym.spaces.Discrete(action_dim)
    return gym.spaces.Box(-1.0, 1.0, (action_dim,), np.float32)


def make_agent(module, args, settings, action_dim: int = 1, discrete: bool = False, device="cpu"):
    """`module`'s Agent for an action space of `action_dim` (one-hot if `discrete`), built with
    the Compute of `settings` on `device` (which seeds every RNG with args.seed, as a run does)."""
    settings = dataclasses.replace(settings, device=str(device))
    return module.Agent(args, action_space(action_dim, discrete), module.Compute(settings, args.seed))


def synthetic_batch(module, agent, length: int, batch: int, obs_shape=(3, 64, 64), seed=0):
    """A replayed batch of one random episode (random pixels, actions, rewards), on the CPU."""
    import torch

    rng = np.random.default_rng(seed)
    replay = module.Replay(max(length, 2) + 1, obs_shape, agent.action_dim, seed=seed)
    n = max(length, 2) + 1
    actions = rng.uniform(-1, 1, (n, agent.action_dim)).astype(np.float32)
    replay.add_episode(rng.integers(0, 255, (n, *obs_shape), dtype=np.uint8), actions,
                       rng.random(n).astype(np.float32), np.ones(n, np.float32))
    return module.to_torch(replay.sample(batch, length), torch.device("cpu"))


def tiny_checkpoint(module, path, env="toy-reach-center", seed=3, action_dim=2, **overrides):
    """A checkpoint of an untrained `--preset tiny` agent of `module` (any of the five scripts;
    continuous actions; `overrides`: other Args values), written to `path` in the scripts' format
    (agent, counters, args, settings)."""
    import torch

    args, settings = preset_flags(module, "tiny", env=env, seed=seed, **overrides)
    agent = make_agent(module, args, settings, action_dim)
    torch.save(dict(agent=agent.state_dict(), args=dataclasses.asdict(args),
                    settings=dataclasses.asdict(settings), rng={},
                    counters=dict(env_steps=0, agent_steps=0, episodes=0)), path)
    return path
