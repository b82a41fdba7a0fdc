"""``pgolf data build|download``: text/JSONL (or the embedded corpus) to upstream shards (``--caseops``: the PR #1855
CaseOps variant with its val byte sidecar), or the official pre-tokenized shards from the Hugging Face hub
(``--variant sp8192_caseops``: the public CaseOps export)."""

from __future__ import annotations


def main(argv) -> None:
    if not argv or argv[0] not in ("build", "download"):
        print("usage: pgolf data build ... [--caseops] | pgolf data download ...  (see --help of each)")
        raise SystemExit(2)
    if argv[0] == "build":
        from pgolf_lit.data.prepare import main as build_main

        build_main(argv[1:])
    else:
        from pgolf_lit.data.download import main as download_main

        download_main(argv[1:])
