"""Issue #25 items 10, 11, 14, 15, 20, 22: faults that used to label, record or advise what is not so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from dreambooth_lab.inference import LORA_FILE, LoraFileError


def _copy_run(run: Path, dest: Path) -> Path:
    """A run folder copy without its samples or exports (what a test damages)."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("samples", "export", "checkpoints", "loras", "steps"))
    return dest


def _rewrite(lora: Path, change) -> None:
    """Write the LoRA file again with its tensors passed through `change` (dict -> dict), same metadata."""
    with safe_open(str(lora), framework="pt") as f:
        meta = f.metadata() or {}
    save_file(change(load_file(str(lora))), str(lora), metadata=meta)


def _wrong_a(state: dict) -> dict:
    key = next(k for k in sorted(state) if k.startswith("unet.") and (".down." in k or "lora_A" in k))
    return {**state, key: torch.zeros(state[key].shape[0], state[key].shape[1] + 3)}


BAD_LORAS = {
    "no layer": (lambda s: {"foo.lora.bar": torch.zeros(4, 8)}, "holds no LoRA layer"),
    "no module": (lambda s: {"unet.nowhere.to_q.lora_A.weight": torch.zeros(4, 32),
                             "unet.nowhere.to_q.lora_B.weight": torch.zeros(32, 4)}, "not a layer of"),
    "wrong lora_A shape": (_wrong_a, r"has weights of shapes \[4, 35\]"),
    "all NaN": (lambda s: {k: v * float("nan") for k, v in s.items()}, "NaN or infinite"),
    "int8": (lambda s: {k: v.to(torch.int8) for k, v in s.items()}, "is int8, but LoRA weights are float"),
    "half a layer": (lambda s: dict(list(sorted(s.items()))[1:]), "has no (down|up) weight"),
}


# ---- 15: a LoRA that loads nothing (or part of itself, or NaN) labels no picture -----------------------

@pytest.mark.parametrize("case", list(BAD_LORAS))
def test_a_lora_that_does_not_load_whole_draws_and_exports_nothing(tmp_path, trained_run, case):
    from dreambooth_lab.export import export_kohya
    from dreambooth_lab.report import sample_run

    change, message = BAD_LORAS[case]
    run = _copy_run(trained_run.run_dir, tmp_path / "run")
    _rewrite(run / LORA_FILE, change)
    with pytest.raises(LoraFileError, match=message) as exc:
        sample_run(run, progress=False)
    assert "\n" not in str(exc.value) and str(run / LORA_FILE) in str(exc.value)
    assert not (run / "samples").exists()
    with pytest.raises((LoraFileError, ValueError), match=message):
        export_kohya(run)
    assert not (run / "export").exists()


def test_adapters_attached_are_counted_against_the_file(tiny_pipe, trained_run):
    """A file whose layers diffusers attaches only in part is refused after loading, and the
    half-loaded adapter is removed (the pipeline draws nothing under the LoRA's name)."""
    from dreambooth_lab import lora_check
    from dreambooth_lab.inference import load_lora
    from dreambooth_lab.sample import ADAPTER

    lora = trained_run.run_dir / LORA_FILE
    load_lora(tiny_pipe, lora)  # the good file loads whole
    layers = lora_check.read_checked(lora)
    got = lora_check.attached(tiny_pipe, ADAPTER)
    assert {part: sum(c.values()) for part, c in got.items()} == \
        {part: sum(1 for (p, _) in layers if p == part) for part in ("unet", "text_encoder")}
    lora_check.check_attached(lora, layers, tiny_pipe, ADAPTER, "tiny")
    more = {**layers, ("unet", "extra.to_q"): {"down": (4, 32), "up": (32, 4), "diffusers": True}}
    with pytest.raises(LoraFileError, match=r"unet layers were attached"):
        lora_check.check_attached(lora, more, tiny_pipe, ADAPTER, "tiny")


