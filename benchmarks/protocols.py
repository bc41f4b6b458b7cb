"""The cost of the Open Inference Protocol: one `captrt serve`, the same images, three ways in:
/v1 multipart vs /v2 with JSON tensors (images base64-encoded) vs /v2 with binary tensors.

    python benchmarks/protocols.py --model MODEL_DIR --images DIR   # full: 6 rounds x 6 requests per worker
    python benchmarks/protocols.py --quick ...                       # 3 rounds x 2 requests per worker

Method
- One real server (`python -m captrt serve`, batching ON, --max-batch 16) serves all three modes, so
  they share its model, batcher and cores; only the way a request and its answer are written differs.
- Every request carries one image and beam_size 5 and asks for the same five results (caption,
  score, finished, tokens, error: /v1's fields and /v2's default outputs). Each mode's request
  bodies are built once up front (the multipart body too), so the client only sends bytes and reads
  the answer the way that protocol's client would: /v1 and /v2 JSON parse the JSON, /v2 binary
  parses the JSON header and the binary `error` tensor (as tritonclient does).
- Closed loop (benchmarks/serve.py's): N workers share one httpx.AsyncClient with N connections; a
  round is a fixed number of requests (a few per worker), so every API's round does the same work.
- Besides the client's images/s and latencies, the server's own CPU time (user + system, all its
  threads, from /proc) per captioned image: what the protocol costs the server, which other processes
  on a busy machine disturb far less than wall time.
- This machine's speed drifts, so per concurrency the rounds rotate through all 6 orders of the three
  modes (ABC, ACB, BAC, ...), and each mode's rounds are pooled; the ratios to /v1 are also given
  per round (the same minutes). The server's batches are read from /metrics around every round.
- Target: with binary data, /v2 keeps >= 95% of /v1's images/s at every concurrency.

Results go into RESULTS.md between `<!-- protocols:begin -->` and `<!-- protocols:end -->`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as _dt
import importlib.util
import itertools
import json
import shlex
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from captrt.bench.serve_process import ServeProcess, ServeProcessError

HERE = Path(__file__).resolve().parent
# A round is a fixed amount of work (requests per worker), so that every API's round holds the same
# number of requests whatever the machine's speed at that minute; the time limit only stops a stuck one.
SETTINGS = {"full": {"rounds": 6, "per_worker": 6, "round_seconds": 300.0},
            "quick": {"rounds": 3, "per_worker": 2, "round_seconds": 120.0}}
MODES = ("v1", "v2-json", "v2-binary")
LABELS = {"v1": "/v1 multipart", "v2-json": "/v2 JSON (base64)", "v2-binary": "/v2 binary tensors"}
OUTPUTS = ("caption", "score", "finished", "tokens", "error")
BOUNDARY = "captrt-bench-boundary"
TARGET_RATIO = 0.95
HEADER = "Inference-Header-Content-Length"


def _serve_bench() -> Any:
    """benchmarks/serve.py: its image loading, round results, pooling and machine lines are reused."""
    spec = importlib.util.spec_from_file_location("captrt_serve_bench", HERE / "serve.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["captrt_serve_bench"] = module
    spec.loader.exec_module(module)
    return module


sb = _serve_bench()


@dataclass(frozen=True)
class Prepared:
    """One request, ready to send."""

    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class Mode:
    name: str
    path: str
    requests: list[Prepared]
    check: Callable[[int, Any, bytes], str | None]


# ------------------------------------------------------------------------------------------ bodies

def v1_request(up: Any, beam: int) -> Prepared:
    field = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="beam_size"\r\n\r\n{beam}\r\n'
    part = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{up.name}"\r\n'
            f"Content-Type: {up.content_type}\r\n\r\n")
    body = field.encode() + part.encode() + up.data + f"\r\n--{BOUNDARY}--\r\n".encode()
    return Prepared(body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})


def v2_json_request(up: Any, beam: int) -> Prepared:
    doc = {"parameters": {"beam_size": beam}, "outputs": [{"name": n} for n in OUTPUTS],
           "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                       "data": [base64.b64encode(up.data).decode()]}]}
    return Prepared(json.dumps(doc).encode(), {"Content-Type": "application/json"})


def v2_binary_request(up: Any, beam: int) -> Prepared:
    blob = struct.pack("<I", len(up.data)) + up.data
    head = json.dumps({"parameters": {"beam_size": beam},
                       "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in OUTPUTS],
                       "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(blob)}}]}).encode()
    return Prepared(head + blob, {"Content-Type": "application/octet-stream", HEADER: str(len(head))})


# ------------------------------------------------------------------------------------------ checks

def check_v2_json(status: int, headers: Any, body: bytes) -> str | None:
    if status != 200:
        return str(status)
    try:
        outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
        error, caption = outputs["error"]["data"], outputs["caption"]["data"]
    except (ValueError, KeyError, TypeError):
        return "200 with a bad body"
    return None if error == [""] and len(caption) == 1 else "200 with a caption error"


def check_v2_binary(status: int, headers: Any, body: bytes) -> str | None:
    """As tritonclient reads it: the JSON header, then the binary tensors by their sizes."""
    if status != 200:
        return str(status)
    try:
        length = int(headers[HEADER])
        offset = length
        for out in json.loads(body[:length])["outputs"]:
            size = out["parameters"]["binary_data_size"]
            if out["name"] == "error":
                (n,) = struct.unpack_from("<I", body, offset)
                return None if n == 0 and size == 4 else "200 with a caption error"
            offset += size
    except (ValueError, KeyError, TypeError, struct.error):
        return "200 with a bad body"
    return "200 without an error tensor"


def build_modes(uploads: Sequence[Any], beam: int, model_name: str) -> dict[str, Mode]:
    infer = f"/v2/models/{model_name}/infer"
    return {"v1": Mode("v1", "/v1/captions", [v1_request(u, beam) for u in uploads],
                       lambda s, h, b: sb.classify(s, b)),
            "v2-json": Mode("v2-json", infer, [v2_json_request(u, beam) for u in uploads], check_v2_json),
            "v2-binary": Mode("v2-binary", infer, [v2_binary_request(u, beam) for u in uploads], check_v2_binary)}


# ------------------------------------------------------------------------------------------ rounds

async def _worker(client: Any, mode: Mode, budget: list[int], deadline: float, result: Any, last: list[float]) -> None:
    import httpx

    while budget[0] > 0 and time.perf_counter() < deadline:
        budget[0] -= 1
        req = mode.requests[result.requests % len(mode.requests)]
        result.requests += 1
        sent = time.perf_counter()
        try:
            r = await client.post(mode.path, content=req.body, headers=req.headers)
            error = mode.check(r.status_code, r.headers, r.content)
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        done = time.perf_counter()
        last[0] = max(last[0], done)
        if error is None:
            result.ok += 1
            result.latencies_ms.append((done - sent) * 1e3)
        else:
            result.errors[error] += 1


async def run_round(server: ServeProcess, mode: Mode, concurrency: int, *, max_requests: int,
                    seconds: float) -> Any:
    import httpx

    result = sb.RoundResult(mode.name, concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=sb.REQUEST_TIMEOUT_S,
                                 trust_env=False) as client:
        start = time.perf_counter()
        last, budget = [start], [max_requests]
        await asyncio.gather(*(_worker(client, mode, budget, start + seconds, result, last)
                               for _ in range(concurrency)))
    result.seconds = last[0] - start
    if not server.alive():
        raise server.fail("died during a round")
    return result


def round_orders(rounds: int) -> list[tuple[str, ...]]:
    """All 6 orders of the three modes, repeated: each mode runs first, second and third equally often."""
    orders = list(itertools.permutations(MODES))
    return [orders[i % len(orders)] for i in range(rounds)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads so far (Linux /proc)."""
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure_level(server: ServeProcess, modes: dict[str, Mode], concurrency: int,
                        settings: dict[str, Any], log: Callable[[str], None]) -> list[dict[str, Any]]:
    budget = settings["per_worker"] * concurrency
    warm = {m: await run_round(server, modes[m], concurrency, max_requests=2 * concurrency,
                               seconds=settings["round_seconds"]) for m in MODES}
    rounds: dict[str, list[Any]] = {m: [] for m in MODES}
    zero = {k: 0.0 for k in sb.batch_counters("")}
    batches = {m: (dict(zero), dict(zero)) for m in MODES}  # (before, after) summed over the mode's rounds
    cpu = {m: 0.0 for m in MODES}
    for i, order in enumerate(round_orders(settings["rounds"])):
        for m in order:
            before, cpu_before = await sb.scrape(server), cpu_seconds(server.pid)
            r = await run_round(server, modes[m], concurrency, max_requests=budget, seconds=settings["round_seconds"])
            after, used = await sb.scrape(server), cpu_seconds(server.pid) - cpu_before
            cpu[m] += used
            for k in zero:
                batches[m][0][k] += before[k]
                batches[m][1][k] += after[k]
            rounds[m].append(r)
            log(f"  c={concurrency:<3} round {i + 1}/{settings['rounds']} {m:<9}: {r.requests} requests in "
                f"{r.seconds:.1f} s, {r.images_per_s:.1f} img/s, server CPU {used * 1e3 / max(r.ok, 1):.0f} ms/img, "
                f"{sum(r.errors.values())} errors")
    rows = []
    for m in MODES:
        row = sb.summarize_mode(m, 16, concurrency, rounds[m], sb.batch_delta(*batches[m]), dict(warm[m].errors))
        row["server_cpu_ms_per_image"] = round(cpu[m] * 1e3 / row["ok"], 2) if row["ok"] else None
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------- summary

