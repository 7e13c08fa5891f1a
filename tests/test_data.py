"""The data pipeline: reading, exact and MinHash dedup, byte-level BPE, packing, caching, batches.

Corpora are small synthetic ones written to tmp_path (random pseudo-words, so two documents share
no 5-word shingle unless one is made from the other); one test reads a slice of the real stdlib.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import opt_core.data as data
from opt_core.data import BatchIterator, DataConfig, PreparedData, TokenSplit, load_tokenizer, prepare

TINY_VOCAB = 320  # 4 specials + 256 bytes + 60 merges: trains in milliseconds
DATA_PY = Path(data.__file__)


def _lexicon(seed: int = 0, size: int = 400) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(size)]


def _doc(seed: int, words: int = 300) -> str:
    rng = random.Random(seed)
    lexicon = _lexicon()
    out = []
    for i in range(words):
        out.append(rng.choice(lexicon))
        out.append("\n" if i % 17 == 16 else " ")
    return "".join(out).rstrip() + "\n"


def _change_words(text: str, positions, seed: int = 99) -> str:
    parts = re.split(r"(\s+)", text)  # words at even indices, the whitespace between them kept
    for p in positions:
        parts[2 * p] = f"changed{seed}x{p}"
    return "".join(parts)


def _true_jaccard(a: str, b: str) -> float:
    def shingles(t):
        w = t.lower().split()
        return {tuple(w[i:i + data.SHINGLE_WORDS]) for i in range(len(w) - data.SHINGLE_WORDS + 1)}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def _write_folder(root: Path, docs: dict[str, str]) -> Path:
    for rel, text in docs.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def _corpus_docs(n: int = 24) -> dict[str, str]:
    """n distinct documents, plus an exact copy, a near copy, an empty file and files that must be ignored."""
    docs = {f"d{i:02d}.txt": _doc(i, words=120 + 7 * i) for i in range(n)}
    docs["sub/copy.md"] = docs["d03.txt"]
    docs["sub/near.rst"] = _change_words(docs["d05.txt"], [10, 60, 110])
    docs["sub/empty.txt"] = "  \n"
    docs["ignored.bin"] = _doc(500)
    docs[".hidden/secret.txt"] = _doc(501)
    return docs


def _gpt2_files(folder: Path, *, opt_layout: bool = False) -> Path:
    """A tiny but valid GPT-2 style pair: the 256 byte symbols, three merges that spell 'Ġthe',
    and <|endoftext|>.  opt_layout puts the four specials first, as metaseq's OPT vocab does."""
    from tokenizers import pre_tokenizers

    tokens = list(data.SPECIAL_TOKENS) if opt_layout else []
    tokens += sorted(pre_tokenizers.ByteLevel.alphabet()) + ["Ġt", "he", "Ġthe", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\nĠ t\nh e\nĠt he\n", encoding="utf-8")
    return folder


def _split_docs(prepared: PreparedData, split: str) -> list[tuple[str, np.ndarray]]:
    """(name, tokens incl. EOS) of every document of a split, cut from the packed stream by documents.json."""
    tokens = getattr(prepared, split).tokens
    return [(name, np.asarray(tokens[start:start + count])) for name, start, count in prepared.documents()[split]]


# --------------------------------------------------------------------------- dedup


def test_exact_dedup_keeps_first_occurrence():
    keep, dropped = data.exact_dedup(["a b", "c d", "a b", "e", "c d", "a b "])
    assert keep == [0, 1, 3, 5]
    assert dropped == [(2, 0), (4, 1)]


def test_near_dedup_drops_near_copy_keeps_different():
    base = _doc(1)
    near = _change_words(base, [20, 150, 280])  # 3 words of 300 changed
    other = _doc(2)
    half = _change_words(base, range(0, 300, 3))  # every third word changed: far below the threshold
    texts = [base, other, near, half]
    assert _true_jaccard(base, near) > 0.85 and _true_jaccard(base, half) < 0.2

    keep, dropped = data.near_dedup(texts, threshold=0.8)
    assert keep == [0, 1, 3]
    assert [(d, k) for d, k, _ in dropped] == [(2, 0)]
    assert dropped[0][2] >= 0.8

    # The later document of the pair goes, whichever it is.
    keep, dropped = data.near_dedup([near, other, base], threshold=0.8)
    assert keep == [0, 1] and [(d, k) for d, k, _ in dropped] == [(2, 0)]

    # A threshold above the pair's similarity keeps both.
    keep, _ = data.near_dedup(texts, threshold=0.99)
    assert keep == [0, 1, 2, 3]


def test_minhash_estimates_jaccard():
    base = _doc(3, words=600)
    for changed, seed in ((range(0, 600, 12), 1), (range(0, 600, 25), 2), (range(5, 600, 60), 3)):
        other = _change_words(base, changed, seed)
        sig = data.minhash_signatures([base, other])
        estimate = float(np.mean(sig[0] == sig[1]))
        # 128 permutations: standard error <= 0.045; 0.15 is more than 3 of them.
        assert abs(estimate - _true_jaccard(base, other)) < 0.15, (estimate, _true_jaccard(base, other))
    sig = data.minhash_signatures([base, _doc(4, words=600)])
    assert np.mean(sig[0] == sig[1]) < 0.05


def test_minhash_signature_depends_only_on_its_document():
    """Shingles must not run across document boundaries, nor depend on where the corpus-wide
    computation cuts its slices (the 3000-word document straddles a slice boundary)."""
    long_doc, short_doc, tiny_doc = _doc(5, words=3000), _doc(6, words=1500), "just three words"
    alone = [data.minhash_signatures([t])[0] for t in (long_doc, short_doc, tiny_doc)]
    for texts, where in (([short_doc, long_doc, tiny_doc], (1, 0, 2)), ([tiny_doc, short_doc, long_doc], (2, 1, 0))):
        together = data.minhash_signatures(texts)
        for row, i in enumerate(where):
            assert np.array_equal(together[row], alone[i])


def test_lsh_banding_catches_pairs_at_the_threshold():
    assert data.lsh_banding(0.8) == (32, 4)
    assert data.lsh_banding(0.95) == (16, 8)
    for t in (0.5, 0.8, 0.9, 0.95):
        bands, rows = data.lsh_banding(t)
        assert bands * rows == data.NUM_PERM
        assert 1 - (1 - t ** rows) ** bands >= 0.999


def test_minhash_is_the_same_in_other_processes():
    """Signatures must not depend on Python's per-process string hash salt (PYTHONHASHSEED).  The module
    is loaded from its file, so the child does not pay for importing the kernels package."""
    texts = [_doc(7, words=80), "short text", _doc(8, words=40)]
    ours = data.minhash_signatures(texts)
    script = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('data_copy', {str(DATA_PY)!r})\n"
        "m = sys.modules['data_copy'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(json.dumps(m.minhash_signatures(json.loads(sys.stdin.read())).tolist()))\n"
    )
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", script], input=json.dumps(texts), env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert np.array_equal(np.array(json.loads(out.stdout), dtype=np.uint32), ours)


