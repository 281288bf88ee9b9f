"""The ONNX engine: ``finegrain export``, parity with PyTorch, int8's recorded accuracy, stale and
broken exports refused, and a server that runs without PyTorch importable."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from finegrain.errors import FinegrainError
from finegrain.inference import open_encoder
from finegrain.inference.load import load_model
from finegrain.inference.onnx_engine import OnnxEncoder
from finegrain.runs import RunDir, create_run
from finegrain.tasks import engine
from finegrain.tasks.evaluate import evaluate_run
from finegrain.tasks.export import export_run
from tests.conftest import ROOT, tiny_config, tiny_metric_config

BLOCKED = (
    "torch",
    "torchvision",
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "timm",
    "pytorch_metric_learning",
    "sklearn",
    "scipy",
    "matplotlib",
    "tensorboard",
)
# Runs before finegrain in a child process: importing any of the training stack fails, as where it is not installed.
NO_TORCH_PRELUDE = f"""
import sys
class _NoTrainingStack:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is blocked: serving must not need it")
        return None
sys.meta_path.insert(0, _NoTrainingStack())
"""


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> RunDir:
    """A tiny trained classifier, exported in fp32 and int8."""
    root = tmp_path_factory.mktemp("onnx-cls")
    run, _ = engine.fit(tiny_config(root, name="cls", train={"epochs": 2}), runs_root=root)
    export_run(run.path, quantize="int8", calibration_images=40)
    return run


@pytest.fixture(scope="module")
def multiscale(tmp_path_factory) -> RunDir:
    """A tiny embedding model tested at two sizes with flip averaging, exported in fp32."""
    root = tmp_path_factory.mktemp("onnx-ml")
    cfg = tiny_metric_config(root, name="ml", data={"eval_image_sizes": [[40, 40], [32, 32]]}, eval={"tta_flip": True})
    run, _ = engine.fit(cfg, runs_root=root)
    export_run(run.path)
    return run


def cosine(embeddings: np.ndarray) -> np.ndarray:
    """Cosine similarity of every vector with every other (minus infinity with itself)."""
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return s


def top5(embeddings: np.ndarray) -> np.ndarray:
    """Each vector's five nearest others by cosine similarity."""
    return np.argsort(-cosine(embeddings), axis=1, kind="stable")[:, :5]


def assert_same_top5(got: np.ndarray, want: np.ndarray, tol: float = 1e-3) -> None:
    """The same five nearest neighbours, except that two may trade places where ``want``'s similarities
    to them are tied within ``tol`` (a toy model trained in bf16 places some neighbours that close)."""
    rows = np.arange(len(want))[:, None]
    s = cosine(want)
    g, w = top5(got), top5(want)
    # where the picks differ they are tied: each rank's pick is as near (in want's similarities) as want's own
    np.testing.assert_allclose(s[rows, g], s[rows, w], atol=tol, rtol=0)


def both_engines(run: RunDir):
    t, o = open_encoder(run, "torch", "32"), open_encoder(run, "onnx")
    assert (t.engine, o.engine) == ("torch", "onnx") and isinstance(o, OnnxEncoder)
    return t, o


def test_export_describes_the_model_it_was_made_from(classifier):
    meta = json.loads((classifier.path / "export" / "model.json").read_text())
    loaded = load_model(classifier)
    assert meta["model_checksum"] == loaded.checksum  # so an index's model check holds on both engines
    assert meta["class_names"] == loaded.class_names and meta["has_classifier"]
    assert meta["config"] == loaded.cfg.model_dump(mode="json")
    assert meta["image_sizes"] == [[32, 32]] and meta["opset"] == 17
    assert meta["onnxruntime"] == __import__("onnxruntime").__version__
    assert meta["outputs"] == ["features", "embedding", "logits"]
    assert meta["parity"]["max_abs_diff"] < 1e-4
    fp32, int8 = (classifier.path / "export" / meta["files"][k]["file"] for k in ("fp32", "int8"))
    assert fp32.name == "model.onnx" and int8.name == "model.int8.onnx"
    assert int8.stat().st_size < fp32.stat().st_size / 2  # int8 weights: really quantized
    assert meta["files"]["int8"]["quantization"]["calibration_images"] == 40
    assert not list((classifier.path / "export").glob(".*"))  # no temporary files left


