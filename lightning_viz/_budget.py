"""A time budget that the monitors of one suite share: they log when the run can afford it, not on a fixed cadence.

The budget measures the run's training time (the wall time of each training epoch, validation included, minus the
seconds the monitors spent inside it) and what each monitor's calls cost, and plans each epoch's work so that the
monitors' total, baseline and end of fit included, stays below ``share`` of the training time:

* a monitor is a candidate at the end of an epoch once its own cadence (``default_every_n_epochs``) has passed since
  its last call; it runs when the seconds spent so far plus its estimated cost, plus what the last word of every
  monitor will cost, stay within ``share`` of the training done so far (pay as you go);
* expensive monitors declare knobs (``budget_knobs``: attribute -> smallest value); a call runs at the largest scale
  (1, 1/2, 1/4 or the smallest values) whose estimated cost fits, and a monitor's first call runs at the smallest;
* in the last expected epoch (``max_epochs``) every monitor runs, at the scale the rest of the budget allows, and
  ``on_train_end`` gives the last word to any monitor that has not logged the final step (EarlyStopping,
  ``max_steps``), so every run ends with pictures of the trained network;
* the untrained baseline runs for the cheap monitors only (those without knobs): before the first step nothing
  says what the run will cost.

An epoch's plan is made once, at the first question asked in that epoch, and kept with the measured costs in the
monitors' state: the same measurements give the same schedule, and a resumed run continues it.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from lightning_viz import _validate as check

__all__ = ["Budget", "budget_for"]

#: Scales tried, largest first; 0 means every knob at its smallest value.
SCALES = (1.0, 0.5, 0.25, 0.0)
#: A monitor without knobs whose call costs at most this share of one training epoch runs at its own cadence whatever
#: the expensive ones spent (it is still charged): the filters and activation statistics of every epoch are the
#: evidence a budget must not starve.
CHEAP_SHARE = 0.01


class Member:
    """What the budget knows of one monitor: its cadence, its knobs (full and smallest values)."""

    def __init__(self, name: str, cadence: int, knobs: Mapping[str, tuple[int, int]]) -> None:
        self.name, self.cadence, self.knobs = name, cadence, dict(knobs)

    def values(self, scale: float) -> dict[str, int]:
        """Each knob's value at ``scale`` (1: as configured, 0: the smallest)."""
        return {k: int(round(low + scale * (full - low))) for k, (full, low) in self.knobs.items()}

    def work(self, scale: float) -> float:
        """The share of a full call's work at ``scale`` (product of the knobs' ratios)."""
        share = 1.0
        for key, value in self.values(scale).items():
            share *= value / max(1, self.knobs[key][0])
        return share


