"""benchmarks/gpu_check.py on a machine without a GPU: the carried wheels are made importable only for the
packages that are missing, without installing anything."""
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _wheel(directory: Path, distribution: str, package: str, body: str) -> Path:
    path = directory / f"{distribution}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{package}/__init__.py", body)
    return path


def test_carried_wheels_are_used_only_for_missing_packages(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "lmforge_carried_demo", "lmforge_carried_demo", "VALUE = 42\n")
    _wheel(wheels, "numpy", "numpy", "raise RuntimeError('the carried copy must not shadow numpy')\n")
    script = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from benchmarks.gpu_check import use_carried_wheels
used = use_carried_wheels(Path({str(wheels)!r}))
import lmforge_carried_demo, numpy
print(used, lmforge_carried_demo.VALUE, numpy.__name__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['lmforge_carried_demo-1.0-py3-none-any.whl']", "42", "numpy"]


def test_no_wheel_directory_uses_nothing(tmp_path):
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks.gpu_check import use_carried_wheels

        assert use_carried_wheels(tmp_path / "absent") == []
    finally:
        sys.path.remove(str(REPO))
