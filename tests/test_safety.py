"""Safety (issue 7, item 6): nothing sslkit reads can run code.

- Checkpoints: every ``torch.load`` on resume passes ``weights_only=True`` (Accelerate's
  loader, with its numpy allow-list for the RNG pickle); tampered files run nothing.
- Exports, ``finetune.init`` and evaluation read safetensors only.
- A static scan of sslkit/**/*.py: no eval/exec/pickle/marshal/unsafe YAML, ``torch.load``
  only with ``weights_only=True``, ``np.load`` never with ``allow_pickle``; ``shell=True``
  only where ``pipe:`` shard URLs run the user's command by design (sslkit/data/remote.py).
- YAML configs are safe-loaded; shard manifests and tar members cannot run commands.
- The W&B API key never reaches the run directory, the logs or W&B's own files.
"""

import ast
import io
import json
import os
import pickle
import secrets
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from sslkit.checkpoint import latest_checkpoint
from sslkit.cli import main
from sslkit.config import ConfigError, load_config, recipe_path
from sslkit.data.loaders import eval_loader
from sslkit.data.shardset import resolve_shards
from sslkit.engine import train
from sslkit.sharding.synthetic import make_synthetic

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sslkit"
TINY = [  # as tests/engine/conftest.py: a few steps take seconds on 2 CPU cores
    "model.backbone_kwargs.width=4", "model.projector=[16,8]", "model.predictor=[8,8]",
    "method.queue_size=64", "data.batch_size=16", "data.shuffle_buffer=64", "data.workers=1",
    "tracker.name=none", "train.log_every=1", "optim.warmup_steps=2", "train.eval_every=0",
]


# ---------------------------------------------------------------- a payload that runs code when unpickled


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _write_payload(path: Path, marker: Path) -> None:
    torch.save(_Payload(marker), path)
    # The payload is live: an unsafe load does run it (so its absence below means something).
    with path.open("rb") as f:  # a file object: torch.load would hand a *.safetensors path to safetensors
        torch.load(f, weights_only=False)
    assert marker.exists()
    marker.unlink()


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    make_synthetic(root / "train", num_samples=160, size=32, seed=0, shard_size=48, prefix="train", progress=False)
    make_synthetic(root / "eval", num_samples=96, size=32, seed=1, shard_size=48, prefix="eval", progress=False)
    return root


def _cfg(shards: Path, run: Path, *extra: str):
    return load_config(recipe_path("demo"), [*TINY, f"data.shards={shards / 'train'}", f"run.dir={run}",
                                             "train.ckpt_every=2", *extra])


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    """A run with a checkpoint at step 2; tests copy it before changing anything."""
    return train(_cfg(shards, tmp_path_factory.mktemp("trained") / "run", "train.max_steps=2"))


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _spy_loads(monkeypatch) -> list[dict]:
    """Record every torch.load / pickle load call: the file, weights_only, and whether it worked."""
    calls: list[dict] = []
    real_torch = torch.load

    def torch_load(f, *args, **kwargs):
        call = {"file": Path(f).name if isinstance(f, (str, os.PathLike)) else repr(f),
                "weights_only": kwargs.get("weights_only"), "positional": len(args), "ok": False}
        calls.append(call)
        out = real_torch(f, *args, **kwargs)
        call["ok"] = True  # Accelerate swallows a failed RNG load: record success here
        return out

    def refuse(name):
        def pickle_load(*args, **kwargs):
            calls.append({"file": name, "weights_only": None, "positional": len(args), "ok": False})
            raise AssertionError(f"{name} called")
        return pickle_load

    monkeypatch.setattr(torch, "load", torch_load)
    monkeypatch.setattr(torch.serialization, "load", torch_load)
    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    return calls


def test_resume_reads_every_checkpoint_file_with_weights_only(trained, shards, tmp_path, monkeypatch):
    run = _copy(trained, tmp_path)
    calls = _spy_loads(monkeypatch)
    train(_cfg(shards, run, "train.max_steps=3"))  # run.resume=auto: from step 2
    assert {c["file"] for c in calls} == {"optimizer.bin", "random_states_0.pkl"}  # the model: safetensors
    assert all(c["weights_only"] is True and c["positional"] == 0 for c in calls), calls
    # The RNG pickle (numpy and Python states) loads under weights_only with Accelerate's allow-list;
    # were it refused, Accelerate would only log "Could not load random states" and go on.
    assert all(c["ok"] for c in calls), calls
    assert json.loads((latest_checkpoint(run / "checkpoints") / "trainer_state.json").read_text())["step"] == 3


