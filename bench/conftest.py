"""Keep ``bench/test_throughput.py`` out of a bare ``pytest`` run: it is collected only when a
path inside ``bench/`` is named on the command line (``pytest bench --benchmark-only``)."""
from pathlib import Path

HERE = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path, config):
    if collection_path.name != "test_throughput.py":
        return None
    asked = [Path(str(a).split("::")[0]).resolve() for a in config.args]
    return None if any(p == HERE or HERE in p.parents for p in asked) else True
