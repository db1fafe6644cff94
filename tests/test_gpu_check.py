"""bench/gpu_check.sh's dry run (what CI can check without a GPU) and the parser it relies on."""

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
