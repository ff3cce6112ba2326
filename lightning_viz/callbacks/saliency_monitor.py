"""SaliencyMonitor: where the network looks, on a fixed set of probe images, every few epochs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from typing_extensions import override

from lightning_viz import _layers, render
from lightning_viz import _validate as check
from lightning_viz._classes import class_name, find_class_names
from lightning_viz._data import resolve_probes, step_aside
from lightning_viz._hooks import isolated
from lightning_viz._inputs import input_hint, model_inputs
from lightning_viz._layers import NotApplicableError, layers_of_kind, model_device, resolve_layers
from lightning_viz._saliency_table import BARS, BY_NAME, METHODS, TABLE, Inputs  # noqa: F401 (TABLE: public)
from lightning_viz.callbacks.base import VizCallback
from lightning_viz.functional import occlusion as occ
from lightning_viz.functional import saliency as sal
from lightning_viz.functional._autograd import relu_modules
from lightning_viz.probes import ProbeSet

if TYPE_CHECKING:  # annotations only
    import lightning.pytorch as pl


class SaliencyMonitor(VizCallback):
    """Saliency maps of fixed probe images: one grid per logged epoch and a filmstrip per probe across epochs.

    Grid (tag ``saliency/grid``): a row per probe and target class, a column for the input and one per method. Each
    probe is explained for its true class (when labels are known) and, when the prediction differs, for the
    predicted class in a second row; a caption over each row gives both, by class name where the data names its
    classes, and the predicted probability. Filmstrips
    (``saliency/filmstrip/probe_XX``): the first row of the first ``filmstrip_probes`` probes over logged epochs.

    Columns: ``gradient``, ``smoothgrad``, ``gradcam``, ``fullgrad``: heat maps over the grayscale image, each scaled
    to its own 99th percentile (compare *where*, not *how much*); ``guided_backprop``, ``deconvnet``: signed colour
    images, 0 = grey. ``occlusion``: the probability of the row's class with a grey ``occlusion_window`` square at
    each position, on the fixed scale 0 (black) to 1 (bright); ``occl. top`` the predicted class at each position,
    and with ``occlusion_layer`` the total activation of that layer's strongest channel (``occl. act``). A
    single-logit head explains the class's log-odds (``logit`` for class 1, ``-logit`` for class 0).

    Input-space methods and Grad-CAM run on a frozen copy of the model with conv+BatchNorm folded (except the
    Grad-CAM layer; :func:`lightning_viz.functional.saliency.inference_copy`), FullGrad on the model itself (it needs
    the BatchNorm biases); all in eval mode, the model's modes, ``.grad`` and RNG streams restored afterwards.

    Args:
        methods: any of ``gradient``, ``smoothgrad``, ``guided_backprop``, ``deconvnet``, ``gradcam``, ``fullgrad``,
            ``occlusion``; default all.
        probes: a :class:`~lightning_viz.ProbeSet`; default 8 images chosen from the validation data on first use.
        gradcam_layer: a ``Conv2d`` (on a transformer also a block or ``LayerNorm``); default by data flow: the last
            map larger than 1x1 on the way to the output; on a ViT the last attention's input on the patch grid.
        smoothgrad_samples: noisy copies per image; noise_level: their sigma relative to the image's value range.
        occlusion_window, occlusion_stride, occlusion_baseline: the occluding square (default 8; a patch on a ViT),
            its step (default 4; a patch on a ViT: windows aligned with the patches) and its value.
        occlusion_layer: optionally, a layer whose strongest channel's total activation is mapped too.
        batch_size: images per forward/backward pass (SmoothGrad copies, occluded images are batched too).
        max_probes: at most this many probes are explained. tile_size: side of each tile in pixels (smaller when
            the columns would not fit TensorBoard's 350 px card; the grid carries its colour bars and class key).
        head: how the outputs read as classes (:func:`~lightning_viz.functional.saliency.head_outputs`): ``softmax``,
            ``sigmoid`` (one logit, class 1 if ``logit > 0``), ``multilabel`` (a sigmoid per class); ``auto``: by size.
        filmstrip_probes, filmstrip_length: how many probes get a filmstrip, and how many epochs it shows.
        **kwargs: ``every_n_epochs`` (default 2: maps change slowly, and each call costs a few training steps),
            ``on_error``, ``log_baseline``, ``seed``, ``max_overhead``.
    """

    monitor_name = "saliency"
    default_every_n_epochs = 2
    # the smallest call: one probe, 2 noisy copies, occlusion windows side by side (``_overlap`` 1: stride = window)
    budget_knobs = {"smoothgrad_samples": 2, "max_probes": 1, "_overlap": 1}
    budget_fixed_seconds = 0.04  # drawing, encoding; the first call's data-flow trace
    #: Below this many gradient passes a call runs on the model itself: folding a copy costs more than it saves.
    copy_from_passes: ClassVar[int] = 32
    label = "saliency"
    images_only = True
    needs_grad = True

    def __init__(
        self,
        *,
        methods: Sequence[str] | None = None,
        probes: ProbeSet | None = None,
        gradcam_layer: str | None = None,
        smoothgrad_samples: int = 16,
        noise_level: float = 0.15,
        occlusion_window: int | None = None,
        occlusion_stride: int | None = None,
        occlusion_baseline: float = 0.0,
        occlusion_layer: str | None = None,
        batch_size: int = 64,
        max_probes: int = 6,
        head: sal.Head = "auto",
        tile_size: int = 48,
        filmstrip_probes: int = 2,
        filmstrip_length: int = 6,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        methods = check.choices("methods", METHODS if methods is None else methods, METHODS)
        check.probe_set("probes", probes)
        check.positive_ints(
            smoothgrad_samples=smoothgrad_samples,
            batch_size=batch_size,
            max_probes=max_probes,
            tile_size=tile_size,
            filmstrip_probes=filmstrip_probes,
            filmstrip_length=filmstrip_length,
        )
        check.positive_int("occlusion_window", occlusion_window, allow_none=True)
        check.positive_int("occlusion_stride", occlusion_stride, allow_none=True)
        check.number("noise_level", noise_level, low=0.0)
        check.number("occlusion_baseline", occlusion_baseline)
        check.choice("head", head, sal.HEADS)
        check.layer_name("gradcam_layer", gradcam_layer)
        check.layer_name("occlusion_layer", occlusion_layer)
        self.methods = methods
        self.probes = probes if probes is not None else ProbeSet.auto(max_probes, seed=self.seed)
        self.gradcam_layer = gradcam_layer
        self.smoothgrad_samples = smoothgrad_samples
        self.noise_level = float(noise_level)
        self.occlusion_window = occlusion_window
        self.occlusion_stride = occlusion_stride
        self.occlusion_baseline = float(occlusion_baseline)
        self.occlusion_layer = occlusion_layer
        self.batch_size = batch_size
        self.max_probes, self.head = max_probes, head
        self.tile_size = tile_size
        self.filmstrip_probes = filmstrip_probes
        self.filmstrip_length = filmstrip_length
        self._gradcam_module: nn.Module | None = None
        self._gradcam_name: str | None = None
        self._occlusion_module: nn.Module | None = None
        self._gradcam_view: tuple[_layers.TokenGrid | None, bool] = (None, False)  # (token grid, channels last)
        self._window, self._stride, self._flow_done = occlusion_window or 8, occlusion_stride or 4, False
        self._no_relu, self._overlap = False, 2  # occlusion windows overlap twice (the default stride: half a window)
        self._filmstrips = render.Filmstrips(filmstrip_length)
        self._copies: dict[tuple[str, ...], sal.InferenceCopy] = {}  # by `keep`: traced once, refreshed per call

    @override
    def _state_key_fields(self) -> dict[str, Any]:
        return {"methods": self.methods}

    # ------------------------------------------------------------------------------------------------- set-up
    @override
    def _resolve(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        self._flow_done, self._gradcam_view = False, (None, False)  # each fit follows its model's data flow
        self._window, self._stride = self.occlusion_window or 8, self.occlusion_stride or 4
        if "gradcam" in self.methods:
            try:
                self._gradcam_name, self._gradcam_module = _layers.map_layer(
                    pl_module, self.gradcam_layer, "gradcam_layer"
                )
            except NotApplicableError as exc:  # no conv layer: the other methods still apply
                self._disabled["gradcam"] = str(exc)
                step_aside(trainer, "SaliencyMonitor's Grad-CAM", str(exc))  # said with the others, in one line
        if self.occlusion_layer is not None:
            self._occlusion_module = resolve_layers(
                pl_module, [self.occlusion_layer], (nn.Module,), argument="occlusion_layer"
            )[self.occlusion_layer]
        self._no_relu = not relu_modules(pl_module)
        if self._no_relu and {"guided_backprop", "deconvnet"} & set(self.methods):
            self._warn_once(
                "no relu",
                "SaliencyMonitor: the model has no nn.ReLU modules, so guided backprop and deconvnet cannot replace "
                "the ReLU backward rule (functional F.relu calls cannot be overridden); their columns show the plain "
                "gradient. Use nn.ReLU modules, or leave these methods out of `methods`.",
            )
        if self.probes.is_resolved:
            self._check_probes(pl_module, self.probes.images)

    def _follow_data_flow(self, pl_module: nn.Module, x: torch.Tensor) -> None:
        """Once per fit, on the first probe: the default Grad-CAM layer, how to read it as a map, and on a vision
        transformer patch-aligned occlusion windows (:class:`~lightning_viz._layers.DataFlow`)."""
        if self._flow_done:
            return
        self._flow_done = True
        try:
            flow = _layers.trace_data_flow(pl_module, x[:1])
        except Exception as exc:  # keep the registration-order default
            self._warn_once("data flow", f"SaliencyMonitor: the model's forward pass could not be traced ({exc}).")
            return
        if "gradcam" in self.methods and self.gradcam_layer is None and "gradcam" not in self._disabled:
            if (name := flow.spatial_layer()) is not None:
                self._gradcam_name, self._gradcam_module = name, pl_module.get_submodule(name)
        self._gradcam_view = flow.view_of(self._gradcam_name)
        if flow.grid is not None and self.occlusion_window is None:
            self._window = flow.grid.window(*x.shape[-2:])
            self._stride = self.occlusion_stride or self._window

    def _check_probes(self, pl_module: nn.Module, images: torch.Tensor) -> None:
        """Fail with a clear message when the probes don't fit the model (run once, at setup or first use)."""
        convs = layers_of_kind(pl_module, (nn.Conv2d,))
        if convs:
            expected = next(iter(convs.values())).in_channels
            # any conv may be the stem (an auxiliary one can be registered first): the forward call below decides
            if images.shape[1] not in {conv.in_channels for conv in convs.values()}:
                raise ValueError(
                    f"`probes`: the images have {images.shape[1]} channels, but the model's first conv layer "
                    f"expects {expected} (probe shape {tuple(images.shape)})."
                )
        h, w = images.shape[-2:]
        if "occlusion" in self.methods and self._window > min(h, w):
            raise ValueError(
                f"`occlusion_window`={self._window} is larger than the probe images ({h}x{w}); choose a smaller window."
            )
        extra = self.probes.extra_inputs if self.probes.images is images else ()
        with isolated(pl_module), model_inputs(pl_module, extra, images if extra else None):
            try:
                out = pl_module(images[:2].to(model_device(pl_module)).clone())  # it may edit its input
            except Exception as exc:
                if "more inputs" in (input_hint(exc) or "") and not extra:
                    raise ValueError(  # the cause is the model's other input, not the probe images
                        f"SaliencyMonitor: your model takes more inputs than the image ({exc}), and the `probes` "
                        "given hold images only. Give each probe its other inputs: "
                        "`ProbeSet(images, labels, extra_inputs=(second_input,))`, or `ProbeSet.from_dataset(dataset, "
                        "indices, input_fn=lambda batch: ((image, second_input), label))`; or leave `probes` out and "
                        "say how a batch becomes the model's inputs with `input_fn=` (or a `viz_input` method): the "
                        "monitor then takes probes, with their other inputs, from the validation batches."
                    ) from exc
                raise ValueError(
                    f"`probes`: the model cannot take the probe images of shape {tuple(images.shape)}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"SaliencyMonitor needs a model that returns class scores (N, K); it returned {shape}.")
        sal.resolve_head(self.head, out.shape[1])  # fails naming `head` when it cannot read that many outputs

    @override
    def _budget_units(self) -> float | None:
        # per probe: a forward and backward pass per gradient method and noisy copy, occlusion's forward passes
        passes = self._gradient_passes()
        probes = float(self.max_probes)
        if "occlusion" in self.methods:  # a position is a forward pass (a third of a sample pass); incremental, half
            side = int(self.probes.images.shape[-1]) if self.probes.is_resolved else 64  # (else not known: 64)
            positions = probes * max(1, (side - self._window) // self._occlusion_stride() + 1) ** 2
            return probes * passes + positions / (6 if positions >= occ.INCREMENTAL_MIN_POSITIONS else 3)
        return probes * passes

    def _gradient_passes(self) -> int:
        return len(self.methods) + (self.smoothgrad_samples if "smoothgrad" in self.methods else 0)

    def _occlusion_stride(self) -> int:  # the smallest call puts the windows side by side
        return self._stride if self._overlap > 1 else max(self._stride, self._window)

    def _cheaper_hint(self) -> str:
        return "or lower `smoothgrad_samples`, `max_probes`, or leave out `occlusion` "

    # ---------------------------------------------------------------------------------------------- logging
    def _probe_batch(self, trainer: pl.Trainer, pl_module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.probes.is_resolved:
            resolve_probes(self.probes, trainer)
            self._check_probes(pl_module, self.probes.images)
        images = self.probes.images[: self.max_probes]
        labels = self.probes.labels[: self.max_probes] if self.probes.labels is not None else None
        return images, labels

    @override
    def _log(self, trainer: pl.Trainer, pl_module: nn.Module, step: int, epochs_done: int) -> None:
        sink = self._sink
        assert sink is not None
        if not sink.writes_images:
            return
        # gather: the probes, the model (and its folded copy), one row per probe and explained class
        images, labels = self._probe_batch(trainer, pl_module)
        x = images.to(model_device(pl_module))
        self._follow_data_flow(pl_module, x)
        methods = [BY_NAME[name] for name in self.methods]
        keep = [self._gradcam_name] if self._gradcam_name is not None else []
        copies = self._copies.setdefault(tuple(keep), sal.InferenceCopy(keep=keep))
        folded = (
            any(m.runs_on_copy for m in methods) and self.max_probes * self._gradient_passes() >= self.copy_from_passes
        )
        fast = copies(pl_module, example=x) if folded else pl_module  # checked on x
        with torch.no_grad():
            probs, predicted = sal.head_outputs(fast(x.clone()), self.head)
        index, target = sal.rows_to_explain(predicted, labels)
        names = find_class_names(trainer, pl_module)
        captions = [render.row_caption(int(p), int(c), probs[p], labels, names) for p, c in zip(index, target)]
        inputs = Inputs(pl_module, fast, x[index.to(x.device)], target.to(x.device), x, index.to(x.device))

        # functional: each method's maps; render: a column of tiles per map
        display = torch.stack([render.display_image(img) for img in images])[index]
        columns, titles, classes = [display], ["input"], set()
        stride, self._stride = self._stride, self._occlusion_stride()
        try:
            for method in methods:
                result = self._guard(method.name, method.compute, self, inputs)
                for column in method.columns if isinstance(result, dict) else ():
                    if column.key in result:
                        maps = result[column.key]
                        columns.append(column.draw(maps, display) if column.on_image else column.draw(maps))
                        titles.append(column.title)
                        classes |= set(maps.unique().tolist()) if column.key == "top_class" else set()
        finally:
            self._stride = stride
        # sized for TensorBoard's card: `tile_size`, smaller when the columns would not fit its width
        tiles = render.column_tiles(columns, render.fit_tile_side(len(columns), self.tile_size))
        bars = list(dict.fromkeys(BARS[t] for t in titles if t in BARS))
        key = (sorted(int(c) for c in classes), [class_name(int(c), names) for c in sorted(classes)])

        # sink: the grid, and a filmstrip of each of the first probes' first row
        sink.image("saliency/grid", render.saliency_panel(tiles, titles, captions, bars=bars, key=key), step)
        small = render.fit_tile_side(len(columns), max(8, self.tile_size * 2 // 3), left=36)  # rows accumulate
        for probe in range(min(self.filmstrip_probes, len(images))):
            row = render.tile_row(tiles[int((index == probe).nonzero()[0])], small)
            strip = self._filmstrips[probe].push(render.epoch_label(epochs_done), row)
            sink.image(
                f"saliency/filmstrip/probe_{probe:02d}", render.column_filmstrip(titles, strip.images(), small), step
            )

    @override
    def _release(self, pl_module: Any) -> None:
        self._copies.clear()

    @override
    def _extra_state(self) -> dict[str, Any]:
        return {"probes": self.probes.state_dict(), "filmstrips": self._filmstrips.state_dict()}

    @override
    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("probes"):
            self.probes.load_state_dict(state["probes"])
        self._filmstrips.load_state_dict({int(k): v for k, v in state.get("filmstrips", {}).items()})
