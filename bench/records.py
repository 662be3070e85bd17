"""JSON records: one file per run, ``<timestamp>_<kind>_<device-slug>.json``.

A record is ``{"schema": SCHEMA_VERSION, "kind": "sweep"|"study", "env": {...},
"config": {...}, "records" or "rows": [...]}``; ``env`` is :func:`bench.device.environment`.
GPU runs go to ``bench/results/`` (committed); CPU runs default to ``bench/results/cpu/``
(git-ignored), and ``--out`` sends either anywhere.
"""
import json
import os
import re
from pathlib import Path
from typing import Iterable, List

SCHEMA_VERSION = 2
RESULTS = Path(__file__).resolve().parent / "results"


def default_out(device_type: str) -> Path:
    """Where a run on ``device_type`` writes unless ``--out`` says otherwise."""
    return RESULTS if device_type == "cuda" else RESULTS / "cpu"


def save(doc: dict, out_dir: Path) -> Path:
    """Write ``doc`` under ``out_dir`` (created if needed) as
    ``<timestamp>_<kind>_<device>.json``; returns the file's path."""
    env = doc["env"]
    stamp = env["timestamp"].replace(":", "").replace("-", "").split("+")[0]
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")[:40] or env["device_type"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write(doc, out_dir / f"{stamp}_{doc['kind']}_{slug}.json")


def write(doc: dict, path: Path) -> Path:
    """Write ``doc`` to ``path`` whole or not at all (a stopped run never leaves half a file)."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps({k: v for k, v in doc.items() if k != "path"}, indent=1))
    os.replace(tmp, path)
    return Path(path)


def load(paths: Iterable[Path]) -> List[dict]:
    """Every record in ``paths`` (files, or folders searched recursively), oldest first.

    Each returned dict gains ``"path"``. Files with another schema version or no ``kind`` are
    skipped (trace files and foreign JSON live beside records).
    """
    files = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*.json")) if p.is_dir() else [p]
    files = [f for f in files if not f.name.endswith(".trace.json")]  # profiler traces
    docs = []
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(doc, dict) and doc.get("schema") == SCHEMA_VERSION and "kind" in doc:
            docs.append(dict(doc, path=str(f)))
    return sorted(docs, key=lambda d: d["env"]["timestamp"])
