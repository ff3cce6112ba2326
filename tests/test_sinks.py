"""The same evidence in every logger: TensorBoard, Weights & Biases (offline), MLflow (SQLite + local artifacts) and
plain folders (``FolderLogger``), read back from what each one stored; training stays bit-identical with each."""

from __future__ import annotations

import glob
import json
import os
import struct
import time
import warnings

import numpy as np
import pytest
import torch
from conftest import TinyCNN, make_module, trainer_kwargs
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

import lightning_viz
from lightning_viz import FolderLogger
from lightning_viz.report import write_reports
from lightning_viz.sinks import FolderBackend, Sink, safe_path

# budget=None: the fixed cadences. These tests read back exact steps; a budget's steps depend on the machine's speed.
FAST = dict(
    budget=None,
    featurevis={"steps": 2},
    embedding={"reducer": "pca"},
    saliency={"smoothgrad_samples": 2, "max_probes": 2},
)


# ------------------------------------------------------------------------------------------------- helpers
def _wandb_logger(pl_ns, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = wandb.Settings(x_disable_stats=True, x_disable_meta=True, x_disable_machine_info=True)
    return pl_ns.loggers.WandbLogger(save_dir=str(tmp_path), project="lv", offline=True, settings=settings)


def _mlflow_logger(pl_ns, tmp_path):
    pytest.importorskip("mlflow")
    return pl_ns.loggers.MLFlowLogger(
        experiment_name="lv",
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_location=str(tmp_path / "artifacts"),
    )


def _wandb_records(path: str) -> list[bytes]:
    """The records of a ``.wandb`` file: W&B's record log (LevelDB log framing: 32 KiB blocks, 7-byte chunk
    headers: CRC, length, type FULL/FIRST/MIDDLE/LAST) of protobuf ``Record`` messages."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
            pending = b""
    return records


def _wandb_history(run_dir: str, timeout: float = 30.0) -> dict[str, list[tuple[int, object]]]:
    """Every history row of a finished offline run: {key: [(trainer/global_step, value), ...]}.

    ``finish()`` returns before W&B's service has written everything: wait for the run's ``exit`` record.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(run_dir, "*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        parsed = []
        for raw in _wandb_records(path):
            record = pb.Record()
            record.ParseFromString(raw)
            parsed.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in parsed) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    history: dict[str, list[tuple[int, object]]] = {}
    for record in parsed:
        if record.WhichOneof("record_type") != "history":
            continue
        items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        step = items.get("trainer/global_step")
        for key, value in items.items():
            if not key.startswith(("_", "trainer/")):
                history.setdefault(key, []).append((step, value))
    return history


def _train(pl_ns, tmp_path, callbacks, logger, seed=7):
    pl_ns.seed_everything(seed)
    data = TensorDataset(torch.randn(32, 3, 16, 16), torch.randint(0, 4, (32,)))
    train = DataLoader(data, batch_size=8, sampler=RandomSampler(data))  # shuffled by the global RNG
    val = DataLoader(TensorDataset(torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))), batch_size=8)
    module = make_module(pl_ns, TinyCNN(width=4))
    trainer = pl_ns.Trainer(callbacks=callbacks, logger=logger, **trainer_kwargs(tmp_path, max_epochs=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train, val)
    return module, trainer


@pytest.fixture(scope="module")
def plain_weights(tmp_path_factory):
    import pytorch_lightning as pl

    module, _ = _train(pl, tmp_path_factory.mktemp("plain"), [], logger=False)
    return module.state_dict(), torch.rand(4)


def _assert_identical(plain_weights, module):
    weights, after = plain_weights
    watched = module.state_dict()
    assert weights.keys() == watched.keys()
    for key in weights:
        assert torch.equal(weights[key], watched[key]), key
    assert torch.equal(after, torch.rand(4))  # the global RNG stream continues as without the suite


# --------------------------------------------------------------------------------------------- each logger
def test_wandb_gets_images_html_histograms_and_tables_and_training_is_unchanged(
    tmp_path, pl_ns, monkeypatch, plain_weights
):
    logger = _wandb_logger(pl_ns, tmp_path, monkeypatch)
    suite = lightning_viz.default_suite(**FAST)
    module, trainer = _train(pl_ns, tmp_path, suite, logger)
    _assert_identical(plain_weights, module)
    sink = Sink.for_trainer(trainer)
    assert sink.writes_images and sink.writes_text and sink.writes_histograms and sink.writes_tables
    sink.embedding_table("embedding/codes", np.eye(3, 5), [0, 1, 1], ["0", "1", "0"], step=8)
    run_dir = logger.experiment.dir  # .../files
    logger.experiment.finish()

    history = _wandb_history(os.path.dirname(run_dir))
    # the same steps as TensorBoard's x-axis: the baseline and each logged epoch
    assert [s for s, _ in history["filters/model.conv1/_type"]] == [0, 4, 8]
    assert [v for _, v in history["filters/model.conv1/captions"]][-1] == ["filters/model.conv1 (step 8)"]
    (png,) = history["filters/model.conv1/filenames"][-1][1]
    image = np.asarray(Image.open(os.path.join(run_dir, png)))
    assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 0
    assert {s for s, _ in history["saliency/filmstrip/probe_00/_type"]} == {0, 8}
    assert history["diagnosis/findings/html/_type"][-1] == (8, "html-file")
    html = open(os.path.join(run_dir, history["diagnosis/findings/html/path"][-1][1]), encoding="utf-8").read()
    assert "under-trained" in html or "No problems found" in html
    assert history["activations/values/model.relu1/_type"][-1] == (8, "histogram")
    assert history["diagnosis/findings"][-1][0] == 8  # the scalar keeps its own key
    assert history["filters/noise_score/model.conv1"][0][0] == 0  # scalars arrive once, through log_metrics
    assert len(history["filters/noise_score/model.conv1"]) == 3
    assert history["embedding/codes/_type"] == [(8, "table-file")]
    table = json.load(open(os.path.join(run_dir, history["embedding/codes/path"][0][1])))
    assert table["columns"][:3] == ["label", "predicted", "d0"] and len(table["columns"]) == 7
    assert table["data"][2][:3] == ["1", "0", 0.0] and table["data"][2][4] == 1.0


def test_mlflow_gets_artifacts_per_step_and_metrics_and_training_is_unchanged(tmp_path, pl_ns, plain_weights):
    logger = _mlflow_logger(pl_ns, tmp_path)
    module, trainer = _train(pl_ns, tmp_path, lightning_viz.default_suite(**FAST), logger)
    _assert_identical(plain_weights, module)
    Sink.for_trainer(trainer).embedding_table("embedding/codes", np.ones((2, 3)), None, None, step=8)

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = logger.run_id
    steps = [a.path for a in client.list_artifacts(run_id, "lightning_viz")]
    assert steps == ["lightning_viz/step_00000000", "lightning_viz/step_00000004", "lightning_viz/step_00000008"]
    local = client.download_artifacts(run_id, "lightning_viz", str(tmp_path / "down"))
    image = np.asarray(Image.open(os.path.join(local, "step_00000008", "filters", "model.conv1.png")))
    assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 0
    assert os.path.isfile(os.path.join(local, "step_00000000", "saliency", "grid.png"))
    findings = open(os.path.join(local, "step_00000008", "diagnosis", "findings.md"), encoding="utf-8").read()
    assert findings.startswith(("**", "#")) or "CRITICAL" in findings or "No problems" in findings
    hist = json.load(open(os.path.join(local, "step_00000008", "activations", "values", "model.relu1.hist.json")))
    assert sum(hist["counts"]) == hist["count"] > 0 and len(hist["edges"]) == len(hist["counts"]) + 1
    tsv = open(os.path.join(local, "step_00000008", "embedding", "codes.tsv")).read().splitlines()
    assert tsv == ["label\tpredicted\td0\td1\td2", "?\t?\t1\t1\t1", "?\t?\t1\t1\t1"]
    metric = client.get_metric_history(run_id, "filters/noise_score/model.conv1")
    assert sorted(m.step for m in metric) == [0, 4, 8]
    assert [m.step for m in client.get_metric_history(run_id, "lightning_viz/seconds/saliency")] == [0, 8]


def test_folder_logger_run_reads_back_and_makes_the_report(tmp_path, pl_ns, plain_weights):
    logger = FolderLogger(tmp_path / "runs", name="exp")
    module, trainer = _train(pl_ns, tmp_path, lightning_viz.default_suite(**FAST), logger)
    _assert_identical(plain_weights, module)
    run = tmp_path / "runs" / "exp" / "version_0"
    assert logger.log_dir == str(run)
    index = [json.loads(line) for line in (run / "index.jsonl").read_text().splitlines()]
    images = {(r["tag"], r["step"]) for r in index if r["kind"] == "images"}
    assert {("filters/model.conv1", s) for s in (0, 4, 8)} <= images
    assert ("saliency/grid", 8) in images and ("activations/maps/model.relu1", 8) in images
    assert np.asarray(Image.open(run / "images" / "filters" / "model.conv1" / "00000008.png")).shape[2] == 3
    assert (run / "text" / "diagnosis" / "findings" / "00000008.md").is_file()
    tables = {(r["tag"], r["step"]) for r in index if r["kind"] not in ("images", "text", "histograms")}
    assert ("embedding/table", 0) in tables  # the EmbeddingMonitor's codes as a table (every 3 epochs)
    scalars = [json.loads(line) for line in (run / "scalars.jsonl").read_text().splitlines()]
    noise = [r["step"] for r in scalars if "filters/noise_score/model.conv1" in r["metrics"]]
    assert noise == [0, 4, 8]
    assert any("train_loss" in r["metrics"] for r in scalars)  # Lightning's own metrics too

    (page,) = write_reports(str(tmp_path / "runs"), str(tmp_path / "report.html"))
    html = open(page, encoding="utf-8").read()
    findings = (run / "text" / "diagnosis" / "findings" / "00000008.md").read_text()
    first_line = findings.strip().splitlines()[0].strip("*# ")
    assert first_line.split("*")[0] in html
    assert "filters/model.conv1 (step 8)" in html and html.count("data:image/png;base64,") >= 10
    assert "filters/noise_score/model.conv1" in html and "train_loss" in html
    assert "No diagnosis in this run" not in html


# ------------------------------------------------------------------------------------------ units, no Trainer
def test_each_namespace_loggers_get_their_backend(tmp_path, namespace, monkeypatch):
    from types import SimpleNamespace

    from lightning_viz._compat import MLFLOW_LOGGERS

    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert namespace.loggers.MLFlowLogger in MLFLOW_LOGGERS  # (a SQLite store costs seconds to create)
    loggers = [
        namespace.loggers.CSVLogger(str(tmp_path)),
        namespace.loggers.WandbLogger(save_dir=str(tmp_path), offline=True),
        FolderLogger(tmp_path),
    ]
    sink = Sink.for_trainer(SimpleNamespace(loggers=loggers, is_global_zero=True))
    assert [type(b).__name__ for b in sink.backends] == ["WandbBackend", "FolderBackend"]
    assert sink.writes_images and sink.log_dir is None
    assert loggers[1]._experiment is None  # building the backend starts no W&B run
    trainer = namespace.Trainer(logger=loggers[2], **trainer_kwargs(tmp_path))
    assert trainer.loggers == [loggers[2]]  # a Logger of this namespace


def test_folder_backend_files_index_and_embedding_table(tmp_path):
    sink = Sink(None, [], True, [FolderBackend(str(tmp_path))])
    assert sink.writes_images and sink.writes_tables and sink.log_dir is None
    image = np.zeros((4, 6, 3), np.uint8)
    image[1, 2] = (255, 0, 0)
    sink.image("../../<evil>/x", image, 3)
    sink.text("notes/a b", "**bold**", 3)
    sink.histogram("h", torch.tensor([1.0, float("nan"), 2.0, float("inf")]), 3)
    sink.embedding_table("emb", torch.arange(6.0).view(3, 2), torch.tensor([0, 1, 2]), ["a", "b\tc", "d"], 5)
    index = [json.loads(line) for line in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert [r["tag"] for r in index] == ["../../<evil>/x", "notes/a b", "h", "emb"]
    assert index[0]["file"] == "images/_/_/_evil_/x/00000003.png" and index[0]["caption"] == "../../<evil>/x (step 3)"
    assert all(os.path.realpath(tmp_path / r["file"]).startswith(str(tmp_path)) for r in index)
    assert np.array_equal(np.asarray(Image.open(tmp_path / index[0]["file"])), image)
    assert json.loads((tmp_path / index[2]["file"]).read_text())["count"] == 2  # NaN and Inf left out
    features = np.load(tmp_path / index[3]["file"], allow_pickle=False)
    assert features.dtype == np.float32 and features.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert (tmp_path / index[3]["metadata"]).read_text().splitlines() == ["label\tpredicted", "0\ta", "1\tb c", "2\td"]
    with pytest.raises(ValueError, match=r"`labels` must have one entry per row of `features` \(3\), got 2"):
        sink.embedding_table("emb", np.zeros((3, 2)), [0, 1], None, 6)
    with pytest.raises(ValueError, match=r"`features` must be \(N, D\)"):
        sink.embedding_table("emb", np.zeros(3), None, None, 6)
    assert safe_path("a//b/../c") == "a/b/_/c"


def test_no_image_logger_means_no_image_work(tmp_path, pl_ns):
    csv = pl_ns.loggers.CSVLogger(str(tmp_path))
    sink = Sink(None, [csv], True)
    assert not (sink.writes_images or sink.writes_text or sink.writes_histograms or sink.writes_tables)
    sink.image("x", np.zeros((2, 2, 3), np.uint8), 0)  # nothing to write to: no error, nothing written
    # off rank zero nothing is written, whatever the loggers
    assert not Sink(None, [FolderLogger(tmp_path)], False, [FolderBackend(str(tmp_path))]).writes_images


def test_report_ignores_an_index_pointing_outside_its_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    secret = tmp_path / "secret.png"
    Image.new("RGB", (2, 2)).save(secret)
    records = [
        {"kind": "images", "tag": "<script>", "step": 1, "file": "../secret.png"},
        {"kind": "images", "tag": "ok", "step": 1, "file": str(secret)},
    ]
    (run / "index.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    (run / "scalars.jsonl").write_text(json.dumps({"step": 1, "metrics": {"<b>loss</b>": None}}) + "\n")
    (page,) = write_reports(str(run), str(tmp_path / "r.html"))
    html = open(page, encoding="utf-8").read()
    assert "data:image/png" not in html and "<b>loss" not in html and "&lt;b&gt;loss" in html


def test_folder_logger_versions_and_arguments(tmp_path):
    first = FolderLogger(tmp_path)
    first.log_metrics({"a": 1.0, "b": float("nan")}, step=2)
    first.log_hyperparams({"lr": 0.1, "model": TinyCNN})
    assert first.version == 0 and FolderLogger(tmp_path).version == 1
    assert FolderLogger(tmp_path, version="mine").log_dir == str(tmp_path / "lightning_viz" / "mine")
    line = json.loads((tmp_path / "lightning_viz" / "version_0" / "scalars.jsonl").read_text())
    assert line == {"step": 2, "metrics": {"a": 1.0, "b": None}}
    hparams = json.loads((tmp_path / "lightning_viz" / "version_0" / "hparams.json").read_text())
    assert hparams["lr"] == 0.1 and "TinyCNN" in hparams["model"]
    with pytest.raises(ValueError, match="`name` must be a folder name"):
        FolderLogger(tmp_path, name="a/b")
    with pytest.raises(TypeError, match="`version` must be None, an int or a str, got 1.5"):
        FolderLogger(tmp_path, version=1.5)


def test_sink_caps_every_image_at_max_image_side(tmp_path):
    """One cap for every monitor's images, applied where they are written (the monitors draw at full size)."""
    from PIL import Image

    sink = Sink(None, [], True, [FolderBackend(str(tmp_path))], max_image_side=64)
    sink.image("big", np.full((100, 300, 3), 200, np.uint8), 1)
    sink.image("small", np.full((10, 20, 3), 200, np.uint8), 1)
    index = {r["tag"]: r["file"] for r in map(json.loads, (tmp_path / "index.jsonl").read_text().splitlines())}
    assert np.asarray(Image.open(tmp_path / index["big"])).shape[:2] == (21, 64)  # the longer side, aspect kept
    assert np.asarray(Image.open(tmp_path / index["small"])).shape[:2] == (10, 20)  # never enlarged
