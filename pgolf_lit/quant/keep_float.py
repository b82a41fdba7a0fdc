"""Float keep of named tensors: large tensors the export stores as fp16 instead of quantizing them.

The early int8/int6 records kept the tensors the quantization gap is most sensitive to as floats by name: PR #42
hard-codes ``tok_emb.weight``, PR #60 and #86 (``FP16_EMBED_EXPORT=1``) ``tok_emb``, PR #63 and #65 list
substrings in ``FP16_PASSTHROUGH_PATTERNS`` (``tok_emb``; #65: ``tok_emb,bigram_hash``) and PR #162/#180 in
``FP16_KEEP_NAME_PATTERNS`` (``tok_emb,blocks.8.attn.c_k``). Each script keeps a float tensor whose state-dict name
*contains* one of the patterns, stored fp16 and cast back to its own dtype when read, which the native reader
already does for every kept float (meta ``kind: float``).

The patterns here match our state-dict names the same way (a substring test); a pattern that matches no tensor is
an error, so a misspelt name cannot silently quantize the tensor it meant to keep.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from pgolf_lit.errors import ConfigError


def keeps_float(name: str, patterns: Sequence[str]) -> bool:
    """True when ``name`` contains one of ``patterns`` (the records' ``any(p in name for p in ...)``)."""
    return any(pattern in name for pattern in patterns)


def check_patterns(patterns: Sequence[str], names: Iterable[str]) -> None:
    """Every pattern must name at least one tensor of the state dict being exported."""
    names = list(names)
    unmatched = [p for p in patterns if not any(p in name for name in names)]
    if unmatched:
        raise ConfigError(
            f"export.keep_float: pattern(s) {unmatched} match no tensor of the model; expected substrings of "
            f"state-dict names such as {names[:3]}"
        )


def validate_patterns(patterns: Sequence[str]) -> None:
    """A pattern is a non-empty string (an empty one would match every tensor)."""
    bad = [p for p in patterns if not isinstance(p, str) or not p]
    if bad:
        raise ConfigError(f"export.keep_float: expected non-empty name substrings, got {bad}")
