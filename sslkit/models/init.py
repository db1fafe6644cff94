"""A backbone's first weights: ``model.init``, ``model.pretrained`` and ``finetune.init``.

Every method starts from them the same way: ``sslkit.methods.build_method`` builds the method, then
``init_backbone`` reads the weights, fits them to ``method.backbone`` and hands them to
``Method.load_backbone_state``, which also copies them into the method's EMA copies
(``Method.backbone_copies``: a key encoder, a teacher). Where the weights come from:

- a run directory: the trained method's ``backbone`` (the query encoder) from its newest checkpoint;
- a ``.safetensors`` file holding a state dict (what ``sslkit export`` writes);
- a PyTorch/timm checkpoint (``.pth``, ``.pt``, ``.bin``, ``.ckpt``), read with ``weights_only=True``: the
  state dict may be the file itself or nested under any key (``state_dict``, ``model``, ``teacher``,
  ...), its keys may carry a prefix (``module.``, ``backbone.``, ``encoder.``, ...). The nested dict and
  the prefix under which most keys name a backbone tensor are taken; keys outside that prefix (a
  projection head beside the backbone) are left out, and so is a classifier the backbone has not;
- ``model.pretrained=true``: timm's published weights for ``model.backbone``.

Fitting: a ViT's absolute position embedding (``pos_embed``) is resampled to the backbone's patch
grid with timm's ``resample_abs_pos_embed`` (prefix tokens, cls and registers, kept as they are, none
when the model has ``no_embed_class``); the first convolution (or patch embedding) of another channel
count is adapted with timm's ``adapt_input_conv`` (1 channel: the sum over the source's channels).
Any other key that is missing, unexpected or of another shape is, with ``model.init_strict=true``
(the default), a ConfigError naming the file, the counts and the first keys; with ``false`` the tensors
that fit are loaded, the rest keep their random initialisation and a warning lists them.

What was loaded is logged and kept as ``method.init_report`` (a plain dict), which the engine writes
to the run directory as ``init.json``.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

import timm
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from timm.models._manipulate import adapt_input_conv
from torch import Tensor, nn

from sslkit.config import Config, ConfigError, init_kind
from sslkit.errors import MissingInput

log = logging.getLogger(__name__)

# Nested dicts a checkpoint may hold its weights under, best first when several fit equally well
# (DINO checkpoints hold a student and a teacher: the teacher is the one published).
PREFERRED = ("state_dict", "model", "teacher", "module", "net", "network", "encoder", "backbone", "student")
SHOWN = 3  # keys named in a message, per kind of mismatch


def _reason(err: BaseException) -> str:
    """The first clause of an error's message, fit to stand in parentheses inside one sentence."""
    text = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:160].rstrip(".")
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def run_config(run_dir: str | Path, key: str) -> Config:
    """The stored config of the run that ``key`` names (nothing is built); ConfigError without a checkpoint."""
    from sslkit.rundir import stored_config

    try:
        return stored_config(run_dir)
    except MissingInput:
        raise ConfigError(f"Config key '{key}' is '{run_dir}', which has no complete checkpoint under "
                          f"checkpoints/; pretrain it first or point {key} at another run.") from None


def read_weights(init: str, key: str) -> Any:
    """What ``init`` holds: a run's backbone state dict, a safetensors state dict, or a checkpoint's object."""
    kind = init_kind(init, key)
    if kind == "safetensors":
        return load_file(init)
    if kind == "checkpoint":
        try:
            return torch.load(init, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            raise ConfigError(f"Config key '{key}' is '{init}', which torch cannot read as tensors alone "
                              f"({_reason(err)}); "
                              "save its state dict with torch.save or as .safetensors and point the key at "
                              "that.") from None
    from sslkit.rundir import load_trained

    run_config(init, key)  # a clear error when the run has no checkpoint
    with torch.random.fork_rng(devices=[]):  # building the source method must not move our RNG
        _, method, _ = load_trained(Path(init))
    return {k: v.detach().clone() for k, v in method.backbone.state_dict().items()}


def pretrained_weights(cfg: Config) -> dict[str, Tensor]:
    """timm's published weights for ``model.backbone``; ConfigError saying how to give them as a file instead."""
    m = cfg.model
    try:
        with torch.random.fork_rng(devices=[]):
            net = timm.create_model(m.backbone, pretrained=True, num_classes=0, in_chans=m.in_chans,
                                    **m.backbone_kwargs)
    except (OSError, RuntimeError, ValueError, ImportError) as err:
        raise ConfigError(f"Config key 'model.pretrained' is true but timm could not load its published weights for "
                          f"'{m.backbone}' ({_reason(err)}); download them where there is a network "
                          "and set model.init=/path/to/weights (.safetensors, .pth or .bin) with "
                          "model.pretrained=false, or put them in the Hugging Face cache and set "
                          "HF_HUB_OFFLINE=1.") from None
    return net.state_dict()


# ------------------------------------------------------------------ finding the backbone's tensors


def _tensor_dicts(obj: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], dict[str, Tensor]]]:
    """(path, tensors) of every mapping in ``obj`` that holds tensors, three levels deep at most."""
    if not isinstance(obj, Mapping):
        return
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
    if tensors:
        yield path, tensors
    if len(path) < 3:
        for name, value in obj.items():
            yield from _tensor_dicts(value, (*path, str(name)))


