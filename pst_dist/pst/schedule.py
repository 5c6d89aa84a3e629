"""Stages as data. ``stage_at(step, history)`` is a pure function: resuming recomputes the same stage, multipliers
and next switch from the step count and the trigger history alone."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ConfigError, LossConfig, StageConfig

# history: sorted tuple of (stage_index, step) pairs: "stage i's trigger fired after `step` optimizer steps"
History = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class ActiveStage:
    index: int
    start: int  # first step of the stage (past its planned length, of that stretch): where its lr shape starts
    planned_end: int  # the step the stage ends at if its trigger does not fire (total_steps for an open end)
    config: StageConfig
    mults: tuple[float, ...]
    began: int | None = None  # past its planned length unfired (trigger.otherwise = "stay"): the stage's first step

    @property
    def stayed(self) -> bool:
        """Whether this is the stretch of a stage past its planned length (``start`` is then where that began)."""
        return self.began is not None

    @property
    def loss(self) -> LossConfig:
        """The loss this stretch trains with: the stage's, with ``trigger.stay_ce`` applied past its planned length."""
        return self.config.stay_loss() if self.stayed else self.config.loss


class Schedule:
    """A validated list of stages over ``total_steps`` optimizer steps of ``steps_per_epoch`` each."""

    def __init__(self, stages: list[StageConfig], num_groups: int, steps_per_epoch: int, total_steps: int,
                 no_stay: frozenset[int] = frozenset(), check_every: int = 1):
        """``no_stay``: the stages whose ``trigger.spectral_check`` found a class-wise filter in the data: unfired at
        their planned length they end there, as with ``otherwise = "next"``. ``check_every``: training consults a
        trigger after every step that is a multiple of it (``schedule.check_every``, or ``steps_per_epoch`` for the
        epochs' ends); 1, the default, any step. Only what the schedule reports on its triggers depends on it."""
        if not stages:
            raise ConfigError("schedule.stages is empty: a schedule needs at least one stage")
        for i, st in enumerate(stages):
            if st.max_group() >= num_groups:
                raise ConfigError(f"schedule.stages[{i}] ({st.name!r}) names group {st.max_group()}, but the model "
                                  f"has {num_groups} groups (0..{num_groups - 1})")
            if i < len(stages) - 1 and self._length(st, steps_per_epoch) is None and st.trigger is None:
                raise ConfigError(f"schedule.stages[{i}] ({st.name!r}) has no length (epochs/steps) and no trigger, "
                                  f"so the stages after it can never run")
        self.stages, self.num_groups, self.no_stay = stages, num_groups, no_stay
        self.steps_per_epoch, self.total_steps, self.check_every = steps_per_epoch, total_steps, max(1, check_every)

    @staticmethod
    def _length(st: StageConfig, steps_per_epoch: int) -> int | None:
        if st.epochs > 0:
            return max(1, int(round(st.epochs * steps_per_epoch)))
        if st.steps > 0:
            return st.steps
        return None

    def stays(self, i: int) -> bool:
        """Whether stage ``i``, unfired at its planned end, goes on (``trigger.otherwise = "stay"``; not the last
        stage, nor one whose data check found a class-wise filter, ``no_stay``)."""
        st = self.stages[i]
        return i < len(self.stages) - 1 and st.trigger is not None and st.trigger.otherwise == "stay" \
            and i not in self.no_stay

    def _checks(self, first: int, last: int) -> tuple[int, int] | None:
        """The first and last check step (a multiple of ``check_every``) in ``first..last``, or None."""
        c = self.check_every
        lo, hi = -(-first // c) * c, last // c * c
        return (lo, hi) if lo <= hi else None

    def unconsulted_triggers(self) -> list[int]:
        """The stages whose trigger is never consulted: not the last, reached, and no check step (``check_every``)
        before the run's last step inside :meth:`fire_window`, neither before their planned end (with the epochs'
        ends as checks, a stage of whole epochs ends at a check, and that check belongs to the next stage; a stage
        without a length ends with the run) nor, for a stage that stays, past it (:meth:`stay_window`). Steps as
        planned; a stage after one without a length, reached only by a fire, is not judged. Not an error (a recorded
        run keeps its config; the data check decides ``no_stay`` at run time): training says so."""
        out, start = [], 0
        for i, st in enumerate(self.stages[:-1]):
            length = self._length(st, self.steps_per_epoch)
            if st.trigger is not None and start < self.total_steps:
                planned = ActiveStage(i, start, self.total_steps if length is None else start + length, st, ())
                window = self.fire_window(planned)
                within = window and self._checks(window[0], min(window[1], self.total_steps - 1))
                if not within and not (self.stays(i) and self.stay_window(i)):
                    out.append(i)
            if length is None:
                break
            start += length
        return out

    def unreached_stages(self) -> list[int]:
        """The stages that, as planned (no trigger firing), start at or past the run's end: after stages that all
        have lengths (a stage after one without a length is reached only by a fire, and not judged)."""
        out, start = [], 0
        for i, st in enumerate(self.stages):
            if i and start >= self.total_steps:
                out.append(i)
            length = self._length(st, self.steps_per_epoch)
            if length is None:
                break
            start += length
        return out

    def planned_end(self, i: int) -> int:
        """The step stage ``i`` ends at as planned (the stages up to it at their planned lengths, none firing); one
        without a length, or after one, ends with the run. May lie past the run's end."""
        end = 0
        for st in self.stages[:i + 1]:
            length = self._length(st, self.steps_per_epoch)
            if length is None:
                return self.total_steps
            end += length
        return end

    def stay_window(self, i: int) -> tuple[int, int] | None:
        """For a stage that stays, the check steps (``check_every``) after which its trigger may fire past its
        planned length, first and last, or None when there are none (``min_epochs`` or :meth:`fire_deadline`).
        Steps as planned: the stage starts after the planned lengths of the stages before it (an earlier stage's
        fire moves them)."""
        length = self._length(self.stages[i], self.steps_per_epoch)
        if not self.stays(i) or length is None:
            return None
        end = sum(self._length(s, self.steps_per_epoch) or 0 for s in self.stages[:i]) + length
        window = self.fire_window(ActiveStage(i, end, self.total_steps, self.stages[i], (), began=end - length))
        return window and self._checks(max(end, window[0]), window[1])

    def stage_at(self, step: int, history: History = ()) -> ActiveStage:
        """The stage governing optimizer step ``step`` (0-based), given the trigger history."""
        fired = {i: s for i, s in history}
        start = 0
        for i, st in enumerate(self.stages):
            length = self._length(st, self.steps_per_epoch)
            planned_end = self.total_steps if length is None else start + length
            last = i == len(self.stages) - 1
            # trigger.otherwise = "stay": unfired at its planned end, the stage goes on until it fires (no end else),
            # unless the data check found a class-wise filter (no_stay)
            stay = self.stays(i)
            end = None if stay else planned_end
            if i in fired and start <= fired[i] and (end is None or fired[i] < end):
                end = fired[i]
            if last or end is None or step < end:
                mults = tuple(st.mults(self.num_groups))
                if stay and step >= planned_end:  # its learning-rate shape starts again over the remaining steps
                    return ActiveStage(i, planned_end, self.total_steps, st, mults, began=start)
                return ActiveStage(i, start, max(planned_end, start + 1), st, mults)
            start = end
        raise AssertionError("unreachable")

    def fire_window(self, stage: ActiveStage) -> tuple[int, int] | None:
        """The first and last step after which ``stage``'s trigger may be consulted, or None: after its first step,
        once ``min_epochs`` of the stage (from its first step, past its planned length too) have passed, and before
        its planned end; past its planned length (a stage that stays), only while the stages after it still get
        their planned lengths (:meth:`fire_deadline`): a fire later than that would end the run inside them, after
        a freeze or a new head, at a learning rate their lr shape has barely begun to lower."""
        if stage.config.trigger is None or stage.index == len(self.stages) - 1:
            return None
        began = stage.start if stage.began is None else stage.began
        first = began + max(1, math.ceil(stage.config.min_epochs * self.steps_per_epoch))
        last = min(stage.planned_end - 1, self.fire_deadline(stage.index)) if stage.stayed else stage.planned_end - 1
        return (first, last) if first <= last else None

    def can_fire(self, stage: ActiveStage, step: int) -> bool:
        """Whether ``stage``'s trigger may be consulted after ``step`` optimizer steps (:meth:`fire_window`)."""
        window = self.fire_window(stage)
        return window is not None and window[0] <= step <= window[1]

    def past_deadline(self, step: int, history: History = ()) -> int | None:
        """The stage that, after ``step`` optimizer steps, stays past its planned length with no check step left
        after ``step`` in its :meth:`fire_window` (a check at ``step`` itself ran before a checkpoint there), so it
        stays to the end without consulting its trigger again; or None. A resume says so: a run begun before the
        deadline existed could still have fired later."""
        stage = self.stage_at(step, history)
        if not stage.stayed or stage.config.trigger is None:
            return None
        window = self.fire_window(stage)
        return None if window and self._checks(max(step + 1, window[0]), window[1]) else stage.index

    def fire_deadline(self, i: int) -> int:
        """The last step after which stage ``i``, past its planned length, may still fire: the run's end less the
        planned lengths of the stages after it (one without a length counts 0: it takes what is left)."""
        return self.total_steps - sum(self._length(st, self.steps_per_epoch) or 0 for st in self.stages[i + 1:])


def lr_factor(stage: ActiveStage, step: int, shape: str, warmup_steps: int, run_steps: int | None = None) -> float:
    """Base-lr factor within a stage: warm-up, then cosine / constant / step decay over the stage's planned span;
    with ``run_steps`` (train.lr_span = run) over the whole run, steps 0..run_steps, instead."""
    start, end = (0, run_steps) if run_steps else (stage.start, stage.planned_end)
    t = step - start
    span = max(1, end - start)
    if warmup_steps and t < warmup_steps:
        return (t + 1) / warmup_steps
    frac = min(1.0, t / span)
    if shape == "cosine":
        return 0.5 * (1 + math.cos(math.pi * frac))
    if shape == "step":
        return 1.0 if frac < 0.5 else 0.1 if frac < 0.75 else 0.01
    return 1.0


def check_stages(stages, groups: int, epochs: float) -> None:
    """ConfigError unless ``stages`` make a schedule for a model of ``groups`` layer groups trained ``epochs`` epochs
    (group indices, lengths, triggers): what :class:`Schedule` checks, before any work (a bench's cells, diagnose)."""
    Schedule(stages, groups, 1, max(1, math.ceil(epochs)))
