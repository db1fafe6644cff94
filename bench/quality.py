"""Embedding quality on images the model never saw, over several seeds, against the baselines.

    python bench/quality.py RECIPE --train TRAIN_SHARDS --test TEST_SHARDS [--seeds 3] [--out DIR]
                            [--shifts [all|NAME,...]] [key=value ...]

For each seed s in 0..N-1 the recipe (a YAML path or a packaged name) is trained on TRAIN with
``run.seed=s`` and the overrides, and ``sslkit evaluate`` scores its encoder on TEST, beside raw
pixels, a randomly initialised copy of the network and morphological features of each crop's
central object (``eval.morphology``), all on the same crops. TEST should hold images the
training set does not (``sslkit shard cells ... --split`` by source image); the evaluation
says whether it does (``seen_in_training``), and this script prints it.

Prints mean +- std and the minimum over the seeds of AMI, ARI, purity, kNN top-1 and linear
probe accuracy for each row, then last ``ratio=<mean AMI of the recipe minus mean AMI of raw
pixels>`` (a difference: positive when the recipe clusters the unseen crops better than raw
pixels do). Every seed's ``eval/metrics.json`` stays under ``--out`` (default
``runs/quality/<recipe>``), and ``quality.json`` there holds the table.

With ``--shifts`` (methods with a classifier head: SCL, fine-tuned runs), each seed's head is also
scored on TEST under simulated acquisition shifts (contrast, gamma, blur, lower resolution;
``sslkit/evaluate/shifts.py`` states each strength), and a table of accuracy per shift with its
drop from the unshifted accuracy is printed before ``ratio=``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sslkit.config import load_config, recipe_path
from sslkit.data.augment import MEAN, STD, normalize
from sslkit.data.shardset import resolve_shards
from sslkit.embed import embed_shards
from sslkit.engine import train
from sslkit.evaluate.run import evaluate_run
from sslkit.evaluate.shifts import SHIFTS, get_shift
from sslkit.rundir import load_trained

ROWS = (("trained", None), ("random init", "random_init"), ("raw pixels", "raw_pixels"),
        ("morphology", "morphology"))
COLUMNS = (("AMI", ("cluster", "ami")), ("ARI", ("cluster", "ari")), ("purity", ("cluster", "purity")),
           ("kNN", ("knn", "top1")), ("probe", ("probe", "accuracy")))


def _value(block: dict, path: tuple[str, str]) -> float:
    return float(block.get(path[0], {}).get(path[1], np.nan))


def summarize(per_seed: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{row: {column: {mean, std, min}}} over the seeds' metrics.json contents."""
    table = {}
    for row, key in ROWS:
        blocks = [m if key is None else m.get("baselines", {}).get(key) for m in per_seed]
        if any(b is None for b in blocks):
            continue
        table[row] = {}
        for column, path in COLUMNS:
            values = np.array([_value(b, path) for b in blocks])
            table[row][column] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                                  "min": float(np.min(values))}
    return table


def shifted_accuracy(run_dir: Path, test: str, shifts: list[str]) -> dict[str, float]:
    """Top-1 accuracy of the run's classifier head on ``test``, unshifted ("none") and under each
    simulated acquisition shift (``sslkit.evaluate.shifts``)."""
    cfg, method, _ = load_trained(run_dir)
    if not method.has_classifier:
        raise SystemExit(f"--shifts scores a classifier head, and method '{cfg.method.name}' has none; "
                         "use it with scl or a fine-tuned run.")
    shards = resolve_shards(test)
    scores = {}
    for name in ("none", *shifts):
        shift = get_shift(name)
        with torch.no_grad():
            probs, labels, _ = embed_shards(lambda x, shift=shift: method.predict(normalize(shift(x * STD + MEAN))),
                                            shards,
                                            size=cfg.data.size, channels=cfg.data.channels, workers=0,
                                            desc=f"predict ({name})")
        scores[name] = float((probs.argmax(1) == labels).mean())
    return scores