def ratios(rows: Sequence[dict[str, Any]], mode: str, concurrency: int) -> tuple[float | None, list[float]]:
    """(pooled images/s of `mode` / /v1's, the same ratio per round) at one concurrency."""
    a, base = sb.find_row(rows, mode, concurrency), sb.find_row(rows, "v1", concurrency)
    if not a or not base or not a["images_per_s"] or not base["images_per_s"]:
        return None, []
    per = [round(x / y, 3) for x, y in zip(a["round_images_per_s"], base["round_images_per_s"]) if y > 0]
    return round(a["images_per_s"] / base["images_per_s"], 3), per


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    heads = ("API", "concurrency", "requests", "img/s", "vs /v1", "p50 ms", "p90 ms", "p99 ms", "errors",
             "mean batch", "server CPU ms/img")
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    for r in rows:
        lat = r["latency_ms"]
        ratio, _ = ratios(rows, r["mode"], r["concurrency"])
        cells = [LABELS[r["mode"]], str(r["concurrency"]), str(r["requests"]), sb._num(r["images_per_s"]),
                 "-" if ratio is None else f"{ratio:.3f}", sb._num(lat["p50"]), sb._num(lat["p90"]),
                 sb._num(lat["p99"]), str(r["errors"]), "-" if r["mean_batch"] is None else f"{r['mean_batch']:.2f}",
                 sb._num(r["server_cpu_ms_per_image"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: Sequence[dict[str, Any]], levels: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    for c in levels:
        ratio, per = ratios(rows, "v2-binary", c)
        t = {"name": f"/v2 binary images/s vs /v1 (concurrency {c})", "goal": f">= {TARGET_RATIO:g}x"}
        if ratio is None:
            out.append({**t, "measured": "not measured", "status": "missed"})
            continue
        spread = f" (rounds {min(per):.2f}x..{max(per):.2f}x)" if per else ""
        out.append({**t, "value": ratio, "measured": f"{ratio:.3f}x{spread}",
                    "status": "met" if ratio >= TARGET_RATIO else "missed"})
    return out


def section(report: dict[str, Any]) -> str:
    from captrt.bench.sections import PROTOCOLS_BEGIN, PROTOCOLS_END

    s, m = report["settings"], report["machine"]
    other = m.get("other_processes_cores")
    out = [PROTOCOLS_BEGIN, "## Service: /v1 vs the Open Inference Protocol's /v2 (`benchmarks/protocols.py`)", "",
           f"Generated by `benchmarks/protocols.py` on {report['date']}"
           + (" with `--quick` (short rounds: rough numbers)" if s["quick"] else "") + ".", ""]
    if other is not None and other > sb.BUSY_CORES:
        out += [f"**Warning: the machine was busy**: other processes used {other:.2f} of the {m['cores']} cores "
                "on average during the run; compare the ratios (same server, rounds interleaved), not the "
                "absolute numbers.", ""]
    out += [f"Model {report['model']['path']} ({report['model']['id']}); images: {s['images']} (mean "
            f"{s['mean_image_kb']:.1f} KB); one image per request, beam {s['beam']}, the five default results. "
            f"One server (`--max-batch 16 --max-wait-ms 5`) for the three APIs; per concurrency, after a warm-up, "
            f"{s['rounds']} rounds per API of {s['per_worker']} requests per worker, the three APIs' order rotating "
            "through all six orders. Bodies are built before the run; the client reads each answer as that "
            "protocol's client would. `vs /v1` is images/s over /v1's at the same concurrency; latencies are the "
            "client's; `mean batch` is the server's over the API's rounds; `server CPU ms/img` is the server "
            "process's CPU time (all threads) over its rounds per captioned image.", "",
            "### Targets", "", sb.format_targets(report["targets"]), "", "### Results", "",
            format_table(report["results"]), ""]
    for c in s["concurrency"]:
        base = sb.find_row(report["results"], "v1", c)
        for mode in ("v2-json", "v2-binary"):
            _, per = ratios(report["results"], mode, c)
            row = sb.find_row(report["results"], mode, c)
            cpu = ""
            if row and base and row["server_cpu_ms_per_image"] and base["server_cpu_ms_per_image"]:
                cpu = (f"; server CPU per image {row['server_cpu_ms_per_image'] / base['server_cpu_ms_per_image']:.3f}x "
                       "/v1's")
            out.append(f"- concurrency {c}: {LABELS[mode]} / /v1 images/s per round: "
                       + (", ".join(f"{x:.2f}" for x in per) or "-") + cpu)
    for r in report["results"]:
        if r["error_kinds"]:
            out.append(f"- errors, {LABELS[r['mode']]} at concurrency {r['concurrency']}: "
                       + ", ".join(f"{k} x{v}" for k, v in sorted(r["error_kinds"].items())))
    out += [f"- server exit code after SIGTERM: {report['server']['exit_code']}", "", "### Machine", "",
            *sb.machine_lines(m, report["versions"]), "", "### Commands", "", "```", report["command"],
            f"# server:\n{shlex.join(report['server']['cmd'])}", "```", PROTOCOLS_END]
    return "\n".join(out)


# -------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=sb.DEFAULT_MODEL, help="a `captrt export` model directory")
    ap.add_argument("--images", type=Path, default=sb.DEFAULT_IMAGES,
                    help="a directory of images, or a Karpathy JSON (its test split)")
    ap.add_argument("--concurrency", type=sb.parse_list, default=[1, 8, 32], help="e.g. 1,8,32")
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--threads", type=int, help="the server's --threads (default: all usable cores)")
    ap.add_argument("--quick", action="store_true", help="short rounds: checks the pipeline, rough numbers")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    ap.add_argument("--json", type=Path, help="also write the full report as JSON here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import httpx

    from captrt.bench.machine import OtherCpu, library_versions, load_average, machine_info

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not (args.model / "captrt.json").is_file():
        print(f"protocols bench: no model at {args.model}: run `make demo` first or pass --model", file=sys.stderr)
        return 2
    try:
        uploads, images_what = sb.load_uploads(args.images)
    except ValueError as exc:
        print(f"protocols bench: error: {exc}", file=sys.stderr)
        return 2
    settings = dict(SETTINGS["quick" if args.quick else "full"])
    machine = {**machine_info(), "other_cores_before": sb.other_cpu_probe()}
    other = OtherCpu()
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="captrt-protocols-bench.") as logs:
        server = ServeProcess(args.model, *sb.server_flags(16, "fp32", args.threads), log=Path(logs) / "server.log")
        try:
            sb.log(f"[protocols bench] server ready in {server.wait_ready():.1f} s on port {server.port}")
            model_id = httpx.get(server.url + "/v1/model", timeout=5.0, trust_env=False).json()["id"]
            modes = build_modes(uploads, args.beam, model_id.split("@")[0])

            async def run_all() -> None:
                for c in args.concurrency:
                    sb.log(f"[protocols bench] concurrency {c}")
                    rows.extend(await measure_level(server, modes, c, settings, sb.log))
            asyncio.run(run_all())
        except ServeProcessError as exc:
            print(f"protocols bench: error: {exc}", file=sys.stderr)
            return 1
        finally:
            server.stop(sb.STOP_TIMEOUT_S)
    machine.update(load_average_end=load_average(), other_processes_cores=other.cores())
    report = {"date": date, "command": shlex.join([sys.executable, sys.argv[0], *argv]),
              "model": {"path": str(args.model), "id": model_id},
              "settings": {**settings, "quick": args.quick, "concurrency": args.concurrency, "beam": args.beam,
                           "images": images_what, "mean_image_kb": sum(len(u.data) for u in uploads) / len(uploads) / 1024},
              "machine": machine, "versions": library_versions(),
              "server": {"cmd": server.cmd, "exit_code": server.exit_code, "killed": server.killed},
              "results": rows, "targets": targets(rows, args.concurrency)}
    print(format_table(rows))
    for t in report["targets"]:
        print(f"{t['status'].upper():>6}: {t['name']}: goal {t['goal']}; {t['measured']}")
    _write(args.out, section(report))
    sb.log(f"wrote the protocols section of {args.out}")
    if args.json is not None:
        from captrt.bench.report import write_json

        write_json(report, args.json)
    return 0


def _write(path: Path, text: str) -> None:
    from captrt.bench.sections import PROTOCOLS_BEGIN, PROTOCOLS_END, write_section

    write_section(path, text, PROTOCOLS_BEGIN, PROTOCOLS_END)


if __name__ == "__main__":
    sys.exit(main())