def test_lora_layers_reads_both_layouts_and_refuses_broken_pairs():
    from dreambooth_lab.lora_check import flat, lora_layers

    layers = lora_layers({"unet.a.to_q.lora.down.weight": (4, 32), "unet.a.to_q.lora.up.weight": (32, 4),
                          "lora_te_text_model_x_q_proj.lora_down.weight": (4, 16),
                          "lora_te_text_model_x_q_proj.lora_up.weight": (16, 4),
                          "lora_te_text_model_x_q_proj.alpha": ()})
    assert set(layers) == {("unet", "a.to_q"), ("text_encoder", "text_model_x_q_proj")}
    with pytest.raises(LoraFileError, match="do not make one rank"):
        lora_layers({"unet.a.lora_A.weight": (4, 32), "unet.a.lora_B.weight": (32, 8)})
    assert flat((4, 32, 1, 1)) == (4, 32) and flat((4, 32, 3, 3)) == (4, 32, 3, 3)


# ---- 11: learned identifier files are checked --------------------------------------------------------

@pytest.fixture(scope="module")
def learned_run(tmp_path_factory):
    from dreambooth_lab.train import train

    tmp = tmp_path_factory.mktemp("learned")
    cfg = tiny_config(tmp, **{"identifier.learned": True, "train.steps": 2, "prior.enabled": False})
    return train(cfg, resume=None, progress=False)


@pytest.mark.parametrize("damage", ["missing", "truncated", "nan"])
def test_a_missing_or_damaged_identifier_draws_and_exports_nothing(tmp_path, learned_run, damage):
    from dreambooth_lab.export import export_kohya
    from dreambooth_lab.identifier import EMBEDDING_FILE
    from dreambooth_lab.report import sample_run

    run = _copy_run(learned_run.run_dir, tmp_path / "run")
    emb = run / EMBEDDING_FILE
    if damage == "missing":
        emb.unlink()
    elif damage == "truncated":
        emb.write_bytes(emb.read_bytes()[:-7])
    else:
        with safe_open(str(emb), framework="pt") as f:
            meta = f.metadata()
        save_file({k: v * float("nan") for k, v in load_file(str(emb)).items()}, str(emb), metadata=meta)
    want = {"missing": f"{emb} is missing: .* learned identifier <sks>", "truncated": f"{emb} is damaged",
            "nan": "NaN or infinite"}[damage]
    with pytest.raises(LoraFileError, match=want) as exc:
        sample_run(run, progress=False)
    assert "\n" not in str(exc.value)
    assert not (run / "samples").exists()
    with pytest.raises(LoraFileError, match=want):
        export_kohya(run)
    assert not (run / "export").exists()


def test_the_intact_identifier_still_samples_and_exports(tmp_path, learned_run):
    from dreambooth_lab.export import export_kohya, embedding_export_path

    run = _copy_run(learned_run.run_dir, tmp_path / "run")
    out = export_kohya(run)
    assert out.is_file() and embedding_export_path(out).is_file()


def test_an_identifier_that_clashes_with_the_tokenizer_is_refused_before_any_folder(tmp_path, monkeypatch):
    from dreambooth_lab import config as C
    from dreambooth_lab import models
    from dreambooth_lab.train import train

    real = models.load_tokenizer("tiny")
    tok = type(real).from_pretrained(real.name_or_path)
    tok.add_tokens(["<zwx>"])  # a model whose tokenizer already has the placeholder (e.g. a merged embedding)
    monkeypatch.setattr(models, "load_tokenizer", lambda name: tok)
    cfg = tiny_config(tmp_path, **{"identifier.learned": True, "data.token": "zwx"})
    with pytest.raises(C.ConfigError, match=r"data.token='zwx'.*<zwx>.*already in"):
        train(cfg, resume=None, progress=False)
    assert not (tmp_path / "runs").exists()
    cfg = tiny_config(tmp_path, **{"identifier.learned": True, "data.token": "<|endoftext|>"})
    with pytest.raises(C.ConfigError, match="tokenizer's own marker"):
        train(cfg, resume=None, progress=False)
    assert not (tmp_path / "runs").exists()


# ---- 14: --resume RUN --allow-change does what it records ----------------------------------------------

