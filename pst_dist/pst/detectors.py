"""Cheap detectors of perturbation learning. None of them looks at the clean test set: they read a fixed probe slice
of the (poisoned) training set."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..registry import TRIGGERS
from .freeze import GroupActivations, GroupedModel
from .views import apply_view


def scatter_ratio(feats: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Between-class / within-class scatter (trace ratio) of ``feats`` (N x D): high = tightly class-clustered.

    Differentiable (the activation-clustering loss penalty uses it); classes absent from the batch contribute
    nothing.
    """
    num_classes = num_classes or int(labels.max()) + 1
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(feats.dtype)
    counts = onehot.sum(0)
    means = (onehot.T @ feats) / counts.clamp_min(1)[:, None]
    mu = feats.mean(0)
    between = (counts[:, None] * (means - mu) ** 2).sum()
    within = ((feats - means[labels]) ** 2).sum()
    return between / within.clamp_min(1e-12)


@torch.no_grad()
def probe_metrics(gm: GroupedModel, probe_x: torch.Tensor, probe_y: torch.Tensor, normalize, view: str,
                  view_strength: float = 1.0, more_views: dict[str, str] | None = None) -> dict[str, float]:
    """All detector values on the probe: raw and view accuracy, their gap, and each group's scatter ratio; for each
    ``name: view`` of ``more_views`` (a trigger's ``also`` conditions on their own views: ``also_<i>``), that view's
    accuracy and gap as ``probe_view_acc/<name>`` and ``shortcut_gap/<name>`` (each distinct view measured once,
    ``view`` too; named by condition, since a view's own string, ``randblur:2+quantize:3``, is not a name every
    tracker takes).

    ``probe_x`` is float in [0, 1]; ``normalize`` maps it to model input.
    """
    model: nn.Module = gm.model
    was = model.training
    model.eval()
    with GroupActivations(gm) as ga:
        raw_logits = model(normalize(probe_x))
    accuracy = lambda logits: float((logits.argmax(1) == probe_y).float().mean())  # noqa: E731
    acc = accuracy(raw_logits)
    vacc = accuracy(model(normalize(apply_view(probe_x, view, view_strength))))
    out = {"probe_acc": acc, "probe_view_acc": vacc, "shortcut_gap": acc - vacc}
    measured = {view: vacc} if view_strength == 1.0 else {}  # a view is measured once, the trigger's own included
    for name, v in (more_views or {}).items():
        if v not in measured:
            measured[v] = accuracy(model(normalize(apply_view(probe_x, v))))
        out[f"probe_view_acc/{name}"], out[f"shortcut_gap/{name}"] = measured[v], acc - measured[v]
    model.train(was)
    for g, feat in sorted(ga.acts.items()):
        out[f"cluster/group_{g}"] = float(scatter_ratio(feat.double(), probe_y))
    return out


def trigger_value(kind: str, metrics: dict[str, float], group: int, view_name: str | None = None) -> float:
    """The scalar a trigger of ``kind`` (:data:`pst_dist.registry.TRIGGERS`) compares with its threshold;
    ``view_name``: a name of ``more_views`` in :func:`probe_metrics` (a trigger's ``also`` condition on its own view),
    whose accuracy and gap then stand for the trigger view's."""
    try:
        fn = TRIGGERS.load(kind)
    except KeyError as e:
        raise ValueError(str(e).strip("'\"")) from None
    if view_name is not None:
        if f"shortcut_gap/{view_name}" not in metrics:
            raise KeyError(f"view {view_name!r} was not measured on the probe (probe_metrics' more_views)")
        metrics = {**metrics, "probe_view_acc": metrics[f"probe_view_acc/{view_name}"],
                   "shortcut_gap": metrics[f"shortcut_gap/{view_name}"]}
    return fn(metrics, group)
