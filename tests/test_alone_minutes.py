"""tools/alone_minutes.py: a whole CPU run's minutes alone, from its update count and two short
measurements."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import alone_minutes  # noqa: E402


def finished_run(results: Path, algo: str, task: str, seed: int, updates: int) -> None:
    run = results / "cpu" / "runs" / algo / task / f"seed{seed}" / "runs" / "r"
    run.mkdir(parents=True)
    records = [{"global_step": 50_000, "charts/updates": updates // 2, "time": 1.0},
               {"global_step": 100_000, "charts/updates": updates, "time": 2.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_estimate_adds_the_updates_and_the_acting_of_a_run(tmp_path, monkeypatch, capsys):
    finished_run(tmp_path, "dreamerv2", "dcs-cartpole-swingup", 1, 3_933)
    finished_run(tmp_path, "dreamerv2", "dcs-cartpole-swingup", 2, 3_900)
    seen = []

    def measure(script, env, flags):
        seen.append((Path(script).name, env, flags))
        return {"seconds_per_update": 0.6, "env_steps_per_second": 250.0}

    monkeypatch.setattr(alone_minutes, "measure", measure)
    alone_minutes.main(["--algos", "dreamerv2", "--task", "dcs-cartpole-swingup",
                        "--results", str(tmp_path)])
    flags = ["--distraction", "medium", "--dynamic"]
    assert seen == [("dreamerv2.py", "dcs-cartpole-swingup", flags)]
    row = capsys.readouterr().out.splitlines()[-1]
    # 3,933 updates (the larger count) x 0.6 s = 39.3 min; 100K + 10 x 5 x 1000 env steps at 250/s
    assert row == "| `dreamerv2.py` | 3,933 | 0.60 | 250 | 39 + 10 = 49 |", row
    e = alone_minutes.estimate(3_933, 0.61, 150_000, 210.0)
    assert e["minutes"] == pytest.approx(3_933 * 0.61 / 60 + 150_000 / 210 / 60)


def test_a_missing_run_or_a_failing_script_ends_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"no run of core under .*: run ./benchmark.sh cpu"):
        alone_minutes.main(["--algos", "core", "--results", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown or missing algorithm"):
        alone_minutes.main(["--algos", "nosuch", "--results", str(tmp_path)])
    script = tmp_path / "fake.py"
    script.write_text("import sys\nprint(' '.join(sys.argv[1:]))\n"
                      "raise SystemExit('error: no env')\n")
    with pytest.raises(SystemExit, match=r"fake.py --preset small --env e -x --measure-updates 10 "
                                         r"failed \(exit 1\): error: no env"):
        alone_minutes.measure(script, "e", ["-x"])
    script.write_text("import json, sys\nprint(json.dumps({'argv': sys.argv[1:]}))\n")
    assert alone_minutes.measure(script, "e", ["-x"])["argv"] == [
        "--preset", "small", "--env", "e", "-x", "--measure-updates", "10"]
