"""bench/gpu_check.sh's dry run (what CI can check without a GPU) and the parser it relies on."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _argcheck(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/argcheck.py", *argv], cwd=ROOT, capture_output=True, text=True)


def test_dry_run_parses_every_command(tmp_path):
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--python", sys.executable,
                           "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = [line.split(":")[0].split()[1] for line in proc.stdout.splitlines() if line.startswith("parsed ")]
    assert checks == ["demo", "demo+compile", "ccrl", "ccrl-r50", "ccrl-r50+cl", "train_step", "views", "faiss"]
    assert "every command parses" in proc.stdout
    assert not (tmp_path / "work").exists()  # a dry run writes nothing


def test_argcheck_rejects_what_the_command_would():
    bad_key = _argcheck("-m", "sslkit", "pretrain", "demo", "train.no_such_key=1")
    assert bad_key.returncode != 0 and "train.no_such_key" in bad_key.stderr
    bad_value = _argcheck("-m", "sslkit", "pretrain", "configs/ccrl.yaml", "train.precision=fp64")
    assert bad_value.returncode != 0 and "train.precision" in bad_value.stderr
    bad_flag = _argcheck("bench/views.py", "--no-such-flag")
    assert bad_flag.returncode == 2 and "--no-such-flag" in bad_flag.stderr
    missing = _argcheck("bench/no_such_script.py")
    assert missing.returncode != 0 and "does not exist" in missing.stderr


def test_argcheck_stops_before_the_command_runs(tmp_path):
    out = tmp_path / "shards"
    ok = _argcheck("-m", "sslkit", "shard", "synthetic", "--out", str(out), "--num", "10")
    assert ok.returncode == 0 and ok.stdout.startswith("ok:")
    assert not out.exists()  # parsed, not run
    script = tmp_path / "work.py"
    script.write_text("import argparse\nargparse.ArgumentParser().parse_args()\nopen(__file__ + '.ran', 'w')\n")
    assert _argcheck(str(script)).returncode == 0
    assert not Path(str(script) + ".ran").exists()


def _report(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/gpu_check_report.py", *argv], cwd=ROOT, capture_output=True,
                          text=True)


def test_report_rows_and_table(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    logged = [(20, 50.0, 0.50, 1.0), (40, 400.0, 0.02, 2.5), (60, 300.0, 0.04, 2.0), (80, 500.0, 0.01, 2.0)]
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 5.0, "pairs_per_s": p, "data_wait_share": w, "mem_peak_gb": m}) + "\n"
        for s, p, w, m in logged) + json.dumps({"step": 80, "eval/knn": 0.5}) + "\n")
    (tmp_path / "ok.log").write_text("step 80\n")
    (tmp_path / "bench.log").write_text("speed 1\nspeed 2\n\nratio=1.50\n")
    (tmp_path / "slow.log").write_text("ModuleNotFoundError: No module named 'lightly'\nmore\n")
    rows = [_report("row", "demo", "train", "0", "31", str(tmp_path / "ok.log"), "--", "-m", "sslkit", "pretrain",
                    "demo", f"run.dir={run}"),
            _report("row", "views", "bench", "0", "12", str(tmp_path / "bench.log"), "--", "bench/views.py"),
            _report("row", "faiss", "bench", "124", "80", str(tmp_path / "slow.log"), "--", "bench/x.py"),
            _report("row", "step", "bench", "1", "3", str(tmp_path / "slow.log"), "--", "bench/x.py")]
    assert all(r.returncode == 0 for r in rows), [r.stderr for r in rows]
    demo, views, faiss, step = (json.loads(r.stdout) for r in rows)
    # the first interval is start-up: medians of the other three, the peak of all four
    assert demo == {"check": "demo", "rc": 0, "seconds": 31, "pairs_per_s": 400.0, "data_wait_share": 0.02,
                    "mem_peak_gb": 2.5, "steps": 80}
    assert views["result"] == "speed 1 | speed 2 | ratio=1.50" and "note" not in views
    assert faiss["note"] == "stopped at its time limit (80 s)"
    assert step["note"] == "ModuleNotFoundError: No module named 'lightly'"
    results = tmp_path / "results.jsonl"
    results.write_text("".join(r.stdout for r in rows[:2]))
    good = _report("table", str(results), "0")
    assert good.returncode == 0 and "ratio=1.50" in good.stdout
    assert "  400.0     0.020     2.50" in good.stdout
    results.write_text("".join(r.stdout for r in rows))
    assert _report("table", str(results), "0").returncode == 1  # a failed check fails the script
