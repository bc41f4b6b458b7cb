"""The service on Ray Serve (captrt.serve.ray_app, `captrt serve --ray`), on real Ray: a `captrt serve
--ray` process started and stopped with SIGTERM; then one 2-node cluster on this machine
(ray.cluster_utils.Cluster, 1 CPU per node) shared by the module: two replicas, one per node, answer
through Serve's HTTP proxy with Captioner's captions and survive the loss of one under load;
`--replicas auto` scales up under a burst and back down; bad values end in one line, exit 2."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from captrt.runtime import Captioner
from captrt.runtime.streams import usable_cores
from captrt.serve import ServeConfig, ray_app
from captrt.bench.serve_process import ServeProcess
from tests.serve.server_process import free_port

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
# Serve 2.60's metrics_interval_s (10 s) no longer sets how often metrics are pushed, but it still warns
# whenever the autoscaling test's short look-back is read back (serve.status included).
pytestmark = pytest.mark.filterwarnings("ignore:`look_back_period_s`:FutureWarning")


def replica_pids() -> dict[int, int]:
    """{pid: parent pid} of the live captrt replica processes (Ray titles them 'ray::ServeReplica:captrt:...';
    a replica's parent is the raylet of its node)."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            continue
        if cmdline.startswith("ray::ServeReplica:captrt") and stat[0] != "Z":
            found[int(entry)] = int(stat[1])
    return found


def marked_processes(mark: str) -> list[str]:
    """Command lines of the live processes whose environment holds CAPTRT_TEST_MARK=mark (every process
    a `captrt serve` started inherits it: Ray's GCS, raylet, workers, replicas)."""
    needle = f"CAPTRT_TEST_MARK={mark}".encode()
    left = []
    for entry in os.listdir("/proc"):
        try:
            if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if stat[0] != "Z":
                    left.append(Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120])
        except OSError:
            continue
    return left


def running_replicas() -> int:
    app = serve.status().applications.get("captrt")
    return app.deployments["captrt"].replica_states.get("RUNNING", 0) if app else 0


def wait_for(what: str, check, timeout_s: float, every_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:g} s"
        time.sleep(every_s)


def caption(url: str, data: bytes, timeout: float = 60.0) -> httpx.Response:
    return httpx.post(url + "/v1/captions", content=data, headers={"Content-Type": "image/jpeg"}, timeout=timeout)


def cli(*args: str):
    from typer.testing import CliRunner

    from captrt.cli import app

    return CliRunner().invoke(app, ["serve", *args])


def assert_one_line_exit_2(res, needle: str) -> None:
    assert res.exit_code == 2 and needle in res.output, res.output
    assert res.output.startswith("captrt: error: ") and res.output.count("\n") == 1, res.output


def test_sigterm_stops_the_deployment_and_the_ray_it_started(serve_model_dir, jpegs, tmp_path):
    """`captrt serve --ray` starts Ray here, serves through Serve's proxy; SIGTERM: exit 0, and no process
    of that Ray (GCS, raylet, Serve's controller and proxy, the replica) is left."""
    mark = f"sigterm-{os.getpid()}"
    srv = ServeProcess(serve_model_dir, "--ray", "--replicas", "1", "--replica-cpus", "1", "--log-level", "info",
                       log=tmp_path / "log", env={"CAPTRT_TEST_MARK": mark})
    try:
        srv.wait_ready()
        wait_for("the listening line", lambda: "listening on" in srv.log_text(), 60)
        assert "(Ray Serve, 1 replica x 1 CPU (1 stream x 1 thread))" in srv.log_text()
        assert len(marked_processes(mark)) > 3  # the CLI, GCS, raylet, controller, proxy, replica...
        r = caption(srv.url, jpegs[0])
        assert r.status_code == 200, r.text
    finally:
        code = srv.stop()
    assert code == 0 and not srv.killed, srv.log_text()[-2000:]
    wait_for("no process of its Ray left", lambda: not marked_processes(mark), 20)


@pytest.fixture(scope="module")
def altered_model(serve_model_dir, tmp_path_factory) -> Path:
    """The model with its decoder graph altered after export: it passes the up-front checks (the
    manifest is fine) and fails to load where the engine opens it (sha256 mismatch)."""
    bad = tmp_path_factory.mktemp("altered") / "model"
    shutil.copytree(serve_model_dir, bad)
    graph = bad / json.loads((bad / "captrt.json").read_text())["graphs"]["fp32"]["decoder_step"]["file"]
    graph.write_bytes(graph.read_bytes() + b"\0")
    return bad


