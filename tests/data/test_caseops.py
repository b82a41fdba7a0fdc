"""CaseOps (PR #1855): the lossless case transform, the SentencePiece build with its byte sidecar, the sidecar
reader; checked against the record's fixtures (``data/pr1855_caseops``) and a held-out multilingual corpus."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from conftest import fixture_root, shared_tokenizer
from pgolf_lit.data import build
from pgolf_lit.data.caseops import (
    OPERATORS,
    CaseOpsError,
    decode_caseops,
    encode_caseops,
    is_caseops_tokenizer,
    original_byte_counts,
)
from pgolf_lit.data.corpus import embedded_corpus
from pgolf_lit.data.shards import (
    byte_sidecar_name,
    list_shards,
    load_shard,
    load_validation_byte_sidecar,
    load_validation_tokens,
)
from pgolf_lit.data.tokenizer import SPACE, default_tokenizer_path, load_tokenizer
from pgolf_lit.data.shards_write import write_shard
from pgolf_lit.data.tokenizer_train import encode_with_surfaces
from pgolf_lit.errors import DataError, PgolfError
from pgolf_lit.tools import data_cmd

FIXTURES = fixture_root("PGOLF_PR1855_FIXTURES", "pr1855")
CASE = FIXTURES / "data" / "pr1855_caseops" if FIXTURES else None
needs_fixture = pytest.mark.skipif(
    CASE is None or not CASE.is_dir(), reason="no PR #1855 fixtures: set PGOLF_PR1855_FIXTURES or provide ../shared"
)


def fixture_json(name: str):
    return json.loads((CASE / name).read_text(encoding="utf-8"))


def fixture_tokenizer_path():
    return CASE.parent / "tokenizers" / fixture_json("documents.json")["tokenizer"]


def normalized(sp, text: str) -> str:
    """The text as the tokenizer's normalizer leaves it (nmt_nfkc, whitespace runs collapsed, ends stripped)."""
    return sp.normalize(text).replace(SPACE, " ")


def documents_of(stream: np.ndarray, bos: int = 1) -> list[tuple[int, int]]:
    """(start, end) of each document of a token stream; every document starts with BOS."""
    starts = np.flatnonzero(stream == bos).tolist() + [stream.size]
    return list(zip(starts, starts[1:]))


