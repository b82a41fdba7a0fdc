"""``pgolf data build``: real SentencePiece training on real text, real shards on disk, upstream export rules."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pgolf_lit.data import build, shard_export
from pgolf_lit.tools import data_cmd
from pgolf_lit.data.corpus import embedded_corpus, pack_paragraphs, split_paragraphs
from pgolf_lit.data.shards import load_shard, read_num_tokens
from pgolf_lit.data.tokenizer import SPACE, file_sha256, load_tokenizer
from pgolf_lit.errors import DataError

VOCAB = 512
SHARD_TOKENS = 7_000  # small enough that the training split spans several shards and documents cross shard ends
VAL_DOCS = 6
NON_ASCII_DOC = "Café, naïve — “quoted” ✓ 東京\n\n  with   runs of   spaces\tand a tab.  "


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A .jsonl and a .txt file of real English (Python's reference manual) plus the documents they hold, in order."""
    root = tmp_path_factory.mktemp("inputs")
    texts = embedded_corpus(include_docstrings=False)
    jsonl_docs = texts[:60] + [NON_ASCII_DOC, ""]  # an empty document becomes a lone BOS, as upstream
    with open(root / "a.jsonl", "w", encoding="utf-8") as f:
        for text in jsonl_docs:
            f.write(json.dumps({"text": text, "id": "ignored"}) + "\n")
    paragraphs = [p for text in texts[60:90] for p in split_paragraphs(text)]
    (root / "b.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return root, jsonl_docs + paragraphs


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory):
    root, docs = inputs
    out = tmp_path_factory.mktemp("built")
    manifest = build.build_dataset(
        [root / "a.jsonl", root / "b.txt"], VOCAB, out, val_docs=VAL_DOCS, shard_tokens=SHARD_TOKENS, progress=False
    )
    return out, manifest, docs


def dataset_dir(out, vocab=VOCAB):
    return out / "datasets" / f"fineweb10B_sp{vocab}"


def split_stream(out, split, vocab=VOCAB):
    files = sorted(dataset_dir(out, vocab).glob(f"fineweb_{split}_*.bin"))
    return files, np.concatenate([np.asarray(load_shard(f, vocab)) for f in files])


def documents_of(stream):
    """Token lists of the documents of a stream (every document starts with BOS = 1)."""
    starts = np.flatnonzero(stream == 1).tolist() + [stream.size]
    return [stream[a + 1 : b].tolist() for a, b in zip(starts, starts[1:])]


def normalized(sp, text):
    return sp.normalize(text).replace(SPACE, " ")


def test_layout(built):
    out, _, _ = built
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    train = [n for n in names if "fineweb_train_" in n]
    assert names == sorted(
        [
            "datasets",
            "datasets/fineweb10B_sp512",
            "manifest.json",
            "tokenizers",
            "tokenizers/fineweb_512_bpe.model",
            "tokenizers/fineweb_512_bpe.vocab",
            "datasets/fineweb10B_sp512/fineweb_val_000000.bin",
            *train,
        ]
    )
    assert len(train) >= 3 and train[0].endswith("fineweb_train_000000.bin")
    assert load_tokenizer(out / "tokenizers/fineweb_512_bpe.model", VOCAB).vocab_size() == VOCAB


