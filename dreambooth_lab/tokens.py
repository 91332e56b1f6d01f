"""Rare-token analysis on the model's own tokenizer, before an hour of GPU is spent.

The DreamBooth paper's advice: the identifier should be one token, rare in the vocabulary, with
little meaning attached. Three questions, three functions:

- ``analyze``: how does the tokenizer split each candidate (alone and inside the instance prompt),
  how late is its BPE merge (late merges are rare strings), is it a common English string, does
  it collide with the class word?
- ``suggest``: single-token strings of at most 3 letters from the rare tail of the merges that
  are not English words, drawn reproducibly under a seed and ranked with the reason.
- ``neighbours``: the vocabulary entries nearest to the token's input embedding: the prior the
  model already attaches to it (why 'sks' is contested: it is also the SKS rifle).

Rare is not meaningless: many short tokens are acronyms, airport codes or brands ('sks', 'jdm',
'ysl'). ``known_meaning`` names the ones listed here; `neighbours` shows what the model itself
associates with any token.

CLIP's BPE vocabulary: ids 0–511 are single bytes (with and without the end-of-word mark '</w>'),
id 512 + r is the string made by merge r, and the last two ids are the special tokens. So for a
one-token word, its merge rank is ``id - 512``, out of ``len(vocab) - 514`` merges.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

END = "</w>"
N_BYTE_TOKENS = 512
COMMON_ZIPF = 3.0  # wordfreq's Zipf scale: 3 = once per million words ("http" 4.8, "sks" 2.3)

# What each column of the tables means, printed under them (people read the output, not this file).
COLUMNS_HELP = """\
columns: one = the tokenizer keeps it as a single token (what DreamBooth wants);
  merge rank = which of CLIP's BPE merges made the token (0 = the first and most frequent string;
    higher = learnt later = rarer in CLIP's training text);
  rarity = merge rank / number of merges (1.00 = the very last merge; the rare tail starts near 0.7);
  zipf = how often the string occurs as English text, on wordfreq's Zipf scale (0 = never seen,
    3 = once per million words, 7 = 'the'); below 3 it is not a common word"""

# Short tokens with a meaning the base model already knows (acronyms, brands, codes): rare in the
# merge order is not the same as meaningless. Known to the reference study's sources: 'sks'.
KNOWN_MEANINGS = {
    "sks": "the SKS, a Soviet semi-automatic rifle (carbine): images of the token alone can show a rifle",
    "jdm": "'Japanese domestic market' cars (car-culture slang)",
    "ysl": "Yves Saint Laurent, the fashion brand",
    "nmd": "adidas NMD, a sneaker line",
    "akb": "AKB48, a Japanese pop group",
    "omd": "OMD, a band (and 'oh my days')",
    "dcu": "the DC (comics) Universe",
    "csk": "Chennai Super Kings, a cricket team",
    "rcb": "Royal Challengers Bangalore, a cricket team",
    "ksu": "Kansas State University",
    "ucd": "UC Davis / University College Dublin",
    "jnu": "Jawaharlal Nehru University",
    "tbl": "Tampa Bay Lightning (ice hockey)",
    "lmp": "Le Mans Prototype race cars",
    "dtm": "DTM, the German touring-car series",
    "fpv": "first-person-view drones",
    "hpc": "high-performance computing",
    "msd": "MSD (Merck), a drug company",
    "msl": "Mars Science Laboratory (the Curiosity rover)",
    "kyc": "'know your customer' (banking)",
    "psd": "Photoshop documents",
    "pkg": "'package' (software)",
    "tnx": "'thanks' (chat)",
    "tmr": "'tomorrow' (chat)",
    "bnw": "'black and white' photos (a photo hashtag)",
    "abq": "Albuquerque (its airport code)",
    "bkk": "Bangkok (its airport code)",
    "blr": "Bangalore (its airport code)",
    "icn": "Seoul Incheon (its airport code)",
    "wpg": "Winnipeg",
    "mke": "Milwaukee",
    "yqr": "Regina, Canada (its airport code)",
    "bmw": "BMW, the car brand",
    "ufc": "UFC, mixed martial arts",
    "vw": "Volkswagen",
    "hp": "Hewlett-Packard / horsepower / Harry Potter",
    "lg": "LG, the electronics brand",
    "nyc": "New York City",
    "kfc": "KFC, the restaurant chain",
}


def known_meaning(token: str) -> str | None:
    """A meaning the base model is known to attach to this token (an acronym, brand, object), or None."""
    return KNOWN_MEANINGS.get(token.lower())


def word_frequency(word: str) -> float:
    """Zipf frequency of `word` in English text (0 = never seen, 7+ = 'the')."""
    from wordfreq import zipf_frequency

    return float(zipf_frequency(word, "en"))


def n_merges(tokenizer) -> int:
    return len(tokenizer) - N_BYTE_TOKENS - 2


def merge_rank(tokenizer, token_id: int) -> int | None:
    """Index of the BPE merge that made this token (None for byte tokens and special tokens)."""
    rank = token_id - N_BYTE_TOKENS
    return rank if 0 <= rank < n_merges(tokenizer) else None


class TokenWarning(UserWarning):
    """The rare token will bind badly (split into several tokens)."""


@dataclass
class TokenReport:
    token: str
    pieces: list[str]
    ids: list[int]
    in_prompt: bool  # the pieces are the same inside the instance prompt
    merge_rank: int | None
    rarity: float | None  # merge rank / number of merges: 1.0 = the last merge learnt
    zipf: float
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # worth knowing, not a reason to avoid the token

    @property
    def single(self) -> bool:
        return len(self.pieces) == 1

    @property
    def ok(self) -> bool:
        return not self.warnings

    def __str__(self) -> str:
        return format_table([self])


def analyze(tokens: list[str] | str, tokenizer, class_name: str = "dog",
            instance_prompt: str = "a photo of {token} {class}") -> list[TokenReport]:
    """One report per candidate token, with plain-language warnings."""
    from .config import fill_prompt

    if isinstance(tokens, str):
        tokens = [tokens]
    class_pieces = set(_plain(tokenizer.tokenize(class_name))) if class_name else set()
    reports = []
    for token in tokens:
        if is_learned(token, tokenizer):
            reports.append(learned_report(token, tokenizer))
            continue
        pieces = tokenizer.tokenize(token)
        ids = tokenizer.convert_tokens_to_ids(pieces)
        prompt_ids = tokenizer(fill_prompt(instance_prompt, token, class_name), add_special_tokens=False).input_ids
        in_prompt = _contains(prompt_ids, ids)
        rank = merge_rank(tokenizer, ids[0]) if len(ids) == 1 else None
        rarity = rank / n_merges(tokenizer) if rank is not None else None
        zipf = word_frequency(token)
        r = TokenReport(token, pieces, ids, in_prompt, rank, rarity, zipf)
        if len(pieces) != 1:
            r.warnings.append(split_warning(pieces))
        if not in_prompt:
            r.warnings.append("is split differently inside the instance prompt (punctuation or case around it?)")
        if zipf >= COMMON_ZIPF:
            r.warnings.append(f"is a common English string (Zipf {zipf:.1f}): the model already has a strong "
                              "meaning for it that the subject must overwrite")
        shared = sorted(set(_plain(pieces)) & class_pieces)
        if class_name and shared:
            r.warnings.append(f"shares the token(s) {shared} with the class word '{class_name}': the subject and "
                              "the class would be entangled")
        elif class_name and class_name.lower() in token.lower():
            made = "a different single token" if len(pieces) == 1 else f"the tokens {_plain(pieces)}"
            r.warnings.append(f"contains the class word '{class_name}' as a substring: the tokenizer makes it "
                              f"{made}, but its spelling (and likely its learnt meaning) is close to the class, "
                              "so the subject and the class would be entangled")
        if rarity is not None and rarity < 0.5:
            r.warnings.append(f"is an early BPE merge (rank {rank:,} of {n_merges(tokenizer):,}): a frequent string "
                              "in CLIP's training text")
        if (meaning := known_meaning(token)) is not None:
            r.notes.append(f"has a known prior meaning: {meaning}. Training overwrites it for the prompt, but "
                           f"it can leak into other images; `tokens neighbours {token}` shows what the model "
                           "associates with it")
        reports.append(r)
    return reports


def split_warning(pieces: list[str]) -> str:
    """What `analyze` says first of a token that the tokenizer splits into `pieces` (pure)."""
    return (f"splits into {len(pieces)} tokens {_plain(pieces)}: a multi-token identifier binds badly; pick one "
            "token (see `tokens suggest`)")


def warn_about_token(token: str, tokenizer, learned: bool = False) -> None:
    """A rare token (data.token) that the tokenizer splits binds badly: say so before the hour of
    training (`analyze`'s first warning; only the split is needed here, not its word-frequency
    look-up, which costs a second of start-up). learned: identifier.learned, a new <token> that has
    nothing to split."""
    import warnings

    if learned or is_learned(token, tokenizer):
        return
    pieces = tokenizer.tokenize(token)
    if len(pieces) != 1:
        warnings.warn(f"data.token '{token}' {split_warning(pieces)}", TokenWarning, stacklevel=3)


def is_learned(token: str, tokenizer) -> bool:
    """A learned identifier: a token added to the tokenizer (pivotal tuning), or a <placeholder>
    that identifier.learned will add."""
    return token in tokenizer.get_added_vocab() or (token.startswith("<") and token.endswith(">") and len(token) > 2)


def learned_report(token: str, tokenizer) -> TokenReport:
    """What can be said of a learned identifier: no BPE pieces, no prior meaning, its own embedding."""
    added = tokenizer.get_added_vocab()
    ids = [added[token]] if token in added else []
    r = TokenReport(token, [token], ids, True, None, None, 0.0)
    r.notes.append("a learned identifier (identifier.learned): a new token whose input embedding is trained "
                   "with the LoRA, so it has no BPE pieces, no merge rank and no prior meaning to fight"
                   + ("" if ids else "; it is added when training starts"))
    return r


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def _plain(pieces: list[str]) -> list[str]:
    return [p.replace(END, "") for p in pieces]


def format_table(reports: list[TokenReport]) -> str:
    """A fixed-width table, then each token's warnings in words (pure)."""
    head = f"{'token':<10} {'pieces':<22} {'ids':<22} {'one':<4} {'merge rank':>11} {'rarity':>7} {'zipf':>5}"
    lines = [head, "-" * len(head)]
    for r in reports:
        rank = f"{r.merge_rank:,}" if r.merge_rank is not None else "-"
        rarity = f"{r.rarity:.2f}" if r.rarity is not None else "-"
        lines.append(f"{r.token:<10} {' '.join(_plain(r.pieces)):<22} {' '.join(map(str, r.ids)):<22} "
                     f"{'yes' if r.single else 'NO':<4} {rank:>11} {rarity:>7} {r.zipf:>5.1f}")
    lines.append(COLUMNS_HELP)
    for r in reports:
        for w in r.warnings:
            lines.append(f"  ! '{r.token}' {w}")
        for n in r.notes:
            lines.append(f"  note '{r.token}' {n}")
        if r.ok:
            lines.append(f"  ok '{r.token}': one rare token, not an English word, no overlap with the class"
                         + (" (but see the note)" if r.notes else ""))
    return "\n".join(lines)


