"""The tile encoder of ``sslkit extract``: a run directory, an exported backbone, or a timm model.

    enc = load_encoder("runs/demo")                                     # method.embed, as `sslkit embed`
    enc = load_encoder("demo.safetensors")                              # `sslkit export`'s file
    enc = load_encoder("timm:resnet50", weights="r50.safetensors")      # a published encoder, local weights
    x = enc.pixels(pil_tile)                                            # (C, size, size) uint8
    feats = enc.embed(x[None])                                          # (1, D): scaled, normalised, encoded

How each kind sees a tile (the whole tile is resized, never cropped: it is the unit a bag row
stands for):

- run directory: exactly as ``sslkit embed`` and ``sslkit evaluate`` (``build_eval_transform``):
  resized to the run's ``data.size`` (bilinear, antialiased), ``data.channels``, mean/std 0.5;
  features of ``method.embed(x, encoder=..., features=...)``.
- exported ``.safetensors``: the same, with the input size, mean and std in the file's metadata.
- timm model: its own input size, interpolation, mean and std (``timm.data.resolve_model_data_config``,
  e.g. 224 px, bicubic, ImageNet's mean/std for ImageNet models); ``input_size`` overrides the size
  (a ViT built with ``dynamic_img_size=True`` can take the tiles at their own size). The weights
  file (.safetensors, .pth, .bin: timm's ``load_state_dict``) must hold every weight of the
  model; a classifier it holds is dropped (features are the pooled output, ``num_classes=0``).

``identity`` (stored in every bag's ``encoder`` attribute) names the encoder and the first 16 hex
digits of the SHA-256 of its weights file, which ``sha256`` holds in full.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from sslkit.errors import MissingInput, UsageError


@dataclass
class TileEncoder:
    """What extraction needs of an encoder: how to make its input from a tile, the module, and a name.

    DataLoader workers make ``pixels(tile)`` (uint8, a quarter of float32's bytes to pass
    between processes and to the device); ``embed`` scales and normalises a batch of them
    where the model runs (the same arithmetic, element by element, as the evaluation transform)
    and applies the module."""

    module: Callable[[torch.Tensor], torch.Tensor]  # (B, C, size, size) float32 -> (B, D); an nn.Module or a call
    pixels: Callable[[Any], torch.Tensor]  # PIL image -> (C, size, size) uint8, picklable (DataLoader workers)
    mean: list[float]
    std: list[float]
    size: int  # input side in pixels
    channels: int
    identity: str
    sha256: str
    feature_kind: str  # "backbone" or "projector"
    to: Callable[[torch.device], None]  # moves the weights to a device
    variant: str = ""  # what else, with the weights, decides the features: a run's encoder, a timm name

    def inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 -> the module's float input: x / 255, then (x - mean) / std."""
        from torchvision.transforms.v2 import functional as F

        return F.normalize(F.to_dtype(pixels, torch.float32, scale=True), self.mean, self.std)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 -> (B, D) features."""
        return self.module(self.inputs(pixels))


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tile_pixels(*, size: int | tuple[int, int], channels: int,
                interpolation: str = "bilinear") -> Callable[[Any], torch.Tensor]:
    """PIL image -> (C, H, W) uint8: the whole image in ``channels`` (RGB or L) resized, antialiased.
    For a run's ``data.size`` with bilinear interpolation this is ``build_decode_transform``: the
    pixels the evaluation transform then scales and normalises."""
    from torchvision.transforms import v2

    from sslkit.data.augment import _Mode

    modes = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC,
             "nearest": v2.InterpolationMode.NEAREST, "lanczos": v2.InterpolationMode.LANCZOS}
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return v2.Compose([_Mode(channels), v2.Resize(hw, interpolation=modes.get(interpolation, modes["bilinear"]),
                                                  antialias=True), v2.ToImage()])


def _moves(module: nn.Module) -> Callable[[torch.device], None]:
    return lambda device: module.to(device)


def load_encoder(spec: str, *, weights: Optional[str] = None, encoder: Optional[str] = None,
                 features: str = "backbone", input_size: Optional[int] = None,
                 model_args: Optional[dict[str, Any]] = None) -> TileEncoder:
    """The encoder ``spec`` names: a run directory, an exported ``.safetensors``, or ``timm:NAME``
    (or a bare timm model name) with ``weights``, a local file. Raises a UserError naming the fix."""
    path = Path(spec)
    if path.is_dir():
        _no_timm_flags(spec, weights=weights, model_args=model_args)
        return _run_encoder(path, encoder=encoder, features=features, input_size=input_size)
    if path.suffix == ".safetensors" and weights is None:
        _no_timm_flags(spec, weights=weights, model_args=model_args)
        if encoder is not None or features != "backbone":
            raise UsageError(f"--encoder and --features choose inside a run directory; {spec} is an exported "
                             "backbone (its features only).")
        return _exported_encoder(path, input_size=input_size)
    if path.exists() and not spec.startswith("timm:"):
        raise UsageError(f"ENCODER {spec} is neither a run directory nor an exported .safetensors; for a timm model "
                         "give timm:NAME --weights FILE.")
    return _timm_encoder(spec.removeprefix("timm:"), weights=weights, input_size=input_size,
                         model_args=model_args or {})


def _no_timm_flags(spec: str, *, weights: Optional[str], model_args: Optional[dict]) -> None:
    if weights is not None or model_args:
        raise UsageError(f"--weights and --model-arg belong to a timm model (timm:NAME); {spec} carries its own "
                         "architecture and weights: drop them.")


def _run_encoder(run_dir: Path, *, encoder: Optional[str], features: str, input_size: Optional[int]) -> TileEncoder:
    """A run's method, fed as ``sslkit embed`` feeds it (``build_eval_transform`` at ``data.size``)."""
    from sslkit.data.augment import MEAN, STD, build_decode_transform
    from sslkit.rundir import load_trained

    cfg, method, state = load_trained(run_dir)
    if encoder not in (None, "momentum", "query"):
        raise UsageError(f"--encoder is '{encoder}'; choose momentum or query.")
    encoder = encoder or cfg.eval.encoder
    if features not in ("backbone", "projector"):
        raise UsageError(f"--features is '{features}'; choose backbone or projector.")
    size, channels = input_size or cfg.data.size, cfg.data.channels
    checkpoint = Path(state["checkpoint"])
    sha = file_sha256(checkpoint / "model.safetensors")
    identity = (f"run {run_dir} ({cfg.method.name}, {encoder} encoder, {features}, {checkpoint.name}, "
                f"sha256 {sha[:16]})")

    def embed(x: torch.Tensor) -> torch.Tensor:
        return method.embed(x, encoder=encoder, features=features)

    return TileEncoder(module=embed, pixels=build_decode_transform(size=size, channels=channels),
                       mean=[MEAN] * channels, std=[STD] * channels, size=size, channels=channels, identity=identity,
                       sha256=sha, feature_kind=features, to=_moves(method), variant=f"{encoder} encoder")


