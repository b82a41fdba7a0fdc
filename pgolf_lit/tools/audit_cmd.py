"""``pgolf audit [--method NAME ...]``: the empirical causality audit (issue #1017's conditions and more) of each
registered evaluation method's audit rows on a tiny deterministic float64 model: A prefix invariance, B every
target scored exactly once, C score before update, D batch/world invariance, E normalized distributions, F nothing
read before it is scored, G document isolation, H state order (``pgolf_lit/eval/audit.py``). Exits 0; the table
says which procedures fail."""

from __future__ import annotations

import argparse

from pgolf_lit.eval.audit import AuditSetup, audit, audit_methods, format_audit_table


def main(argv) -> None:
    names = list(audit_methods(AuditSetup()))
    p = argparse.ArgumentParser(allow_abbrev=False, prog="pgolf audit", description=__doc__.splitlines()[0])
    p.add_argument("--method", action="append", choices=names, help="procedure to audit (default: all)")
    args = p.parse_args(argv)
    reports = [audit(name) for name in (args.method or names)]
    print(format_audit_table(reports))