@pytest.mark.parametrize("name, refused", [("optimizer.bin", True), ("random_states_0.pkl", False),
                                           ("model.safetensors", True)])
def test_tampered_checkpoint_file_runs_no_code(trained, shards, tmp_path, name, refused):
    run = _copy(trained, tmp_path)
    marker = tmp_path / "pwned"
    _write_payload(latest_checkpoint(run / "checkpoints") / name, marker)
    if refused:
        with pytest.raises(Exception):  # noqa: B017 -- torch's or safetensors' own error types
            train(_cfg(shards, run, "train.max_steps=3"))
    else:
        # Accelerate catches the refused RNG pickle and resumes without it (logged at INFO): nothing
        # sslkit draws depends on the global RNGs (views and data are seeded by step and epoch).
        train(_cfg(shards, run, "train.max_steps=3"))
    assert not marker.exists()


def test_export_finetune_init_and_evaluation_read_safetensors_only(trained, tmp_path, monkeypatch):
    from sslkit.export import export_run, load_backbone
    from sslkit.methods.finetune import pretrained_backbone_state
    from sslkit.rundir import load_trained

    run = _copy(trained, tmp_path)
    calls = _spy_loads(monkeypatch)
    _, method, _ = load_trained(run)
    out = tmp_path / "backbone.safetensors"
    export_run(run, out, encoder="query")  # the encoder finetune.init takes from a run
    model, _ = load_backbone(out)
    from_run, from_file = pretrained_backbone_state(str(run)), pretrained_backbone_state(str(out))
    assert calls == []
    # The reads did load the trained weights (the spy watched real work): the same tensors every way.
    trained_state = method.backbone.state_dict()
    assert from_file.keys() == from_run.keys() == trained_state.keys()
    for name, value in trained_state.items():
        assert torch.equal(from_file[name], value) and torch.equal(from_run[name], value), name
        assert torch.equal(model.state_dict()[name], value), name


# ---------------------------------------------------------------- static scan of sslkit/**/*.py

BANNED = {
    "eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load",
    "_pickle.loads", "_pickle.Unpickler", "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads",
    "marshal.load", "marshal.loads", "shelve.open", "yaml.load", "yaml.load_all", "yaml.unsafe_load",
    "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all", "yaml.Loader", "yaml.UnsafeLoader",
    "yaml.FullLoader", "pandas.read_pickle", "joblib.load", "torch.jit.load", "os.system", "os.popen",
    "subprocess.getoutput", "subprocess.getstatusoutput",
}
TORCH_LOAD = {"torch.load", "torch.serialization.load"}
NUMPY_LOAD = {"numpy.load"}
SUBPROCESS = {"subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call",
              "subprocess.check_output"}
IMPORTERS = {"importlib.import_module", "importlib.__import__"}
CHECKED = BANNED | TORCH_LOAD | NUMPY_LOAD | SUBPROCESS | IMPORTERS
# shell=True where running the user's command is the feature: `pipe:CMD` shard URLs (README, data.shards).
SHELL_ALLOWED = {"sslkit/data/remote.py"}
# yaml.load is allowed with exactly this loader: OmegaConf's, a SafeLoader subclass (checked below).
SAFE_YAML_LOADER = "omegaconf._utils.get_yaml_loader"


