"""Rare-token checks on the model's own tokenizer, before an hour of GPU is spent.

The DreamBooth paper's advice: the identifier should be one token of the tokenizer and rare.
A random string of letters is split into several tokens and binds badly.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenReport:
    token: str
    pieces: list[str]
    ids: list[int]
    warnings: list[str] = field(default_factory=list)

    @property
    def single(self) -> bool:
        return len(self.pieces) == 1

    def __str__(self) -> str:
        head = f"'{self.token}' -> {self.pieces} {self.ids}"
        return head + ("".join(f"\n  warning: {w}" for w in self.warnings) if self.warnings else "\n  ok: one token")


def check_token(tokenizer, token: str, class_name: str = "") -> TokenReport:
    """How the tokenizer splits `token`, with plain-language warnings."""
    pieces = tokenizer.tokenize(token)
    ids = tokenizer.convert_tokens_to_ids(pieces)
    report = TokenReport(token, pieces, ids)
    if len(pieces) != 1:
        report.warnings.append(
            f"splits into {len(pieces)} tokens {pieces}: the identifier binds best as one token "
            "(try sks, hta, oue or a suggestion from `python -m dreambooth_lab tokens suggest`)"
        )
    if class_name and token.lower() == class_name.lower():
        report.warnings.append(f"is the class word '{class_name}' itself: the subject would overwrite the class")
    return report
