"""A closed-loop HTTP load generator for `captrt serve`: the client side of benchmarks/serve.py (batching
on vs off) and benchmarks/streams.py (--streams 1 vs 2).

N workers (N = concurrency) share one httpx.AsyncClient whose pool holds N connections; each posts
one image (multipart, cycled from uploads read once up front) and sends the next as soon as the
answer is in. A round ends when its request budget is spent or its time is up; requests already
sent are awaited, so throughput = answers / (last answer - round start). Errors (non-200 answers,
transport failures, captions with an error) are counted, never dropped. summarize_mode pools a
configuration's rounds; batch_counters/batch_delta read the server's own batch sizes from /metrics.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from captrt.bench.serve_process import ServeProcess, metric_value

SERVER_TIMEOUT_S = 30.0                       # the servers' --timeout-s
REQUEST_TIMEOUT_S = SERVER_TIMEOUT_S + 10.0   # the client's: the server answers 504 before this
STOP_TIMEOUT_S = SERVER_TIMEOUT_S + 15.0      # drain (<= --timeout-s + 5 s margin) and exit
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


@dataclass(frozen=True)
class Upload:
    """One image file, read once: what a request sends."""

    name: str
    data: bytes
    content_type: str


def image_files(path: Path) -> tuple[list[Path], str]:
    """The image files of a directory, or of a Karpathy JSON's test split; and a description."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in CONTENT_TYPES)
        return files, f"{path} ({len(files)} images)"
    from captrt.train.data import DatasetError, load_karpathy, select_split

    try:
        entries = select_split(load_karpathy(path), "test")
    except DatasetError as exc:
        raise ValueError(str(exc)) from None
    files = [e.path for e in entries if e.path.suffix.lower() in CONTENT_TYPES]
    return files, f"{path} ({len(files)} images of its test split)"


def load_uploads(path: Path) -> tuple[list[Upload], str]:
    """Read every image's bytes up front, so the load loop touches no disk."""
    if not path.exists():
        raise ValueError(f"--images {path}: no such file or directory")
    files, what = image_files(path)
    if not files:
        raise ValueError(f"--images {path}: no JPEG/PNG/WebP images found")
    try:
        return [Upload(f.name, f.read_bytes(), CONTENT_TYPES[f.suffix.lower()]) for f in files], what
    except OSError as exc:
        raise ValueError(f"--images: {exc}") from None


def server_flags(max_batch: int, precision: str, threads: int | None) -> list[str]:
    """The `captrt serve` flags of one server (ServeProcess adds --model, --host and --port)."""
    flags = ["--max-batch", str(max_batch), "--max-wait-ms", "5", "--queue", "256",
             "--timeout-s", f"{SERVER_TIMEOUT_S:g}", "--precision", precision, "--log-level", "warning"]
    if threads is not None:
        flags += ["--threads", str(threads)]
    return flags


def stop_all(servers: dict[str, ServeProcess]) -> None:
    """SIGTERM to every server at once, then wait for each (kill after a bounded wait)."""
    for s in servers.values():
        s.terminate()
    for s in servers.values():
        s.wait_exit(STOP_TIMEOUT_S)


def batch_counters(text: str) -> dict[str, float]:
    """The counters a level's before/after difference needs, from one /metrics scrape (0 if absent)."""
    names = ("captrt_batch_size_sum", "captrt_batch_size_count", "captrt_images_captioned_total",
             "captrt_inference_seconds_sum")
    return {n: metric_value(text, n) or 0.0 for n in names}


