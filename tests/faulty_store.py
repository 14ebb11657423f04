"""Endpoint outages injected through `connect_endpoint` (the constructor seam of the collector and of
`Stack`): the store it returns fails every call, as a refused connection would, while the control file
lists its endpoint as down (``{"down": ["embedded#a"]}``). No ClickHouse server runs on the build machines,
so tests stand two handles on the embedded engine in for two replicas and take one "down" here."""

from __future__ import annotations

import json
from pathlib import Path

from meterhouse.core.store import endpoint_label


class InjectedFault(ConnectionError):
    """An outage injected by a test (looks like a refused connection)."""


class Outages:
    def __init__(self, control: Path) -> None:
        self.path = Path(control)
        self._mtime: tuple[int, int] | None = None
        self._down: set[str] = set()

    def down(self) -> set[str]:
        try:
            st = self.path.stat()
        except OSError:
            return set()
        key = (st.st_mtime_ns, st.st_size)  # a rewrite within one timestamp tick changes the size
        if key != self._mtime:
            try:
                text = self.path.read_text()
                if not text:
                    return self._down  # caught between truncate and write: read it again next time
                self._down = set(json.loads(text).get("down", []))
            except (OSError, ValueError):
                return self._down
            self._mtime = key
        return self._down

    def check(self, label: str) -> None:
        if label in self.down():
            raise InjectedFault(f"injected outage of {label}")


class FaultyStore:
    """A Store whose every call first checks whether its endpoint is down."""

    def __init__(self, real, label: str, outages: Outages) -> None:
        self._real, self._label, self._outages = real, label, outages
        self.database = real.database

    def __getattr__(self, name):
        if name == "client":
            self._outages.check(self._label)
            return self._real.client
        attr = getattr(self._real, name)
        if not callable(attr) or name == "close":
            return attr

        def call(*args, **kwargs):
            self._outages.check(self._label)
            return attr(*args, **kwargs)

        return call


def faulty_connect(connect, control: Path):
    """Wrap ``connect(url) -> Store`` so that outages listed in ``control`` apply."""
    outages = Outages(control)

    def open_endpoint(url: str):
        label = endpoint_label(url)
        outages.check(label)
        return FaultyStore(connect(url), label, outages)

    return open_endpoint
