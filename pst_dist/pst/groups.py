"""Ordered layer groups, shallow to deep, head last, from timm's ``group_matcher``."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from timm.models import group_parameters


@dataclass(frozen=True)
class LayerGroup:
    index: int
    name: str
    param_names: tuple[str, ...]


def layer_groups(model: nn.Module, block_groups: int = 4) -> list[LayerGroup]:
    """Cut ``model`` into ordered groups: stem, up to ``block_groups`` block chunks, head.

    Uses timm's ``group_matcher``/``group_parameters`` where the model has one, else falls back to the
    model's top-level children in registration order. Every parameter lands in exactly one group.
    """
    if hasattr(model, "group_matcher"):
        raw = group_parameters(model, model.group_matcher(coarse=True))
        ordered = [list(names) for _, names in sorted(raw.items())]
    else:
        ordered = _groups_by_children(model)
    if len(ordered) < 2:
        ordered = _groups_by_children(model)
    stem, middle, head = ordered[0], ordered[1:-1], ordered[-1]
    if len(middle) > block_groups:
        chunks = [[] for _ in range(block_groups)]
        for i, names in enumerate(middle):
            chunks[i * block_groups // len(middle)].extend(names)
        middle = chunks
    all_groups = [stem, *middle, head]
    labels = ["stem"] + [f"blocks{i + 1}" for i in range(len(middle))] + ["head"]
    groups = [LayerGroup(i, labels[i], tuple(n)) for i, n in enumerate(all_groups)]
    _check_partition(model, groups)
    return groups


def _groups_by_children(model: nn.Module) -> list[list[str]]:
    groups: list[list[str]] = []
    direct = [n for n, _ in model.named_parameters(recurse=False)]
    for child_name, child in model.named_children():
        names = [f"{child_name}.{n}" for n, _ in child.named_parameters()]
        if names:
            groups.append(names)
    if direct:  # parameters owned by the root module go with the first group
        if groups:
            groups[0] = direct + groups[0]
        else:
            groups = [direct]
    if len(groups) == 1:  # a single block: split its parameters in halves, order of registration
        names = groups[0]
        groups = [names[: len(names) // 2], names[len(names) // 2:]]
    return groups


def _check_partition(model: nn.Module, groups: list[LayerGroup]) -> None:
    seen: dict[str, int] = {}
    for g in groups:
        for n in g.param_names:
            if n in seen:
                raise RuntimeError(f"parameter {n} is in groups {seen[n]} and {g.index}")
            seen[n] = g.index
    missing = [n for n, _ in model.named_parameters() if n not in seen]
    if missing:
        raise RuntimeError(f"parameters in no layer group: {missing[:5]}")


def group_of_param(groups: list[LayerGroup]) -> dict[str, int]:
    return {n: g.index for g in groups for n in g.param_names}
