"""What every algorithm script promises a user, tested the same way for each script present (the
promises live in the appendix that all five share): progress from the first seconds, Ctrl-C and
SIGTERM write a checkpoint and print the resume command, the replay written beside the checkpoint
only when it is due, resume continues the run (flags that change the algorithm refused, metrics
not duplicated, no evaluation repeated), episode seeds never shared between seeds, bad input and
damaged files refused in one line before anything is written, run folders never shared, a replay
whose one episode fills the ring, --evaluate of a checkpoint anywhere, --track to W&B."""

import dataclasses
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

from conftest import ROOT, action_space, check_bad_cli_input, make_agent, preset_flags, read_metrics, tiny_checkpoint

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


def short_episodes(m) -> list:
    """CoRe trains and evaluates at episode ends; its tiny preset's 200-step toy episodes would
    leave these short runs one or two episodes: 50-step episodes, as the other scripts have."""
    return ["--time-limit", "50"] if "time_limit" in m.Args.__dataclass_fields__ else []


def in_process(m, *flags):
    """A run of `m` in this process, as the command line would start it: main(*parse_args(...))."""
    if "--resume" not in flags and "--evaluate" not in flags:
        flags = (*flags, *short_episodes(m))
    return m.main(*m.parse_args(list(flags)))


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_replay_is_written_every_nth_evaluation_and_at_the_end(script):
    m = module(script)
    assert m.parse_args([])[1].replay_checkpoint_every == 10
    _, settings = m.parse_args(["--preset", "tiny", "--replay-checkpoint-every", "3"])  # 2000 steps
    assert [e for e in range(1, 10) if m.replay_due(settings, e, 100)] == [3, 6, 9]
    assert m.replay_due(settings, 1, 2000)  # the run's last evaluation
    _, never = m.parse_args(["--preset", "tiny", "--replay-checkpoint-every", "0"])
    assert not any(m.replay_due(never, e, 100) for e in range(1, 30))
    assert m.replay_due(never, 7, 2000)


def bare_run(m, tmp_path, args, settings, replay):
    """A Run of `m` that writes its checkpoints into tmp_path, with no env (only its spaces)."""
    import types

    agent = make_agent(m, args, settings, action_dim=2)
    env = types.SimpleNamespace(observation_space=types.SimpleNamespace(shape=(3, 64, 64)))
    run = m.Run(args, settings, agent.compute, agent, replay, env, env, batch=(4, 8), updates_per_step=1.0)
    run.dir = tmp_path
    return run


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_restores_replay_pt_and_says_when_it_is_older_than_the_checkpoint(script, tmp_path, capsys):
    m = module(script)
    args, settings = preset_flags(m, "tiny")

    def episode(n, value):
        return (np.full((n, 3, 64, 64), value, np.uint8), np.zeros((n, 2), np.float32),
                np.zeros(n, np.float32), np.ones(n, np.float32))

    replay = m.Replay(1000, (3, 64, 64), 2, seed=0)
    replay.add_episode(*episode(60, 7))
    run = bare_run(m, tmp_path, args, settings, replay)
    run.counters["env_steps"] = 100
    run.save(with_replay=True, saved_by="interrupt")  # an interrupt: both files
    replay.add_episode(*episode(40, 9))
    run.counters["env_steps"] = 200
    run.save(with_replay=False, saved_by="evaluation")  # an evaluation: the networks
    path = tmp_path / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=False)
    assert "replay" not in checkpoint and checkpoint["counters"]["env_steps"] == 200

    fresh = m.Replay(1000, (3, 64, 64), 2, seed=0)
    capsys.readouterr()
    m.load_replay(str(path), checkpoint, fresh, checkpoint["counters"])
    out = capsys.readouterr().out
    assert fresh.size == 60 and torch.as_tensor(fresh.state_dict()["obs"]).eq(7).all()
    assert "replay: 60 agent steps" in out and "written at env step 100" in out, out

    (tmp_path / "other").mkdir()
    other = bare_run(m, tmp_path / "other", args, dataclasses.replace(settings, checkpoint_replay=False),
                     replay)
    other.save(with_replay=True, saved_by="interrupt")  # --no-checkpoint-replay: replay.pt never
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["checkpoint.pt"]
    empty = m.Replay(1000, (3, 64, 64), 2, seed=0)
    m.load_replay(str(tmp_path / "other" / "checkpoint.pt"), checkpoint, empty, checkpoint["counters"])
    assert empty.size == 0 and "the replay starts empty" in capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_tiny_preset_is_a_short_run_unless_total_steps_is_given(script):
    mod = module(script)
    assert mod.parse_args(["--preset", "tiny"])[1].total_steps == 2000
    assert mod.parse_args(["--preset", "tiny", "--total-steps", "500"])[1].total_steps == 500
    assert mod.parse_args([])[1].total_steps == mod.TOTAL_STEPS > 2000  # the paper's budget


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
    (["--total-steps", "0"], "--total-steps 0: must be positive"),
    (["--total-steps", "-5"], "--total-steps -5: must be positive"),
    (["--eval-episodes", "0"], "--eval-episodes 0: must be positive"),
    (["--batch-size", "0"], "--batch-size 0: must be positive"),
    (["--eval-every", "-1"], "--eval-every -1: must not be negative"),
    (["--log-every", "0"], "--log-every 0: must be positive"),
    (["--model-lr", "0"], "--model-lr 0.0: must be positive"),  # not AdamW's weight_decay / 0
    (["--actor-lr", "-0.001"], "--actor-lr -0.001: must be positive"),
    (["--resume", "a.pt", "--evaluate", "b.pt"], "without training: drop --resume"),
    (["--evaluate", "b.pt", "--track"], "drop --track"),
])
def test_bad_input_ends_with_a_message_and_no_run_folder(script, flags, message, tmp_path):
    """Issue 41 item 5: numbers are checked before anything is built or written, one line each."""
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