# ---- suggestions ----------------------------------------------------------------------------------

@dataclass
class Suggestion:
    token: str
    token_id: int
    merge_rank: int
    rarity: float
    zipf: float

    @property
    def known(self) -> str | None:
        """An acronym/brand/object meaning the base model likely knows (see KNOWN_MEANINGS)."""
        return known_meaning(self.token)

    @property
    def reason(self) -> str:
        tail = max(1, round((1 - self.rarity) * 100))
        text = (f"one token (id {self.token_id}); merge {self.merge_rank:,}, among the last {tail}% learnt; "
                f"not an English word (Zipf {self.zipf:.1f})")
        return text + (f"; KNOWN MEANING: {self.known}" if self.known else "")


def rare_candidates(tokenizer, max_chars: int = 3, min_rarity: float = 0.7, max_zipf: float = 2.5) -> list[Suggestion]:
    """Every whole-word token of 2..max_chars ASCII letters from the rare tail that is not a word."""
    out = []
    for text, token_id in tokenizer.get_vocab().items():
        if not text.endswith(END):
            continue
        word = text[: -len(END)]
        if not (2 <= len(word) <= max_chars and word.isascii() and word.isalpha() and word.islower()):
            continue
        rank = merge_rank(tokenizer, token_id)
        if rank is None or rank / n_merges(tokenizer) < min_rarity:
            continue
        zipf = word_frequency(word)
        if zipf > max_zipf:
            continue
        out.append(Suggestion(word, token_id, rank, rank / n_merges(tokenizer), zipf))
    return sorted(out, key=lambda s: s.token_id)


