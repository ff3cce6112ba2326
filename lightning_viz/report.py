"""``lightning-viz report``: one self-contained HTML page per run, read from its event files or its folder.

A run is a directory holding TensorBoard event files, or the files a :class:`~lightning_viz.FolderLogger` writes
(``index.jsonl`` listing images/text by tag and step, ``scalars.jsonl``), or both. The page opens with a headline
(final train/validation loss and accuracy, found by name; epochs; the verdict: the findings' first lines), then the
findings, the latest image of every image tag in sections (filters, activations, saliency, embedding, exemplars,
feature visualisation, then any other area; filmstrips first), charts with axes of the user's own metrics, and the
monitors' many per-layer scalars in collapsed blocks, one per area. Everything taken from the run (run names, tags,
text) is HTML-escaped; nothing links outside the file, and a folder's index is never followed outside the folder.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

FINDINGS_TAG = "diagnosis/findings"
_EVENT_PREFIX = "events.out.tfevents."
_FOLDER_FILES = ("index.jsonl", "scalars.jsonl")  # written by FolderLogger / the folder backend
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class RunData:
    name: str
    findings: str | None = None
    images: list[tuple[str, int, bytes]] = field(default_factory=list)  #: (tag, step, PNG bytes)
    scalars: list[tuple[str, list[tuple[int, float]]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  #: what could not be read, said on the page


def find_runs(logdir: str) -> list[str]:
    """Directories under ``logdir`` (itself included) that hold event files, sorted."""
    runs = []
    for root, _, files in os.walk(logdir):
        if any(f.startswith(_EVENT_PREFIX) for f in files) or any(f in _FOLDER_FILES for f in files):
            runs.append(root)
    return sorted(runs)


def _event_file_problem(path: str) -> str | None:
    """Why an event file cannot be read to its end, or None.

    TensorBoard's reader stops quietly at a damaged record; this walks the record framing (length, length checksum,
    payload, payload checksum) without reading the payloads, so a truncated or foreign file is named on the page.
    """
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    size = os.path.getsize(path)
    if size == 0:
        return "is empty (nothing was ever flushed to it)"
    position = records = 0
    with open(path, "rb") as f:
        while position < size:
            header = f.read(12)
            if len(header) < 12:
                return f"is truncated: it ends inside record {records + 1} (byte {position})"
            (length,) = struct.unpack("<Q", header[:8])
            (checksum,) = struct.unpack("<I", header[8:])
            if masked_crc32c(header[:8]) != checksum:
                if records == 0:
                    return "is not a TensorBoard event file (its first record header is invalid)"
                return f"is damaged at byte {position} (record {records + 1}): the events after it are lost"
            position += 12 + length + 4
            if position > size:
                return f"is truncated: it ends inside record {records + 1}"
            f.seek(position)
            records += 1
    return None


def _image_mime(encoded: bytes) -> str:
    """The MIME type of an encoded image; raises when the bytes do not decode to an image."""
    from PIL import Image

    with Image.open(io.BytesIO(encoded)) as image:
        image.load()
        fmt = (image.format or "").upper()
    if fmt not in {"PNG", "JPEG", "GIF", "WEBP", "BMP"}:
        raise ValueError(f"unsupported image format {fmt or 'unknown'!r}")
    return f"image/{fmt.lower()}"


def _findings_text(tensor_proto) -> str:
    """The text of a findings event; raises ValueError naming what it holds instead."""
    if tensor_proto.string_val:
        return "\n".join(s.decode("utf-8", "replace") for s in tensor_proto.string_val)
    from tensorboard.util import tensor_util

    values = tensor_util.make_ndarray(tensor_proto)
    if values.dtype.kind in "SUO":
        return "\n".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values.ravel())
    shown = ", ".join(str(v) for v in values.ravel()[:5].tolist())
    raise ValueError(f"it holds {values.dtype} values ({shown or 'none'}), not text")


def read_run(path: str, name: str) -> RunData:
    """Everything the page shows of one run: its event files, its folder files, or both."""
    files = os.listdir(path)
    data = read_events(path, name) if any(f.startswith(_EVENT_PREFIX) for f in files) else RunData(name)
    if any(f in _FOLDER_FILES for f in files):
        _merge(data, read_folder(path, name))
    return data


def _merge(data: RunData, other: RunData) -> None:
    data.findings = other.findings if other.findings is not None else data.findings
    known = {tag for tag, _, _ in data.images}
    data.images = sorted(data.images + [im for im in other.images if im[0] not in known])
    known = {tag for tag, _ in data.scalars}
    data.scalars = sorted(data.scalars + [sc for sc in other.scalars if sc[0] not in known])


def _jsonl(path: str) -> list[dict]:
    """The JSON objects of a ``.jsonl`` file; a line that does not parse (a run cut short mid-write) is skipped."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _inside(root: str, relative: object) -> str | None:
    """``root/relative`` when it stays inside ``root`` (an index is data, not a pointer to anywhere), else None."""
    if not isinstance(relative, str):
        return None
    root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(root, relative))
    return full if full.startswith(root + os.sep) and os.path.isfile(full) else None