def _exported_encoder(path: Path, *, input_size: Optional[int]) -> TileEncoder:
    """``sslkit export``'s file, rebuilt by ``load_backbone``, fed with the size, mean and std in its metadata."""
    from sslkit.export import load_backbone

    model, info = load_backbone(path)
    channels, size = int(info["in_chans"]), input_size or int(info["input_size"][-1])
    sha = file_sha256(path)
    pixels = tile_pixels(size=size, channels=channels, interpolation=info.get("interpolation", "bilinear"))
    identity = f"{path} ({info['architecture']}, {info.get('method', '?')} step {info.get('step', '?')}, " \
               f"sha256 {sha[:16]})"
    return TileEncoder(module=model, pixels=pixels, mean=list(info["mean"]), std=list(info["std"]), size=size,
                       channels=channels, identity=identity, sha256=sha, feature_kind="backbone", to=_moves(model))


def _timm_encoder(name: str, *, weights: Optional[str], input_size: Optional[int],
                  model_args: dict[str, Any]) -> TileEncoder:
    """``timm.create_model(name, num_classes=0, **model_args)`` with every weight from the local file ``weights``."""
    import timm
    from timm.data import resolve_model_data_config

    import sslkit.models  # noqa: F401 -- registers preact_resnet18 and the dcae encoders with timm

    if weights is None:
        raise UsageError(f"ENCODER {name} is taken as a timm model; give its weights with --weights FILE "
                         "(.safetensors, .pth or .bin): sslkit downloads nothing.")
    if not Path(weights).is_file():
        raise MissingInput(f"--weights {weights} is not a file; give the model's local weights file.")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **model_args)
    except (RuntimeError, TypeError, ValueError) as err:  # an unknown name is a RuntimeError
        raise UsageError(f"timm cannot build {name!r} ({err}); give a model name from timm.list_models() "
                         "and its --model-arg keywords.") from None
    _load_weights(model, weights, name)
    config = resolve_model_data_config(model)
    channels, (height, width) = int(config["input_size"][0]), config["input_size"][1:]
    size = input_size or int(width)
    pixels = tile_pixels(size=(input_size or height, size), channels=channels,
                         interpolation=config.get("interpolation", "bilinear"))
    sha = file_sha256(weights)
    kwargs = f" {json.dumps(model_args, sort_keys=True)}" if model_args else ""
    identity = f"timm {name}{kwargs} weights {weights} (sha256 {sha[:16]})"
    return TileEncoder(module=model.eval(), pixels=pixels, mean=list(config["mean"]), std=list(config["std"]),
                       size=size, channels=channels, identity=identity, sha256=sha, feature_kind="backbone",
                       to=_moves(model), variant=f"timm {name}{kwargs}")


def _load_weights(model: nn.Module, weights: str, name: str) -> None:
    """Every weight of ``model`` from ``weights``; a classifier the file holds is dropped. Strict otherwise."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(weights)
    except Exception as err:  # noqa: BLE001 -- safetensors, pickle and zip errors alike
        raise UsageError(f"--weights {weights} cannot be read as a state dict ({type(err).__name__}: {err}); "
                         "give a .safetensors, .pth or .bin file of the model's weights.") from None
    own = model.state_dict()
    head = model.pretrained_cfg.get("classifier")
    heads = [head] if isinstance(head, str) else list(head or [])
    dropped = [k for k in state if k not in own and any(k == h or k.startswith(f"{h}.") for h in heads)]
    for key in dropped:
        state.pop(key)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise UsageError(f"--weights {weights} does not fit timm's {name}: {len(missing)} weights missing "
                         f"({', '.join(missing[:3]) or 'none'}), {len(unexpected)} unknown "
                         f"({', '.join(unexpected[:3]) or 'none'}); give the file of this architecture (and its "
                         "--model-arg keywords).")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shapes
        first = str(err).splitlines()[1:2] or [str(err)]
        raise UsageError(f"--weights {weights} does not fit timm's {name} ({first[0].strip()}); give the file of "
                         "this architecture (and its --model-arg keywords).") from None


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` words -> keywords for ``timm.create_model``; values read as JSON when they parse
    (``init_values=1e-5``, ``dynamic_img_size=true``), else as strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--model-arg {item!r} must be KEY=VALUE, such as init_values=1e-5.")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


__all__ = ["TileEncoder", "file_sha256", "load_encoder", "parse_model_args", "tile_pixels"]
