"""Autograd plumbing shared by the gradient methods: one home, like Captum's ``_utils/gradient.py``.

- :func:`gradient_context` enables autograd (also inside ``torch.inference_mode``) and freezes the parameters.
- :func:`relu_backward_rule` swaps every ``nn.ReLU``'s backward for guided backprop's, deconvnet's or the
  "redirected" rule feature visualisation starts with; :func:`switchable_relu_rules` for one whose rule can change
  between backward passes of one graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lightning_viz import _validate as check

_RELU_RULES = ("guided", "deconvnet", "redirected")


@contextlib.contextmanager
def gradient_context(model: nn.Module) -> Iterator[None]:
    """Enable autograd (also inside ``inference_mode``) and freeze the model's parameters; restore both on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with torch.inference_mode(False), torch.enable_grad():
            for p, _ in flags:
                p.requires_grad_(False)
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0)


class _DeconvReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad.clamp(min=0)


class _RedirectedReLU(torch.autograd.Function):
    """ReLU whose backward also lets a gradient through a negative unit when it would push that unit up.

    Used by feature visualisation in its first steps (as Lucid does): from noise, a ReLU channel that is off
    everywhere would otherwise get no gradient at all and never start.
    """

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return torch.where((x < 0) & (grad > 0), torch.zeros_like(grad), grad)


#: The rule :class:`_SwitchableReLU` follows in the backward pass running now (see :func:`switchable_relu_rules`).
_SWITCH = ["plain"]


class _SwitchableReLU(_GuidedReLU):
    """ReLU whose backward follows the rule in force when the backward runs: the plain gradient, guided backprop's or
    deconvnet's. One forward pass (guided backprop's: it keeps the output) then serves all three, as several backward
    passes over one graph."""

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (out,) = ctx.saved_tensors
        rule = _SWITCH[0]
        if rule == "deconvnet":
            return grad.clamp(min=0)
        return (grad.clamp(min=0) if rule == "guided" else grad) * (out > 0)


@contextlib.contextmanager
def switchable_relu_rules(model: nn.Module) -> Iterator[tuple[int, Callable[[str], None]]]:
    """Swap every ``nn.ReLU``'s forward for one whose backward rule can be switched between backward passes of one
    graph; restore on exit. Yields the number of modules swapped and ``use(rule)`` ("plain", "guided",
    "deconvnet"), which sets the rule of the backward passes that follow."""
    swapped: list[nn.Module] = []

    def use(rule: str) -> None:
        check.choice("rule", rule, ("plain", "guided", "deconvnet"))
        _SWITCH[0] = rule

    try:
        for module in relu_modules(model):
            module.forward = _SwitchableReLU.apply  # instance attribute shadows the class's forward
            swapped.append(module)
        yield len(swapped), use
    finally:
        _SWITCH[0] = "plain"
        for module in swapped:
            module.__dict__.pop("forward", None)


def relu_modules(model: nn.Module) -> list[nn.Module]:
    """Every ``nn.ReLU`` module of ``model`` (the ones whose backward rule can be swapped)."""
    return [m for m in model.modules() if isinstance(m, nn.ReLU)]


@contextlib.contextmanager
def relu_backward_rule(model: nn.Module, rule: str) -> Iterator[int]:
    """Swap every ``nn.ReLU``'s forward for an out-of-place ReLU with the ``rule`` backward; restore on exit.

    The swap is on the module instance, so a ReLU module applied several times per forward gets the rule at every
    call, and ``inplace=True`` modules never modify our tensors (their ``inplace`` flag itself is untouched).
    Yields the number of modules swapped (0: functional ``F.relu`` calls cannot be overridden).
    """
    check.choice("rule", rule, _RELU_RULES)
    function = {"guided": _GuidedReLU, "deconvnet": _DeconvReLU, "redirected": _RedirectedReLU}[rule]
    swapped: list[nn.Module] = []
    try:
        for module in relu_modules(model):
            module.forward = function.apply  # instance attribute shadows the class's forward
            swapped.append(module)
        yield len(swapped)
    finally:
        for module in swapped:
            module.__dict__.pop("forward", None)