def read_folder(path: str, name: str) -> RunData:
    """A :class:`~lightning_viz.FolderLogger` run: ``index.jsonl`` (images, text) and ``scalars.jsonl``."""
    data = RunData(name)
    latest: dict[tuple[str, str], tuple[int, str]] = {}
    for record in _jsonl(os.path.join(path, "index.jsonl")):
        kind, tag, step = record.get("kind"), record.get("tag"), record.get("step")
        if kind not in ("images", "text") or not isinstance(tag, str) or not isinstance(step, int):
            continue
        full = _inside(path, record.get("file"))
        if full is not None and step >= latest.get((kind, tag), (-1, ""))[0]:
            latest[(kind, tag)] = (step, full)
    for (kind, tag), (step, full) in sorted(latest.items()):
        if kind == "images":
            with open(full, "rb") as f:
                png = f.read()
            if png.startswith(_PNG_MAGIC):
                data.images.append((tag, step, png))
        elif tag == FINDINGS_TAG:
            with open(full, encoding="utf-8", errors="replace") as f:
                data.findings = f.read()
    series: dict[str, list[tuple[int, float]]] = {}
    for record in _jsonl(os.path.join(path, "scalars.jsonl")):
        step, metrics = record.get("step"), record.get("metrics")
        if not isinstance(metrics, dict):
            continue
        for tag, value in metrics.items():
            if isinstance(value, (int, float)) or value is None:
                point = (
                    step if isinstance(step, int) else len(series.get(tag, [])),
                    float("nan") if value is None else float(value),
                )
                series.setdefault(str(tag), []).append(point)
    data.scalars = sorted(series.items())
    return data


