"""Exact incremental inference for occlusion: recompute only what the occluding window changes.

An occluding window changes only a small patch of the first feature maps: each output of a convolution or pooling
layer depends on a small field of its input. For a network whose first layers are such local operations
(convolutions, pooling, element-wise activations, BatchNorm in eval mode, residual additions), each occluded image's
early feature maps equal the clean image's everywhere except in a patch that grows layer by layer. This module runs
those layers only on the patch (with the halo each layer needs, cut from the clean image's maps), pastes the patch
into the clean maps where the local layers end, and runs the rest of the network as usual. The results equal a full
forward pass of the occluded image up to float rounding. (The idea is the one behind Krypton, Nakandala et al.,
"Incremental and Approximate Inference for Faster Occlusion-based Deep CNN Explanations", SIGMOD 2019.)

The model is split with ``torch.fx``: the local layers are the longest prefix of the traced graph whose nodes are
supported and whose patch stays under ``max_area`` of its feature map (beyond that, recomputing the patch saves
little). Models that cannot be traced, or that have no such prefix, are not handled (:meth:`IncrementalOcclusion.build`
returns ``None``); the caller then runs plain forward passes.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

#: Modules that act on each element (or each channel's elements) independently, in eval mode.
_POINTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.PReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.BatchNorm2d,
)
_POINTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, torch.sigmoid, torch.tanh}
_ADD_FUNCTIONS = {operator.add, torch.add}


@dataclass
class _Window:
    """A local layer's geometry along one axis: output ``i`` reads padded input ``[i*stride, i*stride + extent)``."""

    extent: int  # dilation * (kernel - 1) + 1
    stride: int
    padding: int


@dataclass
class _Step:
    """One node of the local prefix."""

    node: fx.Node
    kind: str  # "input", "window", "pointwise", "add"
    inputs: tuple[fx.Node, ...]
    height: int
    width: int
    module: nn.Module | None = None
    function: Any = None
    kwargs: dict | None = None
    geometry: tuple[_Window, _Window] | None = None
    pad_value: float = 0.0


def window_offsets(length: int, window: int, stride: int) -> list[int]:
    """Offsets ``0, stride, 2*stride, ...`` of an occluding window along an axis of ``length``, as Captum's
    ``Occlusion`` places them: while the previous window did not reach the end, so a last window may be cut off."""
    return list(range(0, max(length - window, 0) + stride, stride))


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _window_geometry(module: nn.Module) -> tuple[tuple[_Window, _Window], float] | None:
    """Geometry and padding value of a supported windowed layer, else ``None``."""
    if type(module) is nn.Conv2d:
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return None
        k, s, p, d = (_pair(v) for v in (module.kernel_size, module.stride, module.padding, module.dilation))
        pad = 0.0
    elif type(module) is nn.MaxPool2d:
        if module.ceil_mode or module.return_indices:
            return None
        stride = module.stride or module.kernel_size
        k, s, p, d = (_pair(v) for v in (module.kernel_size, stride, module.padding, module.dilation))
        pad = -math.inf
    elif type(module) is nn.AvgPool2d:
        if module.ceil_mode or module.divisor_override is not None:
            return None
        if not module.count_include_pad and _pair(module.padding) != (0, 0):
            return None
        k, s, p = (_pair(v) for v in (module.kernel_size, module.stride or module.kernel_size, module.padding))
        d = (1, 1)
        pad = 0.0
    else:
        return None
    axes = tuple(_Window(d[a] * (k[a] - 1) + 1, s[a], p[a]) for a in (0, 1))
    return axes, pad  # type: ignore[return-value]


def _apply_window(module: nn.Module, crop: torch.Tensor) -> torch.Tensor:
    """The layer on an explicitly padded crop (no padding of its own)."""
    if isinstance(module, nn.Conv2d):
        return F.conv2d(crop, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
    if isinstance(module, nn.MaxPool2d):
        return F.max_pool2d(crop, module.kernel_size, module.stride or module.kernel_size, 0, module.dilation)
    return F.avg_pool2d(crop, module.kernel_size, module.stride or module.kernel_size, 0, False, True)


def _tensor_meta_hw(node: fx.Node) -> tuple[int, int] | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) != 4:
        return None
    return int(shape[2]), int(shape[3])


def _python_value(node: fx.Node) -> bool:
    """A function or method call whose result holds no tensor (a size, a shape, a number): it changes no tensor, so
    the local layers may go on past it; it is computed with the rest of the network."""
    if node.op not in ("call_function", "call_method") or "tensor_meta" in node.meta:
        return False
    return not (node.op == "call_method" and str(node.target).endswith("_"))


