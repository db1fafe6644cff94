"""Kill -9 anywhere: SIGKILL real training at seeded random moments, rerun the same command
(run.resume=auto) until it finishes, and end where an uninterrupted run ends.

Moments: after a random step was logged, while a checkpoint is being written (a
``.tmp-step-*`` folder exists; ckpt_every=1 makes every step save), and at a random
wall-clock time. The whole process group is killed (the DataLoader worker and W&B's
service too), as a node failure would.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sslkit.checkpoint import STATE_FILE, complete_checkpoints, latest_checkpoint, read_state
from sslkit.evaluate.plots import read_metrics

from .conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
STEPS = 16  # 160 samples / batch 16 = 10 batches per epoch: the run crosses into epoch 1
FILES = ("model.safetensors", "optimizer.bin", "random_states_0.pkl", STATE_FILE)
RESUMED = re.compile(r"Resuming from (\S+) at step (\d+)\.")


def _command(shards: Path, run: Path) -> list[str]:
    # threads=1: the same reduction order in every process, so the comparison can be tight.
    return [sys.executable, "-m", "sslkit", "pretrain", "demo", *TINY, f"data.shards={shards / 'train'}",
            f"run.dir={run}", f"train.max_steps={STEPS}", "train.ckpt_every=1", "train.threads=1",
            "tracker.name=wandb", "tracker.mode=offline"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    return {**env, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def _launch(cmd: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: killpg takes the workers too


def _logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line still being written
    return steps


def _saving(root: Path, after: int) -> bool:
    return root.is_dir() and any(p.name.startswith(".tmp-step-") and int(p.name[-8:]) > after
                                 for p in root.iterdir())


def _run_until(proc: subprocess.Popen, ready, *, timeout: float = 120.0) -> bool:
    """Poll every millisecond until ``ready()``; True then, False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise AssertionError("training neither reached the kill point nor ended")


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _check_resumable(root: Path) -> tuple[int, str]:
    """What run.resume=auto would pick after a kill is whole: every file present and readable."""
    pick = latest_checkpoint(root)
    assert pick is not None and pick.name.startswith("step-")
    assert all((pick / name).is_file() for name in FILES), sorted(p.name for p in pick.iterdir())
    load_file(str(pick / "model.safetensors"))
    torch.load(pick / "optimizer.bin", weights_only=True)
    state = read_state(pick)
    return int(state["step"]), state["run_id"]


