"""What every algorithm script promises a user, tested the same way for each script present:
progress from the first seconds, Ctrl-C/SIGTERM write a checkpoint and print the resume command,
the replay written beside the checkpoint only when it is due, resume continues the run (flags
that change the algorithm refused, metrics not duplicated), episode seeds never shared between
seeds, `--preset tiny` is a short run."""

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, check_bad_cli_input, read_metrics

SCRIPTS = [s for s in ("dreamerv2", "core", "blast", "dreamingv2", "cvrl") if (ROOT / f"{s}.py").is_file()]
TINY = ["--env", "toy-reach", "--preset", "tiny", "--log-every", "50", "--eval-every", "0"]


def module(script: str):
    return importlib.import_module(script)


class Run:
    """A script started as a user would, its stdout read line by line as it comes."""

    def __init__(self, script: str, flags: list[str], cwd: Path):
        env = dict(os.environ, PYTHONUNBUFFERED="1", MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
        self.proc = subprocess.Popen([sys.executable, str(ROOT / f"{script}.py"), *flags], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env)
        self.lines: list[str] = []
        self.stderr = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 300.0) -> re.Match:
        """The first stdout line matching `pattern`, waiting up to `timeout` seconds."""
        end = time.time() + timeout
        while time.time() < end:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.proc.poll() is not None and not any(re.search(pattern, x) for x in self.lines):
                time.sleep(0.5)  # let the reader thread drain the pipe
                if not any(re.search(pattern, x) for x in self.lines):
                    break
            time.sleep(0.2)
        self.proc.kill()
        raise AssertionError(f"no line matching {pattern!r}; stdout:\n" + "\n".join(self.lines[-30:])
                             + "\nstderr:\n" + self.proc.stderr.read()[-3000:])

    def finish(self, timeout: float = 300.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.stderr = self.proc.stderr.read()
        time.sleep(0.2)
        return rc

    @property
    def stdout(self) -> str:
        return "\n".join(self.lines)


@pytest.mark.parametrize("script", SCRIPTS)
def test_progress_appears_during_prefill_and_ctrl_c_checkpoints_then_resume_continues(script, tmp_path):
    run = Run(script, [*TINY, "--total-steps", "100000"], tmp_path)
    # A progress line with an ETA from the first seconds, before any update.
    run.wait_for(r"step +\d+/100000 \| prefill \|.*ETA", timeout=120)
    # Then training starts; interrupt it once updates are being made.
    run.wait_for(r"\| train \|.*updates +[1-9]", timeout=300)
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 130, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "KeyboardInterrupt" not in run.stderr, run.stderr[-3000:]
    match = re.search(rf"interrupted at step (\d+); resume with: python {script}\.py --resume (\S+)",
                      run.stdout)
    assert match, run.stdout[-2000:]
    step, path = int(match.group(1)), tmp_path / match.group(2)
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["counters"]["env_steps"] == step and ckpt["agent"]["updates"] > 0
    run_dir = path.parent
    # the interrupt writes the replay too, beside the checkpoint and from the same step
    assert "replay" not in ckpt
    saved = torch.load(run_dir / "replay.pt", weights_only=False)
    assert saved["env_steps"] == step and saved["replay"]["size"] > 0

    # Flags that change the algorithm are refused, with their names, before anything runs.
    bad = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), "--resume", str(path),
                          "--batch-size", "3"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert re.search(r"--batch[-_]size", bad.stdout + bad.stderr), bad.stdout + bad.stderr

    # A record written after the checkpoint (a crash between checkpoint and exit) is dropped on
    # resume, so that no step appears twice.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step + 7, "time": time.time(), "charts/SPS": -1.0}) + "\n")
    # Schedule flags may change: the resumed run goes 200 env steps further and ends normally.
    resumed = Run(script, ["--resume", str(path), "--total-steps", str(step + 200), "--save-model"],
                  tmp_path)
    assert resumed.finish() == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    # the replay is restored from replay.pt: the same size, and at the end the episodes since
    # the resume come on top of it
    assert f"replay: {saved['replay']['size']} agent steps from " in resumed.stdout, resumed.stdout
    records = read_metrics(run_dir)
    assert not any(r.get("charts/SPS") == -1.0 for r in records)
    pairs = [(r["step"], k) for r in records for k in r if k not in ("step", "time")]
    assert len(pairs) == len(set(pairs)), "a (step, metric) pair appears twice"
    assert max(r["step"] for r in records) == step + 200
    # what every run writes: TensorBoard events, progress and loss records, the final evaluation
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert any("charts/SPS" in r for r in records)
    losses = [v for r in records for k, v in r.items() if k.startswith("losses/")]
    assert losses and all(np.isfinite(losses))
    assert any("eval/episodic_return" in r and r["step"] == step + 200 for r in records)
    final = torch.load(path, weights_only=False)
    assert final["counters"]["env_steps"] == step + 200
    assert final["agent"]["updates"] > ckpt["agent"]["updates"]
    final_replay = torch.load(run_dir / "replay.pt", weights_only=False)  # written at the end
    assert final_replay["env_steps"] == step + 200
    assert (final_replay["replay"]["episodes"] - saved["replay"]["episodes"]
            == final["counters"]["episodes"] - ckpt["counters"]["episodes"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigterm_during_prefill_writes_a_checkpoint_and_exits_143(script, tmp_path):
    run = Run(script, [*TINY, "--total-steps", "100000", "--prefill", "100000", "--no-checkpoint-replay"],
              tmp_path)
    run.wait_for(r"step +\d+/100000 \| prefill", timeout=120)
    time.sleep(1.0)
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 143, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    match = re.search(r"interrupted at step (\d+); resume with: .* --resume (\S+)", run.stdout)
    assert match and (tmp_path / match.group(2)).is_file(), run.stdout[-2000:]
    assert not (tmp_path / match.group(2)).with_name("replay.pt").exists()  # --no-checkpoint-replay


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_evaluation_checkpoint_leaves_the_replay_out_and_a_resume_without_it_starts_empty(script, tmp_path):
    """Issue 22 item 7: with --save-model, an evaluation writes checkpoint.pt without the replay
    (replay.pt only every 10th evaluation by default); an interrupt writes both; resumed without
    replay.pt, the run says so, continues with an empty replay and writes replay.pt at its end."""
    run = Run(script, [*TINY, "--total-steps", "100000", "--eval-every", "200", "--save-model"], tmp_path)
    run.wait_for(r"eval at \d+", timeout=300)
    (run_dir,) = (tmp_path / "runs").iterdir()
    ckpt_path, replay_path = run_dir / "checkpoint.pt", run_dir / "replay.pt"
    end = time.time() + 60
    while not ckpt_path.is_file() and time.time() < end:  # written just after the eval line
        time.sleep(0.1)
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert ckpt["counters"]["env_steps"] >= 200 and "replay" not in ckpt
    assert not replay_path.exists()
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 130, run.stderr[-3000:]
    step = int(re.search(r"interrupted at step (\d+)", run.stdout).group(1))
    assert torch.load(replay_path, weights_only=False)["env_steps"] == step

    replay_path.unlink()  # e.g. a hard kill before the first replay.pt
    saved = torch.load(ckpt_path, weights_only=False)
    if "updates_due" in saved["counters"]:  # core: interrupted inside an episode's burst of updates,
        saved["counters"]["updates_due"] = 3  # it owes some that the empty replay cannot feed yet
        torch.save(saved, ckpt_path)
    resumed = Run(script, ["--resume", str(ckpt_path), "--total-steps", str(step + 200)], tmp_path)
    assert resumed.finish() == 0, resumed.stderr[-3000:]
    assert re.search(r"no \S*replay\.pt: the replay starts empty", resumed.stdout), resumed.stdout
    assert torch.load(ckpt_path, weights_only=False)["counters"]["env_steps"] == step + 200
    final_replay = torch.load(replay_path, weights_only=False)
    assert final_replay["env_steps"] == step + 200
    assert max(r["step"] for r in read_metrics(run_dir)) == step + 200


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_replay_is_written_every_nth_evaluation_and_at_the_end(script):
    m = module(script)
    assert m.parse_args([]).replay_checkpoint_every == 10
    args = m.parse_args(["--preset", "tiny", "--replay-checkpoint-every", "3"])  # 2000 env steps
    assert [e for e in range(1, 10) if m.replay_due(args, e, dict(env_steps=100))] == [3, 6, 9]
    assert m.replay_due(args, 1, dict(env_steps=2000))  # the run's last evaluation
    never = m.parse_args(["--preset", "tiny", "--replay-checkpoint-every", "0"])
    assert not any(m.replay_due(never, e, dict(env_steps=100)) for e in range(1, 30))
    assert m.replay_due(never, 7, dict(env_steps=2000))


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_restores_replay_pt_and_says_when_it_is_older_than_the_checkpoint(script, tmp_path, capsys):
    import inspect

    m, cpu = module(script), torch.device("cpu")
    args = m.parse_args(["--preset", "tiny"])
    discrete = ("discrete",) if "discrete" in inspect.signature(m.Agent).parameters else ()
    agent = m.Agent(args, 2, *(False for _ in discrete), cpu)

    def episode(n, value):
        return (np.full((n, 3, 64, 64), value, np.uint8), np.zeros((n, 2), np.float32),
                np.zeros(n, np.float32), np.ones(n, np.float32))

    replay = m.Replay(1000, (3, 64, 64), 2, seed=0, device=cpu)
    replay.add_episode(*episode(60, 7))
    path = tmp_path / "checkpoint.pt"
    m.save_checkpoint(path, agent, replay, dict(env_steps=100), args)  # an interrupt: both files
    replay.add_episode(*episode(40, 9))
    m.save_checkpoint(path, agent, None, dict(env_steps=200), args)  # an evaluation: the networks
    checkpoint = torch.load(path, weights_only=False)
    assert "replay" not in checkpoint and checkpoint["counters"]["env_steps"] == 200

    fresh = m.Replay(1000, (3, 64, 64), 2, seed=0, device=cpu)
    capsys.readouterr()
    m.load_replay(str(path), checkpoint, fresh, checkpoint["counters"])
    out = capsys.readouterr().out
    assert fresh.size == 60 and torch.as_tensor(fresh.state_dict()["obs"]).eq(7).all()
    assert "replay: 60 agent steps" in out and "written at env step 100" in out, out

    args.checkpoint_replay = False  # --no-checkpoint-replay: replay.pt never written
    (tmp_path / "other").mkdir()
    m.save_checkpoint(tmp_path / "other" / "checkpoint.pt", agent, replay, dict(env_steps=100), args)
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["checkpoint.pt"]
    empty = m.Replay(1000, (3, 64, 64), 2, seed=0, device=cpu)
    m.load_replay(str(tmp_path / "other" / "checkpoint.pt"), checkpoint, empty, checkpoint["counters"])
    assert empty.size == 0 and "the replay starts empty" in capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_tiny_preset_is_a_short_run_unless_total_steps_is_given(script):
    mod = module(script)
    assert mod.parse_args(["--preset", "tiny"]).total_steps == 2000
    assert mod.parse_args(["--preset", "tiny", "--total-steps", "500"]).total_steps == 500
    assert mod.parse_args([]).total_steps > 2000  # the paper's length by default


@pytest.mark.parametrize("script", SCRIPTS)
def test_episode_seeds_of_neighbouring_run_seeds_never_overlap(script):
    seed_of = module(script).episode_seed
    runs = {s: {seed_of(s, "train", k) for k in range(2000)} for s in (1, 2, 3)}
    assert all(len(v) == 2000 for v in runs.values())  # no repeats inside a run
    assert not runs[1] & runs[2] and not runs[2] & runs[3]
    assert not runs[1] & {seed_of(1, "eval", k) for k in range(2000)}  # eval episodes differ too
    assert seed_of(1, "train", 5) == seed_of(1, "train", 5)  # and they replay


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flags,message", [
    (["--env", "dcs-walkr-walk"], "unknown domain 'walkr'"),
    (["--env", "dcs-walker-walk", "--distraction", "extreme"], "unknown distraction 'extreme'"),
    (["--resume", "/no/such/checkpoint.pt"], "/no/such/checkpoint.pt"),
])
def test_bad_input_ends_with_a_message_and_no_run_folder(script, flags, message, tmp_path):
    check_bad_cli_input(f"{script}.py", flags, message, tmp_path)


