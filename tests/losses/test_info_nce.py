import math

import torch
import torch.nn.functional as F

from sslkit.losses import info_nce


def test_two_by_two_worked_by_hand():
    # q0 = k0 = e1, q1 = k1 = e2 (orthonormal), tau = 1, in-batch negatives, no queue.
    # Row 0 logits: [1, 0] -> loss = -log(e / (e + 1)) = log(1 + 1/e); row 1 the same.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = info_nce(q, q.clone(), positive=torch.tensor([0, 1]), tau=1.0)
    assert math.isclose(loss.item(), math.log(1 + math.exp(-1)), rel_tol=1e-6)
    # Keys swapped: the positive now has similarity 0 and the negative 1.
    loss = info_nce(q, q.flip(0), positive=torch.tensor([0, 1]), tau=1.0)
    assert math.isclose(loss.item(), math.log(1 + math.e), rel_tol=1e-6)


def test_all_equal_limit_is_log_k_plus_one():
    # MoCo form: positive + K queued negatives, all identical -> uniform softmax over K + 1.
    v = F.normalize(torch.ones(5, 16), dim=1)
    queue = F.normalize(torch.ones(37, 16), dim=1)
    loss = info_nce(v, v.clone(), positive=torch.arange(5), queue=queue, tau=0.07, in_batch=False)
    assert math.isclose(loss.item(), math.log(37 + 1), rel_tol=1e-5)
    # CCRL form: N in-batch keys + Q queued -> log(N + Q).
    loss = info_nce(v, v.clone(), positive=torch.arange(5), queue=queue, tau=0.07, in_batch=True)
    assert math.isclose(loss.item(), math.log(5 + 37), rel_tol=1e-5)


def _naive(q, k, positive, queue, tau, in_batch):
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    total = 0.0
    for i in range(q.shape[0]):
        pos = torch.exp(q[i] @ k[positive[i]] / tau)
        negs = [k[j] for j in range(k.shape[0]) if j != positive[i]] if in_batch else []
        negs += list(queue)
        denom = pos + sum(torch.exp(q[i] @ n / tau) for n in negs)
        total = total - torch.log(pos / denom)
    return total / q.shape[0]


def test_agrees_with_naive_loop_with_offset_positives():
    torch.manual_seed(0)
    q, k = torch.randn(4, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    queue = F.normalize(torch.randn(9, 8, dtype=torch.float64), dim=1)
    positive = torch.arange(4) + 4  # rank 1 of 3 with batch 4: its keys are rows 4..7
    for in_batch in (True, False):
        fast = info_nce(q, k, positive=positive, queue=queue, tau=0.2, in_batch=in_batch)
        slow = _naive(q, k, positive, queue, 0.2, in_batch)
        assert torch.allclose(fast, slow, rtol=1e-10), (in_batch, fast, slow)


def test_gradient_float64():
    torch.manual_seed(1)
    q = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    queue = F.normalize(torch.randn(4, 5, dtype=torch.float64), dim=1)
    fn = lambda q_, k_: info_nce(q_, k_, positive=torch.arange(3), queue=queue, tau=0.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k))


def test_empty_queue_is_ignored():
    torch.manual_seed(2)
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    a = info_nce(q, k, positive=torch.arange(4), queue=torch.zeros(0, 8))
    b = info_nce(q, k, positive=torch.arange(4), queue=None)
    assert torch.equal(a, b)
