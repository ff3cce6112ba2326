"""AttentionMonitor: a vision transformer's attention on fixed probe images, per head, rolled out, over epochs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from torch import nn

from lightning_viz import _validate as check
from lightning_viz import render
from lightning_viz._data import resolve_probes
from lightning_viz._layers import TokenGrid, evenly_spaced, model_device, trace_data_flow
from lightning_viz.callbacks.base import VizCallback
from lightning_viz.functional import attention as A
from lightning_viz.probes import ProbeSet
from lightning_viz.records import AttentionStats, TokenRankStats

#: Available rolled-out views, in the order their columns appear.
METHODS = ("rollout", "grad_rollout")
_TITLES = {"input": "input", "rollout": "rollout", "grad_rollout": "grad roll"}


class AttentionMonitor(VizCallback):
    """Attention maps of a vision transformer on fixed probe images, attention rollout, and attention entropy.

    The attention weights are recomputed from the inputs each attention module receives, with its own projection
    weights (:mod:`lightning_viz.functional.attention`): fused attention (timm's ``scaled_dot_product_attention``,
    torchvision's ``need_weights=False``) is left as it is, and the model's output is unchanged. Supported:
    ``nn.MultiheadAttention`` (torchvision's ``VisionTransformer``) and timm's ``Attention`` (``vit_*``, ``deit_*``).

    Images, each a row per probe: ``attention/rollout`` (the input, attention rollout (Abnar & Zuidema, 2020) and
    its gradient-weighted form (Chefer et al., 2021) for the probe's label, or the predicted class when unknown);
    ``attention/heads/<layer>`` (the input and each head's attention from the class token to every patch, or the
    attention each patch receives on average when the model has no class token); ``attention/filmstrip/probe_XX``
    (the rollout row of a probe at each of the last ``filmstrip_length`` logged epochs). Attention and rollout are
    drawn on a fixed scale, comparable across epochs: 0 is black and ``attention_scale`` times the uniform share
    (``1 / patches``) is full brightness. The gradient-weighted rollout has no natural unit: each map is scaled to its
    own maximum (compare *where*, not *how much*).

    Scalars per layer: ``attention/entropy/<layer>`` (mean entropy of the attention rows in nats; ``log(tokens)`` is
    uniform attention, near 0 is collapse: every query attending to one token), ``attention/normalized_entropy/...``
    (divided by ``log(tokens)``) and ``attention/top_key_share/<layer>``; published as
    :class:`~lightning_viz.records.AttentionStats`. Rank collapse of the token representations after each block (Dong
    et al., 2021): ``attention/token_residual/<layer>`` (``||X - mean token|| / ||X||``; near 0 is every token the
    same vector) and ``attention/effective_rank/<layer>``; published as :class:`~lightning_viz.records.TokenRankStats`.

    Args:
        layers: attention modules whose heads are drawn; default: up to ``max_head_layers`` evenly spaced ones.
            Entropy and rollout always use every supported attention module.
        methods: any of ``rollout``, ``grad_rollout``; default both.
        probes: a :class:`~lightning_viz.ProbeSet`; default ``max_probes`` images chosen from the validation data.
        max_probes: at most this many probes are shown.
        max_head_layers: layers drawn per head by default.
        head_fusion: how rollout combines the heads of a layer: ``mean`` (as in the paper), ``max`` or ``min``.
        attention_scale: full brightness at this multiple of uniform attention.
        tile_size: side of each tile in pixels.
        filmstrip_probes, filmstrip_length: how many probes get a filmstrip, and how many epochs it shows.
        **kwargs: ``every_n_epochs`` (default 1), ``on_error``, ``log_baseline``, ``seed``, ``max_overhead``.
    """

    monitor_name = "attention"
    publishes = (AttentionStats, TokenRankStats)
    default_every_n_epochs = 1
    needs_grad = True

    def __init__(
        self,
        *,
        layers: Sequence[str] | None = None,
        methods: Sequence[str] | None = None,
        probes: ProbeSet | None = None,
        max_probes: int = 4,
        max_head_layers: int = 4,
        head_fusion: A.HeadFusion = "mean",
        attention_scale: float = 2.0,
        tile_size: int = 48,
        filmstrip_probes: int = 2,
        filmstrip_length: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check.layer_names("layers", layers)
        self.methods = check.choices("methods", METHODS if methods is None else methods, METHODS)
        check.probe_set("probes", probes)
        check.positive_ints(
            max_probes=max_probes,
            max_head_layers=max_head_layers,
            tile_size=tile_size,
            filmstrip_probes=filmstrip_probes,
            filmstrip_length=filmstrip_length,
        )
        check.choice("head_fusion", head_fusion, get_args(A.HeadFusion))
        check.number("attention_scale", attention_scale, low=0.0, low_open=True)
        self.layers = list(layers) if layers is not None else None
        self.probes = probes if probes is not None else ProbeSet.auto(max_probes, seed=self.seed)
        self.max_probes = max_probes
        self.max_head_layers = max_head_layers
        self.head_fusion = head_fusion
        self.attention_scale = float(attention_scale)
        self.tile_size = tile_size
        self.filmstrip_probes = filmstrip_probes
        self.filmstrip_length = filmstrip_length
        self._modules: dict[str, nn.Module] = {}
        self._head_layers: list[str] = []
        self._sites: dict[str, str] = {}
        self._rollout_ok = True
        self._grid: TokenGrid | Literal[False] | None = None  # None: not traced yet; False: no grid found
        self._filmstrips = render.Filmstrips(filmstrip_length)

    def _state_key_fields(self) -> dict[str, Any]:
        return {"layers": self.layers}

    # ------------------------------------------------------------------------------------------------- set-up
    def _resolve(self, trainer: Any, pl_module: nn.Module) -> None:
        self._grid = None
        self._modules = A.attention_modules(pl_module)
        self._sites = A.token_blocks(pl_module, self._modules)
        unsupported = A.unsupported_attention(pl_module)
        if not self._modules:
            if self.layers is not None:
                raise ValueError(
                    f"`layers`: the model has no attention module whose weights AttentionMonitor can recompute "
                    f"(nn.MultiheadAttention, timm's Attention); attention-like modules found: {unsupported[:20]}."
                )
            self._active = False
            if not unsupported:  # a CNN: nothing to show and nothing to say (the default suite includes this monitor)
                return
            self._warn_once(
                "no attention",
                "AttentionMonitor: the model has no supported attention module (nn.MultiheadAttention, timm's "
                f"Attention){'; not supported: ' + str(unsupported[:10]) if unsupported else ''}. The monitor is off.",
            )
            self._active = False
            return
        self._rollout_ok = not unsupported
        if unsupported:
            self._warn_once(
                "partial",
                f"AttentionMonitor: the attention of {unsupported[:10]} cannot be recomputed, so rollout (which needs "
                "every layer) is off; per-head maps and entropies of the supported layers are logged.",
            )
        names = list(self._modules)
        if self.layers is None:
            self._head_layers = [names[i] for i in evenly_spaced(len(names), self.max_head_layers)]
        else:
            unknown = [n for n in self.layers if n not in self._modules]
            if unknown:
                raise ValueError(
                    f"`layers`: {unknown} are not supported attention modules of the model; choose from {names[:40]}."
                )
            self._head_layers = list(self.layers)

    def _cheaper_hint(self) -> str:
        return "or lower `max_probes`, or leave `grad_rollout` out of `methods` "

    # ---------------------------------------------------------------------------------------------- logging
    def _weights(self, pl_module: nn.Module, x: torch.Tensor, labels: torch.Tensor | None) -> tuple:
        """Attention weights of every supported layer, and their gradients when ``grad_rollout`` is on and works."""
        if "grad_rollout" in self.methods and self._rollout_ok:
            result = self._guard("grad_rollout", A.attention_gradients, pl_module, self._modules, x, labels)
            if isinstance(result, tuple):
                return result[0], result[1]
        return A.attention_maps(pl_module, self._modules, x), None

    def _log(self, trainer: Any, pl_module: nn.Module, step: int, epochs_done: int) -> None:
        resolve_probes(self.probes, trainer)
        images = self.probes.images[: self.max_probes]
        labels = self.probes.labels[: self.max_probes] if self.probes.labels is not None else None
        x = images.to(model_device(pl_module))
        if self._grid is None:  # the patch grid read off the model (patch embedding, prefix tokens), once per fit
            try:
                self._grid = trace_data_flow(pl_module, x[:1]).grid or False
            except Exception:  # the token count decides (`functional.attention.patch_grid`)
                self._grid = False
        with A.capture_tokens(pl_module, self._modules) as tokens:
            weights, grads = self._weights(pl_module, x, labels)
        if not weights:
            raise RuntimeError("no supported attention module ran in the model's forward pass on the probe images.")
        for name, attn in weights.items():
            self._log_entropy(name, attn, step, epochs_done)
        self._log_rank(tokens, step, epochs_done)
        if self._sink is not None and self._sink.writes_images:
            self._draw(images, weights, grads, step, epochs_done)

    def _log_entropy(self, name: str, attn: torch.Tensor, step: int, epochs_done: int) -> None:
        assert self._sink is not None
        head_entropy = A.attention_entropy(attn)
        entropy, tokens = float(head_entropy.mean()), int(attn.shape[-1])
        normalized = entropy / math.log(tokens) if tokens > 1 else None
        share = float(A.top_key_share(attn).mean())
        scalars = {f"attention/entropy/{name}": entropy, f"attention/top_key_share/{name}": share}
        if normalized is not None:
            scalars[f"attention/normalized_entropy/{name}"] = normalized
        self._sink.scalars(scalars, step)
        self._publish(
            AttentionStats(
                step=step,
                epoch=epochs_done,
                subject=name,
                heads=int(attn.shape[1]),
                tokens=tokens,
                entropy=entropy,
                normalized_entropy=normalized,
                head_entropy=tuple(float(h) for h in head_entropy),
                top_key_share=share,
            )
        )

    def _log_rank(self, tokens: dict[str, torch.Tensor], step: int, epochs_done: int) -> None:
        """Rank collapse of the token representations after each block (:func:`A.token_rank`)."""
        assert self._sink is not None
        names = list(self._modules)
        for name, x in tokens.items():
            residual, rank = (float(v.nanmean()) for v in A.token_rank(x))
            values = {"token_residual": residual, "effective_rank": rank}
            self._sink.scalars({f"attention/{k}/{name}": v for k, v in values.items() if math.isfinite(v)}, step)
            finite = {k: (v if math.isfinite(v) else None) for k, v in values.items()}
            self._publish(
                TokenRankStats(
                    step=step,
                    epoch=epochs_done,
                    subject=name,
                    order=names.index(name),
                    layers=len(names),
                    site=self._sites.get(name, name),
                    tokens=int(x.shape[1]),
                    dim=int(x.shape[2]),
                    relative_residual=finite["token_residual"],
                    effective_rank=finite["effective_rank"],
                )
            )

    def _draw(self, images: torch.Tensor, weights: dict, grads: dict | None, step: int, epochs_done: int) -> None:
        sink = self._sink
        assert sink is not None
        first = next(iter(weights.values()))
        tokens, known = int(first.shape[-1]), self._grid
        grid = (known.prefix, known.rows, known.cols) if known and known.tokens == tokens else None
        grid = grid or A.patch_grid(tokens, *images.shape[-2:])
        if grid is None:
            self._warn_once(
                "no grid",
                f"AttentionMonitor: {first.shape[-1]} tokens do not split into prefix tokens and a patch grid of "
                f"the {tuple(images.shape[-2:])} probe images; no attention images are drawn.",
            )
            return
        prefix, rows, cols = grid
        scale = self.attention_scale / (rows * cols)
        display = torch.stack([render.display_image(img) for img in images])
        row_labels = [f"p{i}" for i in range(len(images))]
        high = f"{self.attention_scale:g}x"

        def overlays(patch_maps: torch.Tensor, fixed: bool = True) -> torch.Tensor:
            return torch.stack(
                [render.token_overlay(d, m, scale if fixed else None) for d, m in zip(display, patch_maps)]
            )

        for name in self._head_layers:
            if name not in weights:
                continue
            maps = A.patch_map(weights[name], prefix, rows, cols)  # (N, H, rows, cols)
            columns = {"input": display, **{f"h{h}": overlays(maps[:, h]) for h in range(maps.shape[1])}}
            panel = render.attention_panel(
                list(columns.values()), list(columns), row_labels, tile_size=self.tile_size, scale_high=high
            )
            sink.image(f"attention/heads/{name}", panel, step)

        if not self._rollout_ok:
            return
        layers = list(weights.values())
        columns = {"input": display}
        if "rollout" in self.methods:
            rollout = A.attention_rollout(layers, head_fusion=self.head_fusion)
            columns["rollout"] = overlays(A.patch_map(rollout, prefix, rows, cols))
        if "grad_rollout" in self.methods and grads is not None:
            relevance = A.gradient_rollout(layers, [grads[n] for n in weights])
            columns["grad_rollout"] = overlays(A.patch_map(relevance, prefix, rows, cols), fixed=False)
        if len(columns) == 1:
            return
        titles = [_TITLES[n] for n in columns]
        notes = ["grad roll: each map to its own maximum"] if "grad_rollout" in columns else []
        panel = render.attention_panel(
            list(columns.values()), titles, row_labels, tile_size=self.tile_size, scale_high=high, notes=notes
        )
        sink.image("attention/rollout", panel, step)
        small = render.fit_tile_side(len(columns), max(8, self.tile_size * 2 // 3), left=36)  # rows accumulate
        for probe in range(min(self.filmstrip_probes, len(images))):
            row = render.tile_row(torch.stack([c[probe] for c in columns.values()]), small)
            strip = self._filmstrips[probe].push(render.epoch_label(epochs_done), row)
            sink.image(
                f"attention/filmstrip/probe_{probe:02d}", render.column_filmstrip(titles, strip.images(), small), step
            )

    def _extra_state(self) -> dict[str, Any]:
        return {"probes": self.probes.state_dict(), "filmstrips": self._filmstrips.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("probes"):
            self.probes.load_state_dict(state["probes"])
        self._filmstrips.load_state_dict({int(k): v for k, v in state.get("filmstrips", {}).items()})
