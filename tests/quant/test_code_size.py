"""Honest code bytes (``pgolf_lit/quant/code_size.py``): what an artifact's config counts, the records' minify and
wrapper, and the wrapper as a real program (a clean interpreter, no installed package, scores an artifact)."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import brotli
import pytest
import torch

from pgolf_lit.eval.registry import eval_methods
from pgolf_lit.model.config import GPTConfig
from pgolf_lit.quant import code_size
from pgolf_lit.quant.code_size import (
    EVAL_ENTRY,
    WRAPPER_HEAD,
    code_files,
    entry_modules,
    measure_code_size,
    minify,
    package_program,
    wrap,
)
from pgolf_lit.quant.reader import CONTAINERS
from pgolf_lit.records import record_config, record_export_config, record_test_methods

PR1855_TWIN = "pr1855_sp8192_lqer_sparsegate_tiny"
PR2135_TWIN = "pr2135_calib32_ngram_tilt_tiny"
# What reading and scoring an artifact never needs: the export (quantizers, GPTQ solver, Hessians, calibration,
# pruning search, encoders, the code counter), training, data building, the YAML configs, the fused kernels.
EXPORT_AND_TRAINING = {
    "pgolf_lit/quant/export.py",
    "pgolf_lit/quant/gptq.py",
    "pgolf_lit/quant/hessians.py",
    "pgolf_lit/quant/calibration.py",
    "pgolf_lit/quant/prune.py",
    "pgolf_lit/quant/quantizers.py",
    "pgolf_lit/quant/rtn.py",
    "pgolf_lit/quant/lqer.py",
    "pgolf_lit/quant/pergroup.py",
    "pgolf_lit/quant/artifact.py",
    "pgolf_lit/quant/gate.py",
    "pgolf_lit/quant/code_size.py",
    "pgolf_lit/quant/__init__.py",
    "pgolf_lit/eval/__init__.py",
    "pgolf_lit/eval/audit.py",
    "pgolf_lit/module.py",
    "pgolf_lit/optim/muon.py",
    "pgolf_lit/config.py",
    "pgolf_lit/data/tokenizer_train.py",
    "pgolf_lit/data/shards_write.py",
    "pgolf_lit/data/caseops.py",
    "pgolf_lit/data/build.py",
    "pgolf_lit/data/documents.py",
    "pgolf_lit/data/val_split.py",
    "pgolf_lit/data/shard_export.py",
    "pgolf_lit/data/manifest.py",
    "pgolf_lit/model/convert.py",
    "pgolf_lit/model/fused_mlp.py",
    "pgolf_lit/model/fused_kernels.py",
    "pgolf_lit/quant/lrzip.py",
    "pgolf_lit/model/fused_softcap_ce.py",
    "pgolf_lit/fileio.py",
}


def config_code(record: str):
    """(formats, methods) of a record config: its export container and its scored passes."""
    return (record_export_config(record).format,), record_test_methods(record)


def record_model_config(record: str) -> GPTConfig:
    return GPTConfig.from_dict(record_config(record)["model"]["gpt"])


def test_pr1855_twin_counts_at_most_40000_bytes():
    formats, methods = config_code(PR1855_TWIN)
    assert formats == ("pergroup",) and methods == ["standard", "sliding", "doc_isolated", "phased_ttt"]
    size = measure_code_size(formats, methods, model=record_model_config(PR1855_TWIN))
    print(
        f"\n{PR1855_TWIN}: code bytes:{size.counted_bytes} ({len(size.files)} files, {size.source_bytes:,} source "
        f"bytes, {size.program_bytes:,} minified)"
    )
    assert size.counted_bytes <= 40_000
    assert size.methods == tuple(methods) and size.formats == formats
    files = set(size.files)
    assert {"pgolf_lit/quant/pergroup_read.py", "pgolf_lit/eval/phased_ttt.py", "pgolf_lit/model/gpt.py"} <= files
    assert not files & EXPORT_AND_TRAINING, sorted(files & EXPORT_AND_TRAINING)
    assert not files & {
        "pgolf_lit/eval/slot.py",
        "pgolf_lit/eval/ttt.py",
        "pgolf_lit/quant/native_read.py",
        "pgolf_lit/quant/upstream_read.py",
    }


def test_fewer_scored_passes_count_fewer_bytes():
    pr1855 = measure_code_size(("pergroup",), record_test_methods(PR1855_TWIN))
    windows_only = measure_code_size(("pergroup",), ["standard", "sliding"])
    pr1394 = measure_code_size(*config_code("pr1394_sp8192_loop45"))
    print(
        f"\npergroup + 4 passes {pr1855.counted_bytes}, pergroup + sliding {windows_only.counted_bytes}, "
        f"pr1394 (native + sliding) {pr1394.counted_bytes}"
    )
    assert pr1394.counted_bytes < windows_only.counted_bytes < pr1855.counted_bytes
    assert "pgolf_lit/eval/phased_ttt.py" in pr1855.files and "pgolf_lit/eval/phased_ttt.py" not in windows_only.files
    assert "pgolf_lit/quant/native_read.py" in pr1394.files and "pgolf_lit/quant/pergroup_read.py" not in pr1394.files
    # Every registered format and pass is an upper bound of any one config.
    everything = code_files()
    assert set(pr1855.files) | set(pr1394.files) <= set(everything)
    assert {"pgolf_lit/eval/slot.py", "pgolf_lit/eval/ttt.py", "pgolf_lit/quant/upstream_read.py"} <= set(everything)
    assert not set(everything) & EXPORT_AND_TRAINING, sorted(set(everything) & EXPORT_AND_TRAINING)


def test_entries_come_from_where_each_method_and_container_registers():
    assert entry_modules(["pergroup"], ["sliding", "phased_ttt"]) == [
        "pgolf_lit.eval.windows",
        "pgolf_lit.eval.phased_ttt",
        "pgolf_lit.quant.pergroup_read",
        EVAL_ENTRY,
    ]
    assert eval_methods()["causal_slot"].modules == ("pgolf_lit.eval.slot",)
    assert CONTAINERS["native"].modules == ("pgolf_lit.quant.native_read",)
    with pytest.raises(Exception, match="unknown eval method"):
        entry_modules(["native"], ["sliding", "slot64"])
    with pytest.raises(Exception, match="unknown artifact format"):
        entry_modules(["zip"], ["sliding"])


def test_a_module_added_to_a_methods_needs_is_counted(monkeypatch):
    before = code_files(["native"], ["sliding"])
    assert "pgolf_lit/eval/ttt.py" not in before
    sliding = eval_methods()["sliding"]
    monkeypatch.setitem(eval_methods(), "sliding", dataclasses.replace(sliding, needs=("pgolf_lit.eval.ttt",)))
    after = code_files(["native"], ["sliding"])
    assert "pgolf_lit/eval/ttt.py" in after  # the needed module (and what it imports)
    assert set(before) < set(after)
    native = CONTAINERS["native"]
    monkeypatch.setitem(CONTAINERS, "native", dataclasses.replace(native, needs=("pgolf_lit.quant.upstream_read",)))
    assert "pgolf_lit/quant/upstream_read.py" in code_files(["native"], ["standard"])


def test_closure_rules_on_a_toy_package(tmp_path):
    """Lazy imports count unless the module declares TRAINING_ONLY; a package __init__ counts only when a name is
    imported from it."""
    pkg = tmp_path / "pgolf_lit"
    files = {
        "__init__.py": "from pgolf_lit.heavy import everything\n",
        "sub/__init__.py": "from pgolf_lit.sub.b import thing\n",
        "sub/a.py": "from pgolf_lit.sub import b\nfrom . import c\n\n\n"
        "def f():\n    from pgolf_lit import lazy, kernel\n",
        "sub/b.py": "thing = 1\n",
        "sub/c.py": "import pgolf_lit.kernel\n",
        "lazy.py": "x = 1\n",
        "kernel.py": "TRAINING_ONLY = 'speed only'\n",
        "heavy.py": "everything = 1\n",
        "user.py": "from pgolf_lit.sub import thing\n",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    assert code_files(root=tmp_path, entries=["pgolf_lit.sub.a"]) == [
        "pgolf_lit/kernel.py",
        "pgolf_lit/lazy.py",
        "pgolf_lit/sub/a.py",
        "pgolf_lit/sub/b.py",
        "pgolf_lit/sub/c.py",
    ]  # kernel.py: by c's module-level import, not by f's lazy one
    (pkg / "sub/c.py").write_text("x = 2\n")
    assert "pgolf_lit/kernel.py" not in code_files(root=tmp_path, entries=["pgolf_lit.sub.a"])
    assert code_files(root=tmp_path, entries=["pgolf_lit.user"]) == [
        "pgolf_lit/sub/__init__.py",
        "pgolf_lit/sub/b.py",
        "pgolf_lit/user.py",
    ]
    with pytest.raises(Exception, match="no source"):
        code_files(root=tmp_path, entries=["pgolf_lit.missing"])


def test_a_gated_technique_counts_only_for_configs_that_switch_it_on(tmp_path):
    """COUNTED_WHEN: a technique module imported inside a function counts when the measured config switches its
    field on ("field": truthy; "field=value": that value), always without a config; a module-level import always."""
    pkg = tmp_path / "pgolf_lit"
    files = {
        "model.py": "def build(c):\n    if c.dtg:\n        from pgolf_lit import gate\n"
        "    if c.recurrence == 'loop':\n        from pgolf_lit import looped\n",
        "gate.py": "COUNTED_WHEN = 'dtg'\nfrom pgolf_lit import gate_helper\n",
        "gate_helper.py": "x = 1\n",
        "looped.py": "COUNTED_WHEN = 'recurrence=loop'\n",
        "eager.py": "import pgolf_lit.gate\n",
        "typo.py": "def f():\n    from pgolf_lit import bad\n",
        "bad.py": "COUNTED_WHEN = 'no_such_field'\n",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)

    def counted(model, entry="pgolf_lit.model"):
        return code_files(root=tmp_path, entries=[entry], model=model)

    every = ["pgolf_lit/gate.py", "pgolf_lit/gate_helper.py", "pgolf_lit/looped.py", "pgolf_lit/model.py"]
    assert counted(None) == every
    assert counted(GPTConfig()) == ["pgolf_lit/model.py"]
    assert counted(GPTConfig(dtg=True)) == ["pgolf_lit/gate.py", "pgolf_lit/gate_helper.py", "pgolf_lit/model.py"]
    assert counted(GPTConfig(recurrence="loop", loop_start=1, loop_end=2, num_loops=1)) == [
        "pgolf_lit/looped.py",
        "pgolf_lit/model.py",
    ]
    assert "pgolf_lit/gate.py" in counted(GPTConfig(), "pgolf_lit.eager")  # module level: always
    with pytest.raises(Exception, match="bad: COUNTED_WHEN names 'no_such_field'"):
        counted(GPTConfig(), "pgolf_lit.typo")


def test_the_pr1855_config_counts_no_technique_it_leaves_off():
    """Every COUNTED_WHEN module of the package is left out of PR #1855's count unless its config switches it on,
    and the record's count with its config is at most the upper bound without one."""
    model = record_model_config(PR1855_TWIN)
    formats, methods = config_code(PR1855_TWIN)
    with_config = set(code_files(formats, methods, model=model))
    upper_bound = set(code_files(formats, methods))
    assert with_config <= upper_bound
    for rel in sorted(upper_bound - with_config):
        marks = code_size._module_marks(code_size.PACKAGE_ROOT, rel[:-3].replace("/", "."))
        assert "COUNTED_WHEN" in marks and not code_size.config_switches_on(marks["COUNTED_WHEN"], model), rel


