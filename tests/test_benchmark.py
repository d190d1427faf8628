"""Specification of benchmark.sh / benchmark.py: jobs, aggregation, reports, speed."""

import json
import re
import signal
import subprocess
from pathlib import Path
import sys

import numpy as np
import pytest

import benchmark
from conftest import COUNT_STARTS, ROOT


def write_run(root, algo, env, seed, evals):
    """A fake run folder: <root>/<algo>/<env>/<seed>/runs/x/metrics.jsonl with eval records
    (step, return) interleaved with training records; the clock reads 100 + step / 10 s and
    the training records count step / 20 updates."""
    folder = root / algo / env / seed / "runs" / "x"
    folder.mkdir(parents=True)
    lines = []
    for step, ret in evals:
        lines.append(json.dumps({"step": step - 1, "time": 100 + (step - 1) / 10,
                                 "losses/model": 1.0, "charts/updates": step // 20}))
        lines.append(json.dumps({"step": step, "time": 100 + step / 10,
                                 "eval/episodic_return": ret}))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture
def synthetic(tmp_path):
    """Two algorithms on two DCS tasks; known returns at 500K."""
    root = tmp_path / "results" / "dcs" / "runs"
    finals = {"core": [400, 500, 600], "dreamerv2": [100, 300]}
    for algo, values in finals.items():
        for k, final in enumerate(values):
            for env in ("dcs-walker-walk", "dcs-cartpole-swingup"):
                write_run(root, algo, env, f"seed{k + 1}",
                          [(250_000, final / 2), (500_000, final), (510_000, 9999)])
    # one core seed on cartpole has not reached the budget yet
    write_run(root, "core", "dcs-cartpole-swingup", "seed4", [(250_000, 50)])
    return tmp_path / "results", finals


def test_aggregation_gives_known_means_and_standard_errors(synthetic):
    results, finals = synthetic
    runs = benchmark.collect(results / "dcs" / "runs")
    assert set(runs) == {"core", "dreamerv2"}
    summary = benchmark.summarize(runs, 500_000, "dcs")
    m, se, n, complete = summary["rows"]["core"]["dcs-walker-walk"]
    assert (m, n, complete) == (500, 3, True)
    assert se == pytest.approx(np.std([400, 500, 600], ddof=1) / np.sqrt(3))  # 57.7
    m, se, n, _ = summary["rows"]["dreamerv2"]["dcs-walker-walk"]
    assert (m, se, n) == (200, pytest.approx(100), 2)
    # the unfinished seed counts with its last evaluation, and the cell is flagged
    m, _, n, complete = summary["rows"]["core"]["dcs-cartpole-swingup"]
    assert n == 4 and m == pytest.approx((400 + 500 + 600 + 50) / 4) and not complete
    # columns follow the paper's task order; the paper's numbers are a row beside ours
    assert summary["envs"] == ["dcs-cartpole-swingup", "dcs-walker-walk"]
    assert summary["rows"]["CoRe (paper, Table 5b)"]["dcs-walker-walk"][:2] == (479, 31)


def test_score_at_budget_uses_the_last_evaluation_before_it():
    steps, returns = np.array([10.0, 20.0, 30.0]), np.array([1.0, 2.0, 3.0])
    assert benchmark.score_at(steps, returns, 25) == (2.0, False)
    assert benchmark.score_at(steps, returns, 30) == (3.0, True)
    value, complete = benchmark.score_at(steps, returns, 5)
    assert np.isnan(value) and not complete


def test_report_writes_a_paper_style_table_and_curves(synthetic):
    results, _ = synthetic
    benchmark.report("dcs", 500_000, results)
    text = (results / "dcs" / "summary.md").read_text()
    assert "| method | dcs-cartpole-swingup | dcs-walker-walk | mean |" in text
    assert "| core | 388 ± 120 (4) * | 500 ± 58 (3) | 444 |" in text
    assert "| dreamerv2 | 200 ± 100 (2) | 200 ± 100 (2) | 200 |" in text
    assert "| CoRe (paper, Table 5b) | 354 ± 26 | 479 ± 31 | 416 |" in text
    png = results / "dcs" / "curves.png"
    assert png.stat().st_size > 10_000
    from PIL import Image

    assert Image.open(png).size[0] >= 2 * 400  # two panels side by side
    saved = json.loads((results / "dcs" / "summary.json").read_text())
    assert saved["rows"]["core"]["dcs-walker-walk"][0] == 500


def test_official_dreamerv2_reference_is_read_and_interpolated(tmp_path, monkeypatch):
    """A reference file in the official scores format (written here, so CI needs no copy)."""
    data = [{"task": "dmc_cup_catch", "method": "dreamerv2", "seed": str(k),
             "xs": [0.0, 1_000_000.0], "ys": [0.0, 800.0 + 100 * k]} for k in range(3)]
    data.append({"task": "dmc_walker_walk", "method": "dreamerv2", "seed": "0", "xs": [0.0, 1e6],
                 "ys": [0.0, 1.0]})
    path = tmp_path / "scores.json"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(benchmark, "DREAMERV2_REFERENCE", path)
    curves = benchmark.reference_dreamerv2("dcs-ball_in_cup-catch")  # named dmc_cup_catch there
    assert len(curves) == 3
    runs = {"core": {"dcs-ball_in_cup-catch": {"seed1": (np.array([500_000.0]), np.array([7.0]))}}}
    row = benchmark.summarize(runs, 500_000, "dcs")["rows"]["DreamerV2 (official, clean DMC)"]
    m, se, n, _ = row["dcs-ball_in_cup-catch"]
    assert (m, n) == (pytest.approx(450), 3) and se == pytest.approx(50 / np.sqrt(3))
    # outside the reference's steps there is no reference number (no flat extrapolation)
    path.write_text(json.dumps([dict(d, xs=[30_000.0, 1e6]) for d in data]))
    assert "DreamerV2 (official, clean DMC)" not in benchmark.summarize(runs, 2000, "dcs")["rows"]
    assert "DreamerV2 (official, clean DMC)" in benchmark.summarize(runs, 40_000, "dcs")["rows"]


def test_smoke_criterion():
    assert benchmark.beats_random([10, 30, 45, 44], baseline=19)
    assert not benchmark.beats_random([10, 25, 28, 29], baseline=19)  # never 10 above random
    assert not benchmark.beats_random([45, 45, 18], baseline=19)  # last one below random
    assert not benchmark.beats_random([], baseline=19)


def test_reference_policies_bracket_the_smoke_task():
    random, greedy = (benchmark.policy_return("toy-reach-center", p) for p in ("random", "greedy"))
    assert greedy > random + 2 * benchmark.SMOKE_MARGIN  # room to pass the check, and to spare
    assert np.isnan(benchmark.policy_return("minigrid-empty-5x5", "greedy"))  # no controller


def test_smoke_verdict_lists_each_run_with_its_wall_time(tmp_path):
    write_run(tmp_path, "core", "toy-reach-center", "seed1", [(1000, 12.0), (2000, 44.0)])
    write_run(tmp_path, "core", "toy-reach-center", "seed2", [(1000, 12.0), (2000, 17.0)])
    ok, lines = benchmark.smoke_verdict(benchmark.collect(tmp_path), {"toy-reach-center": 15.9},
                                        tmp_path)
    assert not ok  # seed2 never gets 10 above random
    assert lines == ["| core | toy-reach-center | seed1 | 12.0 / 44.0 | 100 | pass |",
                     "| core | toy-reach-center | seed2 | 12.0 / 17.0 | 100 | FAIL |"]
    assert np.isnan(benchmark.wall_seconds(benchmark.run_records(tmp_path / "nothing-here")))


def test_wall_time_leaves_out_the_pause_of_a_resumed_run():
    ran = [{"step": k * 1000, "time": 100.0 + 60 * k} for k in range(21)]  # 20 minutes
    resumed = [{"step": 21_000 + k * 1000, "time": 90_000.0 + 60 * k} for k in range(11)]  # 10
    assert benchmark.wall_seconds([ran + resumed]) == 30 * 60
    assert benchmark.wall_seconds([ran, ran[:2]]) == 20 * 60  # several files: the longest
    slow = [{"step": k * 1000, "time": 700.0 * k} for k in range(4)]  # records 700 s apart
    assert benchmark.wall_seconds([slow]) == 3 * 700  # a slow run's gaps all count


def run_benchmark(*args, cwd):
    out = subprocess.run([str(ROOT / "benchmark.sh"), *args], cwd=cwd, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_smoke_dry_run_lists_jobs_and_skips_finished_ones(tmp_path):
    out = run_benchmark("smoke", "--dry-run", "--results", str(tmp_path), cwd=tmp_path)
    lines = [line for line in out.splitlines() if line.startswith("[")]
    algos = benchmark.available_algorithms()
    assert len(lines) == 2 * len(algos) and "jobs" in out.splitlines()[-1]
    assert all("[new]" in line and "--env toy-reach-center" in line and "--total-steps 6000" in line
               for line in lines)
    done = tmp_path / "smoke" / "runs" / "core" / "toy-reach-center" / "seed1"
    done.mkdir(parents=True)
    (done / "DONE").write_text("x")
    started = tmp_path / "smoke" / "runs" / "core" / "toy-reach-center" / "seed2" / "runs" / "r"
    started.mkdir(parents=True)
    (started / "checkpoint.pt").write_bytes(b"")
    out = run_benchmark("smoke", "--dry-run", "--results", str(tmp_path), cwd=tmp_path)
    assert sum("[done]" in line for line in out.splitlines()) == 1
    resumed = [line for line in out.splitlines() if line.startswith("[resume]")]
    assert len(resumed) == 1 and f"--resume {started / 'checkpoint.pt'}" in resumed[0]


def test_dcs_jobs_follow_cores_protocol(tmp_path):
    jobs = benchmark.suite_jobs("dcs", ["core"], seeds=2, budget=None, results=tmp_path)
    assert len(jobs) == 12
    assert sorted({j.env for j in jobs}) == sorted(f"dcs-{t}" for t in benchmark.DCS_TASKS)
    cmd = " ".join(jobs[0].command())
    assert "--distraction medium --dynamic --total-steps 500000" in cmd
    assert "--eval-episodes 20" in cmd
    short = benchmark.suite_jobs("dcs", ["core"], seeds=1, budget=None, results=tmp_path,
                                 script_flags="--preset tiny --eval-episodes 2")
    assert " ".join(short[0].command()).endswith("--eval-episodes 20 --preset tiny --eval-episodes 2")


def test_slurm_script_has_one_array_task_per_job(tmp_path):
    jobs = benchmark.suite_jobs("dmc", ["core", "dreamerv2"], seeds=2, budget=1000,
                                tasks=["walker-walk"], results=tmp_path)
    path = benchmark.write_slurm(jobs, tmp_path / "dmc" / "slurm.sh", "01:00:00", 1)
    text = path.read_text()
    assert "#SBATCH --array=0-3" in text and "#SBATCH --gres=gpu:1" in text
    assert text.count("|core|") == 2 and text.count("|dreamerv2|") == 2
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_a_suite_runs_jobs_then_skips_them_on_rerun(tmp_path):
    """A real (tiny) job through run_jobs: DONE marker, metrics aggregated, rerun skips it."""
    job = benchmark.Job("dreamerv2", "toy-reach", 1,
                        ["--preset", "tiny", "--total-steps", "120", "--prefill", "60",
                         "--pretrain", "2", "--eval-every", "60", "--eval-episodes", "1"],
                        tmp_path / "smoke" / "runs" / "dreamerv2" / "toy-reach" / "seed1")
    [(_, rc)] = benchmark.run_jobs([job], workers=1)
    assert rc == 0 and job.done
    runs = benchmark.collect(tmp_path / "smoke" / "runs")
    steps, returns = runs["dreamerv2"]["toy-reach"]["seed1"]
    assert list(steps) == [60, 120] and np.all(np.isfinite(returns))
    assert benchmark.run_jobs([job], workers=1) == []
    # the smoke report judges the run against the random policy and lists it with its verdict
    summary = benchmark.report("smoke", 120, tmp_path)
    passed = benchmark.beats_random(returns, benchmark.policy_return("toy-reach"))
    assert summary["passed"] == passed
    text = (tmp_path / "smoke" / "summary.md").read_text()
    assert "| dreamerv2 | toy-reach | seed1 | " in text
    assert text.rstrip().endswith("| pass |" if passed else "| FAIL |")


def test_speed_with_tiny_sizes_writes_a_table(tmp_path):
    out = run_benchmark("speed", "--tiny", "--updates", "1", "--env", "toy-reach", "--device",
                        "cpu", "--results", str(tmp_path), cwd=tmp_path)
    (md,) = (tmp_path / "speed").glob("*-tiny.md")
    records = json.loads(md.with_suffix(".json").read_text())
    assert {r["algo"] for r in records} == set(benchmark.available_algorithms())
    for r in records:
        assert r["seconds_per_update"] > 0 and r["env_steps_per_second"] > 0
        assert r["parameters"] > 1000
        assert 0.05 < r["peak_host_memory_gib"] < 24  # torch alone is > 50 MiB resident
    assert "| algorithm | sizes | variant | parameters |" in md.read_text() and "wrote" in out
    assert {r["variant"] for r in records} == {"fp32"}  # a CPU measures fp32 unless asked
    (cvrl_row,) = [line for line in md.read_text().splitlines() if line.startswith("| cvrl |")]
    assert "(no MPC: " in cvrl_row  # CVRL's acting latency with and without its planner


def test_unknown_algorithm_gets_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "smoke", "--algos", "ppo",
                          "--dry-run"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode != 0 and "unknown or missing algorithm(s) ['ppo']" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_official_dreamerv2_curves_ship_with_the_repository():
    """reference/ holds the official scores (a clone needs nothing from outside); the quick
    check's reference numbers are the mean over its seeds at the same env steps."""
    assert benchmark.DREAMERV2_REFERENCE.is_relative_to(ROOT) or "RFWM_DREAMERV2_REFERENCE" in __import__("os").environ
    data = json.loads((ROOT / "reference" / "dreamerv2-dmc-vision-scores.json").read_text())
    walker = [d for d in data if d["task"] == "dmc_walker_walk"]
    assert len(walker) == 5
    at = lambda x: np.mean([d["ys"][d["xs"].index(x)] for d in walker])  # noqa: E731
    assert benchmark.reference_mean("dmc-walker-walk", 60_000) == pytest.approx(at(60_000.0))
    assert benchmark.reference_mean("dmc-walker-walk", 90_000) == pytest.approx(at(90_000.0))
    assert np.isnan(benchmark.reference_mean("dmc-walker-walk", 10_000))  # before its first point


@pytest.mark.parametrize("return_at_60k,verdict", [(180.0, "PASS"), (120.0, "FAIL")])
def test_quick_report_sets_runs_beside_the_official_curve_and_judges_the_target(
        tmp_path, monkeypatch, return_at_60k, verdict):
    root = tmp_path / "quick" / "runs"
    evals = [(s, 10.0 + s / 1000) for s in range(5000, 60_000, 5000)] + [(60_000, return_at_60k)]
    write_run(root, "dreamerv2", "dmc-walker-walk", "seed1", evals)
    write_run(root, "core", "dcs-walker-walk", "seed1", [(5000, 20.0), (10_000, 30.0)])
    monkeypatch.setattr(benchmark, "policy_return", lambda env, policy="random", episodes=200: 33.0)
    summary = benchmark.report("quick", 1_000_000, tmp_path)
    text = (tmp_path / "quick" / "summary.md").read_text()
    ref = benchmark.reference_mean("dmc-walker-walk", 60_000)
    assert f"| 60,000 | {return_at_60k:.1f} |  | {ref:.1f} |" in text
    assert "| 5,000 | 15.0 | 20.0 |  |" in text  # no official number before 30K
    assert "`dmc-walker-walk` 33.0" in text and "Target: DreamerV2 reaches 60,000" in text
    assert f": {verdict} (return {return_at_60k:.1f} at 60,000)" in text
    assert summary["passed"] is (verdict == "PASS")
    assert (tmp_path / "quick" / "curves.png").stat().st_size > 10_000


def test_quick_runs_both_agents_at_once_with_short_evaluations(tmp_path):
    jobs = benchmark.suite_jobs("quick", ["dreamerv2", "core"], seeds=1, budget=None,
                                results=tmp_path)
    assert [(j.algo, j.env) for j in jobs] == [("dreamerv2", "dmc-walker-walk"),
                                               ("core", "dcs-walker-walk")]
    core = " ".join(jobs[1].command())
    assert "--distraction medium --dynamic" in core and "--eval-every 5000" in core


def test_the_time_budget_interrupts_a_job_which_then_checkpoints_and_exits_130():
    import signal
    import time

    handler = "import signal, sys, time; signal.signal(signal.SIGINT, lambda *a: sys.exit(130)); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", handler])
    start = time.time()
    assert benchmark.wait_until(proc, start + 2.0) == 130
    assert time.time() - start < 30
    stubborn = subprocess.Popen([sys.executable, "-c",
                                 "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)"])
    assert benchmark.wait_until(stubborn, time.time() + 1.0, grace=1.0) == -signal.SIGKILL


def test_minigrid_suite_is_blasts_ladder_on_every_rendering_change(tmp_path):
    jobs = benchmark.suite_jobs("minigrid", ["blast"], seeds=5, budget=None, results=tmp_path)
    assert len(jobs) == 6 * 5 * 5
    assert {j.label for j in jobs} == {f"blast-{s}" for s in benchmark.BLAST_LADDER}
    assert {j.env for j in jobs} == {"minigrid-dynamic-obstacles-6x6"}
    one = [j for j in jobs if j.label == "blast-sg" and j.column.endswith("@video") and j.seed == 2]
    (job,) = one
    cmd = " ".join(job.command())
    assert "--distraction video --ladder sg --total-steps 50000" in cmd
    assert job.folder == tmp_path / "minigrid" / "runs" / "blast-sg" / "minigrid-dynamic-obstacles-6x6@video" / "seed2"
    with pytest.raises(SystemExit, match="needs blast.py"):
        benchmark.suite_jobs("minigrid", ["core"], seeds=1, budget=None, results=tmp_path)
    # the table lists the rungs in the ladder's order and the changes in Fig. 3's order
    one_run = {"s1": (np.array([50_000.0]), np.array([1.0]))}
    columns = [f"minigrid-dynamic-obstacles-6x6@{c}" for c in ("video", "none", "smaller_agent")]
    runs = {f"blast-{r}": {c: one_run for c in columns} for r in ("sg", "ar", "dreamerv2", "no-recon")}
    summary = benchmark.summarize(runs, 50_000, "minigrid")
    assert list(summary["rows"]) == ["blast-dreamerv2", "blast-no-recon", "blast-sg", "blast-ar"]
    assert [c.partition("@")[2] for c in summary["envs"]] == ["none", "smaller_agent", "video"]


def test_tables_name_the_video_source_and_mark_paper_rows_when_videos_differ(tmp_path):
    runs = {"cvrl": {"natural-walker-walk": {"seed1": (np.array([500_000.0]), np.array([600.0]))},
                     "natural-cheetah-run": {"seed1": (np.array([500_000.0]), np.array([200.0]))}}}
    pool = benchmark.video_source(None)
    summary = benchmark.summarize(runs, 500_000, "natural", pool)
    assert summary["envs"] == ["natural-walker-walk", "natural-cheetah-run"]  # Table 1's order
    (paper,) = [k for k in summary["rows"] if k.startswith("CVRL (paper")]
    assert paper.endswith("[their videos]") and summary["rows"][paper]["natural-walker-walk"][0] == 941.5
    text = benchmark.markdown(summary, "natural")
    assert "Background videos of these runs: the built-in offline pool" in text
    davis = benchmark.summarize(runs, 500_000, "natural", benchmark.video_source("/data/DAVIS"))
    assert "CVRL (paper, Table 1, at 5M steps)" in davis["rows"]
    jobs = benchmark.suite_jobs("dcs", ["core"], seeds=1, budget=None, results=tmp_path,
                                video_dir="/data/DAVIS")
    assert "--video-dir /data/DAVIS" in " ".join(jobs[0].command())


def test_cpu_suite_runs_every_algorithm_small_on_cartpole_and_two_on_minigrid(tmp_path):
    algos = ["dreamerv2", "core", "blast"]
    jobs = benchmark.suite_jobs("cpu", algos, seeds=2, budget=None, results=tmp_path)
    # task-major: with two workers the clean runs of every algorithm come first
    assert [j.column for j in jobs[:6]] == ["dmc-cartpole-swingup"] * 6
    assert len(jobs) == 2 * (3 + 3 + 3 + 2)  # clean, DCS medium, DCS background: 3; MiniGrid: 2
    minigrid = [j for j in jobs if j.column.startswith("minigrid")]
    assert {j.algo for j in minigrid} == set(benchmark.CPU_MINIGRID_ALGOS)
    for job in jobs:
        cmd = " ".join(job.command())
        assert "--preset small" in cmd and "--save-model" in cmd
        assert "--replay-checkpoint-every 1" in cmd  # a crashed run resumes with its replay
        steps = "50000" if job.column.startswith("minigrid") else "100000"
        assert f"--total-steps {steps}" in cmd
    dcs = [j for j in jobs if j.column == "dcs-cartpole-swingup"][0]
    assert "--distraction medium --dynamic" in " ".join(dcs.command())
    assert dcs.folder == tmp_path / "cpu" / "runs" / "dreamerv2" / "dcs-cartpole-swingup" / "seed1"
    # the background column: the same env with video backgrounds only, in a folder of its own
    background = [j for j in jobs if j.column == "dcs-cartpole-swingup@background"][0]
    assert background.env == "dcs-cartpole-swingup"
    assert "--distraction background --dynamic" in " ".join(background.command())
    assert background.folder.parent.name == "dcs-cartpole-swingup@background"
    # --budget shortens every task; script flags come last, so they win
    short = benchmark.suite_jobs("cpu", ["core"], seeds=1, budget=2000,
                                 tasks=["dmc-cartpole-swingup"], results=tmp_path,
                                 script_flags="--preset tiny")
    (job,) = short
    assert " ".join(job.command()).endswith("--total-steps 2000 --eval-every 10000 "
                                            "--eval-episodes 5 --preset tiny")


def test_cpu_suite_names_the_valid_tasks_for_an_unknown_one(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "cpu", "--tasks",
                          "nosuch-task", "--results", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "nosuch-task" in line and all(task in line for task in benchmark.CPU_TASKS)


def test_cpu_report_gives_return_updates_and_minutes_per_task_beside_the_reference_rows(tmp_path):
    root = tmp_path / "cpu" / "runs"
    curve = [(s, s / 400) for s in range(10_000, 100_001, 10_000)]  # 250 at 100K
    write_run(root, "core", "dmc-cartpole-swingup", "seed1", curve)
    write_run(root, "core", "dmc-cartpole-swingup", "seed2", [(s, r + 50) for s, r in curve])
    write_run(root, "dreamerv2", "dmc-cartpole-swingup", "seed1", curve[:5])  # unfinished
    runs = benchmark.collect(root)
    text = benchmark.report("cpu", None, tmp_path)["text"]
    lines = text.splitlines()
    assert ("| method | return at 100,000 | above random | mean of 80,000-100,000 | above random "
            "| per seed: at 100,000 / last three | updates | min / run |") in lines
    # write_run's clock: 100 + step / 10 s, so 10K..100K steps take 9000 s = 150 min; its
    # training records count step / 20 updates. Last three: (200 + 225 + 250) / 3 = 225.
    assert ("| core | 275 ± 25 (2) | - | 250 ± 25 (2) | - | 1: 250 / 225; 2: 300 / 275 | 5,000 "
            "| 150 |") in lines
    # an unfinished run is listed with its last evaluation and not counted
    assert "| dreamerv2 | - * | - | - * | - | 1: 125 at 50,000 (unfinished) | - | - |" in lines
    # no random_policy.json: the page says how to measure it, and no run is judged against it
    assert any(line.startswith("| random policy | not measured: run `python tools/random_policy.py")
               for line in lines)
    assert "| Dreamer at DMC-100K (CURL Table 1) | 326 | | | | | | |" in lines
    official = benchmark.reference_mean("dmc-cartpole-swingup", 100_000)
    last = np.mean([benchmark.reference_mean("dmc-cartpole-swingup", s)
                    for s in (80_000, 90_000, 100_000)])
    assert (f"| DreamerV2 official (clean, action repeat 2, full size, 5 seeds) | {official:.0f} | "
            f"| {last:.0f} | | | 10,000 | |") in lines
    assert (tmp_path / "cpu" / "curves.png").stat().st_size > 10_000
    assert (tmp_path / "cpu" / "distraction.png").stat().st_size > 10_000
    assert set(runs) == {"core", "dreamerv2"}


def write_cpu_run(root, algo, column, seed, evals, episodes=(), extra=()):
    """A run in the cpu suite's layout: evaluation records (step, return; None is written as
    null), training episodes (step at its end, return) and any `extra` records, as JSON lines."""
    folder = root / algo / column / seed / "runs" / "x"
    folder.mkdir(parents=True)
    records = [{"step": step, "time": 100.0 + step / 10, "charts/episodic_return": ret,
                "charts/episodic_length": 125.0} for step, ret in episodes]
    records += [{"step": step, "time": 100.0 + step / 10, "eval/episodic_return": ret}
                for step, ret in evals]
    records += list(extra)
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def evals_ending(last_three, early=100.0):
    """A cartpole run's ten evaluations (10K-100K): `early` until 70K, then `last_three`."""
    return [(s, early) for s in range(10_000, 80_000, 10_000)] + list(
        zip((80_000, 90_000, 100_000), last_three))


def write_random_policy(results, levels):
    """results/cpu/random_policy.json as tools/random_policy.py writes it: {column: (mean, se)}."""
    data = {c: dict(mean=m, se=se, sd=se * np.sqrt(75), n=75, returns=[m] * 75,
                    seeds=[1, 2, 3, 4, 5], rounds=[7, 8, 9], episodes_per_round=5,
                    command="python tools/random_policy.py")
            for c, (m, se) in levels.items()}
    (results / "cpu").mkdir(parents=True, exist_ok=True)
    (results / "cpu" / "random_policy.json").write_text(json.dumps(data))


def row(text, label, heading):
    """The table row of `label` under the markdown heading that starts with `heading`."""
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    (line,) = [line for line in section.splitlines() if line.startswith(f"| {label} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


CLEAN = "### `dmc-cartpole-swingup`"


def test_cpu_summary_gives_each_seed_the_last_three_mean_and_standard_errors(tmp_path):
    root = tmp_path / "cpu" / "runs"
    lasts = {1: (200, 230, 260), 2: (180, 170, 190), 3: (300, 280, 320)}
    for seed, last in lasts.items():
        write_cpu_run(root, "blast", "dmc-cartpole-swingup", f"seed{seed}", evals_ending(last))
    write_random_policy(tmp_path, {"dmc-cartpole-swingup": (120.0, 5.0)})
    summary = benchmark.report("cpu", None, tmp_path)
    cells = row(summary["text"], "blast", CLEAN)
    finals = [last[-1] for last in lasts.values()]
    means = [np.mean(last) for last in lasts.values()]
    se = lambda v: np.std(v, ddof=1) / np.sqrt(len(v))  # noqa: E731
    assert cells[1] == f"{np.mean(finals):.0f} ± {se(finals):.0f} (3)"
    assert cells[3] == f"{np.mean(means):.0f} ± {se(means):.0f} (3)"
    assert cells[5] == "; ".join(f"{k}: {v[-1]} / {np.mean(v):.0f}" for k, v in lasts.items())
    saved = json.loads((tmp_path / "cpu" / "summary.json").read_text())
    blast = saved["all"]["dmc-cartpole-swingup"]["blast"]
    assert blast["last_three"]["mean"] == pytest.approx(np.mean(means))
    assert blast["final"]["se"] == pytest.approx(se(finals))
    assert blast["seeds"]["2"]["last_three"] == pytest.approx(180)
    assert row(summary["text"], "random policy (75 episodes)", CLEAN)[1:4] == ["120 ± 5", "",
                                                                             "120 ± 5"]


@pytest.mark.parametrize("shift,verdict", [(0.0, "yes"), (-60.0, "no")])
def test_the_two_se_mark_says_whether_an_agent_beats_the_random_policy(tmp_path, shift, verdict):
    """Agent 200 ± 5.8 (three seeds: 190, 200, 210) against random 150 ± 5: the difference, 50,
    is more than 2 x 7.6; moved down by 60 it is not."""
    root = tmp_path / "cpu" / "runs"
    for k, final in enumerate((190, 200, 210)):
        write_cpu_run(root, "core", "dmc-cartpole-swingup", f"seed{k + 1}",
                      evals_ending([final + shift] * 3))
    write_random_policy(tmp_path, {"dmc-cartpole-swingup": (150.0, 5.0)})
    text = benchmark.report("cpu", None, tmp_path)["text"]
    cells = row(text, "core", CLEAN)
    assert cells[2] == cells[4] == verdict
    # the rule itself, at its edge: a difference of exactly 2 SE_diff is not enough
    random = dict(mean=100.0, se=3.0)
    edge = 2 * np.hypot(4.0, 3.0)
    assert benchmark.above_random(dict(mean=100 + edge + 1e-6, se=4.0, n=3), random) is True
    assert benchmark.above_random(dict(mean=100 + edge - 1e-6, se=4.0, n=3), random) is False
    assert benchmark.above_random(dict(mean=500.0, se=float("nan"), n=1), random) is None


def test_held_out_seeds_get_a_table_of_their_own(tmp_path):
    root = tmp_path / "cpu" / "runs"
    values = {1: 100, 2: 110, 3: 120, 4: 300, 5: 340}
    for seed, value in values.items():
        write_cpu_run(root, "cvrl", "dmc-cartpole-swingup", f"seed{seed}",
                      evals_ending([value] * 3))
    write_cpu_run(root, "cvrl", "dcs-cartpole-swingup", "seed1", evals_ending([90] * 3))
    text = benchmark.report("cpu", None, tmp_path)["text"]
    all_seeds = row(text, "cvrl", CLEAN)
    held = row(text, "cvrl", "### `dmc-cartpole-swingup` (`dmc-cartpole-swingup --distraction "
                             "none`, 100,000 env steps), seeds >= 4")
    every = list(values.values())
    assert all_seeds[1] == f"{np.mean(every):.0f} ± {np.std(every, ddof=1) / np.sqrt(5):.0f} (5)"
    assert held[1] == "320 ± 20 (2)" and held[5] == "4: 300 / 300; 5: 340 / 340"
    # a column without seeds >= 4 has no held-out table
    assert "`dcs-cartpole-swingup --distraction medium --dynamic`, 100,000 env steps), seeds" \
        not in text


def test_background_runs_give_the_fraction_of_the_clean_return_kept(tmp_path):
    """Kept = background / clean with the SE of first-order error propagation; a reconstruction-
    free agent keeps more than DreamerV2 only by more than two SE of the difference."""
    root = tmp_path / "cpu" / "runs"
    clean = {"dreamerv2": (200, 220, 240), "core": (200, 220, 240), "blast": (200, 220, 240)}
    background = {"dreamerv2": (100, 110, 120), "core": (190, 200, 210), "blast": (60, 110, 250)}
    for algo in clean:
        for k in range(3):
            write_cpu_run(root, algo, "dmc-cartpole-swingup", f"seed{k + 1}",
                          evals_ending([clean[algo][k]] * 3))
            write_cpu_run(root, algo, "dcs-cartpole-swingup@background", f"seed{k + 1}",
                          evals_ending([background[algo][k]] * 3))
    write_random_policy(tmp_path, {c: (150.0, 5.0) for c in ("dmc-cartpole-swingup",
                                                              "dcs-cartpole-swingup@background")})
    summary = benchmark.report("cpu", None, tmp_path)
    text = summary["text"]
    se = lambda v: np.std(v, ddof=1) / np.sqrt(len(v))  # noqa: E731
    b, c = np.mean(background["core"]), np.mean(clean["core"])
    expected = np.hypot(se(background["core"]) / c, b * se(clean["core"]) / c ** 2)
    kept = summary["numbers"]["distraction"]["core"]["last_three"]["kept"]
    assert kept["mean"] == pytest.approx(b / c) and kept["se"] == pytest.approx(expected)
    assert row(text, "core", "## Clean against")[3] == f"{b / c:.2f} ± {expected:.2f}"
    # core keeps 0.91 ± 0.05 against DreamerV2's 0.50 ± 0.04: larger; blast's 0.64 ± 0.26 is
    # too uncertain to tell; DreamerV2's background return (110) is not above random (150)
    assert "- **core**: " in text and "Against DreamerV2's fraction: at 100,000 larger" in text
    (blast,) = [line for line in text.splitlines() if line.startswith("- **blast**")]
    assert "at 100,000 cannot tell" in blast and "last three cannot tell" in blast
    # why not: the seeds per column at which blast's difference would pass the two-SE rule
    distraction = summary["numbers"]["distraction"]
    mine, theirs = (distraction[a]["last_three"]["kept"] for a in ("blast", "dreamerv2"))
    spread = mine["se"] ** 2 * 3 + theirs["se"] ** 2 * 3
    seeds = int(4 * spread / (mine["mean"] - theirs["mean"]) ** 2) + 1
    assert seeds > 3 and f"needs about {seeds} seeds per column" in blast.split("last three")[-1]
    assert 2 * np.sqrt(spread / seeds) < abs(mine["mean"] - theirs["mean"]) < 2 * np.sqrt(
        spread / (seeds - 1))
    (dreamer,) = [line for line in text.splitlines() if line.startswith("- **dreamerv2**")]
    assert "above the random policy by more than two SE: no" in dreamer
    assert "Only core, by more than two SE by both measures." in text
    assert "blast: cannot tell by either measure" in text
    assert (tmp_path / "cpu" / "distraction.png").stat().st_size > 10_000


def test_the_margin_kept_measures_the_lead_over_random_not_the_floor(tmp_path):
    """An agent at the random level on the background keeps ~0.6 of its clean return but none of
    its margin over random; the margin's SE carries the random policy's SE too."""
    root = tmp_path / "cpu" / "runs"
    clean, background = (240, 250, 260), (140, 150, 160)
    for k in range(3):
        write_cpu_run(root, "cvrl", "dmc-cartpole-swingup", f"seed{k + 1}",
                      evals_ending([clean[k]] * 3))
        write_cpu_run(root, "cvrl", "dcs-cartpole-swingup@background", f"seed{k + 1}",
                      evals_ending([background[k]] * 3))
    write_random_policy(tmp_path, {c: (150.0, 5.0) for c in ("dmc-cartpole-swingup",
                                                              "dcs-cartpole-swingup@background")})
    summary = benchmark.report("cpu", None, tmp_path)
    numbers = summary["numbers"]["distraction"]["cvrl"]["last_three"]
    assert numbers["kept"]["mean"] == pytest.approx(0.6)
    margin = numbers["margin_kept"]
    se = 10 / np.sqrt(3)  # each column's SE over its three seeds
    expected = np.sqrt((se / 100) ** 2 + (0 * se / 100 ** 2) ** 2 + (-100 * 5.0 / 100 ** 2) ** 2)
    assert margin["mean"] == pytest.approx(0.0, abs=1e-12)
    assert margin["se"] == pytest.approx(expected)
    assert row(summary["text"], "cvrl", "## Clean against")[7] == f"0.00 ± {expected:.2f} / " \
                                                                   f"0.00 ± {expected:.2f}"
    # no margin where the clean return is not above the random policy's
    low = benchmark.margin_kept(dict(mean=100.0, se=1.0, n=3), dict(mean=140.0, se=1.0, n=3),
                                dict(mean=150.0, se=5.0))
    assert low["n"] == 0


def test_the_page_says_which_verdicts_the_prefill_random_level_would_turn(tmp_path):
    """The measured random level 120 ± 5 against prefill episodes at ~196 ± 2: core (200 ± 5.8)
    is above the first by two SE and not above the second; the page says so."""
    root = tmp_path / "cpu" / "runs"
    prefill = [(k * 1000, 185.0 + (k % 2) * 20) for k in range(1, 9)]
    for k, final in enumerate((190, 200, 210)):
        write_cpu_run(root, "core", "dmc-cartpole-swingup", f"seed{k + 1}",
                      evals_ending([final] * 3), [(s, r + k) for s, r in prefill])
    write_random_policy(tmp_path, {"dmc-cartpole-swingup": (120.0, 5.0)})
    text = benchmark.report("cpu", None, tmp_path)["text"]
    assert row(text, "core", CLEAN)[2] == "yes"
    (line,) = [x for x in text.splitlines() if x.startswith("- `dmc-cartpole-swingup`: prefill")]
    assert "against measured 120.0 ± 5.0" in line
    assert "core at the budget (yes -> no), core last three (yes -> no)" in line
    # with the prefill at the measured level nothing turns
    write_random_policy(tmp_path, {"dmc-cartpole-swingup": (197.0, 5.0)})
    text = benchmark.report("cpu", None, tmp_path)["text"]
    assert "no verdict would turn" in text


def test_without_dreamerv2_on_both_columns_the_page_cannot_tell(tmp_path):
    root = tmp_path / "cpu" / "runs"
    for k in range(2):
        write_cpu_run(root, "core", "dmc-cartpole-swingup", f"seed{k + 1}", evals_ending([250] * 3))
        write_cpu_run(root, "core", "dcs-cartpole-swingup@background", f"seed{k + 1}",
                      evals_ending([240 + k] * 3))
        write_cpu_run(root, "dreamerv2", "dmc-cartpole-swingup", f"seed{k + 1}",
                      evals_ending([250] * 3))
    text = benchmark.report("cpu", None, tmp_path)["text"]
    assert "Cannot tell yet: DreamerV2 has no finished runs on both" in text
    assert "- **dreamerv2**: no finished run on the background column yet." in text


def test_null_and_nan_values_are_missing_values_not_crashes(tmp_path):
    """The scripts write null for a non-finite value (NaN is not JSON); older files hold NaN.
    Both are left out: of the last-three mean, the updates, the curves; never printed as nan."""
    root = tmp_path / "cpu" / "runs"
    folder = root / "dreamerv2" / "dmc-cartpole-swingup" / "seed1" / "runs" / "x"
    folder.mkdir(parents=True)
    lines = [json.dumps({"step": s, "time": 100.0 + s / 10, "eval/episodic_return": r})
             for s, r in evals_ending((200, None, 260))]
    lines += ['{"step": 85000, "time": 9000.0, "charts/updates": NaN, "losses/model": NaN}',
              '{"step": 95000, "time": 9500.0, "charts/updates": null, "losses/model": null}',
              '{"step": 99000, "time": 9900.0, "charts/updates": 3000, "losses/model": 1.0}']
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    write_cpu_run(root, "dreamerv2", "dmc-cartpole-swingup", "seed2",
                  evals_ending((float("nan"), 240, 250)))  # json.dumps writes NaN
    assert "NaN" in next((root / "dreamerv2" / "dmc-cartpole-swingup" / "seed2").glob(
        "**/metrics.jsonl")).read_text()
    steps, returns = benchmark.read_evals(next(folder.glob("metrics.jsonl")))
    assert np.isnan(returns[-2]) and returns[-1] == 260
    summary = benchmark.report("cpu", None, tmp_path)
    cells = row(summary["text"], "dreamerv2", CLEAN)
    assert cells[5] == "1: 260 / 230; 2: 250 / 245"  # (200 + 260) / 2 and (240 + 250) / 2
    assert cells[6] == "3,000"
    assert not re.search(r"\bnan\b", summary["text"], re.IGNORECASE)
    json.loads((tmp_path / "cpu" / "summary.json").read_text(),
               parse_constant=lambda c: pytest.fail(f"{c} in summary.json"))
    # a final evaluation written as null: that seed has no value at the budget
    write_cpu_run(root, "dreamerv2", "dmc-cartpole-swingup", "seed3",
                  evals_ending((200, 210, None)))
    cells = row(benchmark.report("cpu", None, tmp_path)["text"], "dreamerv2", CLEAN)
    assert cells[1] == "255 ± 5 (2)" and "3: - / 205" in cells[5]


def test_random_prefill_episodes_are_counted_once_per_seed_and_only_in_the_prefill(tmp_path):
    """Runs of the same seed replay the same prefill episodes (to float rounding); episodes after
    the prefill's 8,000 env steps (1000 agent steps x action repeat 8) are the agent's own."""
    root = tmp_path / "cpu" / "runs"
    seed1 = [(k * 1000, 100.0 + k) for k in range(1, 9)]
    seed2 = [(k * 1000, 200.0 + 2 * k) for k in range(1, 9)]
    agents = [(9000, 500.0), (10_000, 600.0)]
    write_cpu_run(root, "dreamerv2", "dmc-cartpole-swingup", "seed1", evals_ending([250] * 3),
                  seed1 + agents)
    write_cpu_run(root, "core", "dmc-cartpole-swingup", "seed1", evals_ending([250] * 3),
                  [(s, r + 1e-12) for s, r in seed1] + agents)
    write_cpu_run(root, "core", "dmc-cartpole-swingup", "seed2", evals_ending([250] * 3), seed2)
    prefill = benchmark.prefill_episodes(root, "dmc-cartpole-swingup")
    assert sorted(prefill["returns"]) == pytest.approx(sorted(r for _, r in seed1 + seed2))
    assert prefill["env_steps"] == {"core": 8000, "dreamerv2": 8000}
    text = benchmark.report("cpu", None, tmp_path)["text"]
    values = [r for _, r in seed1 + seed2]
    cells = row(text, f"random prefill episodes of these runs (16 episodes, SD "
                      f"{np.std(values, ddof=1):.0f})", CLEAN)
    assert cells[1] == f"{np.mean(values):.0f} ± {np.std(values, ddof=1) / 4:.0f}"


def test_cpu_prefill_is_each_scripts_small_preset():
    """The report's prefill lengths (CPU_PREFILL) are the scripts' own `--preset small` values."""
    import importlib

    def prefill(algo, env):
        parsed = importlib.import_module(algo).parse_args(["--preset", "small", "--env", env])
        parts = parsed if isinstance(parsed, tuple) else (parsed,)  # (Args, run settings)
        (value,) = {part.prefill for part in parts if hasattr(part, "prefill")}
        return value

    for algo in benchmark.available_algorithms():
        assert prefill(algo, "dmc-cartpole-swingup") == benchmark.CPU_PREFILL[algo], algo
    for algo in benchmark.CPU_MINIGRID_ALGOS:
        expected = benchmark.CPU_PREFILL_MINIGRID.get(algo, benchmark.CPU_PREFILL[algo])
        assert prefill(algo, benchmark.MINIGRID_ENV) == expected, algo


FAKE_RECORD = dict(seconds_per_update=0.5, updates=1, parameters=2e6, env="toy-reach",
                   env_steps_per_second=100.0, policy_ms=3.0, device="cpu", precision="fp32",
                   compile=False, peak_host_memory_gib=0.3)


def test_speed_records_a_failing_or_timed_out_variant_and_measures_the_others(tmp_path):
    """One (algorithm, variant) that crashes or hangs costs only its own row: it is recorded as
    FAILED with its last error line (or TIMEOUT), and the results on disk are rewritten after
    every measurement (the failing script reports what it found there)."""
    out = tmp_path / "speed"
    good = tmp_path / "good.py"
    good.write_text(f"import json, sys\nprint('warming up')\nprint(json.dumps({FAKE_RECORD!r}))\n")
    bad = tmp_path / "bad.py"
    bad.write_text("import glob, json, sys\n"
                   f"files = glob.glob({str(out / '*.json')!r})\n"
                   "done = len(json.load(open(files[0]))) if files else 0\n"
                   "print('Traceback (most recent call last): ...', file=sys.stderr)\n"
                   "raise RuntimeError(f'CUDA error: out of memory ({done} results on disk)')\n")
    slow = tmp_path / "slow.py"
    slow.write_text("import time\ntime.sleep(60)\n")
    results = benchmark.speed({"dreamerv2": good, "core": bad, "cvrl": slow}, 1, True, "toy-reach",
                              out, "cpu", variants=["fp32", "bf16"], timeout=3)
    assert [(r["variant"], r["algo"], r["status"]) for r in results] == [
        ("fp32", "dreamerv2", "ok"), ("fp32", "core", "FAILED"), ("fp32", "cvrl", "TIMEOUT"),
        ("bf16", "dreamerv2", "ok"), ("bf16", "core", "FAILED"), ("bf16", "cvrl", "TIMEOUT")]
    (md,) = out.glob("*-tiny.md")
    saved = json.loads(md.with_suffix(".json").read_text())
    assert saved == results
    assert results[0]["seconds_per_update"] == 0.5
    assert results[1]["error"] == "exit 1: RuntimeError: CUDA error: out of memory (1 results on disk)"
    table = md.read_text()
    assert "| dreamerv2 | tiny | bf16 | 2.00M | 0.500 |" in table
    assert "| core | tiny | fp32 | - | FAILED: exit 1: RuntimeError: CUDA error: out of memory" in table
    assert "| cvrl | tiny | bf16 | - | TIMEOUT: no result within --variant-timeout 3 s |" in table

    # a later call for other variants keeps these rows and replaces only the ones it measures
    benchmark.speed({"core": good}, 1, True, "toy-reach", out, "cpu", variants=["fp32"])
    saved = {(r["algo"], r["variant"]): r["status"] for r in json.loads(md.with_suffix(".json").read_text())}
    assert saved[("core", "fp32")] == "ok" and saved[("core", "bf16")] == "FAILED"
    assert saved[("dreamerv2", "bf16")] == "ok" and len(saved) == 6


def test_speed_variants_flag_accepts_only_known_variants(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "speed", "--variants", "fp16"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode != 0 and "invalid choice: 'fp16'" in out.stderr


def test_workers_get_gpus_within_the_callers_mask_and_a_share_of_the_cores(monkeypatch):
    """torch counts the GPUs the caller's CUDA_VISIBLE_DEVICES leaves visible (faked here: 2 of a
    host's 4); workers are spread over exactly those, MuJoCo renders on the same GPU, and the
    cores are split between workers on GPU hosts too."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert benchmark.visible_gpus() == ["2", "3"] and benchmark.gpu_count() == 2
    envs = [benchmark.worker_env(slot, 4, benchmark.visible_gpus(), 16) for slot in range(4)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "3", "2", "3"]
    assert [e["MUJOCO_EGL_DEVICE_ID"] for e in envs] == ["2", "3", "2", "3"]
    assert all(e["OMP_NUM_THREADS"] == e["LP_NUM_THREADS"] == "4" for e in envs)
    import os
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"  # the caller's own mask is untouched

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert benchmark.visible_gpus() == ["0", "1", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f0e,GPU-11aa")  # UUIDs: no EGL index known
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    env = benchmark.worker_env(1, 1, benchmark.visible_gpus(), 16)
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-11aa" and "MUJOCO_EGL_DEVICE_ID" not in env
    assert "OMP_NUM_THREADS" not in env or env["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS")

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # a CPU host: only the thread split
    env = benchmark.worker_env(0, 2, benchmark.visible_gpus(), 2)
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-8f0e,GPU-11aa" and env["OMP_NUM_THREADS"] == "1"


def test_a_job_killed_by_a_signal_leaves_its_python_stack_in_the_log(monkeypatch):
    """A run that dies inside native code (a segfault, malloc's abort) would otherwise leave only
    libc's one line: the job's environment turns on faulthandler."""
    monkeypatch.delenv("PYTHONFAULTHANDLER", raising=False)
    env = benchmark.worker_env(0, 1, [], 2)
    crash = "import ctypes\ndef read_null():\n    ctypes.string_at(0)\nread_null()\n"
    out = subprocess.run([sys.executable, "-c", crash], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "Fatal Python error: Segmentation fault" in out.stderr and "read_null" in out.stderr


def _scripted_job(tmp_path, monkeypatch, script: str) -> benchmark.Job:
    """A job whose command is `script` (Python; it counts its starts in starts.txt)."""
    job = benchmark.Job("blast", "dmc-cartpole-swingup", 1, [], tmp_path / "seed1")
    monkeypatch.setattr(benchmark.Job, "command",
                        lambda self: [sys.executable, "-c", COUNT_STARTS + script])
    return job


def test_a_job_that_crashes_natively_is_resumed_and_a_killed_one_is_not(tmp_path, monkeypatch,
                                                                         capsys):
    """A segfault or malloc's abort (rare, inside native libraries) reruns the job's command, which
    resumes from its checkpoint; a job that keeps crashing stops after CRASH_RETRIES retries, and
    one killed on purpose (SIGKILL) is never rerun."""
    job = _scripted_job(tmp_path, monkeypatch, "import os\nif n == 1: os.abort()\n")
    [(_, rc)] = benchmark.run_jobs([job], workers=1)
    assert rc == 0 and job.done and (job.folder / "starts.txt").read_text() == "2"
    assert "crashed (SIGABRT)" in capsys.readouterr().out

    job = _scripted_job(tmp_path / "b", monkeypatch, "import ctypes\nctypes.string_at(0)\n")
    [(_, rc)] = benchmark.run_jobs([job], workers=1)
    assert rc == -signal.SIGSEGV and not job.done
    assert (job.folder / "starts.txt").read_text() == str(benchmark.CRASH_RETRIES + 1)

    kill = "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"
    job = _scripted_job(tmp_path / "c", monkeypatch, kill)
    [(_, rc)] = benchmark.run_jobs([job], workers=1)
    assert rc == -signal.SIGKILL and (job.folder / "starts.txt").read_text() == "1"


def test_an_unfinished_job_resumes_from_an_absolute_checkpoint_path(tmp_path, monkeypatch):
    """A job runs inside its own folder, so the --resume path it gets must not be relative to the
    directory benchmark.sh was started from (results/ is relative by default)."""
    monkeypatch.chdir(tmp_path)
    folder = Path("results") / "cpu" / "runs" / "blast" / "task" / "seed1"
    (folder / "runs" / "run1").mkdir(parents=True)
    (folder / "runs" / "run1" / "checkpoint.pt").write_bytes(b"")
    cmd = benchmark.Job("blast", "dmc-cartpole-swingup", 1, [], folder).command()
    resume = Path(cmd[cmd.index("--resume") + 1])
    assert resume.is_absolute() and resume == (folder / "runs" / "run1" / "checkpoint.pt").resolve()


# ---------------------------------------------------------------------------------------------
# transfer: every finished run on every test setting of its task
# ---------------------------------------------------------------------------------------------


def job_folder(results, algo, column, seed, runs=("r1",), done=True):
    """A job folder of results/cpu/runs with a checkpoint.pt in each of `runs` (empty files:
    listing the jobs never opens them) and DONE where `done`."""
    folder = results / "cpu" / "runs" / algo / column / seed
    for run in runs:
        (folder / "runs" / run).mkdir(parents=True)
        (folder / "runs" / run / "checkpoint.pt").write_bytes(b"")
    folder.mkdir(parents=True, exist_ok=True)
    if done:
        (folder / "DONE").write_text("x")
    return folder


def write_evaluation(folder, run, env, distraction, returns, trained_on=("dmc-cartpole-swingup",
                     "none"), split="val", stamp=1000, env_steps=100_000):
    """What `--evaluate` writes: <job>/runs/<run>__eval__<env>__<distraction>__<split>__<time>/."""
    where = folder / "runs" / f"{run}__eval__{env}__{distraction}__{split}__{stamp}"
    where.mkdir(parents=True)
    report = dict(checkpoint=f"runs/{run}/checkpoint.pt", env_steps=env_steps,
                  trained_on=dict(env=trained_on[0], distraction=trained_on[1]), env=env,
                  distraction=distraction, dynamic=True, split=split, video_dir=None,
                  seeds=list(range(len(returns))), returns=[float(r) for r in returns],
                  mean=float(np.mean(returns)), standard_error=None)
    (where / "evaluation.json").write_text(json.dumps(report))
    return where


def test_transfer_jobs_are_every_finished_run_on_every_test_setting_of_its_task(tmp_path):
    clean = job_folder(tmp_path, "core", "dmc-cartpole-swingup", "seed1")
    # resumed into a new folder once: the finished run is the last one (Job.command resumes it)
    background = job_folder(tmp_path, "core", "dcs-cartpole-swingup@background", "seed2",
                            runs=("dcs__core__2__100", "dcs__core__2__200"))
    minigrid = job_folder(tmp_path, "blast-sg", "minigrid-dynamic-obstacles-6x6@video", "seed1")
    job_folder(tmp_path, "dreamerv2", "dmc-cartpole-swingup", "seed2", done=False)  # unfinished
    no_checkpoint = tmp_path / "cpu" / "runs" / "dreamerv2" / "dmc-cartpole-swingup" / "seed3"
    no_checkpoint.mkdir(parents=True)
    (no_checkpoint / "DONE").write_text("x")  # a clone: metrics committed, *.pt not
    # done before: the same checkpoint, setting, split and episode count
    write_evaluation(clean, "r1", "dcs-cartpole-swingup", "hard", [1.0] * 10)
    # not done: another episode count, the training videos, another run's checkpoint
    write_evaluation(clean, "r1", "dcs-cartpole-swingup", "easy", [1.0] * 3)
    write_evaluation(clean, "r1", "dcs-cartpole-swingup", "medium", [1.0] * 10, split="train")
    write_evaluation(background, "dcs__core__2__100", "dmc-cartpole-swingup", "none", [1.0] * 10)

    algos = benchmark.available_algorithms()
    jobs, skipped = benchmark.transfer_jobs(tmp_path, "cpu", algos, episodes=10)
    by_run = {}
    for job in jobs:
        by_run.setdefault(job.folder, []).append((job.setting, job.done))
    cartpole = ["dmc-cartpole-swingup", "dcs-cartpole-swingup@easy", "dcs-cartpole-swingup@medium",
                "dcs-cartpole-swingup@hard", "dcs-cartpole-swingup@background"]
    assert by_run[clean] == [(s, s == "dcs-cartpole-swingup@hard") for s in cartpole]
    assert by_run[background] == [(s, False) for s in cartpole]
    changes = ["none", "color_direction", "smaller_agent", "random_frames", "video"]
    assert [s for s, _ in by_run[minigrid]] == [
        benchmark.setting_label("minigrid-dynamic-obstacles-6x6", c) for c in changes]
    assert len(by_run) == 3
    assert sorted(line.split(": ", 1)[1] for line in skipped) == [
        "no checkpoint (runs/*/checkpoint.pt)", "not finished (no DONE)"]

    # each evaluation runs the script the run was trained with, in the job folder, on the DCS
    # validation videos (dynamic) with the latest checkpoint
    job = next(j for j in jobs if j.folder == background and j.distraction == "medium")
    assert job.command()[1:] == [
        str(ROOT / "core.py"), "--evaluate", "runs/dcs__core__2__200/checkpoint.pt", "--env",
        "dcs-cartpole-swingup", "--distraction", "medium", "--eval-split", "val",
        "--eval-episodes", "10", "--dynamic"]
    rung = next(j for j in jobs if j.folder == minigrid)
    assert rung.command()[1] == str(ROOT / "blast.py") and "--dynamic" not in rung.command()

    # --levels and --algos choose; each task keeps the levels valid for it
    jobs, _ = benchmark.transfer_jobs(tmp_path, "cpu", {"blast": algos["blast"]},
                                      levels=("none", "background", "video"))
    assert [j.setting for j in jobs] == ["minigrid-dynamic-obstacles-6x6",
                                         "minigrid-dynamic-obstacles-6x6@video"]
    jobs, _ = benchmark.transfer_jobs(tmp_path, "cpu", algos, levels=("none", "background"))
    assert {j.setting for j in jobs if j.folder == clean} == {"dmc-cartpole-swingup",
                                                              "dcs-cartpole-swingup@background"}

    # the command line lists them without running anything
    out = run_benchmark("transfer", "cpu", "--dry-run", "--results", str(tmp_path), cwd=tmp_path)
    lines = out.splitlines()
    assert sum(line.startswith("[done]") for line in lines) == 1
    assert sum(line.startswith("[new]") for line in lines) == 14
    assert lines[-1] == "15 evaluations of 3 finished runs; 2 job folders skipped"


def test_transfer_table_is_mean_and_standard_error_over_seeds_of_each_seeds_mean(tmp_path):
    runs = tmp_path / "cpu" / "runs"
    clean = ("dmc-cartpole-swingup", "none")
    background = ("dcs-cartpole-swingup", "background")
    for seed, (on_clean, on_easy) in enumerate([(100, 50), (200, None), (300, None)], start=1):
        folder = runs / "core" / "dmc-cartpole-swingup" / f"seed{seed}"
        write_evaluation(folder, "r", "dmc-cartpole-swingup", "none",
                         [on_clean - 10, on_clean + 10])
        if on_easy is not None:
            write_evaluation(folder, "r", "dcs-cartpole-swingup", "easy", [on_easy] * 2)
    folder = runs / "dreamerv2" / "dcs-cartpole-swingup@background" / "seed1"
    for episodes, value, stamp in [(2, 40, 1), (5, 60, 2), (2, 80, 3)]:
        write_evaluation(folder, "r", "dcs-cartpole-swingup", "background", [value] * episodes,
                         trained_on=background, stamp=stamp)
    write_evaluation(folder, "r", "dmc-cartpole-swingup", "none", [10, 30], trained_on=background)
    write_evaluation(folder, "r", "dcs-cartpole-swingup", "easy", [999] * 2, trained_on=background,
                     split="train")  # not the validation videos: left out
    (tmp_path / "cpu" / "random_policy.json").write_text(json.dumps({
        "dmc-cartpole-swingup": dict(env="dmc-cartpole-swingup", distraction="none", mean=116.4,
                                     se=7.3, n=75),
        "minigrid-dynamic-obstacles-6x6@video": dict(
            env="minigrid-dynamic-obstacles-6x6", distraction="video", mean=-15.6, se=0.3, n=150)}))

    summary = benchmark.transfer_report("cpu", tmp_path)
    text = (tmp_path / "cpu" / "transfer.md").read_text()
    assert ("| method | trained on | seeds | env steps | dmc-cartpole-swingup | "
            "dcs-cartpole-swingup@easy "
            "| dcs-cartpole-swingup@background |") in text
    # 200 ± SD(100, 200, 300) / sqrt(3) = 57.7 over three seeds; one seed: no SE
    assert ("| core | dmc-cartpole-swingup | 1, 2, 3 | 100,000 | 200 ± 58 (3) | 50 (1) | - |"
            in text)
    # the most episodes of a setting count (5 at 60), not the newer 2-episode one
    assert ("| dreamerv2 | dcs-cartpole-swingup@background | 1 | 100,000 | 20 (1) | - | 60 (1) |"
            in text)
    assert "| random policy | - | - | - | 116 ± 7 (75 episodes) | - | - |" in text
    assert "minigrid" not in text.split("Random policy:")[0]  # no MiniGrid runs: no table
    saved = json.loads((tmp_path / "cpu" / "transfer.json").read_text())
    cell = saved["tables"]["cartpole-swingup"]["rows"][0]["cells"]["dmc-cartpole-swingup"]
    assert cell["seeds"] == {"1": 100, "2": 200, "3": 300} and cell["n"] == 3
    assert cell["se"] == pytest.approx(100 / np.sqrt(3))
    assert summary["episodes"] == [2, 5]
    # asked for 2 episodes: the newest 2-episode evaluation (80)
    benchmark.transfer_report("cpu", tmp_path, episodes=2)
    text = (tmp_path / "cpu" / "transfer.md").read_text()
    assert ("| dreamerv2 | dcs-cartpole-swingup@background | 1 | 100,000 | 20 (1) | - | 80 (1) |"
            in text)
    # `report transfer` rewrites it from the evaluation.json files alone (no checkpoint here)
    (tmp_path / "cpu" / "transfer.md").unlink()
    run_benchmark("report", "transfer", "cpu", "--results", str(tmp_path), cwd=tmp_path)
    assert "| core | dmc-cartpole-swingup | 1, 2, 3 | 100,000 | 200 ± 58 (3) | 50 (1) | - |" in (
        tmp_path / "cpu" / "transfer.md").read_text()


def test_evaluation_files_are_committed_and_their_event_files_and_videos_are_not():
    folder = "results/cpu/runs/core/dcs-cartpole-swingup/seed1"
    run = "dcs-cartpole-swingup__core__1__1"
    evaluation = f"{folder}/runs/{run}__eval__dmc-cartpole-swingup__none__val__2"

    def ignored(path):
        out = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path])
        if out.returncode not in (0, 1):  # only outside a git checkout (an unpacked archive);
            pytest.skip("not a git checkout")  # CI runs on a clone, where this test always runs
        return out.returncode == 0

    assert not ignored(f"{evaluation}/evaluation.json")
    assert not ignored(f"{folder}/transfer-log.txt") and not ignored("results/cpu/transfer.md")
    assert ignored(f"{evaluation}/events.out.tfevents.1.vm.1.0")
    assert ignored(f"{evaluation}/video.mp4")
    assert ignored(f"{folder}/runs/{run}/checkpoint.pt")


def test_transfer_evaluates_a_finished_run_on_both_toy_tasks_then_skips_them(tmp_path):
    """End to end: a tiny DreamerV2 run on toy-reach (the toys have no distraction levels; their
    two tasks are each other's test setting), then `transfer` with real --evaluate subprocesses."""
    folder = tmp_path / "smoke" / "runs" / "dreamerv2" / "toy-reach" / "seed1"
    job = benchmark.Job("dreamerv2", "toy-reach", 1,
                        ["--preset", "tiny", "--total-steps", "100", "--prefill", "50",
                         "--pretrain", "1", "--eval-every", "0", "--eval-episodes", "1"], folder)
    [(_, rc)] = benchmark.run_jobs([job], workers=1)
    assert rc == 0 and job.done
    [run] = [p.parent for p in folder.glob("runs/*/checkpoint.pt")]
    metrics = (run / "metrics.jsonl").read_text()

    argv = ["transfer", "smoke", "--algos", "dreamerv2", "--eval-episodes", "2", "--workers", "2",
            "--results", str(tmp_path)]
    assert benchmark.main(argv) == 0
    made = sorted(folder.glob("runs/*__eval__*/evaluation.json"))
    assert [p.parent.name.split("__eval__")[1].rsplit("__", 1)[0] for p in made] == [
        "toy-reach-center__none__val", "toy-reach__none__val"]
    means = {}
    for path in made:
        e = json.loads(path.read_text())
        assert path.parent.name.startswith(f"{run.name}__eval__")
        assert e["checkpoint"] == f"runs/{run.name}/checkpoint.pt" and e["env_steps"] == 100
        assert e["trained_on"]["env"] == "toy-reach" and len(e["returns"]) == 2
        means[e["env"]] = e["mean"]
    text = (tmp_path / "smoke" / "transfer.md").read_text()
    assert "| method | trained on | seeds | env steps | toy-reach | toy-reach-center |" in text
    assert (f"| dreamerv2 | toy-reach | 1 | 100 | {means['toy-reach']:.0f} (1) | "
            f"{means['toy-reach-center']:.0f} (1) |") in text
    assert (run / "metrics.jsonl").read_text() == metrics  # the run itself is untouched

    # a rerun finds both evaluations done and starts nothing
    assert benchmark.main(argv) == 0
    assert sorted(folder.glob("runs/*__eval__*/evaluation.json")) == made


def test_the_headline_table_gives_each_agent_clean_background_and_the_fraction_kept():
    stat = lambda mean, se, n: dict(mean=mean, se=se, n=n)  # noqa: E731
    table = benchmark.headline_table({
        "core": {"last_three": dict(clean=stat(250.0, 10.0, 5), background=stat(200.0, 20.0, 3),
                                    kept=stat(0.8, 0.09, 3), margin_kept=stat(0.6, 0.15, 3))},
        "dreamerv2": {"last_three": dict(clean=stat(230.0, 8.0, 5), background=stat(float("nan"),
                                         float("nan"), 0), kept=stat(None, None, 0),
                                         margin_kept=stat(float("nan"), float("nan"), 0))}})
    lines = table.splitlines()
    assert lines[2] == "| dreamerv2 (reconstruction) | 230 ± 8 (5) | - | - | - |"  # baseline first
    assert lines[3] == ("| core | 250 ± 10 (5) | 200 ± 20 (3) | 0.80 ± 0.09 (3) | "
                        "0.60 ± 0.15 (3) |")


def test_the_readme_shows_the_cpu_table_that_report_cpu_wrote():
    """README's results table is results/cpu/headline.md as `./benchmark.sh report cpu` writes it
    from the committed runs: a regenerated table that the README does not show fails here."""
    headline = (benchmark.ROOT / "results" / "cpu" / "headline.md").read_text()
    assert headline in (benchmark.ROOT / "README.md").read_text()