def read_events(path: str, name: str) -> RunData:
    """A TensorBoard run: the event files in ``path``; what cannot be read goes to ``problems``."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    data = RunData(name)
    for file in sorted(f for f in os.listdir(path) if f.startswith(_EVENT_PREFIX)):
        try:
            problem = _event_file_problem(os.path.join(path, file))
        except OSError as exc:
            problem = f"cannot be read ({exc.strerror or exc})"
        if problem:
            data.problems.append(f"event file {file} {problem}.")
    acc = ea.EventAccumulator(path, size_guidance={"images": 1, "scalars": 0, "tensors": 0, "histograms": 1})
    try:
        acc.Reload()
        tags = acc.Tags()
    except Exception as exc:  # noqa: BLE001 - the page says why, the other runs still get theirs
        data.problems.append(f"the event files could not be read: {type(exc).__name__}: {exc}")
        return data
    for tag in (FINDINGS_TAG, f"{FINDINGS_TAG}/text_summary"):
        if tag in tags.get("tensors", []):
            try:
                events = acc.Tensors(tag)
                if events:
                    data.findings = _findings_text(events[-1].tensor_proto)
            except Exception as exc:  # noqa: BLE001
                data.problems.append(f"the findings ({tag}) could not be read: {exc}")
    if data.findings is None and FINDINGS_TAG in tags.get("scalars", []):
        data.problems.append(f"{FINDINGS_TAG} is a scalar in this run, not the DiagnosisMonitor's text.")
    for tag in sorted(tags.get("images", [])):
        try:
            events = acc.Images(tag)
            if not events:
                continue
            _image_mime(events[-1].encoded_image_string)
            data.images.append((tag, events[-1].step, events[-1].encoded_image_string))
        except Exception as exc:  # noqa: BLE001
            data.problems.append(f"image {tag} could not be decoded: {type(exc).__name__}: {exc}")
    for tag in sorted(tags.get("scalars", [])):
        try:
            data.scalars.append((tag, [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]))
        except Exception as exc:  # noqa: BLE001
            data.problems.append(f"scalar {tag} could not be read: {type(exc).__name__}: {exc}")
    if data.findings is None and not data.images and not data.scalars and not data.problems:
        data.problems.append("the event files hold no findings, images or scalars.")
    return data


def _inline(text: str) -> str:
    """Escape, then render `code` and **bold** (the only inline Markdown our findings use)."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def _table_row(line: str, cell: str) -> str:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    return "<tr>" + "".join(f"<{cell}>{_inline(c)}</{cell}>" for c in cells) + "</tr>"


def markdown_to_html(markdown: str) -> str:
    """A small Markdown subset: headings, bullet lists, tables, paragraphs, inline code and bold; everything
    escaped."""
    out: list[str] = []
    in_list = False
    table: list[str] = []  # the rows of the table being read
    for line in [*markdown.splitlines(), ""]:
        stripped = line.strip()
        if stripped.startswith("|"):
            if in_list:
                out.append("</ul>")
                in_list = False
            if not re.fullmatch(r"\|[\s:|-]*", stripped):  # the |---|---:| line under the header
                table.append(_table_row(stripped, "td" if table else "th"))
            continue
        if table:
            out.append("<table>" + "".join(table) + "</table>")
            table = []
        if stripped.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{_inline(stripped[2:])}</li>")
            continue
        if in_list:
            out.append("</ul>")
            in_list = False
        if not stripped:
            continue
        level = len(stripped) - len(stripped.lstrip("#"))
        if 0 < level <= 6 and stripped[level : level + 1] == " ":
            out.append(f"<h{level}>{_inline(stripped[level + 1 :])}</h{level}>")
        else:
            out.append(f"<p>{_inline(stripped)}</p>")
    if in_list:
        out.append("</ul>")
    return "\n".join(out)


#: Image sections in the order a reader wants them: what the network learned first, then how it sees, then what
#: it groups together; any other area follows alphabetically.
SECTIONS = (
    ("filters", "Filters"),
    ("activations", "Activations"),
    ("saliency", "Saliency"),
    ("embedding", "Embedding"),
    ("exemplars", "Exemplars"),
    ("featurevis", "Feature visualisation"),
)
#: Tag areas our monitors write; every other scalar is the user's own metric.
OUR_AREAS = frozenset([area for area, _ in SECTIONS] + ["attention", "dynamics", "diagnosis", "lightning_viz"])
_STAGES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val"}


def _tokens(tag: str) -> list[str]:
    return [t for t in re.split(r"[/_.\-]+", tag.lower()) if t]