def test_minified_and_wrapped_as_the_records():
    assert code_size.PYMINIFY_OPTIONS == dict(
        rename_locals=False,
        hoist_literals=False,
        remove_literal_statements=True,
        remove_asserts=True,
        prefer_single_line=True,
    )
    text = (
        '"""doc"""\ndef f(value):\n    """doc"""\n    # note\n    assert value\n    total: int = value + 1\n'
        "    return total\n"
    )
    assert minify(text) == "def f(value):total=value+1;return total"
    program, raw, files = package_program(["native"], ["standard"])
    wrapped = wrap(program)
    head, tail = wrapped.split("\n", 1)
    assert head == "import brotli as B,base64 as b" and wrapped.startswith(WRAPPER_HEAD)
    assert tail.startswith('exec(B.decompress(b.b85decode("') and tail.endswith('")))\n') and tail.count("\n") == 1
    payload = tail[len('exec(B.decompress(b.b85decode("') : -len('")))\n')]
    assert brotli.decompress(base64.b85decode(payload)).decode() == program
    size = measure_code_size(["native"], ["standard"])
    assert size.counted_bytes == size.wrapped_bytes == len(wrapped.encode()) < size.program_bytes < size.source_bytes
    assert list(size.files) == files and size.source_bytes == raw
    # the program lists its one method module in the eval registry, then imports the container's reader and the entry
    assert program.rstrip().endswith(
        "import pgolf_lit.eval.registry as R\nR.METHOD_MODULES=('pgolf_lit.eval.windows',)\n"
        f"import pgolf_lit.quant.native_read,{EVAL_ENTRY}"
    )


