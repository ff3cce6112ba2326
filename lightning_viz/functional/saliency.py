"""Gradient-based saliency on a plain ``nn.Module``, batched over images. Pure functions, no Trainer.

Every method explains the *score* of a target class: the model's output (logit, before any softmax) at that class;
for a single-logit (sigmoid) binary head, the logit for class 1 and its negative for class 0 (:func:`class_scores`;
:func:`head_outputs` gives a head's probabilities and predicted classes). The model always gets a fresh copy of its
input, so models that edit their input in place (``x.sub_(0.5)``) work and the caller's tensor is untouched.
Gradients are taken with ``torch.autograd.grad`` w.r.t. a clone of the input, so no parameter's ``.grad`` is touched;
parameters are frozen (``requires_grad=False``) for the duration, so autograd builds no weight-gradient graph, and
their flags are restored afterwards. The functions work inside ``torch.inference_mode`` (Lightning's validation):
they leave it locally. They do not change the model's train/eval mode: call ``model.eval()`` first (and restore it).

Methods:
    - :func:`gradient`: ``d score / d x`` (Simonyan et al.); the map is ``|grad|`` maxed
      over colour channels.
    - :func:`smoothgrad`: the mean ``|grad|`` over ``n`` noisy copies, noise sigma = ``noise_level * (x_max - x_min)``
      per image (Smilkov et al.).
    - :func:`guided_backprop` and :func:`deconvnet`: gradients with the ReLU backward rule replaced (Springenberg et
      al.; Zeiler & Fergus): guided passes ``clamp(grad, 0) * (input > 0)``, deconvnet ``clamp(grad, 0)``.
    - :func:`grad_cam`: channel weights = spatial mean of ``d score / d A`` for a conv layer's output ``A``,
      map = ``relu(sum_k w_k A_k)`` (Selvaraju et al.).
    - :func:`fullgrad`: ``|grad * x|`` plus ``|d score / d out_l * b_l|`` for every conv / BatchNorm bias, each
      min-max normalised per image and summed over channels, bias terms upsampled (Srinivas & Fleuret, 2019).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lightning_viz._hooks import capture
from lightning_viz._layers import TokenGrid, spatial_view
from lightning_viz.functional._autograd import gradient_context, switchable_relu_rules

__all__ = [
    "HEADS",
    "FoldingError",
    "Head",
    "calling_copy",
    "class_scores",
    "deconvnet",
    "effective_bias",
    "fold_batchnorm",
    "fullgrad",
    "InferenceCopy",
    "grad_cam",
    "gradient",
    "relu_rule_gradients",
    "guided_backprop",
    "head_outputs",
    "inference_copy",
    "input_gradient",
    "refresh_inference_copy",
    "resolve_head",
    "rows_to_explain",
    "smoothgrad",
    "target_scores",
]


def _foldable_pairs(gm: torch.fx.GraphModule, keep: Sequence[str]) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """The (conv node, BatchNorm node) pairs that are provably safe to fold: a plain ``Conv2d`` module called exactly
    once per forward, whose weights nothing else reads, whose output only that BatchNorm consumes, and a BatchNorm in
    eval mode with running statistics applied to that output alone."""
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    attrs = [str(n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    pairs = []
    for node in gm.graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if type(bn) is not nn.BatchNorm2d or len(node.args) != 1 or node.kwargs or bn.training:
            continue
        prev = node.args[0]
        if not isinstance(prev, torch.fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        conv = modules.get(prev.target)
        if (
            type(conv) is not nn.Conv2d
            or conv.training
            or prev.target in keep
            or calls[prev.target] != 1
            or prev.kwargs
        ):
            continue
        if bn.running_mean is None or any(a == prev.target or a.startswith(f"{prev.target}.") for a in attrs):
            continue
        pairs.append((prev, node))
    return pairs


class FoldingError(RuntimeError):
    """:func:`fold_batchnorm`'s copy gave different outputs than the model on the example images."""


