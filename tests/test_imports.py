"""`import thenable` stays light: every RPC worker process pays for it."""

from __future__ import annotations

import subprocess
import sys


def test_import_does_not_load_torch_numpy_or_asyncio() -> None:
    code = (
        "import sys, thenable, thenable.futures, thenable.rpc\n"
        "heavy = sorted({'torch', 'numpy', 'asyncio'} & set(sys.modules))\n"
        "print(','.join(heavy))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert completed.stdout.strip() == ""
