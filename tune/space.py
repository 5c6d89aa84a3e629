"""The PST schedule search space, as plain data (no Ray here): which schedules a trial may get, and the schedule a
trial's parameters stand for.

A trial's parameters::

    {"skeleton": "warm=1,freeze=2,release=1,order=1-0", "threshold": 0.2, "mult_0": 0.1, "mult_1": 1.0}

plus ``view``, ``consistency``, ``release_ce``, ``release_view``, ``last_ce`` and ``release_smoothing`` where
``tune.views`` / ``tune.consistency`` / ``tune.release_ce`` / ``tune.release_views`` / ``tune.last_ce`` /
``tune.release_smoothing`` offer choices.

``skeleton`` fixes the stage lengths and the unfreeze order. Skeletons are enumerated up front and only valid ones
are offered (an order is a permutation of ``tune.unfreeze_groups`` or one of ``tune.unfreeze_orders``, never names
the head or a group the model lacks; the stages before the last must end inside train.epochs), so random sampling
is uniform over valid schedules and never wastes a trial on an invalid one.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

from pst_dist.config import Config, ConfigError, StageConfig, parse_order


@dataclass(frozen=True)
class Skeleton:
    warm: float
    freeze: float
    release: float
    order: tuple[int, ...]

    def key(self) -> str:
        return f"warm={self.warm:g},freeze={self.freeze:g},release={self.release:g},order={order_str(self.order)}"

    @staticmethod
    def parse(key: str) -> Skeleton:
        try:
            kv = dict(part.split("=", 1) for part in key.split(","))
            return Skeleton(float(kv["warm"]), float(kv["freeze"]), float(kv["release"]), parse_order(kv["order"]))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"schedule skeleton {key!r}: expected 'warm=W,freeze=F,release=R,order=a-b-..' "
                              f"({type(e).__name__}: {e})") from None

    def planned_epochs(self) -> float:
        """Epochs before the last stage starts (the last one runs to the end of training)."""
        return self.warm + self.freeze + self.release * (len(self.order) - 1)


def order_str(order: tuple[int, ...]) -> str:
    return "-".join(str(g) for g in order)


def valid_orders(cfg: Config, num_groups: int) -> list[tuple[int, ...]]:
    """The unfreeze orders a trial may get. Raises naming the bad group or order."""
    t = cfg.tune
    head = num_groups - 1
    for g in t.unfreeze_groups:
        if g >= head:
            what = "the head, which is never frozen by the search" if g == head else "a group the model lacks"
            raise ConfigError(f"tune.unfreeze_groups names group {g}: {what} (the model has groups 0..{head}, "
                              f"head {head})")
    if not t.unfreeze_orders:
        return list(itertools.permutations(t.unfreeze_groups))
    return list(dict.fromkeys(parse_order(text) for text in t.unfreeze_orders))  # permutations (checked at load)


def skeletons(cfg: Config, num_groups: int) -> list[Skeleton]:
    """Every valid (lengths, order) combination; an error when none fits in train.epochs."""
    t = cfg.tune
    out = [Skeleton(w, f, r, o) for w, f, r, o in itertools.product(
        t.warm_epochs, t.freeze_epochs, t.release_epochs, valid_orders(cfg, num_groups))]
    fitting = [s for s in out if s.planned_epochs() < cfg.train.epochs]
    if not fitting:
        shortest = min(s.planned_epochs() for s in out)
        raise ConfigError(f"no schedule fits: the shortest needs {shortest:g} epochs before its last stage, "
                          f"train.epochs={cfg.train.epochs}; shorten tune.warm_epochs/freeze_epochs/release_epochs "
                          f"or raise train.epochs")
    return fitting


def mult_keys(cfg: Config) -> list[str]:
    return [f"mult_{i}" for i in range(len(cfg.tune.unfreeze_groups))]


#: the searched loss settings beyond the schedule's shape: trial parameter -> the [tune] key offering its choices
EXTRA = {"view": "views", "consistency": "consistency", "release_ce": "release_ce", "release_view": "release_views",
         "last_ce": "last_ce", "release_smoothing": "release_smoothing"}


#: the trial parameters that set every release stage's loss: parameter -> (loss field, its type)
RELEASE_LOSS = {"consistency": ("consistency", float), "release_ce": ("ce", float), "release_view": ("view", str),
                "release_smoothing": ("label_smoothing", float)}


def extra_choices(cfg: Config) -> dict[str, list]:
    """The searched loss settings beyond the schedule's shape (every stage's view; the release stages' consistency
    weight, raw cross-entropy weight, view and label smoothing; the last stage's raw cross-entropy weight), where the
    config offers choices."""
    return {k: list(getattr(cfg.tune, key)) for k, key in EXTRA.items() if getattr(cfg.tune, key)}


def grid_size(cfg: Config, num_groups: int) -> int:
    t = cfg.tune
    n = len(skeletons(cfg, num_groups)) * len(t.thresholds) * len(t.release_mults) ** len(t.unfreeze_groups)
    for v in extra_choices(cfg).values():
        n *= len(v)
    return n


def schedule_stages(cfg: Config, params: dict) -> list[StageConfig]:
    """The stages ``params`` stand for, built on the base config's schedule as the template (see TuneConfig)."""
    sk = Skeleton.parse(params["skeleton"])
    base = cfg.schedule.stages
    warm_t, frozen_t, release_t = base[0], base[min(1, len(base) - 1)], base[-1]
    warm = copy.deepcopy(warm_t)
    warm.name, warm.epochs, warm.steps = "warm", sk.warm, 0
    warm.freeze, warm.group_mults, warm.lr_mult = [], {}, 1.0
    if warm.trigger is not None:
        warm.trigger.threshold = float(params["threshold"])
    stages = [warm] if sk.warm > 0 else []
    frozen = StageConfig(name="frozen", epochs=sk.freeze, freeze=sorted(sk.order), reinit_head=frozen_t.reinit_head,
                         loss=copy.deepcopy(frozen_t.loss))
    if sk.freeze > 0:
        stages.append(frozen)
    for i, g in enumerate(sk.order):
        released, still = sk.order[: i + 1], sk.order[i + 1:]
        last = i == len(sk.order) - 1
        stages.append(StageConfig(
            name=f"release_{g}", epochs=0.0 if last else sk.release, freeze=sorted(still),
            group_mults={str(r): float(params[f"mult_{i}"]) for r in sorted(released)},
            loss=copy.deepcopy(release_t.loss)))
    if sk.freeze == 0 and frozen_t.reinit_head:  # no frozen stage: the head re-init moves to the first release
        stages[1 if sk.warm > 0 else 0].reinit_head = True
    if "view" in params:  # every stage's view (and the warm-up trigger's) is the trial's
        for st in stages:
            st.loss.view = params["view"]
            if st.trigger is not None:
                st.trigger.view = params["view"]
    release = stages[len(stages) - len(sk.order):]
    for key, (attr, cast) in RELEASE_LOSS.items():
        if key in params:
            for st in release:
                setattr(st.loss, attr, cast(params[key]))
    if "last_ce" in params:
        stages[-1].loss.ce = float(params["last_ce"])
    return stages


def trial_config(cfg: Config, params: dict) -> Config:
    """The full training config of a trial: the base config with the trial's schedule."""
    out = copy.deepcopy(cfg)
    out.schedule.stages = schedule_stages(cfg, params)
    return out


def describe(params: dict) -> dict:
    """Flat, readable columns for the results table."""
    sk = Skeleton.parse(params["skeleton"])
    row = {"warm_epochs": sk.warm, "freeze_epochs": sk.freeze, "release_epochs": sk.release,
           "unfreeze_order": order_str(sk.order), "threshold": params.get("threshold")}
    row.update({k: v for k, v in params.items() if k.startswith("mult_")})
    row.update({k: params[k] for k in EXTRA if k in params})
    return row


def schedules_offered(cfg: Config, num_groups: int) -> list[dict]:
    """One parameter set per valid skeleton (thresholds and multipliers do not change which groups a stage names)."""
    t = cfg.tune
    fill = {"threshold": t.thresholds[0], **{k: t.release_mults[0] for k in mult_keys(cfg)},
            **{k: v[0] for k, v in extra_choices(cfg).items()}}
    return [{"skeleton": s.key(), **fill} for s in skeletons(cfg, num_groups)]
