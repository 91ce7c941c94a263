"""Importing the package must stay cheap: no torch, no GPU runtime (the CLI path needs neither)."""

import subprocess
import sys


def test_import_loads_no_numpy_torch_or_triton():
    code = ("import sys, mergealign_fast; "
            "print(sorted(m for m in ('numpy', 'torch', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_entry_point_guards_interrupts_before_loading_anything():
    """`mergealign-fast` starts in entry.py, which imports nothing of ours but the version:
    a Ctrl-C while the rest loads is caught there."""
    code = ("import sys, mergealign_fast.cli.entry; "
            "print(sorted(m for m in sys.modules if m.startswith('mergealign_fast')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(["mergealign_fast", "mergealign_fast._version",
                                      "mergealign_fast.cli", "mergealign_fast.cli.entry",
                                      "mergealign_fast.cli.interrupts"])


def test_the_merge_command_loads_no_numpy_or_torch():
    code = ("import sys, mergealign_fast.cli.main; "
            "print(sorted(m for m in ('numpy', 'torch', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