def batch_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Batches run, images in them, their mean size, images captioned, and the engine's time per image
    (inference wall time over batched images: what batching itself buys, without HTTP) between two scrapes."""
    batches = after["captrt_batch_size_count"] - before["captrt_batch_size_count"]
    images = after["captrt_batch_size_sum"] - before["captrt_batch_size_sum"]
    engine_s = after["captrt_inference_seconds_sum"] - before["captrt_inference_seconds_sum"]
    return {"batches": int(batches), "batched_images": int(images),
            "mean_batch": round(images / batches, 2) if batches > 0 else None,
            "server_images": int(after["captrt_images_captioned_total"] - before["captrt_images_captioned_total"]),
            "engine_ms_per_image": round(engine_s * 1e3 / images, 2) if images > 0 else None}


def classify(status: int, body: bytes) -> str | None:
    """None for a good answer, else the error label: the status code, or why a 200 is not good."""
    if status != 200:
        return str(status)
    try:
        captions = json.loads(body)["captions"]
    except (ValueError, KeyError, TypeError):
        return "200 with a bad body"
    if len(captions) != 1 or captions[0].get("error") is not None:
        return "200 with a caption error"
    return None


@dataclass
class RoundResult:
    """One round against one server."""

    mode: str
    concurrency: int
    requests: int = 0
    ok: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)

    @property
    def images_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


async def worker(client: Any, url: str, uploads: Sequence[Upload], params: dict[str, Any], budget: list[int],
                  deadline: float, result: RoundResult, last: list[float]) -> None:
    """Closed loop: send, await the answer, repeat, while budget[0] > 0 and the deadline is ahead."""
    import httpx

    while budget[0] > 0 and time.perf_counter() < deadline:
        budget[0] -= 1
        up = uploads[result.requests % len(uploads)]
        result.requests += 1
        sent = time.perf_counter()
        try:
            r = await client.post(url, params=params, files=[("image", (up.name, up.data, up.content_type))])
            error = classify(r.status_code, r.content)
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        done = time.perf_counter()
        last[0] = max(last[0], done)
        if error is None:
            result.ok += 1
            result.latencies_ms.append((done - sent) * 1e3)
        else:
            result.errors[error] += 1


async def run_round(server: ServeProcess, uploads: Sequence[Upload], concurrency: int, *, max_requests: int,
                    seconds: float, params: dict[str, Any]) -> RoundResult:
    """One closed-loop round: `concurrency` workers, at most max_requests requests, sent within `seconds`."""
    import httpx

    result = RoundResult(server.name, concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # A fresh pool per round: the server drops idle keep-alive connections while the other mode runs.
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S, trust_env=False) as client:
        start = time.perf_counter()
        last = [start]
        budget = [max_requests]
        await asyncio.gather(*(worker(client, server.url + "/v1/captions", uploads, params, budget,
                                       start + seconds, result, last) for _ in range(concurrency)))
    result.seconds = last[0] - start
    if not server.alive():
        raise server.fail("died during a round")
    return result


async def scrape(server: ServeProcess) -> dict[str, float]:
    """The batch counters from the server's /metrics."""
    import httpx

    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        r = await client.get(server.url + "/metrics")
    if r.status_code != 200:
        raise server.fail(f"/metrics answered {r.status_code}")
    return batch_counters(r.text)


def summarize_mode(mode: str, max_batch: int, concurrency: int, rounds: Sequence[RoundResult],
                   batch: dict[str, Any], warmup_errors: dict[str, int] | None = None) -> dict[str, Any]:
    """Pool a mode's rounds at one concurrency: rates over the summed round time, percentiles over
    every successful request's latency."""
    from captrt.bench.measure import summarize

    seconds = sum(r.seconds for r in rounds)
    requests = sum(r.requests for r in rounds)
    ok = sum(r.ok for r in rounds)
    errors: Counter = Counter()
    for r in rounds:
        errors.update(r.errors)
    latency = summarize([x for r in rounds for x in r.latencies_ms])
    return {"mode": mode, "max_batch": max_batch, "concurrency": concurrency, "rounds": len(rounds),
            "seconds": round(seconds, 3), "requests": requests, "ok": ok,
            "requests_per_s": round(requests / seconds, 2) if seconds > 0 else None,
            "images_per_s": round(ok / seconds, 2) if seconds > 0 else None,
            "latency_ms": latency, "errors": sum(errors.values()), "error_kinds": dict(errors),
            "warmup_errors": dict(warmup_errors or {}),
            "round_images_per_s": [round(r.images_per_s, 2) for r in rounds], **batch}
