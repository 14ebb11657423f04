"""Load the ``*.dashboard.py`` sources and write their Grafana JSON, deterministically (sorted keys)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

from grafanalib._gen import DashboardEncoder

SOURCES = Path(__file__).parent
DEFAULT_OUT = SOURCES / "json"


def sources() -> list[Path]:
    return sorted(SOURCES.glob("*.dashboard.py"))


def load(path: Path):
    """The ``dashboard`` object a source defines (grafanalib's convention)."""
    return runpy.run_path(str(path))["dashboard"]


def render(dashboard) -> str:
    return json.dumps(dashboard.to_json_data(), sort_keys=True, indent=2, cls=DashboardEncoder) + "\n"


def build(out: Path = DEFAULT_OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sources():
        target = out / (src.name.removesuffix(".dashboard.py") + ".json")
        target.write_text(render(load(src)))
        written.append(target)
    return written