def _overwrites_shared(node: fx.Node, inplace: bool) -> bool:
    """An in-place op whose input is also read elsewhere: the model then sees the modified tensor there, which a
    patch computed out of place would not reproduce. Such a node ends the local layers."""
    return bool(inplace) and len(node.args[0].users) > 1


def _weight_format(model: nn.Module) -> torch.memory_format:
    """Channels-last when the model's first 4-d weight is stored that way (the layout its convolutions want)."""
    for p in model.parameters():
        if p.ndim == 4:
            channels_last = p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            return torch.channels_last if channels_last else torch.contiguous_format
    return torch.contiguous_format


class _Ranges:
    """Per item, the first affected row/column of a node's map; the patch size is shared by all items."""

    def __init__(self, top: torch.Tensor, left: torch.Tensor, size_h: int, size_w: int) -> None:
        self.top, self.left, self.size_h, self.size_w = top, left, size_h, size_w


def _window_range(start: torch.Tensor, size: int, axis: _Window, out_len: int) -> tuple[torch.Tensor, int]:
    """Outputs whose field (input coordinates ``[i*s - p, i*s - p + extent)``) meets ``[start, start + size)``."""
    lo = torch.div(start - axis.extent + 1 + axis.padding + axis.stride - 1, axis.stride, rounding_mode="floor")
    hi = torch.div(start + size - 1 + axis.padding, axis.stride, rounding_mode="floor")
    lo = lo.clamp(0, out_len - 1)
    hi = hi.clamp(0, out_len - 1)
    length = int((hi - lo).max()) + 1
    length = min(length, out_len)
    return lo.clamp(max=out_len - length), length


def _union_range(starts: list[torch.Tensor], sizes: list[int], out_len: int) -> tuple[torch.Tensor, int]:
    lo = torch.stack(starts).amin(0)
    hi = torch.stack([s + n for s, n in zip(starts, sizes)]).amax(0)
    length = min(int((hi - lo).max()), out_len)
    return lo.clamp(max=out_len - length), length


