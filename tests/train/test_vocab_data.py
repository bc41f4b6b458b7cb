import json
import random
from collections import Counter

import pytest

from captrt.train.data import DatasetError, encode_padded, load_karpathy, sample_captions, select_split
from captrt.vocab import Vocab


def seed_word_map(data, min_word_freq):
    """The seed notebook's word-map code, verbatim in substance."""
    word_freq = Counter()
    for img in data["images"]:
        for c in img["sentences"]:
            word_freq.update(c["tokens"])
    words = [word for word in word_freq.keys() if word_freq[word] > min_word_freq]
    word2id = {word: id for id, word in enumerate(words, 1)}
    word2id["<unk>"] = len(word2id) + 1
    word2id["<start>"] = len(word2id) + 1
    word2id["<end>"] = len(word2id) + 1
    word2id["<pad>"] = 0
    return word2id


def karpathy(n=30, seed=0):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(40)]
    images = []
    for i in range(n):
        sents = [{"tokens": rng.choices(words, weights=range(1, 41), k=rng.randint(3, 9))} for _ in range(rng.randint(1, 7))]
        images.append({"filepath": "imgs", "filename": f"{i}.jpg", "split": ["train", "restval", "val", "test"][i % 4],
                       "sentences": sents})
    return {"images": images}


@pytest.mark.parametrize("min_freq", [0, 1, 5, 12])
def test_vocab_matches_seed_rule(min_freq):
    data = karpathy()
    ours = Vocab.build((s["tokens"] for img in data["images"] for s in img["sentences"]), min_freq)
    assert ours.word2id == seed_word_map(data, min_freq)


def test_vocab_encode_decode_and_json(tmp_path):
    v = Vocab.build([["a", "cat"]] * 6, min_word_freq=5)
    assert v.word2id == {"a": 1, "cat": 2, "<unk>": 3, "<start>": 4, "<end>": 5, "<pad>": 0}
    ids = v.encode(["a", "dog", "cat"])
    assert ids == [4, 1, 3, 2, 5]
    assert v.decode(ids + [0, 0]) == ["a", "<unk>", "cat"]
    path = tmp_path / "v.json"
    path.write_text(json.dumps(v.to_json()))
    assert Vocab.load(path) == v
    path.write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="v.json.*<pad>|v.json.*missing"):
        Vocab.load(path)


def test_karpathy_parsing_and_errors(tmp_path):
    data = karpathy(8)
    data["images"][0]["sentences"].append({"tokens": ["x"] * 101})  # over-long: dropped like the seed
    p = tmp_path / "d.json"
    p.write_text(json.dumps(data))
    entries = load_karpathy(p, tmp_path / "root")
    assert entries[0].path == tmp_path / "root" / "imgs" / "0.jpg"
    assert all(len(c) <= 100 for e in entries for c in e.captions)
    assert {e.split for e in select_split(entries, "train")} == {"train", "restval"}
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        select_split(entries, "dev")

    data["images"][3]["split"] = "holdout"
    p.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"images\[3\].*3.jpg.*unknown split 'holdout'"):
        load_karpathy(p)
    data["images"][3]["split"] = "val"
    data["images"][2]["sentences"] = [{"tokens": []}]
    p.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"images\[2\].*no usable caption"):
        load_karpathy(p)
    p.write_text("{not json")
    with pytest.raises(DatasetError, match="d.json"):
        load_karpathy(p)


def test_captions_per_image_and_padding():
    rng = random.Random(0)
    assert len(sample_captions([["a"]], rng)) == 5
    assert len(sample_captions([["a"]] * 7, rng)) == 5
    v = Vocab.build([["a", "b"]] * 6)
    ids, n = encode_padded(["a", "b"], v, max_len=5)
    assert n == 4 and len(ids) == 7 and ids[4:] == [0, 0, 0]