# --------------------------------------------------------------------------- tokenizer


ROUND_TRIP_TEXTS = [
    "def f(x):\n\treturn x  # tab, two spaces\n",
    "naïve café — Zürich, 東京, Ελληνικά, emoji 🤖🚀, combining é\r\n",
    "  leading and trailing spaces  \n\n\n",
    "a literal </s> and <s> and <pad> are text, not special tokens",
    "\x01\x7f control bytes \u200b zero-width",
]


def test_byte_level_bpe_round_trip(tmp_path):
    tok = data.train_tokenizer([_doc(i) for i in range(5)] + ROUND_TRIP_TEXTS, TINY_VOCAB)
    assert [tok.id_to_token(i) for i in range(4)] == list(data.SPECIAL_TOKENS)
    assert tok.get_vocab_size() == TINY_VOCAB
    tok.save(str(tmp_path / "tokenizer.json"))
    for t in (tok, load_tokenizer(tmp_path / "tokenizer.json"), load_tokenizer(tmp_path)):
        for text in ROUND_TRIP_TEXTS + ["never seen: ŋ ∑ 𝔘"]:
            ids = t.encode(text, add_special_tokens=False).ids
            assert t.decode(ids) == text
            assert not set(ids) & {0, 1, 2, 3}, "special tokens must never come from text"