class Budget:
    """A share of the run's training time that the monitors of one suite may spend together.

    Args:
        share: the ceiling, as a share of the training time (0.05: the monitors cost at most 5 % on top of it).
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, share: float = 0.05, *, clock: Callable[[], float] = time.perf_counter) -> None:
        check.fraction("budget", share)
        self.share = float(share)
        self.clock = clock
        self.members: dict[str, Member] = {}
        self.expected_epochs: int | None = None
        self.said_over = False  #: whether the suite already said it went over the budget
        self._reset()

    def _reset(self) -> None:
        self.train_seconds = 0.0  # closed epochs
        self.spent: dict[str, float] = {}
        self.cost: dict[str, tuple[float, float]] = {}  # name -> (seconds, work share) of its last call
        self.last_epoch: dict[str, int] = {}  # name -> epochs done at its last call
        self.plans: dict[int, dict[str, float]] = {}  # epoch -> {name: scale} of the monitors that run
        self._open: tuple[int, float, float] | None = None  # (epoch, started, spent then)
        self._closed: set[int] = set()

    # ------------------------------------------------------------------------------------------ membership
    def join(self, name: str, cadence: int, knobs: Mapping[str, tuple[int, int]]) -> None:
        """Register a monitor whose schedule the budget decides."""
        self.members[name] = Member(name, cadence, knobs)

    def start_fit(self, expected_epochs: int | None, fresh: bool) -> None:
        """A fit begins: a fresh one forgets what an earlier fit measured; a resumed one keeps the loaded state."""
        self.expected_epochs = expected_epochs if expected_epochs and expected_epochs > 0 else None
        if fresh and (self.spent or self.plans or self.train_seconds):
            self._reset()

    # ------------------------------------------------------------------------------------------ measuring
    @property
    def spent_total(self) -> float:
        return sum(self.spent.values())

    def charge(self, name: str, seconds: float, scale: float = 1.0, epoch: int | None = None) -> None:
        """Record a call of ``name`` that took ``seconds`` at ``scale`` (after ``epoch`` training epochs)."""
        self.spent[name] = self.spent.get(name, 0.0) + seconds
        member = self.members.get(name)
        self.cost[name] = (seconds, member.work(scale) if member else 1.0)
        if epoch is not None:
            self.last_epoch[name] = epoch

    def epoch_start(self, epoch: int) -> None:
        if self._open is None or self._open[0] != epoch:
            self._open = (epoch, self.clock(), self.spent_total)

    def epoch_end(self, epoch: int) -> None:
        """Close the training window of ``epoch`` (the first call counts; later ones change nothing)."""
        if self._open is not None and self._open[0] == epoch and epoch not in self._closed:
            self._closed.add(epoch)
            self.train_seconds += self._window()

    def _window(self) -> float:
        if self._open is None:
            return 0.0
        _, started, spent_then = self._open
        return max(0.0, self.clock() - started - (self.spent_total - spent_then))

    def trained(self, epoch: int) -> float:
        """Training seconds so far: the closed epochs, and the open one up to now."""
        open_part = self._window() if self._open is not None and epoch not in self._closed else 0.0
        return self.train_seconds + open_part

    # ------------------------------------------------------------------------------------------ deciding
    def estimate(self, name: str, scale: float) -> float | None:
        """Estimated seconds of a call of ``name`` at ``scale``; ``None`` before its first call."""
        if name not in self.cost:
            return None
        seconds, work = self.cost[name]
        return seconds * self.members[name].work(scale) / max(work, 1e-9) if name in self.members else seconds

    def _scale_within(self, name: str, room: float) -> float | None:
        """The largest scale whose estimated cost fits in ``room`` seconds (the smallest when nothing is known)."""
        member = self.members[name]
        if self.estimate(name, 1.0) is None:  # never ran: its first call runs at the smallest scale, if any room
            return (0.0 if member.knobs else 1.0) if room > 0 else None
        for scale in SCALES if member.knobs else (1.0,):
            estimate = self.estimate(name, scale)
            if estimate is not None and estimate <= room:
                return scale
        return None

    def _last_word_reserve(self, skip: set[str]) -> float:
        return sum(self.estimate(n, 0.0) or 0.0 for n in self.members if n not in skip)

    def plan(self, epoch: int) -> dict[str, float]:
        """Who runs at the end of ``epoch`` (0-based), at which scale; made once per epoch and kept."""
        if epoch in self.plans:
            return self.plans[epoch]
        done = epoch + 1
        last = self.expected_epochs is not None and done >= self.expected_epochs
        room = self.share * self.trained(epoch) - self.spent_total
        per_epoch = self.trained(epoch) / done
        chosen: dict[str, float] = {}
        for name, member in self.members.items():
            due = done - self.last_epoch.get(name, 0) >= member.cadence
            if not (due or last):
                continue
            cost = self.estimate(name, 1.0)
            if not member.knobs and cost is not None and cost <= CHEAP_SHARE * per_epoch:
                chosen[name] = 1.0
                room -= cost
                continue
            reserve = 0.0 if last else self._last_word_reserve({name})
            scale = self._scale_within(name, room - reserve)
            if scale is None:
                if not last:
                    continue
                scale = 0.0  # the last word is never dropped: it runs at the smallest scale
            chosen[name] = scale
            room -= self.estimate(name, scale) or 0.0
        self.plans[epoch] = chosen
        return chosen

    def last_word(self, name: str, epoch: int) -> float:
        """Scale of the end-of-fit call of ``name``: what the rest of the budget allows, at least the smallest."""
        room = self.share * self.trained(epoch) - self.spent_total
        scale = self._scale_within(name, room) if name in self.members else 1.0
        return 0.0 if scale is None else scale

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "share": self.share,
            "train_seconds": self.train_seconds,
            "spent": dict(self.spent),
            "cost": {k: list(v) for k, v in self.cost.items()},
            "last_epoch": dict(self.last_epoch),
            "plans": {int(k): dict(v) for k, v in self.plans.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._reset()
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.spent = {k: float(v) for k, v in state.get("spent", {}).items()}
        self.cost = {k: (float(v[0]), float(v[1])) for k, v in state.get("cost", {}).items()}
        self.last_epoch = {k: int(v) for k, v in state.get("last_epoch", {}).items()}
        self.plans = {int(k): dict(v) for k, v in state.get("plans", {}).items()}
        self._closed = set(range(max(self.plans, default=-1) + 1))


_BUDGETS: weakref.WeakKeyDictionary[Any, Budget] = weakref.WeakKeyDictionary()


def budget_for(trainer: Any, share: float) -> Budget:
    """The :class:`Budget` of ``trainer`` for monitors built by hand with ``budget=<share>`` (one per Trainer; the
    smallest share asked for wins)."""
    budget = _BUDGETS.get(trainer)
    if budget is None:
        budget = _BUDGETS[trainer] = Budget(share)
    budget.share = min(budget.share, share)
    return budget


def expected_epochs(trainer: Any) -> int | None:
    """How many training epochs the fit will run if nothing stops it early (``None``: unbounded)."""
    max_epochs = getattr(trainer, "max_epochs", None)
    if max_epochs is not None and max_epochs > 0:
        epochs = int(max_epochs)
    else:
        epochs = None
    max_steps = getattr(trainer, "max_steps", -1)
    batches = getattr(trainer, "num_training_batches", None)
    if max_steps is not None and max_steps > 0 and isinstance(batches, int | float) and 0 < batches < math.inf:
        by_steps = math.ceil(max_steps / batches)
        epochs = by_steps if epochs is None else min(epochs, by_steps)
    return epochs
