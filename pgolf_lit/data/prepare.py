"""Text or JSONL documents to token shards, with upstream's export rules (``pgolf data build``).

The output tree is the one the official download produces (spec/data.md §3-4, §7-8), so every loader, the
downloader's ``--hub-root`` and the record scripts read it unchanged::

    OUT/manifest.json
    OUT/tokenizers/fineweb_<V>_bpe.model, .vocab
    OUT/datasets/<name>_sp<V>/fineweb_val_000000.bin, fineweb_train_000000.bin, ...

Export rules (upstream ``export_shards``): the tokenizer is SentencePiece BPE trained with the upstream settings
on every document (validation included); each document becomes ``[BOS=1] + encode(raw text)`` with no EOS; the
first K documents are the validation split, the rest the training split; a split change flushes the shard
buffer, so the validation data ends on a document boundary and train shard 0 starts with a BOS; a new shard is
started every ``shard_tokens`` tokens, and a document may continue into the next training shard.

The build is staged in a hidden folder inside OUT and moved into place (a few renames) only once the tokenizer and
every shard are written; the manifest is written last, atomically. A build that fails or is interrupted before
then (bad input, full disk, Ctrl-C during the export) leaves OUT as it was.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from pgolf_lit.data.corpus import embedded_corpus, split_paragraphs
from pgolf_lit.data.shards import MAX_VOCAB, shard_name, write_shard
from pgolf_lit.data.tokenizer import file_sha256, load_tokenizer, train_tokenizer
from pgolf_lit.errors import DataError, PgolfError
from pgolf_lit.fileio import atomic_write_text

DEFAULT_NAME = "fineweb10B"
DEFAULT_SHARD_TOKENS = 100_000_000
OFFICIAL_VAL_DOCS = 50_000
ENCODE_BATCH_DOCS = 1024  # upstream MATCHED_FINEWEB_SP_BATCH_SIZE default
TXT_MODES = ("paragraphs", "file")
INPUT_SUFFIXES = (".txt", ".jsonl")


# ---------------------------------------------------------------------------------------------------------------
# Documents


def find_input_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and directories (searched recursively, in sorted order) into the .txt/.jsonl files to read."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in INPUT_SUFFIXES)
        elif path.is_file():
            if path.suffix not in INPUT_SUFFIXES:
                raise DataError(f"{path}: unsupported input file type; expected a .txt or .jsonl file")
            files.append(path)
        else:
            raise DataError(f"{path}: input not found (expected a .txt or .jsonl file, or a directory of them)")
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte offset {e.start})") from None


def iter_jsonl_texts(path: Path) -> Iterator[str]:
    """The ``"text"`` of each line's JSON object; blank lines are skipped, anything else malformed is an error."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{path}:{line_number}: unreadable JSON line ({e})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f'{path}:{line_number}: expected a JSON object with a string "text" field')
            yield text


def iter_txt_texts(path: Path, txt_mode: str) -> Iterator[str]:
    """A .txt file as documents: each blank-line-separated paragraph (``paragraphs``) or the whole file (``file``)."""
    text = _read_text(path)
    if txt_mode == "file":
        yield text
    else:
        yield from split_paragraphs(text)


class DocumentSource:
    """The documents of the input files in order, then the embedded corpus if asked; iterable any number of times.

    The build reads the documents three times (count, tokenizer training, encoding) instead of holding them in
    memory, so an input the size of the official ``docs_selected.jsonl`` does not need to fit in RAM.
    """

    def __init__(self, files: Sequence[Path], *, txt_mode: str = "paragraphs", embedded: bool = False):
        if txt_mode not in TXT_MODES:
            raise DataError(f"txt_mode {txt_mode!r}: expected one of {', '.join(TXT_MODES)}")
        self.files = list(files)
        self.txt_mode = txt_mode
        self.embedded = embedded

    def __iter__(self) -> Iterator[str]:
        for path in self.files:
            yield from iter_jsonl_texts(path) if path.suffix == ".jsonl" else iter_txt_texts(path, self.txt_mode)
        if self.embedded:
            yield from embedded_corpus()

    def describe(self) -> list[str]:
        return [str(p) for p in self.files] + (["embedded:python-stdlib-docs"] if self.embedded else [])


