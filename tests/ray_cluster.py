"""A real Ray cluster on this machine for the tests: a head started with `ray start`, nodes
joined to it, and the command line run against it in processes of its own, as a user runs it.
(A Ray client inside the pytest process leaves gRPC threads behind that abort a later fork.)"""

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
NODE_START_S = 90  # a node joins in ~5 s here; a loaded CI machine takes longer

# Waits, in a client of its own, until the cluster has this many live nodes.
WAIT_FOR_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + float(sys.argv[3])
while sum(n["Alive"] for n in ray.nodes()) < int(sys.argv[2]):
    if time.monotonic() > deadline:
        sys.exit("a Ray node did not join")
    time.sleep(0.5)
"""


def cluster_env() -> dict:
    """The environment of every process of a test cluster: Ray authenticates its nodes and
    clients with one token, as on a cluster of several machines."""
    return dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex)


def node_options(cpus: int) -> list:
    return [f"--num-cpus={cpus}", "--disable-usage-stats"]


def start_head(cpus: int, env: dict) -> str:
    """Its address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                    *node_options(cpus)], check=True, capture_output=True, env=env)
    return f"127.0.0.1:{port}"


def wait_for_nodes(address: str, env: dict, count: int) -> None:
    subprocess.run([sys.executable, "-c", WAIT_FOR_NODES, address, str(count),
                    str(NODE_START_S)], check=True, capture_output=True, env=env)


def stop(env: dict) -> None:
    subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env)


def run_cli(args, env: dict, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergealign_fast", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600, **popen)
