"""Which dataset images most excite each channel: streaming top-k, receptive fields, single-unit projections."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import torch
from torch import nn

from lightning_viz._hooks import capture
from lightning_viz._layers import TokenGrid, detached_deepcopy
from lightning_viz.functional._autograd import gradient_context, relu_backward_rule


class StreamingTopK:
    """Per channel, the ``k`` highest scores seen so far with their sample ids and spatial locations.

    Memory is O(channels x k): only scores, ids and locations are kept, never images or activations.
    """

    def __init__(self, channels: int, k: int) -> None:
        if k < 1:
            raise ValueError(f"`k` must be >= 1, got {k}.")
        self.k = k
        self.scores = torch.full((channels, 0), float("-inf"))
        self.ids = torch.zeros((channels, 0), dtype=torch.long)
        self.locations = torch.zeros((channels, 0, 2), dtype=torch.long)

    @torch.no_grad()
    def update(self, scores: torch.Tensor, ids: torch.Tensor, locations: torch.Tensor) -> None:
        """Add a batch. Shape: scores (B, C), ids (B,), locations (B, C, 2)."""
        scores = torch.nan_to_num(scores.detach().float().cpu(), nan=float("-inf")).T  # (C, B)
        ids = ids.cpu().view(1, -1).expand(scores.shape[0], -1)
        locations = locations.cpu().transpose(0, 1)  # (C, B, 2)
        all_scores = torch.cat([self.scores, scores], dim=1)
        all_ids = torch.cat([self.ids, ids], dim=1)
        all_locations = torch.cat([self.locations, locations], dim=1)
        k = min(self.k, all_scores.shape[1])
        # stable: among equal scores, earlier samples win (the sort keeps the current order for ties)
        order = torch.sort(all_scores, dim=1, descending=True, stable=True).indices[:, :k]
        self.scores = all_scores.gather(1, order)
        self.ids = all_ids.gather(1, order)
        self.locations = all_locations.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))


def spatial_max(activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each channel's maximal activation and where it is. Shape: (B, C, H, W) -> (B, C), (B, C, 2) as (y, x)."""
    if activations.ndim != 4:
        raise ValueError(f"activations must be (B, C, H, W) to have a location, got {tuple(activations.shape)}.")
    b, c, h, w = activations.shape
    flat = activations.detach().reshape(b, c, h * w)
    scores, index = flat.max(dim=2)
    return scores, torch.stack([index // w, index % w], dim=-1)


class _PositivePath(nn.Module):
    """Stand-in for max pooling in the receptive-field copy: an average pool with the same geometry."""

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool.kernel_size, pool.stride, pool.padding, ceil_mode=pool.ceil_mode)

    def forward(self, x):
        return self.pool(x)


def _positive_copy(model: nn.Module, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A copy in which every path from input to output carries a positive weight, so gradients never cancel.

    Convolutions and linear layers get weights 1 and bias 0, BatchNorm becomes the identity, activations become the
    identity and max pools become average pools with the same geometry. Returns (copy, the copy's ``layer``).
    """
    names = {m: n for n, m in model.named_modules()}
    target_name = names[layer]
    # the copy's weights are constants: it depends on the model's structure only, so it is made once per structure
    shape = tuple((n, type(m).__name__) for n, m in model.named_modules())
    shape += tuple((n, tuple(t.shape), t.dtype, t.device) for n, t in model.state_dict().items())
    try:
        kept = _POSITIVE_COPIES.get(model)
    except TypeError:  # a model that cannot be weakly referenced: a fresh copy each time
        kept = None
    if kept is not None and kept[0] == shape:
        return kept[1], kept[1].get_submodule(target_name)
    original = model
    model = detached_deepcopy(model).eval()
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                module.weight.fill_(1.0)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.zero_()
                module.running_var.fill_(1.0 - module.eps)
                if module.weight is not None:
                    module.weight.fill_(1.0)
                    module.bias.zero_()
            elif isinstance(module, (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Dropout)) or (
                isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and not any(module.children())
            ):
                # identity: keeps every path open (a normalisation would turn the constant input into zeros)
                module.forward = lambda x: x
            elif isinstance(module, nn.MaxPool2d) and name:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, _PositivePath(module))
    with contextlib.suppress(TypeError):
        _POSITIVE_COPIES[original] = (shape, model)
    return model, model.get_submodule(target_name)


#: model -> (its structure, its positive copy): see :func:`_positive_copy`.
_POSITIVE_COPIES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, nn.Module]] = weakref.WeakKeyDictionary()


def receptive_field_boxes(
    model: nn.Module, layer: nn.Module, input_shape: tuple[int, int, int], positions: torch.Tensor
) -> torch.Tensor:
    """The input region each unit of ``layer`` sees: exact, computed on the model, not assumed from a formula.

    On a copy whose every input-to-unit path has positive weight (see :func:`_positive_copy`), the gradient of one
    unit w.r.t. a constant input is positive exactly on that unit's receptive field; boxes are clipped to the image.
    (A model that max-pools functionally with ``F.max_pool2d`` can get boxes that are too small: only pooling
    modules are replaced.)

    Args:
        input_shape: (C, H, W) of the images.
        positions: (P, 2) unit locations (y, x) in the layer's output.

    Returns:
        (P, 4) boxes as (top, left, bottom, right), bottom/right exclusive.
    """
    positive, target = _positive_copy(model, layer)
    device = next(positive.parameters(), torch.zeros(())).device
    boxes = []
    with gradient_context(positive):
        for start in range(0, len(positions), 64):
            pos = positions[start : start + 64].to(device)
            x = torch.ones((len(pos), *input_shape), device=device, requires_grad=True)
            with capture([target], keep="last") as captured:
                positive(x)
            acts = captured[0][-1]
            rows = torch.arange(len(pos), device=device)
            unit = acts.sum(dim=1)[rows, pos[:, 0], pos[:, 1]]
            (g,) = torch.autograd.grad(unit.sum(), x)
            mask = g.abs().sum(dim=1) > 0  # (P, H, W)
            for m in mask:
                ys, xs = m.any(dim=1).nonzero().flatten(), m.any(dim=0).nonzero().flatten()
                if len(ys) == 0:  # no path found (an operation the positive copy cannot open): the whole image
                    boxes.append([0, 0, int(input_shape[-2]), int(input_shape[-1])])
                    continue
                boxes.append([int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1])
    return torch.tensor(boxes, dtype=torch.long).view(-1, 4)


def patch_boxes(grid: TokenGrid, positions: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The pixels of the patches at ``positions`` (row, col) of a vision transformer's patch ``grid``: where a token
    unit's exemplar is. (Attention lets every token see the whole image, so a receptive field says nothing; the
    patch is where the token's own input came from.)

    Shape:
        positions: (P, 2). Returns (P, 4) boxes as (top, left, bottom, right), bottom/right exclusive.
    """
    boxes = [grid.patch_box(int(r), int(c), height, width) for r, c in positions.tolist()]
    return torch.tensor(boxes, dtype=torch.long).view(-1, 4)


def unit_projection(
    model: nn.Module,
    layer: nn.Module,
    images: torch.Tensor,
    channels: torch.Tensor,
    positions: torch.Tensor,
    rule: str = "guided",
    view: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Project one unit's activation per image back to pixel space (guided backprop or deconvnet of that unit).

    ``view`` turns the layer's output into channels-first maps first (a token layer: its patch tokens on the patch
    grid, :func:`~lightning_viz._layers.spatial_view`).

    Shape:
        images (N, C, H, W); channels (N,); positions (N, 2). Returns (N, C, H, W), signed.
    """
    out = []
    with gradient_context(model), relu_backward_rule(model, rule):
        for start in range(0, len(images), 64):
            x = images[start : start + 64].detach().clone().requires_grad_(True)
            with capture([layer], keep="last") as captured:
                model(x)
            acts = view(captured[0][-1]) if view is not None else captured[0][-1]
            rows = torch.arange(len(x), device=x.device)
            c = channels[start : start + 64].to(x.device)
            p = positions[start : start + 64].to(x.device)
            unit = acts[rows, c, p[:, 0], p[:, 1]]
            (g,) = torch.autograd.grad(unit.sum(), x)
            out.append(g.detach())
    return torch.cat(out)