def _safe_yaml_load(call: ast.Call, aliases: dict[str, str]) -> bool:
    loader = next((kw.value for kw in call.keywords if kw.arg == "Loader"), None)
    return isinstance(loader, ast.Call) and not loader.args and _qualname(loader.func, aliases) == SAFE_YAML_LOADER


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> what it was imported as (``np`` -> ``numpy``, ``load`` -> ``torch.load``)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _qualname(node: ast.AST, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _const(call: ast.Call, keyword: str):
    """The keyword's constant value; ``...`` when it is absent, ``None`` wrapped as a marker when not constant."""
    for kw in call.keywords:
        if kw.arg == keyword:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<not a constant>"
    return ...


def _sslkit_module(arg: ast.AST) -> bool:
    """A module name that can only be one of sslkit's own: a constant, or an f-string starting 'sslkit.'."""
    if isinstance(arg, ast.Constant):
        return isinstance(arg.value, str)
    return (isinstance(arg, ast.JoinedStr) and bool(arg.values) and isinstance(arg.values[0], ast.Constant)
            and str(arg.values[0].value).startswith("sslkit."))


def unsafe_calls(source: str, filename: str = "<snippet>") -> list[str]:
    """Every place in ``source`` that could run code from data; [] when there is none."""
    tree = ast.parse(source, filename=filename)
    aliases = _aliases(tree)
    found: list[str] = []
    called = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        called.add(id(node.func))
        name = _qualname(node.func, aliases)
        where = f"{filename}:{node.lineno} {name}"
        if name is None or name not in CHECKED:
            continue
        if any(kw.arg is None for kw in node.keywords):
            found.append(f"{where}: **kwargs hide the arguments")
        elif name == "yaml.load" and _safe_yaml_load(node, aliases):
            continue
        elif name in BANNED:
            found.append(f"{where}: never call it on data")
        elif name in TORCH_LOAD and _const(node, "weights_only") is not True:
            found.append(f"{where}: pass weights_only=True")
        elif name in NUMPY_LOAD and (len(node.args) > 2 or _const(node, "allow_pickle") not in (..., False)):
            found.append(f"{where}: allow_pickle must stay False")
        elif name in SUBPROCESS and _const(node, "shell") not in (..., False) and filename not in SHELL_ALLOWED:
            found.append(f"{where}: shell=True runs a string through the shell")
        elif name in IMPORTERS and not (node.args and _sslkit_module(node.args[0])):
            found.append(f"{where}: imports a module named by data")
    for node in ast.walk(tree):  # a loader passed around (map(pickle.loads, ...), f = torch.load) escapes the checks
        if isinstance(node, (ast.Attribute, ast.Name)) and id(node) not in called and isinstance(node.ctx, ast.Load):
            name = _qualname(node, aliases)
            if name in BANNED | TORCH_LOAD | NUMPY_LOAD and name not in ("compile", "eval", "exec"):
                found.append(f"{filename}:{node.lineno} {name}: referenced, not called")
    return found


def test_static_scan_finds_nothing_unsafe_in_sslkit():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50 and PACKAGE / "checkpoint.py" in files
    found = [f for path in files for f in unsafe_calls(path.read_text(), path.relative_to(ROOT).as_posix())]
    assert found == []
    # The one allowed shell call is still there (else the allow-list is stale and should go).
    remote = (PACKAGE / "data" / "remote.py").read_text()
    assert "shell=True" in remote and unsafe_calls(remote, "elsewhere.py") != []


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load(path)",
    "import torch\ntorch.load(path, weights_only=False)",
    "import torch\ntorch.load(path, weights_only=flag)",
    "import torch\ntorch.load(path, **kwargs)",
    "from torch import load as read\nread(path)",
    "import torch\ntorch.serialization.load(path)",
    "import torch\nread = torch.load",
    "import numpy as np\nnp.load(path, allow_pickle=True)",
    "import numpy\nnumpy.load(path, None, True)",
    "import pickle\npickle.loads(data)",
    "from pickle import load\nload(f)",
    "import pickle\nlist(map(pickle.loads, blobs))",
    "import marshal\nmarshal.loads(data)",
    "import yaml\nyaml.load(text, Loader=yaml.FullLoader)",
    "import yaml\nyaml.unsafe_load(text)",
    "import yaml\nyaml.full_load(text)",
    "eval(text)",
    "exec(text)",
    "__import__(name)",
    "import importlib\nimportlib.import_module(name)",
    "import subprocess\nsubprocess.run(cmd, shell=True)",
    "import subprocess as sp\nsp.Popen(cmd, shell=use_shell)",
    "import os\nos.system(cmd)",
])
def test_static_scan_catches_unsafe_snippets(snippet):
    assert len(unsafe_calls(snippet)) >= 1


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load(path, map_location='cpu', weights_only=True)",
    "import numpy as np\nnp.load(path, mmap_mode='r')",
    "import numpy as np\nnp.load(path, allow_pickle=False)",
    "import yaml\nyaml.safe_load(text)",
    "import yaml\nfrom omegaconf._utils import get_yaml_loader\nyaml.load(text, Loader=get_yaml_loader())",
    "model.eval()",
    "import re\nre.compile('a+')",
    "import importlib\nimportlib.import_module(f'sslkit.methods.{name}')",
    "import subprocess\nsubprocess.run(['git', 'rev-parse', 'HEAD'], check=True)",
])
def test_static_scan_passes_safe_snippets(snippet):
    assert unsafe_calls(snippet) == []


# ---------------------------------------------------------------- configs, manifests, shards


def test_the_allowed_yaml_loader_is_a_safe_loader():
    from omegaconf._utils import get_yaml_loader

    assert issubclass(get_yaml_loader(), yaml.SafeLoader)