def find_metric(tags: Sequence[str], stage: str, metric: str) -> str | None:
    """The user's tag for ``stage`` (``train``/``val``) and ``metric`` (``loss``/``acc``), found by name.

    ``train_loss``, ``train/loss``, ``loss/train``, ``training_loss_epoch``, ``val_acc``, ``val/accuracy``,
    ``validation_accuracy`` all match; a bare ``loss`` counts as the training loss. Per-epoch tags are preferred over
    per-step ones (Lightning writes ``<name>_epoch`` and ``<name>_step`` when both are logged), then the shortest.
    """
    names = {"loss": {"loss"}, "acc": {"acc", "accuracy", "top1"}}[metric]
    found = []
    for tag in tags:
        tokens = _tokens(tag)
        if not tokens or tokens[0] in OUR_AREAS or not names & set(tokens):
            continue
        stages = {_STAGES[t] for t in tokens if t in _STAGES}
        if stages == {stage} or (not stages and stage == "train" and metric == "loss" and tokens == ["loss"]):
            found.append((tokens[-1] == "step", len(tag), tag))
    return min(found)[2] if found else None


def _last_finite(points: Sequence[tuple[int, float]]) -> tuple[int, float] | None:
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    return finite[-1] if finite else None


def verdict(findings: str | None) -> list[str]:
    """The findings' first lines: one per finding (its heading and summary), or the panel's own first line."""
    if findings is None:
        return []
    lines = [line.strip() for line in findings.splitlines()]
    out = []
    for i, line in enumerate(lines):
        if line.startswith("#### "):
            summary = next((x for x in lines[i + 1 :] if x and not x.startswith(("#", "- "))), "")
            out.append(f"{line[5:]}: {summary}" if summary else line[5:])
    if out:
        return out
    first = next((line.lstrip("#").strip() for line in lines if line), "")
    return [first] if first else []


def epochs_run(epoch_scalar: Sequence[tuple[int, float]], findings: str | None) -> int | None:
    """Epochs the run trained: Lightning's ``epoch`` scalar is written only with the user's metrics (the last epochs
    may log none), so the diagnosis's end-of-fit line ("at the end of fit, epoch 6") counts too; the larger wins."""
    last = _last_finite(epoch_scalar)
    counts = [int(last[1]) + 1] if last is not None else []
    if findings and (said := re.search(r"at the end of fit, epoch (\d+)", findings)):
        counts.append(int(said.group(1)) + 1)
    return max(counts) if counts else None


def _headline(run: RunData) -> str:
    scalars = dict(run.scalars)
    rows = []
    for label, stage, metric in (
        ("train loss", "train", "loss"),
        ("validation loss", "val", "loss"),
        ("train accuracy", "train", "acc"),
        ("validation accuracy", "val", "acc"),
    ):
        tag = find_metric(list(scalars), stage, metric)
        last = _last_finite(scalars[tag]) if tag else None
        if tag and last:
            rows.append(
                f"<tr><th>{label}</th><td><strong>{_fmt(last[1])}</strong></td>"
                f'<td class="muted">{html.escape(tag)} at step {last[0]}</td></tr>'
            )
    epochs = epochs_run(scalars.get("epoch", []), run.findings)
    steps = [s for points in scalars.values() for s, _ in points]
    if epochs is not None:
        rows.append(f"<tr><th>epochs</th><td><strong>{epochs}</strong></td><td></td></tr>")
    if steps:
        rows.append(f"<tr><th>steps</th><td><strong>{min(steps)}&ndash;{max(steps)}</strong></td><td></td></tr>")
    if run.findings is None:
        said = ["no diagnosis in this run"]
    else:
        said = verdict(run.findings) or ["no problems found"]
    items = "".join(f"<li>{_inline(line.replace('**', ''))}</li>" for line in said)
    return (
        '<section class="headline" id="headline"><h2>Headline</h2>'
        f'<table class="numbers">{"".join(rows) or "<tr><td>no loss or accuracy found</td></tr>"}</table>'
        f'<div class="verdict"><strong>Verdict</strong><ul>{items}</ul></div></section>'
    )


