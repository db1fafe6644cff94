"""Losses: pure functions of tensors — no state, no device or rank calls."""

from sslkit.losses.focal import focal
from sslkit.losses.info_nce import info_nce
from sslkit.losses.nt_xent import nt_xent
from sslkit.losses.self_margin import self_margin
from sslkit.losses.similarity_focal import similarity_focal
from sslkit.losses.supcon import supcon

__all__ = ["focal", "info_nce", "nt_xent", "self_margin", "similarity_focal", "supcon"]
