"""The run's length: what the user types on the command line beats the recipe, and config.yaml says
which length was used."""

import json

import yaml

from sslkit.checkpoint import latest_checkpoint
from sslkit.cli import main

from .conftest import TINY

# A recipe that trains by epochs (10 steps each on the 160 tiny crops at batch 16), with a step
# schedule that drops the learning rate after the first epoch.
RECIPE = """
method: {name: ccrl}
optim: {lr: 0.1, schedule: step, milestones: [1], gamma: 0.1, warmup_steps: 0}
train: {epochs: 5, max_steps: 1000}
"""


def _logged(run, key):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


def test_command_line_max_steps_beats_the_recipes_epochs(tiny_shards, tmp_path, capsys):
    recipe = tmp_path / "by-epochs.yaml"
    recipe.write_text(RECIPE)
    run = tmp_path / "run"
    main(["pretrain", str(recipe), *TINY, "optim.warmup_steps=0", f"data.shards={tiny_shards / 'train'}",
          f"run.dir={run}", "train.max_steps=3"])
    assert "is not used" not in capsys.readouterr().out
    assert json.loads((latest_checkpoint(run / "checkpoints") / "trainer_state.json").read_text())["step"] == 3
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["train"]["max_steps"], saved["train"]["epochs"]) == (3, 0)
    assert saved["optim"]["milestone_unit"] == "epochs"
    # The milestone is still one epoch (10 steps): no drop within 3 steps. Read as steps it would drop at step 1.
    assert _logged(run, "lr") == [0.1, 0.1, 0.1]


def test_command_line_epochs_beat_the_recipes_max_steps(tiny_shards, tmp_path, capsys):
    recipe = tmp_path / "by-steps.yaml"
    recipe.write_text(RECIPE.replace("epochs: 5, ", ""))
    run = tmp_path / "run"
    main(["pretrain", str(recipe), *TINY, "optim.warmup_steps=0", f"data.shards={tiny_shards / 'train'}",
          f"run.dir={run}", "train.epochs=1", "train.log_every=100"])
    assert "train.epochs=1 x 10 steps per epoch: training 10 steps" in capsys.readouterr().out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["train"]["max_steps"], saved["train"]["epochs"]) == (10, 1)
