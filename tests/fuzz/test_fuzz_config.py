"""Damaged configs: ``load_config`` returns a Config that validates, or raises ConfigError with one line --
never another exception, never a hang, and never runs code from a YAML tag.

Inputs: random text and bytes as a YAML file; the shipped recipes (sslkit/configs/*.yaml) with keys
renamed, values replaced by random scalars, lists and mappings, sections dropped, lines re-indented or
cut; random ``key=value`` overrides; YAML tags that would call os.system under an unsafe loader; YAML
alias bombs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml
from fuzz.fuzzing import FUZZ, run_within
from hypothesis import given, settings
from hypothesis import strategies as st

from sslkit.config import Config, ConfigError, from_dict, load_config, to_dict, validate

RECIPES = sorted((Path(__file__).resolve().parents[2] / "sslkit" / "configs").glob("*.yaml"))
KEYS = sorted({f"{section}.{key}" for section, values in to_dict(Config()).items() for key in values}
              | {"data.views.rotation", "data.views.crop_scale", "data.balanced.classes",
                 "model.backbone_kwargs.width"})

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), st.floats(), st.text(max_size=10),
                     st.sampled_from(["${data.size}", "${nope}", "${oc.env:NO_SUCH_VARIABLE}", "???", "1e-3",
                                      "${oc.env:HOME}", "0x10", ".inf", "-.nan", "~"]))
_VALUES = st.recursive(_SCALARS, lambda children: st.lists(children, max_size=3)
                       | st.dictionaries(st.text(max_size=6), children, max_size=3), max_leaves=8)
_OVERRIDE_VALUES = st.one_of(st.text(max_size=16), _SCALARS.map(str), st.sampled_from([
    "[1,2]", "[a, b]", "{a: 1}", "{T: 9}", "null", "true", "[", "{", "]", "a: b: c", "- x", "&a [*a]", "!!binary aGk=",
    "!!set {a}", "!!float nan", "2001-12-14", "'quoted'", '"esc\\x00"', "|\n  block", "\t", "\x00", "\udcff"]))


def _check(path: Path | None, overrides: list[str]) -> None:
    try:
        cfg = run_within(lambda: load_config(path, overrides))
    except ConfigError as err:
        message = str(err)
        assert message and "\n" not in message and message[-1] in ".?", message  # one line, one sentence
        return
    assert isinstance(cfg, Config)
    validate(cfg)  # what came back is valid, and survives the round trip through a run directory
    assert from_dict(to_dict(cfg)) == cfg


def _check_text(text: str | bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzzed.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        _check(path, [])


@settings(FUZZ, max_examples=100)
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=100),
                      st.text(alphabet=" \t\n:-[]{}&*!|>'\"#%@`,?.0123456789abcdelnoptr", max_size=120)))
def test_random_yaml_text(text):
    _check_text(text)


@settings(FUZZ, max_examples=80)
@given(data=st.data(), recipe=st.sampled_from(RECIPES))
def test_mutated_recipe_text(data, recipe):
    """Lines dropped, repeated, re-indented (tabs too), cut, or sprinkled with YAML punctuation."""
    lines = recipe.read_text().splitlines()
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        at = data.draw(st.integers(0, len(lines) - 1), label="line")
        op = data.draw(st.sampled_from(["drop", "repeat", "indent", "dedent", "tab", "cut", "insert"]), label="op")
        line = lines[at]
        lines[at:at + 1] = {
            "drop": [], "repeat": [line, line], "indent": ["  " + line], "dedent": [line[2:]],
            "tab": ["\t" + line], "cut": [line[:data.draw(st.integers(0, len(line)))]],
            "insert": [line + data.draw(st.text(alphabet=":-[]{}&*!|>'\"#%@ ", max_size=4))],
        }[op]
    _check_text("\n".join(lines) + "\n")


def _paths(node: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in node.items():
        out.append(prefix + (key,))
        if isinstance(value, dict):
            out.extend(_paths(value, prefix + (key,)))
    return out


@settings(FUZZ, max_examples=100)
@given(data=st.data(), recipe=st.sampled_from(RECIPES))
def test_mutated_recipe_values(data, recipe):
    """Keys renamed, values replaced by random scalars, lists or mappings, keys dropped or added."""
    tree = yaml.safe_load(recipe.read_text()) or {}
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        paths = _paths(tree)
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="key")
        parent = tree
        for part in path[:-1]:
            parent = parent[part]
        op = data.draw(st.sampled_from(["rename", "replace", "drop", "add"]), label="op")
        if op == "rename":
            new = data.draw(st.one_of(st.text(max_size=8), st.just(str(path[-1]) + "s"), st.just(str(path[-1])[:-1])))
            parent[new] = parent.pop(path[-1])
        elif op == "replace":
            parent[path[-1]] = data.draw(_VALUES, label="value")
        elif op == "drop":
            del parent[path[-1]]
        else:
            parent[data.draw(st.sampled_from(["extra", str(path[-1])[:3]]))] = data.draw(_VALUES, label="value")
    _check_text(yaml.safe_dump(tree, default_flow_style=data.draw(st.sampled_from([None, True, False]))))


@settings(FUZZ, max_examples=120)
@given(overrides=st.lists(st.one_of(
    st.tuples(st.sampled_from(KEYS) | st.text(max_size=12), st.sampled_from(["=", "", "==", " = "]), _OVERRIDE_VALUES)
    .map("".join), st.text(max_size=20)), min_size=1, max_size=3))
def test_random_overrides(overrides):
    _check(None, overrides)


@settings(FUZZ, max_examples=25)
@given(steps=st.integers(-3, 10 ** 6), lr=st.floats(-1.0, 10.0, allow_nan=False))
def test_numeric_overrides_land_typed_or_are_refused(steps, lr):
    """The negative control of the properties above: valid values arrive as they were typed, values
    out of range are refused naming the key, the allowed range and the override."""
    overrides = [f"train.max_steps={steps}", f"optim.lr={lr!r}"]
    if steps > 0 and lr > 0:
        cfg = load_config(None, overrides)
        assert (cfg.train.max_steps, cfg.optim.lr) == (steps, lr)
        return
    key, item = ("train.max_steps", overrides[0]) if steps <= 0 else ("optim.lr", overrides[1])
    with pytest.raises(ConfigError, match=rf"^Config key '{key}' must be positive, got .* \(set by override "
                                          rf"'{item}'\)\.$"):
        load_config(None, overrides)


PAYLOADS = ['!!python/object/apply:os.system ["touch {marker}"]',
            '!!python/object/new:os.system ["touch {marker}"]',
            '!!python/object/apply:subprocess.check_call [["touch", "{marker}"]]',
            '!!python/name:os.system', '!!python/module:os', '!!python/object:builtins.object {{}}']


@pytest.mark.parametrize("where", ["top level", "a value", "an override"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_python_tags_never_run(tmp_path, payload, where):
    """YAML is read with a safe loader: a tag that would run a command under yaml.load's unsafe loaders
    is refused with ConfigError, and the command has not run."""
    marker = tmp_path / "MARKER"
    value = payload.format(marker=marker)
    path = tmp_path / "evil.yaml"
    path.write_text({"top level": value, "a value": f"run:\n  name: {value}\n", "an override": "run: {}\n"}[where])
    with pytest.raises(ConfigError, match="not valid YAML.*tags such as !!python"):
        load_config(path, [f"run.name={value}"] if where == "an override" else [])
    assert not marker.exists()


def _laughs(levels: int = 9) -> list[str]:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return lines


@pytest.mark.parametrize("bomb", ["file", "nested", "recursive", "override"])
def test_alias_bombs_are_refused_quickly(tmp_path, bomb):
    """A few hundred bytes of YAML aliases expand to 9^9 values (or loop forever); OmegaConf copies every
    one of them, so reading such a config would hang: it is refused before the merge."""
    path, overrides = tmp_path / "bomb.yaml", []
    if bomb == "file":
        path.write_text("\n".join(_laughs()) + "\n")
    elif bomb == "nested":
        path.write_text("model:\n  backbone_kwargs:\n" + "".join(f"    {line}\n" for line in _laughs()))
    elif bomb == "recursive":
        path.write_text("model:\n  backbone_kwargs: &loop {x: *loop}\n")
    else:
        path.write_text("{}\n")
        overrides = ["model.backbone_kwargs={" + ", ".join(line.replace(": &", ": &", 1) for line in _laughs()) + "}"]
    with pytest.raises(ConfigError, match="more than 100,000 values once its YAML aliases are expanded"):
        run_within(lambda: load_config(path, overrides))
