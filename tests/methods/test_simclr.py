"""SimCLR (SSCL): gather-with-gradient across ranks, the loss against lightly, the linear head, a short run."""

import json

import torch
from lightly.loss import NTXentLoss
from torch import nn
from two_process import TINY_BACKBONE, compare

from sslkit.config import load_config
from sslkit.engine import train
from sslkit.evaluate.run import evaluate_run
from sslkit.methods import build_method
from sslkit.sharding.synthetic import make_synthetic

# GroupNorm backbone and a norm-free head: the two runs can agree to float precision, so
# the only way they differ is a wrong gradient through the cross-rank gather.
OVERRIDES = ["method.name=simclr", *TINY_BACKBONE, "model.head_norm=false", "model.projector=[16,8]",
             "method.tau=0.5"]
GLOBAL_BATCH, STEPS, SIZE = 8, 3, 16


def global_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"query": torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g),
             "key": torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g)} for _ in range(STEPS)]


def test_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    ranks = compare(__file__, tmp_path)
    # Every rank computed the same global loss over the gathered 2 x 8 views.
    assert torch.equal(ranks[0]["loss0"], ranks[1]["loss0"])


def _method(*overrides: str) -> nn.Module:
    torch.manual_seed(0)
    return build_method(load_config(None, [*OVERRIDES, *overrides]))


def test_loss_equals_lightly_ntxent_on_the_same_embeddings():
    method = _method("method.tau=0.7")
    batch = global_batches()[0]
    out = method(batch)
    with torch.no_grad():
        z1, z2 = method.encoder(batch["query"]), method.encoder(batch["key"])
    expected = NTXentLoss(temperature=0.7)(z1, z2)
    assert torch.allclose(out.loss.detach(), expected, rtol=1e-5), (out.loss, expected)
    cosine = torch.nn.functional.cosine_similarity(z1, z2, dim=1).mean()
    assert torch.allclose(out.logs["pos_sim"], cosine, atol=1e-6)


def test_linear_projection_is_one_linear_layer():
    method = _method("method.projection=linear", "model.projector=[999,8]")  # the hidden size is unused
    head = method.encoder.projector
    assert type(head) is nn.Linear and (head.in_features, head.out_features) == (method.backbone.num_features, 8)
    mlp = _method("method.projection=mlp").encoder.projector
    assert sum(isinstance(m, nn.Linear) for m in mlp.modules()) == 2


def test_embed_backbone_and_projector_features():
    method = _method().eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    assert torch.allclose(method.embed(x, encoder="momentum"), method.backbone(x))  # one encoder: ignored
    assert method.embed(x, features="projector").shape == (3, 8)


def test_short_run_lowers_the_loss_and_beats_random_init_on_knn(tmp_path):
    make_synthetic(tmp_path / "train", num_samples=512, size=32, seed=0, shard_size=256, prefix="train", progress=False)
    make_synthetic(tmp_path / "eval", num_samples=256, size=32, seed=1, shard_size=256, prefix="eval", progress=False)
    # Mild views and tau 0.1 so that 40 steps of batch 32 leave chance level (log 63 = 4.14)
    # clearly; with the full views the loss needs a few hundred steps to move.
    overrides = ["method.name=simclr", "model.backbone_kwargs.width=8", "model.head_norm=false",
                 "model.projector=[64,32]", "model.predictor=[32,32]", "method.tau=0.1",
                 "data.views.recipe=local_local", "data.views.crop_scale=[0.6,1.0]", "data.views.p_jitter=0.3",
                 "data.views.p_blur=0", "data.views.p_gray=0", f"data.shards={tmp_path / 'train'}",
                 f"eval.shards={tmp_path / 'eval'}", f"run.dir={tmp_path / 'run'}", "data.batch_size=32",
                 "data.workers=1", "data.shuffle_buffer=256", "optim.lr=3e-3", "optim.schedule=constant",
                 "train.max_steps=40", "train.log_every=5", "train.ckpt_every=40", "tracker.name=none",
                 "eval.restarts=1"]
    run = train(load_config(None, overrides))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-2:]) / 2 < losses[0] - 0.5, losses
    results = evaluate_run(run, device="cpu")
    trained, random_init = results["knn"]["top1"], results["baselines"]["random_init"]["knn"]["top1"]
    assert trained > random_init + 0.1, (trained, random_init)
