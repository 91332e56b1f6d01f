"""A learned identifier (pivotal tuning): new tokens with trained input embeddings instead of a
borrowed rare token.

With ``identifier.learned: true`` the prompt's ``{token}`` becomes a placeholder ``<sks>`` (the
rare token in angle brackets). ``identifier.num_vectors`` new tokens are added to the tokenizer,
named as diffusers' ``load_textual_inversion`` names them (``<sks>``, ``<sks>_1``, …) and a prompt's
placeholder is expanded to all of them the same way, so a run's file loads in diffusers, A1111 and
ComfyUI as an ordinary textual-inversion embedding. Their input embeddings start from the class
word's, the rare token's, or random (``identifier.init``) and are trained jointly with the LoRA,
optionally alone for the first ``identifier.embedding_only_steps`` steps.

The embedding matrix itself is never touched: `LearnedEmbedding` looks the new ids up in a small
trainable table and every other id in the frozen original, so every other row stays bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

EMBEDDING_FILE = "learned_embeds.safetensors"
KEY = "emb_params"  # what A1111 / ComfyUI / diffusers read from an embedding .safetensors


def placeholder(token: str) -> str:
    """The prompt text of a learned identifier: the token in angle brackets (pure)."""
    return token if token.startswith("<") and token.endswith(">") else f"<{token}>"


def token_names(placeholder_text: str, n: int) -> list[str]:
    """The tokenizer entries of an n-vector identifier, as diffusers' loader names them (pure)."""
    return [placeholder_text] + [f"{placeholder_text}_{i}" for i in range(1, n)]


def taken(tokenizer, placeholder_text: str, n: int) -> list[str]:
    """The identifier's token names that the tokenizer already has: they cannot be learned (pure)."""
    vocab = tokenizer.get_vocab()
    return [t for t in token_names(placeholder_text, n) if t in vocab]


def expand(prompt: str, placeholder_text: str, n: int) -> str:
    """Replace the placeholder by all its vectors' tokens (diffusers' maybe_convert_prompt) (pure)."""
    return prompt.replace(placeholder_text, " ".join(token_names(placeholder_text, n))) if n > 1 else prompt


class LearnedEmbedding(torch.nn.Module):
    """Token embedding = the frozen original table for old ids, a trainable table for new ones."""

    def __init__(self, base: torch.nn.Embedding, new: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_new = base.num_embeddings
        self.vectors = torch.nn.Parameter(new.detach().clone().float())

    @property
    def weight(self) -> torch.Tensor:  # code that reads the table sees all rows
        return torch.cat([self.base.weight, self.vectors.to(self.base.weight.dtype)])

    @property
    def num_embeddings(self) -> int:
        return self.first_new + self.vectors.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = (ids >= self.first_new)[..., None]
        old = self.base(ids.clamp(max=self.first_new - 1))
        new = F.embedding((ids - self.first_new).clamp(min=0), self.vectors).to(old.dtype)
        return torch.where(is_new, new, old)


def initial_vectors(kind: str, n: int, tokenizer, table: torch.Tensor, class_name: str, token: str,
                    seed: int) -> torch.Tensor:
    """n starting vectors: the class word's embedding, the rare token's, or random with the table's
    scale (pure given the seed)."""
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randn((n, table.shape[1]), generator=g) * table.float().std()
    word = class_name if kind == "class" else token
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"identifier.init={kind}: {word!r} has no tokens")
    rows = table[ids].float()
    return torch.stack([rows[i % len(ids)] for i in range(n)])


def attach(text_encoder, tokenizer, placeholder_text: str, n: int, init: torch.Tensor) -> torch.nn.Parameter:
    """Add the identifier's tokens to the tokenizer and swap in a LearnedEmbedding; returns the
    trainable vectors."""
    names = token_names(placeholder_text, n)
    clash = taken(tokenizer, placeholder_text, n)
    if clash:
        raise ValueError(f"identifier token(s) {clash} are already in the tokenizer: pick another data.token")
    base = text_encoder.get_input_embeddings()
    if len(tokenizer) != base.num_embeddings:
        raise ValueError(f"tokenizer has {len(tokenizer)} entries but the text encoder {base.num_embeddings}")
    tokenizer.add_tokens(names)
    module = LearnedEmbedding(base, init.to(base.weight.device))
    text_encoder.set_input_embeddings(module)
    return module.vectors


def save(path: str | Path, vectors: torch.Tensor, metadata: dict[str, str]) -> Path:
    """Write the identifier to `path` (a run's learned_embeds.safetensors, or a LoRA file's own):
    {"emb_params": [n, dim]} with string metadata."""
    from . import files

    return files.write_safetensors(Path(path), {KEY: vectors.detach().to("cpu", torch.float32).contiguous()}, metadata)


def own_embedding(lora_file: str | Path) -> Path:
    """A LoRA file's own identifier: <stem>_learned_embeds.safetensors beside it (a step's,
    loras/step-N_learned_embeds.safetensors) (pure)."""
    lora_file = Path(lora_file)
    return lora_file.with_name(f"{lora_file.stem}_{EMBEDDING_FILE}")


def embedding_beside(lora_file: str | Path) -> Path | None:
    """The identifier that goes with a LoRA file: its own (`own_embedding`), else
    learned_embeds.safetensors in its folder."""
    lora_file = Path(lora_file)
    for path in (own_embedding(lora_file), lora_file.parent / EMBEDDING_FILE):
        if path.is_file():
            return path
    return None


def load_into(pipe, embedding_file: str | Path, placeholder_text: str) -> None:
    """Load a learned identifier into a pipeline through diffusers' own textual-inversion loader.
    When the pipeline already knows the placeholder (another run's <sks>, loaded earlier in the
    same session), its embedding rows are overwritten with this file's vectors: the pictures of run B
    must never be drawn with run A's identifier."""
    if placeholder_text not in pipe.tokenizer.get_vocab():
        pipe.load_textual_inversion(str(embedding_file), token=placeholder_text)
        return
    from safetensors.torch import load_file

    vectors = load_file(str(embedding_file))[KEY]
    names = token_names(placeholder_text, vectors.shape[0])
    vocab = pipe.tokenizer.get_vocab()
    if any(n not in vocab for n in names) or token_names(placeholder_text, vectors.shape[0] + 1)[-1] in vocab:
        raise ValueError(f"{embedding_file}: {placeholder_text} is loaded in this pipeline with another number of "
                         f"vectors than this file's {vectors.shape[0]}: load the pipeline again to sample this run")
    table = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for name, vec in zip(names, vectors):
            table[vocab[name]] = vec.to(table.device, table.dtype)
