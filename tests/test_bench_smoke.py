"""Smoke test of the benchmark harness on the CPU: a tiny sweep, a tiny study and the report.

Seconds, not a measurement: it checks that the commands run end to end, that the JSON records
have the documented schema and that the report and its figures are written.
"""
import pytest
import torch

import dwfast
from bench import __main__ as cli
from bench import records, report

KEEP_THREADS = ["--threads", str(torch.get_num_threads())]  # the CLI's default of 1 is global
RECORD_KEYS = {"impl", "mode", "dtype", "precision", "budget", "depth", "width", "n_params", "batch",
               "median_ms", "q20_ms", "q80_ms", "samples_per_s", "tflops", "peak_fraction",
               "peak_mem_mb", "error"}
ENV_KEYS = {"device", "device_type", "torch", "triton", "dwfast", "python", "git_commit", "timestamp"}


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """One tiny sweep and one tiny teacher-task study, written to a temporary folder."""
    prev = dwfast.get_backend()
    dwfast.set_backend("torch")
    path = tmp_path_factory.mktemp("bench")
    try:
        _tiny_runs(path)
    finally:
        dwfast.set_backend(prev)
    return path


def _tiny_runs(path):
    """The sweep and study the tests read, on the CPU with the torch backend."""
    cli.main(["sweep", "--device", "cpu", "--budgets", "2e4", "--depths", "1,2", "--batches", "32",
              "--warmup-ms", "1", "--rep-ms", "5", "--out", str(path), *KEEP_THREADS])
    cli.main(["study", "--device", "cpu", "--tasks", "teacher", "--depths", "1,2", "--epochs", "1",
              "--seeds", "0", "--teacher-samples", "320", "--linear-depth", "2", "--out", str(path),
              *KEEP_THREADS])


def _doc(out, kind):
    (doc,) = [d for d in records.load([out]) if d["kind"] == kind]
    return doc


def test_sweep_record(out):
    doc = _doc(out, "sweep")
    assert doc["schema"] == records.SCHEMA_VERSION and ENV_KEYS <= doc["env"].keys()
    assert doc["env"]["device_type"] == "cpu" and any("not GPU timings" in n for n in doc["config"]["notes"])
    recs = doc["records"]
    assert len(recs) == 2 * 2 * len(doc["config"]["impls"])  # depths x modes x implementations
    for r in recs:
        assert RECORD_KEYS <= r.keys() and r["error"] is None, r
        assert r["median_ms"] > 0 and r["samples_per_s"] > 0 and r["peak_fraction"] is None
    assert len(list(out.glob("*_throughput.png"))) == 2 and len(list(out.glob("*_speedup.png"))) == 2


def test_study_record(out):
    doc = _doc(out, "study")
    assert [r["depth"] for r in doc["rows"]] == [1, 2]
    for r in doc["rows"]:
        assert 0.0 <= r["acc_mean"] <= 1.0 and r["samples_per_s"] > 0 and len(r["dead_relu"]) == r["depth"]
    (collapse,) = doc["linear_collapse"]
    assert collapse["collapse_err"] < 1e-3  # a stack of Linear layers is one affine map
    assert next(out.glob("*_study_*.json")).with_suffix(".png").exists()


def test_digits_study(tmp_path):
    pytest.importorskip("sklearn")
    prev = dwfast.get_backend()
    dwfast.set_backend("torch")
    try:
        cli.main(["study", "--device", "cpu", "--tasks", "digits", "--depths", "1", "--epochs", "1",
                  "--seeds", "0", "--linear-depth", "2", "--out", str(tmp_path), *KEEP_THREADS])
    finally:
        dwfast.set_backend(prev)
    (doc,) = records.load([tmp_path])
    assert doc["rows"][0]["task"] == "digits" and doc["rows"][0]["acc_mean"] > 0.3


def test_report(out, tmp_path):
    path = report.write(records.load([out]), tmp_path / "REPORT.md")
    text = path.read_text()
    assert "Only CPU records are present" in text and "## Sweep" in text and "## Study" in text
    figures = [line.split("(")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert len(figures) == 5 and all((tmp_path / f).exists() for f in figures)
