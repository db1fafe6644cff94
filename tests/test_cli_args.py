"""The command line: dotted key=value overrides and options mix in any order, for every subcommand that
takes overrides; the overrides keep the order they were typed in (a later one wins)."""

from __future__ import annotations

import pytest

from sslkit import cli


def _parsed(argv: list[str]) -> dict:
    args = vars(cli.parse_args(argv))
    args.pop("fn")
    return args


# Each case: the same command typed in several orders; all must parse alike.
ORDERS = {
    "evaluate": [
        ["evaluate", "runs/x", "--shards", "s", "--split", "val", "eval.plots=false", "eval.k=4"],
        ["evaluate", "runs/x", "eval.plots=false", "--shards", "s", "eval.k=4", "--split", "val"],
        ["evaluate", "--split", "val", "runs/x", "eval.plots=false", "eval.k=4", "--shards", "s"],
        ["evaluate", "runs/x", "--shards=s", "eval.plots=false", "--split=val", "eval.k=4"],
    ],
    "demo": [
        ["demo", "--shards", "d", "--num-train", "100", "train.max_steps=5", "run.seed=1"],
        ["demo", "train.max_steps=5", "--shards", "d", "run.seed=1", "--num-train", "100"],
        ["demo", "train.max_steps=5", "run.seed=1", "--num-train", "100", "--shards", "d"],
    ],
    "pretrain": [
        ["--debug", "pretrain", "demo", "train.max_steps=5", "run.seed=1"],
        ["pretrain", "demo", "train.max_steps=5", "--debug", "run.seed=1"],
        ["pretrain", "--debug", "demo", "train.max_steps=5", "run.seed=1"],
    ],
    "finetune": [
        ["--debug", "finetune", "supcam-finetune", "finetune.init=runs/s", "train.epochs=2"],
        ["finetune", "supcam-finetune", "finetune.init=runs/s", "--debug", "train.epochs=2"],
        ["finetune", "supcam-finetune", "--debug", "finetune.init=runs/s", "train.epochs=2"],
    ],
}


@pytest.mark.parametrize("command", sorted(ORDERS))
def test_options_and_overrides_mix_in_any_order(command):
    first, *others = (_parsed(argv) for argv in ORDERS[command])
    assert first["command"] == command and len(first["overrides"]) == 2
    for other in others:
        assert other == first


def test_overrides_keep_the_typed_order():
    argv = ["evaluate", "runs/x", "eval.k=3", "--shards", "s", "eval.k=4", "--split", "v", "eval.k=5"]
    assert cli.parse_args(argv).overrides == ["eval.k=3", "eval.k=4", "eval.k=5"]
    argv = ["demo", "--num-eval", "10", "b.x=2", "a.x=1", "--shards", "d", "b.x=3"]
    assert cli.parse_args(argv).overrides == ["b.x=2", "a.x=1", "b.x=3"]


def test_the_options_still_take_their_values():
    args = cli.parse_args(["evaluate", "runs/x", "eval.k=4", "--shards", "s", "--split", "val"])
    assert (args.run_dir, args.shards, args.split, args.debug) == ("runs/x", "s", "val", False)
    args = cli.parse_args(["demo", "a.b=1", "--num-train", "7"])
    assert (args.num_train, args.num_eval, args.shards) == (7, 4000, "shards/demo")


@pytest.mark.parametrize("argv, stray", [
    (["evaluate", "runs/x", "--shards", "s", "typo"], "typo"),
    (["pretrain", "demo", "a.b=1", "--lr", "3"], "--lr 3"),
    (["demo", "--bogus", "a.b=1"], "--bogus"),
    (["report", "runs/x", "eval.k=4"], "eval.k=4"),  # report takes no overrides
])
def test_words_that_are_not_overrides_are_still_refused(argv, stray, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {stray}" in capsys.readouterr().err


def test_user_errors_print_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    """A UserError (here a missing run directory) is one line and exit status 2; a FileNotFoundError
    that is not a UserError (a bug: some file sslkit itself expected) is re-raised with its traceback."""
    from sslkit import cli
    from sslkit.errors import ConfigError, ManifestError, MissingInput, RemoteError, RunStopped, UserError

    for kind in (ConfigError, ManifestError, MissingInput, RemoteError, RunStopped):
        assert issubclass(kind, UserError)

    def raises(error):
        def command(args):
            raise error
        return command

    monkeypatch.setattr(cli, "_cmd_report", raises(MissingInput("No runs/x/eval/metrics.json;\nrun evaluate.")))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["report", "runs/x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "sslkit: error: No runs/x/eval/metrics.json; run evaluate.\n"
    monkeypatch.setattr(cli, "_cmd_report", raises(FileNotFoundError(2, "No such file", "internal.bin")))
    with pytest.raises(FileNotFoundError):
        cli.main(["report", "runs/x"])
