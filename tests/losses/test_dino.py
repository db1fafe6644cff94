"""DINO / iBOT / KoLeo losses and the teacher targets: float64 loops, analytic cases, lightly, and
two real gloo processes against one process on the whole batch (Sinkhorn-Knopp, the batch centre).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/losses/test_dino.py OUT
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist

from sslkit import dist
from sslkit.losses import (
    batch_center,
    dino_loss,
    ema_center,
    ibot_loss,
    koleo_loss,
    sinkhorn_knopp,
    teacher_probs,
)


def _randn(*shape: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _softmax64(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


# ---------------------------------------------------------------- teacher_probs


def test_teacher_probs_is_a_centred_sharpened_softmax() -> None:
    logits, center = _randn(6, 9, seed=0, dtype=torch.float32), _randn(1, 9, seed=1, dtype=torch.float32)
    probs = teacher_probs(logits, center, 0.07)
    assert probs.shape == (6, 9) and probs.dtype == torch.float32 and not probs.requires_grad
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(6))
    for n in range(6):
        expected = _softmax64([(logits[n, k].item() - center[0, k].item()) / 0.07 for k in range(9)])
        torch.testing.assert_close(probs[n].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5,
                                   atol=1e-7)


def test_teacher_probs_of_half_precision_is_float32_without_grad() -> None:
    logits = _randn(4, 5, seed=2, dtype=torch.bfloat16).requires_grad_(True)
    probs = teacher_probs(logits, torch.zeros(1, 5), 0.04)
    assert probs.dtype == torch.float32 and not probs.requires_grad
    torch.testing.assert_close(probs, torch.softmax(logits.detach().float() / 0.04, dim=1))


# ---------------------------------------------------------------- dino_loss


def _dino_loop(student: list[torch.Tensor], teacher: list[torch.Tensor], student_temp: float) -> float:
    terms = []
    for i, t in enumerate(teacher):
        for j, s in enumerate(student):
            if i == j:
                continue
            per_image = []
            for b in range(t.shape[0]):
                row = [s[b, k].item() / student_temp for k in range(s.shape[1])]
                log_z = math.log(sum(math.exp(v) for v in row))
                per_image.append(-sum(t[b, k].item() * (row[k] - log_z) for k in range(s.shape[1])))
            terms.append(sum(per_image) / len(per_image))
    return sum(terms) / len(terms)


def test_dino_loss_equals_a_float64_loop_over_views_pairs_batch_and_prototypes() -> None:
    student = [_randn(3, 7, seed=10 + v) for v in range(4)]  # 2 global + 2 local views
    teacher = [torch.softmax(_randn(3, 7, seed=20 + v) / 0.5, dim=1) for v in range(2)]
    ours = dino_loss(student, teacher, 0.1)
    assert ours.dtype == torch.float64  # float64 is kept; lower precisions go to float32
    assert ours.item() == pytest.approx(_dino_loop(student, teacher, 0.1), rel=1e-12)


def test_dino_loss_ignores_same_view_pairs() -> None:
    student = [_randn(3, 7, seed=30 + v) for v in range(4)]
    teacher = [torch.softmax(_randn(3, 7, seed=40 + v), dim=1) for v in range(2)]
    base = dino_loss(student, teacher, 0.1).item()
    pairs = [(i, j) for i in range(2) for j in range(4) if i != j]  # teacher view i, student view j
    assert len(pairs) == 6
    by_pairs = sum(_pair(student[j], teacher[i], 0.1) for i, j in pairs) / 6
    assert base == pytest.approx(by_pairs, rel=1e-12)
    # With the diagonal included the value would differ (the check has power).
    with_diagonal = (by_pairs * 6 + _pair(student[0], teacher[0], 0.1) + _pair(student[1], teacher[1], 0.1)) / 8
    assert abs(with_diagonal - base) > 1e-6


def _pair(s: torch.Tensor, t: torch.Tensor, student_temp: float) -> float:
    return (-(t * torch.log_softmax(s / student_temp, dim=1)).sum(dim=1).mean()).item()


def test_dino_loss_computes_in_float32_for_half_inputs_and_backpropagates() -> None:
    student = [_randn(4, 6, seed=50 + v, dtype=torch.bfloat16).requires_grad_(True) for v in range(3)]
    teacher = [torch.softmax(_randn(4, 6, seed=60 + v), dim=1).to(torch.bfloat16) for v in range(2)]
    loss = dino_loss(student, teacher, 0.1)
    assert loss.dtype == torch.float32
    reference = _dino_loop([s.detach().double() for s in student], [t.double() for t in teacher], 0.1)
    assert loss.item() == pytest.approx(reference, rel=1e-5)
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)


def test_dino_loss_refuses_a_single_view() -> None:
    x = _randn(2, 3, seed=0)
    with pytest.raises(ValueError, match="one view"):
        dino_loss([x], [x.softmax(dim=1)], 0.1)
    with pytest.raises(ValueError, match="teacher views"):
        dino_loss([x], [x.softmax(dim=1)] * 2, 0.1)


def test_dino_loss_agrees_with_lightly() -> None:
    lightly_loss = pytest.importorskip("lightly.loss")
    for views, batch, k, t_temp, s_temp in [(4, 5, 16, 0.04, 0.1), (2, 3, 8, 0.07, 0.2), (6, 4, 32, 0.05, 0.1)]:
        teacher_logits = [_randn(batch, k, seed=100 + v) for v in range(2)]
        student = [_randn(batch, k, seed=200 + v) for v in range(views)]
        # lightly's centre starts at zero, and its first call uses it before the update: no centring yet;
        # teacher_temp given explicitly, so its warm-up schedule does not apply.
        theirs = lightly_loss.DINOLoss(output_dim=k, student_temp=s_temp)(teacher_logits, student, teacher_temp=t_temp)
        targets = [teacher_probs(t, torch.zeros(1, k), t_temp) for t in teacher_logits]
        # rel 1e-7: lightly holds the teacher temperature as a float32 tensor (0.04 rounded to 24 bits).
        assert dino_loss(student, targets, s_temp).item() == pytest.approx(theirs.item(), rel=1e-7)


# ---------------------------------------------------------------- centre


def test_batch_center_is_the_mean_and_ema_center_moves_towards_it() -> None:
    logits = _randn(5, 4, seed=3)
    torch.testing.assert_close(batch_center(logits), logits.mean(dim=0, keepdim=True))
    center, mean = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -2.0]])
    # 0.9 * 1 + 0.1 * 3 = 1.2; 0.9 * 2 + 0.1 * (-2) = 1.6
    torch.testing.assert_close(ema_center(center, mean, 0.9), torch.tensor([[1.2, 1.6]]))
    torch.testing.assert_close(ema_center(center, mean, 0.0), mean)
    torch.testing.assert_close(ema_center(center, mean, 1.0), center)


# ---------------------------------------------------------------- Sinkhorn-Knopp


def _sinkhorn_loop(logits: np.ndarray, temp: float, iterations: int) -> np.ndarray:
    q = np.exp(logits.astype(np.float64) / temp).T  # (K, B)
    k, b = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        for row in range(k):
            q[row] = q[row] / q[row].sum() / k
        for col in range(b):
            q[:, col] = q[:, col] / q[:, col].sum() / b
    return (q * b).T


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_sinkhorn_equals_a_float64_loop(iterations: int) -> None:
    logits = _randn(12, 6, seed=4, dtype=torch.float32)
    ours = sinkhorn_knopp(logits, 0.1, iterations)
    assert ours.shape == (12, 6) and ours.dtype == torch.float32 and not ours.requires_grad
    np.testing.assert_allclose(ours.numpy(), _sinkhorn_loop(logits.numpy(), 0.1, iterations), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ours.sum(dim=1), torch.ones(12))  # each sample: a probability vector
    # After many rounds the prototypes are used equally too: each column of (N, K) sums to N / K.
    balanced = sinkhorn_knopp(logits, 0.1, 200).sum(dim=0)
    torch.testing.assert_close(balanced, torch.full((6,), 2.0), rtol=1e-3, atol=1e-3)


def test_sinkhorn_does_not_overflow_at_small_temperatures() -> None:
    logits = _randn(8, 5, seed=5, dtype=torch.float32) * 2 + 4  # exp(8 / 0.04) overflows float32 (and float64)
    assert torch.isinf(torch.exp(logits / 0.04)).any()
    ours = sinkhorn_knopp(logits, 0.04)
    assert torch.isfinite(ours).all()
    # Shifted by the largest logit the exponentials fit float64 but not float32: some prototypes' whole rows
    # are below 1e-38 there, and the row normalisation must still lift them (a linear float32 loop gives 0/0).
    shifted = (logits - logits.max()).double()
    assert (torch.exp(shifted / 0.04).float().T.sum(dim=1) == 0).any()
    np.testing.assert_allclose(ours.numpy(), _sinkhorn_loop(shifted.numpy(), 0.04, 3), rtol=1e-4, atol=1e-6)


def test_sinkhorn_of_half_precision_is_float32() -> None:
    logits = _randn(6, 4, seed=6, dtype=torch.bfloat16)
    ours = sinkhorn_knopp(logits, 0.1)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours.numpy(), _sinkhorn_loop(logits.float().numpy(), 0.1, 3), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- iBOT


def _ibot_loop(student, teacher, mask, student_temp, over="masked") -> float:
    per_image, images_with_mask = [], 0
    for b in range(mask.shape[0]):
        patches = [p for p in range(mask.shape[1]) if mask[b, p]]
        if not patches:
            continue
        images_with_mask += 1
        total = 0.0
        for p in patches:
            row = [student[b, p, k].item() / student_temp for k in range(student.shape[2])]
            log_z = math.log(sum(math.exp(v) for v in row))
            total -= sum(teacher[b, p, k].item() * (row[k] - log_z) for k in range(student.shape[2]))
        per_image.append(total / len(patches))
    denominator = images_with_mask if over == "masked" else mask.shape[0]
    return sum(per_image) / max(denominator, 1)


def _ibot_inputs(seed: int = 7):
    student = _randn(4, 6, 5, seed=seed)
    teacher = torch.softmax(_randn(4, 6, 5, seed=seed + 1) / 0.3, dim=-1)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[0, [1, 4]] = True  # 2 masked patches
    mask[2, :5] = True  # 5 masked patches; images 1 and 3 have none
    return student, teacher, mask


@pytest.mark.parametrize("over", ["masked", "all"])
def test_ibot_loss_equals_a_float64_loop_with_per_image_weights(over: str) -> None:
    student, teacher, mask = _ibot_inputs()
    ours = ibot_loss(student, teacher, mask, 0.1, over=over)
    assert ours.item() == pytest.approx(_ibot_loop(student, teacher, mask, 0.1, over), rel=1e-12)
    # Not a plain mean over the 7 masked patches: image 0's two patches weigh as much as image 2's five.
    flat = -(teacher[mask] * torch.log_softmax(student[mask] / 0.1, dim=-1)).sum(dim=-1).mean()
    assert abs(flat.item() - ibot_loss(student, teacher, mask, 0.1).item()) > 1e-6


def test_ibot_unmasked_tokens_have_no_effect() -> None:
    student, teacher, mask = _ibot_inputs(seed=11)
    base = ibot_loss(student, teacher, mask, 0.1)
    changed_s, changed_t = student.clone(), teacher.clone()
    changed_s[~mask] = 3e38 * torch.sign(_randn(int((~mask).sum()), 5, seed=12))  # huge, finite
    changed_t[~mask] = 1e30
    leaf = changed_s.clone().requires_grad_(True)
    loss = ibot_loss(leaf, changed_t, mask, 0.1)
    assert torch.isfinite(loss) and loss.item() == base.item()
    loss.backward()
    assert torch.equal(leaf.grad[~mask], torch.zeros_like(leaf.grad[~mask]))
    assert leaf.grad[mask].abs().sum() > 0


def test_ibot_nothing_masked_gives_zero_with_a_gradient_path() -> None:
    student, teacher, _ = _ibot_inputs()
    leaf = student.clone().requires_grad_(True)
    loss = ibot_loss(leaf, teacher, torch.zeros(4, 6, dtype=torch.bool), 0.1)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_ibot_half_precision_computes_in_float32() -> None:
    student, teacher, mask = _ibot_inputs(seed=13)
    loss = ibot_loss(student.to(torch.bfloat16), teacher.to(torch.bfloat16), mask, 0.1)
    assert loss.dtype == torch.float32
    expected = _ibot_loop(student.to(torch.bfloat16).double(), teacher.to(torch.bfloat16).double(), mask, 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ibot_loss_over_all_images_agrees_with_lightly() -> None:
    lightly_loss = pytest.importorskip("lightly.loss")
    b, h, w, k, t_temp = 5, 3, 4, 10, 0.05
    student, teacher_logits = _randn(b, h * w, k, seed=14), _randn(b, h * w, k, seed=15)
    mask = torch.rand(b, h * w, generator=torch.Generator().manual_seed(16)) < 0.4
    mask[1] = False  # an image without a mask: lightly divides by all B images, as DINOv2's code does
    loss_fn = lightly_loss.IBOTPatchLoss(output_dim=k, teacher_temp=t_temp, student_temp=0.1)
    theirs = loss_fn(teacher_logits[mask], student[mask], mask.view(b, h, w))  # centre zero at the first call
    targets = teacher_probs(teacher_logits.view(-1, k), torch.zeros(1, k), t_temp).view(b, h * w, k)
    # rel 1e-7: lightly's teacher temperature is a float32 tensor.
    assert ibot_loss(student, targets, mask, 0.1, over="all").item() == pytest.approx(theirs.item(), rel=1e-7)


# ---------------------------------------------------------------- KoLeo


def _koleo_loop(x: torch.Tensor, eps: float) -> float:
    rows = [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in x.tolist()]
    total = 0.0
    for i, a in enumerate(rows):
        nearest = min(math.dist(a, b) for j, b in enumerate(rows) if j != i)
        total -= math.log(nearest + eps)
    return total / len(rows)


def test_koleo_equals_pairwise_distances_in_float64() -> None:
    for seed, (b, d) in enumerate([(6, 3), (10, 8), (2, 5)]):
        x = _randn(b, d, seed=20 + seed) * 3
        assert koleo_loss(x).item() == pytest.approx(_koleo_loop(x, 1e-8), rel=1e-10)


def test_koleo_square_on_the_unit_circle() -> None:
    # Four points at the corners of a square inscribed in the unit circle: each nearest neighbour is
    # sqrt(2) away (the opposite corner is 2 away), so the loss is -log(sqrt(2)); scaling the rows changes nothing.
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    assert koleo_loss(square).item() == pytest.approx(-math.log(math.sqrt(2)), rel=1e-7)
    assert koleo_loss(square * torch.tensor([[2.0], [0.5], [7.0], [1.0]], dtype=torch.float64)).item() == \
        pytest.approx(-math.log(math.sqrt(2)), rel=1e-7)


def test_koleo_identical_rows_cost_log_eps_with_finite_gradients() -> None:
    x = _randn(5, 4, seed=30)
    x[3] = x[1] * 2.0  # the same direction: distance 0 after normalisation
    leaf = x.clone().requires_grad_(True)
    loss = koleo_loss(leaf, eps=1e-8)
    assert loss.item() == pytest.approx(_koleo_loop(x, 1e-8), rel=1e-6)
    # Rows 1 and 3 each add -log(eps) = 18.4; the three others at least -log(2) (unit vectors are <= 2 apart).
    assert loss.item() >= (-2 * math.log(1e-8) - 3 * math.log(2)) / 5
    others = [0, 2, 4]
    loss.backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad[others].abs().sum() > 0


def test_koleo_agrees_with_lightly() -> None:
    lightly_loss = pytest.importorskip("lightly.loss")
    for seed, (b, d) in enumerate([(8, 16), (32, 4), (3, 3)]):
        x = _randn(b, d, seed=40 + seed)
        # lightly adds eps inside the distance (torch's PairwiseDistance): equal to about 1e-8 relative.
        assert koleo_loss(x).item() == pytest.approx(lightly_loss.KoLeoLoss()(x).item(), rel=1e-6)


def test_koleo_half_precision_is_float32_and_needs_two_rows() -> None:
    x = _randn(6, 4, seed=50, dtype=torch.bfloat16)
    assert koleo_loss(x).dtype == torch.float32
    assert koleo_loss(x).item() == pytest.approx(_koleo_loop(x.double(), 1e-8), rel=1e-5)
    with pytest.raises(ValueError, match="at least 2 rows"):
        koleo_loss(x[:1])


# ---------------------------------------------------------------- two real ranks (gloo)

GLOBAL_N, K, TEMP = 6, 5, 0.05


def _global_logits() -> torch.Tensor:
    return _randn(2 * GLOBAL_N, K, seed=60, dtype=torch.float32) * 2 + 1  # exp(x / 0.05) overflows: the max shift


def _worker(out: Path) -> None:
    torch_dist.init_process_group("gloo")
    rank, world = dist.rank(), dist.world_size()
    logits = _global_logits()[rank * GLOBAL_N:(rank + 1) * GLOBAL_N]
    record = {"world": world, "sinkhorn": sinkhorn_knopp(logits, TEMP, 3), "center": batch_center(logits),
              "sum": dist.all_reduce_no_grad(torch.tensor([rank + 1.0, 2.0])),
              "max": dist.all_reduce_no_grad(torch.tensor([rank + 1.0, -rank]), op="max"),
              "min": dist.all_reduce_no_grad(torch.tensor([rank + 1.0, -rank]), op="min")}
    torch.save(record, out / f"rank{rank}.pt")
    torch_dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    from processes import run_two_ranks  # tests/ (the ranks run this file as a script, without it)

    ranks = run_two_ranks(__file__, out=tmp_path)
    assert [r["world"] for r in ranks] == [2, 2]
    whole = _global_logits()
    one_process = sinkhorn_knopp(whole, TEMP, 3)
    center = whole.mean(dim=0, keepdim=True)
    for r, record in enumerate(ranks):
        rows = slice(r * GLOBAL_N, (r + 1) * GLOBAL_N)
        torch.testing.assert_close(record["sinkhorn"], one_process[rows], rtol=1e-5, atol=1e-6)
        # Sinkhorn on the half batch alone gives other targets: the ranks did share their sums.
        assert not torch.allclose(sinkhorn_knopp(whole[rows], TEMP, 3), one_process[rows], atol=1e-3)
        torch.testing.assert_close(record["center"], center, rtol=1e-6, atol=1e-6)
        assert record["sum"].tolist() == [3.0, 4.0]
        assert record["max"].tolist() == [2.0, 0.0] and record["min"].tolist() == [1.0, -1.0]


def test_all_reduce_with_one_process_copies_and_checks_the_op() -> None:
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    out = dist.all_reduce_no_grad(x, op="max")
    assert torch.equal(out, x.detach()) and not out.requires_grad and out.data_ptr() != x.data_ptr()
    with pytest.raises(ValueError, match="op must be"):
        dist.all_reduce_no_grad(x, op="mean")


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