def _best_prefix(keys: list[str], target: set[str]) -> tuple[str, int]:
    """The key prefix (``""``, ``"module."``, ...) under which most ``keys`` name a ``target`` key, and how many."""
    counts: Counter[str] = Counter()
    for key in keys:
        parts = key.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in target:
                counts[".".join(parts[:i]) + ("." if i else "")] += 1
    if not counts:
        return "", 0
    return max(counts.items(), key=lambda item: (item[1], -len(item[0])))


def select_state(obj: Any, target: set[str]) -> tuple[dict[str, Tensor], str, int]:
    """The backbone's tensors in ``obj`` renamed to the backbone's keys, where they were found, and how
    many tensors outside the prefix were left out. A prefix is stripped from the file's keys
    (``module.``), or added where the backbone wraps the network the file holds (``body.model.``)."""
    best: Optional[tuple[tuple[int, int], tuple[str, ...], dict[str, Tensor], str, str]] = None
    for path, tensors in _tensor_dicts(obj):
        strip, count = _best_prefix(list(tensors), target)
        add, added = _best_prefix(list(target), set(tensors))
        if added > count:
            strip, count = "", added
        else:
            add = ""
        last = path[-1] if path else ""
        rank = -1 if not path else PREFERRED.index(last) if last in PREFERRED else len(PREFERRED)
        if best is None or (count, -rank) > best[0]:
            best = ((count, -rank), path, tensors, strip, add)
    if best is None:
        return {}, "no tensors", 0
    _, path, tensors, strip, add = best
    state = {add + k[len(strip):]: v for k, v in tensors.items() if k.startswith(strip)}
    where = "/".join(path) or "the top level"
    where += f", prefix '{strip}'" if strip else f", keys prefixed with '{add}'" if add else ""
    return state, where, len(tensors) - len(state)


# ------------------------------------------------------------------ fitting shapes


def _first_conv(model: nn.Module, target: dict[str, Tensor]) -> set[str]:
    """The weight names of the model's first convolution (timm's ``pretrained_cfg['first_conv']``)."""
    first = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    names = [first] if isinstance(first, str) else list(first or [])
    if names:
        return {f"{name}.weight" for name in names}
    return {next((k for k, v in target.items() if v.ndim == 4), "")}


def _resample_pos_embed(model: nn.Module, name: str, value: Tensor, shape: torch.Size) -> Optional[Tensor]:
    """``value`` (1, prefix + h*w, D) resampled to the owner's patch grid, or None when that cannot be done."""
    owner = model.get_submodule(name.rpartition(".")[0])
    prefix = 0 if getattr(owner, "no_embed_class", False) else int(getattr(owner, "num_prefix_tokens", 1))
    grid = getattr(getattr(owner, "patch_embed", None), "grid_size", None)
    old = value.shape[1] - prefix
    if grid is None:
        side = math.isqrt(max(shape[1] - prefix, 0))
        grid = (side, side)
    if old < 1 or math.isqrt(old) ** 2 != old or grid[0] * grid[1] + prefix != shape[1]:
        return None
    return resample_abs_pos_embed(value, new_size=list(grid), num_prefix_tokens=prefix)


def _adapt(model: nn.Module, name: str, value: Tensor, want: Tensor, first_conv: set[str]) -> Optional[Tensor]:
    """``value`` fitted to ``want``'s shape (position embedding, input channels), or None."""
    if name.rpartition(".")[2] == "pos_embed" and value.ndim == want.ndim == 3 and value.shape[2] == want.shape[2]:
        return _resample_pos_embed(model, name, value, want.shape)
    if (name in first_conv and value.ndim == want.ndim == 4 and value.shape[0] == want.shape[0]
            and value.shape[2:] == want.shape[2:]):
        try:
            return adapt_input_conv(want.shape[1], value, base_chans=value.shape[1])
        except (NotImplementedError, ValueError):
            return None
    return None