def suggest(tokenizer, n: int = 10, max_chars: int = 3, seed: int = 0) -> list[Suggestion]:
    """n candidates drawn (reproducibly, by seed) from the rare tail, rarest-in-English first."""
    if n < 1 or max_chars < 1:
        raise ValueError(f"{'-n ' + str(n) if n < 1 else '--max-chars ' + str(max_chars)}: ask for at least 1")
    pool = [s for s in rare_candidates(tokenizer, max_chars) if tokenizer.tokenize(s.token) == [s.token + END]]
    if not pool:
        raise ValueError(f"no single-token candidates of at most {max_chars} letters in this vocabulary")
    picked = random.Random(seed).sample(pool, min(n, len(pool)))
    return sorted(picked, key=lambda s: (s.zipf, -s.merge_rank))


SUGGEST_HELP = """\
merge = which of CLIP's BPE merges made the token (higher = learnt later = rarer in its training text);
  'among the last N%' = its place in the merge order; Zipf = English word frequency (0 = never seen,
  3 = once per million words). Rare is not meaningless: a KNOWN MEANING is an acronym or brand the
  model may already draw. For any candidate, `python -m dreambooth_lab tokens neighbours TOKEN`
  (a hub id via --model for the real text encoder) lists the vocabulary entries nearest to it:
  the meaning the model already gives the token."""