class IncrementalOcclusion:
    """Forward passes of occluded images that recompute only the window's patch in the model's first local layers.

    Use :meth:`build` (returns ``None`` when the model can't be handled), then :meth:`prepare` once per set of clean
    images and :meth:`forward` per batch of (image, window position) pairs.
    """

    def __init__(
        self, graph_module: fx.GraphModule, steps: list[_Step], frontier: list[fx.Node], suffix: fx.GraphModule
    ) -> None:
        self.graph_module = graph_module
        self.steps = steps
        self.frontier = frontier
        self.suffix = suffix
        self._clean: dict[fx.Node, torch.Tensor] = {}
        self._padded: dict[tuple[fx.Node, int, int, float], torch.Tensor] = {}
        self._format = _weight_format(graph_module)

    # -------------------------------------------------------------------------------------------------- building
    @classmethod
    def build(
        cls, model: nn.Module, example: torch.Tensor, window: int, stride: int, *, max_area: float = 0.6
    ) -> IncrementalOcclusion | None:
        """Split ``model`` for occlusion of images shaped like ``example`` (1, C, H, W); ``None`` if not worthwhile."""
        from torch.fx.passes.shape_prop import ShapeProp

        try:
            gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            if len(placeholders) != 1:
                return None
            with torch.no_grad():
                ShapeProp(gm).propagate(example.clone())  # the model may edit its input in place
        except Exception:
            return None
        modules = dict(gm.named_modules())
        h, w = example.shape[-2:]
        # windows cut off by the border are shifted inside it (their patch then holds some clean pixels)
        tops = torch.tensor(window_offsets(h, window, stride)).clamp(max=h - window)
        lefts = torch.tensor(window_offsets(w, window, stride)).clamp(max=w - window)
        # Static simulation over every window position: the patch size of each node.
        ranges: dict[fx.Node, _Ranges] = {}
        steps: list[_Step] = []
        for node in gm.graph.nodes:
            if _python_value(node):
                continue  # e.g. `n = x.shape[0]`: runs with the rest of the network, reading the occluded input
            step = cls._classify(node, modules, ranges)
            if step is None:
                if node.op == "placeholder":
                    continue
                break
            if step.kind == "input":
                grid_t, grid_l = torch.meshgrid(tops, lefts, indexing="ij")
                rng = _Ranges(grid_t.flatten(), grid_l.flatten(), window, window)
            else:
                rng = cls._advance(step, [ranges[i] for i in step.inputs])
            if step.kind != "input" and rng.size_h * rng.size_w > max_area * step.height * step.width:
                break
            ranges[node] = rng
            steps.append(step)
        local = {s.node for s in steps}
        if not any(s.kind == "window" for s in steps):
            return None
        frontier = [s.node for s in steps if any(user not in local for user in s.node.users)]
        suffix_graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in frontier:
            env[node] = suffix_graph.placeholder(f"{node.name}_patched")
        for node in gm.graph.nodes:
            if node in local:
                continue
            if node.op == "placeholder":
                return None  # unreachable: the single placeholder is the input step
            env[node] = suffix_graph.node_copy(node, lambda n: env[n])
        suffix = fx.GraphModule(gm, suffix_graph)
        return cls(gm, steps, frontier, suffix)

    @staticmethod
    def _classify(node: fx.Node, modules: dict[str, nn.Module], ranges: dict[fx.Node, _Ranges]) -> _Step | None:
        hw = _tensor_meta_hw(node)
        if node.op == "placeholder":
            return None if hw is None else _Step(node, "input", (), *hw)
        if hw is None:
            return None
        tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
        if any(a not in ranges for a in tensor_args) or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            return None
        if node.op == "call_module":
            module = modules[node.target]
            if len(node.args) != 1 or len(tensor_args) != 1 or node.kwargs:
                return None
            geometry = _window_geometry(module)
            if geometry is not None:
                geo, pad = geometry
                return _Step(node, "window", (tensor_args[0],), *hw, module=module, geometry=geo, pad_value=pad)
            batch_statistics = isinstance(module, nn.BatchNorm2d) and module.running_mean is None
            if isinstance(module, _POINTWISE_MODULES) and not module.training and not batch_statistics:
                if _tensor_meta_hw(tensor_args[0]) != hw or _overwrites_shared(node, getattr(module, "inplace", False)):
                    return None
                return _Step(node, "pointwise", (tensor_args[0],), *hw, module=module)
            return None
        if node.op == "call_function":
            if node.target in _POINTWISE_FUNCTIONS and len(tensor_args) == 1 and node.args[0] is tensor_args[0]:
                if _tensor_meta_hw(tensor_args[0]) != hw or _overwrites_shared(node, node.kwargs.get("inplace", False)):
                    return None
                return _Step(node, "pointwise", (tensor_args[0],), *hw, function=node.target, kwargs=dict(node.kwargs))
            if node.target in _ADD_FUNCTIONS and len(node.args) == 2 and len(tensor_args) == 2 and not node.kwargs:
                shapes = [a.meta.get("tensor_meta") for a in tensor_args]
                if any(s is None for s in shapes) or shapes[0].shape != shapes[1].shape:
                    return None
                return _Step(node, "add", tuple(tensor_args), *hw)
        return None

    @staticmethod
    def _advance(step: _Step, inputs: list[_Ranges]) -> _Ranges:
        if step.kind == "pointwise":
            return inputs[0]
        if step.kind == "add":
            top, size_h = _union_range([r.top for r in inputs], [r.size_h for r in inputs], step.height)
            left, size_w = _union_range([r.left for r in inputs], [r.size_w for r in inputs], step.width)
            return _Ranges(top, left, size_h, size_w)
        assert step.geometry is not None
        (gh, gw), src = step.geometry, inputs[0]
        top, size_h = _window_range(src.top, src.size_h, gh, step.height)
        left, size_w = _window_range(src.left, src.size_w, gw, step.width)
        return _Ranges(top, left, size_h, size_w)

    # ------------------------------------------------------------------------------------------------- running
    @torch.no_grad()
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Run the clean images through the model once, keep the local layers' maps; return the clean output."""
        local = {s.node for s in self.steps}
        clean: dict[fx.Node, torch.Tensor] = {}

        class Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                out = super().run_node(n)
                if n in local:
                    clean[n] = out.detach().clone()  # a later in-place op must not change what we keep
                return out

        output = Recorder(self.graph_module).run(x)
        self._clean = clean
        self._padded = {}
        return output

    def _padded_clean(self, node: fx.Node, ph: int, pw: int, value: float) -> torch.Tensor:
        key = (node, ph, pw, value)
        if key not in self._padded:
            clean = self._clean[node]
            self._padded[key] = F.pad(clean, (pw, pw, ph, ph), value=value) if (ph or pw) else clean
        return self._padded[key]

    @staticmethod
    def _crop(
        source: torch.Tensor,
        image: torch.Tensor,
        top: torch.Tensor,
        left: torch.Tensor,
        size_h: int,
        size_w: int,
        patch: torch.Tensor,
        patch_top: torch.Tensor,
        patch_left: torch.Tensor,
    ) -> torch.Tensor:
        """Per item, ``source[image, :, top:top+size_h, left:left+size_w]`` with ``patch`` written at its place.

        All offsets are in ``source``'s coordinates; the parts of the patch outside the crop are dropped.
        """
        dev = source.device
        rows = top.view(-1, 1) + torch.arange(size_h, device=dev)  # (B, size_h)
        cols = left.view(-1, 1) + torch.arange(size_w, device=dev)
        crop = source[image.view(-1, 1, 1), :, rows[:, :, None], cols[:, None, :]]  # (B, size_h, size_w, C)
        pr = (patch_top - top).view(-1, 1) + torch.arange(patch.shape[2], device=dev)  # rows of the patch in the crop
        pc = (patch_left - left).view(-1, 1) + torch.arange(patch.shape[3], device=dev)
        ri = pr[:, :, None].expand(-1, -1, patch.shape[3])
        ci = pc[:, None, :].expand(-1, patch.shape[2], -1)
        valid = (ri >= 0) & (ri < size_h) & (ci >= 0) & (ci < size_w)
        bi = torch.arange(len(image), device=dev).view(-1, 1, 1).expand_as(ri)
        crop[bi[valid], ri[valid], ci[valid]] = patch.permute(0, 2, 3, 1)[valid]
        return crop.permute(0, 3, 1, 2)

    def _input_patch(
        self, node: fx.Node, image: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, window: int, baseline: float
    ) -> tuple[torch.Tensor, _Ranges]:
        """The occluded input's ``window`` x ``window`` patch. A window cut off by the border (it starts less than
        ``window`` before the end) is shifted inside the image, its patch then holds the clean pixels before it."""
        clean = self._clean[node]
        h, w = clean.shape[-2:]
        top, left = tops.clamp(max=h - window), lefts.clamp(max=w - window)
        shape = (len(image), clean.shape[1], window, window)
        patch = torch.full(shape, baseline, dtype=clean.dtype, device=clean.device)
        if bool((top != tops).any() or (left != lefts).any()):
            offsets = torch.arange(window, device=clean.device)
            rows, cols = top.view(-1, 1) + offsets, left.view(-1, 1) + offsets  # (B, window) each
            crop = clean[image.view(-1, 1, 1), :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
            covered = (rows >= tops.view(-1, 1))[:, :, None] & (cols >= lefts.view(-1, 1))[:, None, :]
            patch = torch.where(covered[:, None], patch, crop)
        return patch, _Ranges(top, left, window, window)

    @torch.no_grad()
    def forward(self, image: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, window: int, baseline: float):
        """Model output for clean image ``image[b]`` occluded at ``(tops[b], lefts[b])``; call :meth:`prepare` first."""
        patches: dict[fx.Node, tuple[torch.Tensor, _Ranges]] = {}
        dev = self._clean[self.steps[0].node].device
        image = image.to(dev)
        fmt = self._format
        for step in self.steps:
            if step.kind == "input":
                patches[step.node] = self._input_patch(step.node, image, tops.to(dev), lefts.to(dev), window, baseline)
                continue
            srcs = [patches[i] for i in step.inputs]
            rng = self._advance(step, [r for _, r in srcs])
            if step.kind == "pointwise":
                patch = srcs[0][0].clone()
                patch = step.module(patch) if step.module is not None else step.function(patch, **(step.kwargs or {}))
            elif step.kind == "add":
                parts = [
                    self._crop(self._clean[i], image, rng.top, rng.left, rng.size_h, rng.size_w, p, r.top, r.left)
                    for i, (p, r) in zip(step.inputs, srcs)
                ]
                patch = parts[0] + parts[1]
            else:
                assert step.geometry is not None and step.module is not None
                (gh, gw), (src_patch, src) = step.geometry, srcs[0]
                padded = self._padded_clean(step.inputs[0], gh.padding, gw.padding, step.pad_value)
                crop = self._crop(
                    padded,
                    image,
                    rng.top * gh.stride,
                    rng.left * gw.stride,
                    (rng.size_h - 1) * gh.stride + gh.extent,
                    (rng.size_w - 1) * gw.stride + gw.extent,
                    src_patch,
                    src.top + gh.padding,
                    src.left + gw.padding,
                )
                # pooling is fastest channels-last (the crop's own layout); a convolution wants its weight's layout
                if not isinstance(step.module, nn.Conv2d):
                    crop = crop.contiguous(memory_format=torch.channels_last)
                else:
                    crop = crop.contiguous(memory_format=fmt)
                patch = _apply_window(step.module, crop)
            patches[step.node] = (patch, rng)
        inputs = []
        for node in self.frontier:
            patch, rng = patches[node]
            full = self._clean[node].index_select(0, image)
            rows = rng.top.view(-1, 1) + torch.arange(rng.size_h, device=dev)
            cols = rng.left.view(-1, 1) + torch.arange(rng.size_w, device=dev)
            bi = torch.arange(len(image), device=dev).view(-1, 1, 1)
            full.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]] = patch.permute(0, 2, 3, 1)
            inputs.append(full.contiguous(memory_format=fmt))
        return self.suffix(*inputs)
