"""A worker killed during a Ray run: two Ray nodes on this machine (ray.cluster_utils.Cluster), the
captioning actor on the second node SIGKILLed after the first shard; Ray Data restarts the actor and
retries its batches, and OUT_DIR still holds every input exactly once."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pandas as pd
import pytest

from captrt.batch import run_batch
from tests.batch.conftest import write_images

ray = pytest.importorskip("ray")


def caption_actor_pids() -> dict[int, int]:
    """{pid: parent pid} of the processes running CaptionActor (Ray titles them 'ray::MapWorker(...CaptionActor...)')."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if cmdline.startswith("ray::") and "CaptionActor" in cmdline:
            found[int(entry)] = ppid
    return found


@pytest.fixture
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker_node = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    cluster.wait_for_nodes()
    raylet_pid = worker_node.all_processes["raylet"][0].process.pid
    yield raylet_pid
    ray.shutdown()
    cluster.shutdown()


def test_worker_killed_mid_run_still_gives_every_input_once(two_nodes, batch_model_dir, tmp_path):
    raylet_pid = two_nodes
    root = tmp_path / "in"
    inputs = write_images(root, 48, seed=31)
    killed: list[int] = []
    after: set[int] = set()

    def on_shard(entry: dict) -> None:
        actors = caption_actor_pids()
        if not killed:
            on_second_node = [pid for pid, ppid in actors.items() if ppid == raylet_pid]
            assert on_second_node, f"no CaptionActor under the second node's raylet {raylet_pid}: {actors}"
            os.kill(on_second_node[0], signal.SIGKILL)
            killed.append(on_second_node[0])
        else:
            after.update(actors)

    result = run_batch([str(root)], batch_model_dir, tmp_path / "out", ray="auto", actors=2, beam=3, max_steps=20,
                       batch_size=2, shard_rows=4, progress=False, on_shard=on_shard)
    assert killed and result.exit_code == 0 and result.captioned == 48
    rows = pd.read_parquet(tmp_path / "out").sort_values("index")
    assert list(rows["index"]) == list(range(48))
    assert sorted(rows["path"]) == sorted(str(p) for p in inputs)  # every input exactly once
    assert rows["error"].isna().all()
    assert killed[0] not in after and len(after) == 2  # the pool was whole again: a restarted actor