def test_manifest_matches_shards_on_disk(built):
    out, manifest, docs = built
    assert json.loads((out / "manifest.json").read_text()) == manifest
    (dataset,) = manifest["datasets"]
    (tokenizer,) = manifest["tokenizers"]
    stats = dataset["stats"]
    for split in ("val", "train"):
        files, stream = split_stream(out, split)
        assert stats[f"files_{split}"] == len(files)
        assert stats[f"tokens_{split}"] == sum(read_num_tokens(f) for f in files) == stream.size
        assert stats[f"docs_{split}"] == int((stream == 1).sum())
        assert all(read_num_tokens(f) == SHARD_TOKENS for f in files[:-1])
    assert stats["docs_val"] == manifest["num_val_docs"] == VAL_DOCS
    assert stats["docs_total"] == manifest["num_docs"] == len(docs)
    assert stats["tokens_total"] == stats["tokens_val"] + stats["tokens_train"]
    assert dataset["name"] == "fineweb10B_sp512" and dataset["path"] == "datasets/fineweb10B_sp512"
    assert dataset["train_glob"] == "datasets/fineweb10B_sp512/fineweb_train_*.bin"
    assert dataset["tokenizer_name"] == tokenizer["name"] == "sp_bpe_512"
    assert (dataset["bos_id"], dataset["eos_id"], dataset["recommended_bigram_vocab_size"]) == (1, 2, 2560)
    assert tokenizer["model_path"] == "tokenizers/fineweb_512_bpe.model"
    assert tokenizer["vocab_path"] == "tokenizers/fineweb_512_bpe.vocab"
    assert tokenizer["sha256"] == file_sha256(out / tokenizer["model_path"])
    shards = sorted(dataset_dir(out).iterdir())
    assert dataset["sha256"] == {f.name: file_sha256(f) for f in shards}
    assert dataset["val_disjointness"]["checked"] and dataset["val_disjointness"]["val_docs_in_train"] == 0
    assert (manifest["version"], manifest["shard_size"], manifest["append_eos"]) == ("10B", SHARD_TOKENS, False)


def test_shards_start_with_bos_and_round_trip_the_text(built):
    out, _, docs = built
    sp = load_tokenizer(out / "tokenizers/fineweb_512_bpe.model")
    assert sp.is_byte(4)  # the upstream export settings: byte fallback, so no text becomes <unk>
    val_files, val = split_stream(out, "val")
    train_files, train = split_stream(out, "train")
    assert read_num_tokens(val_files[0]) == val.size  # the val split is one shard ending on a document boundary
    for f in (val_files[0], train_files[0]):
        assert int(load_shard(f)[0]) == 1
    decoded = [sp.decode(ids) for ids in documents_of(val) + documents_of(train)]
    assert decoded == [normalized(sp, text) for text in docs]
    # nmt_nfkc normalization: whitespace runs collapse, the ends are stripped; byte fallback keeps every character
    assert decoded[docs.index(NON_ASCII_DOC)] == "Café, naïve — “quoted” ✓ 東京 with runs of spaces and a tab."
    assert decoded[-len(docs) + docs.index("")] == ""  # the empty document is a lone BOS


def test_reusing_the_tokenizer_gives_identical_shards(built, inputs, tmp_path):
    out, manifest, _ = built
    root, _ = inputs
    model = tmp_path / "given" / "my.model"
    model.parent.mkdir()
    shutil.copyfile(out / "tokenizers/fineweb_512_bpe.model", model)  # no .vocab beside it
    again = tmp_path / "again"
    reused = data_cmd.build_main(
        [
            "--input",
            str(root),
            "--vocab-size",
            "512",
            "--out",
            str(again),
            "--val-docs",
            str(VAL_DOCS),
            "--shard-tokens",
            str(SHARD_TOKENS),
            "--tokenizer",
            str(model),
            "--no-progress",
        ]
    )
    assert reused == 0
    second = json.loads((again / "manifest.json").read_text())
    assert second["tokenizers"][0]["sha256"] == manifest["tokenizers"][0]["sha256"]
    assert "vocab_path" not in second["tokenizers"][0]
    assert not (again / "tokenizers/fineweb_512_bpe.vocab").exists()
    assert second["datasets"][0]["stats"] == manifest["datasets"][0]["stats"]
    for f in sorted(dataset_dir(out).iterdir()):
        assert (dataset_dir(again) / f.name).read_bytes() == f.read_bytes()


def test_reused_tokenizer_with_another_vocab_size_is_named(built, inputs, tmp_path):
    out, _, _ = built
    root, _ = inputs
    model = out / "tokenizers/fineweb_512_bpe.model"
    with pytest.raises(DataError, match=f"{model}.*vocab_size 512.*1024"):
        build.build_dataset([root], 1024, tmp_path / "o", val_docs=2, tokenizer_path=model, progress=False)


