"""Local mode of `captrt batch`: one process, decoding overlapped with inference.

    decode threads --(bounded look-ahead of decoded images)--> batched beam search --> Assembler --> shards

The calling thread walks the inputs, keeps at most `lookahead` images submitted to a small thread
pool (Pillow and ONNX Runtime both release the GIL, so decoding the next batch runs while the engine
works on this one), and captions `batch_size` decoded images per engine call. With a Captioner of S > 1
streams, up to S batches are captioned at once (each call on a pool of S threads, holding one stream),
and their rows reach the Assembler in input order, oldest batch first. Memory is bounded by the
look-ahead, the batch being filled, the S batches in flight and the chunks not yet complete, never by
the size of the corpus.
"""

from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from captrt.batch.rows import error_row, read_or_error, result_rows
from captrt.batch.shards import Assembler, Chunk


def decode_ahead(items: Iterable[tuple[int, str]], read: Callable[[str], np.ndarray], threads: int,
                 lookahead: int) -> Iterator[tuple[int, str, np.ndarray | str]]:
    """(index, path) -> (index, path, uint8 (S, S, 3) image or the error message), in input order,
    with up to `lookahead` images being decoded (or decoded and waiting) at any time."""
    pending: collections.deque[tuple[int, str, Future]] = collections.deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="captrt-decode") as pool:
        try:
            for index, path in items:
                pending.append((index, path, pool.submit(read_or_error, read, path)))
                if len(pending) >= lookahead:
                    i, p, fut = pending.popleft()
                    yield i, p, fut.result()
            while pending:
                i, p, fut = pending.popleft()
                yield i, p, fut.result()
        finally:  # interrupted (Ctrl-C, an error): drop what was queued, don't decode the rest
            for _, _, fut in pending:
                fut.cancel()


def run_local(chunks: Iterable[Chunk], captioner: Any, assembler: Assembler, *, read: Callable[[str], np.ndarray],
              stamp: dict[str, str], batch_size: int, beam: int, max_steps: int, decode_threads: int,
              decoding: dict[str, Any] | None = None,
              on_rows: Callable[[int], None]) -> None:
    """Caption every input of `chunks` with `captioner`; each complete chunk becomes a shard (assembler).

    read: path -> uint8 (S, S, 3) (raises InvalidImageError/OSError). stamp: model_id/engine/precision
    columns. on_rows(n): called after n more rows were produced (progress).
    """

    def items() -> Iterator[tuple[int, str]]:
        for chunk in chunks:
            assembler.expect(chunk)
            for offset, path in enumerate(chunk.paths):
                yield chunk.start + offset, path

    batch: list[tuple[int, str, np.ndarray]] = []
    streams = getattr(captioner, "streams", 1)
    pool = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="captrt-batch") if streams > 1 else None
    in_flight: collections.deque[tuple[list[tuple[int, str]], Future]] = collections.deque()  # oldest first

    def caption(images: list[np.ndarray]) -> list[Any]:
        return captioner.caption(images, beam_size=beam, max_steps=max_steps, batch_size=len(images),
                                 **(decoding or {}))

    def deliver(where: list[tuple[int, str]], caps: list[Any]) -> None:
        for row in result_rows(where, caps, stamp):
            assembler.add(row)
        on_rows(len(where))

    def flush() -> None:
        where, images = [(i, p) for i, p, _ in batch], [img for _, _, img in batch]
        batch.clear()
        if pool is None:
            deliver(where, caption(images))
            return
        if len(in_flight) >= streams:  # every stream busy: the oldest batch's rows first, then its slot
            done_where, fut = in_flight.popleft()
            deliver(done_where, fut.result())
        in_flight.append((where, pool.submit(caption, images)))

    try:
        for index, path, image in decode_ahead(items(), read, decode_threads,
                                               lookahead=2 * batch_size + decode_threads):
            if isinstance(image, str):
                assembler.add(error_row(index, path, image, stamp))
                on_rows(1)
                continue
            batch.append((index, path, image))
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        while in_flight:
            done_where, fut = in_flight.popleft()
            deliver(done_where, fut.result())
    finally:  # interrupted or failed: queued batches are dropped, running ones end before the captioner closes
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