def _count_documents(source: DocumentSource) -> tuple[int, bool]:
    """Number of documents and whether any has text; reads (and so validates) every input before any training."""
    count, any_text = 0, False
    for text in source:
        count += 1
        any_text = any_text or bool(text.strip())
    return count, any_text


def default_val_docs(num_docs: int) -> int:
    """Upstream's 50,000, but never more than a tenth of the documents (and at least one)."""
    return max(1, min(OFFICIAL_VAL_DOCS, num_docs // 10))


# ---------------------------------------------------------------------------------------------------------------
# Encoding and shard writing


def encode_documents(sp, texts: list[str], vocab_size: int, num_threads: int) -> np.ndarray:
    """``[BOS] + ids`` for each raw text, concatenated, as uint16; every id is checked to be below ``vocab_size``.

    The raw text goes to the encoder (no strip, no NUL replacement), as upstream: the tokenizer's own
    normalization is the only one.
    """
    encoded = sp.encode(texts, out_type=int, num_threads=num_threads)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    doc_starts = np.cumsum(lengths) - lengths
    tokens = np.empty(int(lengths.sum()), dtype=np.int64)
    is_body = np.ones(tokens.size, dtype=bool)
    is_body[doc_starts] = False
    tokens[doc_starts] = sp.bos_id()
    body = itertools.chain.from_iterable(encoded)
    tokens[is_body] = np.fromiter(body, dtype=np.int64, count=tokens.size - len(texts))
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        bad = int(tokens[(tokens < 0) | (tokens >= vocab_size)][0])
        raise DataError(f"token id {bad} outside the tokenizer's declared vocab_size {vocab_size}")
    return tokens.astype(np.uint16)


class ShardWriter:
    """Buffers one split's token stream and writes a ``fineweb_<split>_NNNNNN.bin`` shard every ``shard_tokens``."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)  # pages are only touched as they fill
        self.fill = 0
        self.files = 0
        self.tokens = 0

    def append(self, tokens: np.ndarray) -> None:
        position = 0
        while position < tokens.size:
            take = min(self.shard_tokens - self.fill, tokens.size - position)
            self.buffer[self.fill : self.fill + take] = tokens[position : position + take]
            self.fill += take
            position += take
            if self.fill == self.shard_tokens:
                self.flush()
        self.tokens += tokens.size

    def flush(self) -> None:
        if self.fill:
            write_shard(self.out_dir / shard_name(self.split, self.files), self.buffer[: self.fill])
            self.files += 1
            self.fill = 0


def _batched(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(itertools.islice(texts, size)):
        yield batch


def export_shards(
    source: DocumentSource,
    sp,
    out_dir: Path,
    *,
    num_docs: int,
    val_docs: int,
    vocab_size: int,
    shard_tokens: int,
    num_threads: int,
    progress: bool,
) -> dict[str, int]:
    """Encode every document into val then train shards under ``out_dir``; return upstream's ``stats`` dict."""
    from tqdm.auto import tqdm

    documents = iter(source)
    stats: dict[str, int] = {}
    with tqdm(total=num_docs, unit="doc", desc=f"tokenizing {out_dir.name}", disable=not progress) as bar:
        for split, split_docs in (("val", itertools.islice(documents, val_docs)), ("train", documents)):
            writer = ShardWriter(out_dir, split, shard_tokens)
            doc_count = 0
            for batch in _batched(split_docs, ENCODE_BATCH_DOCS):
                writer.append(encode_documents(sp, batch, vocab_size, num_threads))
                doc_count += len(batch)
                bar.update(len(batch))
            writer.flush()
            stats.update({f"docs_{split}": doc_count, f"files_{split}": writer.files, f"tokens_{split}": writer.tokens})
    for key in ("docs", "files", "tokens"):
        stats[f"{key}_total"] = stats[f"{key}_val"] + stats[f"{key}_train"]
    if stats["docs_total"] != num_docs:
        raise DataError(
            f"the inputs changed while building: counted {num_docs} documents, encoded {stats['docs_total']}"
        )
    return {k: stats[k] for k in sorted(stats)}


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def _prepare_tokenizer(
    source: DocumentSource,
    vocab_size: int,
    model_prefix: Path,
    *,
    reuse_path: Path | None,
    train_docs: int | None,
    num_threads: int,
) -> Path:
    """Copy a given model (and its .vocab) to ``model_prefix``, or train one there; check its vocabulary size."""
    model_path = model_prefix.with_suffix(".model")
    if reuse_path is not None:
        load_tokenizer(reuse_path, vocab_size)  # a clear error for a missing file or a vocab-size mismatch
        model_prefix.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(reuse_path, model_path)
        if reuse_path.with_suffix(".vocab").is_file():
            shutil.copyfile(reuse_path.with_suffix(".vocab"), model_prefix.with_suffix(".vocab"))
        return model_path
    texts = itertools.islice(source, train_docs) if train_docs is not None else iter(source)
    try:
        # minloglevel=1 keeps SentencePiece's warnings (e.g. skipped over-long documents) but not its info flood.
        train_tokenizer(texts, vocab_size, model_prefix, num_threads=num_threads, minloglevel=1)
    except RuntimeError as e:  # SentencePiece reports bad settings for this text as a one-line RuntimeError
        raise DataError(f"SentencePiece training failed for vocab_size {vocab_size}: {e}") from None
    learned = load_tokenizer(model_path).vocab_size()
    if learned != vocab_size:
        raise DataError(
            f"the input text only supports {learned} SentencePiece pieces, fewer than --vocab-size {vocab_size}: "
            f"give more text or a smaller vocabulary"
        )
    return model_path


# ---------------------------------------------------------------------------------------------------------------
# Manifest


def recommended_bigram_vocab_size(vocab_size: int) -> int:
    return ((vocab_size + 127) // 128) * 128 * 5


def _merge_entries(existing: list, new_entry: dict) -> list:
    """Existing manifest entries with the new one replacing any of the same name (other variants are kept)."""
    kept = [e for e in existing if isinstance(e, dict) and e.get("name") != new_entry["name"]]
    return kept + [new_entry]


def _read_existing_manifest(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # an unreadable manifest in our own output folder is replaced, not merged
    return existing if isinstance(existing, dict) else {}


def _build_manifest(
    existing: dict,
    *,
    source: DocumentSource,
    dataset_name: str,
    vocab_size: int,
    val_docs: int,
    shard_tokens: int,
    model_path: Path,
    vocab_file: Path | None,
    reuse_path: Path | None,
    train_docs: int | None,
    stats: dict[str, int],
    sp,
) -> dict:
    """The upstream manifest (spec/data.md §4); paths relative to the output root, other variants kept."""
    tokenizer_name = f"sp_bpe_{vocab_size}"
    spec: dict = {"name": tokenizer_name, "kind": "sentencepiece_bpe", "vocab_size": vocab_size,
                  "dataset_suffix": f"sp{vocab_size}"}
    if train_docs is not None:
        spec["tokenizer_train_docs"] = train_docs
    if reuse_path is not None:
        spec["reuse_model_path"] = str(reuse_path)
    ids = {"vocab_size": vocab_size, "bos_id": int(sp.bos_id()), "eos_id": int(sp.eos_id()),
           "recommended_bigram_vocab_size": recommended_bigram_vocab_size(vocab_size)}
    tokenizer_entry = {
        "name": tokenizer_name,
        "kind": "sentencepiece_bpe",
        **ids,
        "source_spec": spec,
        "model_path": f"tokenizers/{model_path.name}",
        **({"vocab_path": f"tokenizers/{vocab_file.name}"} if vocab_file is not None else {}),
        "sha256": file_sha256(model_path),
    }
    dataset_path = f"datasets/{dataset_name}"
    dataset_entry = {
        "name": dataset_name,
        "tokenizer_name": tokenizer_name,
        "tokenizer_kind": "sentencepiece_bpe",
        "path": dataset_path,
        "train_glob": f"{dataset_path}/fineweb_train_*.bin",
        "val_glob": f"{dataset_path}/fineweb_val_*.bin",
        **ids,
        "stats": stats,
    }
    return {
        "version": "10B",
        "num_docs": stats["docs_total"],
        "num_val_docs": val_docs,
        "shuffle_seed": None,
        "shard_size": shard_tokens,
        "append_eos": False,
        "docs_jsonl": None,  # built from local inputs, listed in docs_meta.sources; there is no docs_selected.jsonl
        "docs_meta": {"remote_repo_id": None, "remote_root": None, "num_docs": stats["docs_total"],
                      "docs_sha256": None, "source_manifest": None, "sources": source.describe()},
        "tokenizer_specs": _merge_entries(existing.get("tokenizer_specs", []), spec),
        "tokenizers": _merge_entries(existing.get("tokenizers", []), tokenizer_entry),
        "datasets": _merge_entries(existing.get("datasets", []), dataset_entry),
    }


# ---------------------------------------------------------------------------------------------------------------
# Build


def _move_into_place(staged: Path, final: Path) -> None:
    """Replace ``final`` (a file or a folder) by ``staged``; an old folder is renamed away before it is deleted."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_dir():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old)
    else:
        os.replace(staged, final)


def build_dataset(
    inputs: Sequence[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    name: str = DEFAULT_NAME,
    val_docs: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    tokenizer_path: str | os.PathLike | None = None,
    tokenizer_train_docs: int | None = None,
    txt_mode: str = "paragraphs",
    embedded: bool = False,
    num_threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Build ``out_dir`` (tokenizer, val/train shards, manifest.json) from text inputs; return the manifest.

    ``inputs``: .txt/.jsonl files or folders of them; ``embedded`` appends the built-in corpus (corpus.py), so
    ``build_dataset([], 1024, "data", embedded=True)`` works offline. ``val_docs`` defaults to
    ``default_val_docs(number of documents)``. ``tokenizer_path`` reuses a SentencePiece model instead of training.
    ``tokenizer_train_docs`` limits tokenizer training to the first N documents (as upstream's option).
    """
    out_dir = Path(out_dir)
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise DataError(f"vocab_size {vocab_size}: shard tokens are uint16, so the vocabulary must be 1..{MAX_VOCAB}")
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens {shard_tokens}: must be positive")
    reuse_path = Path(tokenizer_path) if tokenizer_path is not None else None
    files = find_input_files(inputs)
    if not files and not embedded:
        listed = ", ".join(str(i) for i in inputs) or "none given"
        raise DataError(f"no input files: expected .txt or .jsonl files (inputs: {listed}), or use --embedded")
    source = DocumentSource(files, txt_mode=txt_mode, embedded=embedded)
    num_docs, any_text = _count_documents(source)
    if not any_text:
        raise DataError(f"empty text set: the inputs ({', '.join(source.describe())}) hold no non-blank text")
    val_docs = default_val_docs(num_docs) if val_docs is None else val_docs
    if not 1 <= val_docs < num_docs:
        raise DataError(
            f"val_docs {val_docs}: the inputs hold {num_docs} documents; the validation split needs at least 1 and "
            f"must leave at least 1 for training"
        )
    threads = num_threads or os.cpu_count() or 1
    dataset_name = f"{name}_sp{vocab_size}"
    model_name = f"fineweb_{vocab_size}_bpe"

    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".pgolf-build-", dir=out_dir))
    try:
        model_path = _prepare_tokenizer(
            source, vocab_size, staging / "tokenizers" / model_name,
            reuse_path=reuse_path, train_docs=tokenizer_train_docs, num_threads=threads,
        )
        sp = load_tokenizer(model_path, vocab_size)
        if sp.bos_id() < 0:
            raise DataError(
                f"{reuse_path or model_path}: the tokenizer has no BOS piece; every document starts with one"
            )
        staged_dataset = staging / "datasets" / dataset_name
        staged_dataset.mkdir(parents=True)
        stats = export_shards(
            source, sp, staged_dataset, num_docs=num_docs, val_docs=val_docs, vocab_size=vocab_size,
            shard_tokens=shard_tokens, num_threads=threads, progress=progress,
        )
        vocab_file = model_path.with_suffix(".vocab")
        manifest_path = out_dir / "manifest.json"
        manifest = _build_manifest(
            _read_existing_manifest(manifest_path), source=source, dataset_name=dataset_name,
            vocab_size=vocab_size, val_docs=val_docs, shard_tokens=shard_tokens, model_path=model_path,
            vocab_file=vocab_file if vocab_file.is_file() else None, reuse_path=reuse_path,
            train_docs=tokenizer_train_docs, stats=stats, sp=sp,
        )
        for artifact in (model_path, vocab_file):  # a reused model without .vocab must not keep a stale one
            final = out_dir / "tokenizers" / artifact.name
            if artifact.is_file():
                _move_into_place(artifact, final)
            else:
                final.unlink(missing_ok=True)
        _move_into_place(staged_dataset, out_dir / "datasets" / dataset_name)
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def build_embedded_dataset(
    dataset_dir: str | os.PathLike, vocab_size: int, *, shard_tokens: int = 100_000, progress: bool = True
) -> dict:
    """Build the embedded corpus so that ``dataset_dir`` (``<root>/datasets/<name>_sp<V>``) holds its shards.

    For a data module that is pointed at a dataset folder and wants it created offline on first use; the tokenizer
    lands in ``<root>/tokenizers/`` as usual. The small default shard size splits the ~0.5M training tokens into
    several shards, so the shuffled and coprime loaders have shards to mix and to share among ranks.
    """
    dataset_dir = Path(dataset_dir)
    suffix = f"_sp{vocab_size}"
    if dataset_dir.parent.name != "datasets" or not dataset_dir.name.endswith(suffix) or dataset_dir.name == suffix:
        raise DataError(f"{dataset_dir}: expected a dataset folder named <root>/datasets/<name>{suffix}")
    return build_dataset([], vocab_size, dataset_dir.parent.parent, name=dataset_dir.name[: -len(suffix)],
                         embedded=True, shard_tokens=shard_tokens, progress=progress)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgolf data build",
        description=(
            "Tokenize text into upstream-format token shards: train a SentencePiece BPE tokenizer with the official "
            "export settings, write OUT/tokenizers/fineweb_<V>_bpe.model, OUT/datasets/<name>_sp<V>/fineweb_"
            "{val,train}_NNNNNN.bin and OUT/manifest.json. Each document is [BOS] + its tokens (no EOS); the first "
            "--val-docs documents are the validation split."
        ),
    )
    parser.add_argument(
        "--input", dest="inputs", action="extend", nargs="+", default=[], metavar="PATH",
        help="a .jsonl file (one JSON object per line, its \"text\" is one document), a .txt file (see --txt-mode), "
             "or a folder searched recursively for both; repeatable. Documents are read in the order given.",
    )
    parser.add_argument("--embedded", action="store_true",
                        help="add the built-in offline corpus (Python's own documentation, ~0.5M tokens at V=1024)")
    parser.add_argument("--vocab-size", type=int, required=True, help="SentencePiece vocabulary size V (<= 65536)")
    parser.add_argument("--out", required=True, help="output root (the data root the loaders and records read)")
    parser.add_argument("--val-docs", type=int, default=None,
                        help=f"validation documents, taken from the start (default: {OFFICIAL_VAL_DOCS}, at most a "
                             f"tenth of the documents)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                        help="tokens per shard (default 100,000,000, as upstream)")
    parser.add_argument("--tokenizer", default=None, metavar="MODEL",
                        help="reuse this SentencePiece .model (and its .vocab, if beside it) instead of training one")
    parser.add_argument("--tokenizer-train-docs", type=int, default=None, metavar="N",
                        help="train the tokenizer on the first N documents only (default: all)")
    parser.add_argument("--txt-mode", choices=TXT_MODES, default="paragraphs",
                        help="how a .txt file splits into documents: 'paragraphs' (default) makes each blank-line-"
                             "separated block a document; 'file' makes the whole file one document (SentencePiece "
                             "leaves documents over 4192 bytes out of tokenizer training, but still encodes them)")
    parser.add_argument("--name", default=DEFAULT_NAME, help="dataset name prefix (default fineweb10B)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    manifest = build_dataset(
        args.inputs, args.vocab_size, args.out, name=args.name, val_docs=args.val_docs,
        shard_tokens=args.shard_tokens, tokenizer_path=args.tokenizer, tokenizer_train_docs=args.tokenizer_train_docs,
        txt_mode=args.txt_mode, embedded=args.embedded, progress=args.progress,
    )
    dataset = next(d for d in manifest["datasets"] if d["name"] == f"{args.name}_sp{args.vocab_size}")
    s = dataset["stats"]
    print(
        f"{Path(args.out) / dataset['path']}: {s['docs_val']} val docs / {s['tokens_val']} tokens in {s['files_val']} "
        f"shard(s), {s['docs_train']} train docs / {s['tokens_train']} tokens in {s['files_train']} shard(s); "
        f"manifest {Path(args.out) / 'manifest.json'}"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PgolfError as e:
        sys.exit(f"error: {e}")
