"""Rules that turn training statistics into findings in words. Pure functions over histories, no Trainer.

The :class:`~lightning_viz.DiagnosisMonitor` gathers what it saw into an :class:`Evidence` object (per-epoch losses,
dead-unit histories, the chance level, whether the fit is over) and applies :data:`RULES`: each rule is a function
``Evidence -> Finding | None``, so a new rule is one more entry in that table. :func:`diagnose` then keeps one finding
per cause: consequences of a root cause (dead units in a diverged network) are folded into the root cause's
evidence, and remedies that would contradict another finding are dropped.

The rules judge each signal against its own scale, not against fixed amounts:

- **over-fitting**: a rise of the validation loss above its best that is large against the curve's own
  epoch-to-epoch noise, sustained over epochs, together with a widening (and positive) train/validation gap;
- **dead units**: the rise of a layer's dead fraction above its state at initialisation where that was seen, else
  above what an initialisation can explain (a Linear layer's units are often a fifth to two fifths silent from
  PyTorch's default initialisation; a conv channel that never fires at any position of any image is not how a
  network starts);
- **not learning / under-training**: the loss against its chance level (``ln(num_classes)`` for cross-entropy) and
  its progress per epoch against the progress made so far;
- **divergence**: NaN/Inf in the loss or the weights, or weights exploding, since the epoch it started.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from torch import nn

FindingKind = Literal[
    "divergence",
    "dead_filters",
    "not_learning",
    "undertraining",
    "overfitting",
    "exploding_gradients",
    "vanishing_gradients",
    "unchanged_weights",
    "batchnorm_mismatch",
    "saturated_activations",
    "initial_loss",
    "oscillating_loss",
    "attention_collapse",
    "rank_collapse",
]
Severity = Literal["info", "warning", "critical"]
#: Severities from the mildest to the worst.
SEVERITIES: tuple[Severity, ...] = get_args(Severity)
#: Root causes first (the panel's order, and the order in which causes are looked for).
CAUSE_ORDER: tuple[str, ...] = (
    "exploding_gradients",
    "divergence",
    "batchnorm_mismatch",
    "attention_collapse",
    "rank_collapse",
    "unchanged_weights",
    "initial_loss",
    "saturated_activations",
    "vanishing_gradients",
    "oscillating_loss",
    "dead_filters",
    "not_learning",
    "overfitting",
    "undertraining",
)
_STALLED = frozenset({"not_learning", "undertraining"})
#: Which findings a finding explains (see :func:`diagnose`): those are folded into its evidence.
#:
#: - gradients that grow by orders of magnitude come before (and cause) a divergence and all it explains (running
#:   statistics cannot follow weights that blow up: a BatchNorm mismatch then is a consequence too);
#: - BatchNorm running statistics that do not match the data spoil everything measured in eval mode on the
#:   validation data: dead units, saturation, a validation loss at chance (not learning), and what looks like
#:   under- or over-training;
#: - saturated activations pass no gradient: vanishing gradients and a stalled loss follow;
#: - attention that collapses onto one token makes every token the same vector (rank collapse), and tokens that are
#:   all one vector leave the head nothing to classify with: a stalled loss follows;
#: - a loss that oscillates (a learning rate too high for the schedule) kills ReLU units on its swings: the dead
#:   filters that follow are its consequence (dead units make a loss stall, never swing), and so is a stalled loss;
#: - unchanged weights and an initial loss off its chance level are causes of their own.
EXPLAINS: dict[str, frozenset[str]] = {
    "exploding_gradients": frozenset(
        {"divergence", "dead_filters", "not_learning", "overfitting", "undertraining", "oscillating_loss"}
        | {"saturated_activations", "vanishing_gradients", "batchnorm_mismatch", "attention_collapse", "rank_collapse"}
    ),
    "divergence": frozenset(
        {"dead_filters", "not_learning", "overfitting", "undertraining", "oscillating_loss"}
        | {"saturated_activations", "vanishing_gradients", "batchnorm_mismatch", "attention_collapse", "rank_collapse"}
    ),
    "batchnorm_mismatch": frozenset({"dead_filters", "saturated_activations", "overfitting"} | _STALLED),
    "attention_collapse": frozenset({"rank_collapse"} | _STALLED),
    "rank_collapse": _STALLED,
    "saturated_activations": frozenset({"vanishing_gradients"} | _STALLED),
    "vanishing_gradients": _STALLED,
    "oscillating_loss": frozenset({"dead_filters"} | _STALLED),
    "dead_filters": _STALLED,
    "not_learning": frozenset({"overfitting", "undertraining"}),
    "overfitting": frozenset({"undertraining"}),
}

Series = Sequence[tuple[int, float]]


@dataclass
class Finding:
    kind: str
    severity: Severity
    since_epoch: int
    summary: str
    evidence: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    remedies: list[str] = field(default_factory=list)
    subject: str = ""  #: what it is about (a layer), so two findings of one kind stay apart
    #: Rows of a Markdown table (the first row is the header), e.g. one row per affected layer.
    table: list[tuple[str, ...]] = field(default_factory=list)
    #: A cause whose evidence waits for confirmation (one BatchNorm probe so far): not listed yet, but what it would
    #: explain is held back with it (dead filters measured in a broken eval mode are no finding of their own).
    pending: bool = False

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.subject}"


def epoch_name(done: int) -> str:
    """How the text names the moment ``done`` epochs are complete, in Lightning's counting (its progress bar's
    ``Epoch 0`` is the first): ``"epoch 0"`` after the first epoch, ``"the start"`` before any (the untrained network,
    the filmstrips' ``init``). Histories and findings count epochs done; only the words are Lightning's."""
    return "the start" if done <= 0 else f"epoch {done - 1}"


@dataclass(frozen=True)
class DeadHistory:
    """One activation site's dead-unit history."""

    #: ``"filters"`` (conv channels) or ``"units"`` (hidden units of a Linear layer, or unknown).
    unit: str
    #: (epoch, dead fraction, dead count, channels) per logged epoch, oldest first.
    points: tuple[tuple[int, float, int, int], ...]


@dataclass(frozen=True)
class DynamicsEvidence:
    """The training-dynamics records a :class:`~lightning_viz.DynamicsMonitor` published (:mod:`lightning_viz.records`),
    for the rules in :mod:`lightning_viz.diagnosis_rules`."""

    #: :class:`~lightning_viz.records.GradientStats` per layer, oldest first.
    gradients: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    #: The latest :class:`~lightning_viz.records.UpdateStats` per layer.
    updates: Sequence[Any] = ()
    #: The latest :class:`~lightning_viz.records.BatchNormProbe` (``None``: no BatchNorm, or no probe yet).
    bn_probe: Any = None
    #: The latest :class:`~lightning_viz.records.BatchNormStats` per BatchNorm layer.
    bn_layers: Sequence[Any] = ()
    #: :class:`~lightning_viz.records.SaturationStats` per bounded activation, oldest first.
    saturation: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    #: The latest :class:`~lightning_viz.records.LossStats` (initial loss, chance level).
    loss: Any = None
    #: :class:`~lightning_viz.records.GradientTrace` per logged epoch (every step's total gradient norm), oldest first.
    trace: Sequence[Any] = ()
    #: Every :class:`~lightning_viz.records.BatchNormProbe`, oldest first.
    bn_probes: Sequence[Any] = ()


@dataclass
class Evidence:
    """Everything the rules see: per-epoch histories and the facts of the run. Epochs are the time axis."""

    #: Training epochs completed when judged.
    epoch: int
    #: Whether the fit is over (whatever ended it): end-of-run verdicts (under-training, not learning) apply.
    final: bool = False
    #: Mean training loss per epoch (from what ``training_step`` returned), oldest first.
    train_loss: Series = ()
    #: Standard error of the last epoch's mean training loss (batch-to-batch spread / sqrt(batches)).
    train_loss_sem: float = 0.0
    #: The loss of the first training batch, before any update (the loss at initialisation).
    initial_loss: float | None = None
    #: Validation loss per epoch in which validation ran.
    val_loss: Series = ()
    #: Validation accuracy per epoch in which validation ran (when the user logs one).
    val_acc: Series = ()
    #: Number of classes (the model's output width) and the chance-level loss (``ln(num_classes)``), when known.
    num_classes: int | None = None
    chance_loss: float | None = None
    #: First epoch in which a training loss or a weight was NaN/Inf (``None``: never).
    nonfinite_epoch: int | None = None
    #: (epoch, first, highest, last learning rate of the epoch): the largest over the optimizers' param groups.
    learning_rate: Sequence[tuple[int, float, float, float]] = ()
    #: Total weight norm per epoch, and at the start of the fit.
    weight_norm: Series = ()
    initial_norm: float | None = None
    #: Layers whose weights were constant (all units alike) at the start of the fit.
    constant_init: tuple[str, ...] = ()
    #: Dead-unit history per activation site.
    dead: Mapping[str, DeadHistory] = field(default_factory=dict)
    #: k-NN accuracy of the embedding per logged epoch.
    knn: Series = ()
    #: The real tags / metric names to point at.
    train_tag: str = "diagnosis/train_loss"
    val_tag: str | None = None
    #: Whether an EarlyStopping callback watches the run.
    early_stopping: bool = False
    #: What a DynamicsMonitor measured (``None``: none in the run; its findings are then off).
    dynamics: DynamicsEvidence | None = None
    #: :class:`~lightning_viz.records.AttentionStats` and :class:`~lightning_viz.records.TokenRankStats` per
    #: attention layer, oldest first, as an :class:`~lightning_viz.AttentionMonitor` published them (empty: none).
    attention: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    token_rank: Mapping[str, Sequence[Any]] = field(default_factory=dict)
    #: Knobs.
    dead_threshold: float = 0.2
    dead_critical: float = 0.5
    overfit_patience: int = 3
    overfit_min_rise: float = 0.05
    explode_factor: float = 10.0


Rule = Callable[[Evidence], "Finding | None"]


# ---------------------------------------------------------------------------------------------------- signals
def finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def noise_level(values: Sequence[float]) -> float:
    """Epoch-to-epoch noise of a curve: the robust spread of each point around its neighbours' midpoint.

    For independent noise of standard deviation s, ``v[i] - (v[i-1] + v[i+1]) / 2`` has standard deviation
    ``s * sqrt(1.5)``; the median absolute value / 0.6745 estimates it without being pulled by a few jumps. A smooth
    trend contributes little, so this measures what the curve does from one epoch to the next beyond its trend.
    """
    v = finite(values)
    if len(v) < 3:
        return 0.0
    deviations = [abs(v[i] - (v[i - 1] + v[i + 1]) / 2) for i in range(1, len(v) - 1)]
    return statistics.median(deviations) / 0.6745 / math.sqrt(1.5)


def slope_per_epoch(points: Series) -> float:
    """Least-squares slope of ``(epoch, value)`` points, per epoch (0 with fewer than two)."""
    pts = [(float(e), float(v)) for e, v in points if math.isfinite(v)]
    if len(pts) < 2:
        return 0.0
    me = sum(e for e, _ in pts) / len(pts)
    mv = sum(v for _, v in pts) / len(pts)
    den = sum((e - me) ** 2 for e, _ in pts)
    return sum((e - me) * (v - mv) for e, v in pts) / den if den > 0 else 0.0


def learning_rate(trainer: Any) -> float | None:
    """The highest learning rate over the Trainer's optimizers' param groups now (``None`` without one)."""
    rates = [g.get("lr") for opt in getattr(trainer, "optimizers", None) or () for g in opt.param_groups]
    rates = [float(r) for r in rates if isinstance(r, (int, float))]
    return max(rates) if rates else None


def loss_curve(ev: Evidence) -> list[tuple[int, float]]:
    """The training loss per epoch, with the loss at initialisation as epoch 0."""
    curve = [(e, v) for e, v in ev.train_loss if math.isfinite(v)]
    if ev.initial_loss is not None and math.isfinite(ev.initial_loss):
        curve.insert(0, (0, ev.initial_loss))
    return curve


# ------------------------------------------------------------------------------------------------------ rules
def divergence(ev: Evidence) -> Finding | None:
    """NaN/Inf in the loss or the weights, or weights that grew ``explode_factor`` times their initial norm."""
    evidence, since = [], None
    if ev.nonfinite_epoch is not None:
        since = ev.nonfinite_epoch
        evidence.append(f"the training loss or the weights became NaN/Inf in {epoch_name(ev.nonfinite_epoch)}")
    reference = max(finite([ev.initial_loss, ev.chance_loss]) or [math.inf])
    blown = [(e, v) for e, v in ev.train_loss if math.isfinite(v) and v > 10 * reference]
    if blown:
        since = min(since, blown[0][0]) if since is not None else blown[0][0]
        evidence.append(
            f"the training loss blew up to {max(v for _, v in blown):.3g} in {epoch_name(blown[0][0])}, over 10 times "
            f"its initial value {reference:.3g}"
        )
    norms = [(e, v) for e, v in ev.weight_norm if math.isfinite(v)]
    # exploding: far above the initial norm and growing by half again in each of the last three epochs; a norm that
    # jumps early and then stays is a large learning rate's new scale (or dead units'), not a divergence
    if ev.initial_norm and len(norms) >= 4 and norms[-1][1] > ev.explode_factor * ev.initial_norm:
        last = [v for _, v in norms[-4:]]
        if all(b > 1.5 * a for a, b in zip(last, last[1:])):
            since = min(since, norms[-3][0]) if since is not None else norms[-3][0]
            evidence.append(
                f"the weights' total norm is {last[-1] / ev.initial_norm:.1f} times its initial value and still "
                f"growing ({' -> '.join(f'{v:.3g}' for v in last)} over the last epochs)"
            )
    if since is None:
        return None
    # a loss that blew up and has since come back below its initial value, with finite weights throughout: a spike
    # the run recovered from (too high a rate early on), worth a warning, not "has diverged"
    last = next((p for p in reversed(ev.train_loss) if math.isfinite(p[1])), None)
    recovered = bool(blown) and len(evidence) == 1 and ev.nonfinite_epoch is None and last is not None
    recovered = recovered and last[0] > blown[-1][0] and last[1] < reference  # type: ignore[index]
    if recovered:
        evidence.append(f"it has since come back to {last[1]:.3g} in {epoch_name(last[0])}")  # type: ignore[index]
    return Finding(
        kind="divergence",
        severity="warning" if recovered else "critical",
        since_epoch=since,
        summary="The training loss blew up, then recovered."
        if recovered
        else "The weights are exploding."
        if len(evidence) == 1 and not blown and ev.nonfinite_epoch is None
        else "Training has diverged.",
        evidence=evidence,
        tags=[ev.train_tag, "diagnosis/weight_norm"],
        remedies=[
            "lower the learning rate; clip gradients (Trainer(gradient_clip_val=...))",
            "check the data for NaN/Inf and the loss for log(0) or division by zero",
            "mixed precision: use a gradient scaler / bf16",
        ],
    )


#: The most of a layer's channels that can be silent from a random initialisation alone: a conv channel that never
#: fires at any position of any image is not how a network starts; PyTorch's default initialisation leaves up to
#: about two fifths of a Linear layer's units silent on non-negative (post-ReLU) inputs.
INITIALLY_DEAD = {"filters": 0.0, "units": 0.4}


def _dead_reference(history: DeadHistory, constant_init: bool) -> float:
    """The dead fraction a site is judged against: only a rise above it counts.

    The first logged fraction when it was taken at initialisation (epoch 0), or when the initialisation was constant
    (then whole layers start silent, and that is not a learning-rate problem). Otherwise the state at initialisation
    was not seen - and a layer can die within the first epoch - so it is what a random initialisation can leave
    silent (:data:`INITIALLY_DEAD`).
    """
    first_epoch, first, _, _ = history.points[0]
    if first_epoch == 0 or constant_init:
        return first
    return INITIALLY_DEAD.get(history.unit, 0.4)


def dead_units(ev: Evidence) -> Finding | None:
    """Sites whose dead fraction rose at least ``dead_threshold`` above their reference (:func:`_dead_reference`):
    one finding, with a table of the layers."""
    rows, tags, since, worst, units = [], [], None, 0.0, set()
    for site, history in ev.dead.items():
        if not history.points:
            continue
        reference = _dead_reference(history, bool(ev.constant_init))
        epoch, value, count, channels = history.points[-1]
        if value - reference < ev.dead_threshold:
            continue
        start = epoch
        for e, v, _, _ in reversed(history.points):
            if v - reference < ev.dead_threshold:
                break
            start = e
        since = start if since is None else min(since, start)
        worst = max(worst, value - reference)
        units.add(history.unit)
        dead_now = f"{count} of {channels} ({value:.0%})"
        rows.append((f"`{site}`", history.unit, dead_now, f"{reference:.0%}", epoch_name(start)))
        tags.append(f"activations/dead_fraction/{site}")
    if not rows:
        return None
    noun = "filters" if units == {"filters"} else "units" if units == {"units"} else "filters/units"
    return Finding(
        kind="dead_filters",
        severity="critical" if worst >= ev.dead_critical else "warning",
        since_epoch=since or 0,
        summary=f"Dead {noun} in {len(rows)} layer(s): they never fire on the validation data.",
        evidence=[
            f"the dead share is up to {worst:.0%} above the reference: the layer's state at initialisation where it "
            "was seen, else what a random initialisation can leave silent (none of a conv layer's filters, up to "
            f"{INITIALLY_DEAD['units']:.0%} of a Linear layer's units)"
        ],
        table=[("site", "kind", "dead now", "reference", "since"), *rows],
        tags=[*tags, "activations/dead_channels"],
        remedies=[
            "a learning rate that is too high is the usual cause: lower it, or add warm-up",
            "check the initialisation and any large negative biases",
            "BatchNorm before the ReLU, or LeakyReLU / GELU, keep units alive",
        ],
    )


def overfitting(ev: Evidence) -> Finding | None:
    """A sustained rise of the validation loss above its best, large against the curve's own noise, with a
    widening positive train/validation gap and a training loss that kept falling."""
    val = [(e, v) for e, v in ev.val_loss if math.isfinite(v)]
    if len(val) < 3:
        return None
    values = [v for _, v in val]
    best_index = min(range(len(values)), key=values.__getitem__)
    best_epoch, best = val[best_index]
    after = val[best_index + 1 :]
    now_epoch, now = val[-1]
    if len(after) < 2 or now_epoch - best_epoch < ev.overfit_patience:
        return None
    noise = noise_level(values)
    rise = now - best
    margin = max(3.0 * noise, ev.overfit_min_rise * abs(best))
    # sustained: the last points after the best all stay clearly above it, not one bump
    recent = [v for e, v in after if e > now_epoch - ev.overfit_patience]
    if rise < margin or min(recent or [now]) < best + margin / 2:
        return None
    train = {e: v for e, v in ev.train_loss if math.isfinite(v)}
    if best_epoch not in train or now_epoch not in train:
        return None
    gap_then, gap_now = best - train[best_epoch], now - train[now_epoch]
    if gap_now <= 0 or gap_now - gap_then < margin or not train[now_epoch] < train[best_epoch]:
        return None
    evidence = [
        f"validation loss {now:.4g} at {epoch_name(now_epoch)}, up {rise:.3g} from its best {best:.4g} at "
        f"{epoch_name(best_epoch)} "
        f"(its epoch-to-epoch noise is about {noise:.2g})",
        f"training loss fell from {train[best_epoch]:.4g} to {train[now_epoch]:.4g} meanwhile",
        f"generalisation gap (validation - training loss) grew from {gap_then:.4g} to {gap_now:.4g}",
    ]
    if len(ev.knn) >= 2:
        evidence.append(f"k-NN accuracy of the code: {ev.knn[-1][1]:.3f} (best {max(v for _, v in ev.knn):.3f})")
    stop = (
        "EarlyStopping is on: restore the best checkpoint (ModelCheckpoint(monitor=...)), or lower its patience"
        if ev.early_stopping
        else "stop earlier (EarlyStopping on the validation loss) or keep the best checkpoint"
    )
    return Finding(
        kind="overfitting",
        severity="critical" if gap_now > 2 * max(gap_then, 0.0) + margin and rise > 2 * margin else "warning",
        since_epoch=best_epoch,
        summary=f"The model is over-fitting since {epoch_name(best_epoch)}: validation loss rose "
        f"{rise / abs(best):.0%} above its best while the training loss kept falling (gap now {gap_now:.3g}).",
        evidence=evidence,
        tags=[t for t in (ev.val_tag, ev.train_tag) if t] + (["embedding/knn_accuracy"] if ev.knn else []),
        remedies=[
            stop,
            "more regularisation: weight decay, dropout, data augmentation",
            "more data, or a smaller model",
        ],
    )


def _near_chance(ev: Evidence, curve: Series) -> str | None:
    """Why the run counts as at chance level (loss or accuracy), or ``None``."""
    if ev.chance_loss is not None and curve:
        recent = [v for _, v in curve[-3:]]
        val = [v for _, v in ev.val_loss[-2:] if math.isfinite(v)]
        if min(recent) >= 0.9 * ev.chance_loss and (not val or min(val) >= 0.9 * ev.chance_loss):
            return (
                f"the loss stays at {recent[-1]:.3g}, its chance level is ln({ev.num_classes}) = {ev.chance_loss:.3g}"
            )
    if ev.num_classes and ev.val_acc:
        chance = 1.0 / ev.num_classes
        acc = [v for _, v in ev.val_acc[-2:]]
        if max(acc) <= chance + 0.1 * (1 - chance):
            return f"validation accuracy stays at {acc[-1]:.1%}, chance is {chance:.1%}"
    return None


def not_learning(ev: Evidence) -> Finding | None:
    """Loss (or accuracy) at chance level and flat: at the end of fit, or mid-run after five flat epochs."""
    curve = loss_curve(ev)
    if len(curve) < 2 or not (ev.final or len(ev.train_loss) >= 5):
        return None
    why = _near_chance(ev, curve)
    if why is None:
        return None
    scale = ev.chance_loss or abs(curve[0][1]) or 1.0
    drop = -slope_per_epoch(curve[-3:])
    if drop > 0.01 * scale:
        return None  # moving away from chance, however slowly: that is a slow start (see `undertraining`)
    return Finding(
        kind="not_learning",
        severity="critical",
        since_epoch=curve[0][0],
        summary="The network is not learning: it stays at chance level.",
        evidence=[why, f"progress per epoch over the last epochs: {drop:.2g}"]
        + (
            [f"constant weights at initialisation in {', '.join(f'`{n}`' for n in ev.constant_init[:5])}"]
            if ev.constant_init
            else []
        ),
        tags=[t for t in (ev.train_tag, ev.val_tag) if t],
        remedies=[
            "check the labels (shuffled, or misaligned with the inputs) and what the loss gets (logits, not "
            "probabilities)",
            "check the initialisation: constant or zero weights make all units alike",
            "check the optimiser actually gets the model's parameters, and the learning rate is not 0",
        ],
    )


def undertraining(ev: Evidence) -> Finding | None:
    """At the end of fit, the loss still falls per epoch by at least a tenth of all the progress made so far (by more
    than 3 standard errors of the epoch mean), and the validation loss, where there is one, is still at its best."""
    curve = loss_curve(ev)
    if not ev.final or len(curve) < 2:
        return None
    progress = curve[0][1] - curve[-1][1]
    drop = -slope_per_epoch(curve[-3:])
    if progress <= 0 or drop <= 3 * ev.train_loss_sem or drop < 0.1 * progress:
        return None
    val = [v for _, v in ev.val_loss if math.isfinite(v)]
    if len(val) >= 2 and val[-1] > min(val):
        return None  # validation has stopped improving: more of the same training would not help it
    evidence = [
        f"training loss still falls by {drop:.3g} per epoch over the last {len(curve[-3:]) - 1} epoch(s) "
        f"({curve[-3:][0][1]:.4g} -> {curve[-1][1]:.4g}), "
        f"{drop / progress:.0%} of all it gained since the start ({curve[0][1]:.4g})",
        f"the fit ended after {ev.epoch} epoch(s)",
    ]
    if ev.chance_loss is not None:
        evidence.append(f"chance level ln({ev.num_classes}) = {ev.chance_loss:.3g}")
    return Finding(
        kind="undertraining",
        severity="warning",
        since_epoch=ev.epoch,
        summary="The network is under-trained: the loss was still falling steeply when the fit ended.",
        evidence=evidence,
        tags=[ev.train_tag] + ([ev.val_tag] if ev.val_tag else []),
        remedies=["train for more epochs (or steps), or a later-stopping rule", "a larger learning rate"],
    )


#: The rules :func:`diagnose` applies, in order. Adding a rule is one entry here (``Evidence -> Finding | None``).
RULES: list[Rule] = [divergence, dead_units, not_learning, overfitting, undertraining]


def diagnose(ev: Evidence, rules: Sequence[Rule] | None = None) -> list[Finding]:
    """Apply ``rules`` (default :data:`RULES` and the training-dynamics rules of :mod:`lightning_viz.diagnosis_rules`)
    and keep one finding per cause (:data:`EXPLAINS`).

    A diverged run's other findings are its consequences (all units read as dead once the weights are NaN), and are
    folded into the divergence finding; dead units that make a network sit at chance are the cause of its not
    learning; over-fitting and under-training exclude each other; no remedy contradicts another finding's.
    """
    if rules is None:
        from lightning_viz.diagnosis_attention import RULES as ATTENTION_RULES  # they build on this module's Finding
        from lightning_viz.diagnosis_rules import RULES as DYNAMICS_RULES

        rules = [*RULES, *DYNAMICS_RULES, *ATTENTION_RULES]
    found = [f for f in (rule(ev) for rule in rules) if f is not None]
    rank = {k: i for i, k in enumerate(CAUSE_ORDER)}
    found.sort(key=lambda f: rank.get(f.kind, len(rank)))  # a cause takes in its consequences before it is folded
    out = []
    for finding in found:
        host = next((f for f in found if finding.kind in EXPLAINS.get(f.kind, ()) and f is not finding), None)
        if host is not None:
            host.evidence.append(f"a consequence, not listed on its own: {finding.summary}")
            continue
        out.append(finding)
    out = [f for f in out if not f.pending]
    lowers = any(any("lower" in r and "learning rate" in r for r in f.remedies) for f in out)
    return [
        replace(f, remedies=[r for r in f.remedies if "larger learning rate" not in r]) if lowers else f for f in out
    ]


def find_metric(metrics: Any, configured: str | None, stage: set[str], what: set[str]) -> str | None:
    """The key of a logged metric: ``configured`` (or ``<configured>_epoch``), else a name whose words hold one of
    ``stage`` and one of ``what`` (``val/loss``, ``loss/val``, ``valid_loss``, ``val_loss_epoch``, ...)."""
    keys = list(metrics)
    for key in (configured, f"{configured}_epoch") if configured else ():
        if key in keys:
            return key
    words = {k: set(re.split(r"[^a-z0-9]+|_", k.lower())) for k in keys}
    found = [k for k in keys if words[k] & stage and words[k] & what and "step" not in words[k]]
    return min(found, key=lambda k: (len(words[k]), len(k))) if found else None


def unit_kind(model: nn.Module, site: str) -> str:
    """``"filters"`` for a site fed by a conv layer, ``"units"`` for one fed by a Linear layer (or unknown)."""
    name = site.split("#")[0]
    last = "units"
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            last = "filters"
        elif isinstance(module, nn.Linear):
            last = "units"
        if module_name == name:
            return last
    return "units"


def weight_norm(model: nn.Module) -> float:
    """The total L2 norm of ``model``'s parameters (``inf`` once any is NaN or infinite)."""
    total = 0.0
    for p in model.parameters():
        total += float(p.detach().float().pow(2).sum())
    return math.sqrt(total) if math.isfinite(total) else float("inf")


def to_markdown(
    findings: Sequence[Finding],
    epoch: int,
    step: int,
    *,
    final: bool = False,
    resolved: Sequence[str] = (),
    disabled: Sequence[str] = (),
) -> str:
    """The findings as a Markdown panel (TensorBoard's text plugin renders it), with the checks that are off."""
    when = f"{'at the end of fit,' if final else 'after'} {epoch_name(epoch)} (step {step})"
    order = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    rank = {k: i for i, k in enumerate(CAUSE_ORDER)}
    lines = [f"### Findings {when}", ""] if findings else [f"**No problems found** {when}.", ""]
    for f in sorted(findings, key=lambda f: (order[f.severity], rank.get(f.kind, 99), f.since_epoch)):
        lines.append(f"#### {f.severity.upper()}: {f.kind.replace('_', ' ')} (since {epoch_name(f.since_epoch)})")
        lines.append("")
        lines.append(f.summary)
        lines.append("")
        lines.extend(f"- {e}" for e in f.evidence)
        lines.append(f"- look at: {', '.join(f'`{t}`' for t in f.tags)}")
        lines.append(f"- usual remedies: {'; '.join(f.remedies)}")
        lines.append("")
        if f.table:
            lines.append("| " + " | ".join(f.table[0]) + " |")
            lines.append("|" + "---|" * len(f.table[0]))
            lines.extend("| " + " | ".join(row) + " |" for row in f.table[1:])
            lines.append("")
    if resolved:
        lines.append("Resolved during the run: " + "; ".join(resolved) + ".")
        lines.append("")
    if disabled:
        lines.append("Checks switched off:")
        lines.extend(f"- {d}" for d in disabled)
    return "\n".join(lines).rstrip() + "\n"
