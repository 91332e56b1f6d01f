"""CLIP's real 49,408-token BPE vocabulary, written as a CLIPTokenizer folder, and CLIP text-encoder
configs: what every built-in pipeline's tokenizers and text encoders are made from."""

from __future__ import annotations

import gzip
import importlib.metadata
import json
from pathlib import Path

CLIP_VOCAB_SIZE = 49408


def find_clip_bpe_file() -> Path:
    """The CLIP BPE merges file shipped in the open-clip-torch wheel (not imported, only read)."""
    try:
        dist = importlib.metadata.distribution("open-clip-torch")
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            "The tiny model needs CLIP's BPE vocabulary, shipped by open-clip-torch. Install it "
            "without its dependencies: pip install --no-deps open-clip-torch"
        ) from exc
    for f in dist.files or []:
        if f.name == "bpe_simple_vocab_16e6.txt.gz":
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError("open-clip-torch is installed but bpe_simple_vocab_16e6.txt.gz is missing; reinstall it")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte mapped to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_vocab_and_merges(bpe_gz: Path) -> tuple[dict[str, int], list[str]]:
    """Derive CLIP's vocab.json and merges.txt from the BPE file, as CLIP's own tokenizer does.

    Vocabulary = 256 byte characters, the same with the end-of-word marker, one entry per merge
    (the first 49152 - 256 - 2 merges), then the two special tokens: 49,408 entries.
    """
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_clip_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(find_clip_bpe_file())
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)


def clip_text_config(hidden: int, intermediate: int, layers: int, heads: int, projection: int, act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                          projection_dim=projection, hidden_act=act, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407)

