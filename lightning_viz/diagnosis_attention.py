"""Rules over the attention records (issue #19): attention collapse and rank collapse. Pure functions, no Trainer.

Each rule reads records that :class:`~lightning_viz.callbacks.attention_monitor.AttentionMonitor` publishes
(:mod:`lightning_viz.records`) and returns a :class:`lightning_viz.diagnosis.Finding` or ``None``, like the rules in
:mod:`lightning_viz.diagnosis_rules`. Thresholds carry over between models: attention is judged by its effective number
of keys (``exp(entropy)``) against its own level at the first logged epoch, token representations by their relative
distance from rank one (a ratio of norms).

How a diagnosis calls them (``bus`` is :func:`lightning_viz.records.bus_for` of the Trainer)::

    attention_collapse({s: bus.history(AttentionStats, s) for s in bus.latest(AttentionStats)})
    rank_collapse({s: bus.history(TokenRankStats, s) for s in bus.latest(TokenRankStats)})
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from lightning_viz.diagnosis import Evidence, Finding, epoch_name
from lightning_viz.records import AttentionStats, TokenRankStats

__all__ = ["RULES", "attention_collapse", "rank_collapse"]


def _collapsed_heads(first: AttentionStats, now: AttentionStats, max_keys: float, drop: float) -> list[int]:
    """Heads of a layer that attend to about one token now (``exp(H) <= max_keys``) and whose effective number of
    keys fell to at most ``drop`` times its first logged value."""
    if len(first.head_entropy) != len(now.head_entropy) or now.tokens < 2:
        return []
    return [
        h
        for h, (h0, h1) in enumerate(zip(first.head_entropy, now.head_entropy))
        if math.isfinite(h1) and math.exp(h1) <= max_keys and math.exp(h1) <= drop * math.exp(h0)
    ]


def attention_collapse(
    history: Mapping[str, Sequence[AttentionStats]],
    *,
    max_keys: float = 2.0,
    drop: float = 0.5,
    share: float = 0.5,
    critical_share: float = 0.8,
) -> Finding | None:
    """Most attention heads have collapsed onto about one token since the first logged epoch (entropy collapse).

    Args:
        history: per attention layer, its :class:`AttentionStats`, oldest first (ideally starting with the untrained
            baseline, epoch 0: each head is judged against its own first level).
        max_keys: a head attends to "about one token" when the effective number of keys it attends to,
            ``exp(entropy)``, is at most this;
        drop: ... and that number fell to at most this share of its first logged value (attention that starts
            peaked is not a collapse).
        share: share of all heads (over all layers) collapsed that fires; ``critical_share`` makes it critical.
    """
    layers = {name: list(records) for name, records in history.items() if len(records) >= 2}
    layers = {name: records for name, records in layers.items() if records[-1].epoch > records[0].epoch}
    if not layers:
        return None
    collapsed = {name: _collapsed_heads(r[0], r[-1], max_keys, drop) for name, r in layers.items()}
    heads = sum(r[-1].heads for r in layers.values())
    count = sum(len(c) for c in collapsed.values())
    if heads == 0 or count < share * heads:
        return None
    # since: the first epoch from which on the share held in every later record
    epochs = sorted({r.epoch for records in layers.values() for r in records})
    since = epochs[-1]
    for epoch in reversed(epochs):
        at = {n: next((r for r in reversed(rs) if r.epoch <= epoch), rs[0]) for n, rs in layers.items()}
        k = sum(len(_collapsed_heads(layers[n][0], r, max_keys, drop)) for n, r in at.items())
        if k < share * heads:
            break
        since = epoch
    hit = [n for n, c in collapsed.items() if c]
    first_epoch = min(r[0].epoch for r in layers.values())
    last_epoch = max(r[-1].epoch for r in layers.values())
    table = [("layer", "collapsed heads", "normalised entropy then -> now", "top-key share now")]
    for name, records in layers.items():
        then, now = records[0], records[-1]
        table.append(
            (
                f"`{name}`",
                f"{len(collapsed[name])} of {now.heads}",
                f"{_fmt(then.normalized_entropy)} -> {_fmt(now.normalized_entropy)}",
                f"{now.top_key_share:.0%}",
            )
        )
    keys_now = statistics.fmean(math.exp(h) for r in layers.values() for h in r[-1].head_entropy)
    keys_then = statistics.fmean(math.exp(h) for r in layers.values() for h in r[0].head_entropy)
    tokens = max(r[-1].tokens for r in layers.values())
    return Finding(
        kind="attention_collapse",
        severity="critical" if count >= critical_share * heads else "warning",
        since_epoch=since,
        summary=f"Attention has collapsed: {count} of {heads} heads in {len(hit)} of {len(layers)} layers attend to "
        "about one token.",
        evidence=[
            f"effective number of keys a head attends to (exp of the attention entropy), mean over heads: "
            f"{keys_now:.2f} at {epoch_name(last_epoch)}, {keys_then:.2f} at {epoch_name(first_epoch)}, "
            f"of {tokens} tokens",
            f"a head counts as collapsed at <= {max_keys:g} effective keys, fallen to <= {drop:.0%} of its first "
            "logged number",
        ],
        table=table,
        tags=[
            *(f"attention/normalized_entropy/{n}" for n in hit[:3]),
            *(f"attention/top_key_share/{n}" for n in hit[:1]),
            "attention/heads/<layer>",
        ],
        remedies=[
            "a lower learning rate, or a longer warm-up (entropy collapse follows large early updates of the "
            "query/key weights; Zhai et al., 2023)",
            "normalise queries and keys (qk-norm: timm's qk_norm=True), or cap the attention logits / lower the "
            "softmax temperature's growth (scale q.k by 1/sqrt(d) and no more)",
            "weight decay on the query/key projections (or σReparam), and gradient clipping",
        ],
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _deep(latest: Mapping[str, TokenRankStats]) -> list[TokenRankStats]:
    """The deep blocks: the last third of the attention layers (at least one, and not the first unless alone)."""
    records = sorted(latest.values(), key=lambda r: r.order)
    layers = max(r.layers for r in records)
    k = max(1, layers // 3)
    return [r for r in records if r.order >= layers - k]


def rank_collapse(
    history: Mapping[str, Sequence[TokenRankStats]], *, residual: float = 0.05, critical: float = 0.01
) -> Finding | None:
    """The token representations of the deep blocks have collapsed to about rank one: every token the same vector.

    Args:
        history: per block (its attention module), its :class:`TokenRankStats`, oldest first.
        residual: fires when the median ``relative_residual`` (``||X - mean token|| / ||X||``) of the deep blocks
            (the last third) is at most this; ``critical`` makes it critical. Healthy vision transformers keep it far
            higher (their tokens stay distinct: 0.3 and above in our runs); pure attention without residual
            connections drives it to 0 doubly exponentially with depth (Dong et al., 2021).
    """
    latest = {s: r[-1] for s, r in history.items() if r and r[-1].relative_residual is not None}
    if not latest:
        return None
    deep = _deep(latest)
    values = [r.relative_residual for r in deep if r.relative_residual is not None]
    level = statistics.median(values)
    if level > residual:
        return None
    since = max(r.epoch for r in deep)
    epochs = sorted({r.epoch for s in latest for r in history[s]}, reverse=True)
    for epoch in epochs:
        at = [next((r for r in history[d.subject] if r.epoch == epoch), None) for d in deep]
        vals = [r.relative_residual for r in at if r is not None and r.relative_residual is not None]
        if not vals or statistics.median(vals) > residual:
            break
        since = epoch
    first = min(latest.values(), key=lambda r: r.order)
    ranks = [r.effective_rank for r in deep if r.effective_rank is not None]
    evidence = [
        f"relative residual of the token representations from their mean (0: all tokens the same vector) in the "
        f"deep blocks: {', '.join(f'`{r.subject}` {r.relative_residual:.2g}' for r in deep)}",
        f"in the first block `{first.subject}`: {first.relative_residual:.2g}",
    ]
    if ranks:
        evidence.append(
            f"effective rank of the deep blocks' tokens {statistics.median(ranks):.2f} "
            f"(of at most {min(deep[0].tokens, deep[0].dim)})"
        )
    return Finding(
        kind="rank_collapse",
        severity="critical" if level <= critical else "warning",
        since_epoch=since,
        summary=f"Rank collapse: the deep blocks' token representations are all about the same vector (relative "
        f"residual {level:.2g}), so the tokens no longer carry what differs between the patches.",
        evidence=evidence,
        tags=[
            *(f"attention/token_residual/{r.subject}" for r in deep[:3]),
            *(f"attention/effective_rank/{r.subject}" for r in deep[:1]),
        ],
        remedies=[
            "residual (skip) connections around every attention and MLP sub-block: they are what keeps the rank "
            "(Dong et al., 2021)",
            "pre-LN blocks (LayerNorm before attention and MLP), and residual scaling that lets the skip path dominate "
            "early (LayerScale, a small init of the branch outputs)",
            "fewer blocks, or a lower learning rate / warm-up if it appeared during training",
        ],
    )


def _attention(ev: Evidence) -> Finding | None:
    return attention_collapse(ev.attention)


def _rank(ev: Evidence) -> Finding | None:
    return rank_collapse(ev.token_rank)


#: The rules :func:`lightning_viz.diagnosis.diagnose` applies by default (``Evidence -> Finding | None``).
RULES = [_attention, _rank]
