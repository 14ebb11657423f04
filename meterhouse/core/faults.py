"""Fault injection at the endpoint boundary, for tests: a stand-in for a ClickHouse replica outage.

No ClickHouse server runs on the build machines, so tests stand two handles on the embedded engine in
for two replicas and take one "down" here. Enabled only when ``MH_FAULTS_FILE`` names a JSON file such
as ``{"down": ["embedded#a"]}``; every insert and health check on a listed endpoint then fails as a
connection error would. Without the variable this module does nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "MH_FAULTS_FILE"


class InjectedFault(ConnectionError):
    """An outage injected by a test (looks like a refused connection)."""


class FaultInjector:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._mtime: float | None = None
        self._down: set[str] = set()

    @classmethod
    def from_env(cls) -> FaultInjector | None:
        path = os.environ.get(ENV)
        return cls(path) if path else None

    def down(self) -> set[str]:
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return set()
        if mtime != self._mtime:
            try:
                self._down = set(json.loads(self.path.read_text() or "{}").get("down", []))
            except (OSError, ValueError):
                return self._down
            self._mtime = mtime
        return self._down

    def check(self, endpoint: str) -> None:
        if endpoint in self.down():
            raise InjectedFault(f"injected outage of {endpoint}")