# ---------------------------------------------------------------------------------------------------------
# The wrapper as a program
# ---------------------------------------------------------------------------------------------------------

CLEAN_RUN = textwrap.dedent("""
    import json, sys
    args = json.load(open(sys.argv[1]))
    sys.path.extend(args["site"])  # the runtime packages, without site's .pth files (pgolf_lit's editable install)
    try:
        import pgolf_lit
    except ImportError:
        pass
    else:
        raise SystemExit(f"pgolf_lit is importable before the wrapper runs: {pgolf_lit.__file__}")
    exec(open(args["code"]).read())
    from pgolf_lit.eval.artifact_eval import evaluate_artifact_file
    from pgolf_lit.eval.runner import EvalSettings
    from pgolf_lit.model.config import GPTConfig
    results = evaluate_artifact_file(args["artifact"], args["data"], args["methods"],
                                     EvalSettings.from_dict(args["evaluation"]), val_max_tokens=args["val_max_tokens"],
                                     model_config=GPTConfig.from_dict(args["gpt"]), log=None)
    loaded = {n: getattr(m, "__file__", None) for n, m in sys.modules.items() if n.split(".")[0] == "pgolf_lit"}
    json.dump({"results": [[r.label, r.val_loss, r.val_bpb, r.tokens, r.bytes] for r in results],
               "modules": loaded}, open(args["out"], "w"))
""")


