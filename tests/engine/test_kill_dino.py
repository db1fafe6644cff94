"""Kill -9 and resume for dino: the teacher, the centres, the schedules' step counter, the multi-crop views
and the iBOT masks all come back, so a run killed twice ends where a straight run ends."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sslkit.checkpoint import latest_checkpoint, read_state

from .conftest import TINY
from .test_kill import RESUMED, _kill, _launch, _logged_steps, _optimizer, _run_until

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12  # 160 samples / batch 16 = 10 batches per epoch: the run crosses into epoch 1
DINO = ["method.name=dino", "model.backbone=vit_tiny_patch16_224",
        "model.backbone_kwargs={patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}", "method.ibot=true",
        "method.koleo_weight=0.1", "method.prototypes=64", "method.head_hidden=32", "method.head_bottleneck=16",
        "data.views.local_crops=2", "data.views.local_size=16", "method.freeze_last_layer_epochs=0.5",
        "method.teacher_temp_warmup_epochs=1", "optim.name=adamw", "optim.layer_decay=0.8",
        "optim.weight_decay_end=0.2"]


def _command(shards: Path, run: Path) -> list[str]:
    tiny = [o for o in TINY if not o.startswith(("model.projector", "model.predictor", "method.queue_size"))]
    return [sys.executable, "-m", "sslkit", "pretrain", "demo", *tiny, *DINO, f"data.shards={shards / 'train'}",
            f"run.dir={run}", f"train.max_steps={STEPS}", "train.ckpt_every=1", "train.threads=1",
            "tracker.name=none"]


@pytest.mark.slow
def test_dino_killed_twice_then_resumed_equals_a_straight_run(tiny_shards, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = _launch(_command(tiny_shards, straight), tmp_path / "straight.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()[-3000:]

    resumed = []
    for launch, kill_after in enumerate((3, 8, None)):  # before the last layer thaws (step 5), after, to the end
        log = tmp_path / f"killed-{launch}.log"
        proc = _launch(_command(tiny_shards, killed), log)
        if kill_after is not None:
            assert _run_until(proc, lambda k=kill_after: k in _logged_steps(killed)), log.read_text()[-3000:]
            _kill(proc)
        else:
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
        if launch:
            said = RESUMED.search(log.read_text())
            assert said is not None
            resumed.append(int(said.group(2)))
    assert resumed[0] >= 2 and resumed[1] >= 7

    a, b = latest_checkpoint(straight / "checkpoints"), latest_checkpoint(killed / "checkpoints")
    assert read_state(a)["step"] == read_state(b)["step"] == STEPS
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert {"center", "patch_center", "progress", "mask_token"} <= set(wa)
    assert any(k.startswith("teacher.ema.") for k in wa)
    assert int(wb["progress"]) == STEPS
    for name in wa:  # one thread, CPU, same seed: float32 round-off at most
        assert torch.allclose(wa[name].float(), wb[name].float(), rtol=1e-5, atol=1e-6), name
    oa, ob = _optimizer(a), _optimizer(b)
    assert oa["param_groups"] == ob["param_groups"]
    for i in oa["state"]:
        for key, value in oa["state"][i].items():
            assert torch.allclose(value.float(), ob["state"][i][key].float(), rtol=1e-5, atol=1e-7), (i, key)
    # every step's loss, whichever launch logged it last, is the straight run's
    rows = {}
    for path in (straight, killed):
        for line in (path / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            if "loss" in row:
                rows.setdefault(path.name, {})[row["step"]] = row["loss"]
    assert sorted(rows["killed"]) == list(range(1, STEPS + 1))
    assert [rows["killed"][s] for s in range(1, STEPS + 1)] == pytest.approx(
        [rows["straight"][s] for s in range(1, STEPS + 1)], rel=1e-5)