def write_docs(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ the transform


@needs_fixture
def test_fixture_strings_encode_and_decode_exactly():
    cases = fixture_json("strings.json")["strings"]
    assert cases
    for case in cases:
        assert encode_caseops(case["text"]) == case["encoded"], case["name"]
        assert decode_caseops(case["encoded"]) == case["decoded"], case["name"]
        assert (case["decoded"] == case["text"]) == case["roundtrip_ok"], case["name"]
        assert len(case["text"].encode("utf-8")) == case["utf8_bytes_text"], case["name"]


@needs_fixture
def test_fixture_malformed_inputs_are_one_clear_line():
    for case in fixture_json("strings.json")["decode_errors"]:
        assert case["raises"]
        with pytest.raises(CaseOpsError) as info:
            decode_caseops(case["input"])
        message = str(info.value)
        assert case["error"] in message and "\n" not in message, message
        assert isinstance(info.value, PgolfError)


def test_transform_is_bijective_on_random_strings():
    rng = random.Random(1855)
    alphabet = "aZbYcX   \t\n09._-'é É ß Σ 日 😀" + "\ue000" + "".join(OPERATORS)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        encoded = encode_caseops(text)
        assert decode_caseops(encoded) == text
        assert not any(c.isupper() and c.isascii() for c in encoded)
        # any cut of the encoding into surfaces counts exactly the original bytes
        cuts = sorted(rng.sample(range(len(encoded) + 1), min(3, len(encoded) + 1)))
        surfaces = [encoded[a:b] for a, b in zip([0, *cuts], [*cuts, len(encoded)])]
        assert sum(original_byte_counts(surfaces)) == len(text.encode("utf-8"))


def test_byte_counts_of_operators_escapes_and_split_characters():
    assert original_byte_counts(["\ue001the", " ", "\ue002", "nas", "a"]) == [3, 1, 0, 3, 1]
    assert original_byte_counts(["\ue004", "\ue001", "é", ""]) == [0, 3, 2, 0]
    with pytest.raises(CaseOpsError, match="dangling capitalization marker.*piece 2"):
        original_byte_counts(["a ", "\ue001"])


# ------------------------------------------------------------------------------------------------ the record's data


@needs_fixture
def test_fixture_documents_tokens_surfaces_and_sidecar():
    meta = fixture_json("documents.json")
    sp = load_tokenizer(fixture_tokenizer_path())
    assert is_caseops_tokenizer(sp)
    assert sp.vocab_size() == meta["special_ids"]["vocab_size"]
    docs = meta["documents"]
    encoded = encode_with_surfaces(sp, [encode_caseops(d["text"]) for d in docs])
    for doc, (ids, surfaces) in zip(docs, encoded):
        assert encode_caseops(doc["text"]) == doc["transformed"]
        assert [meta["bos_id"], *ids] == doc["token_ids"]
        assert ["", *surfaces] == doc["surfaces"]
        assert [0, *original_byte_counts(surfaces)] == doc["sidecar_bytes"]
        assert sum(doc["sidecar_bytes"]) == doc["sidecar_sum"] == doc["utf8_bytes_text_stripped"]
        assert decode_caseops(sp.decode(ids)) == doc["decode(sp.decode(ids[1:]))"]


@needs_fixture
def test_fixture_shards_are_rebuilt_byte_for_byte(tmp_path):
    """``pgolf data build --caseops --tokenizer <the record's model>`` on the fixture's documents writes the
    fixture's val shard and byte sidecar exactly (one extra document is the required training split)."""
    meta = fixture_json("documents.json")
    assert meta["shards"]["equal_to_concatenated_documents"]  # every fixture document is a val document
    texts = [d["text"] for d in meta["documents"]]
    inputs = write_docs(tmp_path / "docs.jsonl", [*texts, "One more document, for the training split."])
    out = tmp_path / "out"
    vocab = meta["special_ids"]["vocab_size"]
    data_cmd.main(
        [
            "build",
            "--caseops",
            "--input",
            str(inputs),
            "--vocab-size",
            str(vocab),
            "--out",
            str(out),
            "--val-docs",
            str(len(texts)),
            "--tokenizer",
            str(fixture_tokenizer_path()),
            "--no-progress",
        ]
    )
    built = out / "datasets" / f"fineweb10B_sp{vocab}_lossless_caps_caseops_v1_reserved"
    for name in meta["shards"]["files"]:
        assert (built / name).read_bytes() == (CASE / meta["shards"]["dir"] / name).read_bytes(), name
    assert load_shard(built / "fineweb_val_000000.bin").size == meta["shards"]["n_tokens"]
    manifest = json.loads((out / "manifest.json").read_text())
    (dataset,) = manifest["datasets"]
    assert dataset["val_bytes_glob"].endswith("fineweb_val_bytes_*.bin")
    assert manifest["tokenizers"][0]["text_transform"] == "lossless_caps_caseops_v1"


@needs_fixture
def test_sidecar_reader_on_the_fixture_shards():
    shards = CASE / fixture_json("documents.json")["shards"]["dir"]
    seq_len = 16
    tokens = load_validation_tokens(shards, seq_len)
    assert list_shards(shards, "val") == [shards / "fineweb_val_000000.bin"]  # the sidecar is not a token shard
    sidecar = load_validation_byte_sidecar(shards, tokens.numel())
    assert sidecar.dtype == torch.int32 and sidecar.shape == tokens.shape
    full = np.asarray(load_shard(shards / byte_sidecar_name(0)))
    assert sidecar.tolist() == full[: tokens.numel()].tolist()
    assert int(sidecar[tokens == 1].sum()) == 0


# ------------------------------------------------------------------------------------------------ a held-out corpus

HELD_OUT = [
    "The WHO and NATO met in Geneva; iPhone-toting McKinsey consultants took notes.",
    "camelCaseIdentifier, snake_case_name, PascalCaseType, XMLHttpRequest and getHTTPResponseCode().",
    "Ünïcödé ÄRGER über Straße; ÉCOLE, Ørsted, Łódź, İstanbul, ǅemal and ΑΘΗΝΑ Σοφία keep their case.",
    "Literal operators \ue000 \ue001 \ue002 \ue003 \ue004 in running text, \ue001Title, \ue002ALL and x\ue004y.",
    "   Leading spaces,\t\ttabs,\n\n\nnewlines   and   runs   of   spaces,   trailing too   ",
    "NFKC changes these: ＡＢＣ ｆｕｌｌｗｉｄｔｈ, ﬁne ﬂow ligatures, ① ½ ™ ℌ and a no-break\u00a0space.",
    "日本語のテキスト 中文 한국어 😀🚀 mixed with ASCII OK and Done.",
    "A I O U. E.G. U.S.A. I'm O'Neill's NASA-JPL R2-D2 C3PO x86_64 IPv6 4K HDR10+.",
    "",
    "ALLCAPS SENTENCE WITH A SHORT A AND LONG WORDS, then lower case.",
    "Zero\u200bwidth space, soft\u00adhyphen, combining e\u0301 versus é, a bell\u0007 and a NUL\x00 inside.",
    "Plain text the normalizer leaves alone: McDonald's sells BigMacs in the USA since 1955.",
]


@pytest.fixture(scope="module")
def held_out_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("held_out")
    filler = embedded_corpus(include_docstrings=False)[:70]  # the training split, and text for the tokenizer
    inputs = write_docs(root / "docs.jsonl", HELD_OUT + filler)
    out = root / "out"
    assert (
        data_cmd.build_main(
            [
                "--caseops",
                "--input",
                str(inputs),
                "--vocab-size",
                "512",
                "--out",
                str(out),
                "--val-docs",
                str(len(HELD_OUT)),
                "--shard-tokens",
                "400",
                "--no-progress",
            ]
        )
        == 0
    )
    return out, HELD_OUT + filler


def test_held_out_corpus_round_trips_through_the_caseops_build(held_out_build):
    out, docs = held_out_build
    dataset = out / "datasets" / "fineweb10B_sp512_lossless_caps_caseops_v1_reserved"
    sp = load_tokenizer(out / "tokenizers" / "fineweb_512_bpe_lossless_caps_caseops_v1_reserved.model", 512)
    assert is_caseops_tokenizer(sp) and sp.is_byte(8)  # operators at 4..7, then the byte pieces
    val = np.concatenate([np.asarray(load_shard(f)) for f in list_shards(dataset, "val")])
    train = np.concatenate([np.asarray(load_shard(f)) for f in list_shards(dataset, "train")])
    sidecar = load_validation_byte_sidecar(dataset, val.size).numpy()
    val_docs, train_docs = documents_of(val), documents_of(train)
    assert len(list_shards(dataset, "val")) >= 2  # the sidecar is read across shard ends
    assert len(val_docs) == len(HELD_OUT) and len(val_docs) + len(train_docs) == len(docs)
    exact = 0
    for (start, end), text in zip(val_docs, HELD_OUT):
        ids = val[start + 1 : end].tolist()
        assert decode_caseops(sp.decode(ids)) == normalized(sp, text), text
        exact += normalized(sp, text) == text
        assert int(sidecar[start]) == 0
        assert int(sidecar[start:end].sum()) == len(text.strip().encode("utf-8")), text
    assert exact >= 4  # several documents the normalizer leaves alone come back exactly
    for (start, end), text in zip(train_docs, docs[len(HELD_OUT) :]):
        assert decode_caseops(sp.decode(train[start + 1 : end].tolist())) == normalized(sp, text)
    assert not list(dataset.glob("fineweb_train_bytes_*"))  # only the val split has a sidecar


def test_caseops_encoding_saves_tokens_on_capitals(held_out_build):
    out, _ = held_out_build
    sp = load_tokenizer(out / "tokenizers" / "fineweb_512_bpe_lossless_caps_caseops_v1_reserved.model")
    # "the", "The" and "THE" share the lowercase pieces; only the operator differs
    lower, title, caps = (sp.encode(encode_caseops(w)) for w in ("the", "The", "THE"))
    assert title == [4, *lower] and caps == [5, *lower]


# ------------------------------------------------------------------------------------------------ bad input


@pytest.fixture
def small_caseops_dataset(held_out_build, tmp_path):
    out, _ = held_out_build
    copy = tmp_path / "ds"
    shutil.copytree(out / "datasets" / "fineweb10B_sp512_lossless_caps_caseops_v1_reserved", copy)
    return copy


def test_corrupt_sidecar_is_named(small_caseops_dataset):
    sidecar = small_caseops_dataset / byte_sidecar_name(0)
    sidecar.write_bytes(sidecar.read_bytes()[:-2])
    with pytest.raises(DataError, match=f"{sidecar}: shard size mismatch"):
        load_validation_byte_sidecar(small_caseops_dataset, 100)


def test_sidecar_length_mismatch_is_named(small_caseops_dataset):
    sidecar = small_caseops_dataset / byte_sidecar_name(0)
    counts = np.asarray(load_shard(sidecar)).copy()
    write_shard(sidecar, counts[:-1])
    with pytest.raises(
        DataError,
        match=f"{sidecar}: byte sidecar has {counts.size - 1} entries, its val shard "
        f"fineweb_val_000000.bin has {counts.size} tokens",
    ) as info:
        load_validation_byte_sidecar(small_caseops_dataset, 100)
    assert "\n" not in str(info.value)


def test_sidecar_with_bytes_on_a_bos_is_named(small_caseops_dataset):
    sidecar = small_caseops_dataset / byte_sidecar_name(0)
    counts = np.asarray(load_shard(sidecar)).copy()
    counts[0] = 7  # the first token of a val shard that starts a document is BOS
    write_shard(sidecar, counts)
    with pytest.raises(DataError, match=f"{sidecar}: entry 0 is 7, but token 0 of fineweb_val_000000.bin is BOS"):
        load_validation_byte_sidecar(small_caseops_dataset, 100)


def test_missing_sidecar_is_named(small_caseops_dataset):
    shards = sorted(small_caseops_dataset.glob("fineweb_val_bytes_*.bin"))
    shards[-1].unlink()
    with pytest.raises(DataError, match=f"{shards[-1]}: byte sidecar missing for val shard"):
        load_validation_byte_sidecar(small_caseops_dataset, 100)
    for f in shards[:-1]:
        f.unlink()
    with pytest.raises(DataError, match="no byte sidecar fineweb_val_bytes_"):
        load_validation_byte_sidecar(small_caseops_dataset, 100)


def test_sidecar_shorter_than_the_tokens_asked_for(small_caseops_dataset):
    total = sum(load_shard(f).size for f in small_caseops_dataset.glob("fineweb_val_bytes_*.bin"))
    with pytest.raises(DataError, match=f"hold {total} entries, fewer than the {total + 1} validation tokens"):
        load_validation_byte_sidecar(small_caseops_dataset, total + 1)


def test_operator_characters_in_a_plain_build(tmp_path):
    path = write_docs(tmp_path / "d.jsonl", ["fine text", "more text", "\ue001already \ue002encoded text"])
    with pytest.raises(DataError, match=f"{path}:3: character 0 is U\\+E001, a CaseOps operator.*--caseops") as info:
        build.build_dataset([path], 300, tmp_path / "out", val_docs=1, progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_tokenizer_kind_must_match_the_build(held_out_build, tmp_path):
    out, _ = held_out_build
    caseops_model = out / "tokenizers" / "fineweb_512_bpe_lossless_caps_caseops_v1_reserved.model"
    path = write_docs(tmp_path / "d.jsonl", ["one document", "another document"])
    with pytest.raises(DataError, match=f"{caseops_model}: a CaseOps tokenizer .*pass --caseops"):
        build.build_dataset([path], 512, tmp_path / "out", val_docs=1, tokenizer_path=caseops_model, progress=False)
    plain_model = shared_tokenizer("fineweb_1024_bpe.model")
    with pytest.raises(DataError, match=f"{plain_model}: not a CaseOps tokenizer: pieces 4..7 are"):
        build.build_dataset(
            [path], 1024, tmp_path / "out", val_docs=1, tokenizer_path=plain_model, progress=False, caseops=True
        )


@pytest.mark.parametrize("caseops", [False, True])
def test_a_validation_document_repeated_in_training_is_dropped_or_counted(tmp_path, caseops):
    texts = embedded_corpus(include_docstrings=False)[:12]
    path = write_docs(tmp_path / "d.jsonl", [*texts, texts[1]])
    manifest = build.build_dataset([path], 512, tmp_path / "out", val_docs=3, progress=False, caseops=caseops)
    (dataset,) = manifest["datasets"]
    assert dataset["stats"]["docs_train"] == 9 and manifest["num_docs"] == 12  # the 13th document was left out
    assert dataset["val_disjointness"] == {
        "checked": "exact document text",
        "train_copies_of_val_docs": 1,
        "dropped": 1,
        "val_docs_in_train": 0,
        "first_copy": {"train": f"{path}:13", "val": f"{path}:2"},
    }
    kept = build.build_dataset(
        [path], 512, tmp_path / "kept", val_docs=3, progress=False, caseops=caseops, keep_val_copies=True
    )
    (dataset,) = kept["datasets"]
    assert dataset["stats"]["docs_train"] == 10
    assert dataset["val_disjointness"]["val_docs_in_train"] == 1 and dataset["val_disjointness"]["dropped"] == 0


def test_val_docs_below_the_declared_validation_set_stops_the_build(tmp_path):
    """The record folder's trap (prepare_caseops_data.py's --val-docs 10000 against the official 50,000)."""
    texts = embedded_corpus(include_docstrings=False)[:40]
    path = write_docs(tmp_path / "docs_selected.jsonl", texts)
    (tmp_path / "docs_selected.source_manifest.json").write_text(json.dumps({"num_docs": 40, "docs_val": 5}))
    with pytest.raises(
        DataError,
        match="val_docs 2: .*docs_selected.source_manifest.json declares the first 5 "
        "documents the validation set, so 3 validation documents would land",
    ):
        build.build_dataset([path], 400, tmp_path / "out", val_docs=2, progress=False, caseops=True)
    manifest = build.build_dataset([path], 400, tmp_path / "out", progress=False, caseops=True)
    assert manifest["num_val_docs"] == 5  # the declared split is the default, as upstream


# ------------------------------------------------------------------------------------------------ embedded twin


def test_embedded_corpus_builds_as_caseops(tmp_path):
    folder = tmp_path / "datasets" / "demo_sp512_lossless_caps_caseops_v1_reserved"
    manifest = build.build_embedded_dataset(folder, 512, progress=False)
    (dataset,) = manifest["datasets"]
    assert dataset["name"] == folder.name and "val_bytes_glob" in dataset
    model = tmp_path / "tokenizers" / "fineweb_512_bpe_lossless_caps_caseops_v1_reserved.model"
    assert default_tokenizer_path(folder, 512) == model
    assert default_tokenizer_path(tmp_path / "datasets" / "demo_sp512", 512).name == "fineweb_512_bpe.model"
    sp = load_tokenizer(model, 512)
    assert is_caseops_tokenizer(sp)
    tokens = load_validation_tokens(folder, 128)
    sidecar = load_validation_byte_sidecar(folder, tokens.numel())
    val_texts = embedded_corpus()[: dataset["stats"]["docs_val"]]
    full = np.concatenate([np.asarray(load_shard(f)) for f in folder.glob("fineweb_val_bytes_*.bin")])
    assert int(full.sum()) == sum(len(t.strip().encode("utf-8")) for t in val_texts)
    assert int(sidecar.sum()) <= int(full.sum())
    assert len(list(folder.glob("fineweb_train_*.bin"))) >= 2
    with pytest.raises(DataError, match="expected a dataset folder named <root>/datasets/<name>_sp512_lossless"):
        build.build_embedded_dataset(tmp_path / "datasets" / "demo_sp512", 512, progress=False, caseops=True)