def fill(replay, sizes, value=0):
    """Episodes of `sizes` steps whose frames hold (episode id + value) and rewards their step."""
    for e, n in enumerate(sizes):
        replay.add_episode(np.full((n, 1, 1, 1), e + value, np.uint8), np.zeros((n, 1), np.float32),
                           np.arange(n, dtype=np.float32), np.ones(n, np.float32))


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("prioritize_ends", [False, True])
def test_replay_windows_never_run_across_the_write_position_even_when_one_episode_fills_it(
        script, prioritize_ends):
    """Issue 41 item 1: one episode as long as the ring (a --total-steps 1000 run of the tiny
    preset: capacity 501 = 500 agent steps + the first observation) fills it; the windows are
    then those inside it, none from the newest slot into the oldest, and prioritize_ends finds
    its last window (the ring's last slot)."""
    m = module(script)
    replay = m.Replay(20, (1, 1, 1), 1, seed=0, prioritize_ends=prioritize_ends)
    fill(replay, [20])  # pos back at 0: the newest step is slot 19, the oldest slot 0
    starts = replay.draw_starts(5000, 6)
    assert set(starts) == set(range(15))  # 0..14: never 15..19, which would run 19 -> 0
    fill(replay, [7], value=1)  # slots 0..6 now hold episode 1; episode 0 keeps slots 7..19
    batch = {k: v.numpy() for k, v in replay.sample(3000, 6).items()}
    ids, steps = batch["obs"][:, :, 0, 0, 0], batch["reward"]
    assert np.all(ids == ids[:1]) and np.all(np.diff(steps, axis=0) == 1)  # one episode, in order
    assert set(np.unique(ids)) == {0, 1}  # episode 0's remaining slots 7..19 still serve windows


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_budget_of_one_episode_runs_end_to_end(script, tmp_path, monkeypatch):
    """Issue 41 item 1: `--preset tiny --total-steps 1000` on dmc-cartpole-swingup ended at the
    first update with IndexError in Replay.draw_starts (one episode filled the ring). The same
    condition on the toy env: one 50-step episode is the whole budget and fills the ring."""
    monkeypatch.chdir(tmp_path)
    m = module(script)
    run_dir = in_process(m, *TINY, "--total-steps", "50", "--prefill", "10")
    records = read_metrics(run_dir)
    assert any("eval/episodic_return" in r for r in records)
    if "pretrain" in m.Args.__dataclass_fields__:  # trains once its prefill is in (CoRe: after a
        assert any(k.startswith("losses/") for r in records for k in r)  # non-random episode)


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_runs_started_in_the_same_second_get_folders_of_their_own(script, tmp_path, monkeypatch):
    """Issue 41 item 2: the run folder's name has the second it started in; a second run that
    would get the same name gets the next free suffix, and each writes only its own files."""
    monkeypatch.chdir(tmp_path)
    m = module(script)
    monkeypatch.setattr(m.time, "time", lambda: 1_800_000_000.0)
    first = in_process(m, *TINY, "--total-steps", "60", "--save-model")
    second = in_process(m, *TINY, "--total-steps", "60", "--save-model")
    assert first != second and second.name == f"{first.name}_2"
    for run_dir in (first, second):
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
        (last,) = [r["step"] for r in read_metrics(run_dir) if "eval/episodic_return" in r]
        assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["counters"]["env_steps"] == last
    assert not list(tmp_path.glob("runs/*/*.tmp"))


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("damage", ["truncated", "empty", "flipped"])
def test_a_damaged_checkpoint_is_refused_in_one_line(script, damage, tmp_path):
    """Issue 41 item 3: --resume or --evaluate of a damaged checkpoint.pt: one line naming the
    file and what to do, no torch traceback."""
    m = module(script)
    path = tiny_checkpoint(m, tmp_path / "checkpoint.pt")
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                      "flipped": data[:100] + bytes(b ^ 0xFF for b in data[100:400]) + data[400:]}[damage])
    for flag in ("--resume", "--evaluate"):
        with pytest.raises(SystemExit) as error:
            m.parse_args([flag, str(path)])
        text = str(error.value.code)
        assert text.startswith(f"error: {path} is damaged") and "\n" not in text, text


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_damaged_replay_falls_back_to_an_empty_replay_with_a_line(script, tmp_path, capsys):
    m = module(script)
    args, settings = preset_flags(m, "tiny")
    replay = m.Replay(1000, (3, 64, 64), 2, seed=0)
    fill_frames = (np.zeros((30, 3, 64, 64), np.uint8), np.zeros((30, 2), np.float32),
                   np.zeros(30, np.float32), np.ones(30, np.float32))
    replay.add_episode(*fill_frames)
    run = bare_run(m, tmp_path, args, settings, replay)
    run.save(with_replay=True, saved_by="interrupt")
    replay_path = tmp_path / "replay.pt"
    replay_path.write_bytes(replay_path.read_bytes()[:1000])
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    fresh = m.Replay(1000, (3, 64, 64), 2, seed=0)
    capsys.readouterr()
    m.load_replay(str(tmp_path / "checkpoint.pt"), checkpoint, fresh, checkpoint["counters"])
    out = capsys.readouterr().out
    assert fresh.size == 0 and f"{replay_path} is damaged" in out and "starts empty" in out, out


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_after_a_periodic_checkpoint_repeats_no_evaluation(script, tmp_path, monkeypatch):
    """Issue 41 item 4: the evaluation's checkpoint is written after `next_eval` moved on, so a
    run killed after it and resumed evaluates at the next multiple, with the next round's seeds,
    as an uninterrupted run does."""
    monkeypatch.chdir(tmp_path)
    m = module(script)
    run_dir = in_process(m, *TINY, "--total-steps", "300", "--eval-every", "100", "--save-model")
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert saved["saved_by"] == "evaluation"
    step = saved["counters"]["env_steps"]
    assert saved["counters"]["eval_rounds"] == 3 and saved["counters"]["next_eval"] > step
    in_process(m, "--resume", str(run_dir / "checkpoint.pt"), "--total-steps", "500")
    evals = [r["step"] for r in read_metrics(run_dir) if "eval/episodic_return" in r]
    assert evals == sorted(set(evals)) and evals[-1] >= 500  # no step evaluated twice
    final = torch.load(run_dir / "checkpoint.pt", weights_only=False)["counters"]
    assert final["eval_rounds"] == len(evals)  # rounds (their episode seeds) continue


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_says_what_was_kept(script, tmp_path, monkeypatch, capsys):
    """Issue 41 item 6: after an evaluation's checkpoint (then, say, SIGKILL) the resume line says
    that steps after it are not kept; after an interrupt, that the interrupted episode was
    stored."""
    monkeypatch.chdir(tmp_path)
    m = module(script)
    run_dir = in_process(m, *TINY, "--total-steps", "100", "--eval-every", "100", "--save-model")
    capsys.readouterr()
    in_process(m, "--resume", str(run_dir / "checkpoint.pt"), "--total-steps", "150")
    out = capsys.readouterr().out
    assert "written at the evaluation" in out and "are not kept" in out, out
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    checkpoint["saved_by"] = "interrupt"
    torch.save(checkpoint, run_dir / "checkpoint.pt")
    in_process(m, "--resume", str(run_dir / "checkpoint.pt"), "--total-steps", "200")
    assert "the interrupted episode was stored as truncated" in capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_full_disk_ends_in_one_line_and_keeps_the_last_good_checkpoint(script, tmp_path, monkeypatch):
    """Issue 41 item 6: writing a checkpoint fails (ENOSPC): one line naming the file, the
    previous checkpoint.pt intact and no temporary file left."""
    import errno

    monkeypatch.chdir(tmp_path)
    m = module(script)
    save, writes = torch.save, []

    def save_until_the_disk_is_full(obj, f, *a, **kw):
        writes.append(1)
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(obj, f, *a, **kw)

    monkeypatch.setattr(m.torch, "save", save_until_the_disk_is_full)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(SystemExit) as error:
        in_process(m, *TINY, "--total-steps", "200", "--eval-every", "100", "--save-model",
                   "--replay-checkpoint-every", "0")
    (run_dir,) = (tmp_path / "runs").iterdir()
    text = str(error.value.code)
    assert text.startswith(f"error: cannot write {run_dir.relative_to(tmp_path) / 'checkpoint.pt'} "
                           "(No space left on device)"), text
    assert "the last good checkpoint.pt is unchanged" in text and "\n" not in text
    monkeypatch.setattr(m.torch, "save", save)
    kept = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    first_eval = min(r["step"] for r in read_metrics(run_dir) if "eval/episodic_return" in r)
    assert kept["counters"]["env_steps"] == first_eval and not list(run_dir.glob("*.tmp"))
    assert {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} == handlers


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unwritable_run_folder_ends_in_one_line(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("a file where the runs folder should be")
    m = module(script)
    with pytest.raises(SystemExit) as error:
        in_process(m, *TINY, "--total-steps", "60")
    assert str(error.value.code).startswith("error: cannot make the run folder runs/")


@pytest.mark.parametrize("script", SCRIPTS)
def test_metrics_jsonl_holds_null_not_nan(script, tmp_path):
    """Issue 41 item 7: NaN is not JSON; a non-finite value is written as null."""
    m = module(script)
    args, settings = preset_flags(m, "tiny")
    logger = m.Logger(tmp_path, args, settings)
    logger.log(5, {"losses/model_loss": float("nan"), "charts/SPS": torch.tensor(float("inf")),
                   "eval/episodic_return": 3.0})
    logger.close()
    line = (tmp_path / "metrics.jsonl").read_text()

    def refuse(token):
        raise ValueError(token)

    record = json.loads(line, parse_constant=refuse)  # strict JSON: NaN/Infinity tokens refused
    assert record["losses/model_loss"] is None and record["charts/SPS"] is None
    assert record["eval/episodic_return"] == 3.0


@pytest.mark.parametrize("script", SCRIPTS)
def test_evaluate_scores_a_checkpoint_on_another_setting_and_changes_nothing_of_the_run(
        script, tmp_path, monkeypatch, capsys):
    """Issue 42 item 1: --evaluate plays --eval-episodes episodes with the checkpoint's agent on
    the env given on the command line, prints each return and mean +- SE, writes evaluation.json
    (and with --capture-video an mp4 and a TensorBoard frame strip) in a folder of its own; the
    run's own files are untouched and no replay is loaded."""
    monkeypatch.chdir(tmp_path)
    m = module(script)
    run_dir = in_process(m, *TINY, "--total-steps", "100", "--save-model")
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    capsys.readouterr()
    report = in_process(m, "--evaluate", str(run_dir / "checkpoint.pt"), "--env", "toy-reach-center",
                        "--eval-episodes", "3", "--capture-video")
    out = capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
    assert "replay:" not in out
    assert len(re.findall(r"episode \d: return", out)) == 3 and " +- " in out
    assert report["env"] == "toy-reach-center" and report["trained_on"]["env"] == "toy-reach"
    assert len(report["returns"]) == 3 and report["mean"] == pytest.approx(np.mean(report["returns"]))
    assert report["standard_error"] == pytest.approx(np.std(report["returns"], ddof=1) / np.sqrt(3))
    (where,) = [p for p in (tmp_path / "runs").iterdir() if "__eval__" in p.name]
    assert json.loads((where / "evaluation.json").read_text()) == report
    assert (where / "video.mp4").stat().st_size > 0 and list(where.glob("events.out.tfevents.*"))
    assert "videos)" not in out.splitlines()[-1]  # toy-reach-center shows no video
    in_process(m, "--evaluate", str(run_dir / "checkpoint.pt"), "--eval-episodes", "1")
    assert "(one episode: no standard error)" in capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_evaluate_refuses_a_checkpoint_whose_shapes_do_not_fit_the_env(script, tmp_path):
    """A checkpoint of a 2-action toy task on a 1-action control-suite task: one line."""
    m = module(script)
    path = tiny_checkpoint(m, tmp_path / "checkpoint.pt", env="toy-reach", action_dim=2)
    with pytest.raises(SystemExit) as error:
        in_process(m, "--evaluate", str(path), "--env", "dmc-cartpole-swingup")
    text = str(error.value.code)
    assert text.startswith(f"error: --evaluate {path}: its networks do not fit dmc-cartpole-swingup")
    with pytest.raises(SystemExit, match="change the algorithm: --batch-size"):
        m.parse_args(["--evaluate", str(path), "--batch-size", "3"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_track_mirrors_the_run_to_weights_and_biases_offline(script, tmp_path):
    """Issue 42 item 3: --track (CleanRL's flag names) writes a W&B run with the flags as its
    config, the scalars and the evaluation video; tested in W&B's offline mode."""
    import wandb  # noqa: F401  (requirements.txt installs it)

    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", MUJOCO_GL="egl")
    done = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), *TINY, "--total-steps", "150",
                           "--action-repeat", "1", "--track", "--wandb-project-name", "rfwm-test",
                           "--capture-video", "--prefill", "50", *short_episodes(module(script))],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = tmp_path.glob("runs/*/wandb/offline-run-*/run-*.wandb")
    data = record.read_bytes()
    for expected in (b"eval/episodic_return", b"losses/", b"batch_size", b"rfwm-test"):
        assert expected in data, expected
    assert list(record.parent.glob("files/media/videos/**/*.mp4"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_track_without_wandb_installed_is_one_line(script, monkeypatch):
    m = module(script)
    monkeypatch.setattr(m.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"--track needs the wandb package: pip install wandb"):
        m.parse_args(["--preset", "tiny", "--track"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_cpu_run_of_many_hours_names_the_small_preset_once(script, capsys, monkeypatch):
    m = module(script)
    monkeypatch.setattr(m.preset_hint, "shown", False, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    m.preset_hint("small", 100 * 3600)  # already the CPU preset: nothing to say
    m.preset_hint("paper", 3600)  # an hour: nothing to say
    assert capsys.readouterr().out == ""
    m.preset_hint("paper", 350 * 3600)
    m.preset_hint("paper", 350 * 3600)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "--preset small" in out[0] and "350h" in out[0]


# Issue 40: what --preset small may change. Sizes, batch and schedule (train ratio, prefill,
# budget), learning rates, replay capacity, DreamerV2's episode-end sampling (the same in the three
# DreamerV2-family scripts) and the action repeat (one per task, the same for all five scripts).
# Run settings (budget, evaluation) are not Args and may differ. Every other value, loss weights,
# free nats, KL balance, discount, lambda, horizon, entropy scale, target-update rate and every
# objective switch, must equal the paper preset's.
SMALL_MAY_CHANGE = {
    "preset", "action_repeat", "replay_capacity", "prioritize_ends",
    "batch_size", "batch_length", "seq_len", "train_every", "updates_per_step", "prefill",
    "model_lr", "actor_lr", "critic_lr", "value_lr", "q_lr",
    "cnn_depth", "cnn_filters", "deter", "hidden", "stoch", "classes", "mlp_units", "mlp_layers",
    "contrast_units", "obs_mlp", "gru_mlp", "prior_mlp", "posterior_mlp", "decoder_mlp",
    "reward_mlp", "inverse_mlp", "ac_hidden", "render_size", "render_height", "render_width",
    "crop_size"}
DREAMER_FAMILY = [s for s in ("dreamerv2", "blast", "dreamingv2") if s in SCRIPTS]


def small_preset_changes(m) -> dict:
    """{field: (paper value, small value)} of the Args that --preset small sets apart from the
    paper's, other than SMALL_MAY_CHANGE."""
    paper, small = m.parse_args([])[0], m.parse_args(["--preset", "small"])[0]
    return {k: (v, getattr(small, k)) for k, v in vars(paper).items()
            if k not in SMALL_MAY_CHANGE and getattr(small, k) != v}


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_small_preset_is_the_same_algorithm_with_smaller_sizes(script):
    """No loss weight, coefficient or switch differs from the paper preset's, by value."""
    m = module(script)
    assert small_preset_changes(m) == {}
    assert m.parse_args(["--preset", "small"])[1].total_steps == 100_000


def test_the_small_presets_share_episode_end_sampling_and_the_action_repeat_per_task():
    smalls = {s: module(s).parse_args(["--preset", "small", "--env", "dmc-cartpole-swingup"])[0]
              for s in SCRIPTS}
    assert len({smalls[s].prioritize_ends for s in DREAMER_FAMILY}) == 1
    repeats = {s: module(s).action_repeat(a) for s, a in smalls.items()}
    assert set(repeats.values()) == {8}, repeats  # PlaNet's cartpole repeat, the DMC-100K setting


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_small_preset_check_catches_any_changed_weight_or_switch(script, monkeypatch):
    """The check above can fail: give --preset small, one at a time, another value of each Args
    field it must leave alone (a number scaled, a switch flipped, another choice of a Literal)."""
    import typing

    m = module(script)
    paper = m.parse_args([])[0]
    hints = typing.get_type_hints(m.Args)
    tried = 0
    for name, value in vars(paper).items():
        if name in SMALL_MAY_CHANGE or name in ("env", "seed", "video_dir", "distraction"):
            continue
        choices = typing.get_args(hints[name])
        if isinstance(value, bool):
            other = not value
        elif isinstance(value, (int, float)):
            other = value * 2 + 1
        elif choices and all(isinstance(c, str) for c in choices) and len(choices) > 1:
            other = next(c for c in choices if c != value)
        else:
            continue
        small = dict(m.PRESETS["small"], **{name: other})
        monkeypatch.setitem(m.PRESETS, "small", small)
        assert name in small_preset_changes(m), name
        tried += 1
    monkeypatch.undo()
    assert tried >= 8 and small_preset_changes(m) == {}


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
    settings = mod.parse_args(["--preset", "tiny"])[1]
    mod.configure_torch(settings, torch.device("cpu"))
    assert chosen == []
    mod.configure_torch(settings, torch.device("cuda:1"))
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
    in_process(m, *TINY, "--total-steps", "200")
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_from_before_a_flag_existed_resumes_with_the_flags_default(script, tmp_path):
    """A flag added after a checkpoint was written (say dreamerv2's --reward-scale) is absent from
    its saved args; the resume takes the flag's default instead of refusing it as changed, and
    a flag the user really changes is still refused. Run settings may change on resume."""
    m = module(script)
    path = tiny_checkpoint(m, tmp_path / "checkpoint.pt")
    saved = torch.load(path, weights_only=False)
    paper = m.Args()
    name = next(k for k, v in sorted(saved["args"].items())
                if isinstance(v, float) and v == getattr(paper, k))
    del saved["args"][name]
    torch.save(saved, path)
    args, settings = m.parse_args(["--resume", str(path), "--total-steps", "123", "--compile"])
    assert getattr(args, name) == getattr(paper, name)
    assert args.seed == 3 and settings.total_steps == 123 and settings.compile  # run settings may change
    with pytest.raises(SystemExit, match="differ from the checkpoint"):
        m.parse_args(["--resume", str(path), "--seed", "4"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_written_before_the_run_settings_split_still_loads(script, tmp_path):
    """Checkpoints of earlier versions keep every flag in one `args` dict: --resume and
    --evaluate split it into Args and RunSettings."""
    m = module(script)
    path = tiny_checkpoint(m, tmp_path / "checkpoint.pt")
    saved = torch.load(path, weights_only=False)
    saved["args"] = {**saved.pop("settings"), **saved["args"], "total_steps": 777}
    torch.save(saved, path)
    args, settings = m.parse_args(["--resume", str(path)])
    assert settings.total_steps == 777 and args.seed == 3
    assert m.parse_args(["--evaluate", str(path)])[0].seed == 3


@pytest.mark.parametrize("script", SCRIPTS)
def test_args_and_run_settings_share_no_flag_and_every_flag_of_before_is_still_there(script):
    """The command line stays flat: a flag name belongs to Args or to RunSettings, never both, and
    the run settings that left Args kept their names."""
    m = module(script)
    args, run = set(m.Args.__dataclass_fields__), set(m.RunSettings.__dataclass_fields__)
    assert not args & run
    assert {"device", "compile", "compile_mode", "precision", "total_steps", "eval_every",
            "eval_episodes", "log_every", "save_model", "resume", "measure_updates",
            "capture_video", "replay_device", "checkpoint_replay", "exp_name"} <= run
    assert {"env", "distraction", "dynamic", "video_dir", "eval_split", "seed", "action_repeat",
            "preset"} <= args


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_of_another_script_is_refused_in_one_line(script, tmp_path):
    """--resume or --evaluate of another script's checkpoint (also one written before checkpoints
    named their script, by its default --exp-name) ends with one line naming both scripts."""
    other = next(s for s in SCRIPTS if s != script)
    path = tiny_checkpoint(module(other), tmp_path / "checkpoint.pt")
    saved = torch.load(path, weights_only=False)
    for written in ({**saved, "script": f"{other}.py"}, saved):  # saved: settings' exp_name only
        torch.save(written, path)
        for flag in ("--resume", "--evaluate"):
            with pytest.raises(SystemExit) as error:
                module(script).parse_args([flag, str(path)])
            assert str(error.value.code) == (f"error: {path} is a checkpoint of {other}.py, not "
                                             f"{script}.py: give it to the script that wrote it")


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_replay_too_small_for_an_episode_ends_in_one_line(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = module(script)
    if "replay_capacity" not in m.Args.__dataclass_fields__:
        pytest.fail(f"{script}.py has no --replay-capacity")
    try:  # CoRe sizes its replay to hold one whole episode whatever the flag says: it runs
        run_dir = in_process(m, *TINY, "--total-steps", "120", "--replay-capacity", "5")
    except SystemExit as error:
        assert re.fullmatch(r"error: an episode of \d+ agent steps does not fit a replay of \d+; "
                            r"give --replay-capacity at least that", str(error.code)), error
    else:
        assert script == "core" and any("eval/episodic_return" in r for r in read_metrics(run_dir))
