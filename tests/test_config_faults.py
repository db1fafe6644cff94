"""Config faults: every mistake a user can make in a config file or an override ends in one sentence that
names the key (or the file), what it accepts, and where the bad value was set -- and the command line
prints it as one line with exit code 2, without a traceback, before any heavy work starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sslkit.config import ConfigError, load_config, recipe_path

REPO = Path(__file__).resolve().parents[1]


def _message(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, list(overrides))
    message = str(err.value)
    assert "\n" not in message and message.endswith((".", "?")), message
    return message


@pytest.mark.parametrize("yaml_text, overrides, expected", [
    # unknown keys: the closest known key, else the keys that exist there
    ("", ["optim.lrr=1"], "Unknown config key 'optim.lrr' in override 'optim.lrr=1'; did you mean 'optim.lr'?"),
    ("optim:\n  zzz: 1\n", [], "Unknown config key 'optim.zzz' in config file '{file}'; the keys of 'optim' are "
                                "name, lr, weight_decay,"),
    ("zzz: 1\n", [], "Unknown config key 'zzz' in config file '{file}'; the sections are run, data, model,"),
    # wrong types: the type the key takes and the value given
    ("train:\n  max_steps: [1, 2]\n", [], "Config key 'train.max_steps' in config file '{file}' must be a whole "
                                           "number, got [1, 2]."),
    ("", ["data.size=true"], "Config key 'data.size' in override 'data.size=true' must be a whole number, got true."),
    ("", ["model.init_strict=maybe"], "Config key 'model.init_strict' in override 'model.init_strict=maybe' must be "
                                      "true or false, got 'maybe'."),
    ("", ["optim.grad_clip=fast"], "Config key 'optim.grad_clip' in override 'optim.grad_clip=fast' must be a number "
                                   "or null, got 'fast'."),
    ("model:\n  projector: [a, 8]\n", [], "Config key 'model.projector[0]' in config file '{file}' must be a whole "
                                          "number, got 'a'."),
    ("", ["method.roles=I"], "Config key 'method.roles' in override 'method.roles=I' must be a list of strings, "
                             "got 'I'."),
    ("optim: 3\n", [], "Config key 'optim' in config file '{file}' is a section (a mapping of name, lr,"),
    # out of range, invalid choice, not finite: the range or the choices, and where the value was set
    ("", ["train.max_steps=0"], "Config key 'train.max_steps' must be positive, got 0 (set by override "
                                "'train.max_steps=0')."),
    ("data:\n  workers: -1\n", [], "Config key 'data.workers' must be 0 or more, got -1 (set in config file "
                                    "'{file}')."),
    ("data:\n  views:\n    p_gray: 1.5\n", [], "Config key 'data.views.p_gray' must be in [0, 1], got 1.5 (set in "
                                                "config file '{file}')."),
    ("", ["eval.k=0"], "Config key 'eval.k' must be in [1, inf), got 0 (set by override 'eval.k=0')."),
    ("model:\n  init: no/such/weights.pth\n", [], "Config key 'model.init' is 'no/such/weights.pth', which does not "
     "exist; give a run directory, a .safetensors file or a checkpoint file (.pth, .pt, .bin, .ckpt), or null to start "
     "from a random initialisation (set in config file '{file}')."),
    ("tracker:\n  name: mlflow\n", ["tracker.name=tensorbord"], "Config key 'tracker.name' is 'tensorbord'; choose one "
     "of wandb, tensorboard, none (set by override 'tracker.name=tensorbord')."),
    ("tracker:\n  name: mlflow\n", [], "Config key 'tracker.name' is 'mlflow'; choose one of wandb, tensorboard, none "
                                       "(set in config file '{file}')."),
    ("optim:\n  lr: .inf\n", [], "Config key 'optim.lr' is inf; give a finite number (set in config file '{file}')."),
    # keys that only fail together: each one's origin
    ("data:\n  batch_size: 10\n", ["data.balanced.classes=3"], "Config key 'data.batch_size' is 10 but balanced "
     "batches "
     "hold 'data.balanced.classes' x 'data.balanced.per_class' = 6; make them agree (data.batch_size set in config "
     "file '{file}', data.balanced.classes set by override 'data.balanced.classes=3', data.balanced.per_class left "
     "at its default)."),
    # the file itself
    ("optim:\n  lr: 1\n    x: 2\n", [], "Config file '{file}' is not valid YAML at line 3, column 6 (mapping values "
                                        "are not allowed here); fix the syntax"),
    ("optim:\n\tlr: 1\n", [], "Config file '{file}' is not valid YAML at line 2, column 1 (found character '\\t' that "
                              "cannot start any token)"),
    ("- optim\n- data\n", [], "Config file '{file}' holds ['optim', 'data'] at its top level instead of sections"),
    ("run:\n  name: ${nope}\n", [], "Config key 'run.name' in config file '{file}' cannot be resolved (Interpolation "
                                    "key 'nope' not found); an interpolation such as ${data.size} must name a key"),
    # override syntax
    ("", ["optim.lr"], "Override 'optim.lr' is not of the form key=value with a dotted key (for example optim.lr=3e-4"),
    ("", ["optim..lr=1"], "Override 'optim..lr=1' is not of the form key=value"),
    ("", ["model.projector[0]=8"], "Override 'model.projector[0]=8' is not of the form key=value with a dotted key "
                                   "(for example optim.lr=3e-4, or model.projector=[256,128] for a whole list)."),
    ("", ["optim.milestones=[8,"], "The value of override 'optim.milestones=[8,' is not valid YAML at line 1"),
    ("", ["run.name=${oc.env:SSLKIT_SURELY_UNSET}"], "Config key 'run.name' in override "
     "'run.name=${oc.env:SSLKIT_SURELY_UNSET}' cannot be resolved"),
])
def test_each_fault_is_one_sentence_naming_key_rule_and_source(tmp_path, yaml_text, overrides, expected):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml_text)
    message = _message(path, overrides)
    assert message.startswith(expected.replace("{file}", str(path))), message


def test_missing_unreadable_and_non_utf8_files(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    assert _message(missing) == f"Config file '{missing}' does not exist; pick one of the recipes in configs/."
    assert _message(tmp_path) == (f"Config file '{tmp_path}' is a folder, not a YAML file; pick one of the recipes "
                                  "in configs/.")
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("run:\n  name: caf\xe9\n".encode("latin-1"))
    assert _message(latin1) == f"Config file '{latin1}' is not UTF-8 text; save it as UTF-8 YAML."


def test_a_validated_default_is_blamed_on_nothing_the_user_wrote(tmp_path):
    """A rule broken by two keys where the user set only one names the other as left at its default."""
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  projector: [16]\n")
    assert _message(path).endswith("(model.projector set in config file "
                                   f"'{path}', model.predictor left at its default).")


def test_recipes_and_their_overrides_still_load():
    """The negative control: every shipped recipe loads, and typed overrides land as typed."""
    for recipe in sorted((REPO / "sslkit" / "configs").glob("*.yaml")):
        load_config(recipe)
    cfg = load_config(recipe_path("demo"), ["optim.lr=3e-4", "optim.grad_clip=null", "data.views.crop_scale=[0.5,1]",
                                            "run.name=${method.name}-x", "model.backbone_kwargs.width=8"])
    assert (cfg.optim.lr, cfg.optim.grad_clip, cfg.data.views.crop_scale) == (3e-4, None, [0.5, 1.0])
    assert cfg.run.name == "ccrl-x" and cfg.model.backbone_kwargs == {"width": 8}


def _sslkit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sslkit", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("sslkit: error: ")
    return result.stderr.strip()


def test_cli_prints_config_errors_as_one_line(tmp_path):
    err = _one_line_error(_sslkit("pretrain", "demo", "optim.lrr=1", cwd=tmp_path))
    assert err == "sslkit: error: Unknown config key 'optim.lrr' in override 'optim.lrr=1'; did you mean 'optim.lr'?"
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1\n    x: 2\n")
    err = _one_line_error(_sslkit("finetune", str(bad), cwd=tmp_path))
    assert "bad.yaml' is not valid YAML at line 3, column 6" in err
    err = _one_line_error(_sslkit("pretrain", "nope", cwd=tmp_path))
    assert err.startswith("sslkit: error: No config file or recipe named 'nope'; give a YAML path or one of: ")
    # --debug keeps the traceback, for bug reports: the one line above is a choice, not an accident
    debug = _sslkit("--debug", "pretrain", "demo", "optim.lrr=1", cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_config_is_validated_before_any_heavy_work(tmp_path):
    """A bad config fails before the engine (torch models, Accelerate) is imported and before the run
    directory exists, even with shards that do not exist either."""
    run = tmp_path / "run"
    script = ("import sys\nfrom sslkit.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as exit:\n"
              "    print(exit.code, 'sslkit.engine' in sys.modules, 'timm' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script, "pretrain", "demo", "train.max_steps=0",
                             f"data.shards={tmp_path / 'none'}", f"run.dir={run}"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.stdout.split() == ["2", "False", "False"], result
    assert result.stderr.strip() == ("sslkit: error: Config key 'train.max_steps' must be positive, got 0 "
                                     "(set by override 'train.max_steps=0').")
    assert not run.exists()


def test_cli_prints_shard_and_manifest_errors_as_one_line(tmp_path):
    """Bad shard paths and manifests are user errors too: one line naming the path, and no run directory
    (the shards are resolved before the run directory is made)."""
    run = tmp_path / "run"
    err = _one_line_error(_sslkit("pretrain", "demo", f"data.shards={tmp_path / 'none'}", f"run.dir={run}",
                                  "tracker.name=none", cwd=tmp_path))
    assert f"Shard folder '{tmp_path / 'none'}' does not exist" in err
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"format": "sslkit-shards/2", "num_samples": 4,
                                                      "shards": [{"name": "../x.tar", "samples": 4}]}))
    err = _one_line_error(_sslkit("pretrain", "demo", f"data.shards={shards}", f"run.dir={run}",
                                  "tracker.name=none", cwd=tmp_path))
    assert f"Shard manifest '{shards / 'manifest.json'}' names shard '../x.tar'" in err
    assert not run.exists()


def test_training_faults_print_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    """A run stopped on purpose (too much bad data, non-finite steps) or a full disk is the user's to fix:
    one line, exit 2. Any other exception is a bug and keeps its traceback."""
    from sslkit import cli
    from sslkit.checkpoint import CheckpointWriteError
    from sslkit.engine import RunStopped

    for err in (RunStopped("Stopped at step 7: 11 steps in a row had a non-finite loss; lower optim.lr."),
                CheckpointWriteError("Run directory 'x' is not writable (No space left on device); free space.")):
        monkeypatch.setattr(cli, "_cmd_pretrain", lambda args, err=err: (_ for _ in ()).throw(err))
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["pretrain", "demo"])
        assert exit_info.value.code == 2 and capsys.readouterr().err == f"sslkit: error: {err}\n"
    monkeypatch.setattr(cli, "_cmd_pretrain", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["pretrain", "demo"])
