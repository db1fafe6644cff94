"""The ``sslkit`` command. Every training command runs unchanged under ``accelerate launch``:

    sslkit demo
    sslkit shard synthetic --out shards/demo/train --num 20000
    sslkit shard wsi slides/ --out shards/wsi --mpp 0.5 --tile 256
    sslkit shard cells --format consep --input CoNSeP/Train --out shards/consep --window-scale 2 --size 32
    sslkit shard folder cells/ --out shards/cells --size 64 --split 0.8,0.1,0.1     # class sub-folders
    sslkit make-slides --out slides-demo --num 24                  # synthetic slides with a planted label
    sslkit pretrain configs/ccrl.yaml data.shards=shards/consep optim.lr=3e-4
    accelerate launch --config_file launch/cpu-2proc.yaml -m sslkit pretrain demo
    sslkit evaluate runs/demo                                      # eval/metrics.json and plots
    sslkit report runs/demo                                        # runs/demo/report.html
    sslkit export runs/demo --out demo.safetensors                 # backbone for timm.create_model
    sslkit finetune supcam-finetune finetune.init=runs/supcam      # then test metrics on eval.shards
    sslkit extract runs/demo --slides slides/ --out bags/demo --mpp 0.5 --tile 256   # <slide>.h5 feature bags
    sslkit mil mil mil.features=bags/demo mil.labels=labels.csv    # attention-MIL on slide feature bags
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

# Before torch loads OpenMP: its threads must not spin while DataLoader workers need the
# same cores (measured on 2 CPU cores: about 2.5x more training throughput).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from sslkit.config import recipe_path  # noqa: E402
from sslkit.errors import UserError  # noqa: E402


def _cmd_shard_synthetic(args: argparse.Namespace) -> None:
    from sslkit.sharding.synthetic import make_synthetic

    manifest = make_synthetic(args.out, num_samples=args.num, size=args.size, seed=args.seed,
                              shard_size=args.shard_size, prefix=args.prefix,
                              command=shlex.join(["sslkit", *sys.argv[1:]]))
    print(f"Wrote {manifest['num_samples']} crops in {len(manifest['shards'])} shards to {args.out}.")


def _cmd_shard_verify(args: argparse.Namespace) -> None:
    from sslkit.sharding.core.verify import verify_shards

    report = verify_shards(args.folder)
    print(json.dumps(report, indent=2))
    if not report["ok"]:
        raise SystemExit(1)


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from sslkit.config import load_config

    cfg = load_config(recipe_path(args.config), args.overrides)  # a bad config fails before torch is even imported
    from sslkit.engine import train

    out = train(cfg)
    from sslkit import dist

    if dist.is_main_process():
        print(f"Run directory: {out}")


def _cmd_finetune(args: argparse.Namespace) -> None:
    from sslkit.config import load_config

    cfg = load_config(recipe_path(args.config), args.overrides)  # a bad config fails before torch is even imported
    from sslkit import dist
    from sslkit.engine import train
    from sslkit.evaluate.probe import evaluate_classifier, format_report
    from sslkit.methods.finetune import finetune_config

    cfg, notes = finetune_config(cfg)
    main_process = dist.env_rank() == 0  # the launcher's rank: no process group yet
    if main_process:
        for note in notes:
            print(note)
    out = train(cfg)
    results = evaluate_classifier(out)
    if dist.is_main_process():
        print(format_report(results))
        print(f"Run directory: {out} (metrics in {out / 'eval' / 'classification.json'})")


def _cmd_mil(args: argparse.Namespace) -> None:
    from sslkit.config import load_mil_config, run_dir

    cfg = load_mil_config(recipe_path(args.config), args.overrides)  # bad keys and paths fail before any work
    from sslkit.slides.mil import format_table, run_mil

    results = run_mil(cfg)
    print(format_table(results))
    print(f"Written to {run_dir(cfg) / 'eval' / 'mil'}: metrics.json, predictions.csv, confusion.png"
          + (f", {len(results['heatmaps'])} heatmaps" if results["heatmaps"] else ""))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from sslkit import dist
    from sslkit.evaluate.run import evaluate_run, format_table

    results = evaluate_run(args.run_dir, shards=args.shards, split=args.split, overrides=args.overrides)
    if dist.is_main_process():
        print(format_table(results))
        figures = ", ".join(fig["file"] for fig in results.get("figures", []))
        print(f"Written to {Path(args.run_dir) / 'eval'}: metrics.json" + (f", {figures}" if figures else ""))


def _cmd_report(args: argparse.Namespace) -> None:
    from sslkit.report import write_report

    out = write_report(args.run_dir, out=Path(args.out) if args.out else None)
    print(f"Wrote {out} (self-contained: open it in any browser, no network needed).")


def _cmd_export(args: argparse.Namespace) -> None:
    from sslkit.export import describe, export_run

    print(describe(export_run(args.run_dir, args.out, encoder=args.encoder)))


def _cmd_embed(args: argparse.Namespace) -> None:
    from sslkit.data.shardset import resolve_shards
    from sslkit.embed import embed_shards, save_embeddings
    from sslkit.rundir import eval_shards, load_trained

    cfg, method, _ = load_trained(Path(args.run_dir))
    shards = resolve_shards(eval_shards(cfg, shards=args.shards))
    fn = lambda x: method.embed(x, encoder=args.encoder, features=args.features)  # noqa: E731
    out = Path(args.out or Path(args.run_dir) / "embeddings")
    made = out / ".embeddings-new.npy"  # streamed to disk, then renamed into place with the labels and keys
    feats, labels, keys = embed_shards(fn, shards, size=cfg.data.size, channels=cfg.data.channels,
                                       batch_size=cfg.eval.batch_size, workers=cfg.data.workers, out=made)
    save_embeddings(out, made, labels, keys)
    print(f"Wrote {feats.shape[0]} x {feats.shape[1]} embeddings to {out}.")


def _cmd_demo(args: argparse.Namespace) -> None:
    from sslkit.demo import demo_splits, run_demo

    if args.slides:
        from sslkit.slides.demo import run_slide_demo

        mil = [item for item in args.overrides if item.startswith("mil.")]  # the rest configure the encoder's run
        run_slide_demo(shards=Path(args.shards), encoder_overrides=[o for o in args.overrides if o not in mil],
                       mil_overrides=mil)
        return
    run_demo(shards=Path(args.shards), overrides=args.overrides,
             splits=demo_splits(num_train=args.num_train, num_eval=args.num_eval))


def _cmd_make_slides(args: argparse.Namespace) -> None:
    from sslkit.slides.synthetic import make_slide_collection

    summary = make_slide_collection(args.out, num_slides=args.num, seed=args.seed,
                                    command=shlex.join(["sslkit", *sys.argv[1:]]))
    positive = sum(label == "positive" for label in summary["labels"].values())
    print(f"Wrote {len(summary['slides'])} slides ({positive} positive) to {Path(args.out) / 'slides'}; labels in "
          f"{summary['labels_csv']}, planted regions in {summary['regions_json']}.")


def _add_collection_parsers(shard_sub: argparse._SubParsersAction) -> None:
    """``sslkit shard wsi|cells|folder``: imported only for ``sslkit shard`` (they pull in scipy, OpenSlide)."""
    from sslkit.sharding import cells, folder, wsi

    wsi.add_parser(shard_sub)
    cells.add_parser(shard_sub)
    folder.add_parser(shard_sub)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslkit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)
    shard, shard_sub = _add_shard_parsers(sub, argv)
    _add_training_parsers(sub)
    _add_run_parsers(sub)
    _add_extract_parser(sub)
    _add_make_slides_parser(sub)
    _add_mil_parser(sub)
    for command in [*shard_sub.choices.values(), *sub.choices.values()]:  # --debug after the command works too
        if command is not shard:
            command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _add_shard_parsers(sub: argparse._SubParsersAction, argv: list[str] | None) -> tuple[argparse.ArgumentParser,
                                                                                         argparse._SubParsersAction]:
    """``sslkit shard synthetic|wsi|cells|folder|verify``."""
    shard = sub.add_parser("shard", help="write WebDataset shards + manifest.json")
    shard_sub = shard.add_subparsers(dest="source", required=True)
    syn = shard_sub.add_parser("synthetic", help="procedural H&E-like nucleus crops (the demo data)",
                               epilog="example: sslkit shard synthetic --out shards/demo/train --num 20000")
    syn.add_argument("--out", required=True, help="output folder")
    syn.add_argument("--num", type=int, default=20000, help="number of crops (default 20000)")
    syn.add_argument("--size", type=int, default=32, help="crop side in pixels (default 32)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--shard-size", type=int, default=2000, help="crops per shard (default 2000)")
    syn.add_argument("--prefix", default="demo")
    syn.set_defaults(fn=_cmd_shard_synthetic)
    if argv is None or argv[:1] == ["shard"]:
        _add_collection_parsers(shard_sub)
    ver = shard_sub.add_parser("verify", help="re-hash shards and check them against manifest.json",
                               epilog="example: sslkit shard verify shards/demo/train")
    ver.add_argument("folder")
    ver.set_defaults(fn=_cmd_shard_verify)
    return shard, shard_sub


def _add_training_parsers(sub: argparse._SubParsersAction) -> None:
    """``sslkit pretrain``, ``sslkit finetune`` and ``sslkit demo``."""
    from sslkit.demo import DEMO_SPLITS

    _add_config_command(sub, "pretrain", _cmd_pretrain, help="pretrain a method on shards", recipes="demo, ccrl",
                        epilog="example: sslkit pretrain configs/ccrl.yaml data.shards=shards/consep "
                               "train.max_steps=1000")

    _add_config_command(sub, "finetune", _cmd_finetune, recipes="supcam-finetune, sscl-finetune",
                        help="train a classifier on a pretrained backbone, then test it on eval.shards",
                        epilog="example: sslkit finetune supcam-finetune finetune.init=runs/supcam "
                               "finetune.freeze_backbone=true")

    demo = sub.add_parser("demo", help="make demo shards, pretrain CCRL, evaluate against baselines",
                          epilog="example: sslkit demo train.max_steps=100")
    demo.add_argument("--shards", default="shards/demo", help="demo shard folder (created on first use)")
    num_train, num_eval = DEMO_SPLITS["train"]["num_samples"], DEMO_SPLITS["eval"]["num_samples"]
    demo.add_argument("--num-train", type=int, default=num_train,
                      help=f"training crops to generate (default {num_train})")
    demo.add_argument("--num-eval", type=int, default=num_eval, help=f"held-out crops to generate (default {num_eval})")
    demo.add_argument("--slides", action="store_true", help="the slide path instead: synthetic slides, feature bags "
                      "from the demo's encoder, attention-MIL, heatmaps, report (sslkit.slides.demo)")
    demo.add_argument("overrides", nargs="*", help="dotted key=value overrides of configs/demo.yaml "
                      "(with --slides, mil.* keys go to configs/mil.yaml)")
    demo.set_defaults(fn=_cmd_demo)


def _add_run_parsers(sub: argparse._SubParsersAction) -> None:
    """The commands that read a run directory: evaluate, report, export, embed."""
    ev = sub.add_parser("evaluate",
                        help="k-means, kNN and linear probe of a run's embeddings, with baselines and plots",
                        epilog="examples: sslkit evaluate runs/demo eval.encoder=query\n"
                               "          sslkit evaluate runs/scl --shards shards/gband --split val",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("run_dir")
    ev.add_argument("--shards", help="shards to evaluate (default: eval.shards, else data.shards)")
    ev.add_argument("--split", help="a split of those shards: their sub-folder or sibling folder of this name")
    ev.add_argument("overrides", nargs="*", help="dotted key=value overrides (eval.*)")
    ev.set_defaults(fn=_cmd_evaluate)

    rep = sub.add_parser("report", help="write RUN_DIR/report.html: metrics, baselines, plots, config (offline)",
                         epilog="example: sslkit evaluate runs/demo && sslkit report runs/demo")
    rep.add_argument("run_dir")
    rep.add_argument("--out", help="output file (default RUN_DIR/report.html)")
    rep.set_defaults(fn=_cmd_report)

    exp = sub.add_parser("export", help="the trained backbone as safetensors, loadable with timm.create_model",
                         epilog="example: sslkit export runs/demo --out demo-backbone.safetensors")
    exp.add_argument("run_dir")
    exp.add_argument("--out", required=True, help="the .safetensors file to write")
    exp.add_argument("--encoder", choices=("momentum", "query"), help="which encoder (default: eval.encoder)")
    exp.set_defaults(fn=_cmd_export)

    emb = sub.add_parser("embed", help="write embeddings.npy, labels.npy, keys.txt for shards",
                         epilog="example: sslkit embed runs/demo --shards shards/demo/eval")
    emb.add_argument("run_dir")
    emb.add_argument("--shards", help="shards to embed (default: eval.shards, else data.shards)")
    emb.add_argument("--encoder", choices=("momentum", "query"), default="momentum")
    emb.add_argument("--features", choices=("backbone", "projector"), default="backbone")
    emb.add_argument("--out", help="output folder (default RUN_DIR/embeddings)")
    emb.set_defaults(fn=_cmd_embed)


def _add_extract_parser(sub: argparse._SubParsersAction) -> None:
    """``sslkit extract``: per-slide feature bags (``sslkit.slides.extract``)."""
    from sslkit.slides.extract import add_parser

    add_parser(sub)


def _add_make_slides_parser(sub: argparse._SubParsersAction) -> None:
    """``sslkit make-slides``: the synthetic slide collection (sslkit.slides.synthetic)."""
    mk = sub.add_parser("make-slides", help="synthetic pyramidal TIFF slides with a planted slide-level label",
                        epilog="example: sslkit make-slides --out slides-demo --num 24 --seed 0")
    mk.add_argument("--out", required=True, help="output folder: slides/, labels.csv, regions.json")
    mk.add_argument("--num", type=int, default=24, help="number of slides, even, at least 4 (default 24)")
    mk.add_argument("--seed", type=int, default=0)
    mk.set_defaults(fn=_cmd_make_slides)


def _add_mil_parser(sub: argparse._SubParsersAction) -> None:
    """``sslkit mil``: slide classification on feature bags."""
    _add_config_command(sub, "mil", _cmd_mil, recipes="mil", overrides="(mil.*, run.name, run.seed)",
                        help="attention-MIL slide classification on feature bags, cross-validated by patient",
                        epilog="example: sslkit mil mil mil.features=bags/demo mil.labels=slides/labels.csv "
                               "mil.folds=5")


def _add_config_command(sub: argparse._SubParsersAction, name: str, fn: Callable[[argparse.Namespace], None], *,
                        help: str, epilog: str, recipes: str, overrides: str = "") -> None:
    """A command that takes CONFIG (a YAML file or a recipe name) and dotted ``key=value`` overrides."""
    parser = sub.add_parser(name, help=help, epilog=epilog)
    parser.add_argument("config", help=f"YAML file or recipe name ({recipes})")
    parser.add_argument("overrides", nargs="*", help=" ".join(filter(None, ["dotted key=value overrides", overrides])))
    parser.set_defaults(fn=fn)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides taken wherever they stand among the options.

    argparse binds a trailing ``nargs="*"`` positional only to the words right after the other
    positionals, so ``sslkit evaluate RUN --shards S eval.k=4`` would leave ``eval.k=4`` over. Words
    left over that hold ``=`` join the overrides, in the order they were typed (later ones win);
    anything else left over is still an error.
    """
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    takes_overrides = isinstance(getattr(args, "overrides", None), list)
    stray = [word for word in extra if not (takes_overrides and "=" in word and not word.startswith("-"))]
    if stray:
        hint = " (overrides are dotted key=value words, such as optim.lr=3e-4)" if takes_overrides else ""
        parser.error(f"unrecognized arguments: {' '.join(stray)}{hint}")
    args.overrides = _in_typed_order(argv, args.overrides + extra)
    return args


def _in_typed_order(argv: list[str], words: list[str]) -> list[str]:
    """``words`` (a sub-multiset of ``argv``) in the order they stand in ``argv``."""
    wanted = collections.Counter(words)
    ordered = []
    for word in argv:
        if wanted[word] > 0:
            wanted[word] -= 1
            ordered.append(word)
    return ordered


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.fn(args)
    except Exception as err:  # noqa: BLE001 -- user errors: one line, no traceback; anything else is a bug
        if args.debug or not isinstance(err, UserError):  # a bug: keep its traceback
            raise
        message = " ".join(str(err).splitlines())
        print(f"sslkit: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("sslkit: interrupted; what was finished is kept (`sslkit shard` resumes when run again).",
              file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
