"""Mixed precision: the forward passes run in bf16, logits, losses and queued keys stay float32."""

import pytest
import torch
from safetensors.torch import load_file

from sslkit.checkpoint import latest_checkpoint
from sslkit.config import ConfigError, load_config, recipe_path
from sslkit.engine import train
from sslkit.methods import build_method

from .conftest import TINY


def _spy(monkeypatch, module, name):
    """Replace ``module.name`` (a loss) by a wrapper that records autocast and the dtypes it was given."""
    seen = []
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.is_floating_point()]
        probe = tensors[0] @ tensors[0].T  # what a matmul in the loss computes in
        seen.append({"autocast": torch.is_autocast_enabled("cpu"), "dtypes": {t.dtype for t in tensors},
                     "matmul": probe.dtype})
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return seen


@pytest.mark.parametrize("name,loss", [("ccrl", "info_nce"), ("supcam", "supcon")])
def test_losses_run_in_float32_under_bf16_autocast(monkeypatch, name, loss):
    import importlib

    module = importlib.import_module(f"sslkit.methods.{name}")
    seen = _spy(monkeypatch, module, loss)
    torch.manual_seed(0)
    method = build_method(load_config(None, ["model.backbone_kwargs.width=4", f"method.name={name}",
                                              "method.queue_size=32", "model.projector=[16,8]",
                                              "model.predictor=[8,8]", "model.embed_dim=8"])).train()
    backbone_out = []
    method.encoder.backbone.register_forward_hook(lambda m, i, o: backbone_out.append(o.dtype))
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    batch = method.prepare({"image": x, "label": torch.arange(8) % 4}, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(batch)
    assert backbone_out == [torch.bfloat16]  # the network itself did run in bf16 ...
    assert seen and all(not s["autocast"] and s["dtypes"] == {torch.float32} and s["matmul"] == torch.float32
                        for s in seen)  # ... the loss in float32
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    method.after_optimizer_step(0)
    assert method.queue.keys.dtype == torch.float32 and int(method.queue.filled) > 0


def _cfg(shards, run_dir, *extra):
    return load_config(recipe_path("demo"), [*TINY, f"data.shards={shards / 'train'}", f"run.dir={run_dir}",
                                             "train.max_steps=3", *extra])


def test_bf16_training_on_cpu_records_its_precision(tiny_shards, tmp_path):
    run = train(_cfg(tiny_shards, tmp_path / "run", "train.precision=bf16"))
    assert "precision: bf16" in (run / "config.yaml").read_text()
    weights = load_file(str(latest_checkpoint(run / "checkpoints") / "model.safetensors"))
    assert weights["queue.keys"].dtype == torch.float32 and int(weights["queue.filled"]) == 3 * 16
    assert weights["encoder.backbone.stem.weight"].dtype == torch.float32  # master weights stay float32


def test_auto_precision_takes_the_launchers(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    cfg = _cfg(tiny_shards, tmp_path / "run", "train.max_steps=1")
    assert cfg.train.precision == "auto"
    run = train(cfg)
    assert "precision: bf16" in (run / "config.yaml").read_text()


def test_fp16_on_cpu_is_refused_with_the_fix(tiny_shards, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid on a GPU")
    with pytest.raises(ConfigError, match="train.precision is fp16, which needs a GPU"):
        train(_cfg(tiny_shards, tmp_path / "run", "train.precision=fp16"))