def test_second_vocab_joins_the_manifest(built, inputs, tmp_path):
    out, _, _ = built
    root, _ = inputs
    shutil.copytree(out, tmp_path / "both")
    build.build_dataset([root / "a.jsonl"], 384, tmp_path / "both", val_docs=5, progress=False)
    manifest = json.loads((tmp_path / "both/manifest.json").read_text())
    assert [d["name"] for d in manifest["datasets"]] == ["fineweb10B_sp512", "fineweb10B_sp384"]
    assert [t["name"] for t in manifest["tokenizers"]] == ["sp_bpe_512", "sp_bpe_384"]
    assert (tmp_path / "both/datasets/fineweb10B_sp512/fineweb_val_000000.bin").is_file()


def test_txt_file_mode_makes_one_document_per_file(tmp_path):
    texts = embedded_corpus(include_docstrings=False)[:40]
    for i, text in enumerate(texts):
        (tmp_path / "in" / f"{i:02d}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    manifest = build.build_dataset(
        [tmp_path / "in"], 384, tmp_path / "out", val_docs=4, txt_mode="file", progress=False
    )
    assert manifest["num_docs"] == 40 and manifest["datasets"][0]["stats"]["docs_val"] == 4


def test_a_repeated_validation_document_builds_and_its_training_copy_is_dropped(tmp_path, capsys):
    """A corpus of short repeated texts (as a multilingual corpus of short texts has): the build goes through, the
    training copies of validation documents are dropped and counted; copies among training documents, or within
    the validation split, are not validation text in training and stay."""
    texts = embedded_corpus(include_docstrings=False)[:20]
    docs = [texts[0], texts[1], texts[0], *texts[2:10], texts[1], texts[10], texts[1], texts[10], *texts[11:]]
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"text": t}) for t in docs])
    out = tmp_path / "out"
    data_cmd.build_main(
        ["--input", str(path), "--vocab-size", "384", "--out", str(out), "--val-docs", "3", "--no-progress"]
    )
    printed = capsys.readouterr().out
    assert (
        f"train/val disjoint: dropped 2 training copies of validation documents from the training split (the "
        f"first: {path}:12 repeats {path}:2)" in printed
    )
    manifest = json.loads((out / "manifest.json").read_text())
    (dataset,) = manifest["datasets"]
    assert dataset["val_disjointness"]["train_copies_of_val_docs"] == 2
    assert dataset["val_disjointness"]["val_docs_in_train"] == 0
    sp = load_tokenizer(out / "tokenizers/fineweb_384_bpe.model")
    _, val = split_stream(out, "val", 384)
    _, train = split_stream(out, "train", 384)
    assert [sp.decode(d) for d in documents_of(val)] == [normalized(sp, t) for t in docs[:3]]
    kept = docs[3:11] + [texts[10], texts[10], *texts[11:]]  # both copies of texts[1] left out
    assert [sp.decode(d) for d in documents_of(train)] == [normalized(sp, t) for t in kept]


def test_failed_build_leaves_nothing_behind(inputs, tmp_path, monkeypatch):
    root, _ = inputs
    calls = []

    def write_then_fail(path, tokens):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        return real_write(path, tokens)

    real_write = shard_export.write_shard
    monkeypatch.setattr(shard_export, "write_shard", write_then_fail)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="injected"):
        build.build_dataset([root], VOCAB, out, val_docs=VAL_DOCS, shard_tokens=SHARD_TOKENS, progress=False)
    assert len(calls) == 2
    assert list(out.rglob("*")) == []


def test_failed_rebuild_keeps_the_previous_build(built, inputs, tmp_path, monkeypatch):
    out, _, _ = built
    root, _ = inputs
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # the user stops a long export

    monkeypatch.setattr(shard_export, "write_shard", fail)
    with pytest.raises(KeyboardInterrupt):
        build.build_dataset([root], VOCAB, copy, val_docs=3, shard_tokens=SHARD_TOKENS, progress=False)
    assert {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


# ------------------------------------------------------------------------------------------------ error cases


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"text": "cut off', "unreadable JSON line"),
        ('["a list"]', 'expected a JSON object with a string "text"'),
        ('{"body": "no text key"}', 'expected a JSON object with a string "text"'),
        ('{"text": 42}', 'expected a JSON object with a string "text"'),
    ],
)
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, expected):
    path = write_jsonl(tmp_path / "docs.jsonl", ['{"text": "fine"}', "", line])
    with pytest.raises(DataError, match=f"{path}:3: {expected}"):
        build.build_dataset([path], 300, tmp_path / "out", val_docs=1, progress=False)
    assert not (tmp_path / "out").exists()  # inputs are read and checked before anything is written