def format_suggestions(suggestions: list[Suggestion]) -> str:
    """One line per candidate, flagged when it has a known meaning, then what the numbers mean (pure)."""
    lines = [f"{s.token:<6} {s.reason}" for s in suggestions]
    flagged = [s.token for s in suggestions if s.known]
    if flagged:
        lines.append(f"  ! known acronyms/brands among these: {', '.join(flagged)} (prefer the others)")
    return "\n".join(lines + [SUGGEST_HELP])


# ---- neighbours ------------------------------------------------------------------------------------

@dataclass
class Neighbour:
    token: str
    token_id: int
    cosine: float


def neighbours(token: str, text_encoder, tokenizer, k: int = 10) -> list[Neighbour]:
    """The k vocabulary entries whose input embeddings are closest (cosine) to the token's.

    A token of several pieces is represented by the mean of its pieces' embeddings.
    """
    import torch

    ids = tokenizer(token, add_special_tokens=False).input_ids
    table = text_encoder.get_input_embeddings().weight.detach().float()
    query = table[ids].mean(0, keepdim=True)
    sims = torch.nn.functional.cosine_similarity(table, query, dim=-1)
    sims[ids] = float("-inf")  # the token itself is not its own neighbour
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id]
    sims[[i for i in special if i is not None]] = float("-inf")
    others = int(torch.isfinite(sims).sum())
    if not 1 <= k <= others:
        raise ValueError(neighbours_k_problem(k, others))
    top = torch.topk(sims, k)
    inv = {v: t for t, v in tokenizer.get_vocab().items()}
    return [Neighbour(inv[i].replace(END, ""), int(i), float(c)) for c, i in zip(top.values.tolist(), top.indices.tolist())]


def neighbours_k_problem(k: int, others: int) -> str:
    """The one line for a -k that the vocabulary cannot give (pure)."""
    return f"-k {k}: the vocabulary has {others} other entries; use -k from 1 to {others}"


NEIGHBOURS_HELP = "(numbers: cosine similarity of the text encoder's input embeddings, 1 = the same direction)"
RANDOM_WEIGHTS_NOTE = ("note: this model's text encoder has random weights ('tiny'), so these neighbours carry no "
                       "meaning; pass --model with a hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5) for "
                       "the real ones")


def format_neighbours(token: str, found: list[Neighbour]) -> str:
    line = f"nearest to '{token}': " + ", ".join(f"{n.token} ({n.cosine:.2f})" for n in found)
    if (meaning := known_meaning(token)) is not None:
        line += f"\n  known meaning of '{token}': {meaning}"
    return line