def test_health_check_waits_for_the_model_then_reports_readiness(serve_model_dir, altered_model):
    """A replica's check_health (no Ray needed to call it): returns once the model is loaded and warmed;
    with a model that fails to load, it raises with /readyz's reason."""
    import asyncio

    from captrt.serve.ray_app import CaptionReplica

    async def check(model: Path) -> None:
        replica = CaptionReplica(ServeConfig(model=model, threads=1, log_level="warning"))
        app = replica.__serve_build_asgi_app__()
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(replica.check_health(), 60)
            assert app.state.captrt.ready

    asyncio.run(check(serve_model_dir))
    with pytest.raises(RuntimeError, match=r"GET /readyz answered 503: .*model failed to load.*sha256"):
        asyncio.run(check(altered_model))


def test_builder_arguments_become_the_service_config(serve_model_dir):
    """`serve run captrt.serve.ray_app:build key=value ...` gives strings: they take the field's type;
    an unknown or malformed argument is named."""
    from captrt.serve.ray_app import from_args

    config, options = from_args({"model": str(serve_model_dir), "max_batch": "8", "max_wait_ms": "2.5",
                                 "ui": "false", "streams": "auto", "replicas": "2", "replica_cpus": "1"})
    assert (config.model, config.max_batch, config.max_wait_ms, config.ui, config.streams) == \
        (serve_model_dir, 8, 2.5, False, "auto")
    assert options == {"replicas": 2, "replica_cpus": 1}
    for args, needle in (({"model": "m", "max_batchs": "8"}, "unknown captrt argument(s): max_batchs"),
                         ({"max_batch": "8"}, "needs the model argument"),
                         ({"model": "m", "ui": "maybe"}, "ui: expected true or false")):
        with pytest.raises(ValueError, match=re.escape(needle)):
            from_args(args)


def test_bad_values_exit_2_before_anything_starts(serve_model_dir, monkeypatch):
    """One line, exit 2, before Ray starts: a replica count below 1, more replicas than this machine's
    cores hold, replica flags without --ray, and --ray without Ray Serve installed (its import made to fail)."""
    model = ["--model", str(serve_model_dir), "--port", str(free_port())]
    assert_one_line_exit_2(cli(*model, "--ray", "--replicas", "0"),
                           "--replicas must be a positive integer or 'auto', got '0'")
    assert_one_line_exit_2(cli(*model, "--ray", "--replicas", str(usable_cores() + 1), "--replica-cpus", "1"),
                           f"--replicas {usable_cores() + 1} x --replica-cpus 1 does not fit the Ray cluster")
    assert_one_line_exit_2(cli(*model, "--replicas", "2"), "need --ray")
    assert_one_line_exit_2(cli(*model, "--ray", "--replicas", "auto", "--min-replicas", "3", "--max-replicas", "2"),
                           "--max-replicas (2) must be at least --min-replicas (3)")
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    monkeypatch.delattr(ray, "serve", raising=False)
    assert_one_line_exit_2(cli(*model, "--ray"), "pip install 'captrt[ray]'")
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of 1 CPU on this machine, Serve's proxy on a free loopback port; shared by the tests below."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = c.add_node(num_cpus=1)
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    c.wait_for_nodes()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    raylets = {c.head_node.all_processes["raylet"][0].process.pid, worker.all_processes["raylet"][0].process.pid}
    try:
        yield SimpleNamespace(address=c.address, url=f"http://127.0.0.1:{port}", raylets=raylets, nodes=[1.0, 1.0])
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


def documented_serve_config() -> dict:
    """The Serve config file of docs/ray-serve.md (its first YAML block)."""
    import yaml

    text = (Path(__file__).resolve().parents[2] / "docs" / "ray-serve.md").read_text()
    return yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.S).group(1))


@pytest.fixture(scope="module")
def two_replicas(cluster, serve_model_dir):
    """The documented Serve config file (validated as Serve reads it, its builder imported by its
    import_path) with the test's model and sizes: 2 replicas of 1 CPU, batches of 4."""
    from ray.serve.schema import ServeDeploySchema

    [app] = ServeDeploySchema.model_validate(documented_serve_config()).applications
    module, name = app.import_path.split(":")
    builder = getattr(importlib.import_module(module), name)
    args = {**app.args, "model": str(serve_model_dir), "replicas": 2, "replica_cpus": 1, "max_batch": 4,
            "max_wait_ms": 10, "log_level": "warning"}
    serve.run(builder(args), name=app.name, route_prefix=app.route_prefix)
    return cluster


def test_two_replicas_one_per_node_answer_like_the_captioner(two_replicas, serve_model_dir, jpegs):
    pids = replica_pids()
    assert sorted(pids.values()) == sorted(two_replicas.raylets), (pids, two_replicas.raylets)  # one per node
    assert httpx.get(two_replicas.url + "/readyz").json()["status"] == "ready"
    with Captioner.load(serve_model_dir, threads=1) as cap:
        expected = cap.caption(jpegs, beam_size=5)
    with ThreadPoolExecutor(6) as pool:  # concurrent requests: both replicas serve, batches form
        responses = list(pool.map(lambda data: caption(two_replicas.url, data), jpegs))
    assert [r.status_code for r in responses] == [200] * len(jpegs), [r.text for r in responses if r.status_code != 200]
    got = [r.json()["captions"][0] for r in responses]
    assert [c["tokens"] for c in got] == [e.tokens for e in expected]
    assert [c["caption"] for c in got] == [e.text for e in expected]
    assert all(abs(c["score"] - e.score) < 1e-3 for c, e in zip(got, expected))


