"""Freezing the DeepSpeed-safe way: one optimizer param group per layer group, created up front; a frozen group has
lr and weight decay 0 and no gradient (so momentum / Adam moments do not move); backward does not run through a
frozen prefix (it is computed under no_grad); BatchNorm statistics of frozen groups stay fixed.
``requires_grad`` is never flipped."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .groups import LayerGroup, group_of_param


def param_groups(model: nn.Module, groups: list[LayerGroup], lr: float, weight_decay: float) -> list[dict]:
    """One optimizer param group per layer group, in group order, tagged with its index and base weight decay."""
    params = dict(model.named_parameters())
    return [{"params": [params[n] for n in g.param_names], "lr": lr, "weight_decay": weight_decay,
             "layer_group": g.index, "base_weight_decay": weight_decay} for g in groups]


def set_group_lrs(optimizer: torch.optim.Optimizer, base_lr: float, mults: tuple[float, ...]) -> None:
    """lr = base_lr * mult per group; weight decay 0 where the group is frozen (mult 0)."""
    for pg in optimizer.param_groups:
        m = mults[pg["layer_group"]]
        pg["lr"] = base_lr * m
        pg["weight_decay"] = pg["base_weight_decay"] if m > 0 else 0.0


def drop_frozen_grads(optimizer: torch.optim.Optimizer, mults: tuple[float, ...]) -> None:
    """Set .grad = None on frozen groups so the optimizer skips them (no momentum / moment update)."""
    for pg in optimizer.param_groups:
        if mults[pg["layer_group"]] == 0:
            for p in pg["params"]:
                p.grad = None


@dataclass
class Unit:
    """A module whose parameters all belong to one layer group (or that has none)."""

    name: str
    module: nn.Module
    group: int | None


@dataclass
class GroupedModel:
    """The model with its layer groups and the execution order of its units, traced once."""

    model: nn.Module
    groups: list[LayerGroup]
    units: list[Unit]  # in forward execution order
    _handles: list = field(default_factory=list)
    _prefix: int = -1

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def group_output_units(self) -> dict[int, Unit]:
        """The last unit (in execution order) of each group: its output is the group's activation."""
        out: dict[int, Unit] = {}
        for u in self.units:
            if u.group is not None:
                out[u.group] = u
        return out

    # --- no-grad prefix --------------------------------------------------------------------------------------
    def set_frozen_prefix(self, mults: tuple[float, ...]) -> int:
        """Run the longest frozen prefix of groups under no_grad. Returns the prefix length (groups)."""
        k = 0
        while k < len(mults) - 1 and mults[k] == 0:
            k += 1
        if k == self._prefix:
            return k
        for h in self._handles:
            h.remove()
        self._handles, self._prefix = [], k
        if k == 0:
            return 0
        cut = -1
        for i, u in enumerate(self.units):
            if u.group is not None and u.group >= k:
                break
            if u.group is not None:
                cut = i
        if cut < 0:
            return 0
        state: dict = {}

        def enter(_m, _inp):
            state["prev"] = torch.is_grad_enabled()
            torch.set_grad_enabled(False)

        def leave(_m, _inp, _out):
            torch.set_grad_enabled(state.pop("prev", True))

        self._handles = [self.units[0].module.register_forward_pre_hook(enter),
                         self.units[cut].module.register_forward_hook(leave)]
        return k

    # --- BatchNorm -------------------------------------------------------------------------------------------
    def fix_frozen_bn(self, mults: tuple[float, ...]) -> None:
        """Put BatchNorm modules of frozen groups in eval mode (running statistics fixed). Call after .train()."""
        for u in self.units:
            if u.group is not None and mults[u.group] == 0:
                for m in u.module.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()


def trace_units(model: nn.Module, groups: list[LayerGroup], example: torch.Tensor) -> GroupedModel:
    """Find the single-group units of ``model`` and their execution order on ``example``."""
    owner = group_of_param(groups)
    units: list[Unit] = []

    def visit(prefix: str, module: nn.Module) -> None:
        names = {owner[f"{prefix}{n}"] for n, _ in module.named_parameters()}
        if len(names) <= 1:
            units.append(Unit(prefix.rstrip("."), module, next(iter(names)) if names else None))
            return
        for cname, child in module.named_children():
            visit(f"{prefix}{cname}.", child)

    for cname, child in model.named_children():
        visit(f"{cname}.", child)
    order: list[int] = []
    handles = [u.module.register_forward_pre_hook(lambda _m, _i, i=i: order.append(i) if i not in order else None)
               for i, u in enumerate(units)]
    with eval_mode(model), torch.no_grad():
        model(example)
    for h in handles:
        h.remove()
    executed = [units[i] for i in order]
    return GroupedModel(model, groups, executed)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode, each module given back its own mode after: ``model.train(was)`` would put the
    BatchNorm of frozen groups (:meth:`GroupedModel.fix_frozen_bn`) back in train mode, their statistics then moving
    for the rest of the epoch."""
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode


class GroupActivations:
    """Context manager capturing each group's pooled output (N x D) during a forward pass."""

    def __init__(self, gm: GroupedModel, groups: list[int] | None = None, detach: bool = True):
        self.targets = {g: u for g, u in gm.group_output_units().items() if groups is None or g in groups}
        self.detach = detach
        self.acts: dict[int, torch.Tensor] = {}

    def __enter__(self) -> GroupActivations:
        def hook(g):
            def fn(_m, _i, out):
                out = out[0] if isinstance(out, tuple | list) else out
                feat = out.float()
                feat = feat.mean(dim=(2, 3)) if feat.ndim == 4 else feat.mean(dim=1) if feat.ndim == 3 else feat
                self.acts[g] = feat.detach() if self.detach else feat
            return fn

        self._handles = [u.module.register_forward_hook(hook(g)) for g, u in self.targets.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
