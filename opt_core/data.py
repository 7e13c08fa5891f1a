"""The data pipeline: corpus -> exact and MinHash dedup -> byte-level BPE -> packed token memmaps.

``prepare(DataConfig(...), cache_dir)`` reads a corpus, removes exact and
near-duplicate documents, splits the documents into train and validation,
tokenises them with a byte-level BPE (EOS after every document) and writes
``train.bin`` / ``val.bin`` (flat token streams), ``tokenizer.json``,
``documents.json`` and ``meta.json`` into ``cache_dir/<source>-<key>/``.
``BatchIterator`` draws (batch, seq_len + 1) blocks from a split in an order
fixed by (seed, epoch), and resumes exactly from its ``state_dict()``.

Design record (newest last):
2026-11-29  Sources: "stdlib" (this Python's own ``.py``/``.rst``/``.txt``
            files, no download), a folder of text files, or a JSONL file.
            Folder files are read in sorted relative-path order, stdlib files
            in the order of a stable hash of their path (so a byte cap samples
            the whole library), one document each;
            the text is capped at ``max_bytes`` UTF-8 bytes by cutting the last
            document (so even a cap smaller than the first file gives data).
            Files that are not UTF-8 are skipped and counted, not guessed at.
2026-11-29  Exact dedup on the blake2b digest of the document's bytes; the
            first occurrence in reading order is kept.
2026-11-29  Near dedup (the paper's MinhashLSH; their parameters are not
            published): shingles are 5-word windows of the lower-cased,
            whitespace-split text (a word hash is zlib.crc32, combined by a
            polynomial over uint64 -- never Python's salted ``hash()``, so the
            result is the same in every process); 128 permutations
            ``(a*x + b) mod (2**31 - 1)`` with (a, b) from a fixed seed, in
            uint64 without overflow because a, b, x < 2**31.  LSH banding picks
            the most selective rows-per-band that still makes a pair AT the
            threshold a candidate with probability >= 0.999 (threshold 0.8:
            32 bands x 4 rows; 0.95: 16 x 8).  Every candidate is verified on
            all 128 values; a document whose estimated Jaccard with an
            earlier KEPT document is >= threshold is dropped (comparing only
            with kept documents means a chain a~b~c cannot drop c because of
            a dropped b).  Default threshold 0.8: with 5-word shingles one
            changed word in 50 gives J ~ 0.82; the paper's 0.95 is available.
2026-11-29  Split by document, before tokenisation: a permutation from the
            seed holds out round(val_fraction * n) documents (at least one);
            documents keep their reading order within each split.  The BPE is
            trained on the training documents only.
2026-11-29  Tokenizer: byte-level BPE from the ``tokenizers`` library, no
            normaliser (``decode(encode(t)) == t`` for any text), the 256 byte
            symbols always in the vocabulary (no ``<unk>`` ever needed).  OPT's
            special-token layout: 0 ``<s>``, 1 ``<pad>``, 2 ``</s>`` (EOS), 3
            ``<unk>``.  ``encode_special_tokens`` is on, so a literal "</s>" in
            a document is ordinary text and never a fake EOS.
            GPT-2 ``vocab.json``/``merges.txt``: if the vocabulary already
            holds the four specials at 0-3 (metaseq's and Hugging Face's OPT
            files do, in fairseq's frequency order) its ids are used as they
            are; a plain GPT-2 vocabulary (no specials) has every id shifted
            by +4 and the specials put at 0-3, so EOS is 2 either way and
            GPT-2's ``<|endoftext|>`` is an ordinary special token (50260).
2026-11-29  Packing: each split is one flat stream, EOS (id 2) after every
            document, no BOS (as metaseq trains); uint16 when the vocabulary
            fits, else uint32.  A training example is a non-overlapping block
            of seq_len + 1 tokens (input block[:-1], target block[1:]); the
            tail shorter than a block is not used.
2026-11-29  Cache: the folder name hashes the config, a format version and a
            fingerprint of the inputs (relative path, size and mtime of every
            candidate file; content hash of tokenizer files), so edited data
            is never served from a stale cache.  The folder is built under a
            temporary name and appears with one ``os.replace``: a folder with
            the final name is always complete.  A losing concurrent builder
            drops its copy and uses the winner's.
2026-11-29  Batch order: numpy's legacy ``RandomState`` permutations (their
            stream is frozen by numpy's compatibility policy; ``Generator``'s
            is not), seeded from a blake2b hash of (seed, epoch), so a resumed
            run on another machine or numpy version draws the same batches.
            Epochs are concatenated: a batch may straddle two epochs, which
            keeps "every block exactly once per epoch" for any batch size.
2026-12-01  Undecodable bytes (format 2): a file or JSONL line that is not valid
            UTF-8 is read with its bad bytes replaced by U+FFFD and named in a
            warning, instead of being skipped (a folder whose only file had a
            few bad bytes read as "no non-empty files"); ``undecodable_replaced``
            counts them.  Files holding NUL bytes are binary and still skipped
            (``skipped_binary``).
2026-12-01  Distributed runs: ``wait_for_prepared`` lets every process but one
            per node wait for that one's build (polling the cache folder)
            instead of sitting in a collective with a time limit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

FORMAT_VERSION = 2

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # OPT/fairseq ids 0, 1, 2, 3
BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# Suffixes read from a folder source; the stdlib source reads .py, .rst and .txt.
TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cpp",
                 ".js", ".ts", ".java", ".go", ".rs", ".sh", ".html", ".htm")
_STDLIB_SUFFIXES = (".py", ".rst", ".txt")
# idle_test holds IDLE's test data; test/tests are CPython's test suite (not library source).
# Tests, installed packages, and encodings/: a third of the library's bytes are
# its generated codec tables (cp*.py), data rather than source or docs.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                               "encodings"})

# MinHash parameters (see the design record).
NUM_PERM = 128
SHINGLE_WORDS = 5
_PRIME = (1 << 31) - 1
_SHINGLE_MULT = np.uint64(0x100000001B3)  # odd 64-bit multiplier of the word-hash polynomial
_HASH_FAMILY_SEED = 20220502  # fixed: dedup must not depend on the run's seed
_LSH_RECALL = 0.999
_MINHASH_CHUNK = 2048  # shingles per (chunk x NUM_PERM) uint64 slice: 2 MiB; measured faster than 8k or 32k


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"  # "stdlib", a folder of text files (recursive) or a .jsonl file
    jsonl_field: str = "text"
    max_bytes: int = 4_000_000  # cap on the UTF-8 bytes of text read; 0 = no cap
    tokenizer: Optional[str] = None  # None: train a BPE; else a folder with vocab.json + merges.txt
    vocab_size: int = 8192  # for a trained BPE, the 4 special tokens included
    val_fraction: float = 0.05  # fraction of documents held out
    minhash_threshold: float = 0.8  # estimated Jaccard at or above which a near-duplicate is dropped
    seed: int = 0
    suffixes: tuple[str, ...] = TEXT_SUFFIXES  # which files a folder source reads

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"DataConfig.source must be 'stdlib' or a path, got {self.source!r}")
        if not isinstance(self.jsonl_field, str) or not self.jsonl_field:
            raise ValueError(f"DataConfig.jsonl_field must be a non-empty string, got {self.jsonl_field!r}")
        if not isinstance(self.max_bytes, int) or self.max_bytes < 0:
            raise ValueError(f"DataConfig.max_bytes must be an int >= 0 (0 = no cap), got {self.max_bytes!r}")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 4 + 256:
            raise ValueError("DataConfig.vocab_size must be an int >= 260 (4 specials + 256 byte symbols), "
                             f"got {self.vocab_size!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"DataConfig.val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if not 0.0 < self.minhash_threshold <= 1.0:
            raise ValueError(f"DataConfig.minhash_threshold must be in (0, 1], got {self.minhash_threshold!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"DataConfig.seed must be an int, got {self.seed!r}")
        if not self.suffixes or not all(isinstance(s, str) and s.startswith(".") for s in self.suffixes):
            raise ValueError(f"DataConfig.suffixes must be file suffixes like '.txt', got {self.suffixes!r}")


def _derived_seed(*parts) -> int:
    """A 32-bit seed from any JSON-able parts, the same in every process and on every machine."""
    digest = hashlib.blake2b(json.dumps(parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


# --------------------------------------------------------------------------- reading


@dataclass
class Corpus:
    names: list[str]  # where each document came from (relative path, or file:line for JSONL)
    texts: list[str]
    bytes_read: int = 0
    skipped_empty: int = 0
    skipped_binary: int = 0
    undecodable_replaced: int = 0  # documents read with their invalid UTF-8 bytes replaced by U+FFFD
    truncated: bool = False


def _resolve_source(cfg: DataConfig) -> tuple[str, Path]:
    """("stdlib" | "folder" | "jsonl", path), or a clear error for anything else."""
    if cfg.source == "stdlib":
        return "stdlib", Path(sysconfig.get_paths()["stdlib"])
    path = Path(cfg.source).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"data source {cfg.source!r} does not exist "
                                "(expected 'stdlib', a folder of text files or a .jsonl file)")
    if path.is_dir():
        return "folder", path
    if path.suffix == ".jsonl":
        return "jsonl", path
    raise ValueError(f"data source {cfg.source!r} is a file but not a .jsonl file "
                     "(expected 'stdlib', a folder of text files or a .jsonl file)")


def _list_files(root: Path, suffixes: Sequence[str], skip_dirs: frozenset) -> list[str]:
    """Relative POSIX paths of the matching files under root, sorted, so the order (and so the
    documents a byte cap keeps) is the same on every machine and file system."""
    found = []
    for folder, dirs, files in os.walk(root):
        # Hidden folders (.git, .venv) are never corpus text.
        dirs[:] = [d for d in dirs if d not in skip_dirs and not d.startswith(".")]
        for name in files:
            if name.endswith(tuple(suffixes)) and not name.startswith("."):
                found.append(Path(folder, name).relative_to(root).as_posix())
    return sorted(found)


def _source_files(kind: str, root: Path, cfg: DataConfig) -> list[str]:
    if kind == "stdlib":
        # Alphabetical order would spend a byte cap on a few packages (the first
        # 4 MB are mostly encodings/cp*.py codec tables); a stable hash of the
        # path gives a capped read that samples the whole library, the same
        # sample on every machine with this Python.
        files = _list_files(root, _STDLIB_SUFFIXES, _STDLIB_SKIP_DIRS)
        return sorted(files, key=lambda rel: hashlib.blake2b(rel.encode(), digest_size=8).digest())
    return _list_files(root, cfg.suffixes, frozenset({"__pycache__"}))


def _add_document(corpus: Corpus, name: str, text: str, max_bytes: int) -> bool:
    """Append one document, cut to what is left of the byte cap; False once the cap is reached."""
    data = text.encode("utf-8")
    if max_bytes and corpus.bytes_read + len(data) > max_bytes:
        # "ignore" only drops a multi-byte character split by the cut.
        data = data[: max_bytes - corpus.bytes_read]
        text = data.decode("utf-8", errors="ignore")
        corpus.truncated = True
    if text.strip():
        corpus.names.append(name)
        corpus.texts.append(text)
        corpus.bytes_read += len(data)
    else:
        corpus.skipped_empty += 1
    return not (max_bytes and (corpus.truncated or corpus.bytes_read >= max_bytes))


def _decode(corpus: Corpus, data: bytes, where: str) -> str:
    """``data`` as UTF-8; invalid bytes become U+FFFD, with a warning naming ``where``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        corpus.undecodable_replaced += 1
        warnings.warn(f"{where}: not valid UTF-8 (first bad byte at offset {err.start}); reading it with the "
                      "invalid bytes replaced by U+FFFD", stacklevel=3)
        return data.decode("utf-8", errors="replace")


