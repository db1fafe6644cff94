"""Slide-level work: per-slide feature bags (``extract``, ``bags``) and what builds on them."""