def _optimizer(path: Path) -> dict:
    return torch.load(path / "optimizer.bin", weights_only=True)


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_equals_straight_run(tiny_shards, tmp_path):
    pytest.importorskip("wandb")  # the killed runs must continue one W&B run
    straight_run, killed_run = tmp_path / "straight", tmp_path / "killed"
    proc = _launch(_command(tiny_shards, straight_run), tmp_path / "straight.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()[-3000:]

    rng = random.Random(7)
    root = killed_run / "checkpoints"
    # Kill points: (mode, the step to reach first); the last resume lands inside epoch 1.
    plan = [("step", rng.randint(2, 4)), ("save", 0), ("clock", 0), ("step", rng.randint(12, 14))]
    kills, mid_save, resumed_at, run_ids, launches = [], 0, [], set(), 0
    cmd = _command(tiny_shards, killed_run)
    while True:
        if not plan and not mid_save and kills.count("save") < 3:
            plan.append(("save", 0))  # the rename won the race against the last "save" kill: try again
        log = tmp_path / f"killed-{launches}.log"
        before = int(read_state(latest_checkpoint(root))["step"]) if latest_checkpoint(root) else 0
        proc, launches = _launch(cmd, log), launches + 1
        seen = len(_logged_steps(killed_run))
        started = lambda seen=seen: len(_logged_steps(killed_run)) > seen  # noqa: E731 -- this launch trained a step
        mode, k = plan.pop(0) if plan else (None, 0)
        if mode == "step":  # right after step k was logged (its checkpoint is being written or is next)
            k = max(k, before + 1)
            hit = _run_until(proc, lambda k=k, seen=seen: k in _logged_steps(killed_run)[seen:])
        elif mode == "save":  # while step k's checkpoint is being written
            k = before + rng.randint(2, 3)
            hit = _run_until(proc, lambda k=k, seen=seen: (k in _logged_steps(killed_run)[seen:]
                                                           and _saving(root, k - 1)))
        elif mode == "clock":  # whatever the process is doing then
            hit = _run_until(proc, started)
            time.sleep(rng.uniform(0.1, 0.4))
        else:
            hit = False
        if not hit or proc.poll() is not None:
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
            break
        _kill(proc)
        kills.append(mode)
        mid_save += _saving(root, before)  # a mid-save kill leaves the temporary folder behind
        # What the next launch will resume from is whole, and no later than what was logged.
        step, run_id = _check_resumable(root)
        assert before <= step <= max(_logged_steps(killed_run))
        resumed_at.append(step)
        run_ids.add(run_id)
    assert len(kills) >= 3 and mid_save >= 1, (kills, mid_save)

    # The resumed runs wrote the killed saves again: no temporary folder is left, and pruning
    # kept the newest train.keep_ckpts=2.
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
    assert [s for s, _ in complete_checkpoints(root)] == [STEPS - 1, STEPS]
    # Each relaunch said where it resumed, and it was the newest complete checkpoint.
    logs = [(tmp_path / f"killed-{i}.log").read_text() for i in range(launches)]
    said = [int(m.group(2)) for text in logs[1:] for m in [RESUMED.search(text)] if m]
    assert said == resumed_at

    # Final state: weights, queue, momentum encoder, optimizer moments and step counter.
    a, b = (latest_checkpoint(r / "checkpoints") for r in (straight_run, killed_run))
    assert read_state(a)["step"] == read_state(b)["step"] == STEPS
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        # Same seed, same data, one thread, CPU: float32 round-off at most (in practice bit-equal).
        assert torch.allclose(wa[name].float(), wb[name].float(), rtol=1e-5, atol=1e-6), name
    assert int(wb["queue.ptr"]) == (STEPS * 16) % 64 and int(wb["queue.filled"]) == 64
    oa, ob = _optimizer(a), _optimizer(b)
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for key, value in oa["state"][i].items():
            assert torch.allclose(value.float(), ob["state"][i][key].float(), rtol=1e-5, atol=1e-7), (i, key)
    assert float(ob["state"][0]["step"]) == STEPS  # Adam's own step count survived every resume

    # One W&B run: every launch opened the id stored in the checkpoints (an offline folder each).
    final_id = read_state(b)["run_id"]
    assert run_ids == {final_id}
    folders = list((killed_run / "wandb").glob("offline-run-*"))
    assert len(folders) == launches
    assert {p.stem.removeprefix("run-") for f in folders for p in f.glob("run-*.wandb")} == {final_id}

    # metrics.jsonl: every step is logged; a step logged and then lost with the kill is logged
    # again by the resumed run (a second row); readers keep the last row of a step. The redone
    # step saw the same data and state, so both rows hold the same loss as the straight run.
    rows = {}
    for line in (killed_run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row["step"], []).append(row["loss"])
    straight, _ = read_metrics(straight_run / "metrics.jsonl")
    assert sorted(rows) == sorted(straight["loss"]) == list(range(1, STEPS + 1))
    for step, losses in rows.items():
        assert losses == pytest.approx([straight["loss"][step]] * len(losses), rel=1e-5), step
    series, repeated = read_metrics(killed_run / "metrics.jsonl")
    assert repeated == sum(len(v) > 1 for v in rows.values()) >= 1  # at least the mid-save kill redid a step
    assert series["loss"] == pytest.approx(straight["loss"], rel=1e-5)


@pytest.mark.slow
def test_a_killed_training_command_leaves_no_process(tiny_shards, tmp_path):
    """Only the main process is killed, as a scheduler's SIGKILL of the job's process would: its loader
    workers and the W&B service notice and end on their own, within seconds."""
    from processes import describe, kill_all, marked, marked_env, new_mark, wait_until_gone

    mark, run = new_mark(), tmp_path / "run"
    cmd = [*_command(tiny_shards, run), "data.workers=2", "train.max_steps=500", "train.ckpt_every=500"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=marked_env(mark, _env()), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert _run_until(proc, lambda: len(_logged_steps(run)) >= 2), proc.communicate()
        started = [p for p in marked(mark) if p.pid != proc.pid]
        assert len(started) >= 3, describe(started)  # 2 loader workers and the W&B service at least
        proc.kill()
        proc.wait(timeout=60)
        left = wait_until_gone(lambda: marked(mark), timeout=15)
        assert not left, f"still running 15 s after the training process was killed:\n{describe(left)}"
        proc.communicate(timeout=10)
    finally:
        proc.kill()
        kill_all(marked(mark))
        proc.communicate()
