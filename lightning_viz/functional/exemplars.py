"""Which dataset images most excite each channel: streaming top-k, receptive fields, single-unit projections."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from lightning_viz._hooks import capture
from lightning_viz._layers import TokenGrid
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


_OPENED = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Dropout)


def _positive_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """Stand-in parameters and buffers under which every path from input to output carries a positive weight:
    convolutions and linear layers get weights 1 and bias 0, BatchNorm (in eval mode) becomes the identity."""
    values: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            values[prefix + "weight"] = torch.ones_like(module.weight)
            if module.bias is not None:
                values[prefix + "bias"] = torch.zeros_like(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.running_mean is not None and module.running_var is not None:
                values[prefix + "running_mean"] = torch.zeros_like(module.running_mean)
                values[prefix + "running_var"] = torch.full_like(module.running_var, 1.0 - module.eps)
            if module.weight is not None and module.bias is not None:
                values[prefix + "weight"] = torch.ones_like(module.weight)
                values[prefix + "bias"] = torch.zeros_like(module.bias)
    return values


@contextlib.contextmanager
def _positive_paths(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Within the body, ``model`` called through ``torch.func.functional_call`` with the yielded values computes as a
    copy whose every path is positive, so gradients never cancel: activations and leaf normalisations pass their
    input on, max pools average with the same geometry. No copy of the model is made (a deep copy of a large model
    costs more than the rest of an exemplar call); the hooks are removed and the modes restored on exit."""
    modes = [(m, m.training) for m in model.modules()]
    handles = []
    try:
        model.eval()
        for module in model.modules():
            if isinstance(module, _OPENED) or (
                isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and not any(module.children())
            ):
                handles.append(module.register_forward_hook(_pass_input))
            elif isinstance(module, nn.MaxPool2d):
                handles.append(module.register_forward_hook(_average_instead))
        yield _positive_values(model)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.train(mode)


def _pass_input(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    return args[0]


def _average_instead(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    pool = cast(nn.MaxPool2d, module)
    return F.avg_pool2d(args[0], pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode)


def receptive_field_boxes(
    model: nn.Module, layer: nn.Module, input_shape: tuple[int, int, int], positions: torch.Tensor
) -> torch.Tensor:
    """The input region each unit of ``layer`` sees: exact, computed on the model, not assumed from a formula.

    With every input-to-unit path of positive weight (the model's own modules, with stand-in values, see
    :func:`_positive_paths`), the gradient of one unit w.r.t. a constant input is positive exactly on that unit's
    receptive field; boxes are clipped to the image.
    (A model that max-pools functionally with ``F.max_pool2d`` can get boxes that are too small: only pooling
    modules are replaced.)

    Args:
        input_shape: (C, H, W) of the images.
        positions: (P, 2) unit locations (y, x) in the layer's output.

    Returns:
        (P, 4) boxes as (top, left, bottom, right), bottom/right exclusive.
    """
    device = next(model.parameters(), torch.zeros(())).device
    boxes = []
    with gradient_context(model), _positive_paths(model) as values:
        for start in range(0, len(positions), 64):
            pos = positions[start : start + 64].to(device)
            x = torch.ones((len(pos), *input_shape), device=device, requires_grad=True)
            with capture([layer], keep="last") as captured:
                torch.func.functional_call(model, values, (x,), strict=False)
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
