"""The wheel stands alone: built with `pip wheel .`, installed into a fresh virtualenv, and run from
outside the source tree, it builds the dashboards and carries the rule files with their tests.

The fresh virtualenv gets meterhouse from the wheel only; its third-party dependencies are borrowed
from the test environment by a plain path entry (no `.pth` processing there, so the editable install
of the source tree is not visible), which keeps the test at seconds instead of minutes of installs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work / "dist"), str(ROOT)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    (wheel,) = (work / "dist").glob("meterhouse-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "zz_test_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")
    return venv


def run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd)})  # fmt: skip


def test_the_installed_package_comes_from_the_wheel(installed, tmp_path):
    code = ("import meterhouse, meterhouse.collector, meterhouse.exporter, meterhouse.dashboards, "
            "meterhouse.alerts; print('\\n'.join(m.__file__ for m in (meterhouse, meterhouse.collector, "
            "meterhouse.exporter, meterhouse.dashboards, meterhouse.alerts)))")  # fmt: skip
    r = run(installed, "python", "-c", code, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for path in r.stdout.split():
        assert path.startswith(str(installed)), path  # nothing from the source tree


def test_dashboards_build_from_the_installed_package(installed, tmp_path):
    out = tmp_path / "json"
    r = run(installed, "meterhouse", "dashboards", "build", "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    built = sorted(p.name for p in out.glob("*.json"))
    committed = sorted(p.name for p in (ROOT / "dashboards" / "json").glob("*.json"))
    assert built == committed and built
    for name in built:
        assert json.loads((out / name).read_text()) == json.loads(
            (ROOT / "dashboards" / "json" / name).read_text()
        )


def test_rule_files_and_their_tests_ship_in_the_package(installed, tmp_path):
    code = ("from importlib.resources import files; d = files('meterhouse.alerts'); "
            "print(d); print(*sorted(p.name for p in d.iterdir() if p.name.endswith('.rules.yml')))")  # fmt: skip
    r = run(installed, "python", "-c", code, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    where, names = r.stdout.splitlines()
    assert where.startswith(str(installed))
    assert names.split() == sorted(p.name for p in (ROOT / "alerts").glob("*.rules.yml"))
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: scripts/test.sh installs Debian's prometheus package"
    tests = sorted(str(p) for p in (Path(where) / "tests").glob("*.test.yml"))
    assert tests
    checked = subprocess.run([promtool, "test", "rules", *tests], capture_output=True, text=True, timeout=300)
    assert checked.returncode == 0, checked.stdout + checked.stderr
