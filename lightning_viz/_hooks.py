"""Context managers that keep our work from leaving traces on the user's model and training.

- :func:`isolated` saves and restores every submodule's ``training`` flag, the torch (CPU and CUDA), numpy and
  ``random`` RNG states, each parameter's ``.grad`` and ``requires_grad``, and enables gradients locally even when the
  caller runs under ``torch.inference_mode`` (as Lightning's validation does).
- :func:`capture` keeps what modules output (or receive) during a forward pass; its hooks are always removed, also
  when the body raises. :class:`CallSiteRecorder` tells apart the calls of a module used several times per forward.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lightning_viz import _validate as check


def _cuda_rng_states() -> list[torch.Tensor] | None:
    # Only touch CUDA when it is already initialised: initialising it just to save a state would be a side effect.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.get_rng_state_all()
    return None


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the global torch (CPU, CUDA), numpy and ``random`` RNG states on exit."""
    torch_state = torch.get_rng_state()
    cuda_states = _cuda_rng_states()
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        np.random.set_state(numpy_state)
        random.setstate(python_state)


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore each submodule's own ``training`` flag on exit (``model.train()`` alone would flatten them)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def preserved_grads(model: nn.Module) -> Iterator[None]:
    """Put every parameter's ``.grad`` object (``None`` included) and ``requires_grad`` flag back on exit."""
    saved = [(p, p.grad, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for param, grad, requires_grad in saved:
            if param.grad is not grad:
                param.grad = grad
            if param.requires_grad != requires_grad:
                param.requires_grad_(requires_grad)


def eager_compiled() -> contextlib.AbstractContextManager:
    """Run ``torch.compile``-d code eagerly in the body (``torch.compiler.set_stance("force_eager")``)."""
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    if set_stance is None:  # torch < 2.6
        return contextlib.nullcontext()
    return set_stance("force_eager")


@contextlib.contextmanager
def isolated(model: nn.Module, *, eval_mode: bool = True, grad: bool = False) -> Iterator[None]:
    """Run the body without side effects on ``model`` or the global RNG streams.

    Args:
        model: the module our work touches (its ``torchmetrics`` metrics are put back too: :func:`preserved_metrics`).
        eval_mode: switch the model to eval mode inside (BatchNorm statistics and dropout must not change).
        grad: leave ``torch.inference_mode`` and enable autograd inside, for gradient-based methods.

    A ``torch.compile``-d model runs eagerly inside: our hooks and swapped ReLU rules then take effect, and our calls
    neither trigger recompilations nor use up the user's recompile limit.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(eager_compiled())
        stack.enter_context(preserved_rng())
        stack.enter_context(preserved_modes(model))
        stack.enter_context(preserved_grads(model))
        stack.enter_context(preserved_metrics(model))
        if grad:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
        else:
            stack.enter_context(torch.no_grad())
        if eval_mode:
            model.eval()
        yield


HookFn = Callable[[nn.Module, Any, Any], Any]


@contextlib.contextmanager
def forward_hooks(modules: Mapping[str, nn.Module], make_hook: Callable[[str], HookFn]) -> Iterator[None]:
    """Register ``make_hook(name)`` as a forward hook on each module (hooks that stream statistics rather than keep
    tensors, unlike :func:`capture`); remove them all on exit, whatever happens."""
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        handles.clear()


@contextlib.contextmanager
def capture(
    modules: Sequence[nn.Module],
    *,
    what: Literal["output", "input"] = "output",
    keep: Literal["all", "last"] = "all",
) -> Iterator[list[list[torch.Tensor]]]:
    """Keep what each module outputs (or receives as its first input) during the body; hooks removed on exit.

    Yields one list per module; ``keep="all"`` appends one tensor per call, ``keep="last"`` keeps only the latest
    (a loop over batches then holds one batch's tensors, not all of them). Tensors keep their autograd graph, so
    the caller can differentiate with respect to them. The rest of the network gets a *clone*: an in-place op
    downstream (``out += identity`` in a ResNet, an in-place ReLU) then cannot modify the tensor we keep.
    Non-tensor outputs/inputs are ignored.

    Args:
        modules: the modules to watch (a module called several times per forward is kept per call).
        what: ``"output"`` (a forward hook) or ``"input"`` (a forward pre-hook, the first positional input).
        keep: ``"all"`` calls or only the ``"last"``.
    """
    check.choice("what", what, ("output", "input"))
    check.choice("keep", keep, ("all", "last"))
    captured: list[list[torch.Tensor]] = [[] for _ in modules]

    def store(i: int, tensor: torch.Tensor) -> None:
        if keep == "last":
            captured[i].clear()
        captured[i].append(tensor)

    def make(i: int) -> Callable[..., Any]:
        if what == "output":

            def output_hook(module: nn.Module, inputs: Any, output: Any) -> Any:
                if isinstance(output, torch.Tensor):
                    store(i, output)
                    return output.clone()
                return None

            return output_hook

        def input_hook(module: nn.Module, inputs: tuple[Any, ...]) -> Any:
            if inputs and isinstance(inputs[0], torch.Tensor):
                store(i, inputs[0])
                return (inputs[0].clone(), *inputs[1:])
            return None

        return input_hook

    handles = []
    try:
        for i, module in enumerate(modules):
            hook = make(i)
            handles.append(
                module.register_forward_hook(hook) if what == "output" else module.register_forward_pre_hook(hook)
            )
        yield captured
    finally:
        for handle in handles:
            handle.remove()
        handles.clear()


def hook_count(model: nn.Module) -> int:
    """Total number of forward/backward/pre hooks on ``model`` and its submodules (for leak checks)."""
    total = 0
    for module in model.modules():
        for attr in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        ):
            total += len(getattr(module, attr, {}) or {})
    return total


class CallSiteRecorder:
    """Forward hooks that tell apart the call sites of a module used several times per forward pass.

    torchvision's ResNet applies one ``self.relu`` twice per block: its outputs are different activations and must
    not be mixed. The recorder counts each module's calls within one forward pass of the model and passes
    ``(name, call_index)`` with each output to ``on_output``. A forward pass begins when ``root`` or one of the
    modules between it and the watched ones (``self.model``, ``self.model.features``) is entered from outside: a
    ``validation_step`` that calls the model twice (once for the loss, once for the accuracy) then sees each module
    once per pass (one site), while a layer truly called twice within one pass (weight sharing) keeps two sites.
    Without ``root`` (or when the step calls the watched modules itself) the calls are counted since the last
    :meth:`reset` (call it once per batch). Hooks live between :meth:`attach` and :meth:`detach`; ``detach`` is safe
    to call twice.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        on_output: Callable[[str, int, Any], None],
        root: nn.Module | None = None,
    ) -> None:
        self._modules = dict(modules)
        self._on_output = on_output
        self._calls: dict[str, int] = {}
        self._handles: list[Any] = []
        self._depth = 0
        self._level = 0
        self._outer = _enclosing_modules(root, self._modules) if root is not None else []
        #: Highest number of calls seen per module within one forward pass.
        self.max_calls: dict[str, int] = {}

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        if self._handles:
            return
        self._level = _OUR_PASSES[0]  # attached inside one of our passes (e.g. activation maps): record that pass
        try:
            for module in self._outer:
                self._handles.append(module.register_forward_pre_hook(self._enter))
                self._handles.append(module.register_forward_hook(self._leave, always_call=True))
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._depth = 0

    def reset(self) -> None:
        self._calls.clear()
        self._depth = 0

    def _enter(self, module: nn.Module, inputs: Any) -> None:
        if self._depth == 0:  # a new forward pass of the model: its call sites are numbered afresh
            self._calls.clear()
        self._depth += 1

    def _leave(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._depth = max(0, self._depth - 1)

    def _hook(self, name: str) -> HookFn:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if _OUR_PASSES[0] > self._level:  # a monitor's own pass while the Trainer's batches are watched
                return
            index = self._calls.get(name, 0)
            self._calls[name] = index + 1
            self.max_calls[name] = max(self.max_calls.get(name, 0), index + 1)
            self._on_output(name, index, output)

        return hook

    def site_name(self, name: str, index: int) -> str:
        """``name`` for a module called once per forward, ``name#k`` (1-based) for the k-th call otherwise."""
        return name if self.max_calls.get(name, 1) <= 1 else f"{name}#{index + 1}"


def _enclosing_modules(root: nn.Module, watched: Mapping[str, nn.Module]) -> list[nn.Module]:
    """``root`` and every module that contains a watched one (by qualified name), the watched ones excluded."""
    names = {name for name, _ in root.named_modules()}
    prefixes = {""}
    for name in watched:
        parts = name.split(".")
        prefixes.update(".".join(parts[:i]) for i in range(1, len(parts)))
    watched_ids = {id(m) for m in watched.values()}
    enclosing = [root.get_submodule(p) for p in sorted(prefixes) if p in names]
    return [m for m in dict.fromkeys(enclosing) if id(m) not in watched_ids]


# ---- a layer's code: one forward pass, or the Trainer's own validation pass ----


class ValidationCodeCapture:
    """Codes (and logits) of chosen samples, taken from the validation pass the Trainer runs anyway.

    The samples are known by their position in an earlier validation pass (a :class:`~lightning_viz._data.SampleBank`
    keeps them with their images). A forward hook on the code layer keeps its first call per batch (the model's own
    forward; our own passes come later); :meth:`batch_end` books the rows at the wanted positions and checks that the
    batch's image there *is* the kept image, and :meth:`collect` checks that the pass had as many samples as before.
    Anything else (a shuffled, reloaded or resized loader) is reported, never mixed up. With ``use_input`` the code is
    the layer's input and its output the logits. The hook lives between :meth:`attach` and :meth:`detach`.
    """

    def __init__(self, module: nn.Module, use_input: bool) -> None:
        self._module = module
        self._use_input = use_input
        self._handle: Any = None
        self._wanted: dict[int, torch.Tensor] = {}
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._seen = 0
        self._mismatch: int | None = None
        self._batch: list[tuple[Any, Any]] = []
        #: the epoch whose validation pass was captured last, or None
        self.epoch: int | None = None

    @staticmethod
    def can_capture(trainer: Any) -> bool:
        """One process and a sequential validation loader (the usual, unshuffled one): positions repeat."""
        from torch.utils.data import SequentialSampler

        from lightning_viz._data import first_loader

        loader = first_loader(getattr(trainer, "val_dataloaders", None))
        sampler = getattr(loader, "sampler", None)
        return (
            getattr(trainer, "world_size", 1) == 1
            and isinstance(sampler, SequentialSampler)
            and getattr(loader, "batch_sampler", None) is not None
            and type(loader.batch_sampler).__name__ == "BatchSampler"
        )

    @property
    def attached(self) -> bool:
        return self._handle is not None

    def attach(self, positions: Sequence[int], images: torch.Tensor) -> None:
        """Start a validation pass: keep the rows at ``positions``, whose images must equal ``images``."""
        self.detach()
        self._wanted = {int(p): images[i] for i, p in enumerate(positions)}
        self._rows, self._seen, self._mismatch = {}, 0, None
        self._handle = self._module.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not self._batch:  # the first call per batch: the model's own forward pass
            self._batch.append((inputs[0], output) if self._use_input else (output, None))

    def batch_end(self, batch: Any) -> None:
        """Book the batch just validated (call after each batch of the first validation loader)."""
        from lightning_viz._data import split_batch
        from lightning_viz.functional.embedding import pooled_codes

        try:
            images, _ = split_batch(batch)
            if self._batch and isinstance(self._batch[0][0], torch.Tensor) and images is not None:
                code, logits = pooled_codes(self._batch[0][0]), self._batch[0][1]
                usable = isinstance(logits, torch.Tensor) and logits.ndim == 2
                for row in range(min(len(code), len(images))):
                    kept = self._wanted.get(self._seen + row)
                    if kept is None:
                        continue
                    if kept.shape != images[row].shape or not torch.equal(images[row].cpu(), kept):
                        self._mismatch = self._seen + row if self._mismatch is None else self._mismatch
                    out = logits[row].detach().float().cpu() if usable else None
                    self._rows[self._seen + row] = (code[row].cpu(), out)
                self._seen += len(code)
        finally:
            self._batch = []

    def detach(self, epoch: int | None = None) -> None:
        """Remove the hook; ``epoch`` marks a validation pass captured to its end."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            if epoch is not None:
                self.epoch = epoch
        self._batch = []

    def collect(self, epoch: int, pass_size: int) -> tuple[tuple[torch.Tensor, torch.Tensor | None] | None, str | None]:
        """((codes (N, D), logits (N, K) or None) in position order, or None; why not, when the pass didn't match).

        ``pass_size`` is the number of samples of the pass the positions come from. The rows are handed over once.
        """
        rows, self._rows = self._rows, {}
        if self.epoch != epoch:
            return None, None
        self.epoch = None
        if self._seen != pass_size:
            return None, f"the validation pass had {self._seen} samples, the one the subset was taken from {pass_size}"
        if self._mismatch is not None or len(rows) != len(self._wanted):
            return None, f"the validation sample at position {self._mismatch} is not the one kept there earlier"
        picked = [rows[p] for p in sorted(self._wanted)]
        logits = [out for _, out in picked]
        codes = torch.stack([code for code, _ in picked])
        return (codes, torch.stack(logits) if all(o is not None for o in logits) else None), None  # type: ignore[arg-type]


# ---- our forward passes never reach the user's logged metrics ----


def _ignore_log(*args: Any, **kwargs: Any) -> None:
    return None


#: How many of our own passes are running (inside :func:`silenced_logging`): statistics gathered from the Trainer's
#: batches (:class:`CallSiteRecorder`) skip them.
_OUR_PASSES = [0]


@contextlib.contextmanager
def silenced_logging(model: nn.Module) -> Iterator[None]:
    """Make a LightningModule's ``self.log`` / ``self.log_dict`` do nothing in the body.

    A ``forward`` (or a user's hook on a submodule) that calls ``self.log`` would otherwise log the values of our own
    forward passes (probes, codes, exemplars, saliency, feature visualisation) into the user's metric, and so change
    what ``EarlyStopping`` or ``ModelCheckpoint`` see. The instance attributes shadow the methods for the body only
    (copies of the model made inside inherit them), and whatever was there before is put back.
    """
    names = [n for n in ("log", "log_dict") if hasattr(model, "_current_fx_name") and callable(getattr(model, n, None))]
    missing = object()
    saved = {n: model.__dict__.get(n, missing) for n in names}
    _OUR_PASSES[0] += 1
    try:
        for name in names:
            object.__setattr__(model, name, _ignore_log)
        yield
    finally:
        _OUR_PASSES[0] -= 1
        for name, value in saved.items():
            if value is missing:
                model.__dict__.pop(name, None)
            else:
                object.__setattr__(model, name, value)


# ---- our forward passes leave the user's torchmetrics alone ----

#: A ``torchmetrics.Metric``'s bookkeeping beside its states (``_defaults``): restored with them.
_METRIC_FIELDS = ("_update_count", "_computed", "_forward_cache", "_is_synced", "_cache", "_should_unsync")


def _metrics_of(model: nn.Module) -> list[nn.Module]:
    import sys

    torchmetrics = sys.modules.get("torchmetrics")  # a model holding a Metric has imported it
    if torchmetrics is None:
        return []
    # the class's MRO, not isinstance: an ABC check walks every Metric subclass whenever its cache was invalidated
    # (0.1 s per call on mobilenet_v3_small during a fit)
    metric = torchmetrics.Metric
    return [m for m in model.modules() if metric in type(m).__mro__]


def _snapshot(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_snapshot(v) for v in value]
    try:
        return copy.deepcopy(value)
    except Exception:  # something that cannot be copied is kept as it is
        return value


@contextlib.contextmanager
def preserved_metrics(model: nn.Module) -> Iterator[None]:
    """Put back, on exit, the state of every ``torchmetrics.Metric`` among ``model``'s submodules.

    A ``forward`` that updates a metric (``self.logit_mean.update(out.mean())``) would otherwise count our own
    forward passes (probes, codes, saliency, feature visualisation) into the value the user logs. Restored: each
    metric's states (its ``_defaults``: sums, counts, lists) and bookkeeping (update count, cached result). Not
    covered: plain Python attributes a forward changes (a counter), and metrics kept outside the module tree.
    """
    saved = [
        (
            metric,
            {
                name: _snapshot(getattr(metric, name))
                for name in (*metric._defaults, *_METRIC_FIELDS)
                if hasattr(metric, name)
            },
        )
        for metric in _metrics_of(model)
    ]
    try:
        yield
    finally:
        for metric, state in saved:
            for name, value in state.items():
                object.__setattr__(metric, name, value)