def _unfinish(run: Path) -> None:
    """A finished run made to look like one killed after its last checkpoint."""
    (run / "summary.json").unlink()
    (run / LORA_FILE).unlink()


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A 4-step run killed after its checkpoint at step 2 (copied by each test)."""
    from dreambooth_lab.train import train

    tmp = tmp_path_factory.mktemp("checkpointed")
    cfg = tiny_config(tmp, **{"train.steps": 4, "train.checkpoint_every": 2, "prior.enabled": False})
    run = train(cfg, resume=None, progress=False).run_dir
    _unfinish(run)
    return cfg, run


def _over(**extra):
    return {"train.steps": 4, "train.checkpoint_every": 2, "prior.enabled": False, **extra}


def test_a_changed_learning_rate_takes_effect_from_the_resumed_step(tmp_path, checkpointed):
    from dreambooth_lab.runs import read_metrics
    from dreambooth_lab.train import train

    cfg, original = checkpointed
    plain = shutil.copytree(original, tmp_path / "plain")
    changed_run = shutil.copytree(original, tmp_path / "changed")
    same = train(cfg, resume=plain, progress=False)
    changed = tiny_config(tmp_path, **_over(**{"optim.lr_unet": 1e-2}))
    done = train(changed, resume=changed_run, allow_change=True, progress=False)
    assert done.resumed_from == 2
    assert [r["lr"] for r in read_metrics(changed_run)] == [1e-3, 1e-3, 1e-2, 1e-2]
    assert done.lora_path.read_bytes() != same.lora_path.read_bytes()
    summary = json.loads((changed_run / "summary.json").read_text())
    assert summary["resume_override"]["applied_from_step"] == 2 and summary["steps"] == 4


def test_fewer_steps_than_the_checkpoint_and_a_new_rank_are_refused_before_loading(tmp_path, checkpointed):
    from dreambooth_lab.runs import RunMismatch
    from dreambooth_lab.train import train

    _, original = checkpointed
    run = shutil.copytree(original, tmp_path / "run")
    for extra, message in (({"train.steps": 1}, r"train.steps=1 is fewer than the 2 steps"),
                           ({"lora.rank": 8}, r"lora.rank is 8 now but 4 in the run.*--new-run")):
        cfg = tiny_config(tmp_path, **_over(**extra))
        with pytest.raises(RunMismatch, match=message) as exc:
            train(cfg, resume=run, allow_change=True, progress=False)
        assert "\n" not in str(exc.value)
    assert not list(run.glob("config-resumed-*")) and not (run / "summary.json").exists()


def test_resume_change_problem_names_what_a_checkpoint_cannot_take():
    from dreambooth_lab.config import Config, with_overrides
    from dreambooth_lab.runs import resume_change_problem

    old = Config()
    assert resume_change_problem(old, with_overrides(old, {"optim.lr_unet": 1e-2}), 20) is None
    assert resume_change_problem(old, with_overrides(old, {"train.steps": 20}), 20) is None
    assert "train.steps=10" in resume_change_problem(old, with_overrides(old, {"train.steps": 10}), 20)
    assert "lora.unet_targets" in resume_change_problem(old, with_overrides(old, {"lora.unet_targets": ["to_q"]}), 2)
    assert "train.train_text_encoder" in resume_change_problem(
        old, with_overrides(old, {"train.train_text_encoder": not old.train.train_text_encoder}), 2)


# ---- 10: the NaN message's advice can be followed ---------------------------------------------------------

def test_a_nan_run_goes_on_from_its_checkpoint_as_the_cli_message_says(tmp_path, monkeypatch, capsys):
    from conftest import poison_loss_after
    from dreambooth_lab import cli
    from dreambooth_lab.config import to_yaml

    calls = poison_loss_after(monkeypatch, 4)
    cfg = tiny_config(tmp_path, **_over(**{"train.steps": 6}))
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(to_yaml(cfg))
    assert cli.main(["train", "--config", str(cfg_file), "--new-run"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1
    err = err[0]
    run = next((tmp_path / "runs").iterdir())
    assert "step 5" in err and "optim.lr_unet" in err
    assert f"--resume {run} --allow-change" in err and "resume=" not in err and "allow_change" not in err
    args = err.split("run the same command with ")[1].split(" --resume")[0].split()  # --set optim.lr_unet=0.0005
    calls["n"] = -10**9  # the lower rate keeps the loss finite
    assert cli.main(["train", "--config", str(cfg_file), *args, "--resume", str(run), "--allow-change"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["resumed_from"] == 4
    assert summary["resume_override"]["applied_from_step"] == 4
    assert json.loads(next(run.glob("summary-failed-*.json")).read_text())["failed_at_step"] == 5


def test_the_nan_message_names_the_large_rate_and_keeps_no_steps_it_has_not(tmp_path):
    from dreambooth_lab.faults import NonFiniteLoss
    from dreambooth_lab.train import train

    cfg = tiny_config(tmp_path, **{"identifier.learned": True, "identifier.lr": 1e30, "train.steps": 4,
                                   "prior.enabled": False})
    with pytest.raises(NonFiniteLoss) as exc:
        train(cfg, resume=None, progress=False)
    msg = str(exc.value)
    assert "lower identifier.lr (now 1e+30" in msg and "optim.lr_unet" not in msg
    assert "no checkpoint was written, so no step is kept" in msg and "keep its steps" not in msg


def test_large_learning_rate_prefers_the_group_that_blew_up():
    from dreambooth_lab.config import Config, with_overrides
    from dreambooth_lab.faults import large_learning_rate

    cfg = with_overrides(Config(), {"train.train_text_encoder": True, "optim.lr_unet": 3e-3})
    assert large_learning_rate(cfg) == ("optim.lr_unet", 3e-3)
    assert large_learning_rate(cfg, {"text_encoder"}) == ("optim.lr_text_encoder", 1e-4)


# ---- 20: evaluate judges only the world's own subjects ------------------------------------------------

def test_world_subject_is_read_from_the_photo_folder_never_invented(tmp_path):
    from dreambooth_lab.config import Config
    from dreambooth_lab.world.study import judge_absent_reason, world_subject
    from conftest import SAMPLE_SUBJECT

    cfg = Config()
    cfg.model.name, cfg.data.instance_dir, cfg.data.class_name = "toyworld", str(SAMPLE_SUBJECT), "dog"
    assert world_subject(cfg) is None and "not judged" in judge_absent_reason(cfg)
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "SUBJECT.txt").write_text("toy-world subject 'backpack': class backpack, 5 photos\n")
    cfg.data.instance_dir = str(folder)
    assert world_subject(cfg) == "backpack" and judge_absent_reason(cfg) is None
    cfg.data.instance_dir = str(tmp_path / "dog-5-seed3")
    assert world_subject(cfg) == "dog"
    cfg.model.name = "tiny"
    assert judge_absent_reason(cfg) is None  # no judge outside the world: nothing to explain


def test_evaluate_on_a_toyworld_run_of_other_photos_says_why_there_is_no_judge(tmp_path):
    from dreambooth_lab.config import EvalConfig
    from dreambooth_lab.evaluate import evaluate_run
    from dreambooth_lab.train import train

    cfg = tiny_config(tmp_path, **{"model.name": "toyworld", "train.steps": 1, "prior.enabled": False,
                                   "data.class_name": "vase"})
    run = train(cfg, resume=None, progress=False).run_dir
    ev = EvalConfig(dino_model="tiny", clip_model="tiny", images_per_prompt=1, drift_images=1)
    summary = evaluate_run(run, ev, progress=False).summary
    assert not any(k.startswith("judge_") for k in summary)
    assert "not a toy-world subject's photo folder" in summary["judge"]


# ---- 22: the smaller one-liners ------------------------------------------------------------------------

def test_evaluate_on_an_unfinished_run_says_how_to_finish_it_before_loading(tmp_path, checkpointed, monkeypatch):
    from dreambooth_lab import metrics
    from dreambooth_lab.evaluate import evaluate_run

    _, original = checkpointed
    run = shutil.copytree(original, tmp_path / "run")
    monkeypatch.setattr(metrics.Embedder, "load", lambda self: pytest.fail("loaded the metric models"))
    with pytest.raises(LoraFileError, match=rf"the run has not finished: finish it with `train --resume {run}`"):
        evaluate_run(run, progress=False)
    (run / "summary.json").write_text(json.dumps({"status": "failed", "failed_at_step": 3}))
    with pytest.raises(LoraFileError, match=r"the run failed at step 3: go on .*--allow-change"):
        evaluate_run(run, progress=False)


@pytest.mark.parametrize("argv, message", [
    (["tokens", "neighbours", "sks", "-k", "100000000"], r"-k 100000000: the vocabulary has \d+ other entries"),
    (["tokens", "neighbours", "sks", "-k", "0"], r"-k 0: the vocabulary"),
    (["tokens", "suggest", "-n", "-5"], r"-n -5: ask for at least 1"),
])
def test_token_tools_refuse_impossible_counts_in_one_line(argv, message, capsys):
    from dreambooth_lab import cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and __import__("re").search(message, err), err


def test_an_int8_lora_is_named_for_its_dtype(tmp_path, trained_run, tiny_pipe):
    from dreambooth_lab.inference import load_lora

    lora = tmp_path / LORA_FILE
    shutil.copy(trained_run.run_dir / LORA_FILE, lora)
    _rewrite(lora, lambda s: {k: v.to(torch.int8) for k, v in s.items()})
    with pytest.raises(LoraFileError, match="is int8, but LoRA weights are float16, bfloat16 or float32") as exc:
        load_lora(tiny_pipe, lora)
    assert "base model" not in str(exc.value)


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads 0: use 1 or more"),
    (["--init", "/nowhere/pipeline"], "--init /nowhere/pipeline: no model_index.json there"),
    (["--unet-steps", "0"], "--unet-steps 0: use 1 or more"),
    (["--vae-steps", "0"], "--vae-steps 0: use 1 or more"),
    (["--unet-minutes", "0"], "--unet-minutes 0.0: use a positive number"),
    (["--p-look", "2"], "--p-look 2.0: use a probability from 0 to 1"),
    (["--p-compose", "-0.1"], "--p-compose -0.1: use a probability from 0 to 1"),
    (["--min-contrast", "-5"], "--min-contrast -5.0: use 0 (any colour) or a positive RGB distance"),
    (["--unet-widths", "32,40"], "--unet-widths 32,40: give 2 to 4 channel counts, each a multiple of 16"),
    (["--unet-widths", "64"], "--unet-widths 64: give 2 to 4 channel counts, each a multiple of 16"),
    (["--unet-layers", "0"], "--unet-layers 0: use 1 to 4 ResNet layers per block"),
])
def test_world_build_arguments_are_checked_before_any_folder(tmp_path, argv, message, capsys):
    from dreambooth_lab.world.build import main

    out = tmp_path / "build"
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(out), *argv])
    assert exc.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}" or (err.startswith(f"error: {message}") and "\n" not in err), err


def test_world_build_refuses_latents_drawn_with_another_scene_mix(tmp_path, capsys):
    """Latent chunks of one caption/scene mix cannot be topped up with another: one line, nothing
    loaded, the chunks left as they are."""
    import json

    from dreambooth_lab.world.build import main

    latents = tmp_path / "build" / "latents"
    latents.mkdir(parents=True)
    (latents / "MIX.json").write_text(json.dumps({"p_look": 0.85, "p_outfit": 0.3, "p_style": 0.3, "p_driving": 0.3}))
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "build"), "--p-look", "0.5"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err, err
    assert str(latents / "MIX.json") in err and "--p-look" in err
    assert sorted(p.name for p in latents.iterdir()) == ["MIX.json"]
    with pytest.raises(SystemExit):  # the contrast rule is part of the mix (build v10's latents)
        main(["--out", str(tmp_path / "build"), "--p-look", "0.85", "--p-compose", "0.3", "--min-contrast", "60"])
    assert "min_contrast" in capsys.readouterr().err
