"""Focal loss and SCL's similarity-matrix focal loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslkit.losses import focal, similarity_focal


def test_focal_by_hand() -> None:
    logits = torch.zeros(1, 2, dtype=torch.float64)  # p_t = 0.5
    assert focal(logits, torch.tensor([0]), gamma=2.0).item() == pytest.approx(0.25 * math.log(2))
    assert focal(logits, torch.tensor([0]), gamma=1.0).item() == pytest.approx(0.5 * math.log(2))


def test_focal_is_cross_entropy_at_gamma_zero() -> None:
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(32, 7, generator=g, dtype=torch.float64), torch.randint(0, 7, (32,), generator=g)
    assert focal(logits, target, gamma=0.0).item() == pytest.approx(F.cross_entropy(logits, target).item(), abs=1e-12)


def test_focal_equals_a_naive_loop_and_down_weights_easy_examples() -> None:
    g = torch.Generator().manual_seed(1)
    logits, target = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)
    p = F.softmax(logits, dim=1)
    naive = sum(-(1 - p[i, t]) ** 2.5 * math.log(p[i, t]) for i, t in enumerate(target.tolist())) / 6
    assert focal(logits, target, gamma=2.5).item() == pytest.approx(naive.item(), abs=1e-12)
    easy = torch.tensor([[8.0, 0.0]], dtype=torch.float64)
    ratio = focal(easy, torch.tensor([0]), gamma=2.0) / F.cross_entropy(easy, torch.tensor([0]))
    assert ratio.item() < 1e-6  # (1 - p_t)^2 with p_t = 0.99966
    with pytest.raises(ValueError, match="gamma"):
        focal(logits, target, gamma=-1.0)


def test_similarity_focal_by_hand() -> None:
    e = torch.eye(2, dtype=torch.float64)  # both batches: class 0 -> e_0, class 1 -> e_1
    # every matrix is I: each row and column is CE of logits (1, 0) on its own index = log(1 + e^-1)
    expected = 6 * math.log(1 + math.exp(-1))
    assert similarity_focal(e, e, scale=1.0, gamma=0.0).item() == pytest.approx(expected)


def test_similarity_focal_equals_a_naive_sum_of_focal_terms() -> None:
    g = torch.Generator().manual_seed(2)
    e1, e2 = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, 8, generator=g, dtype=torch.float64)
    n1, n2 = F.normalize(e1, dim=1), F.normalize(e2, dim=1)
    target = torch.arange(5)
    naive = sum(focal(s * 3.0, target) + focal(s.T * 3.0, target) for s in (n1 @ n1.T, n1 @ n2.T, n2 @ n2.T))
    assert similarity_focal(e1, e2, scale=3.0).item() == pytest.approx(naive.item(), abs=1e-12)


def test_gradients_reach_the_learnable_temperature() -> None:
    g = torch.Generator().manual_seed(3)
    e1, e2 = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    log_t = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda lt: similarity_focal(e1, e2, scale=lt.exp()), (log_t,))
    loss = similarity_focal(e1, e2, scale=log_t.exp())
    loss.backward()
    assert log_t.grad is not None and log_t.grad.abs().item() > 0
