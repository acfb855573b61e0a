"""README's promises: the library example runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_library_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    # Whole programs (they end in asyncio.run); the other blocks are fragments.
    programs = [code for code in blocks if "asyncio.run(" in code]
    assert programs, "README has no runnable python example"
    for code in programs:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        assert "100 of 100 sent" in proc.stdout
