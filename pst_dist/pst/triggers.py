"""Triggers: the scalar of :func:`pst_dist.pst.detectors.probe_metrics`'s values a stage's trigger compares with its
threshold (the names are :data:`pst_dist.registry.TRIGGERS`)."""

from __future__ import annotations


def shortcut_gap(metrics: dict[str, float], group: int) -> float:
    """Accuracy on the poisoned probe minus accuracy on its perturbation-suppressing view."""
    return metrics["shortcut_gap"]


def train_acc(metrics: dict[str, float], group: int) -> float:
    """Accuracy on the poisoned probe (the plain "training accuracy jumped" signal)."""
    return metrics["probe_acc"]


def cluster(metrics: dict[str, float], group: int) -> float:
    """Between/within-class scatter ratio of layer group ``group``'s pooled activations on the probe."""
    return metrics[f"cluster/group_{group}"]
