"""The set-up the README's commands do: DeepSpeed's CPU communication op is really built
(the library, not just its build folder), and a missing one is reported, not silently
JIT-compiled by the first training run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import clean_env

REPO = Path(__file__).resolve().parents[1]


def build_ops(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.build_ops", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=clean_env(**(env or {})))


def test_the_cpu_comm_op_library_is_built():
    # `make test` builds it before pytest starts (launch.build_ops, run by `make venv`)
    result = build_ops("--check")
    assert result.returncode == 0, result.stderr
    library = Path(result.stdout.split("DeepSpeed CPU op: ", 1)[1].split(" (", 1)[0])
    assert library.name == "deepspeed_shm_comm.so" and library.stat().st_size > 10_000


def test_an_unbuilt_op_is_an_error_that_says_what_to_run(tmp_path):
    # what an interrupted build leaves: its ninja file and lock, no library
    folder = tmp_path / "deepspeed_shm_comm"
    folder.mkdir()
    (folder / "build.ninja").write_text("")
    (folder / "lock").write_text("")
    result = build_ops("--check", env={"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert f"{folder / 'deepspeed_shm_comm.so'} is missing (in {folder}: build.ninja, lock)" in result.stderr
    assert "python -m launch.build_ops" in result.stderr