def test_safety_yaml_python_tag_in_config_file_is_not_executed(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "evil.yaml"
    evil.write_text(f'run:\n  name: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ConfigError, match="evil.yaml"):
        load_config(evil)
    assert not marker.exists()
    # The command line says so in one sentence (exit 2), and runs nothing either.
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", str(evil)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("sslkit: error: Config file") and "Traceback" not in err
    assert not marker.exists()
    # Overrides are parsed as YAML too, with the same safe loader.
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, [f'run.name=!!python/object/apply:os.system ["touch {marker}"]'])
    assert not marker.exists()
    # Control: an unsafe YAML loader does run the same text.
    yaml.unsafe_load(evil.read_text())
    assert marker.exists()


def test_config_cannot_copy_the_api_key_from_the_environment(tmp_path, monkeypatch):
    # An interpolation in a shared recipe would write the key into config.yaml, checkpoints and the W&B config.
    monkeypatch.setenv("WANDB_API_KEY", secrets.token_hex(20))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("tracker:\n  project: ${oc.env:WANDB_API_KEY}\n")
    with pytest.raises(ConfigError, match="tracker.project"):
        load_config(recipe)


def test_shard_manifest_cannot_run_commands(shards, tmp_path):
    folder = Path(shutil.copytree(shards / "train", tmp_path / "train"))
    marker = tmp_path / "MARKER"
    manifest = json.loads((folder / "manifest.json").read_text())
    # pipe: names (with and without '://', the test for a URL) are shard files inside the folder, not commands.
    manifest["shards"][0]["name"] = f"pipe:touch {marker}"
    manifest["shards"][1]["name"] = f"pipe:touch {marker} #://"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_shards(str(folder))
    assert not marker.exists()


def test_pickled_members_of_a_shard_are_never_unpickled(tmp_path):
    marker = tmp_path / "MARKER"
    payload = pickle.dumps(_Payload(marker))
    png = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(png, format="PNG")
    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / "evil-000000.tar", "w") as tar:
        for name, data in [("a.png", png.getvalue()), ("a.cls", b"1"), ("a.pyd", payload), ("a.pickle", payload)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (batch,) = list(eval_loader(resolve_shards(str(folder)), size=32, channels=3, batch_size=4, workers=0))
    assert batch["label"].tolist() == [1] and batch["id"] == ["a"]  # the sample was read...
    assert not marker.exists()  # ...and its pickled members left alone (no webdataset autodecode)


# ---------------------------------------------------------------- the W&B API key


@pytest.mark.slow
def test_wandb_api_key_is_never_written(shards, tmp_path):
    pytest.importorskip("wandb")
    key, token = secrets.token_hex(20), secrets.token_hex(12)  # a fake key, and a fake git credential
    home = tmp_path / "wandb-home"
    env = {**os.environ, "WANDB_API_KEY": key, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_CONFIG_DIR": str(home / "config"), "WANDB_CACHE_DIR": str(home / "cache"),
           "WANDB_DATA_DIR": str(home / "data")}
    # Run from a git clone whose remote URL holds a credential: W&B records the remote of the working
    # directory, and must not record the credential with it.
    cwd = tmp_path / "clone"
    cwd.mkdir()
    git = shutil.which("git")
    if git:
        for args in (["init", "-q"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                                      "--allow-empty", "-m", "x"],
                     ["remote", "add", "origin", f"https://user:{token}@example.com/sslkit.git"]):
            subprocess.run([git, *args], cwd=cwd, check=True, capture_output=True)
    run = tmp_path / "run"
    sslkit = [sys.executable, "-m", "sslkit"]
    outputs = []
    for cmd in ([*sslkit, "pretrain", "demo", *TINY, f"data.shards={shards / 'train'}", f"run.dir={run}",
                 "train.max_steps=2", "tracker.name=wandb", "tracker.mode=offline"],
                [*sslkit, "evaluate", str(run), f"eval.shards={shards / 'eval'}", "eval.plots=false",
                 "eval.probe=false", "eval.restarts=1", "eval.niter=5"],
                [*sslkit, "report", str(run)]):
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, timeout=300)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        outputs += [proc.stdout, proc.stderr]
    files = [p for p in [*run.rglob("*"), *home.rglob("*")] if p.is_file()]
    names = {p.name for p in files}
    # Everything a user might share was written: config, checkpoints, logs, W&B's files, the report.
    assert {"config.yaml", "metrics.jsonl", "trainer_state.json", "metrics.json", "report.html",
            "debug.log", "debug-internal.log"} <= names
    assert sum(p.suffix == ".wandb" for p in files) == 2  # training and evaluation, offline
    for secret in (key, token):
        assert [p for p in files if secret.encode() in p.read_bytes()] == []
        assert not any(secret.encode() in out for out in outputs)
    if git:  # W&B did look at the clone (the scan covers what it recorded)
        assert any(b"example.com/sslkit.git" in p.read_bytes() for p in files if p.suffix == ".wandb")
