"""The result rows and the table of ``bench/gpu_check.sh``.

    python bench/gpu_check_report.py row NAME KIND RC SECONDS LOG -- COMMAND...   # one JSON line
    python bench/gpu_check_report.py table RESULTS.jsonl START_EPOCH              # the table; exit 1 on a failure

A ``train`` check is read from its run's ``metrics.jsonl`` (the ``run.dir=`` override of its
command): median ``pairs_per_s`` and ``data_wait_share`` of the logged intervals after the first
(start-up), the largest ``mem_peak_gb`` and the last step. A ``bench`` check keeps the last three
lines of its output (the scripts print ``ratio=`` last). A check stopped by ``timeout`` (exit 124
or 137) or failed is noted with the last error line of its log.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def train_figures(run_dir: Path) -> dict[str, Any]:
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    rows = [r for r in rows if "pairs_per_s" in r]
    if not rows:
        return {}
    later = rows[1:] or rows
    return {"pairs_per_s": round(statistics.median(r["pairs_per_s"] for r in later), 1),
            "data_wait_share": round(statistics.median(r["data_wait_share"] for r in later), 3),
            "mem_peak_gb": round(max(r["mem_peak_gb"] for r in rows), 2), "steps": rows[-1]["step"]}


def row(name: str, kind: str, rc: int, seconds: int, log: Path, cmd: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"check": name, "rc": rc, "seconds": seconds}
    text = log.read_text(errors="replace").replace("\r", "\n") if log.is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if kind == "train":
        run = next((arg.split("=", 1)[1] for arg in cmd if arg.startswith("run.dir=")), None)
        out.update(train_figures(Path(run)) if run else {})
    else:
        out["result"] = " | ".join(lines[-3:])[-300:]
    if rc in (124, 137):
        out["note"] = f"stopped at its time limit ({seconds} s)"
    elif rc != 0:
        errors = [line for line in lines if "Error" in line or "error:" in line or "No module" in line]
        out["note"] = (errors[-1] if errors else lines[-1] if lines else "no output")[-200:]
    return out


def table(rows: list[dict[str, Any]], started: float) -> str:
    lines = [f"{'check':<14}{'rc':>4}{'s':>5}  {'pairs/s':>9}{'data wait':>10}{'peak GB':>9}  result / note"]
    for r in rows:
        train = (f"{r['pairs_per_s']:9.1f}{r['data_wait_share']:10.3f}{r['mem_peak_gb']:9.2f}"
                 if "pairs_per_s" in r else " " * 28)
        lines.append(f"{r['check']:<14}{r['rc']:>4}{r['seconds']:>5}  {train}  {r.get('note') or r.get('result', '')}")
    lines.append(f"total {time.time() - started:.0f} s")
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["row"]:
        name, kind, rc, seconds, log, sep, *cmd = sys.argv[2:]
        if sep != "--":
            raise SystemExit("usage: gpu_check_report.py row NAME KIND RC SECONDS LOG -- COMMAND...")
        print(json.dumps(row(name, kind, int(rc), int(seconds), Path(log), cmd)))
    elif sys.argv[1:2] == ["table"]:
        rows = [json.loads(line) for line in Path(sys.argv[2]).read_text().splitlines() if line.strip()]
        print(table(rows, float(sys.argv[3])))
        sys.exit(1 if any(r["rc"] != 0 for r in rows) else 0)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
