"""bench/quant_table.py and bench/eval_table.py run end to end at smoke-test size and print parseable markdown.

``--quick`` trains the demo config for 3 steps of 1,024 tokens (through the real CLI, in a work dir whose
``data/demo`` is the session's embedded dataset), then runs 3 export variants / 4 evaluation passes on 1-2 K val
tokens. The two scripts share one work dir, so the eval test reuses the weights the quant test cached (it trains
them itself when run alone). The checks are structural: every table parses, its numeric cells are finite, the
byte counts are positive, and the TTT-with-0-epochs pass equals exact sliding eval. Nothing about speed or about
the size of any gap is asserted (a 3-step model says nothing about those).
"""

from __future__ import annotations

import importlib
import math
import re

import pytest

from conftest import ROOT

DEMO = str(ROOT / "configs" / "demo_cpu.yaml")
NUMBER = re.compile(r"^[+\-−]?\d[\d,]*(\.\d+)?([eE][+\-]?\d+)?$")


@pytest.fixture(scope="module")
def work(tmp_path_factory, embedded_data_root):
    w = tmp_path_factory.mktemp("bench_tables")
    (w / "data").mkdir()
    (w / "data" / "demo").symlink_to(embedded_data_root, target_is_directory=True)
    return w


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module


def tables(text: str) -> list[dict]:
    """Every markdown table of ``text``: {'headers': [...], 'rows': [[...], ...]}; checks the shape."""
    found, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            cells = [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in block]
            headers, sep, rows = cells[0], cells[1], cells[2:]
            assert all(set(c) <= set("-:") and c for c in sep), block[1]
            assert all(len(r) == len(headers) for r in rows), block
            found.append({"headers": headers, "rows": rows})
            block = []
    return found


def as_number(cell: str):
    """The cell's number (commas, a leading sign and a trailing '(…)' note allowed), or None for text."""
    head = cell.split(" (")[0].replace("**", "").strip()
    if not NUMBER.match(head):
        return None
    return float(head.replace(",", "").replace("−", "-"))


def column(table: dict, name: str) -> list[float]:
    i = table["headers"].index(name)
    values = [as_number(r[i]) for r in table["rows"]]
    assert all(v is not None and math.isfinite(v) for v in values), (name, [r[i] for r in table["rows"]])
    return values


def finite_cells(table: dict) -> None:
    for row in table["rows"]:
        for cell in row:
            v = as_number(cell)
            assert v is None or math.isfinite(v), cell


@pytest.mark.slow  # ~9 s: trains and exports a model for the quant table
def test_quant_table_quick(bench, work, capsys):
    out = work / "quant.md"
    text = bench("quant_table").main(["--work", str(work), "--quick", "--configs", DEMO, "--out", str(out)])
    assert out.read_text() == text
    assert text.strip() in capsys.readouterr().out  # tables on stdout, progress on stderr
    found = tables(text)
    for t in found:
        finite_cells(t)
    gap = next(t for t in found if "gap (post − pre)" in t["headers"])
    assert len(gap["rows"]) == 3
    assert all(v > 0 for v in column(gap, "model bytes") + column(gap, "code bytes"))
    pre, post, diff = column(gap, "pre BPB"), column(gap, "post BPB"), column(gap, "gap (post − pre)")
    assert all(abs(p - q - d) < 2e-5 for p, q, d in zip(post, pre, diff))
    codecs = next(t for t in found if "zlib-9 +shuffle" in t["headers"] and "best" in t["headers"])
    assert all(v > 0 for v in column(codecs, "zlib-9") + column(codecs, "zlib-9 +shuffle"))
    hessian = next(t for t in found if "GPTQ / RTN" in t["headers"])
    assert {r[0] for r in hessian["rows"]} >= {"attn", "mlp", "embed"}
    assert all(v >= 0 for v in column(hessian, "GPTQ / RTN"))
    timing = next(t for t in found if "export total" in t["headers"])
    assert all(v >= 0 for v in column(timing, "quantize") + column(timing, "export total"))
    assert "mean over the seed logs" in text and "#1394 0.0121" in text


def test_eval_table_quick(bench, work, capsys):
    out = work / "eval.md"
    text = bench("eval_table").main(
        ["--work", str(work), "--quick", "--no-audit", "--configs", DEMO, "--out", str(out)]
    )
    assert out.read_text() == text
    found = tables(text)
    assert len(found) == 1
    t = found[0]
    finite_cells(t)
    keys = [r[0] for r in t["rows"]]
    assert len(keys) == 4 and keys[0].startswith("standard") and keys[1].startswith("sliding, exact")
    bpb = column(t, "BPB")
    assert all(0 < v < 20 for v in bpb)
    assert all(v >= 0 for v in column(t, "eval s")) and all(v > 0 for v in column(t, "scored"))
    m = re.search(r"`ttt_epochs0` − `sliding_exact` = ([0-9.e+\-]+) BPB", text)
    assert m and float(m.group(1)) < 1e-6, text
    assert "PR #1263 logs/seed{1337,42,7}.log" in text


@pytest.mark.slow
def test_eval_table_audit_section(bench):
    """The audit table (~40-70 s on a shared 2-core machine): parses, and the compliant set is the expected one."""
    text = bench("eval_table").audit_section()
    (t,) = tables(text)
    verdict = {r[0]: r[-1] for r in t["rows"]}
    assert {k for k, v in verdict.items() if v == "yes"} == {
        "standard",
        "sliding_exact",
        "causal_slot_per_window",
        "ttt_exact",
        "ttt_exact_hash_embed",  # PR #1529's TTT-time hash embedding trains after scoring, as the adapted weights
        "doc_isolated",  # PR #1855's diagnostic and its score-first phased TTT audit compliant too
        "phased_ttt",
        "phased_ttt_no_qv",
    }