def _read_files(root: Path, relpaths: Iterable[str], max_bytes: int) -> Corpus:
    corpus = Corpus([], [])
    for rel in relpaths:
        data = (root / rel).read_bytes()
        if b"\x00" in data:  # binary data, not text
            corpus.skipped_binary += 1
            continue
        if not _add_document(corpus, rel, _decode(corpus, data, str(root / rel)), max_bytes):
            break
    return corpus


def _read_jsonl(path: Path, key: str, max_bytes: int) -> Corpus:
    corpus = Corpus([], [])
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            line = _decode(corpus, raw, f"{path}:{line_no}")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or key not in record:
                raise ValueError(f"{path}:{line_no}: record has no field {key!r} "
                                 "(set DataConfig.jsonl_field to the field that holds the text)")
            if not isinstance(record[key], str):
                raise ValueError(f"{path}:{line_no}: field {key!r} is {type(record[key]).__name__}, "
                                 "expected a string")
            if not _add_document(corpus, f"{path.name}:{line_no}", record[key], max_bytes):
                break
    return corpus


def read_corpus(cfg: DataConfig) -> Corpus:
    """The documents of cfg.source, in a fixed order, capped at cfg.max_bytes."""
    kind, path = _resolve_source(cfg)
    if kind == "jsonl":
        corpus = _read_jsonl(path, cfg.jsonl_field, cfg.max_bytes)
    else:
        corpus = _read_files(path, _source_files(kind, path, cfg), cfg.max_bytes)
    if not corpus.texts:
        what = f"files with suffixes {', '.join(cfg.suffixes)}" if kind == "folder" else "documents"
        raise ValueError(f"empty corpus: data source {cfg.source!r} has no non-empty {what}")
    return corpus