def test_lzma_wrapper_is_pr2135s():
    """PR #2130/#2135's _compressed_code_size: pyminify with three flags (asserts kept), lzma preset 6, base85."""
    import lzma

    from pgolf_lit.quant.code_lzma import MINIFY_OPTIONS, wrap_lzma
    from pgolf_lit.quant.code_size import CODE_WRAPPERS

    assert MINIFY_OPTIONS == dict(rename_locals=False, hoist_literals=False, remove_literal_statements=True)
    text = '"""doc"""\ndef f(value):\n    """doc"""\n    assert value\n    return value + 1\n'
    assert minify(text, MINIFY_OPTIONS) == "def f(value):assert value;return value+1"  # PR #1855's drops the assert
    program, _, _ = package_program(["pergroup_v2"], ["ngram_tilt"], minify_options=MINIFY_OPTIONS)
    wrapped = wrap_lzma(program)
    head, tail = wrapped.split("\n", 1)
    assert head == "import lzma as L,base64 as B" and tail.startswith('exec(L.decompress(B.b85decode("')
    payload = tail[len('exec(L.decompress(B.b85decode("') : -len('")))\n')]
    assert lzma.decompress(base64.b85decode(payload)).decode() == program
    size = measure_code_size(["pergroup_v2"], ["ngram_tilt"], wrapper="lzma")
    assert (
        size.counted_bytes == len(wrapped.encode())
        and size.wrapper == "lzma"
        and CODE_WRAPPERS["lzma"].wrap is wrap_lzma
    )
    files = set(size.files)
    assert {"pgolf_lit/eval/ngram_tilt.py", "pgolf_lit/quant/pergroup_v2_read.py"} <= files
    assert not files & (EXPORT_AND_TRAINING | {"pgolf_lit/quant/pergroup_v2.py", "pgolf_lit/quant/code_lzma.py"})
    with pytest.raises(Exception, match="code_wrapper"):
        dataclasses.replace(record_export_config(PR2135_TWIN), code_wrapper="zip")


def _runtime_paths() -> list[str]:
    """Where the runtime packages are: site-packages, and numba's folder when it lives elsewhere."""
    import importlib.util

    paths = list(site.getsitepackages())
    spec = importlib.util.find_spec("numba")
    if spec is not None and spec.origin:
        paths.append(str(Path(spec.origin).parent.parent))
    return paths


