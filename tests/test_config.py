import numpy as np
import pytest

from sslkit.config import ConfigError, apply_overrides, from_dict, load_config, recipe_path, to_dict


def test_overrides_are_typed():
    cfg = load_config(recipe_path("demo"), ["optim.lr=3e-4", "model.backbone_kwargs.width=8", "train.max_steps=7"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.train.max_steps == 7
    assert cfg.model.backbone_kwargs == {"width": 8}
    assert cfg.method.name == "ccrl"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "Unknown config key 'optim.lrr'.*did you mean 'optim.lr'"),
        ("data.views.rotatio=90", "Unknown config key 'data.views.rotatio'.*'data.views.rotation'"),
        ("optim.lr=fast", "Config key 'optim.lr' in override 'optim.lr=fast' must be a number, got 'fast'"),
        ("tracker.name=mlflow", "'tracker.name' is 'mlflow'; choose one of"),
        ("train.max_steps=0", "'train.max_steps' must be positive"),
        ("optim.lr", "not of the form key=value"),
    ],
)
def test_bad_configs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(recipe_path("demo"), [override])


def test_predictor_size_is_checked_only_where_a_predictor_is_used():
    with pytest.raises(ConfigError, match="must end at the projector's size 64"):
        load_config(recipe_path("ccrl"), ["model.predictor=[32,32]"])
    # the demo runs CCRL without the predictor, and SimCLR has none: the setting is unused there
    assert load_config(recipe_path("demo"), ["model.predictor=[32,32]"]).model.predictor == [32, 32]
    assert load_config(None, ["method.name=simclr", "model.predictor=[32,32]"]).method.name == "simclr"


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: 0.1\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"Unknown config key 'optim.warmup' in .*bad.yaml.*'optim.warmup_steps'"):
        load_config(path)


def test_missing_file_and_recipe():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nowhere.yaml")
    with pytest.raises(ConfigError, match="No config file or recipe named 'nope'"):
        recipe_path("nope")


def test_round_trip_through_dict():
    cfg = apply_overrides(load_config(recipe_path("demo")), ["method.tau=0.2"])
    assert from_dict(to_dict(cfg)) == cfg


def test_step_schedule_drops_at_epoch_milestones():
    from sslkit.config import OptimConfig
    from sslkit.optim import build_lr_schedule

    cfg = OptimConfig(name="sgd", lr=0.01, schedule="step", milestones=[8, 12], gamma=0.1)
    lrs = build_lr_schedule(cfg, total_steps=15 * 10, steps_per_epoch=10)  # SupCAM: 15 epochs, x0.1 at 8 and 12
    assert lrs.shape == (150,)
    np.testing.assert_allclose(lrs[:80], 0.01)
    np.testing.assert_allclose(lrs[80:120], 0.001)
    np.testing.assert_allclose(lrs[120:], 0.0001)
    # without steps_per_epoch the milestones are steps
    lrs = build_lr_schedule(cfg, total_steps=20)
    np.testing.assert_allclose(lrs, [0.01] * 8 + [0.001] * 4 + [0.0001] * 8)


def test_method_sections_are_validated():
    with pytest.raises(ConfigError, match="method.name"):
        load_config(None, ["method.name=byol"])
    with pytest.raises(ConfigError, match="method.roles"):
        load_config(None, ["method.name=supcam", "method.roles=[I,X]"])
    with pytest.raises(ConfigError, match="method.composite"):
        load_config(None, ["method.name=supcam", "method.roles=[I,TO]", "method.composite={T: 2}"])
    with pytest.raises(ConfigError, match="optim.milestones"):
        load_config(None, ["optim.schedule=step"])
    with pytest.raises(ConfigError, match="data.views.backend"):
        load_config(None, ["method.name=autoencoder", "data.views.backend=pil"])
    cfg = load_config(None, ["method.name=supcam", "method.roles=[I,TO]", "method.composite={T: 1, O: 1, TO: 1}"])
    assert cfg.method.composite == {"T": 1, "O": 1, "TO": 1}


def test_stored_configs_with_retired_keys_still_load():
    from sslkit.config import from_dict, to_dict

    stored = to_dict(load_config(recipe_path("demo")))
    stored["eval"]["max_points_per_centroid"] = 1_000_000  # written by an earlier sslkit
    cfg = from_dict(stored)
    assert cfg.eval.kmeans_max_train == load_config(recipe_path("demo")).eval.kmeans_max_train
    assert "max_points_per_centroid" in stored["eval"]  # the caller's dict is not modified


def test_a_command_line_max_steps_beats_the_recipes_epochs(tmp_path):
    assert load_config(recipe_path("sscl-cpu")).train.epochs == 60  # the recipe trains by epochs
    cfg = load_config(recipe_path("sscl-cpu"), ["train.max_steps=3"])
    assert (cfg.train.max_steps, cfg.train.epochs) == (3, 0)
    assert load_config(recipe_path("sscl-cpu"), ["train.epochs=0", "train.max_steps=3"]).train.max_steps == 3
    # An epochs override still replaces the file's max_steps; the file's own epochs beat its own max_steps.
    path = tmp_path / "steps.yaml"
    path.write_text("train:\n  max_steps: 50\n")
    assert load_config(path, ["train.epochs=2"]).train.epochs == 2
    path.write_text("train:\n  max_steps: 50\n  epochs: 4\n")
    assert load_config(path).train.epochs == 4
    # The same rule for a stored config (sslkit evaluate, the demo).
    assert apply_overrides(load_config(recipe_path("sscl-cpu")), ["train.max_steps=5"]).train.epochs == 0


@pytest.mark.parametrize("overrides", [["train.max_steps=3", "train.epochs=2"], ["train.epochs=2", "train.max_steps=3"],
                                       ["train={max_steps: 3, epochs: 2}"]])
def test_both_lengths_on_the_command_line_are_one_sentence(overrides):
    with pytest.raises(ConfigError, match=r"^Overrides set both 'train.max_steps' \(3\) and 'train.epochs' \(2\), "
                                          r"two lengths for one run; give one of them"):
        load_config(recipe_path("demo"), overrides)


def test_epoch_milestones_keep_their_unit_when_max_steps_replaces_epochs():
    cfg = load_config(recipe_path("supcam-finetune"), ["train.max_steps=100"])
    assert (cfg.train.epochs, cfg.optim.milestones, cfg.optim.milestone_unit) == (0, [8, 12], "epochs")
    assert load_config(recipe_path("supcam-finetune")).optim.milestone_unit == "auto"
    assert load_config(recipe_path("demo"), ["train.max_steps=100"]).optim.milestone_unit == "auto"  # no epochs


def test_a_mapping_override_replaces_a_free_form_mapping_and_a_dotted_one_adds_to_it(tmp_path):
    """A recipe's model.backbone_kwargs {width: 16} must be clearable when another backbone is chosen."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  backbone: preact_resnet18\n  backbone_kwargs: {width: 16}\n")
    assert load_config(recipe, ["model.backbone=resnet18", "model.backbone_kwargs={}"]).model.backbone_kwargs == {}
    assert load_config(recipe, ["model.backbone_kwargs={drop_rate: 0.1}"]).model.backbone_kwargs == {"drop_rate": 0.1}
    assert load_config(recipe, ["model.backbone_kwargs.drop_rate=0.1"]).model.backbone_kwargs == {
        "width": 16, "drop_rate": 0.1}
    assert load_config(recipe, []).model.backbone_kwargs == {"width": 16}
