"""Rules over the training-dynamics records (issue #16). Pure functions, no Trainer: records in, a Finding out.

Each rule reads records that :class:`~lightning_viz.callbacks.dynamics_monitor.DynamicsMonitor` publishes
(:mod:`lightning_viz.records`) and returns a :class:`lightning_viz.diagnosis.Finding` or ``None``. Thresholds are in
units that carry over between models: orders of magnitude for gradient and update norms, ratios for losses (against
each other or against the chance level ``ln C``), shares for saturation, running standard deviations for BatchNorm.

How a diagnosis calls them (``bus`` is :func:`lightning_viz.records.bus_for` of the Trainer)::

    latest = bus.latest(GradientStats).values()
    vanishing_gradients(latest, train_loss=losses, updates=bus.latest(UpdateStats).values())
    exploding_gradients({s: bus.history(GradientStats, s) for s in bus.latest(GradientStats)})
    unchanged_weights(bus.latest(UpdateStats).values())
    batchnorm_mismatch(bus.latest(BatchNormProbe).get(""), bus.latest(BatchNormStats).values())
    for site in bus.latest(SaturationStats):
        saturated_activations(site, bus.history(SaturationStats, site))
    initial_loss_off_chance(bus.latest(LossStats).get(""))
    oscillating_loss([(r.epoch, r.train_loss) for r in bus.history(LossStats)])
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from lightning_viz.diagnosis import Evidence, Finding, epoch_name, loss_curve
from lightning_viz.records import (
    BatchNormProbe,
    BatchNormStats,
    GradientStats,
    GradientTrace,
    LossStats,
    SaturationStats,
    UpdateStats,
)

__all__ = [
    "KINDS",
    "RULES",
    "batchnorm_mismatch",
    "exploding_gradients",
    "initial_loss_off_chance",
    "oscillating_loss",
    "saturated_activations",
    "unchanged_weights",
    "vanishing_gradients",
]


def _positive(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v) and v > 0]


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _ends(records: Sequence[GradientStats]) -> tuple[list[GradientStats], list[GradientStats]]:
    """The first and last quarter (at least one) of the weight layers, in module order."""
    layers = sorted((r for r in records if r.matrix), key=lambda r: r.order) or sorted(records, key=lambda r: r.order)
    k = max(1, len(layers) // 4)
    return layers[:k], layers[-k:]


def vanishing_gradients(
    gradients: Iterable[GradientStats],
    *,
    train_loss: Sequence[tuple[int, float]] = (),
    updates: Iterable[UpdateStats] = (),
    orders: float = 3.0,
    critical_orders: float = 5.0,
    min_progress: float = 0.1,
) -> Finding | None:
    """The first layers' gradients are ``orders`` orders of magnitude below the last layers', and they do not learn.

    Args:
        gradients: the latest :class:`GradientStats` per layer (one logged epoch).
        train_loss: (epoch, training loss) per logged epoch; "not learning" when it fell by less than
            ``min_progress`` (a share of its first value) over the run.
        updates: the latest :class:`UpdateStats` per layer; "not learning" also when the first layers' update ratio
            is ``orders`` orders of magnitude below the last layers' (with Adam-like optimizers it is not, and small
            raw gradients then do no harm).
        orders: gap (log10 of last / first, geometric means over the first and last quarter of the weight layers).
        critical_orders: gap that makes the finding critical.

    Fires on the gap alone only when neither the loss nor the update ratios are known.
    """
    records = list(gradients)
    if len(records) < 2:
        return None
    first, last = _ends(records)
    early, late = _positive(r.grad_norm for r in first), _positive(r.grad_norm for r in last)
    if not early or not late or {r.subject for r in first} == {r.subject for r in last}:
        return None
    gap = math.log10(_geomean(late) / _geomean(early))
    if gap < orders:
        return None
    evidence = [
        f"gradient norm of the first layers ({', '.join(r.subject for r in first)}) {_geomean(early):.2e} vs the "
        f"last layers ({', '.join(r.subject for r in last)}) {_geomean(late):.2e}: {gap:.1f} orders of magnitude apart"
    ]
    reasons = []
    losses = [v for _, v in train_loss if v is not None and math.isfinite(v)]
    if len(losses) >= 2 and losses[0] != 0:
        progress = (losses[0] - losses[-1]) / abs(losses[0])
        if progress < min_progress:
            reasons.append("loss")
            evidence.append(f"training loss moved only {progress:.1%} ({losses[0]:.4g} -> {losses[-1]:.4g})")
    by_layer = {u.subject: u for u in updates}
    u_early = _positive(by_layer[r.subject].update_ratio for r in first if r.subject in by_layer)
    u_late = _positive(by_layer[r.subject].update_ratio for r in last if r.subject in by_layer)
    if u_early and u_late:
        u_gap = math.log10(_geomean(u_late) / _geomean(u_early))
        if u_gap >= orders:
            reasons.append("updates")
            evidence.append(
                f"update ratio ||dw||/||w|| of the first layers {_geomean(u_early):.1e} vs {_geomean(u_late):.1e} "
                f"for the last ({u_gap:.1f} orders apart): the first layers barely move"
            )
    if not reasons and (len(losses) >= 2 or (u_early and u_late)):
        return None  # the gap is there but the network learns (e.g. Adam rescales the small gradients)
    epoch = max(r.epoch for r in records)
    return Finding(
        kind="vanishing_gradients",
        severity="critical" if gap >= critical_orders else "warning",
        since_epoch=epoch,
        summary=f"Gradients vanish towards the input: the first layers get {gap:.1f} orders of magnitude less "
        "gradient than the last and do not learn.",
        evidence=evidence,
        tags=["dynamics/gradient_flow", *(f"dynamics/grad_norm/{r.subject}" for r in (*first, *last))],
        remedies=[
            "ReLU-family activations instead of sigmoid/tanh in deep stacks",
            "normalisation layers (BatchNorm, LayerNorm) and residual connections",
            "a variance-preserving initialisation (Kaiming for ReLU, Xavier for tanh)",
            "an adaptive optimizer (Adam) rescales small gradients",
        ],
    )


def exploding_gradients(
    history: Mapping[str, Sequence[GradientStats]],
    *,
    trace: Sequence[GradientTrace] = (),
    orders: float = 2.0,
    critical_orders: float = 4.0,
    nonfinite_alone: bool = True,
) -> Finding | None:
    """The total gradient norm grew by ``orders`` orders of magnitude above its typical value in the first logged
    epoch (its median there against the largest sampled norm since, so that a growth within the epoch before a
    divergence counts), or every sampled step of the latest epoch had NaN/Inf gradients.

    With ``trace`` (every optimizer step's total norm), a growth between two sampled steps counts too: the third
    largest norm of a logged epoch (a growth lasts several steps; a lone spike does not count) against the median
    of the fit's first steps. A ResNet whose learning rate grows within an epoch shows it there and nowhere else.

    Args:
        history: per layer, its :class:`GradientStats`, oldest first.
        trace: :class:`GradientTrace` per logged epoch, oldest first.
        orders: growth (log10 of the peak / the first epoch's median total norm) that fires; ``critical_orders``
            makes it critical.
        nonfinite_alone: fire on NaN/Inf gradients without a measured growth (``False`` in the diagnosis: NaN from
            the first logged epoch on is the divergence finding's, and may come from the data rather than growth).
    """
    epochs: dict[int, float] = {}
    peaks: dict[int, float] = {}
    nonfinite: dict[int, list[str]] = {}
    for subject, records in history.items():
        for r in records:
            if r.grad_norm is not None and math.isfinite(r.grad_norm):
                epochs[r.epoch] = epochs.get(r.epoch, 0.0) + r.grad_norm**2
            if r.grad_norm_max is not None and math.isfinite(r.grad_norm_max):
                peaks[r.epoch] = peaks.get(r.epoch, 0.0) + r.grad_norm_max**2
            if r.samples and r.nonfinite_steps == r.samples:
                nonfinite.setdefault(r.epoch, []).append(subject)
    totals = sorted((e, math.sqrt(v)) for e, v in epochs.items())
    # the largest sampled norm per epoch (an upper bound: per-layer maxima may come from different steps)
    tops = sorted((e, max(math.sqrt(v), dict(totals).get(e, 0.0))) for e, v in peaks.items())
    latest = max([*epochs, *nonfinite], default=None)
    evidence, growth = [], 0.0
    if latest is not None and nonfinite.get(latest):
        evidence.append(f"every sampled step of {epoch_name(latest)} had NaN/Inf gradients in {nonfinite[latest][:5]}")
    later = [(e, v) for e, v in tops if totals and e > totals[0][0] and v > 0]
    if totals and totals[0][1] > 0 and later:
        peak_epoch, peak = max(later, key=lambda p: p[1])
        growth = math.log10(peak / totals[0][1])
        if growth >= orders:
            evidence.append(
                f"total gradient norm reached {peak:.3g} in {epoch_name(peak_epoch)}, {growth:.1f} orders of magnitude "
                f"above its typical {totals[0][1]:.3g} in {epoch_name(totals[0][0])}"
            )
    since = next((e for e, v in later if math.log10(v / totals[0][1]) >= orders), latest) if later else latest
    start = trace[0].initial if trace else None
    grown = [(r.epoch, r.peak) for r in trace if start and r.peak and math.log10(r.peak / start) >= orders]
    if grown and start:
        sampled, (epoch, peak) = growth, max(grown, key=lambda p: p[1])
        if math.log10(peak / start) > growth:
            growth = math.log10(peak / start)
            steps = sum(r.steps for r in trace)
            evidence.append(
                f"the total gradient norm, read at every one of {steps} optimizer steps, reached {peak:.3g} in epoch "
                f"{epoch} (its third largest value there), {growth:.1f} orders of magnitude above {start:.3g} at the "
                "first steps"
            )
        since = grown[0][0] if since is None or sampled < orders else min(since, grown[0][0])
    if not evidence or (not nonfinite_alone and growth < orders):
        return None
    return Finding(
        kind="exploding_gradients",
        severity="critical" if growth >= critical_orders or nonfinite.get(latest or -1) else "warning",
        since_epoch=since if since is not None else 0,
        summary="Gradients are exploding: their norm grows by orders of magnitude.",
        evidence=evidence,
        tags=[
            "dynamics/gradient_flow",
            *(["dynamics/grad_norm_total/peak"] if trace else []),
            *(f"dynamics/grad_norm/{s}" for s in list(history)[-2:]),
        ],
        remedies=[
            "clip gradients (Trainer(gradient_clip_val=1.0))",
            "lower the learning rate, or add warm-up",
            "normalisation layers; a smaller initialisation of the last layers",
        ],
    )


def unchanged_weights(updates: Iterable[UpdateStats]) -> Finding | None:
    """Trainable parameters (``requires_grad=True``) whose values never changed since the start of the fit.

    A warning when some of them had gradients (left out of the optimizer, or lr 0); ``info`` when none had any (the
    loss does not reach them: dead weight rather than a bug).

    Args:
        updates: :class:`UpdateStats` records; the latest per layer is judged.
            Frozen parameters (``requires_grad=False``) are never a finding.
    """
    latest: dict[str, UpdateStats] = {}
    for u in updates:
        if u.subject not in latest or u.epoch >= latest[u.subject].epoch:
            latest[u.subject] = u
    stuck = [u for u in latest.values() if u.unchanged and u.epoch > 0]
    if not stuck:
        return None
    names = [n for u in stuck for n in u.unchanged]
    no_grad = [n for u in stuck for n in u.without_grad]
    elements = sum(u.unchanged_elements for u in stuck)
    frozen = sum(len(u.frozen) for u in latest.values())
    epoch = max(u.epoch for u in stuck)
    shown = ", ".join(f"`{n}`" for n in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    evidence = [
        f"{len(names)} trainable parameter tensor(s) ({elements} values) unchanged after {epoch} epoch(s): {shown}"
    ]
    if no_grad:
        evidence.append(
            f"{len(no_grad)} of them never had a gradient above rounding noise: the loss does not reach them (an "
            "unused layer, or a bias right before BatchNorm, which cancels it)"
        )
    if len(no_grad) < len(names):
        evidence.append(
            f"{len(names) - len(no_grad)} had gradients but were not updated: left out of the optimizer, or lr 0"
        )
    if frozen:
        evidence.append(f"{frozen} parameter tensor(s) with requires_grad=False are frozen on purpose (not counted)")
    # Left out of the optimizer (or lr 0) is a bug; without any gradient it is dead weight, worth knowing.
    return Finding(
        kind="unchanged_weights",
        severity="warning" if len(no_grad) < len(names) else "info",
        since_epoch=0,  # unchanged since the start of the fit
        subject=",".join(sorted(u.subject for u in stuck)),
        summary=f"{len(names)} trainable parameter tensor(s) have not changed since training started.",
        evidence=evidence,
        tags=["dynamics/unchanged_parameters", *(f"dynamics/update_ratio/{u.subject}" for u in stuck[:4])],
        remedies=[
            "pass all trainable parameters to the optimizer (configure_optimizers: self.parameters())",
            "check each param group's learning rate (an lr of 0, or a scheduler that reaches 0)",
            "freeze on purpose with requires_grad_(False), so the intent is explicit",
            "a conv/linear bias right before BatchNorm is redundant: bias=False",
        ],
    )


def _eval_worse(probe: BatchNormProbe, loss_ratio: float = 2.0, min_gap: float = 0.1) -> bool:
    """Eval mode scores at least ``loss_ratio`` times worse than batch statistics, by ``min_gap`` of ``ln C``."""
    gap = probe.eval_loss - probe.batch_stat_loss
    return probe.eval_loss >= loss_ratio * probe.batch_stat_loss and gap >= min_gap * math.log(max(2, probe.classes))


def batchnorm_mismatch(
    probe: BatchNormProbe | None,
    layers: Iterable[BatchNormStats],
    *,
    loss_ratio: float = 2.0,
    min_gap: float = 0.1,
    shift: float = 0.5,
    var_log_ratio: float = math.log(4.0),
) -> Finding | None:
    """Eval mode scores much worse than the same samples with batch statistics, and the running statistics are far
    from the data's: BatchNorm's running statistics do not describe the data the model sees.

    Args:
        probe: the latest :class:`BatchNormProbe`.
        layers: the latest :class:`BatchNormStats` per BatchNorm layer.
        loss_ratio: eval loss at least this multiple of the batch-statistics loss, and
        min_gap: ... above it by at least this share of the chance loss ``ln C`` (tiny losses are not a finding).
        shift: a layer's running mean is "far" at this many running standard deviations from the data's mean, or
        var_log_ratio: its running variance is "far" at this ``|ln(var_data / var_running)|`` (ln 4: a factor 4).

    Critical when eval accuracy is near chance (at most 1.5 / C) while batch statistics do at least twice as well.
    """
    records = sorted(layers, key=lambda r: -max(r.mean_shift / shift, r.var_log_ratio / var_log_ratio))
    if probe is None or not records:
        return None
    if not _eval_worse(probe, loss_ratio, min_gap):
        return None
    chance = math.log(max(2, probe.classes))
    far = [r for r in records if r.mean_shift >= shift or r.var_log_ratio >= var_log_ratio]
    if not far:
        return None
    near_chance = probe.eval_accuracy <= 1.5 / probe.classes and probe.batch_stat_accuracy >= 2 * probe.eval_accuracy
    momenta = sorted({r.momentum for r in far if r.momentum is not None})
    evidence = [
        f"on {probe.samples} validation samples: eval-mode loss {probe.eval_loss:.3g} (accuracy "
        f"{probe.eval_accuracy:.1%}) vs {probe.batch_stat_loss:.3g} ({probe.batch_stat_accuracy:.1%}) with batch "
        f"statistics; chance is {chance:.3g} ({1 / probe.classes:.1%})",
        f"{len(far)} of {len(records)} BatchNorm layers have running statistics far from the data's; worst: "
        + "; ".join(
            f"`{r.subject}` mean off by {r.mean_shift:.2f} running std, variance by a factor "
            f"{math.exp(r.var_log_ratio):.3g}"
            for r in far[:3]
        ),
    ]
    if momenta:
        evidence.append(f"momentum of those layers: {', '.join(f'{m:g}' for m in momenta)}")
    return Finding(
        kind="batchnorm_mismatch",
        severity="critical" if near_chance else "warning",
        since_epoch=probe.epoch,
        summary="BatchNorm's running statistics do not match the data: the model scores far worse in eval mode "
        "than with batch statistics" + (" (validation near chance)." if near_chance else "."),
        evidence=evidence,
        tags=[
            "dynamics/bn_probe/eval_loss",
            "dynamics/bn_probe/batch_stat_loss",
            *(f"dynamics/bn_mean_shift/{r.subject}" for r in far[:3]),
        ],
        remedies=[
            # a larger momentum only where the layers' is small (advice to raise 0.1 to 0.1 helps nobody)
            *(
                ["a larger BatchNorm momentum (e.g. 0.1; torchvision's MobileNet/EfficientNet use 0.01)"]
                if momenta and max(momenta) < 0.1
                else []
            ),
            "more training steps before the running statistics are trusted",
            "recompute the running statistics on training data before evaluating (torch.optim.swa_utils.update_bn)",
            "check that training and validation data are preprocessed alike (normalisation, resizing)",
            "larger batches, or GroupNorm/LayerNorm where batches must stay small",
        ],
    )


def saturated_activations(
    site: str, history: Sequence[SaturationStats], *, threshold: float = 0.5, critical: float = 0.9
) -> Finding | None:
    """A bounded activation (sigmoid, tanh, ...) with at least ``threshold`` of its outputs in the flat tails.

    Args:
        site: the activation module's name.
        history: its :class:`SaturationStats`, oldest first.
        threshold: share of saturated outputs that fires (0.5: most outputs pass almost no gradient);
        critical: share that makes the finding critical.
    """
    if not history or history[-1].saturated_fraction < threshold:
        return None
    since = history[-1].epoch
    for r in reversed(history):
        if r.saturated_fraction < threshold:
            break
        since = r.epoch
    last = history[-1]
    return Finding(
        kind="saturated_activations",
        severity="critical" if last.saturated_fraction >= critical else "warning",
        since_epoch=since,
        subject=site,
        summary=f"{last.saturated_fraction:.0%} of `{site}`'s outputs ({last.kind}) sit in the flat tails, where "
        "almost no gradient passes.",
        evidence=[
            f"saturated share {last.saturated_fraction:.1%} at {epoch_name(last.epoch)} (first logged: "
            f"{history[0].saturated_fraction:.1%})",
            f"at or above {threshold:.0%} since {epoch_name(since)}",
        ],
        tags=[f"dynamics/saturation/{site}", "dynamics/gradient_flow"],
        remedies=[
            "smaller initial weights (Xavier/Glorot for tanh and sigmoid) or normalisation before the activation",
            "a lower learning rate",
            "a non-saturating activation (ReLU family, GELU) where the bound is not needed",
        ],
    )


def initial_loss_off_chance(loss: LossStats | None, *, factor: float = 1.5, critical: float = 3.0) -> Finding | None:
    """The untrained model's loss is far from the chance level ``ln C`` of a C-class cross-entropy.

    Args:
        loss: the latest :class:`LossStats` (needs ``initial_loss`` and ``chance_loss``).
        factor: fires when the ratio initial / chance is at least ``factor`` or at most ``1 / factor``;
        critical: ... at least ``critical`` (or at most its inverse) makes it critical.
    """
    if loss is None or loss.initial_loss is None or not loss.chance_loss or not math.isfinite(loss.initial_loss):
        return None
    ratio = loss.initial_loss / loss.chance_loss
    if 1 / factor < ratio < factor:
        return None
    high = ratio >= factor
    evidence = [
        f"loss of the first training batch {loss.initial_loss:.4g}; chance level ln({loss.classes}) = "
        f"{loss.chance_loss:.4g} (ratio {ratio:.2f})"
    ]
    remedies = (
        [
            "the last layer is badly scaled: initialise it smaller (or zero its weights) so logits start near 0",
            "check the labels (class indices in [0, C), the right column, not shuffled against the inputs)",
            "the loss takes logits: don't apply softmax/log_softmax before F.cross_entropy (softmax applied twice)",
        ]
        if high
        else [
            "the loss is not a C-class cross-entropy on raw logits (check reduction, label smoothing, the number of "
            "outputs)",
            "labels leak into the inputs, or most samples share one class",
        ]
    )
    return Finding(
        kind="initial_loss",
        severity="critical" if ratio >= critical or ratio <= 1 / critical else "warning",
        since_epoch=0,
        summary=f"The loss at initialisation is {'far above' if high else 'far below'} chance level: the untrained "
        "model should predict about uniformly.",
        evidence=evidence,
        tags=["dynamics/initial_loss", "dynamics/chance_loss", "diagnosis/train_loss"],
        remedies=remedies,
    )


def _scheduled_rises(
    values: Sequence[float], lrs: Sequence[tuple[float, float, float] | None], *, undo: float
) -> tuple[list[float], int]:
    """The curve with the loss rises that an intended learning-rate restart explains taken out, and how many were.

    A restart is an epoch whose first or highest learning rate is above 1.5x the previous epoch's last. Its rise is
    the schedule's (warm restarts, SGDR) when the cycle before it began at a restart too, the loss now stays below
    the loss at that restart (each cycle starts lower), and the rise gives back at most ``undo`` of what the loss
    fell during that cycle. The first restart is never excused: the steep fall of the first epochs says nothing
    about whether the restart's learning rate is sensible.
    """
    out, offset, excused, cycle_start = [values[0]], 0.0, 0, None
    for i in range(1, len(values)):
        rise = values[i] - values[i - 1]
        before, now = lrs[i - 1] if i - 1 < len(lrs) else None, lrs[i] if i < len(lrs) else None
        if before is not None and now is not None and max(now[0], now[1]) > 1.5 * before[2]:
            if cycle_start is not None and 0 < rise <= undo * (max(values[cycle_start:i]) - values[i - 1]):
                if values[i] < values[cycle_start]:
                    offset, excused = offset + rise, excused + 1
            cycle_start = i
        out.append(values[i] - offset)
    return out, excused


def _swings(values: Sequence[float]) -> tuple[float, float, float, float, float]:
    """(RMS of the residuals around a straight line, mean |loss|, share of reversals, path travelled, net change)."""
    n = len(values)
    mx, my = (n - 1) / 2, statistics.fmean(values)
    slope = sum((x - mx) * (y - my) for x, y in enumerate(values)) / sum((x - mx) ** 2 for x in range(n))
    rms = math.sqrt(statistics.fmean((y - (my + slope * (x - mx))) ** 2 for x, y in enumerate(values)))
    diffs = [b - a for a, b in zip(values, values[1:])]
    turns = sum(1 for a, b in zip(diffs, diffs[1:]) if a * b < 0) / max(1, len(diffs) - 1)
    level = statistics.fmean(abs(v) for v in values)
    return rms, level, turns, sum(abs(d) for d in diffs), abs(values[-1] - values[0])


def oscillating_loss(
    train_loss: Sequence[tuple[int, float | None]],
    *,
    learning_rate: Sequence[tuple[int, float, float, float]] = (),
    noise: float = 0.0,
    min_epochs: int = 5,
    window: int = 6,
    amplitude: float = 0.1,
    min_swing: float = 0.02,
    reversals: float = 0.5,
    path: float = 2.0,
    undo: float = 0.75,
    recovered: float = 0.1,
) -> Finding | None:
    """An episode of the run in which the per-epoch training loss goes up and down around its trend with a large
    amplitude, without diverging.

    Every ``window`` consecutive epochs of the run are judged (all of them when the run is shorter), so that the
    steep descent of the first epochs does not hide an oscillation that came after it, and an episode that faded by
    the end is still found (the finding says when it started and ended). Rises that an intended learning-rate restart
    explains (warm restarts, SGDR: :func:`_scheduled_rises`) are taken out first.

    Args:
        train_loss: (epoch, training loss) per logged epoch.
        learning_rate: (epoch, first, highest, last learning rate of the epoch) per epoch; without it no rise is
            excused.
        noise: standard error of an epoch's mean loss (batch-to-batch spread / sqrt(batches)): a sustained
            oscillation rises at least twice in the window by more than twice this and ``min_swing`` of the curve's
            largest value (one spike, or the noise of small batches, is not an oscillation).
        min_epochs: epochs needed before judging.
        window: epochs judged together.
        amplitude: RMS of the residuals around a straight-line trend, as a share of the window's mean loss, that
            fires; and
        min_swing: ... at least this share of the curve's largest value (its start, usually), so that the noise of a
            loss that has converged near zero is not an oscillation.
        reversals: share of consecutive changes that reverse direction that fires; the path travelled must also be
            at least ``path`` times the net change.
        undo: a restart's rise is the schedule's while it gives back at most this share of the previous cycle's fall.
        recovered: an episode that settled is no finding when the loss then fell below this share of the episode's
            mean level (swings on the way down of a run that went on converging).
    """
    points = [(e, v) for e, v in train_loss if v is not None and math.isfinite(v)]
    if len(points) < min_epochs or len(points) < len(train_loss):
        return None  # too short, or NaN/Inf: that is divergence, not oscillation
    scale = max(abs(v) for _, v in points)
    if points[-1][1] > 2 * points[0][1] > 0:
        return None
    lr_at = {e: (a, b, c) for e, a, b, c in learning_rate}
    values, excused = _scheduled_rises([v for _, v in points], [lr_at.get(e) for e, _ in points], undo=undo)
    size, big = min(window, len(values)), max(min_swing * scale, 2 * noise)
    firing = []
    for j in range(len(values) - size + 1):
        rms, level, turns, travelled, net = _swings(values[j : j + size])
        ups = sum(1 for a, b in zip(values[j : j + size], values[j + 1 : j + size]) if b - a > big)
        if level and rms / level >= amplitude and rms >= min_swing * scale and turns >= reversals and ups >= 2:
            if travelled >= path * net:
                firing.append((j, rms / level, turns, travelled, net, level))
    if not firing:
        return None
    first, last = points[firing[0][0]][0], points[firing[-1][0] + size - 1][0]
    j, share, turns, travelled, net, level = max(firing, key=lambda f: f[1])
    ongoing = firing[-1][0] + size == len(values)
    episode = statistics.fmean(abs(v) for _, v in points[firing[0][0] : firing[-1][0] + size])
    if not ongoing and abs(points[-1][1]) < recovered * episode:
        return None  # swings of the steep descent, after which the loss fell tenfold: a phase, not a problem
    evidence = [
        f"epochs {first - 1}-{last - 1}" + ("" if ongoing else f" (settled by {epoch_name(points[-1][0])})") + f": "
        f"residuals around the trend up to {share:.0%} of the mean loss {level:.4g} (RMS, epochs {points[j][0] - 1}-"
        f"{points[j + size - 1][0] - 1})",
        f"{turns:.0%} of the epoch-to-epoch changes there reverse direction; the loss travelled {travelled:.3g} for a "
        f"net change of {net:.3g}",
    ]
    if excused:
        evidence.append(f"{excused} rise(s) right after a learning-rate restart were the schedule's, not counted")
    return Finding(
        kind="oscillating_loss",
        severity="warning",
        since_epoch=first,
        summary="The training loss oscillates: it goes up and down from epoch to epoch instead of settling"
        + ("." if ongoing else f" (epochs {first}-{last})."),
        evidence=evidence,
        tags=["diagnosis/train_loss", "dynamics/train_loss"],
        remedies=[
            "lower the learning rate (update ratios well above 1e-3 point the same way), or decay it",
            "larger batches, or gradient accumulation",
            "less momentum; check that the data is shuffled each epoch",
        ],
    )


# ------------------------------------------------------------------------------- the rules the diagnosis applies
# Each reads the DynamicsMonitor's records from ``Evidence.dynamics`` (off without them), except the oscillating loss,
# which needs only the per-epoch training loss the DiagnosisMonitor itself keeps.
def vanishing(ev: Evidence) -> Finding | None:
    """:func:`vanishing_gradients` on the latest gradient and update records and the loss since initialisation."""
    dyn = ev.dynamics
    if dyn is None or not dyn.gradients:
        return None
    latest = [records[-1] for records in dyn.gradients.values() if records]
    return vanishing_gradients(latest, train_loss=loss_curve(ev), updates=dyn.updates)


def exploding(ev: Evidence) -> Finding | None:
    """:func:`exploding_gradients` on the gradient history: a measured growth (NaN alone is divergence)."""
    dyn = ev.dynamics
    if dyn is None or not (dyn.gradients or dyn.trace):
        return None
    return exploding_gradients(dyn.gradients, trace=dyn.trace, nonfinite_alone=False)


def unchanged(ev: Evidence) -> Finding | None:
    """:func:`unchanged_weights`, except biases that never had a gradient (a bias right before a normalisation layer
    gets only rounding noise: redundant by design, as in torchvision's VGG-BN, not worth a finding), and parameters
    without gradient in a network whose gradients vanish (a consequence of that finding)."""
    dyn = ev.dynamics
    if dyn is None or not dyn.updates:
        return None
    finding = unchanged_weights(dyn.updates)
    if finding is None:
        return None
    stuck = [n for u in dyn.updates for n in u.unchanged]
    no_grad = {n for u in dyn.updates for n in u.without_grad}
    if all(n in no_grad and n.rsplit(".", 1)[-1] == "bias" for n in stuck):
        return None
    if all(n in no_grad for n in stuck) and vanishing(ev) is not None:
        return None  # no gradient reaches them because it vanishes on the way: the vanishing finding says so
    return finding


def batchnorm(ev: Evidence) -> Finding | None:
    """:func:`batchnorm_mismatch` on the latest probe and BatchNorm records, once the probe before it agrees: running
    statistics lag the weights for an epoch when the learning rate is high or the weights jump, and settle by the
    next (a mismatch of one epoch is not a finding). At the end of the fit the latest probe alone decides; before,
    a single probe's mismatch is *pending*: not listed, but what it would explain (dead filters, not learning, ...
    measured in the broken eval mode) waits with it, so the panel does not name a consequence first."""
    dyn = ev.dynamics
    finding = batchnorm_mismatch(dyn.bn_probe, dyn.bn_layers) if dyn is not None else None
    if finding is None or dyn is None:
        return None
    earlier = [p for p in dyn.bn_probes if p.epoch < dyn.bn_probe.epoch]
    if earlier and _eval_worse(earlier[-1]):
        return replace(finding, since_epoch=earlier[-1].epoch)
    return finding if ev.final else replace(finding, pending=True)


def saturation(ev: Evidence) -> Finding | None:
    """:func:`saturated_activations` over every bounded activation: one finding, with a table of the sites."""
    dyn = ev.dynamics
    if dyn is None:
        return None
    found = [(site, f) for site, h in dyn.saturation.items() if (f := saturated_activations(site, h)) is not None]
    if not found:
        return None
    if len(found) == 1:
        return found[0][1]
    worst_site, worst = max(found, key=lambda sf: dyn.saturation[sf[0]][-1].saturated_fraction)
    rows = [
        (
            f"`{site}`",
            dyn.saturation[site][-1].kind,
            f"{dyn.saturation[site][-1].saturated_fraction:.0%}",
            str(f.since_epoch),
        )
        for site, f in found
    ]
    return Finding(
        kind="saturated_activations",
        severity="critical" if any(f.severity == "critical" for _, f in found) else "warning",
        since_epoch=min(f.since_epoch for _, f in found),
        summary=f"{len(found)} bounded activations have most of their outputs in the flat tails, where almost no "
        "gradient passes.",
        evidence=[f"the worst, `{worst_site}`: {worst.evidence[0]}", *worst.evidence[1:]],
        tags=[t for _, f in found[:4] for t in f.tags[:1]] + ["dynamics/gradient_flow"],
        remedies=worst.remedies,
        table=[("site", "activation", "saturated", "since epoch"), *rows],
    )


def initial_loss(ev: Evidence) -> Finding | None:
    """:func:`initial_loss_off_chance` on the DynamicsMonitor's loss record (its chance level comes from the model's
    logits on validation samples, so a regression model is never judged against ``ln C``)."""
    return initial_loss_off_chance(ev.dynamics.loss) if ev.dynamics is not None else None


def oscillating(ev: Evidence) -> Finding | None:
    """:func:`oscillating_loss` on the per-epoch training loss and learning rate."""
    return oscillating_loss(list(ev.train_loss), learning_rate=list(ev.learning_rate), noise=ev.train_loss_sem)


#: The kinds of finding these rules raise.
KINDS = (
    "vanishing_gradients",
    "exploding_gradients",
    "unchanged_weights",
    "batchnorm_mismatch",
    "saturated_activations",
    "initial_loss",
    "oscillating_loss",
)
#: The training-dynamics rules, ``Evidence -> Finding | None`` like :data:`lightning_viz.diagnosis.RULES`;
#: :func:`lightning_viz.diagnosis.diagnose` applies both.
RULES = [exploding, batchnorm, unchanged, initial_loss, saturation, vanishing, oscillating]