def test_onnx_equals_torch_on_a_classifier(classifier):
    from finegrain.data.module import split_for

    t, o = both_engines(classifier)
    assert o.sizes == t.sizes and o.tta_flip == t.tta_flip and o.has_classifier and t.has_classifier
    assert o.loaded.checksum == t.loaded.checksum and o.loaded.class_names == t.loaded.class_names
    assert o.signature() == {**t.signature(), "engine": "onnx"}  # embeddings of one are never reused for the other
    records = split_for(t.cfg.data).test
    a, b = t.encode_records(records), o.encode_records(records)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(b.embeddings, a.embeddings, atol=1e-4, rtol=0)
    np.testing.assert_allclose(b.logits, a.logits, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(b.logits.argmax(1), a.logits.argmax(1))
    assert_same_top5(b.embeddings, a.embeddings)


@pytest.mark.slow
def test_a_cosine_classifier_trains_exports_and_scores_alike_on_both_engines(tmp_path):
    from finegrain.data.module import split_for

    run, _ = engine.fit(
        tiny_config(tmp_path, name="cos", model={"head": "cosine"}, train={"epochs": 1}), runs_root=tmp_path
    )
    export_run(run.path)
    t, o = both_engines(run)
    records = split_for(t.cfg.data).test
    a, b = t.encode_records(records), o.encode_records(records)
    np.testing.assert_allclose(b.logits, a.logits, atol=1e-3, rtol=0)
    # scores are cosines over the temperature: within +-20, whatever the class vectors' lengths
    assert np.abs(a.logits).max() <= 20.0 + 1e-3 and np.abs(a.logits).max() > 1.0


@pytest.mark.slow
def test_onnx_equals_torch_at_two_sizes_with_flips(multiscale):
    from finegrain.data.images import open_rgb
    from finegrain.data.module import split_for

    t, o = both_engines(multiscale)
    assert o.sizes == t.sizes == [(40, 40), (32, 32)] and o.tta_flip and t.tta_flip
    records = split_for(t.cfg.data).test
    a, b = t.encode_records(records), o.encode_records(records)
    np.testing.assert_allclose(b.embeddings, a.embeddings, atol=1e-4, rtol=0)
    assert_same_top5(b.embeddings, a.embeddings)
    image = open_rgb(records[0].path)[0]  # the search path: one image, every size, flips
    np.testing.assert_allclose(o.encode_rgb(image)["embedding"], t.encode_rgb(image)["embedding"], atol=1e-4, rtol=0)
    # and what the flips and the second size do is really done by the onnx engine
    single = o.forward(np.ascontiguousarray(np.random.default_rng(0).integers(0, 256, (1, 3, 32, 32), np.uint8)))
    o.tta_flip = False
    plain = o.forward(np.random.default_rng(0).integers(0, 256, (1, 3, 32, 32), np.uint8))
    assert not np.allclose(single["embedding"], plain["embedding"], atol=1e-4)


def test_use_threads_runs_each_later_query_on_that_many_threads(classifier):
    _, o = both_engines(classifier)
    asked = []
    session = o.session
    o.session = lambda threads: asked.append(threads) or session(threads)
    o.use_threads(1)
    x = np.random.default_rng(0).integers(0, 256, (1, 3, 32, 32), np.uint8)
    before = o.forward(x)
    assert asked[-1] == 1 and o.session(1).get_session_options().intra_op_num_threads == 1
    o.use_threads(2)
    np.testing.assert_allclose(o.forward(x)["embedding"], before["embedding"], atol=1e-5)  # same answer
    assert asked[-1] == 2 and o.session(2).get_session_options().intra_op_num_threads == 2


def test_int8_records_the_accuracy_evaluate_measures(classifier):
    meta = json.loads((classifier.path / "export" / "model.json").read_text())
    acc = meta["accuracy"]
    torch_top1 = evaluate_run(classifier.path, engine="torch")["classification"]["top1"]
    onnx_top1 = evaluate_run(classifier.path, engine="onnx")["classification"]["top1"]
    int8 = evaluate_run(classifier.path, engine="onnx-int8")
    assert int8["inference"]["engine"] == "onnx" and int8["inference"]["precision"] == "int8"
    assert acc["metric"] == "top1" and acc["n_images"] == int8["timing"]["n_images"] == 32
    assert acc["fp32"] == pytest.approx(torch_top1) == pytest.approx(onnx_top1)
    assert acc["int8"] == pytest.approx(int8["classification"]["top1"])
    assert acc["int8_drop"] == pytest.approx(torch_top1 - int8["classification"]["top1"])


def _copy(run: RunDir, dest: Path) -> RunDir:
    shutil.copytree(run.path, dest)
    return RunDir(dest)


def test_export_of_a_changed_checkpoint_is_refused(classifier, tmp_path, caplog):
    run = _copy(classifier, tmp_path / "changed")
    ckpt = run.best_ckpt if run.best_ckpt.is_file() else run.last_ckpt
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    key = next(k for k, v in state["state_dict"].items() if k.startswith("model.") and v.is_floating_point())
    state["state_dict"][key] = state["state_dict"][key] + 0.01  # trained on: the export is now another model
    torch.save(state, ckpt)
    with pytest.raises(FinegrainError, match="exported from another checkpoint") as e:
        open_encoder(run, "onnx")
    assert "\n" not in str(e.value) and "finegrain export" in str(e.value)
    with caplog.at_level(logging.INFO, logger="finegrain.inference.engines"):
        assert open_encoder(run, "auto").engine == "torch"
    assert "not using the ONNX export" in caplog.text
    with pytest.raises(FinegrainError, match="exported from another checkpoint"):
        open_encoder(run, "onnx-int8")
    export_run(run.path)  # exporting again makes it current; the int8 model of the old one is removed
    assert open_encoder(run, "auto").engine == "onnx"
    assert not (run.path / "export" / "model.int8.onnx").exists()


def test_bad_exports_are_one_line_errors(classifier, tmp_path):
    untrained = create_run(tiny_config(tmp_path, name="untrained"), tmp_path)
    with pytest.raises(FinegrainError, match="no checkpoint"):
        export_run(untrained.path)
    with pytest.raises(FinegrainError, match="unknown export format 'tflite'; valid: onnx"):
        export_run(classifier.path, fmt="tflite")
    with pytest.raises(FinegrainError, match="unknown quantization 'int4'"):
        export_run(classifier.path, quantize="int4")
    with pytest.raises(FinegrainError, match="unknown engine 'tensorrt'"):
        open_encoder(classifier, "tensorrt")

    run = _copy(classifier, tmp_path / "corrupt")
    onnx_file = run.path / "export" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:5000])  # cut short
    with pytest.raises(FinegrainError, match="not the file that was exported") as e:
        open_encoder(run, "onnx")
    assert "\n" not in str(e.value)
    assert open_encoder(run, "auto").engine == "torch"  # the checkpoint still runs: auto falls back to it
    meta_file = run.path / "export" / "model.json"  # and with a description that agrees with the damage
    meta = json.loads(meta_file.read_text())
    meta["files"]["fp32"]["sha256"] = __import__("hashlib").sha256(onnx_file.read_bytes()).hexdigest()
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(FinegrainError, match="cannot load .*model.onnx with ONNX Runtime") as e:
        open_encoder(run, "onnx")
    assert "\n" not in str(e.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _multipart(path: Path) -> tuple[bytes, str]:
    boundary = "finegrainboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="k"\r\n\r\n3\r\n--{boundary}--\r\n'.encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _without_torch(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "FINEGRAIN_PROGRESS": "0", "PYTHONPATH": str(ROOT / "src")}
    code = NO_TORCH_PRELUDE + f"sys.argv = ['finegrain', *{list(args)!r}]\nfrom finegrain.cli import main\nmain()\n"
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


@pytest.mark.slow
def test_server_runs_without_torch(classifier, tmp_path):
    from finegrain.retrieval.gallery import build_index

    run = _copy(classifier, tmp_path / "served")
    build_index(run.path, gallery="test", engine="onnx")
    query = Path(json.loads((run.path / "index" / "paths.json").read_text())["paths"][5])

    asked = _without_torch("serve", str(run.path), "--engine", "torch", "--port", str(_free_port()))
    out, _ = asked.communicate(timeout=60)
    assert asked.returncode == 2, out
    assert "the torch engine needs PyTorch, which is not installed here" in out, out

    port = _free_port()
    server = _without_torch("serve", str(run.path), "--port", str(port))
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"{base}/api/health", timeout=1):
                    break
            except OSError:
                assert server.poll() is None, server.communicate()[0]
                time.sleep(0.1)
        with urllib.request.urlopen(f"{base}/api/info", timeout=5) as r:
            assert json.loads(r.read())["engine"] == "onnx"
        body, ctype = _multipart(query)
        req = urllib.request.Request(f"{base}/api/search", data=body, headers={"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
            found = json.loads(r.read())
        assert len(found["results"]) == 3 and found["results"][0]["same_image"]
        assert found["prediction"] and found["prediction_source"] == "classifier"
    finally:
        server.terminate()
        out, _ = server.communicate(timeout=30)
    assert "with the onnx engine" in out, out


def test_int8_calibration_counts_each_readable_image_once_across_sizes(multiscale, tmp_path):
    """Two evaluation sizes feed every image twice, and an unreadable one not at all: the export
    records the distinct images quantization saw, not the inputs nor the sample drawn."""
    import dataclasses

    from finegrain.tasks.export import CalibrationSample

    sample = CalibrationSample(load_model(multiscale).cfg, 10)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    sample.records[0] = dataclasses.replace(sample.records[0], path=bad)
    inputs = sum(len(batch) for batch in sample)
    assert inputs == 2 * 9 and sample.images == 9
