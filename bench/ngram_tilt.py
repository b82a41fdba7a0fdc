"""Time of the n-gram tilt's hint precompute (``pgolf_lit/eval/ngram_tilt.py``) on a full-size stream, one core.

    python bench/ngram_tilt.py                         # 47,853,343 tokens (the full validation stream), vocab 8192
    python bench/ngram_tilt.py --tokens 2000000        # a quick run

The record (PR #2135) spent 197-201 s of its evaluation budget on this precompute (spec/frontier.md §5.2); the
token-only table needs none of that. The stream is synthetic (no validation data needed): Zipf-distributed tokens
in which random stretches repeat earlier ones, so that contexts recur and hints fire as in text (the record's val
stream gates 1.31 % of its targets). numba compiles the passes on first use: that time is printed apart
(``compile_s``); ``hints_s`` is the precompute of the full stream, which the pass runs inside its eval time.
One line: ``ngram_tilt tokens:N vocab:V order:O threads:1 compile_s:.. hints_s:.. hints_per_s:.. gated:G (P %)``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Optional, Sequence

import numpy as np

# one core, as the budget is stated: numpy/numba threads off before they are imported by the package
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(var, "1")

FULL_STREAM_TOKENS = 47_853_343  # PR #2014's val_tokens with the tail (spec/frontier.md §0)


def synthetic_stream(
    n: int, vocab: int, seed: int = 0, repeat_len: int = 200, repeat_every: int = 20_000
) -> np.ndarray:
    """``n`` tokens below ``vocab``: Zipf(1.2) ids, then one copy of an earlier ``repeat_len`` stretch per
    ``repeat_every`` tokens (recurring contexts, as quotes, boilerplate and near-duplicates give in web text)."""
    rng = np.random.default_rng(seed)
    tokens = (rng.zipf(1.2, size=n) % vocab).astype(np.uint16)
    for _ in range(n // repeat_every):
        src, dst = rng.integers(0, max(n - repeat_len, 1), size=2)
        tokens[dst : dst + repeat_len] = tokens[src : src + repeat_len]
    return tokens


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=FULL_STREAM_TOKENS, help="stream length x_0 .. x_T")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--order", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from pgolf_lit.eval.ngram_tilt import NgramTiltSettings, build_hints

    torch.set_num_threads(1)
    cfg = NgramTiltSettings(order=args.order)
    stream = synthetic_stream(args.tokens, args.vocab, args.seed)
    start = time.perf_counter()
    build_hints(stream[:4096], cfg)  # numba compiles here
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    hints = build_hints(stream, cfg)
    hints_s = time.perf_counter() - start
    targets = args.tokens - 1
    result = {
        "tokens": args.tokens,
        "targets": targets,
        "compile_s": compile_s,
        "hints_s": hints_s,
        "hints_per_s": targets / hints_s,
        "gated": hints.gated,
    }
    print(
        f"ngram_tilt tokens:{args.tokens} vocab:{args.vocab} order:{args.order} threads:1 "
        f"compile_s:{compile_s:.2f} hints_s:{hints_s:.2f} hints_per_s:{targets / hints_s:,.0f} "
        f"gated:{hints.gated} ({100 * hints.gated / max(targets, 1):.2f} %)"
    )
    return result


if __name__ == "__main__":
    main()