def fit_state(model: nn.Module, obj: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors of ``obj`` that fit ``model`` (adapted where they can be) and the key report."""
    target = model.state_dict()
    state, where, outside = select_state(obj, set(target))
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))
    dropped = [k for k in state if k not in target and heads and k.startswith(heads)]
    first_conv = _first_conv(model, target)
    fitted, adapted, mismatched = {}, [], []
    for name, value in state.items():
        want = target.get(name)
        if want is None:
            continue
        if value.shape != want.shape:
            new = _adapt(model, name, value, want, first_conv)
            change = f"{name} {tuple(value.shape)} -> {tuple(want.shape)}"
            if new is None:
                mismatched.append(change)
                continue
            adapted.append(change)
            value = new
        fitted[name] = value.to(want.dtype)
    report = {"found": where, "loaded": len(fitted), "of": len(target), "adapted": adapted,
              "missing": [k for k in target if k not in state],
              "unexpected": [k for k in state if k not in target and k not in dropped],
              "mismatched": mismatched, "dropped_classifier": dropped, "left_out": outside}
    return fitted, report


# ------------------------------------------------------------------ loading


def _some(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return shown + (", ..." if len(keys) > SHOWN else "")


def _mismatch_text(report: dict[str, Any]) -> str:
    parts = [f"{len(report[kind])} {label} ({_some(report[kind])})" for kind, label in
             (("missing", "missing"), ("unexpected", "unexpected"), ("mismatched", "of another shape"))
             if report[kind]]
    return ", ".join(parts) + " keys"


def load_backbone_weights(method: nn.Module, obj: Any, *, source: str, key: str, strict: bool,
                          model_desc: str) -> dict[str, Any]:
    """Fit ``obj`` to ``method.backbone`` and load it with ``method.load_backbone_state``; returns the report.

    ConfigError, one sentence, when nothing fits, or with ``strict`` when anything does not."""
    fitted, report = fit_state(method.backbone, obj)
    report = {"source": source, "key": key, "strict": strict, **report}
    clean = not (report["missing"] or report["unexpected"] or report["mismatched"])
    if not fitted:
        raise ConfigError(f"The weights in {key} '{source}' hold no tensor of {model_desc} ({report['found']}); "
                          "point it at weights of that network, or set model.backbone, model.backbone_kwargs and "
                          "model.in_chans to the network the weights come from.")
    if strict and not clean:
        raise ConfigError(f"The weights in {key} '{source}' do not fit {model_desc}: {_mismatch_text(report)}; "
                          "set model.init_strict=false to load the tensors that fit, or set model.backbone, "
                          "model.backbone_kwargs and model.in_chans to the network the weights come from.")
    method.load_backbone_state(fitted)
    if not clean:
        log.warning("%s '%s' does not fit the backbone exactly: loaded %d of %d tensors, %s (missing ones keep "
                    "their random initialisation, the others are not used).", key, source, report["loaded"],
                    report["of"], _mismatch_text(report))
    adapted = f"; adapted {', '.join(report['adapted'])}" if report["adapted"] else ""
    log.info("Backbone initialised from %s '%s' (%s): %d of %d tensors%s.", key, source, report["found"],
             report["loaded"], report["of"], adapted)
    return report


def init_backbone(method: nn.Module, cfg: Config) -> Optional[dict[str, Any]]:
    """Load the weights ``cfg`` names (``Method.init_source``) into a freshly built ``method``; the report or None."""
    key, init = type(method).init_source(cfg)
    m = cfg.model
    if init is None and not m.pretrained:
        return None
    desc = f"model.backbone={m.backbone} with {m.backbone_kwargs} and in_chans={m.in_chans}"
    if init is None:
        obj, key, source = pretrained_weights(cfg), "model.pretrained", f"timm:{m.backbone}"
    else:
        obj, source = read_weights(init, key), init
    report = load_backbone_weights(method, obj, source=source, key=key, strict=m.init_strict, model_desc=desc)
    method.init_report = report
    return report


__all__ = ["PREFERRED", "fit_state", "init_backbone", "load_backbone_weights", "pretrained_weights", "read_weights",
           "run_config", "select_state"]