def fold_batchnorm(model: nn.Module, keep: Sequence[str] = (), *, example: torch.Tensor | None = None) -> nn.Module:
    """A ``torch.fx`` copy of an eval-mode ``model`` with each ``Conv2d`` followed by ``BatchNorm2d`` folded into one
    convolution (exact up to float rounding). Convolutions named in ``keep`` stay unfolded, so their own output can
    still be hooked (Grad-CAM's layer). Submodule names are kept. Raises when ``torch.fx`` cannot trace the model.

    Only provably safe pairs are folded: the convolution module is called exactly once per forward (a convolution
    shared by several calls is left alone), its output feeds that BatchNorm and nothing else (not also a residual
    addition), nothing reads its weights directly, and the BatchNorm normalises that one output (not a sum of several
    convolutions). A BatchNorm module shared by several such convolutions is folded into each. With ``example``
    images the folded copy's output is compared with the model's on them, and :class:`FoldingError` is raised when
    they differ beyond float rounding.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    gm = torch.fx.symbolic_trace(copy.deepcopy(model))
    folded: dict[str, str] = {}  # fused convolution -> the BatchNorm folded into it (to refresh the weights later)
    for conv_node, bn_node in _foldable_pairs(gm, keep):
        fused = fuse_conv_bn_eval(gm.get_submodule(conv_node.target), gm.get_submodule(bn_node.target))
        parent, _, name = conv_node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, fused)
        folded[conv_node.target] = bn_node.target
        bn_node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(bn_node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm._lightning_viz_folded = folded
    if example is not None:
        with torch.no_grad():  # fresh copies: the model may edit its input in place
            want, got = model(example.detach().clone()), gm(example.detach().clone())
        if not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max().clamp_min(1.0))):
            raise FoldingError(f"the folded copy's output differs by up to {float((got - want).abs().max()):.3g}")
    return gm


def inference_copy(
    model: nn.Module, *, keep: Sequence[str] = (), channels_last: bool = False, example: torch.Tensor | None = None
) -> nn.Module:
    """A frozen copy of an eval-mode model for fast repeated forward/backward passes over its *input*.

    Convolutions and the BatchNorm after them are folded into one convolution (:func:`fold_batchnorm`; exact up to
    float rounding in eval mode), except the convolutions named in ``keep``; parameters are frozen and, on request,
    stored channels-last (on this project's 2-core CPU reference that was *slower* for batches of a few images and no
    faster for occlusion, so it is off by default). Models that ``torch.fx`` cannot trace are deep-copied unfolded; if
    even that fails the model itself is returned (its parameters are then frozen only inside
    :func:`gradient_context`). Use the copy for input-space methods (gradient, SmoothGrad, guided backprop,
    deconvnet, occlusion) and for Grad-CAM of a layer in ``keep``; not for FullGrad, whose BatchNorm biases the
    folding removes. ReLU modules survive the folding, so ReLU rules still apply. With ``example`` images (the
    probes) the folded copy is checked against the model on them; when tracing fails or the outputs differ the copy
    is left unfolded and a warning says so (once per message and call site, Python's default).
    """
    if model.training:
        raise ValueError("inference_copy needs a model in eval mode (BatchNorm folding uses the running statistics).")
    from lightning_viz._layers import detached_deepcopy

    try:
        fast = detached_deepcopy(model, lambda m: fold_batchnorm(m, keep, example=example))
    except Exception as exc:
        warnings.warn(
            f"inference_copy: conv+BatchNorm pairs of {type(model).__name__} are not folded "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no message'}); the copy runs them "
            "unfolded, with the same results, a little slower.",
            UserWarning,
            stacklevel=2,
        )
        try:
            fast = detached_deepcopy(model)
        except Exception:
            return model
    fast.eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    return fast


def _structure(model: nn.Module, keep: Sequence[str]) -> tuple:
    """What decides an inference copy's graph: the model, its module types, its tensors' names, shapes and places."""
    modules = tuple((name, type(m)) for name, m in model.named_modules())
    tensors = tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in model.state_dict().items())
    return id(model), tuple(keep), modules, tensors


@torch.no_grad()
def refresh_inference_copy(fast: nn.Module, model: nn.Module) -> None:
    """Copy ``model``'s current weights into ``fast`` (an :func:`inference_copy` of it with the same structure), in
    place: folded convolutions get the folding of the current convolution and BatchNorm, bit for bit what a fresh
    :func:`inference_copy` computes."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    source = model.state_dict()
    for name, tensor in fast.state_dict().items():
        if name in source and source[name].shape == tensor.shape:
            tensor.copy_(source[name])
    for conv_name, bn_name in getattr(fast, "_lightning_viz_folded", {}).items():
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        fused = fast.get_submodule(conv_name)
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)


