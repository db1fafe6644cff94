import pytest

from sslkit.cli import recipe_path
from sslkit.config import ConfigError, apply_overrides, from_dict, load_config, to_dict


def test_overrides_are_typed():
    cfg = load_config(recipe_path("demo"), ["optim.lr=3e-4", "model.backbone_kwargs.width=8", "train.max_steps=7"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.train.max_steps == 7
    assert cfg.model.backbone_kwargs == {"width": 8}
    assert cfg.method.name == "ccrl"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "Unknown config key 'optim.lrr'.*Did you mean 'optim.lr'"),
        ("data.views.rotatio=90", "Unknown config key 'data.views.rotatio'.*'data.views.rotation'"),
        ("optim.lr=fast", "Bad value for config key 'optim.lr'"),
        ("tracker.name=mlflow", "'tracker.name' is 'mlflow'; choose one of"),
        ("train.max_steps=0", "'train.max_steps' must be positive"),
        ("model.predictor=[32,32]", "must end at the projector's size 64"),
        ("optim.lr", "not of the form key=value"),
    ],
)
def test_bad_configs_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(recipe_path("demo"), [override])


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