def test_no_input_files(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"no input files.*{tmp_path / 'empty'}"):
        build.build_dataset([tmp_path / "empty"], 300, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="missing.txt: input not found"):
        build.build_dataset([tmp_path / "missing.txt"], 300, tmp_path / "out", progress=False)
    (tmp_path / "notes.md").write_text("text")
    with pytest.raises(DataError, match="notes.md: unsupported input file type"):
        build.build_dataset([tmp_path / "notes.md"], 300, tmp_path / "out", progress=False)


def test_empty_text_set(tmp_path):
    path = write_jsonl(tmp_path / "blank.jsonl", ['{"text": ""}', '{"text": "  \\n "}'])
    with pytest.raises(DataError, match=f"empty text set.*{path}"):
        build.build_dataset([path], 300, tmp_path / "out", val_docs=1, progress=False)


def test_val_docs_must_leave_training_documents(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"text": "one"}', '{"text": "two"}', '{"text": "three"}'])
    with pytest.raises(DataError, match="val_docs 3: the inputs hold 3 documents"):
        build.build_dataset([path], 300, tmp_path / "out", val_docs=3, progress=False)
    with pytest.raises(DataError, match="val_docs 0"):
        build.build_dataset([path], 300, tmp_path / "out", val_docs=0, progress=False)


def test_vocab_too_large_for_uint16(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"text": "one"}', '{"text": "two"}'])
    with pytest.raises(DataError, match="vocab_size 70000: shard tokens are uint16"):
        data_cmd.build_main(["--input", str(path), "--vocab-size", "70000", "--out", str(tmp_path / "out")])


def test_vocab_larger_than_the_text_supports(tmp_path):
    texts = embedded_corpus(include_docstrings=False)[:5]
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"text": t}) for t in texts])
    with pytest.raises(DataError, match="only supports .* pieces, fewer than --vocab-size 8192"):
        build.build_dataset([path], 8192, tmp_path / "out", val_docs=1, progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == []


# ------------------------------------------------------------------------------------------------ embedded corpus


def test_pack_paragraphs_respects_the_limit_and_keeps_order():
    paragraphs = ["a" * 400, "b" * 700, "c" * 500, "d" * 2000, "e" * 10]
    assert pack_paragraphs(paragraphs, max_chars=1500) == [
        "a" * 400 + "\n\n" + "b" * 700,
        "c" * 500,
        "d" * 2000,
        "e" * 10,
    ]


def test_embedded_corpus_is_deterministic_and_big_enough(tmp_path):
    docs = embedded_corpus()
    assert docs == embedded_corpus() and len(set(docs)) == len(docs)
    assert len(docs) > 800 and sum(map(len, docs)) > 1_000_000
    manifest = build.build_embedded_dataset(tmp_path / "datasets/fineweb10B_sp1024", 1024, progress=False)
    assert (tmp_path / "datasets/fineweb10B_sp1024/fineweb_train_000000.bin").is_file()
    assert (tmp_path / "tokenizers/fineweb_1024_bpe.model").is_file()
    stats = manifest["datasets"][0]["stats"]
    assert stats["docs_val"] == len(docs) // 10
    assert stats["tokens_total"] > 400_000 and stats["tokens_val"] > 30_000
    assert stats["files_val"] == 1 and stats["files_train"] >= 4
    assert manifest["docs_meta"]["sources"] == ["embedded:python-stdlib-docs"]


def test_embedded_dataset_folder_must_follow_the_layout(tmp_path):
    with pytest.raises(DataError, match="expected a dataset folder named <root>/datasets/<name>_sp1024"):
        build.build_embedded_dataset(tmp_path / "datasets/fineweb10B_sp4096", 1024, progress=False)
