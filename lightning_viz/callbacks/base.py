"""The core every lightning_viz monitor stands on: schedule, sink, isolation, failure handling, cost, state."""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from lightning_viz._compat import CALLBACK_CLASSES, rank_zero_warn
from lightning_viz._hooks import isolated
from lightning_viz.sinks import NO_IMAGE_LOGGER_MESSAGE, NO_LOGGER_MESSAGE, Sink, takes_images

OnError = Literal["warn", "raise"]
_ON_ERROR_CHOICES = ("warn", "raise")


def check_positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    """Raise a ``TypeError``/``ValueError`` naming the argument unless ``value`` is a positive int."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be a positive int, got {value!r} of type {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"`{name}` must be a positive int (>= 1), got {value!r}.")


def check_fraction(name: str, value: Any, *, low: float = 0.0, high: float = 1.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number in ({low}, {high}], got {value!r}.")
    if not low < value <= high:
        raise ValueError(f"`{name}` must be in ({low}, {high}], got {value!r}.")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


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
    """

    monitor_name: ClassVar[str] = "viz"
    default_every_n_epochs: ClassVar[int] = 1
    #: Whether :meth:`_log` needs autograd (gradient-based methods).
    needs_grad: ClassVar[bool] = False
    #: Calls shorter than this never trigger the overhead warning (tiny epochs would make any cost look large).
    overhead_floor_seconds: ClassVar[float] = 0.5

    def __init__(
        self,
        *,
        every_n_epochs: int | None = None,
        on_error: OnError = "warn",
        log_baseline: bool = True,
        seed: int = 0,
        max_overhead: float = 0.1,
    ) -> None:
        check_positive_int("every_n_epochs", every_n_epochs, allow_none=True)
        check_choice("on_error", on_error, _ON_ERROR_CHOICES)
        if not isinstance(log_baseline, bool):
            raise TypeError(f"`log_baseline` must be a bool, got {log_baseline!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"`seed` must be an int, got {seed!r}.")
        check_fraction("max_overhead", max_overhead, high=float("inf"))
        self.every_n_epochs = every_n_epochs if every_n_epochs is not None else self.default_every_n_epochs
        self.on_error = on_error
        self.log_baseline = log_baseline
        self.seed = seed
        self.max_overhead = float(max_overhead)
        self._sink: Sink | None = None
        self._active = True
        self._disabled: dict[str, str] = {}
        self._warned: set[str] = set()
        self._last_step: int | None = None
        self._epoch_started_at: float | None = None
        self._seconds: list[float] = []

    # ----------------------------------------------------------------------------------------------- Lightning API
    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._state_key_fields())

    def _state_key_fields(self) -> dict[str, Any]:
        return {"every_n_epochs": self.every_n_epochs}

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._active = True
        if getattr(trainer, "fast_dev_run", False):
            self._warn_once(
                "fast_dev_run",
                f"{type(self).__name__}: `fast_dev_run` replaces the Trainer's loggers with a dummy; "
                "nothing is logged.",
            )
            self._active = False
            return
        if not trainer.loggers:
            raise ValueError(NO_LOGGER_MESSAGE)
        if not takes_images(trainer.loggers):
            self._warn_once("no_tensorboard", f"{type(self).__name__}: {NO_IMAGE_LOGGER_MESSAGE}")
        self._sink = Sink.for_trainer(trainer)
        self._resolve(trainer, pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # The baseline shows the untrained state; a resumed run (global_step > 0) already has it.
        if self.log_baseline and trainer.global_step == 0 and self._last_step is None:
            self._run(trainer, pl_module, epochs_done=0)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._epoch_started_at = time.perf_counter()

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._is_log_epoch(trainer) and self._runs_after_train_epoch():
            self._run(trainer, pl_module, epochs_done=trainer.current_epoch + 1)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._release(pl_module)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._release(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "disabled": dict(self._disabled), **self._extra_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict.get("last_step")
        self._disabled = dict(state_dict.get("disabled", {}))
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

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---------------------------------------------------------------------------------------------------- helpers
    def _is_log_epoch(self, trainer: Any) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _generator(self, device: torch.device | str = "cpu", offset: int = 0) -> torch.Generator:
        """A private generator, seeded from ``seed``: our randomness never draws from the global streams."""
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed + offset)
        return gen

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
            self._warn_once(
                f"failed:{key}",
                f"{type(self).__name__}: {key!r} failed and is switched off for the rest of this run ({reason}). "
                "Training goes on. Pass `on_error='raise'` to see the traceback.",
            )
            return False

    def _run(self, trainer: Any, pl_module: nn.Module, epochs_done: int) -> None:
        if not self._active or self._sink is None or trainer.sanity_checking:
            return
        step = int(trainer.global_step)
        if self._last_step is not None and step <= self._last_step:
            return  # a step is never written twice for a tag
        if not getattr(trainer, "is_global_zero", True):
            self._last_step = step  # rank zero alone draws and writes; the others keep the same schedule
            return
        started = time.perf_counter()
        with isolated(pl_module, grad=self.needs_grad):
            self._guard(self.monitor_name, self._log, trainer, pl_module, step, epochs_done)
        seconds = time.perf_counter() - started
        self._last_step = step
        self._seconds.append(seconds)
        self._sink.scalars({f"lightning_viz/seconds/{self.monitor_name}": seconds}, step)
        self._sink.flush()
        self._check_overhead(seconds)

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


def check_names(name: str, value: Any) -> None:
    """``value`` must be ``None`` or a list of layer names."""
    if value is not None and (isinstance(value, str) or not all(isinstance(n, str) for n in value)):
        raise TypeError(f"`{name}` must be a list of layer names (str) or None, got {value!r}.")


def check_indices(name: str, value: Any) -> None:
    """``value`` must be ``None`` or a non-empty list of non-negative ints."""
    if value is None:
        return
    if isinstance(value, (str, int)) or not all(isinstance(c, int) and not isinstance(c, bool) for c in value):
        raise TypeError(f"`{name}` must be a list of indices (int), got {value!r}.")
    if not value or min(value) < 0:
        raise ValueError(f"`{name}` must be non-empty non-negative indices, got {list(value)}.")


def check_probe_set(name: str, value: Any) -> None:
    """``value`` must be ``None`` or a :class:`~lightning_viz.ProbeSet`."""
    from lightning_viz.probes import ProbeSet

    if value is not None and not isinstance(value, ProbeSet):
        raise TypeError(f"`{name}` must be a lightning_viz.ProbeSet or None, got {type(value).__name__}.")