def test_gpt2_files_given_by_path(tmp_path):
    tok = load_tokenizer(_gpt2_files(tmp_path / "gpt2"))
    # Plain GPT-2 ids shifted by 4 under OPT's specials.
    assert [tok.id_to_token(i) for i in range(5)] == [*data.SPECIAL_TOKENS, tok.id_to_token(4)]
    assert tok.get_vocab_size() == 4 + 256 + 4
    assert tok.token_to_id("Ġthe") == 4 + 256 + 2 and tok.token_to_id("<|endoftext|>") == 4 + 256 + 3
    assert tok.encode(" the", add_special_tokens=False).ids == [tok.token_to_id("Ġthe")]
    for text in ROUND_TRIP_TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text

    # OPT's own files already have the specials at 0-3: their ids are kept.
    opt = load_tokenizer(_gpt2_files(tmp_path / "opt", opt_layout=True))
    assert opt.get_vocab_size() == 4 + 256 + 4 and opt.token_to_id("Ġthe") == 4 + 256 + 2

    # End to end: the packed stream uses these ids and EOS 2.
    corpus = _write_folder(tmp_path / "corpus", {f"{i}.txt": f" the doc {i} " + _doc(i, 50) for i in range(6)})
    prepared = prepare(DataConfig(source=str(corpus), tokenizer=str(tmp_path / "gpt2"), val_fraction=0.2),
                       tmp_path / "cache", log=None)
    assert prepared.vocab_size == 264 and prepared.padded_vocab_size == 264 and prepared.eos_id == 2
    for name, ids in _split_docs(prepared, "train"):
        assert ids[-1] == 2 and ids[0] == tok.token_to_id("Ġthe")