class InferenceCopy:
    """:func:`inference_copy`, built once and refreshed in place while the model's structure stays the same.

    Tracing and folding cost tens of milliseconds per call on a ResNet; copying the weights into the cached copy
    costs a fraction of that. A changed structure (other modules, shapes, device or dtype) rebuilds the copy.

    Args:
        keep: convolutions left unfolded (see :func:`inference_copy`).
        channels_last: store the copy's parameters channels-last.
    """

    def __init__(self, *, keep: Sequence[str] = (), channels_last: bool = False) -> None:
        self.keep = tuple(keep)
        self.channels_last = channels_last
        self._copy: nn.Module | None = None
        self._key: tuple | None = None

    def __call__(self, model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
        """The inference copy of the eval-mode ``model`` with its current weights (a new copy is checked against the
        model on ``example`` images, see :func:`inference_copy`)."""
        key = _structure(model, self.keep)
        if self._copy is not None and key == self._key:
            refresh_inference_copy(self._copy, model)
            return self._copy
        fast = inference_copy(model, keep=self.keep, channels_last=self.channels_last, example=example)
        self._copy, self._key = (fast, key) if fast is not model else (None, None)
        return fast

    def clear(self) -> None:
        """Drop the cached copy (its memory)."""
        self._copy, self._key = None, None


def calling_copy(copy: nn.Module, model: nn.Module, layer: str) -> nn.Module:
    """``copy`` (from :func:`inference_copy`) when its traced graph calls the submodule ``layer`` itself (it was
    kept unfolded), else ``model``: the one on which hooking ``layer`` sees the layer's real output."""
    graph = getattr(copy, "graph", None)
    if graph is not None and any(n.op == "call_module" and n.target == layer for n in graph.nodes):
        return copy
    return model


def _check_inputs(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"`x` must be a float tensor of shape (N, C, H, W), got {shape}.")
    target = torch.as_tensor(target, device=x.device).long().flatten()
    if target.numel() == 1 and len(x) > 1:
        target = target.expand(len(x))
    if target.numel() != len(x):
        raise ValueError(f"`target` has {target.numel()} entries for {len(x)} images.")
    return target


def rows_to_explain(predicted: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (image, class) pairs to explain: each image for its true class, and for the predicted class when that
    differs (or when labels are unknown: only the predicted class).

    Shape:
        predicted: (N,); labels: (N,) or None. Returns each row's image index and class, (R,) each, on the CPU.
    """
    rows: list[tuple[int, int]] = []
    for i, pred in enumerate(predicted.tolist()):
        true = int(labels[i]) if labels is not None else pred
        rows += [(i, true)] + ([(i, pred)] if pred != true else [])
    return torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


def class_scores(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The score of each image's ``target`` class: the logit of that class; for a single-logit (sigmoid) head the
    logit for class 1 and its negative for class 0 (the log-odds of the class).

    Shape:
        logits: (N, ..., K); target: (N,). Returns (N, ...).
    """
    target = target.to(logits.device).view(-1, *[1] * (logits.ndim - 1))
    if logits.shape[-1] == 1:
        if bool(((target != 0) & (target != 1)).any()):
            raise ValueError(
                f"a single-logit (binary) head has classes 0 and 1, got targets {target.flatten().tolist()}."
            )
        return torch.where(target == 1, logits, -logits).squeeze(-1)
    return logits.gather(-1, target.expand(*logits.shape[:-1], 1)).squeeze(-1)


def target_scores(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The output at each row's target class (see :func:`class_scores`). Shape: (N, K), (N,) -> (N,)."""
    if output.ndim != 2:
        raise ValueError(f"the model must return class scores of shape (N, K), got {tuple(output.shape)}.")
    return class_scores(output, target)


Head = Literal["auto", "softmax", "sigmoid", "multilabel"]
#: The kinds of classification head :func:`head_outputs` understands.
HEADS = ("auto", "softmax", "sigmoid", "multilabel")


def resolve_head(head: str, outputs: int) -> str:
    """The head a model with ``outputs`` logits has: ``auto`` is ``sigmoid`` for one output, else ``softmax``.
    Raises ``ValueError`` (naming ``head``) for a head that cannot read that many outputs."""
    if head not in HEADS:
        raise ValueError(f"`head` must be one of {HEADS}, got {head!r}.")
    if head == "auto":
        return "sigmoid" if outputs == 1 else "softmax"
    if head == "sigmoid" and outputs != 1:
        raise ValueError(f"`head`='sigmoid' is a binary head with one logit; the model has {outputs} outputs. Use "
                         "'multilabel' for one sigmoid per class, or 'softmax'.")  # fmt: skip
    if head == "softmax" and outputs == 1:
        raise ValueError("`head`='softmax' needs at least two outputs: a softmax over one logit is always 1. Use "
                         "'sigmoid' (or 'auto') for a single-logit binary classifier.")  # fmt: skip
    return head


def head_outputs(logits: torch.Tensor, head: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities and predicted classes of a classification head.

    - ``softmax``: softmax probabilities; the predicted class is the most probable.
    - ``sigmoid`` (one logit, binary): probabilities of classes 0 and 1, ``(1 - sigmoid, sigmoid)``; the predicted
      class is ``logit > 0``.
    - ``multilabel``: an independent sigmoid per class (they need not sum to 1); the "predicted" class is the most
      probable one.
    - ``auto``: ``sigmoid`` for one output, else ``softmax``.

    Shape:
        logits: (..., K). Returns probabilities (..., K) ((..., 2) for ``sigmoid``) and predictions (...).
    """
    head = resolve_head(head, logits.shape[-1])
    logits = logits.float()
    if head == "sigmoid":
        p = logits.sigmoid()
        return torch.cat([1 - p, p], dim=-1), (logits.squeeze(-1) > 0).long()
    probs = logits.sigmoid() if head == "multilabel" else logits.softmax(dim=-1)
    return probs, logits.argmax(dim=-1)


def _fresh(x: torch.Tensor) -> torch.Tensor:
    # A clone outside inference mode: the model's in-place ops must not touch the caller's tensor. The model gets a
    # further `.clone()` of this leaf, so a model that edits its input in place (`x.sub_(0.5)`, `x[:, 0] = ...`)
    # works, and gradients still reach the leaf.
    return x.detach().clone().requires_grad_(True)


def input_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """``d score[target] / d x`` per image, computed in chunks of ``batch_size``.

    Shape:
        x: (N, C, H, W); target: (N,) or scalar. Returns (N, C, H, W).
    """
    target = _check_inputs(x, target)
    grads = []
    with gradient_context(model):
        for start in range(0, len(x), batch_size):
            xb = _fresh(x[start : start + batch_size])
            scores = target_scores(model(xb.clone()), target[start : start + batch_size])
            (g,) = torch.autograd.grad(scores.sum(), xb)
            grads.append(g.detach())
    return torch.cat(grads)


def gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """Vanilla gradient map: ``|d score / d x|``, max over colour channels. Shape: (N, C, H, W) -> (N, H, W)."""
    return input_gradient(model, x, target, batch_size=batch_size).abs().amax(dim=1)


def smoothgrad(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    n: int = 25,
    noise_level: float = 0.15,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    batch_size: int = 64,
    reduce: bool = True,
) -> torch.Tensor:
    """SmoothGrad: the mean of ``|grad|`` over ``n`` noisy copies of each image.

    Args:
        noise_level: sigma of the Gaussian noise relative to each image's value range ``x_max - x_min``.
        generator: source of the noise (a private generator keeps the global RNG untouched).
        noise: explicit noise of shape (N, n, C, H, W) (then ``noise_level`` and ``generator`` are unused).
        batch_size: noisy images per forward/backward pass.
        reduce: max over colour channels (a map per image) instead of per-channel values.

    Shape:
        x: (N, C, H, W). Returns (N, H, W) with ``reduce``, else (N, C, H, W).
    """
    target = _check_inputs(x, target)
    if n < 1:
        raise ValueError(f"`n` must be >= 1, got {n}.")
    if noise is not None:
        if noise.shape != (len(x), n, *x.shape[1:]):
            raise ValueError(f"`noise` must have shape {(len(x), n, *x.shape[1:])}, got {tuple(noise.shape)}.")
    sigma = noise_level * (x.flatten(1).amax(1) - x.flatten(1).amin(1))  # (N,)
    total = torch.zeros_like(x, dtype=torch.float32)
    flat = len(x) * n
    with gradient_context(model):
        for start in range(0, flat, batch_size):
            idx = torch.arange(start, min(start + batch_size, flat), device=x.device)
            image = idx // n
            if noise is not None:
                eps = noise.reshape(flat, *x.shape[1:])[idx].to(x.device, x.dtype)
            else:
                eps = torch.randn((len(idx), *x.shape[1:]), generator=generator, device="cpu").to(x.device, x.dtype)
                eps = eps * sigma[image].view(-1, 1, 1, 1)
            xb = _fresh(x[image] + eps)
            scores = target_scores(model(xb.clone()), target[image])
            (g,) = torch.autograd.grad(scores.sum(), xb)
            total.index_add_(0, image, g.detach().abs().float())
    mean = total / n
    return mean.amax(dim=1) if reduce else mean


def relu_rule_gradients(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, rules: Sequence[str], *, batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """The input gradient under each ReLU backward rule of ``rules`` ("plain": :func:`input_gradient`, "guided":
    :func:`guided_backprop`, "deconvnet": :func:`deconvnet`), from one forward pass per batch and one backward pass
    per rule over its graph (the methods cost a forward pass less each than apart). Warns, as they do, where the model
    has no ``nn.ReLU`` module for a rule other than "plain".

    Shape:
        x: (N, C, H, W); target: (N,) or scalar. Returns rule -> (N, C, H, W).
    """
    return _rule_gradients(model, x, target, rules, batch_size, stacklevel=3)


def _rule_gradients(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, rules: Sequence[str], batch_size: int, stacklevel: int
) -> dict[str, torch.Tensor]:
    """:func:`relu_rule_gradients`; its warning points ``stacklevel`` frames up (the public function's caller)."""
    target = _check_inputs(x, target)
    grads: dict[str, list[torch.Tensor]] = {rule: [] for rule in rules}
    with switchable_relu_rules(model) as (count, use), gradient_context(model):
        if count == 0 and set(rules) - {"plain"}:
            warnings.warn(
                f"{', '.join(sorted(set(rules) - {'plain'}))}: the model has no nn.ReLU modules, so its ReLU backward "
                "rule cannot be replaced (functional F.relu calls cannot be overridden); the result is the plain "
                "gradient. Use nn.ReLU modules.",
                UserWarning,
                stacklevel=stacklevel,
            )
        for start in range(0, len(x), batch_size):
            xb = _fresh(x[start : start + batch_size])
            total = target_scores(model(xb.clone()), target[start : start + batch_size]).sum()
            for k, rule in enumerate(rules):
                use(rule)
                (g,) = torch.autograd.grad(total, xb, retain_graph=k < len(rules) - 1)
                grads[rule].append(g.detach())
    return {rule: torch.cat(parts) for rule, parts in grads.items()}


def guided_backprop(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """Guided backpropagation: signed input-space gradients. Shape: (N, C, H, W) -> (N, C, H, W)."""
    return _rule_gradients(model, x, target, ["guided"], batch_size, stacklevel=3)["guided"]


def deconvnet(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """Deconvnet: signed input-space reconstructions. Shape: (N, C, H, W) -> (N, C, H, W)."""
    return _rule_gradients(model, x, target, ["deconvnet"], batch_size, stacklevel=3)["deconvnet"]


def grad_cam(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    layer: nn.Module,
    *,
    relu: bool = True,
    upsample: bool = True,
    batch_size: int = 64,
    grid: TokenGrid | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Grad-CAM of ``layer`` (its last call per forward is used).

    The layer's output is a map (N, K, h, w); a channels-last map (N, h, w, K) with ``channels_last``; or, on a
    vision transformer, a token sequence (N, T, K) on the patch ``grid`` (:class:`~lightning_viz._layers.TokenGrid`,
    found from the model by :func:`~lightning_viz._layers.trace_data_flow`): its prefix tokens (class, registers)
    are dropped and the patch tokens laid out as (N, K, rows, cols) before the channel weights are taken.

    Shape:
        x: (N, C, H, W). Returns (N, H, W) with ``upsample`` (bilinear), else (N, h, w).
    """
    target = _check_inputs(x, target)
    maps = []
    with gradient_context(model):
        for start in range(0, len(x), batch_size):
            xb = _fresh(x[start : start + batch_size])
            with capture([layer], keep="last") as captured:
                scores = target_scores(model(xb.clone()), target[start : start + batch_size])
            if not captured[0]:
                raise RuntimeError("the Grad-CAM layer was not called in the forward pass.")
            acts = captured[0][-1]
            if acts.ndim != 4 and (grid is None or acts.ndim != 3):
                raise ValueError(f"the Grad-CAM layer's output must be (N, K, h, w), got {tuple(acts.shape)}.")
            (g,) = torch.autograd.grad(scores.sum(), acts)
            acts, g = (spatial_view(t.detach(), grid=grid, channels_last=channels_last) for t in (acts, g))
            cam = (g.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1).detach()
            maps.append(cam.clamp(min=0) if relu else cam)
    cam = torch.cat(maps)
    if upsample:
        cam = F.interpolate(cam.unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    return cam


def effective_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias a layer adds to its output: a conv's ``bias``; for BatchNorm in eval, ``beta - mean * gamma / std``."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return None if module.bias is None else module.bias.detach()
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.running_mean is None or module.running_var is None:
            return None
        gamma = module.weight.detach() if module.weight is not None else torch.ones_like(module.running_mean)
        beta = module.bias.detach() if module.bias is not None else torch.zeros_like(module.running_mean)
        return beta - module.running_mean * gamma / torch.sqrt(module.running_var + module.eps)
    return None


def _minmax(t: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    t = t.abs()
    flat = t.flatten(1)
    t = t - flat.amin(1).view(-1, *[1] * (t.ndim - 1))
    return t / (t.flatten(1).amax(1).view(-1, *[1] * (t.ndim - 1)) + eps)


def fullgrad(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """FullGrad saliency (input-gradient term plus every conv/BatchNorm bias-gradient term). Shape -> (N, H, W)."""
    target = _check_inputs(x, target)
    layers = [m for m in model.modules() if effective_bias(m) is not None]
    out = []
    with gradient_context(model):
        for start in range(0, len(x), batch_size):
            xb = _fresh(x[start : start + batch_size])
            with capture(layers) as captured:
                scores = target_scores(model(xb.clone()), target[start : start + batch_size])
            sites = [(layer, t) for layer, outs in zip(layers, captured) for t in outs if t.ndim == 4]
            grads = torch.autograd.grad(scores.sum(), [xb] + [t for _, t in sites], allow_unused=True)
            saliency = _minmax(grads[0] * xb.detach()).sum(dim=1)
            for (layer, _), g in zip(sites, grads[1:]):
                if g is None:
                    continue
                term = _minmax(g * effective_bias(layer).view(1, -1, 1, 1)).sum(dim=1, keepdim=True)
                # summed over channels before upsampling: bilinear interpolation is linear, so this equals upsampling
                # each channel and summing, at 1/C of the cost
                term = F.interpolate(term, size=x.shape[-2:], mode="bilinear", align_corners=True)
                saliency = saliency + term.squeeze(1)
            out.append(saliency.detach())
    return torch.cat(out)
