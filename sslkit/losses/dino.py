"""The losses of ViT self-distillation: DINO's view-to-view cross-entropy, iBOT's masked-patch
cross-entropy, the teacher targets they take (centring with a running centre, or Sinkhorn-Knopp
across ranks), and the KoLeo regulariser of DINOv2.

A teacher turns its logits into probabilities (``teacher_probs`` or ``sinkhorn_knopp``, no
gradient); the student is trained to predict them from other views (``dino_loss``) or from
masked patches (``ibot_loss``). Everything is computed in at least float32: half-precision
inputs are cast up, float64 stays float64.

The running centre of DINO: ``batch_center`` reduces the teacher logits of the whole global batch
(all ranks), and ``ema_center`` moves the centre towards that mean after the optimiser step.
``sinkhorn_knopp`` and ``batch_center`` are the only functions here that talk to other ranks
(through ``sslkit.dist``); with one process they need no process group.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sslkit import dist


def _f32(x: Tensor) -> Tensor:
    """``x`` in float32 when it is in a lower precision; float32 and float64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@torch.no_grad()
def teacher_probs(logits: Tensor, center: Tensor, temp: float) -> Tensor:
    """DINO's centred, sharpened teacher targets: for each row n,

        p[n, k] = exp((logits[n, k] - center[k]) / temp) / sum_j exp((logits[n, j] - center[j]) / temp)

    Args:
        logits: (N, K) teacher logits.
        center: (1, K) the running centre (``ema_center``).
        temp: the teacher temperature (small: sharpens).

    Returns:
        (N, K) probabilities, each row summing to 1, at least float32, without gradient.
    """
    return F.softmax((_f32(logits) - _f32(center)) / temp, dim=-1)


def _logsumexp_over_ranks(x: Tensor, dim: int | None = None) -> Tensor:
    """log(sum of exp(x)) along ``dim`` (None: every entry) over the rows of every rank; keeps dims."""
    if dim is None:
        x, dim = x.reshape(1, -1), 1
    top = dist.all_reduce_no_grad(x.amax(dim=dim, keepdim=True), op="max")
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # an all -inf slice: log(0) = -inf below
    return top + torch.log(dist.all_reduce_no_grad(torch.exp(x - top).sum(dim=dim, keepdim=True)))


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temp: float, iterations: int = 3) -> Tensor:
    """DINOv2's teacher targets: Sinkhorn-Knopp on the whole global batch, spread over the ranks.

    With B = N * world samples (every rank holds N of them) and K prototypes, start from the (K, B)
    matrix Q[k, b] = exp(logits[b, k] / temp) and divide it by its total over all ranks. Then
    ``iterations`` times: divide every row (prototype) by its sum over all ranks and by K, so each
    prototype carries mass 1/K; divide every column (sample, local) by its sum and by B, so each
    sample carries mass 1/B. Finally multiply by B, so each sample's column sums to 1, and return
    the transpose, (N, K): each row a probability vector over prototypes, the prototypes used
    about equally over the global batch.

    The iterations run on log Q (each division a subtraction of a log-sum-exp, the sums over ranks
    taken around the largest entry): the same numbers, but exp can neither overflow at small
    temperatures nor underflow a whole prototype's row to zero (which the row normalisation would
    turn into 0/0) — float32 then holds logits spanning hundreds of temperatures. It costs one more
    all-reduce (a maximum) per row normalisation.

    Args:
        logits: (N, K) this rank's teacher logits.
        temp: the teacher temperature.
        iterations: the number of row/column normalisation rounds.

    Returns:
        (N, K) targets for this rank's rows, at least float32, without gradient.
    """
    log_q = _f32(logits).T / temp  # (K, N)
    k, n = log_q.shape
    log_k, log_b = math.log(k), math.log(n * dist.world_size())
    log_q = log_q - _logsumexp_over_ranks(log_q)
    for _ in range(iterations):
        log_q = log_q - _logsumexp_over_ranks(log_q, dim=1) - log_k
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_b
    return torch.exp(log_q + log_b).T


@torch.no_grad()
def batch_center(logits: Tensor) -> Tensor:
    """The mean teacher logit over every row of every rank: (sum over ranks of each rank's column sums) /
    (sum over ranks of their row counts), so ranks may hold different numbers of rows (the masked patch
    tokens of iBOT). With one process, the plain mean over the rows.

    Args:
        logits: (N, K) this rank's teacher logits.

    Returns:
        (1, K), identical on every rank, at least float32, without gradient.
    """
    logits = _f32(logits)
    total = dist.all_reduce_no_grad(torch.cat([logits.sum(dim=0), logits.new_tensor([logits.shape[0]])]))
    return (total[:-1] / total[-1].clamp_min(1)).unsqueeze(0)


@torch.no_grad()
def ema_center(center: Tensor, batch_mean: Tensor, momentum: float) -> Tensor:
    """The centre's moving average: center * momentum + batch_mean * (1 - momentum) (a new tensor)."""
    return center * momentum + batch_mean.to(center.dtype) * (1 - momentum)


