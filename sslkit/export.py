"""``sslkit export RUN_DIR --out FILE.safetensors``: a run's backbone as a timm checkpoint.

The file holds the backbone's state dict under the key names of the timm model that
rebuilds it, and, as safetensors metadata (strings), what a user needs to rebuild and feed
it: the timm name and kwargs, input channels and size, the per-channel mean and std of the
inputs, and where the weights came from (method, encoder, step, git SHA). Loading::

    import timm
    import sslkit.models  # registers preact_resnet18 and the dcae_*_encoder models with timm
    model = timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=dict(file=path),
                              num_classes=0, in_chans=in_chans, **backbone_kwargs)

or ``load_backbone(path)``, which reads those from the metadata and puts the mean, std and
input size into ``model.pretrained_cfg`` (so ``timm.data.resolve_data_config`` is right).

Why ``num_classes=0``: timm's ``load_pretrained`` drops the classifier and loads
non-strictly only when ``num_classes`` differs from the pretrained config's (1000 for
``preact_resnet18`` and timm's ImageNet models). With the default 1000 it loads strictly
and fails on the classifier the file does not hold; any other ``num_classes`` (0 for
features, K for a new random head) works, and so does 1000 with
``pretrained_cfg_overlay=dict(file=path, num_classes=0)``.

The exported module is exactly what ``method.embed(x, encoder=..., features="backbone")``
runs, and the export checks it: before the file is moved into place it is rebuilt as
above and must give the method's embeddings on random images.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn

import sslkit.models  # noqa: F401 -- registers preact_resnet18 and the dcae_*_encoder models with timm
from sslkit.atomic import replacing
from sslkit.config import Config, ConfigError
from sslkit.data.augment import normalize
from sslkit.errors import MissingInput
from sslkit.methods import Exported, Method
from sslkit.rundir import load_trained

FORMAT = "sslkit-backbone/1"
# Metadata values that are JSON (the others are plain strings).
_JSON_KEYS = ("backbone_kwargs", "in_chans", "input_size", "mean", "std", "crop_pct", "num_features", "step",
              "momentum_encoder")
# How sslkit feeds images (build_eval_transform): the whole crop resized, bilinear, no crop.
_TRANSFORM = {"interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "squash"}


def export_run(run_dir: str | Path, out: str | Path, *, encoder: str | None = None) -> dict[str, Any]:
    """Write the backbone of ``run_dir``'s newest checkpoint to ``out`` (atomically) and return a summary.

    ``encoder``: momentum | query for methods with a momentum encoder (CCRL, SupCAM); default
    ``eval.encoder``, the one ``sslkit evaluate`` measured. Other methods have one encoder.
    Raises FileNotFoundError for a run without a checkpoint and ConfigError for a bad ``out``.
    """
    out = _check_out(Path(out))
    cfg, method, state = load_trained(Path(run_dir))
    encoder = _resolve_encoder(cfg, method, encoder)
    exp = exported_backbone(cfg, method, encoder)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in exp.module.state_dict().items()}
    info: dict[str, Any] = {
        "format": "pt", "sslkit_format": FORMAT, "architecture": exp.architecture, "backbone_kwargs": exp.kwargs,
        "in_chans": exp.in_chans, "input_size": [exp.in_chans, cfg.data.size, cfg.data.size],
        "mean": [exp.mean] * exp.in_chans, "std": [exp.std] * exp.in_chans, **_TRANSFORM,
        "num_features": int(exp.module.num_features), "method": cfg.method.name, "encoder": encoder,
        "momentum_encoder": method.momentum_encoder,
        "step": int(state["step"]), "run_name": cfg.run.name, "git": state.get("git") or "unknown",
        "sslkit_version": _version("sslkit"), "timm_version": timm.__version__,
    }
    metadata = {k: json.dumps(v) if k in _JSON_KEYS else str(v) for k, v in info.items()}
    diff = _write_checked(out, tensors, metadata, lambda path: _max_diff(path, method, encoder, cfg.data.size))
    return {
        **{k: info[k] for k in ("architecture", "backbone_kwargs", "in_chans", "input_size", "mean", "std",
                                "num_features", "method", "encoder", "momentum_encoder", "step", "git")},
        "out": str(out), "checkpoint": state["checkpoint"], "num_tensors": len(tensors),
        "num_params": sum(p.numel() for p in exp.module.parameters()), "max_abs_diff": diff,
    }


def exported_backbone(cfg: Config, method: Method, encoder: str) -> Exported:
    """The module ``method.embed(..., encoder=encoder, features="backbone")`` runs, as a timm model."""
    return method.export_spec(cfg, encoder)


def _resolve_encoder(cfg: Config, method: Method, encoder: str | None) -> str:
    if encoder not in (None, "momentum", "query"):
        raise ConfigError(f"--encoder is '{encoder}'; choose momentum or query.")
    if not method.momentum_encoder:
        if encoder == "momentum":
            raise ConfigError(f"Method {cfg.method.name} has one encoder and no momentum copy; "
                              "export it without --encoder (or with --encoder query).")
        return "query"
    return encoder or cfg.eval.encoder


def _check_out(out: Path) -> Path:
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out '{out}' must end in .safetensors (timm and finetune.init pick the format by "
                          "the suffix); name the file FILE.safetensors.")
    if out.is_dir():
        raise ConfigError(f"--out '{out}' is a directory; give a file path ending in .safetensors.")
    return out


def _write_checked(out: Path, tensors: dict[str, Tensor], metadata: dict[str, str],
                   check: Callable[[Path], float]) -> float:
    """Write to a temporary file beside ``out``, run ``check(tmp) -> max diff``, then rename it.

    A crash or a failed check leaves ``out`` as it was (absent, or the previous export).
    The temporary name ends in .safetensors so timm's loader reads it as one."""
    data = save(tensors, metadata=metadata)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"Cannot write --out '{out}': its folder cannot be made ({err.strerror or err}: "
                          f"'{err.filename}'); choose a path in a writable folder.") from None
    try:
        with replacing(out, fsync=True) as tmp:  # the temporary name keeps .safetensors for timm's loader
            tmp.write_bytes(data)
            diff = check(tmp)
    except OSError as err:
        raise ConfigError(f"Cannot write --out '{out}' ({err.strerror or err}); choose a writable path "
                          "with free space.") from None
    return diff


