"""A time budget that the monitors of one suite share: they log when the run can afford it, not on a fixed cadence.

The budget measures the run's training time (the wall time of each training epoch, validation included, minus the
seconds the monitors spent inside it) and what each monitor's calls cost, and plans each epoch's work so that the
monitors' total, baseline and end of fit included, stays below ``share`` of the training time:

* a monitor is a candidate at the end of an epoch once its own cadence (``default_every_n_epochs``) has passed since
  its last call; it runs when the seconds spent so far plus its estimated cost, plus what the last word of every
  monitor will cost, stay within the pace of the training done so far (pay as you go);
* expensive monitors declare knobs (``budget_knobs``: attribute -> smallest value); a call runs at the largest scale
  (1, 1/2, 1/4 or the smallest values) whose estimated cost keeps to the pace;
* the ceiling pays for the minimum, the pace for anything more, and on a run of long epochs the pace pays for all:
  where one epoch's pace, over a monitor's cadence, pays for its smallest call (:meth:`Budget.long_epochs`), the
  whole suite, step-0 views, last words and per-step sampling included, keeps to the pace (a step-0 view is made only
  when the pace of the whole expected run leaves room for it, after the last words and what runs whatever the plans
  say, :meth:`Budget.run_room`); only on a run of short epochs may the smallest step-0 views and last words draw on
  the ceiling, so that a short run still gets its pictures;
* every monitor's cost is known before its first call: a monitor declares its work in sample passes (one training
  sample's forward and backward pass, ``VizCallback._budget_units``) and the budget measures the seconds per training
  sample; after a call, its measured seconds take over;
* the untrained baseline of the cheap monitors runs at the start; the expensive ones make theirs after the first
  training batches, from the initial weights, within a bounded part (``BASELINE_SHARE``) of the whole run's pace
  (at their smallest scale: what the run's pace leaves, or, on short epochs, that part of the ceiling), the last
  words set aside;
* in the last expected epoch (``max_epochs``) every monitor runs, at the scale the rest of the budget allows, and
  ``on_train_end`` gives the last word to any monitor that has not logged the final step (EarlyStopping,
  ``max_steps``), so every run ends with pictures of the trained network;
* what cannot fit even at the smallest scale is left out, and the suite says so once, at the end of ``fit``.

An epoch's plan is made once, at the first question asked in that epoch, and kept with the measured costs in the
monitors' state: the same measurements give the same schedule, and a resumed run continues it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from lightning_viz import _validate as check
from lightning_viz._hooks import isolated

__all__ = ["Budget", "budget_for"]

#: Scales tried, largest first; 0 means every knob at its smallest value.
SCALES = (1.0, 0.5, 0.25, 0.0)
#: The scale of a call whose records the final diagnosis judges but that the ceiling cannot afford even at its smallest:
#: it measures and publishes at its smallest scale and draws nothing (scalars only: ``Sink.records_only``).
LEAN = -1.0
#: On a run of long epochs, the monitors without knobs whose calls together cost at most this part of one epoch's pace
#: (half of it: 0.5 % of an epoch under the default 5 %) run at their own cadence whatever the expensive ones spent
#: (they are still charged): the filters and activation statistics of every epoch are the evidence a budget must not
#: starve. Together, not each: what runs whatever was spent must leave the pace room for the rest ...
CHEAP_SHARE = 0.5
#: ... and on a run of short epochs, each one whose call costs at most this share of an epoch.
CHEAP_EPOCH_SHARE = 0.01
#: Share of the whole run's pace (of its ceiling, at their smallest scale on a run of short epochs) that the step-0
#: views of the expensive monitors may use.
BASELINE_SHARE = 0.25
#: The pace the calls keep to, as a part of the ceiling (``share``): a fifth, 1 % of training under the default 5 %.
#: An expensive monitor's call (one with knobs) is planned and scaled within the pace; only on a run of short epochs may
#: its smallest step-0 view and its smallest last word draw on the ceiling, so that a short run still gets its pictures
#: while a run of long epochs does not spend the ceiling just because it may (the ceiling is not a target).
PACE = 0.2
#: An estimate made before a monitor's first call is this many times its declared work (sample passes) times the
#: measured seconds per training sample (a monitor's passes are smaller batches, on a model in eval mode) ...
SAFETY = 2.0
#: ... plus this, for what does not scale with the work (drawing, encoding, writing).
FIXED_SECONDS = 0.25


class Member:
    """What the budget knows of one monitor: its cadence, its knobs (full and smallest values), and its work.

    ``units(scale)`` is the work of a call at ``scale`` in *sample passes* (one training sample's forward and backward
    pass): what lets the budget estimate a call before the monitor ever ran. ``None`` where the monitor cannot say.
    """

    def __init__(
        self,
        name: str,
        cadence: int,
        knobs: Mapping[str, tuple[int, int]],
        units: Callable[[float], float | None] | None = None,
        label: str = "",
        cheap: bool = False,
        evidence: bool = False,
        fixed: float | None = None,
    ) -> None:
        self.name, self.cadence, self.knobs, self.units = name, cadence, dict(knobs), units
        #: its records are what the final diagnosis judges: the last epoch always has its call (never left out)
        self.evidence = evidence
        self.label = label or name
        #: seconds of a call that do not scale with its work, as the monitor declares them (else FIXED_SECONDS)
        self.fixed = FIXED_SECONDS if fixed is None else float(fixed)
        self.cheap = cheap  #: declared cheap (filters, activation statistics): its first call is never held back

    @property
    def smallest(self) -> float:
        """The scale of its smallest call: 0 (every knob at its smallest value), or 1 for a monitor without knobs."""
        return SCALES[-1] if self.knobs else 1.0

    def values(self, scale: float) -> dict[str, int]:
        """Each knob's value at ``scale`` (1: as configured, 0 or :data:`LEAN`: the smallest)."""
        scale = max(scale, 0.0)
        return {k: int(round(low + scale * (full - low))) for k, (full, low) in self.knobs.items()}

    def work(self, scale: float) -> float:
        """The size of a call at ``scale``: its sample passes when known, else the product of the knobs' ratios."""
        units = self.units(scale) if self.units is not None else None
        if units is not None:
            return max(float(units), 1e-9)
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
        self.told: set[str] = set()  #: the one-line messages already said in this run
        self._reset()

    def _reset(self) -> None:
        self.train_seconds = 0.0  # closed epochs
        self.samples_trained = 0  # training samples seen (the unit of the estimates)
        self.pass_seconds: float | None = None  # one sample's forward and backward pass, timed once per fit
        self._last_batch: tuple[int, int] | None = None
        self.spent: dict[str, float] = {}
        self.baseline_spent = 0.0  # of which the step-0 views
        self.step0: dict[str, float] = {}  # name -> seconds of its step-0 view
        self.hook_seconds: dict[str, float] = {}  # "Monitor.hook" -> its seconds counted in spent["hooks"]
        self.charged = 0.0  # seconds of the calls charged (the rest of `spent`: the timed pass, per-step sampling)
        self.cost: dict[str, tuple[float, float]] = {}  # name -> (seconds, work) of its last call
        self.last_epoch: dict[str, int] = {}  # name -> epochs done at its last call
        self.plans: dict[int, dict[str, float]] = {}  # epoch -> {name: scale} of the monitors that run
        self.baselines: dict[str, float | None] = {}  # name -> scale of its deferred step-0 view (None: left out)
        self.dropped: list[str] = []  # what could not fit even at the smallest scale
        self._open: tuple[int, float, float] | None = None  # (epoch, started, spent then)
        self._closed: set[int] = set()

    # ------------------------------------------------------------------------------------------ membership
    def join(self, name: str, cadence: int, knobs: Mapping[str, tuple[int, int]], **work: Any) -> None:
        """Register a monitor whose schedule the budget decides (``work``: :class:`Member`'s ``units``, ``label``)."""
        self.members[name] = Member(name, cadence, knobs, **work)

    def start_fit(self, expected_epochs: int | None, fresh: bool) -> None:
        """A fit begins: a fresh one forgets what an earlier fit measured; a resumed one keeps the loaded state."""
        self.expected_epochs = expected_epochs if expected_epochs and expected_epochs > 0 else None
        if fresh and (self.spent or self.plans or self.train_seconds or self.samples_trained):
            self._reset()
            self.told.clear()
            self.said_over = False

    # ------------------------------------------------------------------------------------------ measuring
    @property
    def spent_total(self) -> float:
        return sum(self.spent.values())

    def charge(
        self, name: str, seconds: float, scale: float = 1.0, epoch: int | None = None, once: float = 0.0
    ) -> None:
        """Record a call of ``name`` that took ``seconds`` at ``scale`` (after ``epoch`` training epochs), ``once`` of
        them for work its later calls will not repeat (a data-flow trace): charged, but not expected again."""
        self.spent[name] = self.spent.get(name, 0.0) + seconds
        self.charged += seconds
        member = self.members.get(name)
        if scale != LEAN:  # a call that drew nothing says little of what its next one will cost
            self.cost[name] = (max(seconds - once, 0.0), member.work(scale) if member else 1.0)
        if epoch is not None:
            self.last_epoch[name] = epoch
        if epoch == 0:
            self.baseline_spent += seconds
            self.step0[name] = self.step0.get(name, 0.0) + seconds

    def count_hooks(self, seconds: float, what: str = "") -> None:
        """Count ``seconds`` the monitors' Lightning hooks spent beyond their charged calls (per-batch bookkeeping):
        the suite's, at the rate of the per-step sampling (see :meth:`forced`); ``what``: the hook, for the ledger."""
        if seconds > 0:
            self.spent["hooks"] = self.spent.get("hooks", 0.0) + seconds
            self.hook_seconds[what] = self.hook_seconds.get(what, 0.0) + seconds

    def saw_batch(self, epoch: int, index: int, samples: int) -> None:
        """A training batch of ``samples`` ran (counted once, however many monitors report it)."""
        if self._last_batch != (epoch, index):
            self._last_batch = (epoch, index)
            self.samples_trained += max(0, int(samples))

    def calibrate(self, model: torch.nn.Module, images: torch.Tensor | None) -> None:
        """Time one forward and backward pass (the gradient with respect to the input, as the monitors' passes) of
        up to :data:`CALIBRATION_SAMPLES` of ``images`` through ``model``, without side effects; once per fit."""
        if self.pass_seconds is not None or images is None or not images.is_floating_point() or not len(images):
            return
        with deferred_collection():  # the process's garbage is not the pass's cost
            started = self.clock()
            x = images[:CALIBRATION_SAMPLES].detach().clone()
            seconds = 0.0
            try:
                with isolated(model, grad=True):
                    x.requires_grad_(True)
                    for _ in range(2):  # the first pass warms up (allocations, kernels); the second is timed
                        begun = self.clock()
                        out = model(x)
                        out = out if isinstance(out, torch.Tensor) else next(o for o in _flat(out) if o.requires_grad)
                        torch.autograd.grad(out.float().sum(), x)
                        if x.is_cuda:
                            torch.cuda.synchronize(x.device)
                        seconds = self.clock() - begun
            except Exception:  # a model our simple pass cannot drive: the training time per sample stands in
                seconds = 0.0
            self.pass_seconds = seconds / len(x)
            self.spent["calibration"] = self.spent.get("calibration", 0.0) + self.clock() - started

    @property
    def sample_seconds(self) -> float | None:
        """Seconds of one sample's forward and backward pass: timed (:meth:`calibrate`), else the training time per
        sample (validation included); ``None`` before the first training batch."""
        if self.pass_seconds:
            return self.pass_seconds
        if not self.samples_trained:
            return None
        epoch = self._open[0] if self._open is not None else -1
        return self.trained(epoch) / self.samples_trained

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

    def _done(self, epoch: int) -> int:
        """Epochs done, asked at the end of ``epoch`` (validation or training end): the open epoch counts as done."""
        return len(self._closed | ({epoch} if self._open is not None and self._open[0] == epoch else set()))

    def projected(self, epoch: int) -> float:
        """The run's whole training time as far as it can be foreseen: the expected epochs at the pace so far (the
        training so far when the run's length is unknown)."""
        trained = self.trained(epoch)
        if self.expected_epochs is None:
            return trained
        done = self._done(epoch)
        return max(trained, trained / done * self.expected_epochs) if done else trained

    # ------------------------------------------------------------------------------------------ the two accounts
    def long_epochs(self, epoch: int) -> bool:
        """Whether the run's epochs are long: the pace of one epoch, over a monitor's own cadence, pays for its
        smallest call, for every monitor. Then the whole suite keeps to the pace, step-0 views and last words included
        (but for a last word the pace, which set it aside, came up short of); else the smallest step-0 views and last
        words may draw on the ceiling. A monitor that never ran and declares no work (one that stepped aside) is not
        weighed; ``False`` while no cost is known."""
        done = self._done(epoch)
        if not done or not self.members:
            return False
        pace = self.share * PACE * self.trained(epoch) / done
        known = [(self.estimate(n, m.smallest), m.cadence) for n, m in self.members.items()]
        known = [(seconds, cadence) for seconds, cadence in known if seconds is not None]
        return bool(known) and all(seconds <= pace * cadence for seconds, cadence in known)

    def forced(self, epoch: int) -> float:
        """Seconds expected over the rest of the run of what runs whatever the plans say: the monitors' per-step work
        counted as it happens (their hooks' bookkeeping, the dynamics' sampling; at its rate so far) and the cheap
        monitors' calls at their cadence (at most :data:`CHEAP_SHARE` of each epoch's pace)."""
        trained, whole = self.trained(epoch), self.projected(epoch)
        done = self._done(epoch)
        if trained <= 0 or not done:
            return 0.0
        per_epoch = trained / done
        sampling = max(0.0, self.spent_total - self.charged - self.spent.get("calibration", 0.0)) / trained
        room, cheap = CHEAP_SHARE * self.share * PACE * per_epoch, 0.0
        for name, member in self.members.items():  # as :meth:`plan` picks them, each at its cadence
            cost = self.estimate(name, 1.0)
            if not member.knobs and ((cost is None and member.cheap) or (cost is not None and cost <= room)):
                room -= cost or 0.0
                cheap += (cost or 0.0) / member.cadence
        return (sampling + cheap / per_epoch) * max(0.0, whole - trained)

    def run_room(self, epoch: int) -> float:
        """Seconds the whole expected run may still spend beyond the last words set aside and what will run whatever
        the plans say (:meth:`forced`): on a run of long epochs (:meth:`long_epochs`) within its pace, else its
        ceiling."""
        reserve = self._last_word_reserve(set(), epoch)
        share = self.share * PACE if self.long_epochs(epoch) else self.share
        return share * self.projected(epoch) - self.spent_total - reserve - self.forced(epoch)

    # ------------------------------------------------------------------------------------------ deciding
    def estimate(self, name: str, scale: float) -> float | None:
        """Estimated seconds of a call of ``name`` at ``scale``: from its last call, or, before it ever ran, from
        its declared work times the measured seconds per training sample; ``None`` when neither is known."""
        member = self.members.get(name)
        if name in self.cost:
            seconds, work = self.cost[name]
            return seconds * member.work(scale) / max(work, 1e-9) if member is not None else seconds
        units = member.units(scale) if member is not None and member.units is not None else None
        if units is None or self.sample_seconds is None:
            return None
        return member.fixed + SAFETY * float(units) * self.sample_seconds

    def _scale_within(self, name: str, room: float) -> float | None:
        """The largest scale whose estimated cost fits in ``room`` seconds (``None``: not even the smallest); a
        monitor's first call runs at its smallest scale (its estimate is the least sure)."""
        member = self.members[name]
        scales = SCALES if name in self.cost else SCALES[-1:]
        for scale in scales if member.knobs else (1.0,):
            estimate = self.estimate(name, scale)
            if estimate is None:  # nothing known: the smallest call, if there is any room at all
                return (0.0 if member.knobs else 1.0) if room > 0 else None
            if estimate <= room:
                return scale
        return None

    def _paced(self, name: str, paced: float, ceiling: float | None) -> float | None:
        """The largest scale that keeps to the pace (``paced``: room in seconds), else, where a ``ceiling`` room is
        given (a step-0 view, a last word), the smallest call if it fits there; ``None``: neither."""
        scale = self._scale_within(name, paced)
        if scale is not None or ceiling is None:
            return scale
        smallest = self.members[name].smallest
        estimate = self.estimate(name, smallest)
        return (
            smallest if (estimate is None and ceiling > 0) or (estimate is not None and estimate <= ceiling) else None
        )

    def _last_word_reserve(self, skip: set[str], epoch: int) -> float:
        """Seconds set aside for the smallest last words of the members not in ``skip``: those that the run is
        expected to afford, cheapest first (a last word that cannot fit anyway must not starve the others)."""
        room = self.share * self.projected(epoch) - self.spent_total
        reserve = 0.0
        for cost in sorted(self.estimate(n, 0.0) or 0.0 for n in self.members if n not in skip):
            if reserve + cost > room:
                break
            reserve += cost
        return reserve

    def plan(self, epoch: int) -> dict[str, float]:
        """Who runs at the end of ``epoch`` (0-based), at which scale; made once per epoch and kept."""
        if epoch in self.plans:
            return self.plans[epoch]
        done = epoch + 1
        last = self.expected_epochs is not None and done >= self.expected_epochs
        trained = self.trained(epoch)
        room = self.share * trained - self.spent_total
        paced = self.share * PACE * trained - self.spent_total  # pay as you go: the pace of the training so far
        long = self.long_epochs(epoch)
        cheap_room = CHEAP_SHARE * self.share * PACE * trained / done  # for the cheap monitors of this epoch, together
        chosen: dict[str, float] = {}
        names = list(self.members)
        if last:  # the cheapest first: when not all fit, the fewest monitors are left out
            names.sort(key=lambda n: self.estimate(n, 0.0) or 0.0)
            evidence_room = room  # the final verdict's evidence has the first claim on the ceiling ...
            for name in (n for n in names if self.members[n].evidence):
                smallest = self.members[name].smallest
                cost = self.estimate(name, smallest) or 0.0
                chosen[name] = smallest if cost <= evidence_room else LEAN  # ... and draws nothing beyond it
                evidence_room -= cost if chosen[name] == smallest else 0.0
        for index, name in enumerate(names):
            member = self.members[name]
            due = done - self.last_epoch.get(name, 0) >= member.cadence
            if not (due or last):
                continue
            cost = self.estimate(name, 1.0)
            if last and member.evidence:  # the final verdict must not judge an older epoch's numbers
                room -= self.estimate(name, chosen[name]) or 0.0
                paced -= self.estimate(name, chosen[name]) or 0.0
                continue
            limit = cheap_room if long else CHEAP_EPOCH_SHARE * trained / done
            # a cheap monitor whose cost is not known yet runs on a run of long epochs; on short ones its estimate (from
            # its declared work) decides: a first call of 5 % of a short epoch is not cheap
            if not member.knobs and ((cost is None and member.cheap and long) or (cost is not None and cost <= limit)):
                chosen[name] = 1.0
                room -= cost or 0.0
                paced -= cost or 0.0
                cheap_room -= cost or 0.0
                continue
            # the smallest calls of the others come first: every monitor's last word, or, in the last epoch, the
            # smallest call of each monitor still to be planned
            reserve = self._last_word_reserve(set(names[: index + 1]) if last else {name}, epoch)
            # the expensive monitors (with knobs) keep to the pace; on a run of short epochs the others, cheap enough to
            # be the evidence of every few epochs, only to the ceiling
            short = not member.knobs and not long
            scale = self._paced(name, (room if short else paced) - reserve, room - reserve if last else None)
            if scale is None:
                if last:
                    self.drop(f"the trained network's {member.label}")
                continue
            chosen[name] = scale
            room -= self.estimate(name, scale) or 0.0
            paced -= self.estimate(name, scale) or 0.0
        self.plans[epoch] = chosen
        return chosen

    def baseline(self, name: str, epoch: int) -> float | None:
        """Scale of the step-0 view of ``name``, made after the first training batches (``None``: left out).

        Beyond its smallest scale it may use a bounded part (:data:`BASELINE_SHARE`) of the pace of the whole expected
        run; at its smallest scale, on a run of long epochs what the pace of the whole run leaves (:meth:`run_room`), on
        a run of short epochs the same bounded part of the ceiling; the last words of every monitor set aside. Decided
        once and kept.
        """
        if name in self.baselines:
            return self.baselines[name]
        member = self.members.get(name)
        whole, left = self.projected(epoch), self.run_room(epoch)
        more = min(BASELINE_SHARE * self.share * PACE * whole - self.baseline_spent, left)
        if not self.long_epochs(epoch):  # the smallest step-0 view may draw on the ceiling
            left = min(BASELINE_SHARE * self.share * whole - self.baseline_spent, left)
        scale = self._paced(name, more, left) if member is not None else 1.0
        if scale is None and member is not None:
            self.drop(f"the untrained network's {member.label}")
        self.baselines[name] = scale
        return scale

    def last_word(self, name: str, epoch: int) -> float | None:
        """Scale of the end-of-fit call of ``name``: what the rest of the budget allows (``None``: left out).

        A member whose records the final diagnosis judges (``evidence``) is never left out, so that the verdict is not
        drawn from an older epoch's numbers (its cost is still counted): where not even its smallest call fits, it
        measures and draws nothing (:data:`LEAN`)."""
        trained = self.trained(epoch)
        if name not in self.members:
            return 1.0
        scale = self._paced(
            name, self.share * PACE * trained - self.spent_total, self.share * trained - self.spent_total
        )
        if scale is None and self.members[name].evidence:
            scale = LEAN
        what = f"the trained network's {self.members[name].label}"
        if scale is None:
            self.drop(what)
        elif what in self.dropped:  # the last epoch's plan left it out, but it fits now: it is not left out
            self.dropped.remove(what)
        return scale

    def affords(self, seconds: float, epoch: int, what: str) -> bool:
        """Whether the whole run is expected to afford ``seconds`` more, the last words set aside (if not, ``what``
        is said to be left out)."""
        room = self.run_room(epoch)
        if room < seconds:
            self.drop(what)
        return room >= seconds

    def dropped_text(self) -> str:
        """What was left out, in one phrase: the views of one network together ("the untrained network's saliency,
        embedding and exemplars; the trained network's feature visualisation; ...")."""
        groups: dict[str, list[str]] = {}
        for what in self.dropped:
            owner, _, view = what.partition("'s ")
            key, item = (owner, view) if owner.endswith("network") and view else (what, "")
            groups.setdefault(key, []).append(item)
        parts = []
        for key, items in groups.items():
            items = [i for i in items if i]
            listed = ", ".join(items[:-1]) + f" and {items[-1]}" if len(items) > 1 else "".join(items)
            parts.append(f"{key}'s {listed}" if listed else key)
        return "; ".join(parts)

    def drop(self, what: str) -> None:
        if what not in self.dropped:
            self.dropped.append(what)

    def tell_once(self, key: str) -> bool:
        """Whether the one-line message ``key`` is still to be said in this run (and mark it said)."""
        if key in self.told:
            return False
        self.told.add(key)
        return True

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "share": self.share,
            "train_seconds": self.train_seconds,
            "samples_trained": self.samples_trained,
            "pass_seconds": self.pass_seconds,
            "spent": dict(self.spent),
            "baseline_spent": self.baseline_spent,
            "step0": dict(self.step0),
            "charged": self.charged,
            "cost": {k: list(v) for k, v in self.cost.items()},
            "last_epoch": dict(self.last_epoch),
            "plans": {int(k): dict(v) for k, v in self.plans.items()},
            "baselines": dict(self.baselines),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._reset()
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.samples_trained = int(state.get("samples_trained", 0))
        self.pass_seconds = state.get("pass_seconds")
        self.spent = {k: float(v) for k, v in state.get("spent", {}).items()}
        self.baseline_spent = float(state.get("baseline_spent", 0.0))
        self.step0 = {k: float(v) for k, v in state.get("step0", {}).items()}
        self.charged = float(state.get("charged", 0.0))
        self.cost = {k: (float(v[0]), float(v[1])) for k, v in state.get("cost", {}).items()}
        self.last_epoch = {k: int(v) for k, v in state.get("last_epoch", {}).items()}
        self.plans = {int(k): dict(v) for k, v in state.get("plans", {}).items()}
        self.baselines = dict(state.get("baselines", {}))
        self._closed = set(range(max(self.plans, default=-1) + 1))


