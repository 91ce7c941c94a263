"""Importing the package must stay cheap: no torch, no GPU runtime (the CLI path needs neither)."""

import subprocess
import sys


def test_import_loads_no_numpy_torch_or_triton():
    code = ("import sys, mergealign_fast; "
            "print(sorted(m for m in ('numpy', 'torch', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
