"""An eval method is one file: listed once in ``registry.METHOD_MODULES``, it appears in ``pgolf test --help``
(its settings section), in ``pgolf audit`` (its audit rows) and in ``pgolf test`` (its result line)."""

from __future__ import annotations

import dataclasses

import importlib
import textwrap

import pytest

from conftest import pgolf_lit_listing
from pgolf_lit.config import CONFIG_DIR
from pgolf_lit.eval.registry import METHOD_MODULES, eval_methods

# A whole new method, as its author writes it: settings, the pass, its declaration (registry.py).
REVERSED = '''
"""The standard pass with its sequences scored last to first."""

from dataclasses import dataclass

from pgolf_lit.eval.registry import AuditCase, EvalMethod, PassOutcome
from pgolf_lit.eval.scoring import rank_share, sequence_windows
from pgolf_lit.eval.windows import evaluate_windows


@dataclass
class ReversedSettings:
    batch_seqs: int = 4
    """Sequences per forward."""


def evaluate_reversed(model, tokens, metric, cfg, setup):
    windows = sequence_windows(tokens.numel() - 1, setup.seq_len)[::-1]
    evaluate_windows(model, tokens, metric, rank_share(windows, setup.rank, setup.world_size), cfg.batch_seqs, setup)
    return PassOutcome(True, {"order": "reversed"})


METHODS = (
    EvalMethod(
        "reversed",
        ReversedSettings,
        evaluate_reversed,
        "final_{q}_reversed",
        "reversed",
        audit=(AuditCase("reversed", lambda a: ReversedSettings(), "batch_seqs"),),
    ),
)
'''


def package_with_method(module: str):
    return pgolf_lit_listing("pgolf_lit.eval.registry", "METHOD_MODULES", module)


def test_a_method_in_one_file_appears_in_help_audit_and_test(tmp_path, monkeypatch, run_cwd, capsys):
    (tmp_path / "reversed_pass.py").write_text(textwrap.dedent(REVERSED))
    monkeypatch.syspath_prepend(str(tmp_path))
    with package_with_method("reversed_pass"):
        from pgolf_lit.cli import main
        from pgolf_lit.run_summary import read_summary

        with pytest.raises(SystemExit):
            main(["test", "--help"])
        assert "--model.evaluation.reversed.batch_seqs" in capsys.readouterr().out

        main(["audit", "--method", "reversed"])
        rows = [line.split() for line in capsys.readouterr().out.splitlines()]
        (row,) = [r for r in rows if r[0] == "reversed"]
        assert row[-1] == "yes"  # every target once, each from its own prefix

        config = CONFIG_DIR / "demo_cpu.yaml"
        main(
            [
                "test",
                "--config",
                str(config),
                "--model.test_methods",
                "[reversed, standard]",
                "--data.val_max_tokens",
                "1024",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.logger.init_args.version",
                "t",
            ]
        )
        tested = read_summary(run_cwd / "runs" / config.stem / "t")["test"]
        assert set(tested) == {"reversed", "standard"}
        # the same sequences in another order: the same sums up to float32 rounding of the batch shapes
        assert tested["reversed"]["val_bpb"] == pytest.approx(tested["standard"]["val_bpb"], rel=1e-5)
        assert "pre-quantization reversed val_loss:" in capsys.readouterr().out
    assert "reversed" not in eval_methods()  # this process's registry never saw it


def test_the_registry_is_complete_before_eval_settings_exists():
    """runner.py builds EvalSettings from the registry when imported; the registry has imported every module of
    METHOD_MODULES by then, so each method has its section and nothing can register later."""
    from pgolf_lit.eval.runner import EvalSettings

    from pgolf_lit.eval.runner import EvalBase

    shared = {f.name for f in dataclasses.fields(EvalBase)}
    sections = [f.name for f in dataclasses.fields(EvalSettings) if f.name not in shared]
    assert sections == list(eval_methods())
    declared = [m.name for module in METHOD_MODULES for m in importlib.import_module(module).METHODS]
    assert declared == list(eval_methods())


def test_a_method_declared_twice_is_refused(tmp_path, monkeypatch):
    (tmp_path / "twice_pass.py").write_text("from pgolf_lit.eval.windows import METHODS\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with package_with_method("twice_pass"):
        from pgolf_lit.eval.registry import eval_methods as fresh_eval_methods

        with pytest.raises(ValueError, match="'standard' is declared twice .twice_pass."):
            fresh_eval_methods()