@contextlib.contextmanager
def deferred_collection() -> Iterator[None]:
    """Hold Python's cyclic garbage collection for the body (a monitor's call, the timed pass), and let it run after.

    A full collection walks every object of the process, most of them the training's (Lightning, the data loader,
    the autograd engine), and costs 0.1-0.3 s on a process that holds a model; Python runs it in whichever call
    happens to cross the allocation threshold. Caught inside a 0.06 s call of ours, it made that call look five
    times its cost, and on a short run the budget then left out the trained network's pictures. Deferred, the
    collection runs where it would have run anyway, in training; our own garbage is freed by reference counting.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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


#: Samples of the one timed forward and backward pass (:meth:`Budget.calibrate`).
CALIBRATION_SAMPLES = 16


def _flat(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (a tuple, list or dict of them)."""
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, list | tuple) else [out]
    return [v for v in values if isinstance(v, torch.Tensor)]


#: CPU seconds of a projection child's first UMAP / t-SNE map (start, numba compilation, projection), one core.
CHILD_SECONDS = {"umap": 15.0, "tsne": 10.0, "pca": 0.0}


def projection_within(monitor: Any, model: Any, trainer: Any) -> None:
    """Choose the embedding map's method before the projection child starts: under a budget, on a model trained on
    the CPU, the child competes with training, so a run that cannot afford its UMAP / t-SNE gets PCA (said once);
    elsewhere the child has a CPU core to itself."""
    budget, client = monitor._budget, monitor._projections
    if not monitor._budget_managed or budget is None or client.running or client.method == "pca":
        return
    on_cpu = next((p.device.type for p in model.parameters()), "cpu") == "cpu"
    what = f"the embedding's {client.method.upper()} map (PCA instead)"
    if on_cpu and not budget.affords(CHILD_SECONDS.get(client.method, 0.0), trainer.current_epoch, what):
        client.method = "pca"


#: Work expected to take longer than this (seconds) says what it is doing, in one line.
PROGRESS_SECONDS = 2.0


def say(trainer: Any, line: str) -> None:
    """Print ``line`` once on rank zero without breaking Lightning's progress bar (above a tqdm bar, through a rich
    bar's console); quiet (the ``lightning_viz`` log's info level) when the Trainer shows no progress bar."""
    if not getattr(trainer, "is_global_zero", True):
        return
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is None or not getattr(bar, "is_enabled", True):
        logging.getLogger("lightning_viz").info(line)
        return
    if any(cls.__name__ == "TQDMProgressBar" for cls in type(bar).__mro__):
        from tqdm import tqdm  # a bar may be open or not (before training starts): tqdm.write keeps any open one

        tqdm.write(line, file=sys.stdout)
    else:
        bar.print(line)
