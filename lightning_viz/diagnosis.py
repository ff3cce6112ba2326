"""Rules that turn training statistics into findings in words. Pure functions over histories, no Trainer.

Each rule looks at per-epoch histories and returns a :class:`Finding` (or ``None``): what is wrong, how bad, since
which epoch, the numbers behind it, which TensorBoard tags show it, and the usual causes and remedies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

from torch import nn

FindingKind = Literal["dead_filters", "overfitting", "undertraining", "divergence"]
Severity = Literal["info", "warning", "critical"]
#: Severities from the mildest to the worst.
SEVERITIES: tuple[Severity, ...] = get_args(Severity)


@dataclass
class Finding:
    kind: FindingKind
    severity: Severity
    since_epoch: int
    summary: str
    evidence: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    remedies: list[str] = field(default_factory=list)
    subject: str = ""  #: what it is about (a layer), so two findings of one kind stay apart

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.subject}"


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def dead_filters(
    site: str, fractions: Sequence[tuple[int, float]], counts: Mapping[int, int], *, threshold: float, critical: float
) -> Finding | None:
    """Dead channels in an activation site: the latest dead fraction at or above ``threshold``.

    Args:
        fractions: (epoch, dead fraction) per logged epoch.
        counts: epoch -> dead channel count.
    """
    if not fractions or fractions[-1][1] < threshold:
        return None
    since = fractions[-1][0]
    for epoch, value in reversed(fractions):
        if value < threshold:
            break
        since = epoch
    epoch, value = fractions[-1]
    first = fractions[0][1]
    trend = "rising" if value > first + 1e-9 else "steady"
    return Finding(
        kind="dead_filters",
        severity="critical" if value >= critical else "warning",
        since_epoch=since,
        subject=site,
        summary=f"{counts.get(epoch, '?')} channels of `{site}` ({value:.0%}) never fire on the validation data.",
        evidence=[
            f"dead fraction {value:.1%} at epoch {epoch} ({trend}; {first:.1%} at the first logged epoch)",
            f"at or above {threshold:.0%} since epoch {since}",
        ],
        tags=[f"activations/dead_fraction/{site}", f"activations/dead_history/{site}", "activations/dead_channels"],
        remedies=[
            "a learning rate that is too high is the usual cause: lower it, or add warm-up",
            "check the initialisation and any large negative biases",
            "BatchNorm before the ReLU, or LeakyReLU / GELU, keep units alive",
        ],
    )


def overfitting(
    train_loss: Sequence[tuple[int, float]],
    val_loss: Sequence[tuple[int, float]],
    *,
    patience: int,
    tolerance: float,
    knn: Sequence[tuple[int, float]] = (),
) -> Finding | None:
    """Validation loss rising for ``patience`` epochs above its best (by ``tolerance``) while training loss falls."""
    if len(val_loss) < patience + 1 or len(train_loss) < 2:
        return None
    values = [v for _, v in val_loss]
    best_index = min(range(len(values)), key=values.__getitem__)
    best_epoch, best = val_loss[best_index]
    rising = val_loss[best_index + 1 :]
    if len(rising) < patience or rising[-1][1] <= best * (1 + tolerance):
        return None
    train = dict(train_loss)
    train_now = train_loss[-1][1]
    train_then = train.get(best_epoch, train_loss[0][1])
    if not train_now < train_then:
        return None
    gap_then = best - train_then
    gap_now = rising[-1][1] - train_now
    evidence = [
        f"validation loss {rising[-1][1]:.4g} at epoch {rising[-1][0]}, up from its best {best:.4g} at epoch "
        f"{best_epoch}",
        f"training loss fell from {train_then:.4g} to {train_now:.4g} meanwhile",
        f"generalisation gap (val - train) grew from {gap_then:.4g} to {gap_now:.4g}",
    ]
    if len(knn) >= 2:
        evidence.append(f"k-NN accuracy of the code: {knn[-1][1]:.3f} (best {max(v for _, v in knn):.3f})")
    return Finding(
        kind="overfitting",
        severity="critical" if gap_now > 2 * max(gap_then, 1e-12) and len(rising) >= 2 * patience else "warning",
        since_epoch=best_epoch + 1,
        summary=f"The model is over-fitting: validation loss has risen for {len(rising)} epoch(s) while training loss "
        "keeps falling.",
        evidence=evidence,
        tags=["val_loss", "train_loss", "filters/noise_score/<first conv>", "embedding/knn_accuracy"],
        remedies=[
            "stop earlier (EarlyStopping on the validation loss) or keep the best checkpoint",
            "more regularisation: weight decay, dropout, data augmentation",
            "more data, or a smaller model",
        ],
    )


def undertraining(
    train_loss: Sequence[tuple[int, float]],
    *,
    noise_score: float | None,
    distance: float | None,
    slope: float,
    noise_threshold: float,
    distance_threshold: float,
    final: bool,
) -> Finding | None:
    """Loss still falling steeply (a drop per epoch, over the last two epochs, of more than ``slope`` times the first
    logged loss), or first-layer filters still noise-like and close to their initial values."""
    evidence, reasons = [], []
    points = _finite([v for _, v in train_loss[-3:]])
    first = _finite([v for _, v in train_loss[:1]])
    if len(points) >= 2 and first and first[0] > 0:
        # progress per epoch as a share of the first loss: scale-free, and small once the loss has levelled off
        drop = (points[0] - points[-1]) / first[0] / (len(points) - 1)
        if drop > slope:
            reasons.append("loss")
            evidence.append(
                f"training loss still falls by {drop:.1%} of its first value per epoch over the last "
                f"{len(points) - 1} epoch(s) ({points[0]:.4g} -> {points[-1]:.4g})"
            )
    if (
        noise_score is not None
        and distance is not None
        and noise_score > noise_threshold
        and distance < distance_threshold
    ):
        reasons.append("filters")
        evidence.append(
            f"first-layer filters are still noise-like (noise score {noise_score:.2f}, about 1 = random) and have "
            f"moved only {distance:.1%} from their initial values"
        )
    if not reasons:
        return None
    when = "at the end of training" if final else "so far"
    return Finding(
        kind="undertraining",
        severity="warning" if final else "info",
        since_epoch=train_loss[0][0] if train_loss else 0,
        summary=f"The network looks under-trained {when}: "
        + " and ".join(
            {"loss": "the loss is still falling steeply", "filters": "its filters are still noisy"}[r] for r in reasons
        )
        + ".",
        evidence=evidence,
        tags=["train_loss", "filters/noise_score/<first conv>", "filters/distance_from_init/<first conv>"],
        remedies=["train for more epochs", "a larger learning rate (or a schedule that decays later)"],
    )


def divergence(
    epoch: int, *, loss_finite: bool, weights_finite: bool, weight_norm: float, initial_norm: float, factor: float
) -> Finding | None:
    """NaN/Inf in the loss or the weights, or weights that grew ``factor`` times their initial norm."""
    evidence = []
    if not loss_finite:
        evidence.append("the training loss is NaN or infinite")
    if not weights_finite:
        evidence.append("some weights are NaN or infinite")
    exploding = initial_norm > 0 and weight_norm > factor * initial_norm
    if exploding:
        evidence.append(f"the weights' total norm is {weight_norm / initial_norm:.1f} times its initial value")
    if not evidence:
        return None
    return Finding(
        kind="divergence",
        severity="critical",
        since_epoch=epoch,
        summary="Training has diverged." if (not loss_finite or not weights_finite) else "The weights are exploding.",
        evidence=evidence,
        tags=["train_loss", "filters/weight_norm/<first conv>"],
        remedies=[
            "lower the learning rate; clip gradients (Trainer(gradient_clip_val=...))",
            "check the data for NaN/Inf and the loss for log(0) or division by zero",
            "mixed precision: use a gradient scaler / bf16",
        ],
    )


def weight_norm(model: nn.Module) -> float:
    """The total L2 norm of ``model``'s parameters (``inf`` once any is NaN or infinite)."""
    total = 0.0
    for p in model.parameters():
        total += float(p.detach().float().pow(2).sum())
    return math.sqrt(total) if math.isfinite(total) else float("inf")


def to_markdown(findings: Sequence[Finding], epoch: int, step: int) -> str:
    """The findings as a Markdown panel (TensorBoard's text plugin renders it)."""
    if not findings:
        return f"**No problems found** after epoch {epoch} (step {step})."
    order = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    lines = [f"### Findings after epoch {epoch} (step {step})", ""]
    for f in sorted(findings, key=lambda f: (order[f.severity], f.since_epoch)):
        lines.append(f"#### {f.severity.upper()}: {f.kind.replace('_', ' ')} (since epoch {f.since_epoch})")
        lines.append("")
        lines.append(f.summary)
        lines.append("")
        lines.extend(f"- {e}" for e in f.evidence)
        lines.append(f"- look at: {', '.join(f'`{t}`' for t in f.tags)}")
        lines.append(f"- usual remedies: {'; '.join(f.remedies)}")
        lines.append("")
    return "\n".join(lines)
