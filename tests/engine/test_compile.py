"""train.compile=true: torch.compile in place gives the eager run's losses and the same checkpoint layout."""

import json

import pytest
from safetensors.torch import load_file

from sslkit.checkpoint import latest_checkpoint
from sslkit.config import load_config, recipe_path
from sslkit.engine import train

from .conftest import TINY


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_shards, tmp_path):
    def run(name, *extra):
        return train(load_config(recipe_path("demo"), [*TINY, f"data.shards={tiny_shards / 'train'}",
                                                       f"run.dir={tmp_path / name}", "train.max_steps=3", *extra]))

    eager, compiled = run("eager"), run("compiled", "train.compile=true")
    # Same data, views and initial weights; inductor's kernels reorder float sums, nothing more.
    assert _losses(compiled) == pytest.approx(_losses(eager), rel=1e-3)
    a = load_file(str(latest_checkpoint(eager / "checkpoints") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(compiled / "checkpoints") / "model.safetensors"))
    assert a.keys() == b.keys()  # compiled in place: no "_orig_mod." prefixes, checkpoints interchangeable
