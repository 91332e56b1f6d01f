import pytest
import torch

from dreambooth_lab import tokens as T
from dreambooth_lab.models import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")  # the real CLIP BPE vocabulary


def test_study_tokens_are_single_rare_and_clean(tok):
    reports = T.analyze(["sks", "hta", "oue", "http"], tok, class_name="dog")
    assert all(r.single and r.in_prompt for r in reports)
    assert all(r.merge_rank == r.ids[0] - 512 for r in reports)
    sks, hta, oue, http = reports
    assert sks.ok and hta.ok and oue.ok
    assert http.rarity < sks.rarity and any("common English" in w for w in http.warnings)


def test_random_string_splits_and_is_warned(tok):
    (r,) = T.analyze("xqzv", tok)
    assert not r.single and r.merge_rank is None
    assert any("splits into 4 tokens" in w for w in r.warnings)


def test_real_word_and_class_collision_are_flagged(tok):
    (dog,) = T.analyze(["dog"], tok, class_name="dog")
    assert any("English" in w for w in dog.warnings)
    assert any("class word" in w for w in dog.warnings)
    (dogz,) = T.analyze(["dogz"], tok, class_name="dog")
    assert any("class word" in w for w in dogz.warnings)


def test_suggestions_are_single_short_rare_non_words_and_seeded(tok):
    a = T.suggest(tok, 10, max_chars=3, seed=0)
    assert len(a) == 10
    for s in a:
        assert tok.tokenize(s.token) == [s.token + "</w>"]
        assert 2 <= len(s.token) <= 3 and s.token.isalpha()
        assert s.zipf < T.COMMON_ZIPF and s.rarity >= 0.7 and s.reason
    assert [s.token for s in T.suggest(tok, 10, seed=0)] == [s.token for s in a]
    assert [s.token for s in T.suggest(tok, 10, seed=1)] != [s.token for s in a]
    assert all(r.ok for r in T.analyze([s.token for s in a], tok, class_name="dog"))


def test_neighbours_rank_by_embedding_cosine(tok):
    from dreambooth_lab.models import load_text_encoder

    enc = load_text_encoder("tiny")
    sks, hta = tok.convert_tokens_to_ids(["sks</w>", "hta</w>"])
    with torch.no_grad():  # make 'hta' point the same way as 'sks': it must become the nearest
        enc.get_input_embeddings().weight[hta] = 3 * enc.get_input_embeddings().weight[sks]
    found = T.neighbours("sks", enc, tok, k=5)
    assert found[0].token == "hta" and found[0].cosine == pytest.approx(1.0, abs=1e-5)
    assert len(found) == 5 and all(n.token != "sks" for n in found)
    assert [n.cosine for n in found] == sorted((n.cosine for n in found), reverse=True)


def test_table_lists_every_token(tok):
    text = T.format_table(T.analyze(["sks", "xqzv"], tok))
    assert "sks" in text and "NO" in text and "splits" in text


def test_tokens_cli(capsys):
    from dreambooth_lab.cli import main

    assert main(["tokens", "analyze", "sks", "hta", "oue", "http"]) == 0
    out = capsys.readouterr().out
    assert all(t in out for t in ("sks", "hta", "oue", "http")) and "common English" in out
    assert "merge rank = " in out and "zipf = " in out  # the columns are explained
    assert main(["tokens", "suggest", "-n", "4", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    picked = [s.token for s in T.suggest(load_tokenizer("tiny"), 4, seed=3)]
    assert [line.split()[0] for line in out.splitlines()[:4]] == picked
    assert "tokens neighbours" in out and "Zipf = " in out
    assert main(["tokens", "neighbours", "oue", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "nearest to 'oue'" in out and "cosine similarity" in out and "random weights" in out


def test_table_explains_every_column(tok):
    text = T.format_table(T.analyze(["oue"], tok))
    for column in ("one = ", "merge rank = ", "rarity = ", "zipf = "):
        assert column in text


def test_class_substring_is_not_called_shared_tokens(tok):
    (doggo,) = T.analyze(["doggo"], tok, class_name="dog")
    assert doggo.single  # 'doggo' is its own token in CLIP's vocabulary: nothing is shared with 'dog'
    (w,) = [w for w in doggo.warnings if "class word" in w]
    assert "contains the class word 'dog' as a substring" in w and "a different single token" in w
    assert "shares" not in w
    (dogz,) = T.analyze(["dogz"], tok, class_name="dog")  # dog + z: really shares the piece 'dog'
    assert any("shares the token(s) ['dog']" in w for w in dogz.warnings)


def test_sks_names_its_known_meaning_the_rifle(tok):
    (sks,) = T.analyze(["sks"], tok, class_name="dog")
    assert sks.ok and any("rifle" in n for n in sks.notes)
    text = T.format_table([sks])
    assert "rifle" in text and "tokens neighbours sks" in text
    (oue,) = T.analyze(["oue"], tok)
    assert oue.notes == []


def test_suggest_flags_known_acronyms_and_points_at_neighbours(tok):
    everything = T.suggest(tok, 10_000, seed=0)
    flagged = {s.token for s in everything if s.known}
    assert {"sks", "jdm", "ysl"} <= flagged and "oue" not in flagged
    few = [s for s in everything if s.token in ("jdm", "oue")]
    text = T.format_suggestions(few)
    assert "KNOWN MEANING" in text.splitlines()[[s.token for s in few].index("jdm")]
    assert "known acronyms/brands among these: jdm" in text
    assert "tokens neighbours" in text
    assert "known acronyms" not in T.format_suggestions([s for s in few if s.token == "oue"])
