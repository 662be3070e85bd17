"""Smoke test of the benchmark harness on the CPU: a tiny sweep (torch.compile included), a tiny
study and the report.

Seconds, not a measurement: it checks that the commands run end to end, that the JSON records
have the documented schema and that the report and its figures are written.
"""
import pytest
import torch

from bench import __main__ as cli
from bench import records, report

KEEP_THREADS = ["--threads", str(torch.get_num_threads())]  # the CLI's default of 1 is global
RECORD_KEYS = {"impl", "status", "mode", "dtype", "precision", "budget", "depth", "width", "n_params", "batch",
               "median_ms", "q20_ms", "q80_ms", "samples_per_s", "tflops", "peak_fraction",
               "peak_mem_mb", "speedup", "error"}
ENV_KEYS = {"device", "device_type", "torch", "triton", "dwfast", "python", "git_commit", "timestamp"}
# The shapes every harness test uses, so torch.compile's caches serve the later ones.
TINY = ["--budgets", "2e4", "--depths", "1", "--batches", "32", "--warmup-ms", "1", "--rep-ms", "5"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """One tiny sweep (eager, compile, dwfast and the CUDA-graph pair) and one tiny teacher-task
    study, written to a temporary folder."""
    path = tmp_path_factory.mktemp("bench")
    assert cli.main(["sweep", "--device", "cpu", *TINY, "--depths", "1,2", "--out", str(path),
                     "--impls", "eager,compile,compile-graphs,dwfast,dwfast-graphs", *KEEP_THREADS]) == 0
    assert cli.main(["study", "--device", "cpu", "--tasks", "teacher", "--depths", "1,2", "--epochs", "1",
                     "--seeds", "0", "--teacher-samples", "320", "--linear-depth", "2", "--out", str(path),
                     *KEEP_THREADS]) == 0
    return path


def _doc(out, kind):
    (doc,) = [d for d in records.load([out]) if d["kind"] == kind]
    return doc


def test_sweep_record(out):
    doc = _doc(out, "sweep")
    assert doc["schema"] == records.SCHEMA_VERSION and ENV_KEYS <= doc["env"].keys() and doc["complete"]
    assert doc["env"]["device_type"] == "cpu" and any("not GPU timings" in n for n in doc["config"]["notes"])
    recs = doc["records"]
    assert len(recs) == 2 * 2 * len(doc["config"]["impls"])  # depths x modes x implementations
    for r in recs:
        assert RECORD_KEYS <= r.keys(), r
        if r["impl"] in ("compile-graphs", "dwfast-graphs"):  # CUDA only: not applicable, not failed
            assert r["status"] == "n/a" and r["median_ms"] is None, r
            continue
        assert r["status"] == "ok" and r["error"] is None, r  # compile included: it used to fail
        assert r["q20_ms"] <= r["median_ms"] <= r["q80_ms"] and r["samples_per_s"] > 0 and r["peak_fraction"] is None
    for r in (r for r in recs if r["impl"] == "dwfast"):
        assert set(r["speedup"]) == {"eager", "compile"}  # interleaved: each ratio with its spread
        for q in r["speedup"].values():
            assert 0 < q["q20"] <= q["median"] <= q["q80"]
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
    assert cli.main(["study", "--device", "cpu", "--tasks", "digits", "--depths", "1", "--epochs", "1",
                     "--seeds", "0", "--linear-depth", "2", "--out", str(tmp_path), *KEEP_THREADS]) == 0
    (doc,) = records.load([tmp_path])
    assert doc["rows"][0]["task"] == "digits" and doc["rows"][0]["acc_mean"] > 0.3


def test_report(out, tmp_path):
    path = report.write(records.load([out]), tmp_path / "REPORT.md")
    text = path.read_text()
    assert "Only CPU records are present" in text and "## Sweep" in text and "## Study" in text
    assert " ± " in text and "n/a" in text  # speedups with their spread; CUDA-graph rows not applicable
    figures = [line.split("(")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert len(figures) == 5 and all((tmp_path / f).exists() for f in figures)
