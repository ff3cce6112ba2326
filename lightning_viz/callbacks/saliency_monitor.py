"""SaliencyMonitor: where the network looks, on a fixed set of probe images, every few epochs."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_viz import _validate as check
from lightning_viz import render
from lightning_viz._data import resolve_probes
from lightning_viz._hooks import isolated
from lightning_viz._layers import layers_of_kind, model_device, resolve_layers
from lightning_viz.callbacks.base import VizCallback
from lightning_viz.functional import occlusion as occ
from lightning_viz.functional import saliency as sal
from lightning_viz.probes import ProbeSet

#: Available methods, in the order their columns appear.
METHODS = ("gradient", "smoothgrad", "guided_backprop", "deconvnet", "gradcam", "fullgrad", "occlusion")
_COLUMN_TITLES = {
    "gradient": "grad",
    "smoothgrad": "smooth",
    "guided_backprop": "guided",
    "deconvnet": "deconv",
    "gradcam": "gradcam",
    "fullgrad": "fullgrad",
    "occlusion": "occl p",
    "occlusion_top": "occl top",
    "occlusion_layer": "occl act",
}
_INPUT_SPACE = {"gradient", "smoothgrad", "guided_backprop", "deconvnet", "gradcam", "occlusion"}


class SaliencyMonitor(VizCallback):
    """Saliency maps of fixed probe images: one grid per logged epoch and a filmstrip per probe across epochs.

    Grid (tag ``saliency/grid``): a row per probe and target class, a column for the input and one per method. Each
    probe is explained for its true class (when labels are known) and, when the prediction differs, for the
    predicted class in a second row; row labels give both and the predicted probability. Filmstrips (tags
    ``saliency/filmstrip/probe_XX``) show the first row of each of the first ``filmstrip_probes`` probes at each of
    the last ``filmstrip_length`` logged epochs.

    How each column is drawn: ``gradient``, ``smoothgrad``, ``gradcam`` and ``fullgrad`` are heat maps over the
    grayscale image, each map scaled to its own 99th percentile (their absolute size changes by orders of magnitude
    during training, so a fixed scale would show nothing; compare *where*, not *how much*). ``guided_backprop`` and
    ``deconvnet`` are signed colour images, 0 = grey, scaled the same way. ``occlusion`` shows the probability of the
    row's class with a grey ``occlusion_window`` square at each position, on the fixed scale 0 (black) to 1 (bright),
    comparable across epochs; ``occl. top`` the most probable class at each position (categorical colours), and with
    ``occlusion_layer`` the total activation of that layer's strongest channel (``occl. act``).

    Input-space methods and Grad-CAM run on a frozen copy of the model with conv+BatchNorm folded (except the
    Grad-CAM layer; :func:`lightning_viz.functional.saliency.inference_copy`), FullGrad on the model itself (it needs
    the BatchNorm biases); all in eval mode, gradients by ``torch.autograd.grad``, the model's modes, ``.grad`` and
    RNG streams restored afterwards. Occlusion recomputes only the window's patch in the first local layers
    (:func:`lightning_viz.functional.occlusion.occlusion`), exact up to float rounding.

    Args:
        methods: any of ``gradient``, ``smoothgrad``, ``guided_backprop``, ``deconvnet``, ``gradcam``, ``fullgrad``,
            ``occlusion``; default all.
        probes: a :class:`~lightning_viz.ProbeSet`; default 8 images chosen from the validation data on first use.
        gradcam_layer: name of the ``nn.Conv2d`` for Grad-CAM; default the model's last ``Conv2d``.
        smoothgrad_samples: noisy copies per image; noise_level: their sigma relative to the image's value range.
        occlusion_window, occlusion_stride, occlusion_baseline: the occluding square, its step and its value.
        occlusion_layer: optionally, a layer whose strongest channel's total activation is mapped too.
        batch_size: images per forward/backward pass (SmoothGrad copies, occluded images are batched too).
        max_probes: at most this many probes are explained.
        tile_size: side of each tile in pixels.
        filmstrip_probes, filmstrip_length: how many probes get a filmstrip, and how many epochs it shows.
        **kwargs: ``every_n_epochs`` (default 2: maps change slowly, and each call costs a few training steps),
            ``on_error``, ``log_baseline``, ``seed``, ``max_overhead``.
    """

    monitor_name = "saliency"
    default_every_n_epochs = 2
    needs_grad = True

    def __init__(
        self,
        *,
        methods: Sequence[str] | None = None,
        probes: ProbeSet | None = None,
        gradcam_layer: str | None = None,
        smoothgrad_samples: int = 16,
        noise_level: float = 0.15,
        occlusion_window: int = 8,
        occlusion_stride: int = 4,
        occlusion_baseline: float = 0.0,
        occlusion_layer: str | None = None,
        batch_size: int = 64,
        max_probes: int = 6,
        tile_size: int = 48,
        filmstrip_probes: int = 2,
        filmstrip_length: int = 6,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        methods = check.choices("methods", METHODS if methods is None else methods, METHODS)
        check.probe_set("probes", probes)
        for arg, value in (
            ("smoothgrad_samples", smoothgrad_samples),
            ("occlusion_window", occlusion_window),
            ("occlusion_stride", occlusion_stride),
            ("batch_size", batch_size),
            ("max_probes", max_probes),
            ("tile_size", tile_size),
            ("filmstrip_probes", filmstrip_probes),
            ("filmstrip_length", filmstrip_length),
        ):
            check.positive_int(arg, value)
        check.number("noise_level", noise_level, low=0.0)
        check.number("occlusion_baseline", occlusion_baseline)
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
        self.max_probes = max_probes
        self.tile_size = tile_size
        self.filmstrip_probes = filmstrip_probes
        self.filmstrip_length = filmstrip_length
        self._gradcam_module: nn.Module | None = None
        self._gradcam_name: str | None = None
        self._occlusion_module: nn.Module | None = None
        self._no_relu = False
        self._filmstrips = render.Filmstrips(filmstrip_length)

    def _state_key_fields(self) -> dict[str, Any]:
        return {"methods": self.methods}

    # ------------------------------------------------------------------------------------------------- set-up
    def _resolve(self, trainer: Any, pl_module: nn.Module) -> None:
        if "gradcam" in self.methods:
            names = [self.gradcam_layer] if self.gradcam_layer is not None else None
            self._gradcam_name, self._gradcam_module = next(
                iter(resolve_layers(pl_module, names, (nn.Conv2d,), argument="gradcam_layer", default="last").items())
            )
        if self.occlusion_layer is not None:
            self._occlusion_module = resolve_layers(
                pl_module, [self.occlusion_layer], (nn.Module,), argument="occlusion_layer"
            )[self.occlusion_layer]
        self._no_relu = not sal.relu_modules(pl_module)
        if self._no_relu and {"guided_backprop", "deconvnet"} & set(self.methods):
            self._warn_once(
                "no relu",
                "SaliencyMonitor: the model has no nn.ReLU modules, so guided backprop and deconvnet cannot replace "
                "the ReLU backward rule (functional F.relu calls cannot be overridden); their columns show the plain "
                "gradient. Use nn.ReLU modules, or leave these methods out of `methods`.",
            )
        if self.probes.is_resolved:
            self._check_probes(pl_module, self.probes.images)

    def _check_probes(self, pl_module: nn.Module, images: torch.Tensor) -> None:
        """Fail with a clear message when the probes don't fit the model (run once, at setup or first use)."""
        convs = layers_of_kind(pl_module, (nn.Conv2d,))
        if convs:
            expected = next(iter(convs.values())).in_channels
            if images.shape[1] != expected:
                raise ValueError(
                    f"`probes`: the images have {images.shape[1]} channels, but the model's first conv layer "
                    f"expects {expected} (probe shape {tuple(images.shape)})."
                )
        h, w = images.shape[-2:]
        if "occlusion" in self.methods and self.occlusion_window > min(h, w):
            raise ValueError(
                f"`occlusion_window`={self.occlusion_window} is larger than the probe images ({h}x{w}); "
                "choose a smaller window."
            )
        with isolated(pl_module):
            try:
                out = pl_module(images[:2].to(model_device(pl_module)))
            except Exception as exc:
                raise ValueError(
                    f"`probes`: the model cannot take the probe images of shape {tuple(images.shape)}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        if not isinstance(out, torch.Tensor) or out.ndim != 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"SaliencyMonitor needs a model that returns class scores (N, K); it returned {shape}.")

    def _cheaper_hint(self) -> str:
        return "or lower `smoothgrad_samples`, `max_probes`, or leave out `occlusion` "

    # ---------------------------------------------------------------------------------------------- logging
    def _probe_batch(self, trainer: Any, pl_module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.probes.is_resolved:
            resolve_probes(self.probes, trainer)
            self._check_probes(pl_module, self.probes.images)
        images = self.probes.images[: self.max_probes]
        labels = self.probes.labels[: self.max_probes] if self.probes.labels is not None else None
        return images, labels

    def _log(self, trainer: Any, pl_module: nn.Module, step: int, epochs_done: int) -> None:
        sink = self._sink
        assert sink is not None
        if not sink.writes_images:
            return
        device = model_device(pl_module)
        images, labels = self._probe_batch(trainer, pl_module)
        x = images.to(device)
        keep = [self._gradcam_name] if self._gradcam_name is not None else []
        fast = sal.inference_copy(pl_module, keep=keep) if _INPUT_SPACE & set(self.methods) else pl_module
        with torch.no_grad():
            probs = fast(x).float().softmax(dim=1)
        predicted = probs.argmax(dim=1)

        # Rows: each probe for its true class, and for the predicted class when that differs (or labels are unknown).
        rows: list[tuple[int, int, str]] = []
        for i in range(len(x)):
            pred, p = int(predicted[i]), float(probs[i, predicted[i]])
            if labels is not None:
                true = int(labels[i])
                rows.append((i, true, f"p{i} true {true}\npred {pred} {p:.2f}"))
                if pred != true:
                    rows.append((i, pred, f"p{i} pred {pred}\n({p:.2f})"))
            else:
                rows.append((i, pred, f"p{i} pred {pred}\n({p:.2f})"))
        index = torch.tensor([r[0] for r in rows], device=device)
        target = torch.tensor([r[1] for r in rows], device=device)
        xr = x[index]

        display = torch.stack([render.display_image(img) for img in images])[index.cpu()]
        columns: dict[str, torch.Tensor] = {"input": display}
        for method in self.methods:
            result = self._guard(method, self._compute, method, pl_module, fast, xr, target, x, index)
            if isinstance(result, dict):
                for name, tiles in result.items():
                    columns[name] = self._tiles(name, tiles, display)

        names = list(columns)
        tiles = torch.stack([render.resize_tiles(columns[n], self.tile_size) for n in names], dim=1)  # (R, M, 3, s, s)
        row_images = [render.tile_grid(tiles[r], ncol=len(names)) for r in range(len(rows))]
        labelled = [render.label_left(img, label) for img, (_, _, label) in zip(row_images, rows)]
        head = render.header(["input"] + [_COLUMN_TITLES[n] for n in names[1:]], self.tile_size)
        grid = render.stack_rows([head, *labelled], gap=0)
        sink.image("saliency/grid", render.downsize(grid, 2048), step)

        first_rows = {}
        for r, (probe, _, _) in enumerate(rows):
            first_rows.setdefault(probe, r)
        # filmstrip rows at two thirds of the grid's tile size: they accumulate, and must stay small on disk
        small = max(8, self.tile_size * 2 // 3)
        small_head = render.header(["input"] + [_COLUMN_TITLES[n] for n in names[1:]], small)
        for probe in range(min(self.filmstrip_probes, len(images))):
            row = render.tile_grid(render.resize_tiles(tiles[first_rows[probe]], small), ncol=len(names))
            image = self._filmstrips[probe].push(f"ep {epochs_done}", row).rows()
            sink.image(f"saliency/filmstrip/probe_{probe:02d}", render.stack_rows([small_head, image], gap=0), step)

    def _compute(self, method, model, fast, xr, target, x, index) -> dict[str, torch.Tensor]:
        bs = self.batch_size
        if method == "gradient":
            return {method: sal.gradient(fast, xr, target, batch_size=bs)}
        if method == "smoothgrad":
            return {
                method: sal.smoothgrad(
                    fast,
                    xr,
                    target,
                    n=self.smoothgrad_samples,
                    noise_level=self.noise_level,
                    generator=self._generator(),  # the same noise at every epoch: maps stay comparable
                    batch_size=bs,
                )
            }
        if method in ("guided_backprop", "deconvnet"):
            fn = sal.guided_backprop if method == "guided_backprop" else sal.deconvnet
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # said once at setup
                return {method: fn(fast, xr, target, batch_size=bs)}
        if method == "gradcam":
            assert self._gradcam_module is not None and self._gradcam_name is not None
            # the folded copy when its graph calls the (unfolded) layer itself, else the model
            graph = getattr(fast, "graph", None)
            called = graph is not None and any(
                n.op == "call_module" and n.target == self._gradcam_name for n in graph.nodes
            )
            on = fast if called else model
            layer = fast.get_submodule(self._gradcam_name) if called else self._gradcam_module
            return {method: sal.grad_cam(on, xr, target, layer, batch_size=bs)}
        if method == "fullgrad":
            return {method: sal.fullgrad(model, xr, target, batch_size=bs)}
        # occlusion: every probe once (not once per row), then each row reads its class. The folded copy has no
        # `occlusion_layer` to hook, so a layer map runs on the model itself.
        use_fast = self._occlusion_module is None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", occ.IncrementalMismatchWarning)
            result = occ.occlusion(
                fast if use_fast else model,
                x,
                window=self.occlusion_window,
                stride=self.occlusion_stride,
                baseline=self.occlusion_baseline,
                max_batch_bytes=bs * x[0].numel() * x.element_size(),
                layer=self._occlusion_module,
            ).rows(index)
        for w in caught:  # the fallback to full passes is said once per run, not at every call
            if issubclass(w.category, occ.IncrementalMismatchWarning):
                self._warn_once("occlusion incremental", f"SaliencyMonitor: {w.message}")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        size = tuple(x.shape[-2:])
        out = {
            "occlusion": occ.upsample_grid(result.probability(target), result, size),
            "occlusion_top": occ.upsample_grid(result.top_class(), result, size),
        }
        if result.layer_total is not None:
            out["occlusion_layer"] = occ.upsample_grid(result.layer_total, result, size)
        return {k: v.cpu() for k, v in out.items()}

    def _tiles(self, name: str, maps: torch.Tensor, display: torch.Tensor) -> torch.Tensor:
        maps = maps.detach().float().cpu()
        if name in ("guided_backprop", "deconvnet"):
            return torch.stack([render.signed_image(m) for m in maps])
        if name == "occlusion":
            return torch.stack([render.overlay(d, m.clamp(0, 1), "viridis", 0.75) for d, m in zip(display, maps)])
        if name == "occlusion_top":
            return torch.stack([render.class_map(m) for m in maps])
        return torch.stack([render.overlay(d, render.robust_unit(m)) for d, m in zip(display, maps)])

    def _extra_state(self) -> dict[str, Any]:
        return {
            "probes": self.probes.state_dict(),
            "filmstrips": self._filmstrips.state_dict(),
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("probes"):
            self.probes.load_state_dict(state["probes"])
        self._filmstrips.load_state_dict({int(k): v for k, v in state.get("filmstrips", {}).items()})
