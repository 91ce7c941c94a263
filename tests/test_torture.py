"""The stateful torture test (tests/torture.py) at a CI-sized budget; benches/torture.py runs
thousands of sequences and records the count in benches/RESULTS.md."""

import os

import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.stateful import run_state_machine_as_test  # noqa: E402

import torture  # noqa: E402

# Sequences and steps per sequence for CI (each step is one forked command, ~50 ms here).
SEQUENCES = int(os.environ.get("MERGEALIGN_TORTURE_SEQUENCES", "25"))
STEPS = 10


@pytest.mark.slow
def test_random_sequences_of_user_actions_keep_every_invariant(optional_small_fs, monkeypatch):
    """Without root there is no small file system to fill: the full-disk rule is left out."""
    monkeypatch.setattr(torture.MergeTorture, "small_fs", optional_small_fs)
    run_state_machine_as_test(torture.MergeTorture, settings=settings(
        max_examples=SEQUENCES, stateful_step_count=STEPS, deadline=None,
        suppress_health_check=list(HealthCheck), derandomize=True))
    assert torture.STATS["sequences"] >= SEQUENCES
    assert torture.STATS["hub_steps"] > 0, "no sequence merged from the local Hub"
