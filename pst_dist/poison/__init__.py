"""Availability poisons (unlearnable examples). This issue ships the cheap class-wise ones."""

from .cheap import apply_poison, class_patterns

__all__ = ["apply_poison", "class_patterns"]
