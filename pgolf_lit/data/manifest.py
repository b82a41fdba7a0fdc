"""The data manifest (``OUT/manifest.json``) of a build, as upstream's download_hf_docs_and_tokenize.py ``main``
writes it, and the upstream names of a build's dataset and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from pgolf_lit.data.caseops import RESERVED_SUFFIX, TRANSFORM_NAME
from pgolf_lit.data.documents import DocumentSource
from pgolf_lit.data.tokenizer import file_sha256, pieces_sha256


class VariantNames(NamedTuple):
    suffix: str  # upstream dataset_suffix: sp<V>, or sp<V>_lossless_caps_caseops_v1_reserved
    dataset: str  # <name>_<suffix>
    model: str  # tokenizer file stem: fineweb_<V>_bpe[_lossless_caps_caseops_v1_reserved]
    tokenizer: str  # manifest tokenizer name: sp_bpe_<V>[_lossless_caps_caseops_v1_reserved]


def variant_names(name: str, vocab_size: int, caseops: bool = False) -> VariantNames:
    """The upstream names of a build's dataset and tokenizer (the CaseOps ones as the public CaseOps export)."""
    tail = f"_{RESERVED_SUFFIX}" if caseops else ""
    return VariantNames(
        f"sp{vocab_size}{tail}",
        f"{name}_sp{vocab_size}{tail}",
        f"fineweb_{vocab_size}_bpe{tail}",
        f"sp_bpe_{vocab_size}{tail}",
    )


def recommended_bigram_vocab_size(vocab_size: int) -> int:
    return ((vocab_size + 127) // 128) * 128 * 5


def _merge_entries(existing: list, new_entry: dict) -> list:
    """Existing manifest entries with the new one replacing any of the same name (other variants are kept)."""
    kept = [e for e in existing if isinstance(e, dict) and e.get("name") != new_entry["name"]]
    return kept + [new_entry]


def read_existing_manifest(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # an unreadable manifest in our own output folder is replaced, not merged
    return existing if isinstance(existing, dict) else {}


def build_manifest(
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
    tokenizer_name: str,
    caseops: bool = False,
    disjointness: dict | None = None,
    shard_sha256: dict[str, str] | None = None,
) -> dict:
    """The upstream manifest (download_hf_docs_and_tokenize.py ``main``); paths relative to the output root, other
    variants kept.

    A CaseOps build adds the fields of PR #1855 download_hf_docs_and_tokenize.py: ``text_transform`` and
    ``reserve_text_transform_controls`` on the tokenizer, ``val_bytes_glob`` on the dataset. pgolf adds, per
    dataset, ``val_disjointness`` (what the build did with training copies of validation documents) and
    ``sha256`` (of every shard it wrote, by file name).
    """
    spec: dict = {
        "name": tokenizer_name,
        "kind": "sentencepiece_bpe",
        "vocab_size": vocab_size,
        "dataset_suffix": variant_names("", vocab_size, caseops).suffix,
    }
    transform = {"text_transform": TRANSFORM_NAME, "reserve_text_transform_controls": True} if caseops else {}
    spec.update(transform)
    if train_docs is not None:
        spec["tokenizer_train_docs"] = train_docs
    if reuse_path is not None:
        spec["reuse_model_path"] = str(reuse_path)
    ids = {
        "vocab_size": vocab_size,
        "bos_id": int(sp.bos_id()),
        "eos_id": int(sp.eos_id()),
        "recommended_bigram_vocab_size": recommended_bigram_vocab_size(vocab_size),
    }
    tokenizer_entry = {
        "name": tokenizer_name,
        "kind": "sentencepiece_bpe",
        **ids,
        "source_spec": spec,
        "model_path": f"tokenizers/{model_path.name}",
        **({"vocab_path": f"tokenizers/{vocab_file.name}"} if vocab_file is not None else {}),
        "sha256": file_sha256(model_path),
        "pieces_sha256": pieces_sha256(sp),  # checked when a dataset is loaded (check_tokenizer_matches_dataset)
        **transform,
    }
    dataset_path = f"datasets/{dataset_name}"
    dataset_entry = {
        "name": dataset_name,
        "tokenizer_name": tokenizer_name,
        "tokenizer_kind": "sentencepiece_bpe",
        "path": dataset_path,
        "train_glob": f"{dataset_path}/fineweb_train_*.bin",
        "val_glob": f"{dataset_path}/fineweb_val_*.bin",
        **({"val_bytes_glob": f"{dataset_path}/fineweb_val_bytes_*.bin"} if caseops else {}),
        **ids,
        "stats": stats,
        **({"val_disjointness": disjointness} if disjointness is not None else {}),
        **({"sha256": shard_sha256} if shard_sha256 is not None else {}),
    }
    return {
        "version": "10B",
        "num_docs": stats["docs_total"],
        "num_val_docs": val_docs,
        "shuffle_seed": None,
        "shard_size": shard_tokens,
        "append_eos": False,
        "docs_jsonl": None,  # built from local inputs, listed in docs_meta.sources; there is no docs_selected.jsonl
        "docs_meta": {
            "remote_repo_id": None,
            "remote_root": None,
            "num_docs": stats["docs_total"],
            "docs_sha256": None,
            "source_manifest": None,
            "sources": source.describe(),
        },
        "tokenizer_specs": _merge_entries(existing.get("tokenizer_specs", []), spec),
        "tokenizers": _merge_entries(existing.get("tokenizers", []), tokenizer_entry),
        "datasets": _merge_entries(existing.get("datasets", []), dataset_entry),
    }
