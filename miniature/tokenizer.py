"""The miniature's own byte-level BPE: trained on its chat template, questions and answers, with
LLaDA-V's special tokens appended after the trained vocabulary (as in the real tokenizer).

Deterministic: the same corpus gives the same merges, so the written tokenizer files are stable.
"""

from __future__ import annotations

from export.model import MINIATURE_VOCAB
from export.tiny import CORPUS, build_tokenizer
from miniature.scenes import COLORS, LIGHTS, LIMITS, NUMBERS, TEMPLATES
from runtime.tokens import SPECIAL_TOKENS, SYSTEM_PROMPT


def corpus() -> list[str]:
    """Every string the model reads or writes (answers also alone: a response starts without a
    space), plus the tiny model's general sentences."""
    answers = [*COLORS, *LIGHTS, *NUMBERS, *map(str, LIMITS), "none", "no", "yes",
               "yes, on the left", "yes, on the right"]
    return [SYSTEM_PROMPT, *TEMPLATES.values(), *answers * 3, " ".join(answers), *CORPUS]


def miniature_tokenizer():
    """A `tokenizers.Tokenizer` with exactly MINIATURE_VOCAB ids."""
    tok = build_tokenizer(MINIATURE_VOCAB - len(SPECIAL_TOKENS), corpus())
    assert tok.get_vocab_size() == MINIATURE_VOCAB, tok.get_vocab_size()
    return tok
