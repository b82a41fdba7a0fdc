"""PR #2130/#2135's code wrapper (their ``_compressed_code_size``; spec/frontier.md §5.5): pyminify with three flags
(``--no-rename-locals --no-hoist-literals --remove-literal-statements``: asserts kept, no single-line preference,
unlike PR #1855's call), then ``lzma.compress`` at its default preset 6, base85, in the two-line wrapper

    import lzma as L,base64 as B
    exec(L.decompress(B.b85decode("<lzma of the program, base85>")))

``code_size.py`` measures a program with it when a record's export says ``code_wrapper: lzma``; the program is the
same self-installing package program as under PR #1855's brotli wrapper. lzma is in the standard library, so the
wrapped program needs nothing brotli's does not."""

from __future__ import annotations

import base64
import lzma

from pgolf_lit.quant.code_size import CODE_WRAPPERS, CodeWrapper, register_code_wrapper

MINIFY_OPTIONS = dict(rename_locals=False, hoist_literals=False, remove_literal_statements=True)
LZMA_PRESET = 6
WRAPPER_HEAD = 'import lzma as L,base64 as B\nexec(L.decompress(B.b85decode("'
WRAPPER_TAIL = '")))\n'


def wrap_lzma(program: str) -> str:
    """The record's two-line lzma wrapper around ``program``."""
    payload = base64.b85encode(lzma.compress(program.encode("utf-8"), preset=LZMA_PRESET)).decode("ascii")
    return f"{WRAPPER_HEAD}{payload}{WRAPPER_TAIL}"


LZMA_WRAPPER = CODE_WRAPPERS.get("lzma") or register_code_wrapper(CodeWrapper("lzma", MINIFY_OPTIONS, wrap_lzma))
