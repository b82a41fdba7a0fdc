"""The benchmark scripts of bench/ run end to end at tiny size on CPU and print their machine-readable lines.

These are smoke tests, not speed tests: they parse the numbers and check that they are positive and finite,
never how fast anything is (the machine is shared). The demo config is shrunk to 1,024 tokens per step so
the whole file stays well under a minute (after the session's embedded dataset is built); eval speed uses
the PR #1321 tiny config, whose SLOT windows are 128 tokens.
"""

from __future__ import annotations

import importlib
import math
import re

import pytest
import torch

from conftest import ROOT

DEMO = str(ROOT / "configs" / "demo_cpu.yaml")
SLOT_TINY = str(ROOT / "configs" / "records" / "pr1321_slot48_tiny.yaml")  # small SLOT windows (128 tokens)
TINY_RUN = ["--", "--data.train_batch_tokens", "1024", "--trainer.enable_progress_bar", "false"]
NUMBER = r"([-+0-9.eE]+|nan|inf)"


@pytest.fixture
def bench(monkeypatch, run_cwd):
    """Import a bench/ script by name, running from a directory that holds the embedded demo dataset."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module


def _positive_finite(text: str) -> float:
    value = float(text)
    assert math.isfinite(value) and value > 0, text
    return value


def test_throughput_prints_a_ratio_line(bench, capsys):
    result = bench("throughput").main(
        ["--config", DEMO, "--steps", "2", "--warmup", "1", "--rounds", "2", "--device", "cpu", *TINY_RUN]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(
        rf"throughput lightning_tok_s={NUMBER} plain_tok_s={NUMBER} ratio={NUMBER} device=cpu "
        r"config=demo_cpu\.yaml steps=2",
        last,
    )
    assert m, last
    lightning, plain, ratio = (_positive_finite(g) for g in m.groups())
    assert len(result["rates"]["lightning"]) == len(result["rates"]["plain"]) == 2
    assert lightning == pytest.approx(result["lightning_tok_s"], rel=1e-3)
    assert plain == pytest.approx(result["plain_tok_s"], rel=1e-3)
    assert ratio == pytest.approx(result["ratio"], rel=1e-3)


def test_eval_speed_prints_a_line_per_method(bench, capsys):
    bench("eval_speed").main(
        [
            "--config",
            SLOT_TINY,
            "--methods",
            "sliding",
            "slot",
            "--val-tokens",
            "2048",
            "--repeats",
            "1",
            "--device",
            "cpu",
        ]
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("eval ")]
    assert [re.search(r"method=(\w+)", line).group(1) for line in lines] == ["sliding", "slot"]
    for line in lines:
        m = re.search(rf"tokens=(\d+) first_ms={NUMBER} eval_ms={NUMBER} tok_s={NUMBER} device=cpu", line)
        assert m, line
        for value in m.groups():
            _positive_finite(value)


def test_host_syncs_lists_sites_per_step(bench, capsys):
    sites = bench("host_syncs").main(["--config", DEMO, "--steps", "2", "--warmup", "1", "--device", "cpu", *TINY_RUN])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(rf"host_syncs per_step={NUMBER} device=cpu config=demo_cpu\.yaml", last)
    assert m, last
    assert float(m.group(1)) == pytest.approx(sum(sites.values()) / 2)
    assert all(count > 0 and site for site, count in sites.items())


@pytest.mark.slow  # ~7 s: re-encodes the record artifact in every container
def test_container_compare_reencodes_the_record_artifact_and_prints_a_ratio(bench, capsys):
    import shutil

    if shutil.which("lrzip") is None:
        pytest.skip("lrzip not on PATH")
    module = bench("container_compare")
    artifact = module.default_artifact()
    if not artifact.is_file():
        pytest.skip(f"no PR #1855 quant fixture at {artifact}")
    text = module.main([str(artifact)])
    assert text in capsys.readouterr().out
    assert "byte-identical to the input" in text  # the re-encoded PGRP is the record's file
    sizes = [int(m.replace(",", "")) for m in re.findall(r"^\| [^|]+ \| ([0-9,]+) \|", text, re.M)]
    assert len(sizes) == 4 and all(s > 0 for s in sizes)
    ratio = _positive_finite(re.search(rf"ratio PGRP / best single stream = {NUMBER}", text).group(1))
    assert abs(ratio - sizes[0] / min(sizes[2:])) < 1e-3


PR1855_TINY = str(ROOT / "configs" / "records" / "pr1855_sp8192_lqer_sparsegate_tiny.yaml")


@pytest.mark.slow  # ~25 s: four fits of the PR #1855 twin
def test_throughput_and_step_anatomy_run_the_packed_record(bench, capsys):
    """PR #1855 trains on packed rows (x, y, cu_seqlens): the plain loop takes them, and the step anatomy times the
    record with each switch off in turn, beside the record's own logged ms/step."""
    tiny_run = ["--config", PR1855_TINY, "--steps", "2", "--warmup", "1", "--rounds", "1", "--device", "cpu"]
    tiny_run += ["--", "--trainer.enable_progress_bar", "false"]
    bench("throughput").main(tiny_run)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"throughput lightning_tok_s={NUMBER} plain_tok_s={NUMBER} ratio={NUMBER} device=cpu "
        r"config=pr1855_sp8192_lqer_sparsegate_tiny\.yaml steps=2",
        last,
    ), last

    result = bench("step_anatomy").main(tiny_run)
    out = capsys.readouterr().out
    table = out[out.index("\nstep anatomy\n") :]
    rows = {label: [_positive_finite(s) for s in seconds] for label, seconds in result["rows"].items()}
    assert list(rows)[0] == "as shipped" and any(label.startswith("1 off: varlen") for label in rows)
    assert any(label.startswith("2 off: Checkpoint") for label in rows)
    assert any(label.startswith("4 off: fused kernels") for label in rows)  # the record's config turns them on
    for label in rows:
        assert re.search(rf"^{re.escape(label)} +[0-9.]+ +[0-9.]+x$", table, re.M), (label, table)
    assert "3 world" in table and "5 off: fp32 gradient reduction" in table
    # the record's logged ms/step: 599,433 ms / 4,932 steps and its two other seeds (upstream train_seed*.log)
    assert result["record_ms"] == pytest.approx(121.6, abs=0.1)
    assert re.search(
        r"^step_anatomy shipped_ms=[0-9.]+ record_ms=121\.\d+ config=pr1855_sp8192_lqer_sparsegate_tiny"
        r"\.yaml device=cpu$",
        out,
        re.M,
    )


def test_ngram_tilt_bench_times_the_hints(monkeypatch, capsys):
    """bench/ngram_tilt.py at a small size: its line carries the measured time and the hints of that stream."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    module = importlib.import_module("ngram_tilt")
    threads = torch.get_num_threads()
    try:
        result = module.main(["--tokens", "50000", "--vocab", "512"])  # one core, as the bench states its budget
    finally:
        torch.set_num_threads(threads)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(
        rf"ngram_tilt tokens:50000 vocab:512 order:16 threads:1 compile_s:{NUMBER} hints_s:{NUMBER} "
        rf"hints_per_s:([0-9,]+) gated:(\d+) \({NUMBER} %\)",
        line,
    )
    assert m, line
    assert float(m.group(2)) == pytest.approx(result["hints_s"], abs=0.01) and result["hints_s"] > 0
    from pgolf_lit.eval.ngram_tilt import NgramTiltSettings, build_hints

    stream = module.synthetic_stream(50000, 512)
    assert int(m.group(4)) == result["gated"] == build_hints(stream, NgramTiltSettings()).gated > 0
