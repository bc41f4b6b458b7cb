"""The bench report's summary: captions compared between rows that must agree, and captrt against its peers.

- Streams rows of one engine x precision caption the same list of images at every stream count S: their
  captions must be identical (a stream is a slot, not other numerics). compare_captions checks it run by
  run, image by image, and so for torch-compile against reference (the same search, the encoder compiled).
- summary_lines: per batch and beam, the strongest peer (the faster of reference / torch-compile, the
  seed's search in PyTorch) and captrt's ratio against it, not only against the seed.
"""

from __future__ import annotations

from typing import Any, Sequence

from captrt.bench.runners import PEERS


def count_differing(a: Sequence[Sequence[Sequence[int]] | None], b: Sequence[Sequence[Sequence[int]] | None]
                    ) -> tuple[int, int]:
    """(images compared, images whose captions differ) between two rows' runs (each run: one token list
    per image). Runs without tokens are skipped; a run whose image count differs counts all as differing."""
    compared = differing = 0
    for ra, rb in zip(a, b):
        if ra is None or rb is None:
            continue
        if len(ra) != len(rb):
            n = max(len(ra), len(rb))
            compared, differing = compared + n, differing + n
            continue
        compared += len(ra)
        differing += sum(1 for x, y in zip(ra, rb) if list(x) != list(y))
    return compared, differing


def compare_captions(recs: list[dict[str, Any]]) -> None:
    """Set rec["captions"] on the rows of one (batch, beam) configuration that must agree (needs each row's
    "_tokens": its runs' token lists): streams rows against the lowest S of their engine x precision, and
    torch-compile against reference."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in recs:
        if r.get("variant") == "streams":
            groups.setdefault((r["engine"], r["precision"]), []).append(r)
    for rows in groups.values():
        rows.sort(key=lambda r: r["streams"])
        base = rows[0]
        images = differing = 0
        for r in rows[1:]:
            n, d = count_differing(base["_tokens"], r["_tokens"])
            images, differing = max(images, n), max(differing, d)
        if len(rows) == 1:
            images = sum(len(t) for t in base["_tokens"] if t is not None)
        verdict = {"across_streams": [r["streams"] for r in rows], "images": images, "differing": differing,
                   "identical": differing == 0 and len(rows) > 1}
        for r in rows:
            r["captions"] = dict(verdict)
    ref = next((r for r in recs if r["engine"] == "reference" and r.get("variant") is None), None)
    for r in recs:
        if r["engine"] == "torch-compile" and ref is not None:
            n, d = count_differing(ref["_tokens"], r["_tokens"])
            r["captions"] = {"compared_with": "reference", "images": n, "differing": d, "identical": d == 0}


def captions_cell(r: dict[str, Any]) -> str:
    """Short table text for rec["captions"]: '= S1' / '= ref' or 'k/n differ'."""
    c = r.get("captions")
    if not c:
        return "-"
    if "across_streams" in c and len(c["across_streams"]) < 2:
        return "(one S)"
    if c["differing"]:
        return f"{c['differing']}/{c['images']} differ"
    return f"= S{c['across_streams'][0]}" if "across_streams" in c else "= ref"


def _key(r: dict[str, Any]) -> tuple[int, int]:
    return r["batch"], r["beam"]


def _name(r: dict[str, Any]) -> str:
    if r.get("variant") == "streams":
        return f"{r['engine']} {r['precision']} streams {r['streams']}x{r['threads']}"
    if r.get("variant") == "options":
        return f"{r['engine']} {r['precision']} +options"
    return f"{r['engine']} {r['precision']}" if r["engine"] not in PEERS else r["engine"]


def strongest_peer(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest (images/s) default row of a peer engine, or None."""
    peers = [r for r in rows if r["engine"] in PEERS and r.get("variant") is None]
    return max(peers, key=lambda r: r["images_per_s"], default=None)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Plain-text lines: per (batch, beam), captrt ort fp32 and captrt's fastest exact row against the
    strongest peer and against the reference; the caption checks; the options row against its default."""
    results = report.get("results") or []
    lines: list[str] = []
    configs: list[tuple[int, int]] = []
    for r in results:
        if _key(r) not in configs:
            configs.append(_key(r))
    for batch, beam in configs:
        rows = [r for r in results if _key(r) == (batch, beam)]
        peer = strongest_peer(rows)
        ref = next((r for r in rows if r["engine"] == "reference" and r.get("variant") is None), None)
        ort = next((r for r in rows if (r["engine"], r["precision"], r.get("variant")) == ("ort", "fp32", None)), None)
        ours = [r for r in rows if r["engine"] not in PEERS and r["precision"] == "fp32"
                and r.get("variant") in (None, "streams")]
        best = max(ours, key=lambda r: r["images_per_s"], default=None)
        head = f"batch {batch}, beam {beam}: "
        if peer is None:
            lines.append(head + "no peer row (reference / torch-compile) in this run")
        else:
            others = [r for r in rows if r["engine"] in PEERS and r.get("variant") is None and r is not peer]
            text = (f"strongest peer {peer['engine']} {peer['images_per_s']:.2f} img/s"
                    + "".join(f" ({o['engine']} {o['images_per_s']:.2f})" for o in others))
            for label, r in (("captrt ort fp32", ort), ("fastest captrt fp32 row", best)):
                if r is None or (label != "captrt ort fp32" and r is ort):
                    continue
                vs_ref = f", {r['images_per_s'] / ref['images_per_s']:.2f}x reference" if ref and ref is not peer else ""
                name = "" if label == "captrt ort fp32" else f" ({_name(r)})"
                text += (f"; {label}{name} {r['images_per_s']:.2f} img/s = "
                         f"{r['images_per_s'] / peer['images_per_s']:.2f}x the strongest peer{vs_ref}")
            lines.append(head + text)
        for r in rows:
            c = r.get("captions")
            if c and "across_streams" in c and r["streams"] == c["across_streams"][0] and len(c["across_streams"]) > 1:
                streams = ", ".join(map(str, c["across_streams"]))
                verdict = "identical" if c["identical"] else f"DIFFERENT for {c['differing']} of {c['images']} images"
                lines.append(head + f"{r['engine']} {r['precision']} captions across streams {streams}: {verdict} "
                             f"({c['images']} images per stream count)")
            elif c and c.get("compared_with") == "reference":
                verdict = "identical" if c["identical"] else f"different for {c['differing']} of {c['images']} images"
                lines.append(head + f"torch-compile captions vs reference: {verdict} ({c['images']} images)")
            if r.get("variant") == "options":
                default = next((d for d in rows if (d["engine"], d["precision"], d.get("variant"))
                                == (r["engine"], r["precision"], None)), None)
                opts = " ".join(f"{k}={v}" for k, v in (r.get("options") or {}).items()
                                if k not in ("beam_size", "max_steps"))
                rel = f" = {r['images_per_s'] / default['images_per_s']:.0%} of the default row's" if default else ""
                lines.append(head + f"options path ({opts}) on {r['engine']} {r['precision']}: "
                             f"{r['images_per_s']:.2f} img/s{rel}")
    for s in report.get("skipped", []):
        if s["engine"] == "torch-compile":
            lines.append(f"torch-compile not run: {s['reason']}")
    return lines