@torch.no_grad()
def _max_diff(path: Path, method: nn.Module, encoder: str, size: int) -> float:
    """Largest |difference| between the rebuilt model and ``method.embed`` on random images."""
    model, info = load_backbone(path)
    g = torch.Generator().manual_seed(0)
    unit = torch.rand(2, info["in_chans"], size, size, generator=g)  # images in [0, 1]
    mean, std = (torch.tensor(info[k]).view(1, -1, 1, 1) for k in ("mean", "std"))
    ours = model((unit - mean) / std).float()
    theirs = method.embed(normalize(unit), encoder=encoder, features="backbone").float()
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5):
        diff = (ours - theirs).abs().max().item() if ours.shape == theirs.shape else float("inf")
        raise RuntimeError(f"The exported {info['architecture']} does not reproduce the run's embeddings "
                           f"(max |diff| {diff:.3g}); nothing was written. This is an sslkit bug: please report it.")
    return float((ours - theirs).abs().max())


def read_info(path: str | Path) -> dict[str, Any]:
    """The metadata of an exported file, with numbers and lists decoded."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"No exported backbone at '{path}'; write one with "
                                "`sslkit export RUN_DIR --out FILE.safetensors`.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"'{path}' is not a readable safetensors file ({err}); export it again.") from None
    if "architecture" not in meta:
        raise ConfigError(f"'{path}' holds no sslkit export metadata (architecture); write it with "
                          "`sslkit export RUN_DIR --out FILE.safetensors`.")
    return {k: json.loads(v) if k in _JSON_KEYS else v for k, v in meta.items()}


def load_backbone(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild an exported backbone with ``timm.create_model``, in eval mode: (model, metadata).

    The model's ``pretrained_cfg`` carries the file's mean, std and input size; loading is
    strict (the overlay's ``num_classes=0`` equals the model's, so timm drops nothing)."""
    info = read_info(path)
    overlay = {"file": str(path), "num_classes": 0, "input_size": tuple(info["input_size"]),
               "mean": tuple(info["mean"]), "std": tuple(info["std"]),
               **{k: info[k] for k in _TRANSFORM if k in info}}
    model = timm.create_model(info["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                              num_classes=0, in_chans=info["in_chans"], **info["backbone_kwargs"])
    return model.eval(), info


def timm_call(summary: dict[str, Any]) -> str:
    """The ``timm.create_model`` call that loads ``summary['out']`` (after ``import sslkit.models``)."""
    kwargs = "".join(f", {k}={v!r}" for k, v in summary["backbone_kwargs"].items())
    return (f"timm.create_model({summary['architecture']!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file={summary['out']!r}), num_classes=0, "
            f"in_chans={summary['in_chans']}{kwargs})")


def describe(summary: dict[str, Any]) -> str:
    """One line for the command to print: what was written and how to load it."""
    c, h, w = summary["input_size"]
    source = (f"{summary['encoder']} encoder of the {summary['method']}" if summary.get("momentum_encoder")
              else summary["method"])
    return (f"Wrote {summary['out']}: {summary['architecture']} from the {source} run at step {summary['step']} "
            f"({summary['num_tensors']} tensors, {summary['num_params']:,} parameters, "
            f"{summary['num_features']}-d features; inputs {c}x{h}x{w}, mean {summary['mean'][0]:g}, "
            f"std {summary['std'][0]:g}); load it with `import timm, sslkit.models; {timm_call(summary)}`.")


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


__all__ = ["export_run", "describe", "load_backbone", "read_info", "timm_call", "exported_backbone"]
