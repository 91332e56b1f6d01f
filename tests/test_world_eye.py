"""The judge against the eye (benchmarks/world_eye.py): pictures that tuned toy-world runs generated,
labelled by eye without seeing any judge reading, must be read by the committed judge as the eye
reads them. A judge re-trained into one that scores well on rendered scenes but misreads generated
pictures (two such judges were measured: BENCHMARKS "the judge against the eye") fails here."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.world_eye import EYE, agreement, class_agreement, picture_roles, read_jsonl, score  # noqa: E402


def test_agreement_counts_both_errors_and_leaves_out_what_the_eye_cannot_tell():
    pairs = [(True, True), (True, False), (True, True), (False, False), (False, True), (None, True)]
    assert agreement(pairs) == {"n": 5, "unclear": 1, "agree": 0.6, "missed": 0.333, "false": 0.5}
    assert agreement([(None, False)]) == {"n": 0, "unclear": 1, "agree": None, "missed": None, "false": None}
    assert class_agreement([("dog", "dog"), ("cat", "dog"), (None, "cat")]) == {"n": 2, "unclear": 1, "agree": 0.5}


def test_picture_roles_ask_only_what_the_class_can_take():
    dog, backpack = picture_roles("dog", "dog"), picture_roles("backpack", "backpack")
    assert {"test:in red t-shirts", "test:driving car"} <= set(dog)
    assert not {"test:in red t-shirts", "test:driving car"} & set(backpack)
    assert dog["drift"] == backpack["drift"] == "a {class}" and dog["other:cat"] == "a cat"


def test_every_committed_picture_is_labelled_once_and_on_disk():
    pictures = read_jsonl(EYE / "pictures.jsonl")
    labels = read_jsonl(EYE / "labels.jsonl")
    assert len(pictures) >= 200
    files = [p["file"] for p in pictures]
    assert len(set(files)) == len(files) and sorted(files) == sorted(lab["file"] for lab in labels)
    assert all((EYE / f).is_file() for f in files)
    assert {lab["subject"] for lab in labels} <= {True, False, None}


def test_bad_labels_file_is_named_with_its_line(tmp_path):
    (tmp_path / "labels.jsonl").write_text('{"file": "a.png"}\nnot json\n')
    with pytest.raises(SystemExit, match=r"labels.jsonl line 2"):
        read_jsonl(tmp_path / "labels.jsonl")


# Measured on the 924 committed pictures (BENCHMARKS "the judge against the eye"), committed judge:
# subject 0.956 (misses 0.16 of what the eye sees, reads 0.005 the eye does not), asked attribute
# 0.985, class 0.948 (0.817 without its whole head), base prompts 0.077 apart from the eye on average
# (0.112 without). Bounds sit between the two, so a judge that loses the whole head fails.
AGREE_SUBJECT, FALSE_SUBJECT_MAX, AGREE_ASKED, AGREE_CLASS = 0.9, 0.02, 0.95, 0.93
BASE_MEAN_GAP_MAX = 0.1


@pytest.fixture(scope="module")
def committed_judge_reading():
    report = score(Namespace(out=EYE, judge=None))
    return report["judges"]["dreambooth_lab/world/weights/judge"]


def test_committed_judge_reads_generated_pictures_as_the_eye_does(committed_judge_reading):
    r = committed_judge_reading["readings"]
    # bounds below the measured agreement (BENCHMARKS), above the two judges that misread these pictures
    assert r["subject"]["agree"] >= AGREE_SUBJECT and r["subject"]["false"] <= FALSE_SUBJECT_MAX, r["subject"]
    assert r["asked"]["agree"] >= AGREE_ASKED, r["asked"]
    assert r["class"]["agree"] >= AGREE_CLASS, r["class"]


def test_committed_judge_reads_the_base_prompts_near_the_eye(committed_judge_reading):
    gaps = {role: v["judge"] - v["eye"] for role, v in committed_judge_reading["roles"].items()
            if role.startswith("base:") and v["eye"] is not None}
    assert len(gaps) == 26
    assert sum(abs(g) for g in gaps.values()) / len(gaps) <= BASE_MEAN_GAP_MAX, gaps


def test_committed_judge_never_reads_more_composition_than_the_eye_sees(committed_judge_reading):
    """Its figures for the subject in a new scene are lower bounds: what it misses is counted in
    BENCHMARKS, what it adds would flatter the recipe."""
    roles = committed_judge_reading["roles"]
    over = {role: v for role, v in roles.items() if role.startswith("test:") and v["eye"] is not None
            and v["n"] - v["unclear_by_eye"] >= 12 and v["judge"] > v["eye"] + 0.05}
    assert not over, over
