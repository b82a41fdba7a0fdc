"""CaseOps names and the tokenizer check that evaluation needs (the dataset and tokenizer names of the public
export, the operator pieces); the transform itself is ``caseops.py``, which re-exports these.
"""

from __future__ import annotations

TRANSFORM_NAME = "lossless_caps_caseops_v1"
# Names of the tokenizer model, tokenizer entry and dataset of the public CaseOps export (PR #1729 / #1855).
RESERVED_SUFFIX = "lossless_caps_caseops_v1_reserved"
TITLE = "\ue001"
ALLCAPS = "\ue002"
CAPNEXT = "\ue003"
ESC = "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)
# Where a CaseOps tokenizer holds the operators: user-defined pieces right after <pad> <s> </s> <unk>.
OPERATOR_IDS = (4, 5, 6, 7)


def is_caseops_tokenizer(sp) -> bool:
    """True when a SentencePiece model holds the four CaseOps operators at ids 4..7 (its documents are CaseOps
    encoded, and BPB needs the byte sidecar)."""
    if sp.vocab_size() <= max(OPERATOR_IDS):
        return False
    return all(sp.id_to_piece(i) == op for i, op in zip(OPERATOR_IDS, OPERATORS))
