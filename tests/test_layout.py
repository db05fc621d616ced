"""The rooms of the design: fusion/ never touches ranks or DeepSpeed, sharding/ never models."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(folder: str) -> set[str]:
    pattern = re.compile(r"^\s*(?:from\s+([\w.]+)\s+import|import\s+([\w.]+))", re.MULTILINE)
    found = set()
    for path in (REPO / folder).rglob("*.py"):
        found |= {a or b for a, b in pattern.findall(path.read_text())}
    return found


def test_fusion_never_imports_distributed_or_deepspeed():
    bad = {name for name in _imports("fusion") if name.startswith(("torch.distributed", "deepspeed", "launch"))}
    assert not bad, f"fusion/ imports {sorted(bad)}"
    code = "import sys, fusion.model, fusion.data, fusion.heads, fusion.__main__; print('deepspeed' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_sharding_knows_nothing_of_models():
    bad = {name for name in _imports("sharding") if name.split(".")[0] in {"torch", "timm", "deepspeed", "fusion", "launch"}}
    assert not bad, f"sharding/ imports {sorted(bad)}"
