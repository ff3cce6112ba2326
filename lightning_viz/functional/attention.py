"""Attention weights of vision transformers, attention rollout and its gradient-weighted form. Pure tensor code.

Fused attention (``F.scaled_dot_product_attention`` in timm's ``Attention``, ``need_weights=False`` in torchvision's
``EncoderBlock.self_attention``) never materialises the attention weights. They are recomputed here from what the
attention module received, with the module's own projection weights: ``in_proj_weight`` / ``in_proj_bias`` (or the
separate ``q_proj_weight`` / ``k_proj_weight``) for ``nn.MultiheadAttention``, ``qkv`` and ``q_norm`` / ``k_norm``
for timm's ``Attention``. A forward hook that only reads leaves the model's output bit-identical.

Supported modules (:func:`supports`): ``nn.MultiheadAttention`` (without ``add_bias_kv`` / ``add_zero_attn``), and
timm's ``timm.layers.Attention`` and subclasses that keep its ``forward`` (``vit_*``, ``deit_*``). Window attention
(Swin), rotary attention (EVA) and others are not recognised.

Rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers"): per layer, the heads' mean attention
plus the identity for the residual connection, rows renormalised, ``0.5 A + 0.5 I``; the layers multiplied from the
first to the last, ``R = A_L ... A_1``. Row ``i`` of ``R`` says how much each input token flows into token ``i``;
each row sums to 1. Gradient-weighted rollout (Chefer, Gur & Wolf, 2021, "Generic Attention-model Explainability"):
``A_bar = mean_heads((dy/dA * A)^+)`` and ``R <- R + A_bar R`` from ``R = I``; ``y`` is the target class's score. Its
rows do not sum to 1.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

HeadFusion = Literal["mean", "max", "min"]


#: Where timm defines the ViT ``Attention`` (older releases kept it in the model's module); timm has other classes
#: named ``Attention`` (LeViT, EfficientFormer) that compute attention differently and are not recognised.
_TIMM_ATTENTION_MODULES = ("timm.layers.attention", "timm.models.vision_transformer")


def _timm_attention_class(module: nn.Module) -> type | None:
    for cls in type(module).__mro__:
        if cls.__name__ == "Attention" and cls.__module__ in _TIMM_ATTENTION_MODULES:
            return cls
    return None


def supports(module: nn.Module) -> bool:
    """Whether the attention weights of ``module`` can be recomputed from its inputs."""
    if isinstance(module, nn.MultiheadAttention):
        return module.bias_k is None and not module.add_zero_attn
    cls = _timm_attention_class(module)
    has_qkv = isinstance(getattr(module, "qkv", None), nn.Linear)
    return cls is not None and type(module).forward is cls.forward and has_qkv


def looks_like_attention(module: nn.Module) -> bool:
    """Whether ``module`` is some attention layer (supported or not): for saying what is not supported."""
    name = type(module).__name__.lower()
    return isinstance(module, nn.MultiheadAttention) or (name.endswith("attention") and any(module.children()))


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The supported attention modules of ``model`` by name, in module order (nested ones inside them excluded)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if name and supports(module) and not any(name.startswith(f"{outer}.") for outer in found):
            found[name] = module
    return found


def unsupported_attention(model: nn.Module) -> list[str]:
    """Names of attention-like modules of ``model`` whose weights :func:`attention_weights` cannot recompute."""
    supported = attention_modules(model)
    return [
        name
        for name, module in model.named_modules()
        if name
        and looks_like_attention(module)
        and name not in supported
        and not any(name.startswith(f"{outer}.") for outer in supported)
    ]


# ------------------------------------------------------------------------------------------- recomputation
def _argument(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _mha_projections(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple[torch.Tensor, ...]:
    """q, k, v of shape (N, H, L, head_dim) and whether the input was (L, N, E) / unbatched."""
    query, key, value = (_argument(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    if query.dim() == 2:  # unbatched (L, E)
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    elif not module.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    b_q = b_k = b_v = None
    if module.in_proj_bias is not None:
        b_q, b_k, b_v = module.in_proj_bias.chunk(3)
    heads, head_dim = module.num_heads, module.head_dim

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)

    return split(F.linear(query, w_q, b_q)), split(F.linear(key, w_k, b_k)), split(F.linear(value, w_v, b_v))


def _mha_scores(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _mha_projections(module, args, kwargs)
    n, heads, length, source = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    # nn.MultiheadAttention scales q before the product (F.multi_head_attention_forward does the same)
    scores = (q * math.sqrt(1.0 / q.shape[-1])) @ k.transpose(-2, -1)
    attn_mask = _argument(args, kwargs, 5, "attn_mask")
    padding = _argument(args, kwargs, 3, "key_padding_mask")
    if _argument(args, kwargs, 7, "is_causal", False) and attn_mask is None:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=scores.device).triu(1)
    if attn_mask is not None:
        mask = _additive(attn_mask, scores.dtype, disallowed=True)
        scores = scores + (mask.view(n, heads, length, source) if mask.dim() == 3 else mask)
    if padding is not None:
        scores = scores + _additive(padding, scores.dtype, disallowed=True).view(n, 1, 1, source)
    return scores, v


def _timm_scores(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    x = _argument(args, kwargs, 0, "x")
    b, n, _ = x.shape
    qkv = F.linear(x, module.qkv.weight, module.qkv.bias)
    q, k, v = qkv.reshape(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = module.q_norm(q), module.k_norm(k)
    scores = (q * module.scale) @ k.transpose(-2, -1)  # as timm's unfused path computes them
    attn_mask = _argument(args, kwargs, 1, "attn_mask")
    if _argument(args, kwargs, 2, "is_causal", False):
        scores = scores + torch.full((n, n), float("-inf"), dtype=scores.dtype, device=scores.device).triu(1)
    elif attn_mask is not None:
        scores = scores + _additive(attn_mask, scores.dtype, disallowed=False)
    return scores, v


def _additive(mask: torch.Tensor, dtype: torch.dtype, *, disallowed: bool) -> torch.Tensor:
    """A boolean mask as an additive one (-inf where attention is not allowed); a float mask as it is.

    ``disallowed``: ``True`` marks the excluded positions (nn.MultiheadAttention), else the allowed ones (SDPA).
    """
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    excluded = mask if disallowed else ~mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(excluded, float("-inf"))


def _scores(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(module, nn.MultiheadAttention):
        return _mha_scores(module, args, kwargs)
    return _timm_scores(module, args, kwargs)


def attention_weights(module: nn.Module, args: tuple, kwargs: Mapping[str, Any] | None = None) -> torch.Tensor:
    """The attention weights ``module`` computes for the inputs ``args`` / ``kwargs`` of one of its calls.

    Args:
        module: a supported attention module (:func:`supports`).
        args, kwargs: the positional and keyword arguments of the call (as a forward pre-hook receives them).

    Returns:
        Softmax attention per head, without dropout (as in eval mode).

    Shape:
        Returns (N, heads, queries, keys); an unbatched call gives N = 1.
    """
    if not supports(module):
        raise TypeError(f"cannot recompute the attention weights of a {type(module).__name__}.")
    scores, _ = _scores(module, tuple(args), dict(kwargs or {}))
    return scores.softmax(dim=-1)


def _output_from(module: nn.Module, args: tuple, kwargs: dict, attn: torch.Tensor, v: torch.Tensor, original: Any):
    """The module's output recomputed from ``attn`` (so that gradients reach ``attn``), in the module's layout."""
    n, heads, length, head_dim = attn.shape[0], attn.shape[1], attn.shape[2], v.shape[-1]
    mixed = (attn @ v).transpose(1, 2).reshape(n, length, heads * head_dim)
    if isinstance(module, nn.MultiheadAttention):
        out = F.linear(mixed, module.out_proj.weight, module.out_proj.bias)
        query = _argument(args, kwargs, 0, "query")
        if query.dim() == 2:
            out = out.squeeze(0)
        elif not module.batch_first:
            out = out.transpose(0, 1)
        return (out, *original[1:]) if isinstance(original, tuple) else out
    out = getattr(module, "norm", nn.Identity())(mixed)
    gate = getattr(module, "gate", None)
    if gate is not None:
        out = out * F.linear(_argument(args, kwargs, 0, "x"), gate.weight, gate.bias).sigmoid()
    return F.linear(out, module.proj.weight, module.proj.bias)


@contextlib.contextmanager
def capture_attention(
    modules: Mapping[str, nn.Module], *, differentiable: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the attention weights of each call of ``modules`` into the yielded dict (name -> (N, H, Lq, Lk)).

    Without ``differentiable`` the hooks only read: the model's output stays bit-identical, the weights are
    detached. With ``differentiable=True`` each module's output is replaced by the same computation done from the
    recorded weights (equal up to float rounding), so that ``torch.autograd.grad`` of the output with respect to
    the recorded weights is defined. A module called more than once keeps its last call. Hooks are removed on exit.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            scores, v = _scores(module, args, kwargs)
            attn = scores.softmax(dim=-1)
            if not differentiable:
                captured[name] = attn.detach()
                return None
            captured[name] = attn
            return _output_from(module, args, kwargs, attn, v, output)

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name), with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def attention_maps(model: nn.Module, modules: Mapping[str, nn.Module], images: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward pass without gradients; each module's attention weights, (N, H, Lq, Lk), in module order."""
    with torch.no_grad(), capture_attention(modules) as captured:
        model(images)
    return {name: captured[name] for name in modules if name in captured}


