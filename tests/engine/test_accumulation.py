"""Gradient accumulation keeps the queue's semantics: keys enter once per optimizer step, and the
summed micro-batch gradients are the whole batch's; the engine's one loader crosses epochs as a
resumed run would see them."""

import itertools

import torch
from safetensors.torch import load_file

from sslkit.checkpoint import latest_checkpoint
from sslkit.config import load_config, recipe_path
from sslkit.data.shardset import resolve_shards
from sslkit.engine import batch_stream, train
from sslkit.methods import build_method

from .conftest import TINY

# No BatchNorm and no in-batch negatives: then two micro-batches of 4 give exactly the loss and
# gradient of one batch of 8 (MoCo v2 with an empty queue would not: its queue is the only negative set).
OVERRIDES = ["model.backbone_kwargs.width=4", "model.backbone_kwargs.norm=group", "model.head_norm=false",
             "model.projector=[16,8]", "model.predictor=[8,8]", "method.queue_size=64"]


def _method():
    torch.manual_seed(0)
    return build_method(load_config(None, OVERRIDES)).train()


def _batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"query": torch.randn(n, 3, 16, 16, generator=g), "key": torch.randn(n, 3, 16, 16, generator=g)}


def test_keys_enter_the_queue_once_per_optimizer_step():
    method = _method()
    method.queue.push(torch.nn.functional.normalize(torch.randn(8, 8), dim=1))  # 8 keys of an earlier step
    before = method.queue.current()[0].clone()
    micro = [_batch(4, 1), _batch(4, 2)]
    for batch in micro:
        method(batch).loss.backward()
        # The second micro-batch still sees only the earlier step's keys as queued negatives.
        torch.testing.assert_close(method.queue.current()[0], before)
    keys = [method.encode_keys(b["key"])[1] for b in micro]  # what the two micro-batches staged
    method.after_optimizer_step(0)
    queued = method.queue.current()[0]
    assert queued.shape[0] == 16  # 8 earlier + 4 + 4, pushed together, in micro-batch order
    torch.testing.assert_close(queued[8:], torch.cat(keys))


def test_accumulated_gradients_equal_the_whole_batch_ones():
    # With in-batch negatives a micro-batch's keys are its own: compare MoCo v2 mode, queue filled.
    def run(batches):
        method = _method()
        method.in_batch_negatives = False
        keys = torch.randn(32, 8, generator=torch.Generator().manual_seed(9))
        method.queue.push(torch.nn.functional.normalize(keys, dim=1))
        for b in batches:
            (method(b).loss / len(batches)).backward()
        return {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}

    whole = _batch(8, 1)
    halves = [{k: v[:4] for k, v in whole.items()}, {k: v[4:] for k, v in whole.items()}]
    one, two = run([whole]), run(halves)
    assert one.keys() == two.keys() and one
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6)


def test_engine_accumulates_and_enqueues_every_micro_batch(tiny_shards, tmp_path):
    cfg = load_config(recipe_path("demo"), [*TINY, f"data.shards={tiny_shards / 'train'}", f"run.dir={tmp_path}",
                                            "train.max_steps=2", "train.grad_accum=2", "method.queue_size=256"])
    run = train(cfg)
    weights = load_file(str(latest_checkpoint(run / "checkpoints") / "model.safetensors"))
    assert int(weights["queue.filled"]) == 2 * 2 * 16  # steps x micro-batches x batch


def test_one_loader_crosses_epochs_like_a_resumed_stream(tiny_shards):
    # 160 samples / 16 = 10 batches per epoch; 25 batches cross two epoch boundaries.
    cfg = load_config(recipe_path("demo"), [*TINY, f"data.shards={tiny_shards / 'train'}"])
    shards = resolve_shards(cfg.data.shards)
    straight = [b["image"] for b in itertools.islice(batch_stream(shards, cfg, batches_per_epoch=10, start=0), 25)]
    resumed = [b["image"] for b in itertools.islice(batch_stream(shards, cfg, batches_per_epoch=10, start=13), 12)]
    for a, b in zip(straight[13:], resumed):
        assert torch.equal(a, b)
    assert not torch.equal(straight[0], straight[10])  # epoch 1 is not a replay of epoch 0