@pytest.mark.parametrize("script", SCRIPTS)
def test_replay_capacity_is_capped_at_what_the_run_can_fill(script):
    """Issue 22 item 7: agent steps = total_steps / action repeat (rounded up), plus the first
    observation of an episode; the configured capacity when smaller; at least one sequence."""
    slots = module(script).replay_slots
    assert slots(1_000_000, 2_000, 2, 50) == 1_001  # a short run: what it fills
    assert slots(1_000_000, 2_001, 2, 50) == 1_002
    assert slots(500, 2_000, 1, 50) == 500  # the configured capacity is smaller
    assert slots(1_000_000, 20, 2, 50) == 50  # at least one training sequence


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_holds_only_the_filled_part_of_the_replay(script, tmp_path):
    """The replay is allocated for its whole capacity; a checkpoint stores what was filled (a
    tensor view would drag the whole preallocated storage into the file)."""
    import io

    replay = module(script).Replay(20_000, (3, 64, 64), 2, seed=0, device=torch.device("cpu"))
    n = 60
    replay.add_episode(np.full((n, 3, 64, 64), 7, np.uint8), np.zeros((n, 2), np.float32),
                       np.zeros(n, np.float32), np.ones(n, np.float32))
    buffer = io.BytesIO()
    torch.save(replay.state_dict(), buffer)
    assert buffer.tell() < 3 * n * 3 * 64 * 64, buffer.tell()  # a few episodes' worth, not 20K frames
    again = module(script).Replay(20_000, (3, 64, 64), 2, seed=0, device=torch.device("cpu"))
    buffer.seek(0)
    again.load_state_dict(torch.load(buffer, weights_only=False))
    assert again.size == n


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_cpu_run_of_many_hours_names_the_small_preset_once(script, capsys, monkeypatch):
    m = module(script)
    monkeypatch.setattr(m.preset_hint, "shown", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    paper, small = m.parse_args([]), m.parse_args(["--preset", "small"])
    m.preset_hint(small, 100 * 3600)  # already the CPU preset: nothing to say
    m.preset_hint(paper, 3600)  # an hour: nothing to say
    assert capsys.readouterr().out == ""
    m.preset_hint(paper, 350 * 3600)
    m.preset_hint(paper, 350 * 3600)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "--preset small" in out[0] and "350h" in out[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_small_preset_is_the_same_algorithm_with_smaller_sizes(script):
    """--preset small changes sizes, schedule and learning rates, never the objective's switches;
    one loss weight: dreamerv2's reward term, weighted 100x beside the image term (PRESETS)."""
    m = module(script)
    paper, small = vars(m.parse_args([])), vars(m.parse_args(["--preset", "small"]))
    changed = {k for k in paper if paper[k] != small[k]} - {"preset"}
    allowed = {"action_repeat", "total_steps", "eval_episodes", "replay_capacity", "batch_size",
               "batch_length", "seq_len", "train_every", "updates_per_step", "prefill",
               "model_lr", "actor_lr", "critic_lr", "value_lr", "q_lr", "cnn_depth", "cnn_filters",
               "deter", "hidden", "stoch", "classes", "mlp_units", "mlp_layers", "contrast_units",
               "obs_mlp", "gru_mlp", "prior_mlp", "posterior_mlp", "decoder_mlp", "reward_mlp",
               "inverse_mlp", "ac_hidden", "render_size", "render_height", "render_width",
               "crop_size", "prioritize_ends"}
    if script == "dreamerv2":
        allowed.add("reward_scale")
    assert changed and changed <= allowed, changed - allowed
    assert small["total_steps"] == 100_000


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_cuda_device_becomes_the_current_device_once(script, monkeypatch):
    """--device cuda:1: the script makes cuda:1 the current device, so that CUDA events,
    synchronize() and tensors made on plain "cuda" use it (torch's own calls faked: no GPU here)."""
    mod = module(script)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch, "set_float32_matmul_precision", lambda precision: None)
    for flags in (torch.backends.cudnn, torch.backends.cuda.matmul):
        for name in ("deterministic", "benchmark", "allow_tf32"):
            if hasattr(flags, name):
                monkeypatch.setattr(flags, name, getattr(flags, name))
    setup = getattr(mod, "configure_torch", None) or mod.setup_torch
    setup(mod.preset_args("tiny"), torch.device("cpu"))
    assert chosen == []
    setup(mod.preset_args("tiny"), torch.device("cuda:1"))
    assert chosen == [torch.device("cuda:1")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bare_cuda_device_gets_the_index_that_set_device_needs(script, monkeypatch):
    """--device cuda, and auto on a GPU machine: torch.cuda.set_device refuses a torch.device
    without an index (on an H200 all five scripts stopped with that ValueError before their first
    update); resolve_device gives it the current device's index (CUDA faked: no GPU here)."""
    mod = module(script)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for name, expected in (("cuda", 1), ("auto", 1), ("cuda:0", 0)):
        device = mod.resolve_device(name)
        # the check torch.cuda.set_device makes: an int, or a device with an index
        assert torch._utils._get_device_index(device, optional=False) == expected, name
    with pytest.raises(SystemExit, match="only 2 CUDA devices"):
        mod.resolve_device("cuda:2")


def test_tests_and_the_scripts_they_start_run_on_one_thread_each():
    """conftest.py sets OMP_NUM_THREADS=1 (unless the caller exported a value) before torch is
    imported: `pytest -n 2` on two cores with torch's default thread count oversubscribed the
    cores and made the subprocess runs of core.py 4-5x slower (the suite went past CI's budget)."""
    expected = int(os.environ["OMP_NUM_THREADS"])
    assert torch.get_num_threads() == expected
    child = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True, timeout=120)
    assert int(child.stdout) == expected, child.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_in_process_gives_back_the_signal_handlers_it_found(script, tmp_path, monkeypatch):
    """main() called from Python (a notebook, a sweep over seeds) leaves SIGINT and SIGTERM as it
    found them: its own handler only records the signal, so one left behind would swallow Ctrl-C."""
    monkeypatch.chdir(tmp_path)
    m = module(script)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    m.main(m.parse_args([*TINY, "--total-steps", "200"]))
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_from_before_a_flag_existed_resumes_with_the_flags_default(script, tmp_path):
    """A flag added after a checkpoint was written (say dreamerv2's --reward-scale) is absent from
    its saved args; the resume takes the flag's default instead of refusing it as changed, and
    a flag the user really changes is still refused."""
    from conftest import tiny_checkpoint

    m = module(script)
    path = tiny_checkpoint(m, tmp_path / "checkpoint.pt")
    saved = torch.load(path, weights_only=False)
    paper = m.Args()
    name = next(k for k, v in sorted(saved["args"].items())
                if k not in m.SCHEDULE_FLAGS and isinstance(v, float) and v == getattr(paper, k))
    del saved["args"][name]
    torch.save(saved, path)
    args = m.parse_args(["--resume", str(path)])
    assert getattr(args, name) == getattr(paper, name)
    assert args.seed == 3  # the checkpoint's values stay
    with pytest.raises(SystemExit, match="differ from the checkpoint"):
        m.parse_args(["--resume", str(path), "--seed", "4"])
