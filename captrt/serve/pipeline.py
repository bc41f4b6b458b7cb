"""One caption request's way through the service, whichever protocol brought it (/v1 or /v2):
options parsed by one parser, images decoded on the decode pool, queued for the one Batcher, awaited
while watching for the client leaving, under the one timeout.

    response = await guarded(state, lambda futures: work(futures), error)   # 504 / 499 / cancelling
    uploads, params, captions = await caption_uploads(request, state, read, futures)
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Iterable

import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from captrt.runtime import Caption, Captioner, ImageTooLargeError, InvalidImageError, UnsupportedImageFormatError
from captrt.runtime.streams import usable_cores
from captrt.serve.batcher import Batcher, BatcherClosedError, DecodeParams, QueueFullError
from captrt.serve.config import ServeConfig
from captrt.serve.metrics import ServeMetrics
from captrt.serve.upload import ServeError, Upload, error_status, parse_params

log = logging.getLogger("captrt.serve")
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the response": metrics only


class ServiceState:
    """What the routes share: config, metrics, and (once loaded) the captioner and its batcher."""

    def __init__(self, config: ServeConfig, metrics: ServeMetrics):
        self.config = config
        self.metrics = metrics
        self.captioner: Captioner | None = None
        self.batcher: Batcher | None = None
        self.info: dict[str, Any] = {}
        self.load_error: str | None = None
        self.max_steps_cap = config.max_steps_cap or 0
        self.decode_pool = ThreadPoolExecutor(max_workers=config.decode_threads or usable_cores(),
                                              thread_name_prefix="captrt-decode")

    @property
    def ready(self) -> bool:
        return self.batcher is not None


def parse_decode(state: ServiceState, query: Iterable[tuple[str, str]], fields: dict[str, str]) -> DecodeParams:
    """A request's decoding options (text form) -> DecodeParams, checked against the loaded model;
    ServeError 422 naming the option. Every protocol goes through here."""
    captioner = state.captioner
    assert captioner is not None
    return parse_params(query, fields, max_beam=captioner.max_beam, max_steps_cap=state.max_steps_cap,
                        check=lambda p: captioner.check_options(p.decoding(), max_steps=state.max_steps_cap))


def decode_upload(captioner: Captioner, upload: Upload) -> tuple[np.ndarray | None, str | None, str | None]:
    """-> (pixels, error, reason); runs on the decode pool."""
    try:
        return captioner.read_image(upload.data, name=upload.name), None, None
    except UnsupportedImageFormatError as exc:
        return None, str(exc), "format"
    except ImageTooLargeError as exc:
        return None, str(exc), "too_large"
    except InvalidImageError as exc:
        return None, str(exc), "unreadable"


def run_batch(captioner: Captioner) -> Callable[[list[np.ndarray], DecodeParams], list[Caption]]:
    def run(pixels: list[np.ndarray], p: DecodeParams) -> list[Caption]:
        return captioner.caption_with(pixels, p.decoding(), return_attention=p.attention, batch_size=len(pixels))
    return run


async def until_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


ReadRequest = Callable[[], Awaitable[tuple[list[Upload], DecodeParams]]]


async def caption_uploads(request: Request, state: ServiceState, read: ReadRequest,
                          futures: list) -> tuple[list[Upload], DecodeParams, list[Caption]]:
    """read() the request (its images and options), decode, queue, await the captions or the client
    leaving (ClientDisconnect). -> (uploads, params, one Caption per upload in order: an error Caption
    for an image that could not be read). Every image unreadable: ServeError with /v1's status;
    the engine failing: ServeError 500. `futures` is filled in place so the caller can cancel."""
    captioner, batcher = state.captioner, state.batcher
    assert captioner is not None and batcher is not None
    loop = asyncio.get_running_loop()
    with batcher.incoming():  # the batcher may wait for this request's images while it is read
        uploads, params = await read()
        decoded = await asyncio.gather(*(loop.run_in_executor(state.decode_pool, decode_upload, captioner, u)
                                         for u in uploads))
        good = [pixels for pixels, _, _ in decoded if pixels is not None]
        for _, _, reason in decoded:
            if reason is not None:
                state.metrics.image_errors.labels(reason).inc()
        if not good:
            kinds = [reason for _, _, reason in decoded]
            raise ServeError(error_status(kinds), "; ".join(err for _, err, _ in decoded if err))
        try:
            futures.extend(batcher.submit(good, params))
        except QueueFullError as exc:
            raise ServeError(503, str(exc), {"Retry-After": str(exc.retry_after)}) from None
        except BatcherClosedError as exc:
            raise ServeError(503, str(exc), {"Retry-After": "1"}) from None
    results = asyncio.gather(*futures)
    watcher = loop.create_task(until_disconnect(request))
    try:
        done, _ = await asyncio.wait({results, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if results not in done:  # the client left: drop its queued images, answer nobody
        results.cancel()
        raise ClientDisconnect()
    try:
        captions = results.result()
    except Exception as exc:  # the engine failed on this batch: a server fault, said plainly
        log.error("captioning failed: %s", exc)
        raise ServeError(500, f"captioning failed: {type(exc).__name__}: {exc}") from None
    it = iter(captions)
    return uploads, params, [next(it) if pixels is not None else Caption("", [], float("nan"), None, err, False)
                             for pixels, err, _ in decoded]


async def guarded(state: ServiceState, work: Callable[[list], Awaitable[Response]],
                  error: Callable[[int, str], Response]) -> Response:
    """work(futures) under the request timeout (error(504, ...)); a client that left gets nothing (499
    in the metrics); queued images of a request that ends early never reach the engine."""
    futures: list[asyncio.Future] = []
    timeout = state.config.timeout_s
    try:
        return await asyncio.wait_for(work(futures), timeout)
    except asyncio.TimeoutError:
        return error(504, f"request took longer than the {timeout:g} s limit")
    except ClientDisconnect:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        if futures and state.batcher is not None:
            state.batcher.cancel([f for f in futures if not f.done()])