def dino_loss(student: list[Tensor] | Tensor, teacher: list[Tensor] | Tensor, student_temp: float) -> Tensor:
    """DINO's cross-entropy between the teacher's global views and the student's other views.

    With T teacher views (the global crops) and S >= T student views, the first T of which are the
    same global crops in the same order:

        loss = mean over pairs (i < T, j < S, j != i) of
               (1 / B) sum_b  -sum_k teacher[i][b, k] * log softmax(student[j][b] / student_temp)[k]

    A view is never compared with itself: T * S - T pairs (2 global and 2 local views: 6).

    Args:
        student: S tensors (B, K), the student logits of every view.
        teacher: T tensors (B, K), the teacher probabilities of the global views (rows sum to 1).
        student_temp: the student temperature.

    Returns:
        A scalar, at least float32, differentiable with respect to the student logits.
    """
    n_teacher, n_student = len(teacher), len(student)  # a (views, B, K) tensor works as the list of its views
    if n_teacher == 0 or n_student < n_teacher:
        raise ValueError(f"need 1 <= teacher views <= student views, got {n_teacher} and {n_student}")
    n_pairs = n_teacher * n_student - n_teacher
    if n_pairs == 0:
        raise ValueError("one view only: every pair would compare a view with itself")
    stacked = student if isinstance(student, Tensor) else torch.stack(student)  # a tensor: no copy
    log_p = F.log_softmax(_f32(stacked) / student_temp, dim=-1)  # (S, B, K)
    targets = _f32(teacher if isinstance(teacher, Tensor) else torch.stack(teacher))  # (T, B, K)
    cross = -torch.einsum("tbk,sbk->ts", targets.to(log_p.dtype), log_p) / log_p.shape[1]  # (T, S) batch means
    same_view = torch.eye(n_teacher, n_student, dtype=torch.bool, device=cross.device)
    return cross.masked_fill(same_view, 0.0).sum() / n_pairs


def ibot_loss(student_patches: Tensor, teacher_patch_probs: Tensor, mask: Tensor, student_temp: float, *,
              over: str = "masked") -> Tensor:
    """iBOT's masked-patch cross-entropy: the student predicts the teacher's targets of the patches
    it did not see. With M_b the masked patches of image b and |M_b| their number,

        loss_b = (1 / |M_b|) sum_{p in M_b}  -sum_k teacher[b, p, k] * log softmax(student[b, p] / student_temp)[k]
        loss   = sum_b loss_b / (the number of images with |M_b| > 0)

    so every masked image weighs the same whatever its mask ratio. Unmasked patches are never
    read (only the masked rows are selected): neither their value nor their gradient takes part.
    When nothing is masked the loss is 0, still connected to ``student_patches`` (zero gradient).

    ``over="all"`` divides by B, every image in the batch, instead: what DINOv2's own code and
    lightly's ``IBOTPatchLoss`` do; it is the default result times (masked images / B).

    Args:
        student_patches: (B, P, K) student logits of the patch tokens.
        teacher_patch_probs: (B, P, K) teacher targets of the patch tokens (read only where masked).
        mask: (B, P) bool, True where the student's patch was masked.
        student_temp: the student temperature.
        over: "masked" (images with a mask) or "all" (the whole batch) as the denominator.

    Returns:
        A scalar, at least float32.
    """
    if over not in ("masked", "all"):
        raise ValueError(f"over must be 'masked' or 'all', not {over!r}")
    mask = mask.to(torch.bool)
    per_image = mask.sum(dim=1)  # (B,)
    student = _f32(student_patches[mask])  # (M, K), the masked patches in row-major order
    target = _f32(teacher_patch_probs[mask]).to(student.dtype)
    cross = -(target * F.log_softmax(student / student_temp, dim=-1)).sum(dim=-1)  # (M,)
    weight = (1.0 / per_image.clamp_min(1).to(cross.dtype)).repeat_interleave(per_image)  # 1/|M_b| per patch
    images = mask.shape[0] if over == "all" else int((per_image > 0).sum())
    return (cross * weight).sum() / max(images, 1)


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """The Kozachenko-Leonenko entropy regulariser of DINOv2: it spreads the batch over the sphere.

    Each row is scaled to unit length; d_i is the Euclidean distance from row i to its nearest
    other row (the nearest by cosine similarity, the row itself excluded), and

        loss = -(1 / B) sum_i log(d_i + eps)

    Two identical rows give d = 0 and a term of -log(eps). Computed on this rank's rows only, as
    DINOv2 does.

    Args:
        x: (B, D), B >= 2, e.g. the student's class tokens of one global view.
        eps: keeps the logarithm (and the normalisation) finite.

    Returns:
        A scalar, at least float32.
    """
    if x.shape[0] < 2:
        raise ValueError(f"koleo_loss needs at least 2 rows, got {x.shape[0]}")
    x = F.normalize(_f32(x), dim=-1, eps=eps)
    with torch.no_grad():
        sims = x @ x.T
        sims.fill_diagonal_(-3.0)  # below any cosine: a row is never its own neighbour
        nearest = sims.argmax(dim=1)
    distance = torch.linalg.vector_norm(x - x[nearest], dim=-1)
    return -torch.log(distance + eps).mean()