def attention_gradients(
    model: nn.Module, modules: Mapping[str, nn.Module], images: torch.Tensor, target: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Attention weights and the gradient of the target class's score with respect to them.

    Args:
        model: returns class scores (N, K).
        modules: the attention modules.
        images: the input batch (not modified).
        target: the class per image; default the predicted class.

    Returns:
        ``(weights, gradients, scores)``: name -> (N, H, Lq, Lk) each (detached), and the model's scores (N, K).
        Gradients come from ``torch.autograd.grad``: no parameter's ``.grad`` is touched.
    """
    x = images.detach().clone().requires_grad_(True)  # keeps a frozen model's attention on the autograd graph
    with torch.enable_grad(), capture_attention(modules, differentiable=True) as captured:
        scores = model(x)
        if not isinstance(scores, torch.Tensor) or scores.ndim != 2:
            shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(f"gradient-weighted rollout needs a model that returns class scores (N, K), got {shape}.")
        target = scores.argmax(dim=1) if target is None else target.to(scores.device)
        names = [name for name in modules if name in captured]
        chosen = scores.gather(1, target.view(-1, 1)).sum()
        grads = torch.autograd.grad(chosen, [captured[n] for n in names], allow_unused=True)
    weights = {n: captured[n].detach() for n in names}
    gradients = {n: torch.zeros_like(weights[n]) if g is None else g.detach() for n, g in zip(names, grads)}
    return weights, gradients, scores.detach()


# ------------------------------------------------------------------------------------------ rollout, entropy
def _fuse_heads(attn: torch.Tensor, head_fusion: HeadFusion) -> torch.Tensor:
    if head_fusion == "mean":
        return attn.mean(dim=1)
    if head_fusion == "max":
        return attn.amax(dim=1)
    if head_fusion == "min":
        return attn.amin(dim=1)
    raise ValueError(f"`head_fusion` must be one of ['mean', 'max', 'min'], got {head_fusion!r}.")


def _check_chain(attentions: Sequence[torch.Tensor]) -> None:
    if not attentions:
        raise ValueError("rollout needs the attention of at least one layer.")
    shapes = {tuple(a.shape[:1]) + tuple(a.shape[2:]) for a in attentions}
    if len(shapes) != 1 or attentions[0].shape[-1] != attentions[0].shape[-2]:
        raise ValueError(
            "rollout needs self-attention over the same tokens in every layer, got shapes "
            f"{[tuple(a.shape) for a in attentions]}."
        )


def attention_rollout(
    attentions: Sequence[torch.Tensor], *, head_fusion: HeadFusion = "mean", residual: bool = True
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) over the layers in order, first to last.

    Args:
        attentions: per layer, the attention weights (N, H, T, T).
        head_fusion: how the heads are combined per layer.
        residual: add the identity for the residual connection (``0.5 A + 0.5 I``) and renormalise the rows.

    Returns:
        The rolled-out attention; with ``residual`` and ``head_fusion="mean"`` every row sums to 1.

    Shape:
        Returns (N, T, T).
    """
    _check_chain(attentions)
    n, tokens = attentions[0].shape[0], attentions[0].shape[-1]
    eye = torch.eye(tokens, dtype=torch.float64, device=attentions[0].device)
    result = eye.expand(n, tokens, tokens)
    for attn in attentions:
        a = _fuse_heads(attn.double(), head_fusion)
        if residual:
            a = 0.5 * a + 0.5 * eye
            a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result.float()


def gradient_rollout(attentions: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gradient-weighted attention rollout (Chefer, Gur & Wolf, 2021): ``R <- R + mean_h((dA * A)^+) R``, R = I.

    Shape:
        attentions, gradients: per layer (N, H, T, T). Returns (N, T, T).
    """
    _check_chain(attentions)
    if len(gradients) != len(attentions):
        raise ValueError(f"got {len(attentions)} attention maps but {len(gradients)} gradients.")
    n, tokens = attentions[0].shape[0], attentions[0].shape[-1]
    result = torch.eye(tokens, dtype=torch.float64, device=attentions[0].device).expand(n, tokens, tokens)
    for attn, grad in zip(attentions, gradients):
        weighted = (grad.double() * attn.double()).clamp_min(0).mean(dim=1)
        result = result + weighted @ result
    return result.float()


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of each head's attention rows, over images and queries; ``0 log 0 = 0``.

    ``log(keys)`` is uniform attention; 0 is every query attending to one token (collapse).

    Shape:
        attn: (N, H, Lq, Lk). Returns (H,).
    """
    p = attn.detach().double()
    plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
    return (-plogp.sum(dim=-1)).mean(dim=(0, 2)).float()


def top_key_share(attn: torch.Tensor) -> torch.Tensor:
    """Per head, the share of all attention that goes to the single most-attended key (mean over images).

    About ``1 / keys`` for uniform attention, 1 when every query attends to the same token.

    Shape:
        attn: (N, H, Lq, Lk). Returns (H,).
    """
    return attn.detach().double().mean(dim=2).amax(dim=-1).mean(dim=0).float()


# ------------------------------------------------------------------------------------------------ token maps
def patch_grid(tokens: int, height: int, width: int, max_prefix: int = 8) -> tuple[int, int, int] | None:
    """``(prefix, rows, cols)``: how ``tokens`` split into leading prefix tokens (class, distillation, registers)
    and a ``rows x cols`` patch grid with the image's aspect ratio; ``None`` when no split fits.

    The smallest prefix that leaves a grid of the image's aspect ratio wins (17 tokens of a square image: one class
    token and 4 x 4 patches).
    """
    for prefix in range(min(max_prefix, tokens - 1) + 1):
        patches = tokens - prefix
        rows = max(1, round(math.sqrt(patches * height / width)))
        if patches % rows == 0:
            cols = patches // rows
            patch_h, patch_w = height / rows, width / cols
            if max(patch_h, patch_w) <= 1.25 * min(patch_h, patch_w):
                return prefix, rows, cols
    return None


def patch_map(matrix: torch.Tensor, prefix: int, rows: int, cols: int) -> torch.Tensor:
    """What each patch gets from the class token's row (``prefix >= 1``) or, without prefix tokens, on average over
    the patch queries, as a map over the patch grid.

    Shape:
        matrix: (..., T, T) (attention or rollout). Returns (..., rows, cols).
    """
    row = matrix[..., 0, :] if prefix >= 1 else matrix[..., prefix:, :].mean(dim=-2)
    return row[..., prefix:].reshape(*row.shape[:-1], rows, cols)


# --------------------------------------------------------------------------------------- rank collapse (#19)
#: Containers that hold blocks but are not a block themselves.
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def token_blocks(model: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, str]:
    """For each attention module, the transformer block around it (whose output is the residual stream after the
    block), or the attention module itself where no block holds it alone (then its input tokens are measured).

    A block is the nearest enclosing module that is not a container (``ModuleList``, ``Sequential``, ...) and holds no
    other attention module: timm's ``blocks.3`` for ``blocks.3.attn``, torchvision's ``encoder.layers.encoder_layer_3``.
    """
    named = dict(model.named_modules())
    out: dict[str, str] = {}
    for name in modules:
        parts, site = name.split("."), name
        for cut in range(len(parts) - 1, 0, -1):
            outer = ".".join(parts[:cut])
            if isinstance(named.get(outer), _CONTAINERS):
                continue
            if not any(other != name and other.startswith(f"{outer}.") for other in modules):
                site = outer
            break
        out[name] = site
    return out


@contextlib.contextmanager
def capture_tokens(model: nn.Module, modules: Mapping[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record, per attention module (by its name), the token representations after its block (:func:`token_blocks`)
    or, without a block, the tokens it receives; (N, T, D), detached. Hooks only read; removed on exit."""
    captured: dict[str, torch.Tensor] = {}
    named = dict(model.named_modules())
    handles = []

    def batch_first(x: torch.Tensor, attention: nn.Module) -> torch.Tensor:
        if x.dim() == 2:
            return x.unsqueeze(0)
        if isinstance(attention, nn.MultiheadAttention) and not attention.batch_first:
            return x.transpose(0, 1)
        return x

    def on_input(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _argument(args, kwargs, 0, "query" if isinstance(module, nn.MultiheadAttention) else "x")
            if isinstance(x, torch.Tensor):
                captured[name] = batch_first(x.detach(), module)

        return hook

    def on_output(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) and output else output
            if isinstance(out, torch.Tensor) and out.dim() == 3:
                captured[name] = batch_first(out.detach(), modules[name])

        return hook

    try:
        for name, site in token_blocks(model, modules).items():
            if site == name:
                handles.append(named[site].register_forward_pre_hook(on_input(name), with_kwargs=True))
            else:
                handles.append(named[site].register_forward_hook(on_output(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def token_rank(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How far a sequence of token representations is from rank 1 (Dong, Cordonnier & Loukas, 2021, "Attention is not
    all you need: pure attention loses rank doubly exponentially with depth").

    Args:
        tokens: token representations per image.

    Returns:
        ``(relative_residual, effective_rank)`` per image. ``relative_residual`` is ``||X - 1 x_mean^T||_F /
        ||X||_F``: 0 when every token is the same vector (rank collapse), about 1 for unrelated tokens.
        ``effective_rank`` is ``exp`` of the entropy of the normalised singular values of ``X`` (Roy & Vetterli,
        2007): 1 for a rank-1 ``X``, at most ``min(T, D)``; both 0 for an all-zero ``X``, NaN where it is not
        finite.

    Shape:
        tokens: (N, T, D). Returns (N,) and (N,).
    """
    x = tokens.detach().double()
    norm = x.flatten(1).norm(dim=1)
    residual = (x - x.mean(dim=1, keepdim=True)).flatten(1).norm(dim=1)
    relative = residual / norm.clamp_min(1e-300)  # 0 for an all-zero X: every token the same (zero) vector
    s = torch.linalg.svdvals(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))
    p = s / s.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    plogp = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
    rank = torch.where(norm > 0, (-plogp.sum(dim=-1)).exp(), torch.zeros_like(norm))
    bad = ~torch.isfinite(x.flatten(1)).all(dim=1)
    return relative.masked_fill(bad, math.nan).float(), rank.masked_fill(bad, math.nan).float()
