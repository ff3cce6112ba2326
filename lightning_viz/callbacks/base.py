"""The core every lightning_viz monitor stands on: schedule, sink, isolation, failure handling, cost, state."""

from __future__ import annotations

import contextlib
import copy
import functools
import time
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import torch
from torch import nn
from typing_extensions import override

from lightning_viz import _data, _layers
from lightning_viz import _validate as check
from lightning_viz._budget import (
    LEAN,
    PROGRESS_SECONDS,
    Budget,
    budget_for,
    deferred_collection,
    expected_epochs,
    say,
)
from lightning_viz._compat import CALLBACK_CLASSES, rank_zero_warn
from lightning_viz._hooks import isolated, silenced_logging
from lightning_viz._inputs import FIX, InputFn, input_hint, model_inputs, resolve_input_fn
from lightning_viz._layers import NotApplicableError
from lightning_viz.records import Record, RecordBus, bus_for
from lightning_viz.sinks import NO_IMAGE_LOGGER_MESSAGE, NO_LOGGER_MESSAGE, Sink, takes_images

if TYPE_CHECKING:  # annotations only: importing Lightning here would pick one namespace for the user
    import lightning.pytorch as pl

OnError = Literal["warn", "raise"]


class VizCallback(*CALLBACK_CLASSES):  # type: ignore[misc]
    """Base class of every lightning_viz monitor.

    It inherits from the ``Callback`` class of every installed Lightning namespace (``lightning.pytorch`` and
    ``pytorch_lightning``), so a Trainer of either accepts it.

    Subclasses set :attr:`monitor_name` and implement :meth:`_log`; the base class decides *when* (``every_n_epochs``
    after a training epoch, plus a baseline at the start of a fresh fit), isolates the work from training, times it,
    and turns run-time failures into one warning each.

    Args:
        every_n_epochs: log after every n-th training epoch (``None``: the monitor's own default).
        on_error: ``"warn"`` (default) warns once and switches the failing visualization off, so training goes on;
            ``"raise"`` re-raises (for tests and debugging).
        log_baseline: log once at the start of a fresh fit (step 0, the untrained state).
        seed: seed of the private ``torch.Generator`` used for any randomness of ours.
        max_overhead: warn once when one call costs more than this share of the training epoch's time.
        max_image_side: images are downsized to at most this many pixels per side (default: the monitor's own).
        input_fn: how a batch becomes the model's input: ``input_fn(batch) -> (inputs, target)``, where ``inputs``
            is a tensor, or a tuple ``(image, *more)`` for a model called as ``model(image, *more)``, and ``target``
            the class labels or ``None``. Default: a ``viz_input(batch)`` method of the LightningModule if it has
            one, else the rule of :func:`lightning_viz._inputs.default_input_fn` (tensors, ``(x, y)``,
            ``(path, image, label)``, dicts with an ``"image"``/``"pixel_values"``/``"x"``/``"input"`` key).
        budget: a :class:`~lightning_viz._budget.Budget` shared with other monitors (as ``default_suite`` makes), or a
            share of the training time (monitors built by hand with the same Trainer then share one budget). Without
            an explicit ``every_n_epochs`` the budget decides when the monitor logs and how much work a call does
            (``budget_knobs``), and the monitor logs the trained network once more at the end of ``fit``. With an
            explicit ``every_n_epochs`` the cadence is kept exactly; the budget only counts the cost.
    """

    monitor_name: ClassVar[str] = "viz"
    default_every_n_epochs: ClassVar[int] = 1
    #: Whether :meth:`_log` needs autograd (gradient-based methods).
    needs_grad: ClassVar[bool] = False
    #: Calls shorter than this never trigger the overhead warning (tiny epochs would make any cost look large).
    overhead_floor_seconds: ClassVar[float] = 0.5
    #: Record types (:mod:`lightning_viz.records`) this monitor publishes; announced on the bus at ``setup``.
    publishes: ClassVar[tuple[type[Record], ...]] = ()
    #: Default of ``max_image_side`` for this monitor.
    default_max_image_side: ClassVar[int] = 2048
    #: Attributes a budget may scale down for a cheaper call, each with its smallest value (expensive monitors only:
    #: a monitor with knobs has no step-0 baseline under a budget, since nothing yet says the run can afford it).
    budget_knobs: ClassVar[dict[str, int]] = {}
    #: Whether the records of this monitor are evidence the final diagnosis judges: its end-of-fit call is then never
    #: left out by a budget (a verdict from an older epoch's numbers would be stated as current).
    diagnosis_evidence: ClassVar[bool] = False
    #: Whether the untrained baseline is cheap enough to run under a budget before anything is measured.
    budget_baseline: ClassVar[bool] = True
    #: Seconds of a call that do not scale with its work (drawing, encoding, writing), for the budget's estimate
    #: before the first call (``None``: the budget's default, ``_budget.FIXED_SECONDS``).
    budget_fixed_seconds: ClassVar[float | None] = None
    #: The visualization (a ``_guard`` key) that alone needs image samples, when the rest of the monitor works on any
    #: input (``None``: the whole monitor needs images and steps aside when the inputs are not images).
    image_part: ClassVar[str | None] = None
    #: Whether everything this monitor makes is images or text: without a logger that takes them it does nothing.
    images_only: ClassVar[bool] = False
    #: What the monitor shows, in words (progress lines, the budget's message).
    label: ClassVar[str] = ""

    def __init__(
        self,
        *,
        every_n_epochs: int | None = None,
        on_error: OnError = "warn",
        log_baseline: bool = True,
        seed: int = 0,
        max_overhead: float = 0.1,
        max_image_side: int | None = None,
        budget: Budget | float | None = None,
        input_fn: InputFn | None = None,
    ) -> None:
        check.positive_int("every_n_epochs", every_n_epochs, allow_none=True)
        check.callable_or_none("input_fn", input_fn)
        self.input_fn = input_fn
        if not isinstance(budget, Budget) and budget is not None:
            check.fraction("budget", budget)
        check.choice("on_error", on_error, get_args(OnError))
        check.boolean("log_baseline", log_baseline)
        check.integer("seed", seed)
        check.fraction("max_overhead", max_overhead, high=float("inf"))
        check.positive_int("max_image_side", max_image_side, allow_none=True)
        self.max_image_side = max_image_side if max_image_side is not None else self.default_max_image_side
        self.every_n_epochs = every_n_epochs if every_n_epochs is not None else self.default_every_n_epochs
        self.budget = budget
        self._explicit_cadence = every_n_epochs is not None
        self._budget: Budget | None = budget if isinstance(budget, Budget) else None
        self._scale = 1.0
        self._last_word_scale: float | None = None
        self._baseline_scale: float | None = None
        self.on_error = on_error
        self.log_baseline = log_baseline
        self.seed = seed
        self.max_overhead = float(max_overhead)
        self._sink: Sink | None = None
        self._bus = RecordBus()  # replaced by the Trainer's bus at setup
        self._active = True
        self._disabled: dict[str, str] = {}
        self._warned: set[str] = set()
        self._last_step: int | None = None
        self._epoch_started_at: float | None = None
        self._seconds: list[float] = []
        self._inside_seconds = 0.0  # spent inside the Trainer's own passes (hooks) since the last call; charged with it
        self._samples = _data.SampleBank(0, seed)
        self._no_images = False  # the batches hold no images (see `_check_inputs`)
        self._take_training_batches = False
        self._deferred: bool | str = False  # True: the step-0 view waits for data; "running": it is being made
        self._fresh_state: dict[str, Any] | None = None  # the per-run state as constructed (see `_start_fit`)
        self._fit_trainer: Any = None  # weak reference to the Trainer whose fit this monitor watches

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _time_hooks(cls)  # every monitor's Lightning hooks count towards the suite's share (see `_timed_hook`)

    # ----------------------------------------------------------------------------------------------- Lightning API
    @property
    @override
    def state_key(self) -> str:
        # What identifies the monitor (its class and targets), never how often it runs: a resumed run with another
        # `every_n_epochs` must still find its saved state.
        return self._generate_state_key(**self._state_key_fields())

    def _state_key_fields(self) -> dict[str, Any]:
        return {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            self._active = False
            return  # the monitors log during fit only; validate/test/predict need nothing of ours
        self._start_fit(trainer)
        self._active = True
        if getattr(trainer, "fast_dev_run", False):
            _data.tell_once(  # one warning per run, by the suite, not one per monitor
                trainer,
                "fast_dev_run",
                "lightning_viz: `fast_dev_run` replaces the Trainer's loggers with a dummy; nothing is logged.",
            )
            self._active = False
            return
        if not trainer.loggers:
            raise ValueError(NO_LOGGER_MESSAGE)
        if not takes_images(trainer.loggers):
            _data.tell_once(trainer, "no_tensorboard", f"lightning_viz: {NO_IMAGE_LOGGER_MESSAGE}")
            if self.images_only:  # its output could not be written: the work is not done at all
                self._active = False
                return
        self._sink = Sink.for_trainer(trainer, max_image_side=self.max_image_side)
        self._bus = bus_for(trainer)
        for kind in self.publishes:
            self._bus.announce(kind, self.monitor_name)
        try:
            self._resolve(trainer, pl_module)
        except NotApplicableError as exc:  # only a default target can be missing: a default suite never stops a run
            _data.step_aside(trainer, type(self).__name__, str(exc))
            self._active = False
        self._join_budget(trainer)
        self._start_taking(trainer, pl_module)

    def _join_budget(self, trainer: Any) -> None:
        if self.budget is None:
            return
        if self._budget is None or not isinstance(self.budget, Budget):
            self._budget = budget_for(trainer, float(self.budget))
        self._budget.start_fit(None, fresh=True)  # a resumed run restores the measured state after setup
        if self._budget_managed:
            knobs = {
                k: (int(getattr(self, k)), min(low, int(getattr(self, k)))) for k, low in self.budget_knobs.items()
            }
            label = self.label or self.monitor_name
            cheap = not self._expensive
            self._budget.join(
                self._budget_key,
                self.every_n_epochs,
                knobs,
                units=self._units_at,
                label=label,
                cheap=cheap,
                evidence=self.diagnosis_evidence,
                fixed=self.budget_fixed_seconds,
            )

    def _units_at(self, scale: float) -> float | None:
        """The work of a call at ``scale`` in sample passes (see :meth:`_budget_units`)."""
        with self._scaled(scale):
            return self._budget_units()

    def _budget_units(self) -> float | None:
        """The work of one call with the current settings, in *sample passes* (one training sample's forward and
        backward pass; a forward alone is about a third of one): the budget's estimate of a call before it ever ran.
        ``None``: cheap, or unknown until measured."""
        return None

    @property
    def _expensive(self) -> bool:
        """Whether the budget defers this monitor's step-0 view until it knows what the run can afford."""
        return bool(self.budget_knobs) or not self.budget_baseline

    @property
    def _budget_managed(self) -> bool:
        """Whether the budget decides this monitor's schedule (a budget, and no explicit ``every_n_epochs``)."""
        return self._budget is not None and not self._explicit_cadence

    @property
    def _budget_key(self) -> str:
        return self.state_key

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _data.say_steps_aside(trainer, final=False)  # what is known by now, in one line (else after the 1st epoch)
        # The baseline shows the untrained state; a resumed run (global_step > 0) already has it.
        if self._budget is not None:
            self._budget.expected_epochs = expected_epochs(trainer)
        if self.log_baseline and trainer.global_step == 0 and self._last_step is None:
            if self._budget_managed and self._expensive:
                # before the first step nothing says what the run can afford: the step-0 view is made after the
                # first training batches (from the initial weights, kept now), at the scale the budget allows
                _data.keep_initial_weights(trainer, pl_module)
                self._deferred = True
            elif self._has_data():
                self._run(trainer, pl_module, epochs_done=0)
            else:
                self._defer_baseline(trainer, pl_module)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_started_at = time.perf_counter()
        if self._budget is not None and not trainer.sanity_checking:
            self._budget.epoch_start(trainer.current_epoch)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_budget_epoch(trainer)
        self._end_training_pass(trainer, pl_module)
        if self._is_log_epoch(trainer) and self._runs_after_train_epoch():
            self._run(trainer, pl_module, epochs_done=trainer.current_epoch + 1)

    def _close_budget_epoch(self, trainer: Any) -> None:
        """Mark the end of the epoch's training time (subclasses overriding ``on_train_epoch_end`` call this)."""
        if self._budget is not None:
            self._budget.epoch_end(trainer.current_epoch)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The last word: a budgeted monitor that has not logged the final state logs it once, within the budget.
        if self._budget_managed and self._budget is not None and self._wants_last_word(trainer):
            self._budget.epoch_end(trainer.current_epoch)
            self._last_word_scale = self._budget.last_word(self._budget_key, trainer.current_epoch)
            if self._last_word_scale is None:
                return  # it cannot fit even at the smallest scale: said once, at the end of fit
            try:
                self._run(trainer, pl_module, epochs_done=trainer.current_epoch)
            finally:
                self._last_word_scale = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        budget = self._budget
        if budget is not None and budget.dropped and budget.tell_once("dropped"):
            say(
                trainer,
                f"lightning_viz: to stay within its budget ({budget.share:.0%} of the training time) the suite left "
                f"out {budget.dropped_text()}. {'Raise `budget`, or pass' if budget.share < 1 else 'Pass'} "
                "`budget=None` (each monitor's fixed cadence) to see them.",
            )

    def _wants_last_word(self, trainer: Any) -> bool:
        step = int(trainer.global_step)
        return self._active and step > 0 and (self._last_step is None or self._last_step < step)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning calls no `teardown` of ours after an exception (or a KeyboardInterrupt): this is the only chance
        # to stop what we started. It must not raise: the callbacks after this one would not be called, and the
        # user would see our error instead of theirs.
        if not self._watching(trainer):
            return  # e.g. a second Trainer refused at setup: the fit this instance watches goes on
        for step in (self._abort, lambda: self._release(pl_module)):
            try:
                step()
            except Exception as exc:
                rank_zero_warn(f"{type(self).__name__}: cleaning up after the failed fit raised {exc!r}.")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._watching(trainer):
            self._release(pl_module)

    # ------------------------------------------------------------------ one fit, one history (DESIGN rule 13)
    #: Private attributes that are not per-run state: shared with other monitors, or replaced at every setup.
    _kept_across_fits: ClassVar[frozenset[str]] = frozenset(
        {"_budget", "_bus", "_sink", "_fresh_state", "_fit_trainer", "_explicit_cadence"}
    )

    def _per_run_state(self) -> dict[str, Any]:
        """What one fit accumulates: the private attributes (schedule, histories, initial weights, samples, warnings,
        switched-off parts) and probes chosen from the data (a new run, maybe on other data, chooses again)."""
        state = {k: v for k, v in vars(self).items() if k.startswith("_") and k not in self._kept_across_fits}
        probes = getattr(self, "probes", None)
        if probes is not None and getattr(probes, "_auto", None):
            state["probes"] = probes
        return state

    def _watching(self, trainer: Any) -> bool:
        """Whether ``trainer`` runs the fit this instance watches (or none was started: nothing to tell apart)."""
        return self._fit_trainer is None or self._fit_trainer() in (trainer, None)

    def __getstate__(self) -> dict[str, Any]:
        # A process that `ddp_spawn` starts gets a pickled copy: the weak reference to a Trainer stays behind.
        return {**self.__dict__, "_fit_trainer": None}

    def _start_fit(self, trainer: Any) -> None:
        """A fit begins. The same instances handed to another Trainer (a sweep) start from the state they were built
        with: nothing of an earlier fit (last step, histories, initial weights, probes) leaks into this one. A
        checkpoint restored after ``setup`` then brings back what a resumed run saved. The same Trainer fitting
        again continues its run. Watching two fits at once is refused."""
        previous = self._fit_trainer() if self._fit_trainer is not None else None
        if previous is not None and previous is not trainer and _is_fitting(previous):
            raise RuntimeError(
                f"{type(self).__name__} is already watching the fit of another Trainer that is still running; one "
                "monitor instance watches one fit at a time. Make new monitors for the second Trainer (e.g. call "
                "`default_suite()` again)."
            )
        if self._fresh_state is None:  # the first fit of this instance: keep the state it was built with
            self._fresh_state = copy.deepcopy(self._per_run_state())
        elif previous is not trainer:
            for key, value in copy.deepcopy(self._fresh_state).items():  # one deepcopy: shared references stay shared
                setattr(self, key, value)
        self._fit_trainer = weakref.ref(trainer)
        _data.forget_initial_weights(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        budget = {"budget": self._budget.state_dict()} if self._budget is not None else {}
        return {"last_step": self._last_step, "disabled": dict(self._disabled), **budget, **self._extra_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step")
        self._disabled = dict(state_dict.get("disabled", {}))
        if self._budget is not None and state_dict.get("budget"):
            self._budget.load_state_dict(state_dict["budget"])
        self._load_extra_state(state_dict)

    # ------------------------------------------------------------------------------------------- for subclasses
    def _resolve(self, trainer: Any, pl_module: nn.Module) -> None:
        """Check the configuration against the model (raise ``ValueError`` naming the argument)."""

    def _log(self, trainer: Any, pl_module: nn.Module, step: int, epochs_done: int) -> None:
        """Compute and write this monitor's output for ``step`` (``epochs_done`` training epochs completed)."""
        raise NotImplementedError

    def _runs_after_train_epoch(self) -> bool:
        return True

    def _release(self, pl_module: Any) -> None:
        """Remove anything long-lived (hooks); called from ``teardown`` and ``on_exception``."""

    def _abort(self) -> None:
        """The run is failing: stop background work at once, without waiting (before ``_release``)."""

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---------------------------------------------------------------------------------------------------- helpers
    def _is_log_epoch(self, trainer: Any) -> bool:
        if trainer.sanity_checking:
            return False
        if self._budget_managed and self._budget is not None:
            return self._budget_key in self._budget.plan(trainer.current_epoch)
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _call_scale(self, epochs_done: int) -> float:
        """The scale of this call: the last word's, the epoch plan's, or 1 (full) for the baseline."""
        if not self._budget_managed or self._budget is None:
            return 1.0
        if self._last_word_scale is not None:
            return self._last_word_scale
        if epochs_done == 0:
            return self._baseline_scale if self._deferred == "running" and self._baseline_scale is not None else 1.0
        return self._budget.plans.get(epochs_done - 1, {}).get(self._budget_key, 1.0)

    @contextlib.contextmanager
    def _scaled(self, scale: float) -> Iterator[None]:
        """Set the ``budget_knobs`` to their values at ``scale`` for one call, and back afterwards."""
        member = self._budget.members.get(self._budget_key) if self._budget is not None else None
        values = member.values(scale) if member is not None and scale < 1.0 else {}
        saved = {key: getattr(self, key) for key in values}
        try:
            for key, value in values.items():
                setattr(self, key, value)
            yield
        finally:
            for key, value in saved.items():
                setattr(self, key, value)

    def _generator(self, device: torch.device | str = "cpu", offset: int = 0) -> torch.Generator:
        """A private generator, seeded from ``seed``: our randomness never draws from the global streams."""
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed + offset)
        return gen

    def _publish(self, record: Record) -> None:
        """Hand a measurement to the Trainer's record bus (see :mod:`lightning_viz.records`)."""
        self._bus.publish(record)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _guard(self, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one visualization; on failure warn once and switch it off (``on_error="warn"``), or re-raise.

        Returns ``fn``'s result, ``None`` when it is switched off, ``False`` when it failed just now.
        """
        if key in self._disabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if self.on_error == "raise":
                raise
            reason = f"{type(exc).__name__}: {exc}"
            self._disabled[key] = reason
            hint = input_hint(exc)
            if hint is not None:  # the model cannot take our inputs: one line for all monitors, with the fix
                _data.tell_once(self._bus, "input hint", f"lightning_viz: {hint} {FIX} ({reason})")
                return False
            self._warn_once(
                f"failed:{key}",
                f"{type(self).__name__}: {key!r} failed and is switched off for the rest of this run ({reason}). "
                "Training goes on. Pass `on_error='raise'` to see the traceback.",
            )
            return False

    def _run(self, trainer: Any, pl_module: nn.Module, epochs_done: int) -> None:
        if not self._active or self._sink is None or trainer.sanity_checking or not self._ready_to_log():
            return
        step = 0 if self._deferred == "running" else int(trainer.global_step)
        if self._last_step is not None and step <= self._last_step:
            return  # a step is never written twice for a tag
        if not getattr(trainer, "is_global_zero", True):
            self._last_step = step  # rank zero alone draws and writes; the others keep the same schedule
            return
        scale = self._call_scale(epochs_done)
        self._say_progress(trainer, step, epochs_done, scale)
        with deferred_collection():  # the process's garbage is not this call's cost
            self._timed_call(trainer, pl_module, step, epochs_done, scale)

    def _timed_call(self, trainer: Any, pl_module: nn.Module, step: int, epochs_done: int, scale: float) -> None:
        clock = self._clock
        started, traced = clock(), _layers.traced_seconds[0]
        rows, extra = _data.extra_rows(self._samples, getattr(self, "probes", None))
        if extra:
            follows = (
                "the sample each image is, or was made from (feature visualisation's images: the first sample's)"
                if rows is not None
                else "the first sample they kept"
            )
            _data.tell_once(
                trainer,
                "extra inputs",
                "lightning_viz: the model takes more inputs than the image; the monitors vary the image and give it "
                f"the other inputs of {follows}.",
                warn=False,
            )
        with (
            isolated(pl_module, grad=self.needs_grad),
            silenced_logging(pl_module),
            self._scaled(scale),
            self._sink.records_only(scale == LEAN),  # the diagnosis's evidence that the budget cannot afford to draw
            model_inputs(pl_module, extra, rows),
        ):
            self._guard(self.monitor_name, self._log, trainer, pl_module, step, epochs_done)
        self._last_step = step
        inside, self._inside_seconds = self._inside_seconds, 0.0
        self._sink.scalars({f"lightning_viz/seconds/{self.monitor_name}": clock() - started + inside}, step)
        self._sink.flush()
        seconds = clock() - started + inside
        self._seconds.append(seconds)
        if self._budget is not None:
            once = _layers.traced_seconds[0] - traced if clock is time.perf_counter else 0.0  # (real seconds)
            self._budget.charge(self._budget_key, seconds, scale, epochs_done, once=once)
            self._check_budget(trainer)
        if not self._budget_managed:
            self._check_overhead(seconds)

    @property
    def _clock(self) -> Callable[[], float]:
        """The clock a call is timed with: the budget's (tests give it a fake one), else ``time.perf_counter``."""
        return self._budget.clock if self._budget is not None else time.perf_counter

    def _timed_inside(self, fn: Any, *args: Any) -> Any:
        """Run ``fn`` inside the Trainer's own pass (a forward hook) and count its seconds towards this monitor's next
        call: what a monitor adds to the user's batches is its cost too, not training time."""
        clock = self._clock
        with deferred_collection():
            started = clock()
            try:
                return fn(*args)
            finally:
                self._inside_seconds += clock() - started

    def _say_progress(self, trainer: Any, step: int, epochs_done: int, scale: float) -> None:
        """One line before work that takes more than a couple of seconds: the step-0 views together, the views of
        the trained network together, or one long call."""
        budget = self._budget
        if budget is not None and self._budget_managed:
            estimate = budget.estimate(self._budget_key, scale)
        else:
            estimate = self._seconds[-1] if self._seconds else None
        if step == 0 or self._last_word_scale is not None:
            phase = "untrained" if step == 0 else "trained"
            if budget is not None:  # the whole phase, every monitor at its smallest
                estimate = sum(budget.estimate(n, 0.0) or 0.0 for n in budget.members) + (estimate or 0.0)
            key = f"phase {phase}"
            what = f"drawing the {phase} network's views"
        else:
            key, what = f"call {self.monitor_name} {step}", f"{type(self).__name__} at epoch {epochs_done}"
        # without a shared budget (fixed cadences) the Trainer's own once-said set: one line per phase for the suite
        told = budget.told if budget is not None else _data.told(trainer, self._warned)
        if estimate is None and step == 0 and budget is None and key not in told:  # fixed cadences: time unknown yet
            told.add(key)
            say(trainer, f"lightning_viz: {what}...")
        elif estimate is not None and estimate > PROGRESS_SECONDS and key not in told:
            told.add(key)
            say(trainer, f"lightning_viz: {what} (about {estimate:.0f} s)...")

    def _check_budget(self, trainer: Any) -> None:
        """Say once per suite when it is over its budget (a first call costs what it costs before it is known)."""
        budget = self._budget
        assert budget is not None
        trained = budget.trained(trainer.current_epoch)
        if budget.spent_total > max(1.0, budget.share * trained) and not budget.said_over:
            budget.said_over = True
            rank_zero_warn(
                f"lightning_viz: the monitors have spent {budget.spent_total:.1f} s, "
                f"{budget.spent_total / max(trained, 1e-9):.0%} of the {trained:.1f} s of training so far, over "
                f"their budget of {budget.share:.0%} ({type(self).__name__} just took {self._seconds[-1]:.1f} s, more "
                "than estimated before its first call). Later calls are scaled down or left out; for a short run, "
                "leave the expensive monitors out "
                "(`default_suite(featurevis=False, exemplars=False)`) or raise `budget`."
            )

    def _check_overhead(self, seconds: float) -> None:
        if self._epoch_started_at is None:
            return
        epoch_seconds = time.perf_counter() - self._epoch_started_at - seconds
        if seconds > self.overhead_floor_seconds and epoch_seconds > 0 and seconds > self.max_overhead * epoch_seconds:
            self._warn_once(
                "overhead",
                f"{type(self).__name__} took {seconds:.2f} s, {seconds / epoch_seconds:.0%} of the training epoch "
                f"({epoch_seconds:.2f} s). Raise `every_n_epochs` (now {self.every_n_epochs}) "
                f"{self._cheaper_hint()}to make it cheaper.",
            )

    def _cheaper_hint(self) -> str:
        return ""

    # ------------------------------------------------------------ data taken from the Trainer's own batches
    # DESIGN rule 12: a monitor never reads a user's dataset or loader. It keeps a SampleBank fed from the batches
    # the Trainer produced (sanity check and validation, first loader; training batches when no validation runs).
    # Subclasses that override these hooks call ``super()``.

    def _bank_capacity(self) -> int:
        """How many samples this monitor keeps from the Trainer's batches (0: it shows no samples)."""
        probes = getattr(self, "probes", None)
        return 20 * max(1, probes._auto[0]) if probes is not None and getattr(probes, "_auto", None) else 0

    def _has_data(self) -> bool:
        """Whether the samples this monitor needs exist (the step-0 baseline waits for them otherwise)."""
        probes = getattr(self, "probes", None)
        return probes is None or probes.is_resolved or self._samples.has_samples() or self._no_images

    def _start_taking(self, trainer: Any, pl_module: nn.Module) -> None:
        input_fn, _ = resolve_input_fn(self.input_fn, pl_module)
        self._samples = _data.SampleBank(self._bank_capacity(), self.seed, input_fn=input_fn)
        self._no_images = False
        self._take_training_batches = not _data.validation_expected(trainer, pl_module)
        self._deferred = False

    def _ready_to_log(self) -> bool:
        """Take the probes once samples exist; ``False`` (log nothing yet) while this monitor has no data."""
        if not self._has_data():
            return False
        probes = getattr(self, "probes", None)
        if probes is not None and not probes.is_resolved and self._samples.has_samples():
            images, labels, _, _ = self._samples.samples()
            probes.take(images, labels, self._samples.extras())
        if self._samples.capped is not None:
            self._warn_once(
                "bank capped",
                f"{type(self).__name__}: {self._samples.capped} samples of this size would take more than "
                f"{self._samples.max_bytes >> 20} MiB; keeping {self._samples.capacity}.",
            )
        return True

    def _defer_baseline(self, trainer: Any, pl_module: nn.Module) -> None:
        """No data before training: the step-0 baseline is computed with the initial weights once data exists."""
        _data.keep_initial_weights(trainer, pl_module)
        self._deferred = True
        where = "training epoch" if self._take_training_batches else "validation pass"
        _data.tell_once(
            trainer,
            "deferred baseline",
            f"lightning_viz: {type(self).__name__} (and maybe others) has no samples yet for its step-0 view (it needs "
            "a sanity check's batches, or a whole validation pass for the embedding and exemplars), and the monitors "
            f"never read your dataset themselves: the step-0 view is computed after the first {where}, from the "
            "initial weights kept for that purpose.",
            warn=False,  # it is shown, only later
        )

    def _run_deferred_baseline(self, trainer: Any, pl_module: nn.Module) -> None:
        ready = self._deferred is True and self._has_data() and _data.has_initial_weights(trainer)
        budget = self._budget
        if ready and self._budget_managed and self._expensive and budget is not None:
            if budget.sample_seconds is None:
                return  # no training batch measured yet
            self._baseline_scale = budget.baseline(self._budget_key, trainer.current_epoch)
            if self._baseline_scale is None:
                self._deferred = False  # not even the smallest step-0 view fits: said once, at the end of fit
                return
        if ready and self._last_step is None:
            self._deferred = "running"
            try:
                with _data.initial_weights(trainer, pl_module):
                    self._run(trainer, pl_module, epochs_done=0)
            finally:
                self._deferred = False

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx == 0 and self._samples.capacity and getattr(trainer.state, "fn", "fit") == "fit":
            self._samples.offer(self._pass_key(trainer), batch)
            self._check_inputs(trainer)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or getattr(trainer.state, "fn", "fit") != "fit":
            return
        self._samples.end(self._pass_key(trainer))
        self._run_deferred_baseline(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._budget is not None:  # the seconds per training sample: the unit of the budget's estimates
            images, _ = _data.split_batch(batch)
            self._budget.saw_batch(trainer.current_epoch, batch_idx, len(images) if images is not None else 0)
            if self._budget_managed and self._budget.pass_seconds is None and self._active:
                self._budget.calibrate(pl_module, images)
        if self._take_training_batches and self._samples.capacity:
            self._samples.offer(("train", trainer.current_epoch), batch)
            self._check_inputs(trainer)

    def _check_inputs(self, trainer: Any) -> None:
        """Batches that hold no images: the monitor (or its :attr:`image_part`) steps aside, said in one line."""
        problem = self._samples.problem
        if problem is None or self._no_images or self._samples.has_samples():
            return
        self._no_images = True
        name = type(self).__name__
        if self.image_part is None:
            self._active = False
        else:
            self._disabled[self.image_part] = problem
            name = f"{name}'s {self.image_part}"
        _data.step_aside(trainer, name, problem, fix=f"If the batches hold images: {FIX[0].lower()}{FIX[1:]}")

    def _end_training_pass(self, trainer: Any, pl_module: nn.Module) -> None:
        if self._take_training_batches:
            self._samples.end(("train", trainer.current_epoch))
        _data.say_steps_aside(trainer, final=True)
        self._run_deferred_baseline(trainer, pl_module)

    @staticmethod
    def _pass_key(trainer: Any) -> tuple[Any, ...]:
        return ("sanity",) if trainer.sanity_checking else ("val", int(trainer.global_step), trainer.current_epoch)


def _timed_hook(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` (a Lightning hook of a monitor), with its seconds that no call charged counted in the budget's account
    as the suite's (per-batch bookkeeping: samples kept, batches counted, dynamics' reading of the loss), so that they
    are neither counted as training time nor left out of the suite's share. A hook called inside another (``super()``)
    is timed once."""

    @functools.wraps(hook)
    def timed(self: VizCallback, *args: Any, **kwargs: Any) -> Any:
        budget = self.__dict__.get("_budget")
        if budget is None or self.__dict__.get("_in_hook"):
            return hook(self, *args, **kwargs)
        self._in_hook = True
        started, spent = budget.clock(), budget.spent_total
        try:
            return hook(self, *args, **kwargs)
        finally:
            self._in_hook = False
            seconds = budget.clock() - started - (budget.spent_total - spent)
            budget.count_hooks(seconds, f"{type(self).__name__}.{hook.__name__}")

    return timed


def _time_hooks(cls: type) -> None:
    for name, value in list(vars(cls).items()):
        if (name.startswith("on_") or name == "state_dict") and callable(value) and not hasattr(value, "__wrapped__"):
            setattr(cls, name, _timed_hook(value))


_time_hooks(VizCallback)


def _is_fitting(trainer: Any) -> bool:
    """Whether ``trainer`` is inside a ``fit`` that has not ended (finished, failed or interrupted)."""
    state = getattr(trainer, "state", None)
    return str(getattr(getattr(state, "status", None), "value", "")) == "running"
