"""``sslkit demo``: the whole path on the embedded demo data, in minutes on a laptop CPU.

1. make the demo shards under ``shards/demo/{train,eval}`` unless they are there;
2. pretrain CCRL with ``configs/demo.yaml`` (resumes if a run is already there);
3. embed the held-out crops with the momentum encoder; k-means, kNN and a linear probe,
   against raw pixels and a randomly initialised backbone; plots; print one table;
4. write the self-contained HTML report ``runs/demo/report.html``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sslkit.config import load_config, recipe_path, run_dir
from sslkit.shardformat import read_manifest

# The demo's two splits: how many crops each holds and the seed that draws them.
DEMO_SPLITS = {"train": {"num_samples": 20000, "seed": 0}, "eval": {"num_samples": 4000, "seed": 1}}


def demo_splits(*, num_train: int | None = None, num_eval: int | None = None) -> dict[str, dict[str, int]]:
    """``DEMO_SPLITS`` with other sizes where given (the seeds stay)."""
    sizes = {"train": num_train, "eval": num_eval}
    return {split: {**spec, **({"num_samples": sizes[split]} if sizes[split] else {})}
            for split, spec in DEMO_SPLITS.items()}


def ensure_demo_shards(root: Path, *, size: int = 32, splits: dict[str, dict[str, int]] = DEMO_SPLITS) -> None:
    """Generate each split that has no readable manifest yet (deterministic, seeded)."""
    from sslkit.sharding.synthetic import make_synthetic

    for split, spec in splits.items():
        folder = root / split
        try:
            manifest = read_manifest(folder)
            if manifest["num_samples"] == spec["num_samples"] and manifest["image"]["height"] == size:
                continue
        except (FileNotFoundError, ValueError, KeyError):
            pass
        print(f"Making demo shards in {folder} ({spec['num_samples']} crops, seed {spec['seed']}) ...")
        make_synthetic(folder, num_samples=spec["num_samples"], size=size, seed=spec["seed"],
                       shard_size=2000, prefix=f"demo-{split}")


def pretrain_demo(*, shards: Path = Path("shards/demo"), overrides: list[str] | tuple[str, ...] = (),
                  splits: dict[str, dict[str, int]] = DEMO_SPLITS) -> Path:
    """Steps 1 and 2: the demo shards, then CCRL on them (resumed; nothing to do once finished); the run directory."""
    from sslkit.engine import train

    cfg = load_config(recipe_path("demo"), [f"data.shards={shards / 'train'}",
                                            f"eval.shards={shards / 'eval'}", *overrides])
    ensure_demo_shards(shards, size=cfg.data.size, splits=splits)
    print(f"CCRL on {shards / 'train'}: {cfg.train.max_steps} steps of {cfg.data.batch_size} crop pairs; "
          f"run directory {run_dir(cfg)}")
    return Path(train(cfg))


def run_demo(*, shards: Path = Path("shards/demo"), overrides: list[str] | tuple[str, ...] = (),
             splits: dict[str, dict[str, int]] = DEMO_SPLITS) -> dict[str, Any]:
    from sslkit.evaluate.run import evaluate_run, format_table
    from sslkit.report import write_report

    out = pretrain_demo(shards=shards, overrides=overrides, splits=splits)
    results = evaluate_run(out)
    print()
    print(format_table(results))
    report = write_report(out)
    print(f"\nRun directory: {out} (metrics and plots in eval/, training log in metrics.jsonl)")
    print(f"Report: {report} (open it in a browser; `sslkit export {out} --out demo.safetensors` exports the backbone)")
    return results
