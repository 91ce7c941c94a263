"""A real two-node Ray cluster on this machine, whose second node sees the file system
differently: it runs in its own mount namespace with an empty tmpfs over one folder, as a node
without the shared mount would.  A merge whose inputs or output are in that folder is refused
before any work, naming the node; elsewhere, both nodes merge and the result is bitwise the
single-process merge.  Needs root (mount namespaces), which CI has; skipped with a reason where
it is missing.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mergealign_fast.tools.synthetic import LLAMA_TINY, ensure_synthetic_trio
from ray_cluster import (RAY, cluster_env, node_options, run_cli, start_head, stop,
                         wait_for_nodes)

pytest.importorskip("ray")
# Starting a cluster of two nodes takes ~15 s.
pytestmark = pytest.mark.slow


def _can_hide(folder: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            f"mount -t tmpfs tmpfs {folder}"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(address, environment of a client, the folder node 2 does not see)."""
    hidden = tmp_path_factory.mktemp("hidden-from-node-2")
    if not _can_hide(hidden):
        pytest.skip("needs root and unshare to give a Ray node its own view of a folder")
    env = cluster_env()
    address = start_head(1, env)
    second = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs tmpfs {hidden} && exec {RAY} start --address={address} --block "
         + " ".join(node_options(1))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=env)
    try:
        wait_for_nodes(address, env, 2)
        yield address, env, hidden
    finally:
        second.terminate()
        second.wait(timeout=60)
        stop(env)


def _merge(trio, out, cluster, *extra) -> subprocess.CompletedProcess:
    address, env, _ = cluster
    return run_cli(["merge", trio["base"], trio["domain"], trio["aligned"], "-o", out,
                    "--max-shard-size", "60KB", "--quiet", *extra, "--ray", address], env)


def test_a_node_that_cannot_see_the_inputs_is_named_before_any_work(cluster, tmp_path):
    hidden = cluster[2]
    trio = ensure_synthetic_trio(hidden / "trio", LLAMA_TINY, seed=3)
    done = _merge(trio, tmp_path / "out", cluster)
    assert done.returncode == 2
    err = done.stderr
    unreadable = [line for line in err.splitlines() if "cannot read" in line]
    assert unreadable and all(str(hidden) in line for line in unreadable)
    assert unreadable[0].startswith("mergealign-fast: error: node ")
    assert len(err.splitlines()) == len(unreadable)  # one node, nothing else wrong
    assert not tmp_path.joinpath("out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_an_output_folder_a_node_does_not_share_is_named(cluster, tmp_path):
    hidden = cluster[2]
    trio = ensure_synthetic_trio(tmp_path / "trio", LLAMA_TINY, seed=3)
    done = _merge(trio, hidden / "merged" / "out", cluster)
    assert done.returncode == 2
    err = done.stderr
    assert f"{hidden / 'merged'} there is not the folder of this machine" in err
    assert list((hidden / "merged").iterdir()) == []  # the check leaves no file behind


def test_two_nodes_merge_bitwise_the_single_process_merge(cluster, tmp_path):
    trio = ensure_synthetic_trio(tmp_path / "trio", LLAMA_TINY, seed=3)
    done = _merge(trio, tmp_path / "split", cluster)
    assert done.returncode == 0, done.stderr
    assert run_cli(["merge", trio["base"], trio["domain"], trio["aligned"], "-o",
                    tmp_path / "plain", "--max-shard-size", "60KB", "--quiet"],
                   cluster[1]).returncode == 0
    files = sorted(p.name for p in (tmp_path / "plain").iterdir())
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == files
    for name in files:
        assert (tmp_path / "split" / name).read_bytes() == \
            (tmp_path / "plain" / name).read_bytes()
