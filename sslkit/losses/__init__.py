"""Losses: pure functions of tensors — no state, no device calls. The only ones that reduce over ranks
(DINO's ``batch_center`` and ``sinkhorn_knopp``) do it through ``sslkit.dist`` and need no process group alone."""

from sslkit.losses.dino import (
    batch_center,
    dino_loss,
    ema_center,
    ibot_loss,
    koleo_loss,
    sinkhorn_knopp,
    teacher_probs,
)
from sslkit.losses.focal import focal
from sslkit.losses.info_nce import info_nce
from sslkit.losses.nt_xent import nt_xent
from sslkit.losses.self_margin import self_margin
from sslkit.losses.similarity_focal import similarity_focal
from sslkit.losses.supcon import supcon

__all__ = ["batch_center", "dino_loss", "ema_center", "focal", "ibot_loss", "info_nce", "koleo_loss", "nt_xent",
           "self_margin", "similarity_focal", "sinkhorn_knopp", "supcon", "teacher_probs"]