# --------------------------------------------------------------------------- dedup


def exact_dedup(texts: Sequence[str]) -> tuple[list[int], list[tuple[int, int]]]:
    """(indices kept, [(dropped, kept twin)]): the first of identical documents survives."""
    first: dict[bytes, int] = {}
    keep, dropped = [], []
    for i, text in enumerate(texts):
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in first:
            dropped.append((i, first[digest]))
        else:
            first[digest] = i
            keep.append(i)
    return keep, dropped


def _hash_family() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(_HASH_FAMILY_SEED)
    a = rng.randint(1, _PRIME, size=NUM_PERM).astype(np.uint64)
    b = rng.randint(0, _PRIME, size=NUM_PERM).astype(np.uint64)
    return a, b


def _shingle_hashes(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(hashes in [0, 2**31 - 1), owning document of each), grouped by document in order.

    A shingle is SHINGLE_WORDS consecutive words; a shorter document is one shingle of all its
    words (an empty one hashes to 0).  Computed for the whole corpus at once: word hashes in one
    array, the polynomial taken over shifted views of it, masked where a window would run past
    its document."""
    words_per_doc, word_hashes, memo = [], [], {}
    for text in texts:
        words = text.lower().split()
        words_per_doc.append(len(words))
        for w in words:
            h = memo.get(w)
            if h is None:
                h = memo[w] = zlib.crc32(w.encode("utf-8"))
            word_hashes.append(h)
    lengths = np.array(words_per_doc, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    wh = np.concatenate([np.array(word_hashes, dtype=np.uint64), np.zeros(SHINGLE_WORDS, np.uint64)])

    per_doc = np.maximum(lengths - SHINGLE_WORDS + 1, 1)
    doc_of = np.repeat(np.arange(len(texts)), per_doc)
    pos = np.arange(per_doc.sum()) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)  # index within doc
    first_word = starts[doc_of] + pos
    words_left = lengths[doc_of] - pos
    h = np.zeros(len(first_word), dtype=np.uint64)
    for k in range(SHINGLE_WORDS):
        term = np.where(k < words_left, wh[first_word + k], np.uint64(0))
        h = h * _SHINGLE_MULT + term  # wraps mod 2**64, deterministically
    return h % np.uint64(_PRIME), doc_of


def minhash_signatures(texts: Sequence[str]) -> np.ndarray:
    """(len(texts), NUM_PERM) uint32 MinHash signatures of the documents' word shingles."""
    a, b = _hash_family()
    x, doc_of = _shingle_hashes(texts)
    sig = np.full((len(texts), NUM_PERM), _PRIME, dtype=np.uint64)
    prime = np.uint64(_PRIME)
    # Fixed-size slices keep memory bounded however long one document is; a document cut by a
    # slice boundary gets its running minimum updated from both sides.
    for lo in range(0, len(x), _MINHASH_CHUNK):
        xs, docs = x[lo:lo + _MINHASH_CHUNK], doc_of[lo:lo + _MINHASH_CHUNK]
        values = (xs[:, None] * a[None, :] + b[None, :]) % prime  # a*x + b < 2**62: no overflow
        seg = np.concatenate([[0], np.flatnonzero(np.diff(docs)) + 1])
        owners = docs[seg]
        sig[owners] = np.minimum(sig[owners], np.minimum.reduceat(values, seg, axis=0))
    return sig.astype(np.uint32)


def lsh_banding(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest false candidates) for which a pair whose
    Jaccard equals the threshold still becomes a candidate with probability >= _LSH_RECALL."""
    for rows in sorted((r for r in range(1, num_perm + 1) if num_perm % r == 0), reverse=True):
        bands = num_perm // rows
        if 1.0 - (1.0 - threshold ** rows) ** bands >= _LSH_RECALL:
            return bands, rows
    return num_perm, 1


def near_dedup(texts: Sequence[str], threshold: float) -> tuple[list[int], list[tuple[int, int, float]]]:
    """(indices kept, [(dropped, kept twin, estimated Jaccard)]), scanning in order and comparing each
    document with the earlier kept documents that share an LSH band with it."""
    sig = minhash_signatures(texts)
    bands, rows = lsh_banding(threshold)
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    keep, dropped = [], []
    for j in range(len(texts)):
        keys = [sig[j, band * rows:(band + 1) * rows].tobytes() for band in range(bands)]
        candidates = sorted({i for band, key in enumerate(keys) for i in buckets[band].get(key, ())})
        twin = None
        for i in candidates:
            estimate = float(np.mean(sig[i] == sig[j]))
            if estimate >= threshold:
                twin = (j, i, estimate)
                break
        if twin is not None:
            dropped.append(twin)
            continue
        keep.append(j)
        for band, key in enumerate(keys):
            buckets[band].setdefault(key, []).append(j)
    return keep, dropped


# --------------------------------------------------------------------------- split


def split_documents(num_docs: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, val indices), each sorted: round(val_fraction * n) documents (at least one)
    held out by a permutation fixed by the seed."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    num_val = max(1, round(val_fraction * num_docs))
    if num_val >= num_docs:
        raise ValueError(f"cannot split {num_docs} document(s) into train and validation with "
                         f"val_fraction={val_fraction}: both splits need at least one document "
                         "(add documents or lower val_fraction)")
    order = np.random.RandomState(_derived_seed("split", seed)).permutation(num_docs)
    val = sorted(order[:num_val].tolist())
    val_set = set(val)
    return [i for i in range(num_docs) if i not in val_set], val


# --------------------------------------------------------------------------- tokenizer


def _tokenizers():
    """The ``tokenizers`` package, imported on first use so that reading prepared data needs only numpy."""
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("opt_core.data needs the `tokenizers` package to build or load a tokenizer: "
                          "pip install tokenizers") from e
    return tokenizers


def _byte_level(model):
    tk = _tokenizers()
    tok = tk.Tokenizer(model)
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE trained on texts, OPT's four specials at ids 0-3."""
    tk = _tokenizers()
    tok = _byte_level(tk.models.BPE())
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.encode_special_tokens = True
    return tok


def _read_gpt2_files(folder: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    for p in (vocab_path, merges_path):
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer folder {str(folder)!r} has no {p.name} "
                                    "(expected GPT-2's vocab.json and merges.txt)")
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
        raise ValueError(f"{vocab_path} must be a JSON object mapping token strings to integer ids")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{vocab_path}: ids must be 0..{len(vocab) - 1} with no gap or repeat")
    merges = []
    for line_no, line in enumerate(merges_path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or (line_no == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"{merges_path}:{line_no}: expected two tokens separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return vocab, merges


def gpt2_tokenizer(folder: str | Path):
    """A byte-level BPE from GPT-2 vocab.json + merges.txt, with OPT's specials at ids 0-3 (see the
    design record: kept as they are when the files already have them, else every id shifted by 4)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist")
    vocab, merges = _read_gpt2_files(folder)
    at_opt_ids = [vocab.get(s) == i for i, s in enumerate(SPECIAL_TOKENS)]
    if not all(at_opt_ids):
        if any(s in vocab for s in SPECIAL_TOKENS):
            placed = {s: vocab[s] for s in SPECIAL_TOKENS if s in vocab}
            raise ValueError(f"{folder / 'vocab.json'} has some of {list(SPECIAL_TOKENS)} but not all at ids "
                             f"0-3 as OPT needs: {placed}")
        vocab = {**{s: i for i, s in enumerate(SPECIAL_TOKENS)},
                 **{token: i + len(SPECIAL_TOKENS) for token, i in vocab.items()}}
    tok = _byte_level(_tokenizers().models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens([s for s in (*SPECIAL_TOKENS, "<|endoftext|>") if s in vocab])
    tok.encode_special_tokens = True
    return tok


def load_tokenizer(path: str | Path):
    """A ``tokenizers.Tokenizer`` from a tokenizer.json file, a folder holding one (a prepared data
    folder), or a folder with GPT-2's vocab.json + merges.txt."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if path.is_file():
        tok = _tokenizers().Tokenizer.from_file(str(path))
        # Not saved in tokenizer.json; the data was encoded with it on (a literal "</s>" is text).
        tok.encode_special_tokens = True
        return tok
    if path.is_dir():
        return gpt2_tokenizer(path)
    raise FileNotFoundError(f"no tokenizer at {str(path)!r} (expected tokenizer.json or a folder with "
                            "tokenizer.json, or with vocab.json + merges.txt)")


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _write_tokens(tok, texts: Sequence[str], path: Path, dtype: np.dtype, batch_docs: int = 256) -> list[int]:
    """Encode texts into one flat file, EOS after each; returns the token count of each document
    (EOS included).  Batches of documents: the ids, as Python ints (~36 bytes each), never all
    exist at once."""
    counts = []
    with open(path, "wb") as f:
        for lo in range(0, len(texts), batch_docs):
            for enc in tok.encode_batch(list(texts[lo:lo + batch_docs]), add_special_tokens=False):
                ids = np.array(enc.ids + [EOS_ID], dtype=dtype)
                f.write(ids.tobytes())
                counts.append(len(ids))
    return counts


# --------------------------------------------------------------------------- token splits


class TokenSplit:
    """A read-only memory map of one split's token stream."""

    def __init__(self, path: str | Path, dtype: str | np.dtype):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"TokenSplit({str(self.path)!r}, {len(self)} tokens, {self.dtype})"

    @staticmethod
    def _check_seq_len(seq_len: int) -> None:
        if not isinstance(seq_len, (int, np.integer)) or isinstance(seq_len, bool) or seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {seq_len!r}")

    def num_sequences(self, seq_len: int) -> int:
        """Non-overlapping blocks of seq_len + 1 tokens (the last token of a block is only a target)."""
        self._check_seq_len(seq_len)
        return len(self) // (seq_len + 1)

    def sequence(self, i: int, seq_len: int) -> torch.Tensor:
        """Block i: seq_len + 1 int64 tokens."""
        n = self.num_sequences(seq_len)
        if not 0 <= i < n:
            raise IndexError(f"sequence index {i} out of range: {n} blocks of seq_len + 1 = {seq_len + 1} tokens")
        start = i * (seq_len + 1)
        return torch.from_numpy(self.tokens[start:start + seq_len + 1].astype(np.int64))

    def blocks(self, indices: Sequence[int], seq_len: int) -> torch.Tensor:
        """(len(indices), seq_len + 1) int64: the blocks at those indices, in that order."""
        width = seq_len + 1
        out = np.empty((len(indices), width), dtype=np.int64)
        for row, i in enumerate(indices):
            out[row] = self.tokens[i * width:(i + 1) * width]
        return torch.from_numpy(out)


class BatchIterator:
    """Endless (batch_size, seq_len + 1) int64 batches of blocks, shuffled per epoch from (seed, epoch).

    The stream is the concatenation of the epochs' block orders, cut into batches; ``state_dict()``
    is the position in that stream, so ``load_state_dict`` resumes bit-identically."""

    def __init__(self, split: TokenSplit, batch_size: int, seq_len: int, seed: int, *, shuffle: bool = True):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        num_blocks = split.num_sequences(seq_len)
        if num_blocks == 0:
            raise ValueError(f"seq_len={seq_len} is too long for the split {str(split.path)!r}: its {len(split)} "
                             f"tokens make no block of seq_len + 1 = {seq_len + 1} tokens")
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.seed, self.shuffle, self.num_blocks = int(seed), bool(shuffle), num_blocks
        self.epoch, self.index = 0, 0  # the next block is order(epoch)[index]
        self._order_epoch, self._order = None, None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                rng = np.random.RandomState(_derived_seed("batches", self.seed, epoch))
                self._order = rng.permutation(self.num_blocks)
            else:
                self._order = np.arange(self.num_blocks)
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        picked = []
        while len(picked) < self.batch_size:
            order = self._epoch_order(self.epoch)
            take = min(self.batch_size - len(picked), self.num_blocks - self.index)
            picked.extend(order[self.index:self.index + take].tolist())
            self.index += take
            if self.index == self.num_blocks:
                self.epoch, self.index = self.epoch + 1, 0
        return self.split.blocks(picked, self.seq_len)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "shuffle": self.shuffle,
                "num_blocks": self.num_blocks, "seq_len": self.seq_len, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        # The position only means the same thing over the same stream: refuse a different one.
        for key in ("seed", "shuffle", "num_blocks", "seq_len"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"BatchIterator state is for {key}={state[key]!r}, this iterator has "
                                 f"{key}={getattr(self, key)!r}: resuming would not replay the same data")
        epoch, index = state.get("epoch"), state.get("index")
        if not (isinstance(epoch, int) and epoch >= 0 and isinstance(index, int) and 0 <= index < self.num_blocks):
            raise ValueError(f"BatchIterator state has epoch={epoch!r}, index={index!r}; expected ints with "
                             f"epoch >= 0 and 0 <= index < {self.num_blocks}")
        self.epoch, self.index = epoch, index


# --------------------------------------------------------------------------- prepare and cache


@dataclass
class PreparedData:
    path: Path  # the cache folder
    tokenizer_path: Path  # tokenizer.json
    vocab_size: int
    padded_vocab_size: int  # a multiple of 8 (OPT pads 50265 -> 50272)
    train: TokenSplit
    val: TokenSplit
    stats: dict
    eos_id: int = EOS_ID
    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    unk_id: int = UNK_ID

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_path)

    def documents(self) -> dict:
        """documents.json: per split, [name, first token, tokens incl. EOS] of each document, and the
        duplicates dropped as [dropped name, kept name(, estimated Jaccard)]."""
        return json.loads((self.path / "documents.json").read_text(encoding="utf-8"))

    @classmethod
    def load(cls, folder: str | Path) -> "PreparedData":
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        return cls(path=folder, tokenizer_path=folder / "tokenizer.json", vocab_size=meta["vocab_size"],
                   padded_vocab_size=meta["padded_vocab_size"],
                   train=TokenSplit(folder / "train.bin", meta["dtype"]),
                   val=TokenSplit(folder / "val.bin", meta["dtype"]), stats=meta["stats"],
                   eos_id=meta["eos_id"], pad_id=meta["pad_id"], bos_id=meta["bos_id"], unk_id=meta["unk_id"])


def _is_complete(folder: Path) -> bool:
    """Whether folder holds a full prepared data set of this format (file sizes checked)."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION or not (folder / "tokenizer.json").is_file():
            return False
        itemsize = np.dtype(meta["dtype"]).itemsize
        return all((folder / f"{split}.bin").stat().st_size == meta["stats"][f"{split}_tokens"] * itemsize
                   for split in ("train", "val"))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _fingerprint(cfg: DataConfig) -> dict:
    """What identifies the inputs besides the config: every candidate file's path, size and mtime
    (cheap: no reading), and the tokenizer files' contents."""
    kind, path = _resolve_source(cfg)
    files = [path.name] if kind == "jsonl" else _source_files(kind, path, cfg)
    root = path.parent if kind == "jsonl" else path
    listing = []
    for rel in files:
        st = (root / rel).stat()
        listing.append([rel, st.st_size, st.st_mtime_ns])
    listing_hash = hashlib.blake2b(json.dumps(listing).encode(), digest_size=16).hexdigest()
    out = {"source": str(path), "files": listing_hash, "python": sys.version if kind == "stdlib" else None}
    if cfg.tokenizer is not None:
        folder = Path(cfg.tokenizer).expanduser().resolve()
        _read_gpt2_files(folder)  # a clear error now rather than after reading the corpus
        out["tokenizer"] = hashlib.blake2b((folder / "vocab.json").read_bytes() + b"\0"
                                           + (folder / "merges.txt").read_bytes(), digest_size=16).hexdigest()
    return out


def cache_folder(cfg: DataConfig, cache_dir: str | Path) -> Path:
    """cache_dir/<source name>-<hash of config, format and inputs>."""
    key = json.dumps({"format": FORMAT_VERSION, "config": dataclasses.asdict(cfg), "inputs": _fingerprint(cfg)},
                     sort_keys=True)
    digest = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    name = "stdlib" if cfg.source == "stdlib" else re.sub(r"[^A-Za-z0-9_.-]", "_", Path(cfg.source).name)
    return Path(cache_dir).expanduser() / f"{name}-{digest}"


def _build(cfg: DataConfig, out: Path) -> dict:
    """Run the whole pipeline into the (temporary) folder out; returns the stats."""
    seconds, t = {}, time.perf_counter()

    def lap(stage):
        nonlocal t
        now = time.perf_counter()
        seconds[stage] = round(now - t, 3)
        t = now

    corpus = read_corpus(cfg)
    lap("read")
    names, texts = corpus.names, corpus.texts
    keep, exact_pairs = exact_dedup(texts)
    exact_dropped = [[names[d], names[k]] for d, k in exact_pairs]
    names, texts = [names[i] for i in keep], [texts[i] for i in keep]
    lap("exact_dedup")
    keep, near_pairs = near_dedup(texts, cfg.minhash_threshold)
    near_dropped = [[names[d], names[k], round(j, 4)] for d, k, j in near_pairs]
    names, texts = [names[i] for i in keep], [texts[i] for i in keep]
    lap("near_dedup")
    train_idx, val_idx = split_documents(len(texts), cfg.val_fraction, cfg.seed)
    if cfg.tokenizer is None:
        tok = train_tokenizer((texts[i] for i in train_idx), cfg.vocab_size)
    else:
        tok = gpt2_tokenizer(cfg.tokenizer)
    tok.save(str(out / "tokenizer.json"))
    vocab_size = tok.get_vocab_size()
    dtype = _token_dtype(vocab_size)
    lap("tokenizer")
    documents = {"exact_duplicates": exact_dropped, "near_duplicates": near_dropped}
    split_tokens = {}
    for split, idx in (("train", train_idx), ("val", val_idx)):
        counts = _write_tokens(tok, [texts[i] for i in idx], out / f"{split}.bin", dtype)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        documents[split] = [[names[i], s, c] for i, s, c in zip(idx, starts, counts)]
        split_tokens[split] = int(sum(counts))
    lap("encode")
    (out / "documents.json").write_text(json.dumps(documents), encoding="utf-8")
    seconds["total"] = round(sum(seconds.values()), 3)
    return {
        "documents_read": len(corpus.texts), "bytes_read": corpus.bytes_read, "truncated": corpus.truncated,
        "skipped_empty": corpus.skipped_empty, "skipped_binary": corpus.skipped_binary,
        "undecodable_replaced": corpus.undecodable_replaced,
        "exact_duplicates_removed": len(exact_pairs), "near_duplicates_removed": len(near_pairs),
        "train_documents": len(train_idx), "val_documents": len(val_idx),
        "train_tokens": split_tokens["train"], "val_tokens": split_tokens["val"],
        "vocab_size": vocab_size, "minhash": {"permutations": NUM_PERM, "shingle_words": SHINGLE_WORDS,
                                              "bands_rows": list(lsh_banding(cfg.minhash_threshold))},
        "seconds": seconds,
    }


def _write_meta(cfg: DataConfig, out: Path, stats: dict) -> None:
    vocab_size = stats["vocab_size"]
    meta = {"format_version": FORMAT_VERSION, "config": dataclasses.asdict(cfg), "vocab_size": vocab_size,
            "padded_vocab_size": -(-vocab_size // 8) * 8, "dtype": _token_dtype(vocab_size).name,
            "bos_id": BOS_ID, "pad_id": PAD_ID, "eos_id": EOS_ID, "unk_id": UNK_ID, "stats": stats}
    # Written last: the folder only counts as complete with it (and it only appears via os.replace).
    (out / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


def _summary(stats: dict) -> str:
    return (f"data: {stats['documents_read']} docs ({stats['bytes_read'] / 1e6:.2f} MB) read, "
            f"{stats['exact_duplicates_removed']} exact + {stats['near_duplicates_removed']} near duplicates "
            f"removed; train {stats['train_documents']} docs / {stats['train_tokens']} tokens, val "
            f"{stats['val_documents']} docs / {stats['val_tokens']} tokens; vocab {stats['vocab_size']}; "
            f"{stats['seconds']['total']:.2f} s")


def prepare(cfg: DataConfig, cache_dir: str | Path, *,
            log: Optional[Callable[[str], None]] = print) -> PreparedData:
    """Read -> exact dedup -> near dedup -> split -> tokenise -> train.bin/val.bin + tokenizer.json +
    documents.json + meta.json in cache_folder(cfg, cache_dir); the cached result when complete.
    ``log`` gets a one-line summary (None: silent)."""
    log = log or (lambda message: None)
    folder = cache_folder(cfg, cache_dir)
    if _is_complete(folder):
        data = PreparedData.load(folder)
        log(f"data: cached {folder}")
        return data
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        stats = _build(cfg, tmp)
        _write_meta(cfg, tmp, stats)
        if folder.exists() and not _is_complete(folder):
            shutil.rmtree(folder)  # only reachable by hand-made damage: the final name is never half-built
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _is_complete(folder):  # not a concurrent builder that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    data = PreparedData.load(folder)
    log(f"{_summary(data.stats)} -> {folder}")
    return data


def wait_for_prepared(cfg: DataConfig, cache_dir: str | Path, *, poll_seconds: float = 0.5) -> PreparedData:
    """The data set another process is preparing with ``prepare(cfg, cache_dir)``, once its cache folder is
    complete (polled, so the wait has no time limit: under torchrun a failed builder ends the job)."""
    folder = cache_folder(cfg, cache_dir)
    while not _is_complete(folder):
        time.sleep(poll_seconds)
    return PreparedData.load(folder)


__all__ = ["BatchIterator", "Corpus", "DataConfig", "PreparedData", "TokenSplit", "cache_folder", "exact_dedup",
           "gpt2_tokenizer", "load_tokenizer", "lsh_banding", "minhash_signatures", "near_dedup", "prepare",
           "read_corpus", "split_documents", "train_tokenizer", "wait_for_prepared"]
