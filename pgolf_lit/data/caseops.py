"""CaseOps (``lossless_caps_caseops_v1``): a bijective rewrite of ASCII capitalization into four operator characters.

PR #1855 lossless_caps.py (``encode_lossless_caps_v2``, of which ``lossless_caps_caseops_v1`` is an alias). Each
maximal run of ASCII letters loses its capitals: an all-lowercase run is copied; a run of two or more capitals
becomes ALLCAPS + the run in lowercase; a capital followed by lowercase letters (or a lone capital) becomes TITLE +
the run in lowercase; any other mix becomes (TITLE if the first letter is a capital) + the first letter in lowercase,
then each later letter in lowercase, preceded by CAPNEXT if it was a capital. A literal operator character in the
text is written ESC + that character. Nothing else changes (non-ASCII letters are never case-folded), so "The",
"THE" and "the" share one lowercase token stream and the capitalization travels in a few operator tokens.

BPB must still count the bytes of the *original* text, which the operator pieces do not have: a validation token's
"byte sidecar" entry is the number of original UTF-8 bytes its SentencePiece surface decodes to
(``original_byte_counts``, a replay of the decoder over the surfaces, as PR #1855 lossless_caps.py
``surface_piece_original_byte_counts``).
"""

from __future__ import annotations

import re
from typing import Iterable

from pgolf_lit.data.caseops_read import (  # noqa: F401  (re-exported: evaluation imports caseops_read alone)
    ALLCAPS,
    CAPNEXT,
    ESC,
    OPERATOR_IDS,
    OPERATORS,
    RESERVED_SUFFIX,
    TITLE,
    TRANSFORM_NAME,
    is_caseops_tokenizer,
)
from pgolf_lit.errors import DataError


_RUN_OR_OPERATOR = re.compile("[A-Za-z]+|[" + "".join(OPERATORS) + "]")
_OPERATOR = re.compile("[" + "".join(OPERATORS) + "]")


class CaseOpsError(DataError):
    """Text that is not a valid CaseOps encoding (an operator where the decoder cannot accept it)."""


def _encode_run(match: re.Match) -> str:
    run = match.group()
    if run in OPERATORS:
        return ESC + run
    if run.islower():
        return run
    lower = run.lower()
    if len(run) >= 2 and run.isupper():
        return ALLCAPS + lower
    if run[0].isupper() and (len(run) == 1 or run[1:].islower()):
        return TITLE + lower
    head = (TITLE if run[0].isupper() else "") + lower[0]
    return head + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in run[1:])


def encode_caseops(text: str) -> str:
    """The CaseOps encoding of ``text`` (PR #1855 lossless_caps.py ``encode_lossless_caps_v2``)."""
    return _RUN_OR_OPERATOR.sub(_encode_run, text)


def _is_ascii_letter(ch: str) -> bool:
    return ("a" <= ch <= "z") or ("A" <= ch <= "Z")


class _Decoder:
    """The CaseOps decoder as a state machine fed one character at a time; ``step`` returns the original text
    that character stands for ("" for an operator).

    Shared by ``decode_caseops`` and ``original_byte_counts``, so the byte sidecar accepts exactly the encodings the
    decoder accepts and counts exactly the bytes it produces.
    """

    __slots__ = ("escape", "word_mode", "allcaps", "capnext", "in_word")

    def __init__(self):
        self.escape = False  # ESC seen: the next character is literal
        self.word_mode = None  # TITLE or ALLCAPS seen: waiting for the first letter of a word
        self.allcaps = False  # inside an ALLCAPS word
        self.capnext = False  # CAPNEXT seen: the next letter is a capital
        self.in_word = False  # the previous character was an ASCII letter

    def step(self, ch: str) -> str:
        if self.escape:
            if self.word_mode is not None and not _is_ascii_letter(ch):
                raise ValueError("escaped control char cannot satisfy pending word capitalization mode")
            self.escape = False
            self.in_word = _is_ascii_letter(ch)
            self.allcaps = self.allcaps and self.in_word
            return ch
        if ch == ESC:
            self.escape = True
            return ""
        if ch == TITLE or ch == ALLCAPS:
            if self.word_mode is not None or self.in_word or self.capnext:
                raise ValueError(f"invalid {'title' if ch == TITLE else 'allcaps'} marker placement")
            self.word_mode = ch
            return ""
        if ch == CAPNEXT:
            if self.capnext:
                raise ValueError("duplicate capnext marker")
            self.capnext = True
            return ""
        if _is_ascii_letter(ch):
            if not self.in_word:
                capital = self.word_mode is not None or self.capnext
                self.allcaps = self.word_mode == ALLCAPS
                self.word_mode = None
                self.in_word = True
            elif self.word_mode is not None:
                raise ValueError("word capitalization marker leaked into the middle of a word")
            else:
                capital = self.allcaps or self.capnext
            self.capnext = False
            return ch.upper() if capital else ch
        if self.word_mode is not None or self.capnext:
            raise ValueError("capitalization marker not followed by an ASCII letter")
        self.in_word = self.allcaps = False
        return ch

    def finish(self) -> None:
        if self.escape:
            raise ValueError("dangling escape marker at end of string")
        if self.word_mode is not None or self.capnext:
            raise ValueError("dangling capitalization marker at end of string")


def decode_caseops(text: str) -> str:
    """The original text of a CaseOps encoding; a ``CaseOpsError`` (one line, with the character index) if
    ``text`` is not one (PR #1855 lossless_caps.py ``decode_lossless_caps_v2``)."""
    decoder = _Decoder()
    out = []
    index = -1
    try:
        for index, ch in enumerate(text):
            out.append(decoder.step(ch))
        index = len(text)
        decoder.finish()
    except ValueError as e:
        raise CaseOpsError(f"malformed CaseOps text: {e} (character {index} of {len(text)})") from None
    return "".join(out)


def original_byte_counts(surfaces: Iterable[str]) -> list[int]:
    """For each SentencePiece surface (the input span a piece covers, in order), the number of UTF-8 bytes of the
    original text it decodes to (PR #1855 lossless_caps.py ``surface_piece_original_byte_counts``).

    Operators count 0, an escaped literal operator its 3 bytes, an ASCII letter 1, any other character its UTF-8
    length. A piece with an empty surface (the first byte piece of a multi-byte character) counts 0; the piece that
    completes the character carries all its bytes. The surfaces must together be a valid CaseOps encoding, else a
    ``CaseOpsError`` naming the piece.
    """
    decoder = _Decoder()
    counts = []
    piece = -1
    try:
        for piece, surface in enumerate(surfaces):
            counts.append(sum(len(decoder.step(ch).encode("utf-8")) for ch in surface))
        piece += 1
        decoder.finish()
    except ValueError as e:
        raise CaseOpsError(f"malformed CaseOps token surfaces: {e} (piece {piece})") from None
    return counts


def find_operator(text: str) -> int:
    """Index of the first CaseOps operator character in ``text``, or -1."""
    match = _OPERATOR.search(text)
    return match.start() if match else -1