def _fmt(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


def unit(tag: str) -> str:
    """The unit of a scalar, where its name says it: ``seconds``, ``share`` (0-1), or ``""``."""
    tokens = set(_tokens(tag))
    if tokens & {"seconds", "secs", "s", "time"}:
        return "seconds"
    if tokens & {"fraction", "share", "sparsity", "acc", "accuracy"}:
        return "share"
    return ""


def _tick_labels(lo: float, hi: float) -> list[float]:
    if hi <= lo:
        return [lo]
    return [lo, (lo + hi) / 2, hi]


def _distinct(values: Sequence[float]) -> list[str]:
    """Tick labels with as many significant digits as it takes to tell them apart (2.3056, 2.3125, 2.3194)."""
    for digits in range(3, 10):
        labels = [_fmt(v, digits) for v in values]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def chart(points: Sequence[tuple[int, float]], *, width: int = 300, height: int = 130, label: str = "") -> str:
    """An SVG line chart with axes: value ticks on the left (min, middle, max), the step range below, the unit."""
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    if not finite:
        return f'<svg class="chart" width="{width}" height="{height}"><text x="40" y="20">no finite values</text></svg>'
    left, right, top, bottom = 58, 8, 8, 30
    steps = [s for s, _ in finite]
    values = [v for _, v in finite]
    s0, s1, v0, v1 = min(steps), max(steps), min(values), max(values)
    pw, ph = width - left - right, height - top - bottom

    def x(step: float) -> float:
        return left + ((step - s0) / (s1 - s0) * pw if s1 > s0 else pw / 2)

    def y(value: float) -> float:
        return top + ph - ((value - v0) / (v1 - v0) * ph if v1 > v0 else ph / 2)

    parts = [
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
        f'<line class="axis" x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}"/>',
        f'<line class="axis" x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}"/>',
    ]
    ticks = _tick_labels(v0, v1)
    for value, text in zip(ticks, _distinct(ticks)):
        parts.append(f'<line class="grid" x1="{left}" y1="{y(value):.1f}" x2="{left + pw}" y2="{y(value):.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 4}" y="{y(value) + 4:.1f}" text-anchor="end">{text}</text>')
    for step, anchor in ((s0, "start"), (s1, "end")) if s1 > s0 else ((s0, "middle"),):
        parts.append(f'<text class="tick" x="{x(step):.1f}" y="{top + ph + 13}" text-anchor="{anchor}">{step}</text>')
    caption = f"step{f' · {html.escape(label)}' if label else ''}"
    parts.append(
        f'<text class="axis-label" x="{left + pw / 2:.1f}" y="{height - 3}" text-anchor="middle">{caption}</text>'
    )
    if len(finite) == 1:
        parts.append(f'<circle cx="{x(s0):.1f}" cy="{y(v0):.1f}" r="2.5" fill="#1f77b4"/>')
    else:
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in finite)
        parts.append(f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{coords}"/>')
    parts.append("</svg>")
    return "".join(parts)


def _scalar_card(tag: str, points: Sequence[tuple[int, float]], title: str, small: bool = False) -> str:
    last = _last_finite(points)
    shown = "no finite value" if last is None else _fmt(last[1])
    size = {"width": 240, "height": 110} if small else {}
    return (
        f'<div class="scalar" title="{html.escape(tag, quote=True)}"><div>{html.escape(title)}: '
        f"<strong>{shown}</strong></div>{chart(points, label=unit(tag), **size)}</div>"
    )


def _area(tag: str) -> str:
    return tag.split("/", 1)[0] if "/" in tag else ""


def _section_order(area: str) -> tuple[int, str]:
    known = [a for a, _ in SECTIONS]
    return (known.index(area), "") if area in known else (len(known), area)


def _images_html(images: Sequence[tuple[str, int, bytes]]) -> list[str]:
    by_area: dict[str, list[tuple[str, int, bytes]]] = {}
    for image in images:
        by_area.setdefault(_area(image[0]) or "other", []).append(image)
    titles = dict(SECTIONS)
    parts = []
    for area in sorted(by_area, key=_section_order):
        # the filmstrips first: they show the evolution at a glance
        ordered = sorted(by_area[area], key=lambda im: ("filmstrip" not in im[0], im[0]))
        parts.append(f'<section class="images" id="images-{html.escape(area, quote=True)}">')
        parts.append(f"<h2>{html.escape(titles.get(area, area))}</h2>")
        for tag, step, png in ordered:
            data = base64.b64encode(png).decode("ascii")
            parts.append(
                f'<figure><img alt="{html.escape(tag, quote=True)}" src="data:{_image_mime(png)};base64,{data}">'
                f"<figcaption>{html.escape(tag)} (step {step})</figcaption></figure>"
            )
        parts.append("</section>")
    return parts


def _scalars_html(scalars: Sequence[tuple[str, list[tuple[int, float]]]]) -> list[str]:
    """The user's metrics first (large charts), then the diagnosis, then ours: one collapsed block per area."""
    mine = [(t, p) for t, p in scalars if _area(t).lower() not in OUR_AREAS and t != "epoch"]
    ours: dict[str, list[tuple[str, list[tuple[int, float]]]]] = {}
    for tag, points in scalars:
        if _area(tag).lower() in OUR_AREAS:
            ours.setdefault(_area(tag), []).append((tag, points))
    parts = ['<h2 id="scalars">Your metrics</h2><div class="scalars">']
    parts.extend(_scalar_card(tag, points, tag) for tag, points in mine)
    parts.append("</div>" if mine else "<p>No metrics of your own in this run.</p></div>")
    areas = sorted(ours, key=lambda a: (a != "diagnosis", _section_order(a), a))
    if areas:
        parts.append('<h2 id="monitor-scalars">What the monitors measured</h2>')
    for area in areas:
        groups: dict[str, list[tuple[str, list[tuple[int, float]]]]] = {}
        for tag, points in ours[area]:
            head, _, rest = tag.partition("/")
            what, _, detail = rest.partition("/")
            groups.setdefault(f"{head}/{what}" if detail else head, []).append((tag, points))
        opened = " open" if area == "diagnosis" else ""
        parts.append(f'<details class="area"{opened}><summary>{html.escape(area)} ({len(ours[area])} charts)</summary>')
        for group, members in groups.items():
            parts.append(f'<h3>{html.escape(group)}</h3><div class="scalars">')
            for tag, points in members:
                title = tag[len(group) + 1 :] if tag.startswith(group + "/") else tag
                parts.append(_scalar_card(tag, points, title or tag, small=True))
            parts.append("</div>")
        parts.append("</details>")
    return parts


_STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
h3 { font-size: 14px; margin: 10px 6px 0; color: #444; }
.headline { background: #f4f8fc; border: 1px solid #c9dced; padding: 4px 16px 12px; }
.numbers th { text-align: left; padding-right: 16px; font-weight: normal; } .numbers td { padding-right: 16px; }
.muted { color: #777; font-size: 12px; }
.findings { background: #fafafa; border: 1px solid #ddd; padding: 8px 16px; }
.findings table { border-collapse: collapse; font-size: 13px; }
.findings th, .findings td { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
figure { display: inline-block; margin: 8px; vertical-align: top; }
figcaption { font-size: 12px; color: #555; }
img { image-rendering: pixelated; max-width: 100%; }
.scalars { display: flex; flex-wrap: wrap; }
.scalar { margin: 6px; font-size: 12px; }
svg.chart .axis { stroke: #555; } svg.chart .grid { stroke: #eee; }
svg.chart text { font-size: 10px; fill: #444; } svg.chart .axis-label { fill: #777; }
details.area { margin: 8px 0; } details.area > summary { cursor: pointer; font-weight: bold; }
.problems { background: #fff4e5; border: 1px solid #f0b37e; padding: 8px 32px; }
code { background: #eee; padding: 0 3px; }
"""


def render_html(run: RunData) -> str:
    title = html.escape(run.name)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>lightning_viz report: {title}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>lightning_viz report: {title}</h1>",
    ]
    if run.problems:
        parts.append('<h2 id="problems">What could not be read</h2><ul class="problems">')
        parts.extend(f"<li>{html.escape(problem)}</li>" for problem in run.problems)
        parts.append("</ul>")
    parts.append(_headline(run))
    parts.append('<h2 id="findings">Findings</h2>')
    if run.findings is None:
        parts.append('<div class="findings"><p>No diagnosis in this run (add a DiagnosisMonitor).</p></div>')
    else:
        parts.append(f'<div class="findings">{markdown_to_html(run.findings)}</div>')
    parts.extend(_images_html(run.images))
    parts.extend(_scalars_html(run.scalars))
    parts.append("</body></html>")
    return "\n".join(parts)


_MAX_SLUG = 80


def page_names(names: Sequence[str]) -> dict[str, str]:
    """A distinct file-name part for each run name, the same for the same set of runs.

    A name is kept when it is already safe; otherwise unsafe characters become ``_``. Where two runs would get the
    same part (``a/b`` and ``a_b``; ``Run`` and ``run`` on a case-insensitive disk), each gets a short hash of its
    own name appended, so neither page overwrites the other; a name longer than 80 characters is cut and hashed too.
    """
    slugs = {}
    for name in names:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip(".") or "_"
        slugs[name] = slug if len(slug) <= _MAX_SLUG else slug[:_MAX_SLUG] + "~"
    counts: dict[str, int] = {}
    for slug in slugs.values():
        counts[slug.lower()] = counts.get(slug.lower(), 0) + 1
    out = {}
    for name, slug in slugs.items():
        if counts[slug.lower()] > 1 or slug.endswith("~"):
            slug = f"{slug.rstrip('~')}-{hashlib.sha1(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
        out[name] = slug
    # a hashed part could still meet another run's plain name: number the later one (runs taken in sorted order)
    taken: set[str] = set()
    for name in sorted(out):
        slug, n = out[name], 2
        while out[name].lower() in taken:
            out[name] = f"{slug}-{n}"
            n += 1
        taken.add(out[name].lower())
    return out


def write_reports(
    logdir: str, output: str | None = None, *, on_problem: Callable[[str], None] | None = None
) -> list[str]:
    """Write one HTML page per run under ``logdir``; returns the paths written.

    ``output`` names the file for a single run; with several runs, each page is ``<stem>-<run>.html`` beside it
    (see :func:`page_names`). A run that cannot be read fully still gets a page saying what could not be read; a
    page that cannot be written is skipped. Each such problem is also passed to ``on_problem`` as one line.
    """
    runs = find_runs(logdir)
    if not runs:
        raise FileNotFoundError(
            f"no TensorBoard event files and no lightning_viz.FolderLogger run (index.jsonl, scalars.jsonl) "
            f"under {logdir!r}."
        )
    output = output or os.path.join(logdir, "report.html")
    stem, ext = os.path.splitext(output)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    names = {}
    for path in runs:
        name = os.path.relpath(path, logdir)
        names[path] = os.path.basename(os.path.abspath(logdir)) if name == "." else name
    files = page_names(list(names.values()))
    written = []
    for path in runs:
        name = names[path]
        target = output if len(runs) == 1 else f"{stem}-{files[name]}{ext or '.html'}"
        try:
            run = read_run(path, name)
        except Exception as exc:  # noqa: BLE001 - one bad run must not cost the others their pages
            run = RunData(name, problems=[f"this run could not be read: {type(exc).__name__}: {exc}"])
        try:
            page = render_html(run)
        except Exception as exc:  # noqa: BLE001
            # the page again with nothing but what went wrong
            run = RunData(name, problems=[*run.problems, f"the page could not be built: {type(exc).__name__}: {exc}"])
            page = render_html(run)
        if on_problem is not None:
            for problem in run.problems:
                on_problem(f"{name}: {problem}")
        try:
            with open(target, "w", encoding="utf-8") as f:
                f.write(page)
        except OSError as exc:
            if on_problem is not None:
                on_problem(f"{name}: the page {target} could not be written: {exc}")
            continue
        written.append(target)
    return written
