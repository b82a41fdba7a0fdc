"""Training SentencePiece tokenizers with the upstream export settings (or taking a given one), and encoding with
each piece's surface: the data build's side of ``tokenizer.py`` (which loads tokenizers and builds the byte LUTs
evaluation needs).
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from pgolf_lit.data.caseops import OPERATORS, encode_caseops, is_caseops_tokenizer
from pgolf_lit.data.tokenizer import load_tokenizer
from pgolf_lit.errors import DataError

# The upstream export's trainer settings (data/download_hf_docs_and_tokenize.py ``build_sentencepiece_tokenizer``);
# everything else stays at the library default.
EXPORT_TRAINER_OPTIONS = dict(
    model_type="bpe",
    character_coverage=0.999,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name="nmt_nfkc",
    add_dummy_prefix=False,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    hard_vocab_limit=False,
)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a serialized protobuf message: an int for varints, bytes for length-delimited
    fields; fixed-width fields (a score) are skipped."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos)
            yield field, value
        elif wire_type == 2:
            size, pos = _varint(buf, pos)
            yield field, buf[pos : pos + size]
            pos += size
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise DataError(f"SentencePiece returned an unreadable encoding (protobuf wire type {wire_type})")


def encode_with_surfaces(sp, texts: list[str], num_threads: int = 1) -> list[tuple[list[int], list[str]]]:
    """For each text, its piece ids and their surfaces (the span of the input text each piece covers).

    sentencepiece 0.2.3 has no ``encode_as_immutable_proto`` and its ``out_type='proto'`` needs the protobuf
    package, which is not a dependency here; ``out_type='serialized_proto'`` returns the same SentencePieceText
    message as bytes, read here directly (SentencePieceText.pieces = field 2; SentencePiece.id = 2, .surface = 3).
    A byte-fallback piece that starts a multi-byte character has an empty surface.
    """
    results = []
    for message in sp.encode(texts, out_type="serialized_proto", num_threads=num_threads):
        ids, surfaces = [], []
        for field, piece in _proto_fields(message):
            if field != 2:
                continue
            piece_id, surface = None, b""
            for sub_field, value in _proto_fields(piece):
                if sub_field == 2:
                    piece_id = value
                elif sub_field == 3:
                    surface = value
            if piece_id is None:
                raise DataError("SentencePiece returned a piece without an id")
            ids.append(piece_id)
            surfaces.append(surface.decode("utf-8"))
        results.append((ids, surfaces))
    return results


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    model_prefix: str | os.PathLike,
    *,
    num_threads: int | None = None,
    **overrides,
) -> Path:
    """Train a SentencePiece BPE model with the upstream export settings; return the ``.model`` path.

    Each text has NUL replaced by a space and is stripped; empty texts are skipped (as upstream does for
    tokenizer training). Writes ``<model_prefix>.model`` and ``.vocab``.
    """
    import sentencepiece as spm

    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)

    def sentences():
        for t in texts:
            t = t.replace("\x00", " ").strip()
            if t:
                yield t

    options = dict(EXPORT_TRAINER_OPTIONS, vocab_size=vocab_size, **overrides)
    if num_threads:
        options["num_threads"] = num_threads
    # Train into a scratch directory beside the target, then rename: no half-written .model under the final name.
    with tempfile.TemporaryDirectory(dir=model_prefix.parent, prefix=".sp-train-") as tmp:
        tmp_prefix = Path(tmp) / model_prefix.name
        spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_prefix=str(tmp_prefix), **options)
        for ext in (".vocab", ".model"):
            os.replace(f"{tmp_prefix}{ext}", f"{model_prefix}{ext}")
    return Path(f"{model_prefix}.model")


def prepare_tokenizer(
    source: Iterable[str],
    vocab_size: int,
    model_prefix: Path,
    *,
    reuse_path: Path | None,
    train_docs: int | None,
    num_threads: int,
    caseops: bool = False,
) -> Path:
    """Copy a given model (and its .vocab) to ``model_prefix``, or train one there; check its vocabulary size.

    With ``caseops`` the tokenizer is trained on CaseOps-encoded text with the four operators reserved as
    user-defined pieces 4..7 (PR #1855 download_hf_docs_and_tokenize.py, ``reserve_text_transform_controls``),
    and a given model must be such a tokenizer; a plain build refuses one.
    """
    model_path = model_prefix.with_suffix(".model")
    if reuse_path is not None:
        given = load_tokenizer(reuse_path, vocab_size)  # a clear error for a missing file or a vocab-size mismatch
        if caseops and not is_caseops_tokenizer(given):
            pieces = [given.id_to_piece(i) for i in range(4, min(8, given.vocab_size()))]
            raise DataError(
                f"{reuse_path}: not a CaseOps tokenizer: pieces 4..7 are {pieces}, a --caseops build needs the "
                f"operators U+E001..U+E004 there (train one with --caseops, without --tokenizer)"
            )
        if not caseops and is_caseops_tokenizer(given):
            raise DataError(
                f"{reuse_path}: a CaseOps tokenizer (pieces 4..7 are the operators U+E001..U+E004): pass --caseops, "
                f"or its documents would not be CaseOps-encoded"
            )
        model_prefix.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(reuse_path, model_path)
        if reuse_path.with_suffix(".vocab").is_file():
            shutil.copyfile(reuse_path.with_suffix(".vocab"), model_prefix.with_suffix(".vocab"))
        return model_path
    texts = itertools.islice(source, train_docs) if train_docs is not None else iter(source)
    overrides = {}
    if caseops:
        texts = map(encode_caseops, texts)
        overrides["user_defined_symbols"] = list(OPERATORS)
    try:
        # minloglevel=1 keeps SentencePiece's warnings (e.g. skipped over-long documents) but not its info flood.
        train_tokenizer(texts, vocab_size, model_prefix, num_threads=num_threads, minloglevel=1, **overrides)
    except RuntimeError as e:  # SentencePiece reports bad settings for this text as a one-line RuntimeError
        raise DataError(f"SentencePiece training failed for vocab_size {vocab_size}: {e}") from None
    learned = load_tokenizer(model_path).vocab_size()
    if learned != vocab_size:
        raise DataError(
            f"the input text only supports {learned} SentencePiece pieces, fewer than --vocab-size {vocab_size}: "
            f"give more text or a smaller vocabulary"
        )
    if caseops and not is_caseops_tokenizer(load_tokenizer(model_path)):
        raise DataError(f"{model_path}: SentencePiece did not put the CaseOps operators at ids 4..7")
    return model_path
