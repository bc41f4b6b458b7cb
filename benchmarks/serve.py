"""Load test of `captrt serve` on loopback: dynamic batching ON (--max-batch 16) vs OFF (--max-batch 1).

    python benchmarks/serve.py            # full: 3 concurrency levels x 4 rounds x 8 s per mode (~4 min)
    python benchmarks/serve.py --quick    # 2 rounds of 2 s: checks the pipeline, rough numbers

Method
- Two real servers (`python -m captrt serve`) run as subprocesses on free loopback ports, one with
  batching ON and one with batching OFF, started together: an idle server uses no CPU, so each is
  measured alone while the other waits.
- This machine's speed drifts by up to 2x within minutes, so the two modes are never measured in
  separate blocks: for each concurrency level the rounds alternate between them, in ABBA order
  (on, off, off, on, on, off, ...), a few seconds each, and each mode's latencies and counts are
  pooled over its rounds. Every server is warmed up at the level's concurrency first (not measured).
- Closed loop: N workers (N = concurrency) share one httpx.AsyncClient whose pool holds N
  connections; each posts one JPEG (multipart, cycled from the demo's test split, read once up front)
  and sends the next as soon as the answer is in. A round ends when its request budget is spent or
  its time is up, whichever comes first; requests already sent are awaited, so the server is busy
  until the last answer and throughput = answers / (last answer - round start).
- Measured, per mode and concurrency: requests/s (all answers), images/s (captions returned without
  error), client latency p50/p90/p99 of the successful requests (send to full response read), errors
  (non-200 answers, transport failures, captions with an error; counted, never dropped), and the
  server's mean batch size over the measured rounds, from /metrics (`captrt_batch_size` _sum/_count
  scraped before the level's first round and after its last; warm-up excluded).
- Targets at concurrency 32: images/s ON/OFF >= 1.2, and p99 <= 3x p50 with batching ON.

The client runs on the same 2 cores as the server (decoding answers, building multipart bodies), so
absolute numbers are pessimistic; both modes pay the same client cost, so the ratio is fair. The
results go into RESULTS.md between `<!-- serve:begin -->` and `<!-- serve:end -->` (replaced in place,
or appended); benchmarks/run_suite.py carries that section over when it rewrites the file.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from captrt.bench.load import (REQUEST_TIMEOUT_S, STOP_TIMEOUT_S, RoundResult, Upload, batch_counters,  # noqa: F401
                               batch_delta, classify, load_uploads, run_round, scrape, server_flags, stop_all,
                               summarize_mode)  # noqa: F401 (protocols.py and ray_serve.py reach them through here)
from captrt.bench.sections import write_section
from captrt.bench.serve_process import ServeProcess, ServeProcessError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_MODEL = ROOT / "demo_out" / "model"
DEFAULT_IMAGES = ROOT / "demo_out" / "synth" / "dataset_synth.json"
SETTINGS = {"full": {"rounds": 4, "round_seconds": 8.0, "max_requests": 2000},
            "quick": {"rounds": 2, "round_seconds": 2.0, "max_requests": 200}}
MODES = ("on", "off")
TARGET_CONCURRENCY, TARGET_RATIO, TARGET_TAIL = 32, 1.2, 3.0
BUSY_CORES = 0.25                             # run_suite's threshold: a quarter of a core used by others


# ------------------------------------------------------------------------------------------ rounds

def round_order(i: int) -> tuple[str, str]:
    """ABBA: on/off in even rounds, off/on in odd ones, so a linear drift hits both modes alike."""
    return MODES if i % 2 == 0 else MODES[::-1]


async def measure_level(servers: dict[str, ServeProcess], uploads: Sequence[Upload], concurrency: int,
                        settings: dict[str, Any], params: dict[str, Any], log: Any) -> dict[str, Any]:
    """Warm both servers up, then alternate rounds; per mode: its rounds, batch counters and warm-up errors."""
    warm = {}
    for mode in MODES:
        warm[mode] = await run_round(servers[mode], uploads, concurrency, max_requests=max(4, 2 * concurrency),
                                     seconds=settings["round_seconds"], params=params)
    before = {mode: await scrape(servers[mode]) for mode in MODES}
    rounds: dict[str, list[RoundResult]] = {mode: [] for mode in MODES}
    for i in range(settings["rounds"]):
        for mode in round_order(i):
            r = await run_round(servers[mode], uploads, concurrency, max_requests=settings["max_requests"],
                                seconds=settings["round_seconds"], params=params)
            rounds[mode].append(r)
            log(f"  c={concurrency:<3} round {i + 1}/{settings['rounds']} {mode:<3}: {r.requests} requests "
                f"in {r.seconds:.1f} s, {r.images_per_s:.1f} img/s, {sum(r.errors.values())} errors")
    after = {mode: await scrape(servers[mode]) for mode in MODES}
    return {mode: {"rounds": rounds[mode], "batch": batch_delta(before[mode], after[mode]),
                   "warmup_errors": dict(warm[mode].errors)} for mode in MODES}


# --------------------------------------------------------------------------------------- summaries

def pair_ratios(on: dict[str, Any], off: dict[str, Any]) -> list[float]:
    """images/s ON / OFF of each round pair (the same minutes): the spread shows the noise."""
    return [round(a / b, 3) for a, b in zip(on["round_images_per_s"], off["round_images_per_s"]) if b > 0]


def find_row(rows: Sequence[dict[str, Any]], mode: str, concurrency: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["mode"] == mode and r["concurrency"] == concurrency), None)


def evaluate_targets(rows: Sequence[dict[str, Any]], concurrency: int = TARGET_CONCURRENCY) -> list[dict[str, Any]]:
    """The two service targets at `concurrency`: throughput ratio and tail latency with batching ON."""
    on, off = find_row(rows, "on", concurrency), find_row(rows, "off", concurrency)
    ratio_t = {"name": f"images/s, batching ON vs OFF (concurrency {concurrency})", "goal": f">= {TARGET_RATIO:g}x"}
    tail_t = {"name": f"tail latency with batching ON (concurrency {concurrency})", "goal": f"p99 <= {TARGET_TAIL:g}x p50"}
    if on is None or off is None:
        return [{**t, "measured": f"concurrency {concurrency} not measured", "status": "not measured"}
                for t in (ratio_t, tail_t)]
    targets = []
    if on["images_per_s"] and off["images_per_s"]:
        ratio = on["images_per_s"] / off["images_per_s"]
        spread = pair_ratios(on, off)
        detail = (f"ON {on['images_per_s']:.2f} img/s / OFF {off['images_per_s']:.2f} img/s = {ratio:.2f}x"
                  + (f" (round pairs {min(spread):.2f}x..{max(spread):.2f}x)" if spread else ""))
        targets.append({**ratio_t, "value": round(ratio, 3), "measured": detail,
                        "status": "met" if ratio >= TARGET_RATIO else "missed"})
    else:
        targets.append({**ratio_t, "measured": "no successful request in a mode", "status": "missed"})
    lat = on["latency_ms"]
    if lat["p50"]:
        tail = lat["p99"] / lat["p50"]
        targets.append({**tail_t, "value": round(tail, 3),
                        "measured": f"p99 {lat['p99']:.0f} ms / p50 {lat['p50']:.0f} ms = {tail:.2f}x",
                        "status": "met" if tail <= TARGET_TAIL else "missed"})
    else:
        targets.append({**tail_t, "measured": "no successful request with batching ON", "status": "missed"})
    for t in targets:
        if on["errors"] or off["errors"]:
            t["measured"] += f"; errors: ON {on['errors']}, OFF {off['errors']}"
    return targets


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}"


TABLE_HEADERS = ("batching", "max batch", "concurrency", "requests", "req/s", "img/s", "p50 ms", "p90 ms",
                 "p99 ms", "errors", "mean batch", "engine ms/img")


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a GitHub Markdown table (also readable in a terminal)."""
    lines = ["| " + " | ".join(TABLE_HEADERS) + " |", "|" + "|".join("---" for _ in TABLE_HEADERS) + "|"]
    for r in rows:
        lat = r["latency_ms"]
        cells = [r["mode"].upper(), str(r["max_batch"]), str(r["concurrency"]), str(r["requests"]),
                 _num(r["requests_per_s"]), _num(r["images_per_s"]), _num(lat["p50"]), _num(lat["p90"]),
                 _num(lat["p99"]), str(r["errors"]), "-" if r["mean_batch"] is None else f"{r['mean_batch']:.2f}",
                 _num(r.get("engine_ms_per_image"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_targets(targets: Sequence[dict[str, Any]]) -> str:
    lines = ["| target | goal | measured | status |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['goal']} | {t['measured']} | **{t['status']}** |" for t in targets]
    return "\n".join(lines)


def note_lines(report: dict[str, Any]) -> list[str]:
    """Facts under the table: per-round ratios, errors, server/client count agreement, exit codes."""
    rows = report["results"]
    out = []
    for c in report["settings"]["concurrency"]:
        on, off = find_row(rows, "on", c), find_row(rows, "off", c)
        if on and off:
            ratios = pair_ratios(on, off)
            out.append(f"concurrency {c}: images/s ON/OFF per round pair: "
                       + (", ".join(f"{x:.2f}" for x in ratios) or "-"))
            e_on, e_off = on.get("engine_ms_per_image"), off.get("engine_ms_per_image")
            if e_on and e_off and on.get("images_per_s") and off.get("images_per_s"):
                out.append(f"concurrency {c}: the engine alone took {e_on:.1f} ms per image in batches of "
                           f"{on['mean_batch']:.1f} and {e_off:.1f} ms alone ({e_off / e_on:.2f}x: the engine's own "
                           f"batch gain); the service gained {on['images_per_s'] / off['images_per_s']:.2f}x")
    for r in rows:
        if r["error_kinds"]:
            out.append(f"errors, {r['mode'].upper()} at concurrency {r['concurrency']}: "
                       + ", ".join(f"{k} x{v}" for k, v in sorted(r["error_kinds"].items())))
        if r["warmup_errors"]:
            out.append(f"warm-up errors, {r['mode'].upper()} at concurrency {r['concurrency']}: "
                       + ", ".join(f"{k} x{v}" for k, v in sorted(r["warmup_errors"].items())))
        if r["server_images"] != r["ok"]:
            out.append(f"{r['mode'].upper()} at concurrency {r['concurrency']}: the server captioned "
                       f"{r['server_images']} images, the client got {r['ok']} good captions")
    codes = report["servers"]
    out.append("server exit codes after SIGTERM: " + ", ".join(
        f"{m.upper()} {s['exit_code']}" + (" (killed: no exit within the drain limit)" if s["killed"] else "")
        for m, s in codes.items()))
    return out


def machine_lines(m: dict[str, Any], versions: dict[str, str]) -> list[str]:
    flags = ", ".join(m.get("cpu_flags") or []) or "no AVX flags listed"
    return [f"- CPU: {m['cpu']} ({flags}); cores usable: {m['cores']} (logical CPUs {m['logical_cpus']}), "
            f"memory {m['memory_gb']} GB; {m['platform']}, Python {m['python']}",
            "- libraries: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
            f"- load average (1/5/15 min, counts the benchmark's own processes): {m['load_average']} at the "
            f"start, {m.get('load_average_end')} at the end",
            f"- CPU used by other processes: {m.get('other_cores_before')} cores in the second before the "
            f"servers started, {m.get('other_processes_cores')} cores on average over the whole run "
            f"(the servers' CPU excluded)"]


def serve_section(report: dict[str, Any]) -> str:
    """The RESULTS.md section, markers included."""
    from captrt.bench.sections import SERVE_BEGIN, SERVE_END

    s, m = report["settings"], report["machine"]
    other = m.get("other_processes_cores")
    out = [SERVE_BEGIN, "## Service: dynamic batching ON vs OFF (`benchmarks/serve.py`)", "",
           f"Generated by `benchmarks/serve.py` on {report['date']}"
           + (" with `--quick` (short rounds: rough numbers)" if s["quick"] else "") + ".", ""]
    if other is not None and other > BUSY_CORES:
        out += [f"**Warning: the machine was busy**: other processes used {other:.2f} of the {m['cores']} cores "
                "on average during the run, so the numbers are noisy. Re-run `make bench-serve` on a quiet "
                "machine.", ""]
    out += [f"Model {report['model']['path']} ({report['model'].get('id')}, {s['precision']}); images: "
            f"{s['images']}; one image per request, beam {s['beam']}, the model's max_steps. Two servers run "
            f"together (`--max-batch {s['max_batch']}` = ON, `--max-batch 1` = OFF, `--max-wait-ms 5`); per "
            f"concurrency, after a warm-up, {s['rounds']} rounds per mode of up to {s['round_seconds']:g} s / "
            f"{s['max_requests']} requests, alternating ON and OFF in ABBA order so both see the same minutes "
            "of this machine's drifting speed. Closed loop: each of N workers sends its next request when the "
            "previous answer is in. Rates are over the summed round time (to the last answer); latencies are "
            "the client's, over the successful requests; `mean batch` is the server's (/metrics) over the "
            "measured rounds. The client shares the 2 cores with the server, so absolute numbers are "
            "pessimistic.", "", "### Targets", "", format_targets(report["targets"]), "", "### Results", "",
            format_table(report["results"]), "", *[f"- {x}" for x in note_lines(report)], "", "### Machine", "",
            *machine_lines(m, report["versions"]), "", "### Commands", "", "```",
            "make bench-serve    # = .venv/bin/python benchmarks/serve.py",
            "# this run:", report["command"],
            *[f"# server {mode.upper()}:\n{shlex.join(v['cmd'])}" for mode, v in report["servers"].items()],
            "```", SERVE_END]
    return "\n".join(out)


# -------------------------------------------------------------------------------------------- main

def parse_list(value: str) -> list[int]:
    try:
        out = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not out or any(x < 1 for x in out):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a `captrt export` model directory")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                    help="a directory of images, or a Karpathy JSON (its test split)")
    ap.add_argument("--concurrency", type=parse_list, default=[1, 8, 32], help="concurrency levels, e.g. 1,8,32")
    ap.add_argument("--rounds", type=int, help="rounds per mode and level (full 4, quick 2)")
    ap.add_argument("--round-seconds", type=float, help="time limit of a round (full 8, quick 2)")
    ap.add_argument("--max-requests", type=int, help="request limit of a round (full 2000, quick 200)")
    ap.add_argument("--beam", type=int, default=5, help="beam_size of every request")
    ap.add_argument("--precision", default="fp32", help="the servers' --precision")
    ap.add_argument("--max-batch", type=int, default=16, help="--max-batch of the batching-ON server")
    ap.add_argument("--threads", type=int, help="the servers' --threads (default: all usable cores)")
    ap.add_argument("--quick", action="store_true", help="short rounds: checks the pipeline, rough numbers")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="the RESULTS.md to put the section in")
    ap.add_argument("--json", type=Path, help="also write the full report as JSON here")
    args = ap.parse_args(argv)
    for name in ("rounds", "max_requests", "beam", "max_batch", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.round_seconds is not None and not args.round_seconds > 0:
        ap.error("--round-seconds must be > 0")
    return args


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """Flags given explicitly win over the full/quick defaults."""
    base = SETTINGS["quick" if args.quick else "full"]
    return {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}


def other_cpu_probe(seconds: float = 1.0) -> float | None:
    """Cores used by other processes over a short idle sample (0 = quiet)."""
    from captrt.bench.machine import OtherCpu

    probe = OtherCpu()
    time.sleep(seconds)
    return probe.cores()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def measure_all(servers: dict[str, ServeProcess], uploads: Sequence[Upload], levels: Sequence[int],
                      settings: dict[str, Any], params: dict[str, Any], max_batch: int) -> list[dict[str, Any]]:
    rows = []
    for c in levels:
        log(f"[serve bench] concurrency {c}: warm-up, then {settings['rounds']} rounds per mode")
        level = await measure_level(servers, uploads, c, settings, params, log)
        for mode in MODES:
            v = level[mode]
            rows.append(summarize_mode(mode, max_batch if mode == "on" else 1, c, v["rounds"], v["batch"],
                                       v["warmup_errors"]))
    return rows


def model_id(server: ServeProcess) -> str | None:
    import httpx

    try:
        return httpx.get(server.url + "/v1/model", timeout=5.0, trust_env=False).json().get("id")
    except (httpx.HTTPError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not (args.model / "captrt.json").is_file():
        print(f"serve bench: no model at {args.model}: run `make demo` first or pass --model", file=sys.stderr)
        return 2
    try:
        uploads, images_what = load_uploads(args.images)
    except ValueError as exc:
        print(f"serve bench: error: {exc}", file=sys.stderr)
        return 2
    from captrt.bench.machine import OtherCpu, library_versions, load_average, machine_info

    settings = settings_of(args)
    params = {"beam_size": args.beam}
    machine = {**machine_info(), "other_cores_before": other_cpu_probe()}
    if machine["other_cores_before"] is not None and machine["other_cores_before"] > BUSY_CORES:
        log(f"[serve bench] warning: other processes are using {machine['other_cores_before']:.2f} cores right "
            "now: the numbers will be noisy")
    other = OtherCpu()
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    servers: dict[str, ServeProcess] = {}
    error: str | None = None
    rows: list[dict[str, Any]] = []
    mid = None
    with tempfile.TemporaryDirectory(prefix="captrt-serve-bench.") as logs:
        try:
            for mode in MODES:
                flags = server_flags(args.max_batch if mode == "on" else 1, args.precision, args.threads)
                servers[mode] = ServeProcess(args.model, *flags, log=Path(logs) / f"server-{mode}.log", name=mode)
            for s in servers.values():
                log(f"[serve bench] server {s.name.upper()} ready in {s.wait_ready():.1f} s "
                    f"on port {s.port}")
            mid = model_id(servers["on"])
            rows = asyncio.run(measure_all(servers, uploads, args.concurrency, settings, params, args.max_batch))
        except ServeProcessError as exc:
            error = str(exc)
        finally:
            stop_all(servers)
        failed_exit = [s for s in servers.values() if s.exit_code != 0 or s.killed]
        if failed_exit and error is None:
            error = "\n".join(str(s.fail(f"exit code {s.exit_code} after SIGTERM"
                                         + (" (killed after the drain limit)" if s.killed else "")))
                              for s in failed_exit)
    machine.update(load_average_end=load_average(), other_processes_cores=other.cores())
    if not rows:
        print(f"serve bench: error: {error}", file=sys.stderr)
        return 1
    report = {"date": date, "command": shlex.join([sys.executable, sys.argv[0], *argv]),
              "model": {"path": str(args.model), "id": mid},
              "settings": {**settings, "quick": args.quick, "concurrency": args.concurrency, "beam": args.beam,
                           "precision": args.precision, "max_batch": args.max_batch, "images": images_what},
              "machine": machine, "versions": library_versions(),
              "servers": {m: {"cmd": s.cmd, "exit_code": s.exit_code, "killed": s.killed} for m, s in servers.items()},
              "results": rows, "targets": evaluate_targets(rows)}
    print(format_table(rows))
    print()
    for t in report["targets"]:
        print(f"{t['status'].upper():>6}: {t['name']}: goal {t['goal']}; {t['measured']}")
    other_cores = machine["other_processes_cores"]
    if other_cores is not None and other_cores > BUSY_CORES:
        print(f"warning: other processes used {other_cores:.2f} cores on average: the numbers are noisy")
    sys.stdout.flush()
    write_section(args.out, serve_section(report))
    log(f"wrote the serve section of {args.out}")
    if args.json is not None:
        from captrt.bench.report import write_json

        write_json(report, args.json)
        log(f"wrote {args.json}")
    if error is not None:
        print(f"serve bench: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