def test_a_killed_replica_is_replaced_and_requests_keep_being_answered(two_replicas, jpegs):
    """SIGKILL one replica under a steady stream of requests: every request is answered (none hangs),
    requests a few seconds later all succeed, and Serve brings the deployment back to two replicas."""
    before = replica_pids()
    assert len(before) == 2
    victim = next(iter(before))
    results: list[tuple[float, int]] = []  # (time sent, status; 0 for a transport error)
    stop = threading.Event()
    killed_at: list[float] = []

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            sent = time.monotonic()
            try:
                status = caption(two_replicas.url, jpegs[i % len(jpegs)], timeout=30.0).status_code
            except httpx.TimeoutException:
                status = -1  # a hang: what must not happen
            except httpx.TransportError:
                status = 0
            results.append((sent, status))
            i += 3

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        os.kill(victim, signal.SIGKILL)
        killed_at.append(time.monotonic())
        time.sleep(8.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=40)
    assert not any(t.is_alive() for t in threads)
    statuses = [s for _, s in results]
    assert -1 not in statuses, statuses
    assert statuses.count(200) > 10, statuses
    later = [s for sent, s in results if sent > killed_at[0] + 4.0]
    assert later and set(later) == {200}, later  # a few seconds after the kill, every request succeeds
    wait_for("two running replicas again", lambda: running_replicas() == 2 and len(replica_pids()) == 2, 90)
    after = replica_pids()
    assert victim not in after and sorted(after.values()) == sorted(two_replicas.raylets)
    assert caption(two_replicas.url, jpegs[0]).status_code == 200


def test_auto_replicas_scale_up_under_a_burst_and_down_when_idle(cluster, serve_model_dir, jpegs):
    """--replicas auto between 1 and 2 (Serve's delays shortened for the test): a burst of concurrent
    requests brings a second replica, idleness takes it away; never outside 1..2."""
    config = ServeConfig(model=serve_model_dir, max_batch=2, max_wait_ms=5, log_level="warning")
    app = ray_app(config, replicas="auto", min_replicas=1, max_replicas=2, nodes=cluster.nodes,
                  autoscaling={"target_ongoing_requests": 1, "upscale_delay_s": 0.5, "downscale_delay_s": 3,
                               "look_back_period_s": 1})
    serve.run(app, name="captrt", route_prefix="/")
    assert running_replicas() == 1
    seen: list[int] = []
    stop = threading.Event()

    def burst(k: int) -> None:
        i = k
        while not stop.is_set():
            assert caption(cluster.url, jpegs[i % len(jpegs)]).status_code == 200
            i += 1

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(burst, k) for k in range(8)]
        try:
            wait_for("a second replica under the burst", lambda: seen.append(running_replicas()) or seen[-1] == 2, 60)
        finally:
            stop.set()
        for f in futures:
            f.result()
    wait_for("back to one replica when idle", lambda: seen.append(running_replicas()) or seen[-1] == 1, 60)
    assert set(seen) <= {1, 2}, seen
    assert caption(cluster.url, jpegs[0]).status_code == 200


def test_a_cluster_too_small_for_the_replicas_is_refused(cluster, serve_model_dir):
    """Joining the cluster (2 nodes of 1 CPU): 2 replicas of 2 CPUs cannot be placed; one line, exit 2,
    and nothing is deployed or removed."""
    before = serve.status().applications.get("captrt")
    res = cli("--model", str(serve_model_dir), "--port", str(free_port()), "--ray", cluster.address,
              "--replicas", "2", "--replica-cpus", "2")
    assert_one_line_exit_2(res, "--replicas 2 x --replica-cpus 2 does not fit the Ray cluster (nodes with 1, 1 CPUs")
    assert ray.is_initialized() and (serve.status().applications.get("captrt") is None) == (before is None)


def test_replicas_whose_model_fails_to_load_fail_the_deployment(cluster, altered_model):
    """Joining the cluster with a model whose engine cannot load: no replica passes its first health
    check, so none is routed to; Serve retries, gives up, and the command exits 1 with the reason,
    leaving no application behind."""
    res = cli("--model", str(altered_model), "--port", str(free_port()), "--ray", cluster.address, "--replicas", "1")
    assert res.exit_code == 1, res.output
    assert "the Ray Serve deployment failed" in res.output and "sha256" in res.output, res.output
    assert "captrt" not in serve.status().applications