def summarize_shifts(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{shift: {mean, std, min, drop}} over the seeds; drop = mean unshifted accuracy - mean shifted."""
    base = float(np.mean([s["none"] for s in per_seed]))
    out = {}
    for name in per_seed[0]:
        values = np.array([s[name] for s in per_seed])
        out[name] = {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
                     "drop": base - float(values.mean())}
    return out


def format_table(table: dict, *, method: str, seeds: int) -> str:
    width = max(len(method), *(len(r) for r in table)) + 2
    head = "".ljust(width) + "".join(c.rjust(22) for c, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    for row, cells in table.items():
        label = method if row == "trained" else row
        lines.append(label.ljust(width) + "".join(
            f"{c['mean']:.3f}+-{c['std']:.3f} ({c['min']:.3f})".rjust(22) for c in cells.values()))
    lines.append(f"mean+-std (min) over {seeds} seed(s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--train", required=True, help="training shards (data.shards)")
    parser.add_argument("--test", required=True, help="held-out shards to score on (images not in --train)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", help="folder of the runs (default runs/quality/<recipe>)")
    parser.add_argument("--shifts", nargs="?", const="all", default=None,
                        help="also score the classifier head under simulated acquisition shifts of TEST: "
                             f"'all' or a comma-separated subset of {', '.join(SHIFTS)}")
    args, overrides = parser.parse_known_args(argv)
    stray = [word for word in overrides if "=" not in word or word.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    shifts = [] if args.shifts is None else list(SHIFTS) if args.shifts == "all" else args.shifts.split(",")
    unknown = [name for name in shifts if name not in SHIFTS]
    if unknown:
        parser.error(f"unknown shift(s) {', '.join(unknown)}; the shifts are {', '.join(SHIFTS)}")
    per_shift: list[dict[str, float]] = []
    out = Path(args.out or Path("runs") / "quality" / Path(args.recipe).stem)
    per_seed, started = [], time.perf_counter()
    for seed in range(args.seeds):
        cfg = load_config(recipe_path(args.recipe), [
            f"data.shards={args.train}", f"eval.shards={args.test}", *overrides, f"run.seed={seed}",
            f"run.dir={out / f'seed{seed}'}", "run.resume=false"])
        seconds = time.perf_counter()
        run = train(cfg)
        seconds = time.perf_counter() - seconds
        metrics = evaluate_run(run, shards=args.test, overrides=["eval.plots=false", "eval.morphology=true"])
        metrics["train_seconds"] = seconds
        per_seed.append(metrics)
        print(f"seed {seed}: AMI {metrics['cluster']['ami']:.3f}, raw pixels "
              f"{metrics['baselines']['raw_pixels']['cluster']['ami']:.3f} ({seconds:.0f} s of training)", flush=True)
        if shifts:
            per_shift.append(shifted_accuracy(out / f"seed{seed}", args.test, shifts))
            print(f"seed {seed}: head accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in per_shift[-1].items()),
                  flush=True)
    table = summarize(per_seed)
    method = per_seed[0]["method"] + (f" ({per_seed[0]['encoder']} encoder)"
                                      if per_seed[0]["method"] in ("CCRL", "SUPCAM") else "")
    seen = per_seed[0].get("seen_in_training", {})
    ratio = table["trained"]["AMI"]["mean"] - table["raw pixels"]["AMI"]["mean"]
    report = {"recipe": args.recipe, "train": args.train, "test": args.test, "seeds": args.seeds,
              "overrides": overrides, "num_samples": per_seed[0]["num_samples"], "seen_in_training": seen,
              "table": table, "ami_minus_raw": ratio, "train_seconds": [m["train_seconds"] for m in per_seed],
              "seconds": time.perf_counter() - started}
    if shifts:
        report["shifts"] = summarize_shifts(per_shift)
    (out / "quality.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"{args.recipe} trained on {args.train}, scored on {per_seed[0]['num_samples']} crops of {args.test} "
          f"(seen in training: {seen.get('seen', 'unknown')}; {seen.get('note', '')})")
    print(format_table(table, method=method, seeds=args.seeds))
    if shifts:
        print("classifier head accuracy under simulated shifts of the test images (mean+-std (min); drop = "
              "unshifted mean - shifted mean):")
        for name, cell in report["shifts"].items():
            print(f"  {name:<16}{cell['mean']:.3f}+-{cell['std']:.3f} ({cell['min']:.3f})  drop {cell['drop']:+.3f}")
    print(f"ratio={ratio:+.3f}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
