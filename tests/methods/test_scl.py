"""SCL: the loss against a hand-built one, the learnable scale, the batch layout, timm backbones,
two processes against one, and a short run on real G-band chromosomes."""

from __future__ import annotations

import json
import math
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from two_process import TINY_BACKBONE, compare

from sslkit.config import ConfigError, load_config
from sslkit.data.augment import normalize
from sslkit.methods import build_method

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
GBAND = DATA / "chromosome-gband-24class.tar.gz"

P, SIZE, CLASSES = 3, 16, 5
# No BatchNorm anywhere: the two-process comparison needs batch-independent statistics.
OVERRIDES = [
    "method.name=scl", "model.backbone=preact_resnet18", *TINY_BACKBONE, "model.embed_dim=8", "model.in_chans=1",
    "data.channels=1", f"data.balanced.classes={P}", "data.balanced.per_class=2", f"data.batch_size={2 * P}",
    f"method.num_classes={CLASSES}", "method.scale_init=5.0",
]
# Each group is B1 then B2 with the same class sequence (not sorted: positions are the
# contrastive targets, labels the classifier's).
GROUP_LABELS = ([4, 0, 2], [1, 2, 3])


def global_batches() -> list[dict[str, torch.Tensor]]:
    """Three steps of two groups (12 images): rank 0 gets the first group, rank 1 the second."""
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([c for group in GROUP_LABELS for c in group * 2])
    return [{"view": torch.randn(4 * P, 1, SIZE, SIZE, generator=g), "label": labels} for _ in range(3)]


def tiny(*extra: str, base: list[str] = OVERRIDES) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_method(load_config(None, base + list(extra)))


def test_two_processes_match_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    ranks = compare(__file__, tmp_path)
    assert "log_scale" in ranks[0]["grads0"]  # the scale is learnt under DDP too


# ---- the loss ---------------------------------------------------------------------------
def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    dot = sum(float(x) * float(y) for x, y in zip(a, b))
    return dot / math.sqrt(sum(float(x) ** 2 for x in a) * sum(float(y) ** 2 for y in b))


def _naive_focal(rows: list[list[float]], targets: list[int], gamma: float) -> float:
    """Mean over rows of -(1 - p_t)^gamma log p_t, softmax written out."""
    total = 0.0
    for row, t in zip(rows, targets):
        p = math.exp(row[t]) / sum(math.exp(v) for v in row)
        total += -((1 - p) ** gamma) * math.log(p)
    return total / len(rows)


def test_loss_equals_a_hand_built_sum_of_focal_terms() -> None:
    gamma, w_con, w_cls = 1.5, 0.7, 1.3
    method = tiny(f"method.gamma={gamma}", f"method.con_weight={w_con}", f"method.cls_weight={w_cls}").double()
    batch = global_batches()[0]
    batch["view"] = batch["view"].double()
    out = method(batch)
    with torch.no_grad():
        e = method.encoder(batch["view"])  # (12, D)
        logits = method.classifier(e)  # (12, C)
    t = math.exp(method.log_scale.item())
    assert t == pytest.approx(5.0)
    expected = []
    for g, labels in enumerate(GROUP_LABELS):
        e1, e2 = e[2 * P * g:][:P], e[2 * P * g + P:][:P]
        con = 0.0
        for a, b in ((e1, e1), (e1, e2), (e2, e2)):  # S11, S12, S22 by hand
            s = [[t * _cos(a[i], b[j]) for j in range(P)] for i in range(P)]
            cols = [[s[i][j] for i in range(P)] for j in range(P)]
            con += _naive_focal(s, list(range(P)), gamma) + _naive_focal(cols, list(range(P)), gamma)
        l1, l2 = logits[2 * P * g:][:P], logits[2 * P * g + P:][:P]
        cls = _naive_focal(l1.tolist(), labels, gamma) + _naive_focal(l2.tolist(), labels, gamma)
        expected.append(w_con * con + w_cls * cls)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, rel=1e-10)
    assert out.logs["acc"].item() == pytest.approx((logits.argmax(1) == batch["label"]).double().mean().item())


def test_gradient_reaches_the_learnable_scale_and_it_stays_positive() -> None:
    method = tiny().double()
    batch = global_batches()[0]
    batch["view"] = batch["view"].double()
    method(batch).loss.backward()
    grad = method.log_scale.grad.item()
    assert grad != 0.0
    with torch.no_grad():  # d loss / d log t by central differences
        h, base = 1e-6, method.log_scale.item()
        method.log_scale.fill_(base + h)
        up = method(batch).loss.item()
        method.log_scale.fill_(base - h)
        down = method(batch).loss.item()
        method.log_scale.fill_(base)
    assert grad == pytest.approx((up - down) / (2 * h), rel=1e-5)
    # A step far larger than t itself: t = exp(log t) stays positive where a raw t would not.
    lr = 30.0 / abs(grad)
    torch.optim.SGD([method.log_scale], lr=lr).step()
    assert method.log_scale.item() == pytest.approx(base - 30.0 * math.copysign(1, grad))
    assert 0 < method.scale.item() < math.inf
    assert torch.isfinite(method(batch).loss)


