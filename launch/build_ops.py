"""Build DeepSpeed's CPU shared-memory communication op at set-up, and prove it is there.

    python -m launch.build_ops            # build it (or find it built) and check the library
    python -m launch.build_ops --check    # only check; exit 1 when the library is missing

DeepSpeed JIT-compiles this op (``deepspeed_shm_comm``) the first time a CPU rank starts,
which costs about a minute. ``make venv`` runs this module so that no run pays it: the
library goes to ``TORCH_EXTENSIONS_DIR`` (``.venv/torch_extensions`` in a checkout, see
:mod:`launch.distributed`). The check looks for the built library itself, not for the build
folder: an interrupted build leaves ``build.ninja`` and ``lock`` there and nothing else.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python launch/build_ops.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

OP_NAME = "deepspeed_shm_comm"


def library_path() -> Path:
    """Where the op's library is for this process (what DeepSpeed's loader will read)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from launch import distributed  # noqa: F401  (sets TORCH_EXTENSIONS_DIR to the checkout's .venv)

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / OP_NAME / f"{OP_NAME}.so"
    # torch's own rule for the default (it adds a Python/CUDA version folder); private, but
    # the only place that rule is written down
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(OP_NAME, verbose=False)) / f"{OP_NAME}.so"


def build() -> Path:
    """Compile (or reuse) the op through DeepSpeed's own builder and return the library."""
    path = library_path()  # first: fixes DS_ACCELERATOR (the CPU op, also on a GPU host) and the folder
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        raise RuntimeError(f"DeepSpeed's {get_accelerator()._name} accelerator has no ShareMemCommBuilder (DS_ACCELERATOR must be cpu)")
    builder.load(verbose=False)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.build_ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="do not build; only check that the library exists")
    args = parser.parse_args(argv)
    if not args.check:
        try:
            build()
        except Exception as error:  # a compiler error, no ninja, ...: say so and fail the set-up
            print(f"launch.build_ops: error: building DeepSpeed's {OP_NAME} op failed: {error}", file=sys.stderr)
            return 1
    path = library_path()
    if not path.is_file():
        folder = path.parent
        found = ", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else "no folder"
        print(f"launch.build_ops: error: {path} is missing (in {folder}: {found}); run `python -m launch.build_ops` "
              "(or `make venv`) to build it", file=sys.stderr)
        return 1
    print(f"DeepSpeed CPU op: {path} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
