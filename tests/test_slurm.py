"""Specification of `./benchmark.sh <suite> --slurm [--submit]` against a real Slurm.

The end-to-end test starts a one-node Slurm of its own (munged, slurmctld, slurmd as root, every
file in a temporary folder, `SLURM_CONF` pointing at it) and stops it again; it installs nothing.
Where `slurm-wlm`/`munge` are missing or the daemons cannot run (not root, no node), it skips and
says why."""

import collections
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import benchmark
from conftest import COUNT_STARTS, ROOT

DAEMONS = ("munged", "slurmctld", "slurmd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """A one-node Slurm in `home`: slurm.conf generated from `slurmd -C`, its own munge key and
    socket, daemons in the foreground as children of this process. `env` is the environment for
    sbatch/squeue/...; `stop()` cancels every job of this cluster, then ends the daemons."""

    def __init__(self, home: Path):
        self.home, self.procs = home, []
        home.mkdir(parents=True, exist_ok=True)
        home.chmod(0o700)  # munged refuses a key or socket in a folder others can write
        for name in ("state", "spool", "munge"):
            (home / name).mkdir(exist_ok=True)
            (home / name).chmod(0o700)
        self.conf = home / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60.0):
        sbin = lambda name: shutil.which(name) or f"/usr/sbin/{name}"  # noqa: E731
        key, sock = self.home / "munge" / "munge.key", self.home / "munge" / "munge.sock"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.procs.append(subprocess.Popen(
            [sbin("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
             f"--pid-file={self.home / 'munge' / 'munged.pid'}",
             f"--seed-file={self.home / 'munge' / 'munged.seed'}",
             f"--log-file={self.home / 'munged.log'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        node = subprocess.run([sbin("slurmd"), "-C"], capture_output=True, text=True,
                              check=True).stdout.splitlines()[0]  # NodeName=<host> CPUs=...
        self.node = node.split()[0].partition("=")[2]
        self.cpus = int(next(w for w in node.split() if w.startswith("CPUs=")).partition("=")[2])
        h = self.home
        self.conf.write_text("\n".join([
            "ClusterName=rfwmtest", f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire: how long a requeued task waits before it may start again (default 120 s)
            f"AuthInfo=socket={sock},cred_expire=10",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            f"StateSaveLocation={h / 'state'}", f"SlurmdSpoolDir={h / 'spool'}",
            f"SlurmctldPidFile={h / 'slurmctld.pid'}", f"SlurmdPidFile={h / 'slurmd.pid'}",
            f"SlurmctldLogFile={h / 'slurmctld.log'}", f"SlurmdLogFile={h / 'slurmd.log'}",
            # the two plugins that work without cgroups, i.e. in a container
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU_Memory",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=2",
            "MpiDefault=none", "ReturnToService=2", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "KillWait=30",
            f"{node} NodeAddr=127.0.0.1 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP", ""]))
        for daemon in ("slurmctld", "slurmd"):
            self.procs.append(subprocess.Popen([sbin(daemon), "-D", "-f", str(self.conf)],
                                               env=self.env, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.STDOUT))
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0].args[0]} exited {dead[0].returncode}; logs in {h}")
            out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed"):
                return self
            time.sleep(1)
        raise RuntimeError(f"the node did not come up in {timeout:.0f} s; logs in {h}: "
                           + self.log_tail())

    def run(self, *cmd, check=True, **kw):
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, **kw)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr}")
        return out

    def log_tail(self, lines=20) -> str:
        text = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.home / name
            if path.is_file():
                text.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-lines:]))
        return "\n".join(text)

    def stop(self):
        if len(self.procs) == 3:  # cancel what is still queued or running, so no task survives us
            self.run("scancel", "--user", "root", check=False, timeout=30)
            for _ in range(60):
                out = self.run("squeue", "-h", "-o", "%i", check=False, timeout=30)
                if out.returncode != 0 or not out.stdout.strip():
                    break
                time.sleep(1)
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def daemons_unavailable() -> str | None:
    """Why this machine cannot run the test's Slurm (None if it can)."""
    if os.geteuid() != 0:
        return "the Slurm and munge daemons of this test run as root, and this is not root"
    missing = [b for b in (*DAEMONS, "sbatch", "sinfo", "scontrol")
               if not (shutil.which(b) or Path(f"/usr/sbin/{b}").is_file())]
    if missing:
        return (f"{', '.join(missing)} not installed (Debian: apt-get install slurm-wlm munge; "
                ".ci/run installs them)")
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = daemons_unavailable()
    if reason:
        # Only where the cluster cannot exist (not root, or Slurm/munge not installed): .ci/run
        # installs both and runs as root, so in CI these tests run (and can fail); the reason
        # printed says what to install.
        pytest.skip(reason)
    # one cluster on this machine at a time (pytest -n 2 may run this module on both workers)
    with open(Path(tempfile.gettempdir()) / "rfwm-test-slurm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
        try:
            yield cluster.start()
        finally:
            cluster.stop()


def benchmark_py(*args, env=None, cwd=None, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "benchmark.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_smoke_flags(results: Path) -> list[str]:
    """Two array tasks (dreamerv2 seeds 1 and 2 on toy-reach-center) of under a minute each on a
    busy CPU: the smoke suite's tiny networks with a smaller batch and fewer updates, 300 env
    steps, an evaluation (and checkpoint) every 100."""
    return ["smoke", "--algos", "dreamerv2", "--seeds", "2", "--budget", "300", "--eval-every",
            "100", "--eval-episodes", "1", "--script-flags", "--prefill 60 --pretrain 2 "
            "--train-every 10 --batch-size 4 --batch-length 8", "--results", str(results),
            "--slurm"]


def wait_for(predicate, timeout: float, what: str, cluster: SlurmCluster, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(poll)
    queue = cluster.run("squeue", "-o", "%i %T %r %S", check=False).stdout
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; queue:\n{queue}\n"
                         + cluster.log_tail())


def test_a_request_no_node_can_meet_is_refused_with_the_node_sizes(slurm, tmp_path):
    out = benchmark_py(*tiny_smoke_flags(tmp_path / "results"), "--slurm-cpus",
                       str(slurm.cpus + 1), "--slurm-mem", "1G", env=slurm.env, cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert f"{slurm.cpus + 1} CPUs" in line and f"{slurm.node}: {slurm.cpus} CPUs" in line
    assert not (tmp_path / "results" / "smoke" / "slurm.sh").exists()
    # a partition the cluster does not have is named with the ones it has
    out = benchmark_py(*tiny_smoke_flags(tmp_path / "results"), "--slurm-partition", "gpu-big",
                       env=slurm.env, cwd=tmp_path)
    (line,) = out.stderr.strip().splitlines()
    assert out.returncode != 0 and "gpu-big" in line and "debug" in line


def test_preempted_tasks_checkpoint_requeue_finish_and_the_report_follows(slurm, tmp_path):
    """The whole path on a real Slurm: submit a 2-task array and its report job; stop each task
    mid-run the two ways Slurm does (SIGTERM: preemption or scancel; SIGUSR1: the time-limit
    warning of --signal=B:USR1@...). Each one checkpoints, requeues itself, resumes from its
    checkpoint and finishes; then the report job writes summary.md. About 1.5 min here."""
    start = time.time()
    results = tmp_path / "results"
    out = benchmark_py(*tiny_smoke_flags(results), "--submit", "--slurm-cpus", "1",
                       "--slurm-mem", "2G", "--slurm-time", "10", env=slurm.env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    array = out.stdout.split("submitted array job ")[1].split()[0]
    script = (results / "smoke" / "slurm.sh").read_text()
    assert f"PYTHON={sys.executable}" in script and "#SBATCH --cpus-per-task=1" in script
    folders = [results / "smoke" / "runs" / "dreamerv2" / "toy-reach-center" / f"seed{k}"
               for k in (1, 2)]
    logs = [f / "log.txt" for f in folders]

    def evaluated(log: Path) -> bool:  # the first evaluation wrote a checkpoint (--save-model)
        return log.is_file() and "eval at 100:" in log.read_text()

    unsignalled = {0: "TERM", 1: "USR1"}

    def signal_the_evaluated() -> bool:  # each task as soon as it is 100 steps into its 300
        for task, sig in list(unsignalled.items()):
            if evaluated(logs[task]):
                slurm.run("scancel", "--batch", f"--signal={sig}", f"{array}_{task}")
                del unsignalled[task]
        return not unsignalled

    wait_for(signal_the_evaluated, 180, "both tasks' first evaluation", slurm)
    wait_for(lambda: not slurm.run("squeue", "-h", "-o", "%i").stdout.strip(), 300,
             "the array and the report job to end", slurm, poll=2)
    for task, (folder, sig) in enumerate(zip(folders, ("TERM", "USR1"))):
        shell = (results / "smoke" / f"slurm-{array}_{task}.out").read_text()
        log = (folder / "log.txt").read_text()
        assert (folder / "DONE").is_file() and not (folder / "FAILED").exists(), shell + log
        assert f"SIG{sig}: asking the training process to checkpoint" in shell, shell
        assert "stopped (exit 143) and requeued" in shell and "(restart 1)" in shell, shell
        assert "interrupted at step" in log and "resumed from runs/" in log, log
        (run,) = folder.glob("runs/*/metrics.jsonl")  # the resumed run continued the same folder
        records = [json.loads(line) for line in run.read_text().splitlines()]
        pairs = collections.Counter((r["step"], k) for r in records for k in r
                                    if k not in ("step", "time"))
        assert [p for p, n in pairs.items() if n > 1] == []
        assert [r["step"] for r in records if "eval/episodic_return" in r] == [100, 200, 300]
    summary = results / "smoke" / "summary.md"
    assert summary.is_file(), list((results / "smoke").iterdir())
    text = summary.read_text()
    assert "| dreamerv2 | toy-reach-center | seed1 |" in text and "seed2" in text
    assert "Failed jobs" not in text
    assert summary.stat().st_mtime >= max((f / "DONE").stat().st_mtime for f in folders)
    print(f"slurm end-to-end: {time.time() - start:.0f} s")


def test_a_cancelled_task_stays_cancelled_and_the_report_lists_it_with_its_log(slurm, tmp_path):
    """Plain `scancel` also sends SIGTERM, but it ends the task for good: the requeue fails,
    FAILED is written, and the report job (afterany) lists the job with the tail of log.txt."""
    results = tmp_path / "results"
    flags = tiny_smoke_flags(results)
    flags[flags.index("--seeds") + 1] = "1"
    out = benchmark_py(*flags, "--submit", "--slurm-cpus", "1", "--slurm-mem", "2G",
                       env=slurm.env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    array = out.stdout.split("submitted array job ")[1].split()[0]
    folder = results / "smoke" / "runs" / "dreamerv2" / "toy-reach-center" / "seed1"
    log = folder / "log.txt"
    wait_for(lambda: log.is_file() and "eval at 100:" in log.read_text(), 180,
             "the first evaluation", slurm)
    slurm.run("scancel", f"{array}_0")
    wait_for(lambda: not slurm.run("squeue", "-h", "-o", "%i").stdout.strip(), 180,
             "the task and the report job to end", slurm, poll=2)
    shell = (results / "smoke" / f"slurm-{array}_0.out").read_text()
    assert "not requeued, Slurm is ending the task (COMPLETING)" in shell, shell
    assert "(restart" not in shell and "requeued\n" not in shell, shell
    assert not (folder / "DONE").exists()
    assert (folder / "FAILED").read_text().strip() == "exit 143 after SIGTERM"
    section = (results / "smoke" / "summary.md").read_text().split("## Failed jobs")[1]
    assert "`dreamerv2/toy-reach-center/seed1`: exit 143 after SIGTERM" in section
    assert "interrupted at step" in section  # the training script's last words, from log.txt


def test_submit_without_sbatch_says_so_in_one_line(tmp_path):
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))  # python, but no Slurm
    out = benchmark_py(*tiny_smoke_flags(tmp_path / "results"), "--submit", env=env, cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "sbatch" in line and "not on PATH" in line
    assert (tmp_path / "results" / "smoke" / "slurm.sh").is_file()  # written for a manual sbatch


def test_the_array_script_asks_for_the_flags_resources_and_a_warning_before_the_limit(tmp_path):
    jobs = benchmark.suite_jobs("dmc", ["core"], seeds=1, budget=1000, tasks=["walker-walk"],
                                results=tmp_path)
    path = benchmark.write_slurm(jobs, tmp_path / "dmc" / "slurm.sh", "2-00:00:00", 2, cpus=8,
                                 mem="64G", partition="a100", account="rl",
                                 extra="--qos=high --constraint=80gb")
    lines = path.read_text().splitlines()
    for flag in ("--time=2-00:00:00", "--cpus-per-task=8", "--mem=64G", "--gres=gpu:2",
                 "--partition=a100", "--account=rl", "--qos=high", "--constraint=80gb",
                 f"--signal=B:USR1@{benchmark.SLURM_WARNING}", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {flag}" in lines
    # sbatch reads #SBATCH lines only up to the first command
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert max(i for i, line in enumerate(lines) if line.startswith("#SBATCH")) < first_command
    assert f"PYTHON={sys.executable}  # the interpreter (and environment) that wrote this script" in lines
    assert any("MUJOCO_EGL_DEVICE_ID=${SLURM_JOB_GPUS%%,*}" in line for line in lines)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    # defaults: no partition/account lines, one task per GPU with the default CPUs and memory
    text = benchmark.write_slurm(jobs, tmp_path / "d" / "slurm.sh", "1:00:00", 1).read_text()
    assert "--partition" not in text and "--account" not in text
    assert f"--cpus-per-task={benchmark.SLURM_CPUS}" in text and "--mem=32G" in text


def test_an_array_task_resumes_a_job_that_crashes_natively_at_once(tmp_path, monkeypatch):
    """The array script, run by bash as Slurm would run task 0 (no cluster needed): a training
    process that dies of SIGABRT is started again in the same task, from its checkpoint; one that
    keeps dying of SIGSEGV ends FAILED after CRASH_RETRIES retries."""
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setattr(benchmark, "ROOT", root)
    (root / "blast.py").write_text(  # counts its starts, then crashes as CRASH says
        COUNT_STARTS + "import ctypes, os\n"
        "if os.environ['CRASH'] == 'always': ctypes.string_at(0)\nif n == 1: os.abort()\n")
    for crash, starts, marker in (("once", 2, "DONE"), ("always", benchmark.CRASH_RETRIES + 1,
                                                        "FAILED")):
        job = benchmark.Job("blast", "dmc-cartpole-swingup", 1, [], tmp_path / crash / "seed1")
        path = benchmark.write_slurm([job], tmp_path / crash / "slurm.sh", "1:00:00", 0)
        env = dict(os.environ, SLURM_ARRAY_TASK_ID="0", CRASH=crash, PYTHONFAULTHANDLER="")
        out = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True,
                             timeout=60)
        assert (job.folder / "starts.txt").read_text() == str(starts), out.stdout + out.stderr
        assert (job.folder / marker).is_file() and out.stdout.count("crashed (exit ") == starts - 1
    assert (job.folder / "FAILED").read_text().strip() == "exit 139"


def test_node_sizes_are_read_from_sinfo_with_gpus_memory_and_time_limits(tmp_path, monkeypatch):
    """Against a GPU cluster's `sinfo -N` (a stand-in script on PATH: this machine has none)."""
    fake = tmp_path / "bin" / "sinfo"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\ncat <<'EOF'\n"
                    "gpu01|64|512000|gpu:a100:4(S:0-1)|gpu*|2-00:00:00\n"
                    "gpu02|64|512000|gpu:a100:4(S:0-1)|gpu*|2-00:00:00\n"
                    "cpu01|128|256000|(null)|cpu|infinite\nEOF\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    benchmark.check_slurm_fit(benchmark.SLURM_CPUS, 1, benchmark.SLURM_MEM, None, "48:00:00")
    benchmark.check_slurm_fit(64, 4, "500G", "gpu", "2-00:00:00")  # a whole node fits
    benchmark.check_slurm_fit(8, 0, "0", "cpu", "30-0")
    for request, says in [((4, 8, "32G", None, "1:00:00"), "8 GPUs"),
                          ((4, 1, "600G", "gpu", "1:00:00"), "600G memory"),
                          ((4, 1, "32G", None, "3-00:00:00"), "for 3-00:00:00"),
                          ((4, 1, "32G", "cpu", "1:00:00"), "partition cpu")]:
        with pytest.raises(SystemExit) as refused:
            benchmark.check_slurm_fit(*request)
        message = str(refused.value)
        assert says in message and "\n" not in message
        nodes = ("cpu01: 128 CPUs, 250G, 0 GPUs, limit infinite" if request[3] == "cpu" else
                 "gpu01, gpu02: 64 CPUs, 500G, 4 GPUs, limit 2-00:00:00")
        assert f"its nodes: {nodes}." in message


def test_slurm_times_and_sizes_are_read_like_slurm_does():
    seconds = {"30": 1800, "30:15": 1815, "1:00:00": 3600, "2-0": 172_800, "2-03:04": 183_840,
               "1-00:00:01": 86_401}
    assert {t: benchmark.slurm_seconds(t) for t in seconds} == seconds
    assert benchmark.slurm_seconds("infinite") == float("inf")
    assert [benchmark.slurm_megabytes(m) for m in ("32G", "500M", "32000", "1T")] == [
        32768, 500, 32000, 1024 ** 2]


def test_the_report_lists_failed_jobs_with_the_tail_of_their_log(tmp_path):
    from test_benchmark import write_run

    root = tmp_path / "dcs" / "runs"
    write_run(root, "core", "dcs-walker-walk", "seed1", [(1000, 10.0)])
    failed = root / "core" / "dcs-walker-walk" / "seed2"
    failed.mkdir(parents=True)
    (failed / "log.txt").write_text("".join(f"line {i}\n" for i in range(40))
                                    + "RuntimeError: CUDA out of memory\n")
    (failed / "FAILED").write_text("exit 1\n")
    benchmark.report("dcs", 1000, tmp_path)
    text = (tmp_path / "dcs" / "summary.md").read_text()
    assert "| core | " in text  # the tables are still there
    section = text.split("## Failed jobs")[1]
    assert "`core/dcs-walker-walk/seed2`: exit 1" in section
    assert "  RuntimeError: CUDA out of memory" in section and "  line 39" in section
    assert "line 20\n" not in section  # the tail only
    assert "seed1" not in section
