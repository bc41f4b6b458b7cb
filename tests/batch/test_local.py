"""`captrt batch` in local mode: rows, bad files, refusal, resume after SIGKILL/SIGTERM, progress."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from captrt.batch import EXIT_SOME_FAILED, BatchUsageError, run_batch
from captrt.batch.local import decode_ahead
from captrt.progress import Progress
from captrt.batch.shards import MANIFEST, SUCCESS
from captrt.cli import app
from captrt.runtime import Captioner
from tests.batch.conftest import write_bad_files, write_images

ROOT = Path(__file__).resolve().parents[2]
OPTS = {"beam": 3, "max_steps": 20, "batch_size": 4, "progress": False}


def read_rows(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out).sort_values("index").reset_index(drop=True)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("mixed") / "in"
    write_images(root, 10, seed=11)
    return root, write_bad_files(root / "bad")


def test_rows_equal_captioner_and_bad_files_become_error_rows(batch_model_dir, mixed, tmp_path):
    root, bad = mixed
    result = run_batch([str(root)], batch_model_dir, tmp_path / "out", shard_rows=4, **OPTS)
    assert (result.captioned, result.failed, result.exit_code) == (10, 4, EXIT_SOME_FAILED)
    rows = read_rows(tmp_path / "out")
    assert list(rows["index"]) == list(range(14))
    assert pq.read_schema(next((tmp_path / "out").glob("part-*.parquet"))).field("tokens").type.value_type.bit_width == 32
    with Captioner.load(batch_model_dir, threads=1) as cap:
        expected = cap.caption(list(rows["path"]), beam_size=3, max_steps=20)
    for row, want in zip(rows.itertuples(), expected):
        if want.error is not None:
            name = Path(row.path).name
            assert row.error == want.error and bad[name] in row.error and pd.isna(row.caption)
            assert pd.isna(row.score) and list(row.tokens) == [] and not row.finished
        else:
            assert row.error is None or pd.isna(row.error)
            assert (row.caption, list(row.tokens), row.finished) == (want.text, want.tokens, want.finished)
            assert row.score == pytest.approx(want.score, abs=1e-5)
        assert (row.engine, row.precision, row.model_id) == ("ort", "fp32", cap.model.model_id)
    success = json.loads((tmp_path / "out" / SUCCESS).read_text())
    assert (success["images"], success["captioned"], success["failed"], success["shards"]) == (14, 10, 4, 4)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 4, 2]


def test_jsonl_shards_and_cli_summary(batch_model_dir, corpus, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["batch", str(corpus), "--model", str(batch_model_dir), "-o", str(out),
                                   "--format", "jsonl", "--beam", "2", "--max-steps", "10", "--shard-rows", "10"])
    assert res.exit_code == 0, res.output
    assert "24 captioned, 0 failed" in res.output and "images/s" in res.output
    rows = pd.concat([pd.read_json(p, lines=True) for p in sorted(out.glob("part-*.jsonl"))])
    assert sorted(rows["index"]) == list(range(24)) and rows["error"].isna().all()


def test_existing_out_dir_is_refused_and_bad_usage_is_one_line(batch_model_dir, corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "something").write_text("x")
    runner = CliRunner()
    res = runner.invoke(app, ["batch", str(corpus), "--model", str(batch_model_dir), "-o", str(out)])
    assert res.exit_code == 2 and "already exists (pass --resume" in res.output
    assert res.output.count("\n") == 1 and (out / "something").read_text() == "x"
    for args, message in [(["--format", "csv"], "format must be one of"), (["--batch-size", "0"], "batch_size"),
                          (["--ray", str(corpus)], "--ray takes auto, local"),
                          (["--actors", "2"], "apply to --ray only")]:
        res = runner.invoke(app, ["batch", str(corpus), "--model", str(batch_model_dir), "-o", str(tmp_path / "n"),
                                  *args])
        assert res.exit_code == 2 and message in res.output, (args, res.output)
    res = runner.invoke(app, ["batch", str(tmp_path / "list.txt"), "--model", str(batch_model_dir), "-o",
                              str(tmp_path / "n")])
    assert res.exit_code == 2 and "list.txt: no such manifest" in res.output
    assert not (tmp_path / "n").exists()


def test_resume_refuses_other_settings_or_changed_inputs(batch_model_dir, tmp_path):
    root = tmp_path / "in"
    write_images(root, 6)
    out = tmp_path / "out"
    run_batch([str(root)], batch_model_dir, out, shard_rows=4, **OPTS)
    with pytest.raises(BatchUsageError, match="different beam"):
        run_batch([str(root)], batch_model_dir, out, shard_rows=4, resume=True, **{**OPTS, "beam": 2})
    (root / "im002.png").rename(root / "aa.png")  # same count, other paths in the first chunk
    with pytest.raises(BatchUsageError, match="--resume needs the same inputs"):
        run_batch([str(root)], batch_model_dir, out, resume=True, **OPTS)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "captrt", "batch", *args]


def wait_for_shards(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(json.loads((out / MANIFEST).read_text())["shards"]) >= n:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"no {n} shards in {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_resume_after_the_driver_is_killed_gives_every_input_once(batch_model_dir, tmp_path, sig):
    root = tmp_path / "in"
    write_images(root, 40, seed=5)
    manifest = tmp_path / "list.txt"
    manifest.write_text("".join(f"{p}\n" for p in sorted(root.rglob("*.*"))))
    out = tmp_path / "out"
    args = [str(manifest), "--model", str(batch_model_dir), "-o", str(out), "--beam", "3", "--max-steps", "20",
            "--batch-size", "2", "--shard-rows", "3", "--threads", "1"]
    proc = subprocess.Popen(cli(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_shards(out, random.Random(sig).randint(1, 6), proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 130 and "rerun with --resume" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (out / SUCCESS).exists()
    done = len(json.loads((out / MANIFEST).read_text())["shards"])
    assert 1 <= done < 14
    res = subprocess.run(cli(*args, "--resume"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{done * 3} already done" in res.stderr
    rows = read_rows(out)
    assert list(rows["index"]) == list(range(40))
    assert sorted(rows["path"]) == sorted(str(p) for p in root.rglob("*.*"))  # each input exactly once
    assert not list(out.glob(".*.tmp"))
    clean = tmp_path / "clean"
    assert run_batch([str(manifest)], batch_model_dir, clean, shard_rows=3, threads=1, **OPTS).exit_code == 0
    pd.testing.assert_frame_equal(rows.drop(columns="score"), read_rows(clean).drop(columns="score"))


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise():
    log = io.StringIO()
    p = Progress(100, label="captrt batch", stream=log, interval_s=0.0)
    for _ in range(4):
        p.update(25)
    p.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in log.getvalue()
    assert lines[-1].startswith("captrt batch: 100/100 images (100%)") and "images/s" in lines[-1]
    assert "ETA" in lines[0]
    quiet = io.StringIO()
    p = Progress(100, stream=quiet, interval_s=3600)
    p.update(50)
    assert quiet.getvalue() == ""  # no line before the interval: logs stay short
    term = io.StringIO()
    p = Progress(10, stream=term, tty=True)
    p.update(10)
    p.close()
    assert term.getvalue().startswith("\r[") and term.getvalue().endswith("\n")


def test_decode_ahead_is_bounded_and_ordered():
    inflight, peak, lock = [0], [0], threading.Lock()

    def read(path: str):
        with lock:
            inflight[0] += 1
            peak[0] = max(peak[0], inflight[0])
        time.sleep(0.001)
        with lock:
            inflight[0] -= 1
        if path.endswith("7"):
            raise OSError(f"{path}: nope")
        return path

    produced = []

    def items():
        for i in range(200):
            produced.append(i)
            yield i, f"p{i}"

    consumed = []
    for index, path, image in decode_ahead(items(), read, threads=3, lookahead=8):
        consumed.append(index)
        assert len(produced) - len(consumed) <= 8  # never more than the look-ahead listed ahead
        assert image == (f"{path}: nope" if path.endswith("7") else path)
    assert consumed == list(range(200)) and peak[0] <= 3


def test_decoding_controls_reach_the_rows_and_bad_ones_stop_before_start(batch_model_dir, corpus, tmp_path):
    with Captioner.load(batch_model_dir, threads=1) as cap:
        word = cap.vocab.id2word[4]
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["batch", str(corpus), "--model", str(batch_model_dir), "-o", str(out),
                                   "--beam", "2", "--max-steps", "10", "--min-length", "3", "--suppress", word,
                                   "--disable-unk"])
    assert res.exit_code == 0, res.output
    rows = read_rows(out)
    with Captioner.load(batch_model_dir, threads=1) as cap:
        want = cap.caption(list(rows["path"]), beam_size=2, max_steps=10, min_length=3, suppress=[word],
                           disable_unk=True)
    assert [list(t) for t in rows["tokens"]] == [c.tokens for c in want]
    res = CliRunner().invoke(app, ["batch", str(corpus), "--model", str(batch_model_dir), "-o", str(tmp_path / "n"),
                                   "--no-repeat-ngram-size", "-1"])
    assert res.exit_code == 2 and "no_repeat_ngram_size must be an integer >= 0" in res.output
    assert not (tmp_path / "n").exists()


def test_two_streams_give_exactly_the_rows_of_one(batch_model_dir, mixed, tmp_path):
    """--streams 2 --threads 1: the same table as one stream (order, captions, scores, errors, shards);
    with --ray the flag is refused before anything starts, as is a bad value."""
    root, _ = mixed
    opts = {**OPTS, "batch_size": 2, "shard_rows": 4, "threads": 1}
    one = run_batch([str(root)], batch_model_dir, tmp_path / "one", **opts)
    two = run_batch([str(root)], batch_model_dir, tmp_path / "two", streams=2, **opts)
    assert (two.captioned, two.failed) == (one.captioned, one.failed) == (10, 4)
    pd.testing.assert_frame_equal(read_rows(tmp_path / "two"), read_rows(tmp_path / "one"))
    shards = [json.loads((tmp_path / d / MANIFEST).read_text())["shards"] for d in ("one", "two")]
    assert shards[0] == shards[1]
    res = CliRunner().invoke(app, ["batch", str(root), "--model", str(batch_model_dir), "-o", str(tmp_path / "r"),
                                   "--ray", "--streams", "2"])
    assert res.exit_code == 2 and "--streams and --oversubscribe apply to local mode only" in res.output, res.output
    from captrt.runtime.streams import usable_cores

    for value, message in (("0", "--streams must be a positive integer or 'auto'"),
                           (str(usable_cores() + 1), "--oversubscribe")):
        res = CliRunner().invoke(app, ["batch", str(root), "--model", str(batch_model_dir), "-o", str(tmp_path / "n"),
                                       "--streams", value, "--threads", "1"])
        assert res.exit_code == 2 and message in res.output, (value, res.output)
    assert not (tmp_path / "r").exists() and not (tmp_path / "n").exists()


def test_local_mode_keeps_s_batches_in_flight_and_hands_rows_over_in_order():
    """run_local with a 2-stream captioner: two caption() calls run at once, never three, and the
    Assembler gets each batch's rows whole, oldest batch first."""
    from captrt.batch.local import run_local
    from captrt.batch.shards import Chunk
    from captrt.runtime.captioner import Caption

    lock, active, peak, both = threading.Lock(), [0], [0], threading.Event()

    class TwoStreams:
        streams = 2

        def caption(self, images, **kwargs):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
                if active[0] == 2:
                    both.set()
            both.wait(5)  # the first call returns only once a second one runs beside it
            time.sleep(0.01 * (int(images[0][0, 0, 0]) // 3 % 2 == 0))  # even batches are slower: they end after the next
            with lock:
                active[0] -= 1
            return [Caption(str(int(im[0, 0, 0])), [int(im[0, 0, 0])], 0.0) for im in images]

    class Rows:
        def __init__(self):
            self.indices = []

        def expect(self, chunk):
            pass

        def add(self, row):
            self.indices.append(row["index"])

    rows = Rows()
    chunks = [Chunk(0, [f"p{i}" for i in range(10)]), Chunk(10, [f"p{i}" for i in range(10, 21)])]
    run_local(chunks, TwoStreams(), rows, read=lambda p: np.full((2, 2, 3), int(p[1:]), np.uint8),
              stamp={}, batch_size=3, beam=1, max_steps=2, decode_threads=2, on_rows=lambda n: None)
    assert both.is_set() and peak[0] == 2
    assert rows.indices == list(range(21))