# ---- inputs, layout and config errors ---------------------------------------------------
def test_prepare_makes_one_uncropped_view_and_keeps_labels() -> None:
    images = torch.randint(0, 256, (2 * P, 1, SIZE, SIZE), dtype=torch.uint8)
    labels = torch.tensor(GROUP_LABELS[0] * 2)
    plain = tiny("data.views.rotation=0", "data.views.flips=false", "data.views.p_jitter=0", "data.views.p_blur=0")
    out = plain.prepare({"image": images.clone(), "label": labels.clone()}, None)
    assert set(out) == {"view", "label"} and torch.equal(out["label"], labels)
    assert torch.allclose(out["view"], normalize(images.float() / 255), atol=1e-6)  # no crop, no resize
    method = tiny("data.views.jitter=[0,0.4,0,0]", "data.views.p_gray=0", "data.views.p_blur=0")
    views = [method.prepare({"image": images.clone(), "label": labels}, torch.Generator().manual_seed(s))["view"]
             for s in (7, 7, 8)]
    assert torch.equal(views[0], views[1]) and not torch.equal(views[0], views[2])
    assert views[0].shape == images.shape and views[0].min() >= -1 and views[0].max() <= 1


@pytest.mark.parametrize("labels, why", [
    ([4, 0, 2, 0, 4, 2], "different class sequences"),  # B2 in another order
    ([4, 0, 2, 4, 0, 2, 1, 2, 3], "not a multiple of 6"),
    ([4, 4, 2, 4, 4, 2], "one class twice"),
])
def test_a_wrong_layout_names_data_balanced(labels: list[int], why: str) -> None:
    method = tiny()
    batch = {"view": torch.randn(len(labels), 1, SIZE, SIZE), "label": torch.tensor(labels)}
    with pytest.raises(ValueError, match=rf"data\.balanced\.classes={P}.*{why}"):
        method(batch)


@pytest.mark.parametrize("extra, key", [
    (["data.balanced.per_class=3", "data.batch_size=9"], "per_class=2"),
    (["data.balanced.classes=0"], "data.balanced.classes"),
    (["method.num_classes=0"], "method.num_classes"),
    (["method.scale_init=0"], "method.scale_init"),
])
def test_config_errors_name_the_key(extra: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        tiny(*extra)


# ---- any timm backbone ------------------------------------------------------------------
@pytest.mark.parametrize("backbone, kwargs, size", [
    ("resnet18", [], 32),
    ("vit_small_patch16_224", ["model.backbone_kwargs.img_size=32"], 32),
    ("swin_tiny_patch4_window7_224", ["model.backbone_kwargs.img_size=56"], 56),  # 14x14 tokens, window 7
])
def test_timm_backbones_by_name_with_one_channel(backbone: str, kwargs: list[str], size: int) -> None:
    base = [o for o in OVERRIDES if not o.startswith("model.backbone")]
    method = tiny(f"model.backbone={backbone}", *kwargs, "data.balanced.classes=2", "data.batch_size=4", base=base)
    batch = {"view": torch.randn(4, 1, size, size), "label": torch.tensor([1, 3, 1, 3])}
    out = method(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and method.log_scale.grad is not None
    assert next(method.backbone.parameters()).grad is not None
    assert method.embed(batch["view"]).shape == (4, method.backbone.num_features)
    assert method.embed(batch["view"], features="projector").shape == (4, 8)


# ---- real data --------------------------------------------------------------------------
def _extract(tar_path: Path, out: Path, *, train: int, test: int) -> tuple[Path, Path]:
    """The first ``train`` metaphases with a Y (every class present) -> out/train, the next ``test`` -> out/test."""
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
        folders = defaultdict(set)
        for m in members:
            parts = m.name.split("/")
            if len(parts) == 4 and m.isfile():  # ./<metaphase>/claseN/file
                folders[parts[1]].add(parts[2])
        male = sorted(name for name, classes in folders.items() if classes >= {f"clase{i}" for i in range(1, 25)}
                      and len(classes) == 24)
        side = {name: "train" for name in male[:train]} | {name: "test" for name in male[train:train + test]}
        chosen = [m for m in members if m.isfile() and m.name.split("/")[1] in side]
        for m in chosen:
            m.name = f"{side[m.name.split('/')[1]]}/{m.name.removeprefix('./')}"
        tar.extractall(out, members=chosen, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return out / "train", out / "test"


def test_short_run_on_gband_chromosomes_beats_random_init(tmp_path: Path) -> None:
    if not GBAND.is_file():
        pytest.skip(f"{GBAND.name} is not in ../shared/data")
    from sslkit.engine import train
    from sslkit.evaluate.run import evaluate_run
    from sslkit.sharding.folder.command import shard_folder

    src_train, src_test = _extract(GBAND, tmp_path / "src", train=16, test=8)
    for name, src in (("train", src_train), ("test", src_test)):
        shard_folder(src, tmp_path / name, size=64, channels=1, pad_value=255, label_regex=r"clase(\d+)",
                     group_regex=r"^([^/]+)/", workers=0, progress=False)
    cfg = load_config(Path(__file__).resolve().parents[2] / "sslkit" / "configs" / "scl-cpu.yaml", [
        f"data.shards={tmp_path / 'train'}", f"eval.shards={tmp_path / 'test'}", f"run.dir={tmp_path / 'run'}",
        "data.workers=0", "data.shuffle_buffer=200", "model.embed_dim=128", "train.max_steps=60",
        "train.log_every=1", "optim.lr=2e-3", "eval.restarts=1", "tracker.name=none",
    ])
    run = train(cfg)
    assert cfg.method.num_classes == 24  # filled in from the manifest
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    results = evaluate_run(run)
    assert results["num_samples"] == 8 * 46  # held-out metaphases, 46 chromosomes each
    assert results["knn"]["top1"] > results["baselines"]["random_init"]["knn"]["top1"] + 0.1
