"""SOURCE listing: directories, globs, manifests (.txt, .csv, .parquet, Karpathy JSON), file:// URIs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from captrt.batch.sources import SourceError, count_paths, iter_paths


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel in ["b/2.png", "b/1.JPG", "a/z/3.webp", "a/0.png", "top.bmp", "notes.txt", "a/readme.md"]:
        p = tmp_path / "imgs" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    return tmp_path / "imgs"


def rel(paths, root: Path) -> list[str]:
    return [str(Path(p).relative_to(root)) for p in paths]


def test_directory_is_recursive_sorted_and_images_only(tree):
    assert rel(iter_paths([str(tree)]), tree) == ["top.bmp", "a/0.png", "a/z/3.webp", "b/1.JPG", "b/2.png"]


def test_glob_and_plain_path_and_order_of_sources(tree):
    got = list(iter_paths([str(tree / "b" / "*.png"), str(tree / "missing.png"), str(tree / "**" / "*.webp")]))
    assert rel(got, tree) == ["b/2.png", "missing.png", "a/z/3.webp"]  # a missing image is kept (error row later)


def test_txt_manifest_relative_to_its_folder(tree, tmp_path):
    manifest = tree / "list.txt"
    manifest.write_text("# a comment\nb/2.png\n\n  a/0.png  \n/abs/x.png\n", encoding="utf-8")
    assert list(iter_paths([str(manifest)])) == [str(tree / "b/2.png"), str(tree / "a/0.png"), "/abs/x.png"]


def test_csv_and_parquet_manifests(tree):
    (tree / "list.csv").write_text("id,path\n1,b/2.png\n2,a/0.png\n", encoding="utf-8")
    pq.write_table(pa.table({"path": ["a/0.png", "top.bmp"], "other": [1, 2]}), tree / "list.parquet")
    assert rel(iter_paths([str(tree / "list.csv"), str(tree / "list.parquet")]), tree) == \
        ["b/2.png", "a/0.png", "a/0.png", "top.bmp"]


def test_karpathy_json_with_split(tree):
    doc = {"images": [{"filepath": "a", "filename": "0.png", "split": "test"},
                      {"filepath": "b", "filename": "2.png", "split": "train"},
                      {"filepath": "", "filename": "top.bmp", "split": "test"}]}
    (tree / "dataset.json").write_text(json.dumps(doc), encoding="utf-8")
    assert rel(iter_paths([str(tree / "dataset.json")], split="test"), tree) == ["a/0.png", "top.bmp"]
    assert count_paths([str(tree / "dataset.json")]) == 3
    with pytest.raises(SourceError, match="no images in split 'val'.*splits: test, train"):
        list(iter_paths([str(tree / "dataset.json")], split="val"))


def test_file_uris_go_through_pyarrow_fs(tree):
    (tree / "list.txt").write_text("b/2.png\na/0.png\n", encoding="utf-8")
    uri = tree.resolve().as_uri()
    assert list(iter_paths([uri])) == [f"{uri}/top.bmp", f"{uri}/a/0.png", f"{uri}/a/z/3.webp",
                                       f"{uri}/b/1.JPG", f"{uri}/b/2.png"]
    assert list(iter_paths([f"{uri}/list.txt"])) == [f"{uri}/b/2.png", f"{uri}/a/0.png"]


@pytest.mark.parametrize("name, content, message", [
    ("list.csv", "id,file\n1,a.png\n", "no 'path' column"),
    ("list.csv", "path\n\n", "no images"),
    ("data.json", "{not json", "not valid JSON"),
    ("data.json", '{"x": 1}', "no 'images' list"),
    ("list.parquet", "not parquet", "not a readable Parquet"),
])
def test_bad_manifests_name_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(SourceError, match=message) as info:
        list(iter_paths([str(tmp_path / name)]))
    assert name in str(info.value)


def test_missing_manifest_and_empty_sources(tmp_path):
    with pytest.raises(SourceError, match="no such manifest"):
        list(iter_paths([str(tmp_path / "nope.txt")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        list(iter_paths([str(tmp_path / "empty")]))
    with pytest.raises(SourceError, match="no images"):
        list(iter_paths([str(tmp_path / "*.png")]))
