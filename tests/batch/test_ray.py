"""Ray mode on a local Ray instance (2 CPUs, this machine only): the same rows as local mode and as
Captioner.caption on the demo-sized model, with decoding in the actors or as Ray Data tasks."""

from __future__ import annotations

import tempfile

import pandas as pd
import pytest

from captrt.batch import BatchUsageError, run_batch
from captrt.batch.ray_mode import plan_pool
from captrt.runtime import Captioner
from tests.batch.conftest import write_bad_files, write_images

ray = pytest.importorskip("ray")
OPTS = {"beam": 3, "max_steps": 20, "batch_size": 4, "progress": False, "shard_rows": 8}


@pytest.fixture(scope="module")
def local_ray():
    """One Ray start for the module (a few seconds): 2 CPUs, no dashboard, its files under /tmp."""
    temp = tempfile.mkdtemp(prefix="captrt-test-ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="WARNING", log_to_driver=False)
    yield
    ray.shutdown()


def rows_of(out) -> pd.DataFrame:
    return pd.read_parquet(out).sort_values("index").reset_index(drop=True)


def test_plan_pool_fits_the_cluster():
    assert plan_pool(2, 0, "cpu", None, None, "actor") == (2, 1, 1.0)
    assert plan_pool(2, 0, "cpu", None, 2, "actor") == (1, 2, 2.0)
    assert plan_pool(2, 0, "cpu", None, None, "tasks") == (1, 1, 1.0)  # one CPU left to the decode tasks
    assert plan_pool(8, 2, "cuda", None, 4, "actor") == (2, 4, 4.0)
    with pytest.raises(ValueError, match="need 3 CPUs; the Ray cluster has 2"):
        plan_pool(2, 0, "cpu", 3, 1, "actor")
    with pytest.raises(ValueError, match="needs 2 GPUs"):
        plan_pool(8, 1, "cuda", 2, 1, "actor")


def test_ray_rows_equal_local_rows_and_captioner(local_ray, demo_sized_export, tmp_path):
    model_dir, _ = demo_sized_export
    root = tmp_path / "in"
    write_images(root, 20, seed=21)
    write_bad_files(root / "bad")
    local = run_batch([str(root)], model_dir, tmp_path / "local", threads=2, **OPTS)
    in_actors = run_batch([str(root)], model_dir, tmp_path / "ray", ray="local", actors=2, threads_per_actor=1, **OPTS)
    as_tasks = run_batch([str(root)], model_dir, tmp_path / "tasks", ray="local", decode="tasks", **OPTS)
    assert (local.captioned, local.failed) == (in_actors.captioned, in_actors.failed) == \
        (as_tasks.captioned, as_tasks.failed) == (20, 4)
    assert in_actors.mode == "ray: 2 actors x 1 thread" and as_tasks.mode == "ray: 1 actor x 1 thread"
    want = rows_of(tmp_path / "local")
    for name in ("ray", "tasks"):
        got = rows_of(tmp_path / name)
        pd.testing.assert_frame_equal(got.drop(columns="score"), want.drop(columns="score"))
        assert got["score"].fillna(0).to_numpy() == pytest.approx(want["score"].fillna(0).to_numpy(), abs=1e-4)
    with Captioner.load(model_dir, threads=2) as cap:
        expected = cap.caption(list(want["path"]), beam_size=3, max_steps=20)
    assert list(want["caption"].fillna("")) == [c.text for c in expected]
    assert [e if isinstance(e, str) else None for e in want["error"]] == [c.error for c in expected]


def test_ray_pool_larger_than_the_cluster_is_refused(local_ray, batch_model_dir, corpus, tmp_path):
    with pytest.raises(BatchUsageError, match="need 3 CPUs; the Ray cluster has 2"):
        run_batch([str(corpus)], batch_model_dir, tmp_path / "out", ray="local", actors=3, **OPTS)
    assert not (tmp_path / "out").exists()