def test_gpt2_files_with_misplaced_specials_are_refused(tmp_path):
    folder = _gpt2_files(tmp_path / "bad")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    vocab["</s>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match="0-3"):
        load_tokenizer(folder)


# --------------------------------------------------------------------------- prepare


def test_prepare_folder_dedups_splits_and_packs(tmp_path):
    docs = _corpus_docs()
    corpus = _write_folder(tmp_path / "corpus", docs)
    cfg = DataConfig(source=str(corpus), vocab_size=TINY_VOCAB, val_fraction=0.2, seed=3)
    prepared = prepare(cfg, tmp_path / "cache", log=None)
    stats = prepared.stats

    assert stats["documents_read"] == 26 and stats["skipped_empty"] == 1  # 24 + copy + near; not .bin/.hidden
    assert stats["exact_duplicates_removed"] == 1 and stats["near_duplicates_removed"] == 1
    found = prepared.documents()
    assert found["exact_duplicates"] == [["sub/copy.md", "d03.txt"]]
    assert [pair[:2] for pair in found["near_duplicates"]] == [["sub/near.rst", "d05.txt"]]

    train, val = _split_docs(prepared, "train"), _split_docs(prepared, "val")
    train_names, val_names = [n for n, _ in train], [n for n, _ in val]
    assert len(val_names) == round(0.2 * 24) and len(train_names) == 24 - len(val_names)
    assert not set(train_names) & set(val_names)
    assert sorted(train_names + val_names) == sorted(f"d{i:02d}.txt" for i in range(24))
    assert train_names == sorted(train_names)  # reading order kept within a split

    # Packed stream: every document is its text's tokens then exactly one EOS, back to back.
    tok = prepared.tokenizer()
    for split, pieces in (("train", train), ("val", val)):
        assert sum(len(ids) for _, ids in pieces) == len(getattr(prepared, split)) == stats[f"{split}_tokens"]
        for name, ids in pieces:
            assert ids[-1] == prepared.eos_id == 2 and (ids[:-1] != 2).all()
            assert tok.decode(ids[:-1].tolist()) == docs[name]
    assert prepared.train.dtype == np.uint16 and prepared.vocab_size == TINY_VOCAB
    assert prepared.padded_vocab_size % 8 == 0 and prepared.pad_id == 1

    # Deterministic: the same config elsewhere gives the same bytes; another seed another split.
    again = prepare(cfg, tmp_path / "cache2", log=None)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (again.path / name).read_bytes() == (prepared.path / name).read_bytes()
    other = prepare(DataConfig(source=str(corpus), vocab_size=TINY_VOCAB, val_fraction=0.2, seed=4),
                    tmp_path / "cache", log=None)
    assert [n for n, _, _ in other.documents()["val"]] != val_names


def test_prepare_is_cached(tmp_path, monkeypatch):
    corpus = _write_folder(tmp_path / "corpus", {f"{i}.txt": _doc(i) for i in range(8)})
    cfg = DataConfig(source=str(corpus), vocab_size=TINY_VOCAB, val_fraction=0.25)
    first = prepare(cfg, tmp_path / "cache", log=None)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a cached prepare() rebuilt the data")

    monkeypatch.setattr(data, "_build", no_rebuild)
    start = time.perf_counter()
    second = prepare(cfg, tmp_path / "cache", log=None)
    assert time.perf_counter() - start < 1.0
    assert second.path == first.path and second.stats == first.stats
    assert np.array_equal(second.train.tokens, first.train.tokens)
    assert np.array_equal(second.val.tokens, first.val.tokens)

    # An edited corpus file is new input: not served from the old cache.
    (corpus / "0.txt").write_text(_doc(100), encoding="utf-8")
    assert data.cache_folder(cfg, tmp_path / "cache") != first.path


def test_prepare_is_atomic(tmp_path, monkeypatch):
    corpus = _write_folder(tmp_path / "corpus", {f"{i}.txt": _doc(i) for i in range(6)})
    cfg = DataConfig(source=str(corpus), vocab_size=TINY_VOCAB, val_fraction=0.3)
    cache = tmp_path / "cache"
    final = data.cache_folder(cfg, cache)

    def crash(*args, **kwargs):
        raise OSError("simulated crash at the final rename")

    monkeypatch.setattr(data.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        prepare(cfg, cache, log=None)
    monkeypatch.undo()
    assert not final.exists() and list(cache.iterdir()) == []  # nothing that looks done, no debris

    # A crash half-way through writing the tokens.
    real_write = data._write_tokens
    calls = []

    def crash_on_second_split(tok, texts, path, dtype, **kw):
        calls.append(path.name)
        if len(calls) == 2:
            path.write_bytes(b"\0\0")  # a partial file, then the crash
            raise KeyboardInterrupt
        return real_write(tok, texts, path, dtype, **kw)

    monkeypatch.setattr(data, "_write_tokens", crash_on_second_split)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, cache, log=None)
    monkeypatch.undo()
    assert not final.exists() and list(cache.iterdir()) == []

    # A folder with the final name but not complete (damaged by hand) is rebuilt, not trusted.
    final.mkdir()
    (final / "train.bin").write_bytes(b"\0\0")
    prepared = prepare(cfg, cache, log=None)
    assert prepared.path == final and data._is_complete(final)
    assert len(prepared.train) == prepared.stats["train_tokens"] > 0


def test_jsonl_source(tmp_path):
    records = [{"content": _doc(i, 60), "id": i} for i in range(6)]
    lines = [json.dumps(r) for r in records]
    lines.insert(3, "")  # blank lines are skipped
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepared = prepare(DataConfig(source=str(path), jsonl_field="content", vocab_size=TINY_VOCAB,
                                  val_fraction=0.2), tmp_path / "cache", log=None)
    assert prepared.stats["documents_read"] == 6
    tok = prepared.tokenizer()
    texts = {f"corpus.jsonl:{n}": r["content"] for n, r in zip([1, 2, 3, 5, 6, 7], records)}
    pieces = _split_docs(prepared, "train") + _split_docs(prepared, "val")
    assert sorted(name for name, _ in pieces) == sorted(texts)
    for name, ids in pieces:
        assert tok.decode(ids[:-1].tolist()) == texts[name] and ids[-1] == 2


def test_max_bytes_caps_the_corpus(tmp_path):
    docs = {f"{i}.txt": _doc(i, 100) for i in range(5)}
    corpus = _write_folder(tmp_path / "corpus", docs)
    cap = len(docs["0.txt"].encode()) + len(docs["1.txt"].encode()) + 100
    read = data.read_corpus(DataConfig(source=str(corpus), max_bytes=cap))
    assert read.names == ["0.txt", "1.txt", "2.txt"] and read.bytes_read == cap and read.truncated
    assert read.texts[:2] == [docs["0.txt"], docs["1.txt"]] and read.texts[2] == docs["2.txt"][:100]
    assert data.read_corpus(DataConfig(source=str(corpus), max_bytes=0)).bytes_read == sum(
        len(t.encode()) for t in docs.values())


def test_stdlib_source():
    cfg = DataConfig(max_bytes=300_000)
    kind, root = data._resolve_source(cfg)
    listing = data._source_files(kind, root, cfg)
    assert "os.py" in listing and "json/decoder.py" in listing and len(set(listing)) == len(listing)
    assert listing == data._source_files(kind, root, cfg)  # a fixed order
    # A byte cap samples the library instead of its alphabetical head (the codec tables).
    assert len({rel.split("/")[0] for rel in listing[:50]}) > 20
    for rel in listing:
        assert not {"site-packages", "test", "tests", "idle_test", "encodings"} & set(rel.split("/")[:-1]), rel
    read = data.read_corpus(cfg)
    assert read.bytes_read == 300_000 and read.names == listing[: len(read.names)]
    assert read.texts[0] == (root / read.names[0]).read_text(encoding="utf-8")


# --------------------------------------------------------------------------- batches


def _numbered_split(tmp_path, num_tokens: int) -> TokenSplit:
    path = tmp_path / "tokens.bin"
    np.arange(num_tokens, dtype=np.uint16).tofile(path)
    return TokenSplit(path, "uint16")


def test_token_split_sequences(tmp_path):
    split = _numbered_split(tmp_path, 47)
    assert len(split) == 47 and split.num_sequences(8) == 5 and split.num_sequences(46) == 1
    seq = split.sequence(3, 8)
    assert seq.dtype == torch.int64 and seq.tolist() == list(range(27, 36))
    with pytest.raises(IndexError):
        split.sequence(5, 8)


def test_batch_iterator_visits_every_block_once_per_epoch(tmp_path):
    split = _numbered_split(tmp_path, 10 * 9 + 4)  # 10 blocks of 9 tokens, a 4-token tail never used
    it = BatchIterator(split, batch_size=3, seq_len=8, seed=5)
    batches = [next(it) for _ in range(10)]  # 30 blocks: exactly 3 epochs
    for b in batches:
        assert b.shape == (3, 9) and b.dtype == torch.int64
        assert (b[:, 1:] - b[:, :-1] == 1).all() and (b[:, 0] % 9 == 0).all()  # whole, aligned blocks
    order = torch.cat(batches)[:, 0].div(9, rounding_mode="floor").tolist()
    epochs = [order[i:i + 10] for i in range(0, 30, 10)]
    for e in epochs:
        assert sorted(e) == list(range(10))
    assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch
    assert it.state_dict()["epoch"] == 3 and it.state_dict()["index"] == 0

    # Same seed, same stream; no shuffle: block order.
    again = BatchIterator(split, batch_size=3, seq_len=8, seed=5)
    assert all(torch.equal(next(again), b) for b in batches)
    plain = BatchIterator(split, batch_size=4, seq_len=8, seed=5, shuffle=False)
    assert next(plain)[:, 0].tolist() == [0, 9, 18, 27]


@pytest.mark.parametrize("k", [3, 4, 7])
def test_batch_iterator_resumes_exactly(tmp_path, k):
    split = _numbered_split(tmp_path, 10 * 9)
    reference = BatchIterator(split, batch_size=3, seq_len=8, seed=11)
    expected = [next(reference) for _ in range(k + 8)]

    first = BatchIterator(split, batch_size=3, seq_len=8, seed=11)
    for _ in range(k):  # k = 4 and 7 end past an epoch boundary (10 blocks per epoch)
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # plain Python values survive a checkpoint
    resumed = BatchIterator(split, batch_size=3, seq_len=8, seed=11)
    resumed.load_state_dict(state)
    for b in expected[k:]:
        assert torch.equal(next(resumed), b)

    with pytest.raises(ValueError, match="seed"):
        BatchIterator(split, batch_size=3, seq_len=8, seed=12).load_state_dict(state)


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_clear_errors(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        prepare(DataConfig(source=str(missing)), tmp_path / "cache", log=None)

    empty = _write_folder(tmp_path / "empty", {"blank.txt": "\n\n", "data.bin": "not text"})
    with pytest.raises(ValueError, match="empty corpus"):
        prepare(DataConfig(source=str(empty)), tmp_path / "cache", log=None)

    single = _write_folder(tmp_path / "single", {"only.txt": _doc(1)})
    with pytest.raises(ValueError, match="cannot split 1 document"):
        prepare(DataConfig(source=str(single)), tmp_path / "cache", log=None)

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"body": "b"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"c.jsonl:2: record has no field 'text'"):
        prepare(DataConfig(source=str(jsonl)), tmp_path / "cache", log=None)

    other = tmp_path / "c.csv"
    other.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a .jsonl file"):
        prepare(DataConfig(source=str(other)), tmp_path / "cache", log=None)

    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            DataConfig(val_fraction=bad)
    with pytest.raises(ValueError, match="vocab_size"):
        DataConfig(vocab_size=100)

    tokenizer_folder = _gpt2_files(tmp_path / "tok")
    (tokenizer_folder / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        prepare(DataConfig(source=str(single), tokenizer=str(tokenizer_folder)), tmp_path / "cache", log=None)

    split = _numbered_split(tmp_path, 20)
    with pytest.raises(ValueError, match="seq_len=20 is too long"):
        BatchIterator(split, batch_size=2, seq_len=20, seed=0)
    with pytest.raises(ValueError, match="seq_len"):
        BatchIterator(split, batch_size=2, seq_len=0, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        BatchIterator(split, batch_size=0, seq_len=4, seed=0)


def test_undecodable_bytes_are_replaced_and_the_file_named(tmp_path):
    """A file with a few invalid UTF-8 bytes is read with U+FFFD in their place and named in a warning:
    alone in its folder it is still a corpus (it used to read as "no non-empty files"), and in a mixed
    folder it is kept, not dropped without a word.  NUL bytes still mark a binary file, skipped."""
    lone = tmp_path / "lone"
    lone.mkdir()
    bad = _doc(7).encode() + b"caf\xe9 \xff\xfe end\n"
    (lone / "latin.txt").write_bytes(bad)
    with pytest.warns(UserWarning, match=r"latin\.txt: not valid UTF-8 .*replaced by U\+FFFD"):
        corpus = data.read_corpus(DataConfig(source=str(lone)))
    assert corpus.names == ["latin.txt"] and corpus.undecodable_replaced == 1
    assert corpus.texts[0] == bad.decode("utf-8", errors="replace") and "\ufffd" in corpus.texts[0]

    mixed = _write_folder(tmp_path / "mixed", {f"{i}.txt": _doc(i) for i in range(5)})
    (mixed / "2.txt").write_bytes(bad)
    (mixed / "blob.txt").write_bytes(b"\x00\x01binary")
    with pytest.warns(UserWarning, match=r"2\.txt: not valid UTF-8"):
        prepared = prepare(DataConfig(source=str(mixed), vocab_size=TINY_VOCAB, val_fraction=0.2),
                           tmp_path / "cache", log=None)
    assert prepared.stats["documents_read"] == 5 and prepared.stats["undecodable_replaced"] == 1
    assert prepared.stats["skipped_binary"] == 1

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(json.dumps({"text": _doc(1, 40)}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.warns(UserWarning, match=r"c\.jsonl:2: not valid UTF-8"):
        corpus = data.read_corpus(DataConfig(source=str(jsonl)))
    assert corpus.texts[1] == "caf\ufffd"


def test_wait_for_prepared_returns_once_another_process_built_it(tmp_path):
    corpus = _write_folder(tmp_path / "corpus", {f"{i}.txt": _doc(i) for i in range(6)})
    cfg = DataConfig(source=str(corpus), vocab_size=TINY_VOCAB, val_fraction=0.2)
    builder = subprocess.Popen([sys.executable, "-c", "import sys, opt_core.data as d; "
                                f"d.prepare(d.DataConfig(source={str(corpus)!r}, vocab_size={TINY_VOCAB}, "
                                f"val_fraction=0.2), {str(tmp_path / 'cache')!r}, log=None)"])
    try:
        waited = data.wait_for_prepared(cfg, tmp_path / "cache", poll_seconds=0.05)
    finally:
        builder.wait(timeout=120)
    assert builder.returncode == 0
    assert waited.path == data.cache_folder(cfg, tmp_path / "cache") and len(waited.train) > 0
