"""A manifest of a million lines is streamed: the driver's memory does not grow with the corpus.

The per-row work is a cheap stand-in (a fixed caption row instead of decoding and beam search), so a
million rows take seconds; everything else is the real driver path of both modes: the manifest read
line by line, cut into chunks, checked against OUT_DIR's manifest, rows assembled into chunks and
each complete chunk written as a Parquet shard and listed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

STAND_IN = r"""
import json, sys
from captrt.batch.api import _todo
from captrt.batch.shards import Assembler, OutputDir

manifest, out = sys.argv[1], sys.argv[2]
settings = {"sources": [manifest], "split": None, "model_id": "stand-in", "engine": "none", "precision": "fp32",
            "device": "cpu", "beam": 1, "max_steps": 1, "format": "parquet", "shard_rows": 10000}
output = OutputDir.open(out, settings, resume=False)
assembler = Assembler(output)
stamp = {"model_id": "stand-in", "engine": "none", "precision": "fp32"}
skipped = [0]
for chunk in _todo([manifest], None, output, skipped):
    assembler.expect(chunk)
    for offset, path in enumerate(chunk.paths):
        assembler.add({"index": chunk.start + offset, "path": path, "caption": "a red circle", "tokens": [1, 2, 3],
                       "score": -1.0, "finished": True, "error": None, **stamp})
rows, failed = output.totals()
peak_kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rows": rows, "shards": len(output.shards), "pending": assembler.pending, "peak_kib": peak_kib}))
"""


def run_stand_in(tmp_path: Path, lines: int) -> dict:
    manifest = tmp_path / f"list{lines}.txt"
    with open(manifest, "w") as f:
        for i in range(lines):
            f.write(f"images/{i // 1000:04d}/photo-{i:09d}.jpg\n")
    res = subprocess.run([sys.executable, "-c", STAND_IN, str(manifest), str(tmp_path / f"out{lines}")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_million_line_manifest_is_streamed(tmp_path):
    small = run_stand_in(tmp_path, 20_000)
    big = run_stand_in(tmp_path, 1_000_000)
    assert (big["rows"], big["shards"], big["pending"]) == (1_000_000, 100, 0)
    # Holding the million paths alone would take ~90 MiB (and their rows several times that).
    growth_mib = (big["peak_kib"] - small["peak_kib"]) / 1024
    print(f"peak RSS {small['peak_kib'] / 1024:.0f} MiB at 20k lines, {big['peak_kib'] / 1024:.0f} MiB at 1M")
    assert growth_mib < 24, f"peak RSS grew by {growth_mib:.1f} MiB from 20k to 1M lines"
    import pyarrow.parquet as pq

    assert pq.ParquetDataset(tmp_path / "out1000000").read(columns=["index"]).num_rows == 1_000_000
