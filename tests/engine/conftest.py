import pytest

from sslkit.sharding.synthetic import make_synthetic

# A model small enough that a few steps take seconds on 2 CPU cores.
TINY = [
    "model.backbone_kwargs.width=4", "model.projector=[16,8]", "model.predictor=[8,8]",
    "method.queue_size=64", "data.batch_size=16", "data.shuffle_buffer=64", "data.workers=1",
    "tracker.name=none", "train.log_every=1", "optim.warmup_steps=2", "train.eval_every=0",
]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    make_synthetic(root / "train", num_samples=160, size=32, seed=0, shard_size=48, prefix="train", progress=False)
    make_synthetic(root / "eval", num_samples=96, size=32, seed=1, shard_size=48, prefix="eval", progress=False)
    return root
