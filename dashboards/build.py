"""Load the ``*.dashboard.py`` sources and write their Grafana JSON, deterministically (sorted keys)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

SOURCES = Path(__file__).parent
DEFAULT_OUT = SOURCES / "json"


def sources() -> list[Path]:
    return sorted(SOURCES.glob("*.dashboard.py"))


def load(path: Path) -> Any:
    """The ``dashboard`` object a source defines (grafanalib's convention)."""
    return runpy.run_path(str(path))["dashboard"]


def _to_json(obj: Any) -> Any:
    """grafanalib objects serialise themselves through ``to_json_data`` (its public convention)."""
    to_json_data = getattr(obj, "to_json_data", None)
    if to_json_data is None:
        raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
    return to_json_data()


def _without_nulls(node: Any) -> Any:
    """The JSON without null members: grafanalib writes unset fields as null, which Grafana reads as unset
    but typed readers of the dashboard schema (``grafana-foundation-sdk``'s ``Dashboard.from_json``)
    refuse (a null ``color``, ``options``...). Absent is what the schema calls unset; but a threshold
    step's ``value`` stays: null is the base step's, "from minus infinity"."""
    if isinstance(node, dict):
        return {k: _without_nulls(v) for k, v in node.items() if v is not None or k == "value"}
    if isinstance(node, list):
        return [_without_nulls(v) for v in node]
    return node


def render(dashboard: Any) -> str:
    plain = json.loads(json.dumps(dashboard.to_json_data(), default=_to_json))
    return json.dumps(_without_nulls(plain), sort_keys=True, indent=2) + "\n"


def build(out: Path = DEFAULT_OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for src in sources():
        target = out / (src.name.removesuffix(".dashboard.py") + ".json")
        target.write_text(render(load(src)))
        written.append(target)
    return written
