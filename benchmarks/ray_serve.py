"""`captrt serve` beside `captrt serve --ray` with 1 and 2 replicas, on this machine, in one run.

    python benchmarks/ray_serve.py            # 3 rounds of 6 s per server and concurrency (~5 min on 2 cores)
    python benchmarks/ray_serve.py --quick    # 1 round of 2 s: checks the pipeline, rough numbers

Method
- Three real servers, started together and each measured while the others wait: `captrt serve`
  (1 stream x all cores), `captrt serve --ray --replicas 1` (one replica of all cores: the same engine
  set-up behind Serve's proxy) and `captrt serve --ray --replicas 2` (two replicas of half the cores).
  Each `--ray` server starts its own local Ray. Same flags otherwise: --max-batch 16, --max-wait-ms 5.
- The model is demo-sized (ResNet-18, 8x8 grid, 256 dims, a 9490-word vocabulary) with random weights,
  built once under ~/.cache/captrt/bench-rayserve; its captions never end, so every request asks for
  16 steps (max_steps=16) at beam 5, about a trained model's caption length. Speed depends on shapes only.
- benchmarks/serve.py's closed-loop client (N workers, one JPEG per request, the same 16 images for
  every server) at concurrency 1, 8 and 32; per level a warm-up, then rounds in which the servers
  take turns in a rotating order (ABC, BCA, CAB), so this machine's drifting speed hits all alike.
- Where the CPU goes: per round, the CPU time of the measured server's process tree, by role (the
  `captrt serve` process itself; Serve's proxy; the replicas; the rest of Ray), per request; and
  the CPU the two idle servers burned meanwhile (what an idle Ray instance costs).
- What the proxy adds to a request without inference: GET /healthz one at a time (200 per server, in
  alternating blocks of 50), plain vs through Serve.
The results go into RESULTS.md between `<!-- rayserve:begin -->` and `<!-- rayserve:end -->`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import io
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
import benchmarks.serve as sb  # noqa: E402
from captrt.bench.serve_process import ServeProcess, ServeProcessError  # noqa: E402
from captrt.bench.sections import RAYSERVE_BEGIN as BEGIN, RAYSERVE_END as END  # noqa: E402

BEAM, STEPS, MAX_BATCH = 5, 16, 16
SERVERS = {"serve": [], "ray-1": ["--ray", "--replicas", "1"], "ray-2": ["--ray", "--replicas", "2"]}
SETTINGS = {"full": {"rounds": 3, "round_seconds": 6.0, "health": 200},
            "quick": {"rounds": 1, "round_seconds": 2.0, "health": 40}}
CLK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ the model, images

def bench_model(work: Path) -> Path:
    """The demo-sized random model, exported once (reused while its directory is complete)."""
    from captrt.bench.suite_model import make_random_checkpoint
    from captrt.export.exporter import export_model

    out = work / "model"
    if (out / "captrt.json").is_file():
        return out
    work.mkdir(parents=True, exist_ok=True)
    ckpt = make_random_checkpoint(work / "demo.pt", backbone="resnet18", enc_size=8, attention_dim=256,
                                  embed_dim=256, decoder_dim=256)
    export_model(ckpt, out, parity_count=2, overwrite=True, progress=False)
    return out


def uploads(n: int = 16) -> list[Any]:
    """n rendered scenes as 640x480 JPEGs (what a camera-sized upload costs to decode)."""
    from PIL import Image

    from captrt.synth import render_scenes

    out = []
    for i, scene in enumerate(render_scenes(n, 256, seed=11)):
        buf = io.BytesIO()
        Image.fromarray(scene).resize((640, 480)).save(buf, "JPEG", quality=90)
        out.append(sb.Upload(f"img{i}.jpg", buf.getvalue(), "image/jpeg"))
    return out


# ------------------------------------------------------------------------------ process trees and CPU

def _procs() -> dict[int, tuple[int, str, float, float]]:
    """{pid: (parent, title, CPU seconds, RSS MB)} of every live process."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, IndexError):
            continue
        out[int(entry)] = (int(stat[1]), title, (int(stat[11]) + int(stat[12])) / CLK,
                           int(stat[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20)
    return out


def role(title: str, root: bool) -> str:
    if root:
        return "captrt serve"
    if title.startswith("ray::ProxyActor"):
        return "proxy"
    if title.startswith("ray::ServeReplica"):
        return "replicas"
    return "rest of Ray"


def tree(pid: int, procs: dict[int, tuple[int, str, float, float]] | None = None) -> dict[str, list[float]]:
    """{role: [CPU seconds, RSS MB, processes]} over the process tree under pid."""
    procs = procs if procs is not None else _procs()
    children: dict[int, list[int]] = {}
    for p, (parent, *_rest) in procs.items():
        children.setdefault(parent, []).append(p)
    out: dict[str, list[float]] = {}
    stack = [pid]
    while stack:
        p = stack.pop()
        if p not in procs:
            continue
        _, title, cpu, rss = procs[p]
        acc = out.setdefault(role(title, p == pid), [0.0, 0.0, 0])
        acc[0] += cpu
        acc[1] += rss
        acc[2] += 1
        stack.extend(children.get(p, []))
    return out


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / CLK


def cpu_delta(before: dict[str, list[float]], after: dict[str, list[float]]) -> dict[str, float]:
    return {k: after[k][0] - before.get(k, [0.0])[0] for k in after}


# ----------------------------------------------------------------------------------------- measuring

async def measure(servers: dict[str, ServeProcess], ups: Sequence[Any], levels: Sequence[int],
                  settings: dict[str, Any]) -> dict[str, Any]:
    params = {"beam_size": BEAM, "max_steps": STEPS}
    names = list(servers)
    rows, cpu, idle = [], {}, {n: [0.0, 0.0] for n in names}  # idle: [CPU seconds, wall seconds]
    for c in levels:
        log(f"[ray-serve bench] concurrency {c}")
        for n in names:
            await sb.run_round(servers[n], ups, c, max_requests=max(8, 2 * c), seconds=settings["round_seconds"],
                               params=params)
        rounds: dict[str, list] = {n: [] for n in names}
        for r in range(settings["rounds"]):
            for n in names[r % len(names):] + names[:r % len(names)]:
                procs = _procs()
                before = {m: tree(servers[m].pid, procs) for m in names}
                res = await sb.run_round(servers[n], ups, c, max_requests=4000, seconds=settings["round_seconds"],
                                         params=params)
                procs = _procs()
                after = {m: tree(servers[m].pid, procs) for m in names}
                rounds[n].append(res)
                for role_, seconds in cpu_delta(before[n], after[n]).items():
                    cpu.setdefault((n, c), {}).setdefault(role_, 0.0)
                    cpu[(n, c)][role_] += seconds
                for m in names:
                    if m != n:
                        idle[m][0] += sum(cpu_delta(before[m], after[m]).values())
                        idle[m][1] += res.seconds
                log(f"  round {r + 1} {n:<6}: {res.ok} captions in {res.seconds:.1f} s, {res.images_per_s:.1f} img/s, "
                    f"{sum(res.errors.values())} errors")
        for n in names:
            row = sb.summarize_mode(n, MAX_BATCH, c, rounds[n], {})
            row["cpu_ms_per_request"] = {k: round(v * 1e3 / row["requests"], 2) for k, v in cpu[(n, c)].items()} \
                if row["requests"] else {}
            rows.append(row)
    health = await healthz_latency(servers, settings["health"])
    memory = {n: {k: round(v[1]) for k, v in tree(s.pid).items()} for n, s in servers.items()}
    return {"rows": rows, "health_ms": health, "memory_mb": memory,
            "idle_cores": {n: round(v[0] / v[1], 3) if v[1] else None for n, v in idle.items()}}


async def healthz_latency(servers: dict[str, ServeProcess], count: int) -> dict[str, dict[str, Any]]:
    """GET /healthz one at a time, in alternating blocks of 50: the route does no work, so what a
    request costs on top of it is the HTTP path (and Serve's proxy hop)."""
    import httpx

    from captrt.bench.measure import summarize

    samples: dict[str, list[float]] = {n: [] for n in servers}
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        for n, s in servers.items():  # warm the connections
            await client.get(s.url + "/healthz")
        for _ in range(max(1, count // 50)):
            for n, s in servers.items():
                for _ in range(min(50, count)):
                    t = time.perf_counter()
                    r = await client.get(s.url + "/healthz")
                    if r.status_code == 200:
                        samples[n].append((time.perf_counter() - t) * 1e3)
    return {n: summarize(v) for n, v in samples.items()}


# ----------------------------------------------------------------------------------------- reporting

def num(x: float | None) -> str:
    return "-" if x is None else (f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}")


def row(rows: Sequence[dict[str, Any]], name: str, c: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["mode"] == name and r["concurrency"] == c), None)


def projection(report: dict[str, Any]) -> list[str]:
    """A 4-node cluster of 32 cores per node, from the per-request CPU measured here (labelled as such)."""
    rows = report["results"]["rows"]
    r2, plain = row(rows, "ray-2", 32), row(rows, "serve", 32)
    if not r2 or not plain or not r2["cpu_ms_per_request"].get("replicas"):
        return ["(no projection: the concurrency-32 rows are missing)"]
    rep = r2["cpu_ms_per_request"]["replicas"]
    proxy = r2["cpu_ms_per_request"].get("proxy", 0.0)
    own = plain["cpu_ms_per_request"].get("captrt serve", 0.0)
    nodes, cores = 4, 32
    node_compute = cores * 1e3 / (rep + proxy)
    node_proxy = 1e3 / proxy if proxy else float("inf")
    node = min(node_compute, node_proxy)
    rss = report["results"]["memory_mb"]["ray-2"].get("replicas", 0) / 2
    return [
        f"**Projection, not a measurement**: {nodes} nodes x {cores} cores, from the CPU per request measured "
        f"at concurrency 32 above. A replica spent {rep:.1f} ms of CPU per image and the proxy {proxy:.2f} ms per "
        f"request; `captrt serve` alone spent {own:.1f} ms per image.",
        f"Per node: compute allows {cores} x 1000 / ({rep:.1f} + {proxy:.2f}) = {node_compute:.0f} images/s; one "
        f"proxy process (asyncio, about one core) allows 1000 / {proxy:.2f} = {node_proxy:.0f} requests/s, so a "
        f"node would give about {node:.0f} images/s and the cluster about {nodes * node:.0f} images/s "
        f"(one image per request; requests of several images, up to --max-images, spread the proxy's "
        f"per-request cost). For comparison, plain `captrt serve`, one process per {cores}-core node "
        f"behind a load balancer: {cores} x 1000 / {own:.1f} = {cores * 1e3 / own:.0f} images/s "
        f"per node, {nodes * cores * 1e3 / own:.0f} for the cluster, with no proxy hop but also nothing placed, "
        "scaled, health-checked or replaced for you. With one image per request of this small model, Serve's "
        "proxy, not the engine, would bound a 32-core node; a larger model's CPU per image grows while the "
        "proxy's per request does not, so the bound moves back to the engine.",
        f"Layout: replicas x streams x threads = the node's cores, e.g. 4 replicas x 8 CPUs "
        f"(`--replicas {nodes * 4} --replica-cpus 8 --streams auto`: 8 streams of 1 thread, the streams rule), "
        f"or 1 replica x 32 CPUs per node; more replicas cost memory ({rss:.0f} MB resident per replica here, "
        "this model) and give Serve more to route over; fewer, bigger ones batch more.",
        "Assumed: a replica's CPU per image stays as measured here when it has more cores (the streams section "
        "shows streams scale across cores at small batches; memory bandwidth and larger batches can move it "
        "either way), a load balancer spreads requests over the 4 proxies, and the client is elsewhere.",
    ]


def section(report: dict[str, Any]) -> str:
    res, s, m = report["results"], report["settings"], report["machine"]
    headers = ("server", "concurrency", "requests", "img/s", "p50 ms", "p99 ms", "errors",
               "CPU ms/request: server / proxy / replicas / rest of Ray")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in res["rows"]:
        cpu = r["cpu_ms_per_request"]
        parts = " / ".join(f"{cpu[k]:.1f}" if k in cpu else "-" for k in ("captrt serve", "proxy", "replicas",
                                                                          "rest of Ray"))
        lat = r["latency_ms"]
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {num(r['images_per_s'])} | "
                     f"{num(lat['p50'])} | {num(lat['p99'])} | {r['errors']} | {parts} |")
    h = res["health_ms"]
    notes = []
    for c in s["concurrency"]:
        base = row(res["rows"], "serve", c)
        for n in ("ray-1", "ray-2"):
            other = row(res["rows"], n, c)
            if base and other and base["images_per_s"] and other["images_per_s"]:
                notes.append(f"concurrency {c}: {n} / serve = {other['images_per_s'] / base['images_per_s']:.2f}x "
                             f"images/s, p50 {num(other['latency_ms']['p50'])} vs "
                             f"{num(base['latency_ms']['p50'])} ms")
    if h.get("serve", {}).get("p50") and h.get("ray-1", {}).get("p50"):
        notes.append(f"GET /healthz one at a time: p50 {h['serve']['p50']:.2f} ms plain, {h['ray-1']['p50']:.2f} ms "
                     f"(ray-1) and {h['ray-2']['p50']:.2f} ms (ray-2) through Serve's proxy: the proxy hop adds about "
                     f"{h['ray-1']['p50'] - h['serve']['p50']:.1f} ms to every request")
    idle = res["idle_cores"]
    notes.append("CPU of a server while another was measured (idle cost): "
                 + ", ".join(f"{n} {v:.3f} cores" for n, v in idle.items() if v is not None))
    mem = res["memory_mb"]
    notes.append("resident memory at the end: " + "; ".join(
        f"{n}: " + ", ".join(f"{k} {v} MB" for k, v in parts.items()) for n, parts in mem.items()))
    notes.append("exit codes after SIGTERM: " + ", ".join(f"{n} {v['exit_code']}" for n, v in report["servers"].items()))
    other = m.get("other_processes_cores")
    out = [BEGIN, "## Ray Serve: `captrt serve` vs `captrt serve --ray` (`benchmarks/ray_serve.py`)", "",
           f"Generated by `benchmarks/ray_serve.py` on {report['date']}"
           + (" with `--quick` (short rounds: rough numbers)" if s["quick"] else "") + f", on {m['cpu']} with "
           f"{m['cores']} usable cores, {m['memory_gb']} GB.", ""]
    if other is not None and other > sb.BUSY_CORES:
        out += [f"**The machine was busy**: other processes (other agents' work) used {other:.2f} of the "
                f"{m['cores']} cores on average during the run. Compare the servers with each other (same rounds, "
                "rotating order), not with other sections.", ""]
    out += [f"Model: demo-sized, random weights ({report['model']}); one 640x480 JPEG per request, beam {BEAM}, "
            f"{STEPS} steps; every server `--max-batch {MAX_BATCH} --max-wait-ms 5`. `serve` = `captrt serve` "
            "(1 stream x 2 threads); `ray-1` = `--ray --replicas 1` (one replica of 2 CPUs: the same engine "
            "set-up behind Serve's proxy); `ray-2` = `--ray --replicas 2` (two replicas of 1 CPU, one thread each). "
            f"{s['rounds']} rounds of up to {s['round_seconds']:g} s per server and concurrency, the servers taking "
            "turns in rotating order; closed loop (benchmarks/serve.py's client, on the same cores). CPU per "
            "request: the measured server's process tree by role, over its rounds.", "",
            "\n".join(lines), "", *[f"- {x}" for x in notes], "",
            "What this machine can and cannot show: it has 2 cores, shared by the client, the three servers "
            "and (in this run) other work. Two replicas here split the same 2 cores that one replica or "
            "`captrt serve` use whole: no configuration gets more hardware, so these rows cannot show scaling. "
            "Where `ray-2` beats `ray-1`, that is the streams effect (two 1-thread searches at once beat one "
            "2-thread search at small batches, see the streams section), which `captrt serve --streams 2` gets "
            "in one process. What the rows do show is what Serve costs: the proxy hop's latency, the proxy's and "
            "Ray's CPU per request (taken from the same 2 cores the engine needs, hence the lower throughput), "
            "and the memory of Ray and of each model copy. Scaling across machines is not measured here; the "
            "projection below extrapolates from the measured CPU per request.", "",
            *projection(report), "", "```", report["command"],
            *[f"# {n}: {shlex.join(v['cmd'])}" for n, v in report["servers"].items()], "```", END]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a model directory (default: the demo-sized random model)")
    ap.add_argument("--quick", action="store_true", help="short rounds: checks the pipeline")
    ap.add_argument("--concurrency", type=sb.parse_list, default=[1, 8, 32])
    ap.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--json", type=Path, help="also write the full report here")
    ap.add_argument("--render", type=Path, help="no measuring: write the section of a report saved with --json")
    args = ap.parse_args(argv)
    from captrt.bench.machine import machine_info

    if args.render is not None:
        return write(args.results, section(json.loads(args.render.read_text(encoding="utf-8"))))
    model = args.model or bench_model(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                      / "captrt" / "bench-rayserve")
    settings = SETTINGS["quick" if args.quick else "full"]
    ups = uploads()
    report: dict[str, Any] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              "command": shlex.join([Path(sys.executable).name, *sys.argv]), "model": str(model),
                              "machine": machine_info(),
                              "settings": {**settings, "quick": args.quick, "concurrency": args.concurrency}}
    servers: dict[str, ServeProcess] = {}
    flags = ["--max-batch", str(MAX_BATCH), "--max-wait-ms", "5", "--timeout-s", "30", "--log-level", "warning"]
    with tempfile.TemporaryDirectory(prefix="captrt-rayserve-bench.") as logs:
        try:
            for name, extra in SERVERS.items():
                servers[name] = ServeProcess(model, *flags, *extra, log=Path(logs) / f"{name}.log", name=name)
            for s in servers.values():
                log(f"[ray-serve bench] {s.name} ready in {s.wait_ready(300):.1f} s")
            # Other processes' CPU over the measurement: the machine's busy time minus this process's and
            # the servers' process trees'.
            start = (busy_seconds(), sum(os.times()[:2]), sum(sum(v[0] for v in tree(s.pid).values())
                                                              for s in servers.values()), time.monotonic())
            report["results"] = asyncio.run(measure(servers, ups, args.concurrency, settings))
            end = (busy_seconds(), sum(os.times()[:2]), sum(sum(v[0] for v in tree(s.pid).values())
                                                            for s in servers.values()), time.monotonic())
            report["machine"]["other_processes_cores"] = round(
                max(0.0, (end[0] - start[0]) - (end[1] - start[1]) - (end[2] - start[2])) / (end[3] - start[3]), 2)
        except ServeProcessError as exc:
            log(f"ray-serve bench: error: {exc}")
            return 1
        finally:
            for s in servers.values():
                s.terminate()
            for s in servers.values():
                s.wait_exit(60)
    report["servers"] = {n: {"cmd": s.cmd, "exit_code": s.exit_code} for n, s in servers.items()}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    return write(args.results, section(report))


def write(results: Path, text: str) -> int:
    from captrt.bench.sections import write_section

    print(text)
    write_section(results, text, BEGIN, END)
    log(f"[ray-serve bench] wrote the Ray Serve section of {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