@pytest.mark.skipif(shutil.which("lrzip") is None, reason="lrzip is not installed (apt-get install lrzip)")
@pytest.mark.slow  # ~16 s per twin: an export, then a clean interpreter scores the artifact
@pytest.mark.parametrize("twin", [PR1855_TWIN, PR2135_TWIN])
def test_wrapper_alone_scores_a_twin_artifact_as_the_package(tmp_path, embedded_data_root, twin):
    """PR #1855's twin (PGRP, brotli wrapper) and PR #2135's (PGRP v2, lzma wrapper, the n-gram tilt)."""
    from pgolf_lit.config import gpt_config_from_yaml
    from pgolf_lit.eval.artifact_eval import evaluate_artifact_file
    from pgolf_lit.eval.runner import EvalSettings
    from pgolf_lit.model.gpt import GPT
    from pgolf_lit.quant.code_size import CODE_WRAPPERS
    from pgolf_lit.quant.export import export_model
    from pgolf_lit.records import record_config_path

    gpt = gpt_config_from_yaml(record_config_path(twin))
    torch.manual_seed(0)
    model = GPT(gpt).eval()
    with torch.no_grad():  # give the zero-initialised weights (projections, gates) some content
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    methods = record_test_methods(twin)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, gpt.vocab_size, (2, 64), generator=g) for _ in range(2)]
    export = dataclasses.replace(record_export_config(twin), allow_over_budget=True)
    report = export_model(model, export, tmp_path / "m.ptz", calib_batches=calib, progress=False, eval_methods=methods)
    wrapper = CODE_WRAPPERS[export.code_wrapper]
    program, _, _ = package_program([export.format], methods, minify_options=wrapper.minify_options, model=gpt)
    (tmp_path / "code.py").write_text(wrapper.wrap(program))
    # what the export counted is this file's length
    assert report.code_bytes == (tmp_path / "code.py").stat().st_size == report.code.counted_bytes

    evaluation = record_config(twin)["model"]["evaluation"]
    data = embedded_data_root / "datasets" / "fineweb10B_sp1024"
    args = {
        "site": _runtime_paths(),
        "code": str(tmp_path / "code.py"),
        "artifact": str(tmp_path / "m.ptz"),
        "data": str(data),
        "methods": methods,
        "evaluation": evaluation,
        "val_max_tokens": 1024,
        "gpt": gpt.to_dict(),
        "out": str(tmp_path / "out.json"),
    }
    (tmp_path / "args.json").write_text(json.dumps(args))
    (tmp_path / "run.py").write_text(CLEAN_RUN)
    # -I: no PYTHONPATH, no user site, no script or current folder on sys.path; -S: no site-packages .pth files.
    run = subprocess.run(
        [sys.executable, "-I", "-S", str(tmp_path / "run.py"), str(tmp_path / "args.json")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    outside = {n: f for n, f in out["modules"].items() if f is not None and not f.startswith("pgolf_lit/")}
    assert not outside, outside  # every pgolf_lit module came from the wrapper

    expected = evaluate_artifact_file(
        str(tmp_path / "m.ptz"),
        str(data),
        methods,
        EvalSettings.from_dict(evaluation),
        val_max_tokens=1024,
        model_config=gpt,
        log=None,
    )
    assert [r[0] for r in out["results"]] == [r.label for r in expected] and len(expected) == 4
    for got, want in zip(out["results"], expected):
        assert got[3:] == [want.tokens, want.bytes], want.label
        assert got[2] == pytest.approx(want.val_bpb, abs=1e-9), want.label
    print("\n" + "\n".join(f"{r.label} val_bpb:{r.val_bpb:.8f}" for r in expected))


def test_a_clean_interpreter_cannot_import_the_package(tmp_path):
    """The premise of the test above, checked alone: without the wrapper, pgolf_lit is not importable there."""
    code = f"import sys; sys.path.extend({site.getsitepackages()!r})\nimport torch\nimport pgolf_lit\n"
    run = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0 and "No module named 'pgolf_lit'" in run.stderr, run.stderr[-2000:]
    assert Path(code_size.__file__).is_file()
