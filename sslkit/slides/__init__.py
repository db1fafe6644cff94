"""Slide-level work: per-slide feature bags, attention-MIL classification, synthetic slide collections."""
