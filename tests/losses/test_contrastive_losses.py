"""SupCon, NT-Xent, self-margin: hand-worked cases, analytic limits, naive loops, peer libraries."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslkit.losses import info_nce, nt_xent, self_margin, supcon

E = math.e


def _unit(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------- SupCon


def test_supcon_by_hand_both_denominators() -> None:
    anchor = _unit([1.0, 0.0])
    keys = _unit([1.0, 0.0], [0.0, 1.0], [1.0, 0.0])  # positive, negative, positive; cosines 1, 0, 1
    labels = dict(anchor_labels=torch.tensor([0]), key_labels=torch.tensor([0, 1, 0]), tau=1.0)
    # "all": each positive against everything: -(1 - log(2e + 1))
    assert supcon(anchor, keys, **labels, denominator="all").item() == pytest.approx(math.log(2 * E + 1) - 1)
    # "negatives": each positive against itself and the negative only: -(1 - log(e + 1))
    assert supcon(anchor, keys, **labels, denominator="negatives").item() == pytest.approx(math.log(1 + 1 / E))


def _naive_supcon(a, k, ya, yk, tau, exclude, denominator):
    a, k = F.normalize(a, dim=1), F.normalize(k, dim=1)
    losses = []
    for i in range(a.shape[0]):
        sims = [(a[i] @ k[j]).item() / tau for j in range(k.shape[0])]
        ok = [j for j in range(k.shape[0]) if not exclude[i, j]]
        pos = [j for j in ok if ya[i] == yk[j]]
        neg = [j for j in ok if ya[i] != yk[j]]
        if not pos:
            continue
        terms = []
        for p in pos:
            pool = ok if denominator == "all" else [p] + neg
            terms.append(sims[p] - math.log(sum(math.exp(sims[j]) for j in pool)))
        losses.append(-sum(terms) / len(terms))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("denominator", ["all", "negatives"])
def test_supcon_equals_a_naive_loop(denominator: str) -> None:
    g = torch.Generator().manual_seed(1)
    a, k = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(9, 6, generator=g, dtype=torch.float64)
    ya, yk = torch.tensor([0, 1, 2, 3, 1]), torch.tensor([0, 0, 1, 2, 2, 1, 0, 4, 1])  # anchor 3 has no positive
    exclude = torch.zeros(5, 9, dtype=torch.bool)
    exclude[0, 0] = exclude[1, 5] = True
    ours = supcon(a, k, anchor_labels=ya, key_labels=yk, tau=0.3, exclude=exclude, denominator=denominator)
    assert ours.item() == pytest.approx(_naive_supcon(a, k, ya, yk, 0.3, exclude, denominator), abs=1e-12)


def test_supcon_agrees_with_pytorch_metric_learning() -> None:
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    g = torch.Generator().manual_seed(2)
    for n, classes, tau in [(16, 4, 0.1), (24, 3, 0.07), (10, 10, 0.5)]:
        z = torch.randn(n, 32, generator=g, dtype=torch.float64)
        y = torch.randint(0, classes, (n,), generator=g)
        ours = supcon(z, z, anchor_labels=y, key_labels=y, tau=tau, exclude=torch.eye(n, dtype=torch.bool))
        theirs = losses.SupConLoss(temperature=tau)(z, y)
        assert abs(ours.item() - theirs.item()) < 1e-6


def test_supcon_limits() -> None:
    z = F.normalize(torch.ones(6, 4, dtype=torch.float64), dim=1)  # everything equal
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    eye = torch.eye(6, dtype=torch.bool)
    # "all": each positive is one of 5 equal keys -> log 5; "negatives": one of 1 + 3 -> log 4
    assert supcon(z, z, anchor_labels=y, key_labels=y, tau=0.1, exclude=eye).item() == pytest.approx(math.log(5))
    assert supcon(z, z, anchor_labels=y, key_labels=y, tau=0.1, exclude=eye,
                  denominator="negatives").item() == pytest.approx(math.log(4))
    anchors = z[:2].clone().requires_grad_(True)
    lonely = supcon(anchors, z[3:], anchor_labels=torch.tensor([0, 0]), key_labels=y[3:])  # no positives at all
    lonely.backward()  # still part of the graph, so a step with such a batch does not break training
    assert lonely.item() == 0.0 and torch.equal(anchors.grad, torch.zeros_like(anchors))
    with pytest.raises(ValueError, match="denominator"):
        supcon(z, z, anchor_labels=y, key_labels=y, denominator="some")


# ---------------------------------------------------------------- NT-Xent


def test_nt_xent_by_hand() -> None:
    z = _unit([1.0, 0.0], [0.0, 1.0])  # two images, both views identical: cosines 1 (positive), 0, 0
    assert nt_xent(z, z, tau=1.0).item() == pytest.approx(math.log(E + 2) - 1)


@pytest.mark.parametrize("n", [2, 5, 16])
def test_nt_xent_collapsed_encoder_gives_log_2n_minus_1(n: int) -> None:
    z = torch.ones(n, 8, dtype=torch.float64)
    assert nt_xent(z, z, tau=0.7).item() == pytest.approx(math.log(2 * n - 1))


def test_nt_xent_agrees_with_lightly() -> None:
    loss = pytest.importorskip("lightly.loss")
    g = torch.Generator().manual_seed(3)
    for n, tau in [(8, 0.5), (32, 0.7), (3, 0.1)]:
        z1, z2 = (torch.randn(n, 16, generator=g, dtype=torch.float64) for _ in range(2))
        theirs = loss.NTXentLoss(temperature=tau)(z1, z2)
        assert abs(nt_xent(z1, z2, tau=tau).item() - theirs.item()) < 1e-6


# ---------------------------------------------------------------- self-margin


def test_self_margin_by_hand() -> None:
    q = _unit([1.0, 0.0])
    k_pos = _unit([0.5, math.sqrt(3) / 2])  # 60 degrees from q
    keys = _unit([0.0, 1.0])  # one negative at 90 degrees
    neg = torch.ones(1, 1, dtype=torch.bool)
    # m = 30 degrees: cos(90) = 0 for the positive, cos(90) = 0 for the negative -> log 2
    assert self_margin(q, k_pos, keys, negatives=neg, margin=math.pi / 6, tau=1.0).item() == pytest.approx(math.log(2))
    # m = 0: -log(e^0.5 / (e^0.5 + e^0))
    assert self_margin(q, k_pos, keys, negatives=neg, margin=0.0, tau=1.0).item() == pytest.approx(
        math.log(1 + math.exp(-0.5)))


def test_self_margin_equals_info_nce_at_zero_margin() -> None:
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    queue = F.normalize(torch.randn(20, 8, generator=g, dtype=torch.float64), dim=1)
    every = torch.ones(6, 20, dtype=torch.bool)
    ours = self_margin(q, k, queue, negatives=every, margin=0.0, tau=0.2)
    reference = info_nce(q, k, positive=torch.arange(6), queue=queue, tau=0.2, in_batch=False)
    assert abs(ours.item() - reference.item()) < 1e-9


def test_self_margin_grows_with_the_margin_and_masks_non_negatives() -> None:
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    keys = torch.randn(10, 8, generator=g, dtype=torch.float64)
    neg = torch.rand(4, 10, generator=g) > 0.5
    values = [self_margin(q, k, keys, negatives=neg, margin=m, tau=0.1).item() for m in (0.0, 0.1, 0.3, 0.5)]
    assert values == sorted(values) and values[0] < values[-1]
    masked_out = keys.clone()
    masked_out[~neg.any(dim=0)] = 100.0  # keys that are no query's negative must not matter
    assert self_margin(q, k, masked_out, negatives=neg, margin=0.2, tau=0.1).item() == pytest.approx(
        self_margin(q, k, keys, negatives=neg, margin=0.2, tau=0.1).item())


def test_losses_give_finite_gradients() -> None:
    g = torch.Generator().manual_seed(6)
    q = torch.randn(4, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = q.detach().clone()  # cos = 1 exactly: acos's slope is infinite there without the clamp
    loss = self_margin(q, k, torch.randn(5, 8, generator=g, dtype=torch.float64),
                       negatives=torch.ones(4, 5, dtype=torch.bool), margin=0.2, tau=0.1)
    loss = loss + nt_xent(q, torch.randn(4, 8, generator=g, dtype=torch.float64), tau=0.5)
    loss.backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
