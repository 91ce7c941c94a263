"""Property-based fuzz of header parsing and the whole merge path (budgeted for CI).

benches/fuzz_headers.py runs the same generator under atheris for 100,000+ cases; the counts are
in benches/RESULTS.md.
"""

import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from hostile_files import build_folder, check_folder  # noqa: E402


def chooser(draw):
    def choose(kind, *args):
        if kind == "bool":
            return draw(st.booleans())
        return draw(st.integers(*args))
    return choose


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_hostile_folders_end_in_a_clear_error_or_a_verified_merge(data):
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "model", Path(tmp) / "out"
        build_folder(chooser(data.draw), folder)
        assert check_folder(folder, out) in ("error", "merged")
