"""The README's examples run: every ```python block, in order, in one namespace (```py blocks
are shown, not run: they need a GPU or take minutes to compile)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)
    assert len(blocks) >= 3, "the README's quick start has lost its examples"
    monkeypatch.chdir(tmp_path)  # anything an example writes stays in the test's folder
    namespace: dict = {"__name__": "readme"}
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)
