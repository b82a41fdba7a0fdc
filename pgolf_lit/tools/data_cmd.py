"""``pgolf data build|download``: text/JSONL (or the embedded corpus) to upstream shards (``--caseops``: the PR #1855
CaseOps variant with its val byte sidecar; data/build.py), or the official pre-tokenized shards from the Hugging
Face hub (``--variant sp8192_caseops``: the public CaseOps export; data/download.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from pgolf_lit.data.build import DEFAULT_NAME, DEFAULT_SHARD_TOKENS, build_dataset
from pgolf_lit.data.documents import TXT_MODES
from pgolf_lit.data.manifest import variant_names
from pgolf_lit.data.val_split import OFFICIAL_VAL_DOCS, disjointness_line


def main(argv) -> None:
    if not argv or argv[0] not in ("build", "download"):
        print("usage: pgolf data build ... [--caseops] | pgolf data download ...  (see --help of each)")
        raise SystemExit(2)
    if argv[0] == "build":
        build_main(argv[1:])
    else:
        from pgolf_lit.data.download import main as download_main

        download_main(argv[1:])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgolf data build",
        description=(
            "Tokenize text into upstream-format token shards: train a SentencePiece BPE tokenizer with the official "
            "export settings, write OUT/tokenizers/fineweb_<V>_bpe.model, OUT/datasets/<name>_sp<V>/fineweb_"
            "{val,train}_NNNNNN.bin and OUT/manifest.json. Each document is [BOS] + its tokens (no EOS); the first "
            "--val-docs documents are the validation split, and training copies of them are dropped."
        ),
    )
    parser.add_argument(
        "--input",
        dest="inputs",
        action="extend",
        nargs="+",
        default=[],
        metavar="PATH",
        help='a .jsonl file (one JSON object per line, its "text" is one document), a .txt file (see --txt-mode), '
        "or a folder searched recursively for both; repeatable. Documents are read in the order given.",
    )
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="add the built-in offline corpus (Python's own documentation, ~0.5M tokens at V=1024)",
    )
    parser.add_argument("--vocab-size", type=int, required=True, help="SentencePiece vocabulary size V (<= 65536)")
    parser.add_argument("--out", required=True, help="output root (the data root the loaders and records read)")
    parser.add_argument(
        "--val-docs",
        type=int,
        default=None,
        help=f"validation documents, taken from the start (default: docs_val of the first input's "
        f"<stem>.source_manifest.json, else {OFFICIAL_VAL_DOCS}, at most a tenth of the documents)",
    )
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        help="tokens per shard (default 100,000,000, as upstream)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="MODEL",
        help="reuse this SentencePiece .model (and its .vocab, if beside it) instead of training one",
    )
    parser.add_argument(
        "--tokenizer-train-docs",
        type=int,
        default=None,
        metavar="N",
        help="train the tokenizer on the first N documents only (default: all)",
    )
    parser.add_argument(
        "--txt-mode",
        choices=TXT_MODES,
        default="paragraphs",
        help="how a .txt file splits into documents: 'paragraphs' (default) makes each blank-line-"
        "separated block a document; 'file' makes the whole file one document (SentencePiece "
        "leaves documents over 4192 bytes out of tokenizer training, but still encodes them)",
    )
    parser.add_argument("--name", default=DEFAULT_NAME, help="dataset name prefix (default fineweb10B)")
    parser.add_argument(
        "--caseops",
        action="store_true",
        help="the PR #1855 CaseOps variant: rewrite capitalization into operator characters "
        "(lossless_caps_caseops_v1) before tokenizing, reserve the operators as pieces 4..7, and "
        "write the val byte sidecar fineweb_val_bytes_NNNNNN.bin (original UTF-8 bytes per token)",
    )
    parser.add_argument(
        "--keep-val-copies",
        action="store_true",
        help="keep training documents whose text repeats a validation document (default: drop them and say how "
        "many); only for a byte-exact rebuild of an upstream export that had them: pgolf record refuses runs on "
        "such data",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return parser


def build_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    manifest = build_dataset(
        args.inputs,
        args.vocab_size,
        args.out,
        name=args.name,
        val_docs=args.val_docs,
        shard_tokens=args.shard_tokens,
        tokenizer_path=args.tokenizer,
        tokenizer_train_docs=args.tokenizer_train_docs,
        txt_mode=args.txt_mode,
        embedded=args.embedded,
        progress=args.progress,
        caseops=args.caseops,
        keep_val_copies=args.keep_val_copies,
    )
    name = variant_names(args.name, args.vocab_size, args.caseops).dataset
    dataset = next(d for d in manifest["datasets"] if d["name"] == name)
    s = dataset["stats"]
    print(
        f"{Path(args.out) / dataset['path']}: {s['docs_val']} val docs / {s['tokens_val']} tokens in {s['files_val']} "
        f"shard(s), {s['docs_train']} train docs / {s['tokens_train']} tokens in {s['files_train']} shard(s); "
        f"manifest {Path(args.out) / 'manifest.json'}"
    )
    print(disjointness_line(dataset["val_disjointness"]))
    return 0
