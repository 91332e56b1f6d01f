"""train.save_lora_every: a usable LoRA and the subject's pictures at chosen steps, the
steps x seeds sheet, and kohya files to download whose names never clash (issue #22 item 4)."""

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from conftest import tiny_config
from dreambooth_lab import config as C
from dreambooth_lab import export, identifier, inference, sample, steps
from dreambooth_lab.train import train

# Text encoder trained, a high lr and sample scales other than 1: the LoRA shows in the pictures,
# and a picture drawn at the wrong scale would not match the one `sample` draws.
OVER = {"train.steps": 5, "train.save_lora_every": 2, "train.train_text_encoder": True, "optim.lr_unet": 3e-3,
        "optim.lr_text_encoder": 3e-3, "prior.enabled": False, "sample.lora_scale_unet": 0.7,
        "sample.lora_scale_text_encoder": 0.5}


@pytest.fixture(scope="module")
def stepped(tmp_path_factory):
    return train(tiny_config(tmp_path_factory.mktemp("stepped"), **OVER), resume=None, progress=False)


# ---- pure helpers and the config field ----------------------------------------------------------

def test_saved_steps_are_every_n_and_the_last():
    assert steps.saved_steps(5, 2) == [2, 4, 5]
    assert steps.saved_steps(6, 2) == [2, 4, 6]
    assert steps.saved_steps(1300, 400) == [400, 800, 1200, 1300]
    assert steps.saved_steps(3, 10) == [3]
    assert steps.saved_steps(100, 0) == []


def test_step_file_names_and_their_run():
    assert steps.lora_path("r", 400).as_posix() == "r/loras/step-000400.safetensors"
    assert steps.images_dir("r", 7).as_posix() == "r/steps/step-000007"
    assert steps.step_of("r/loras/step-000400.safetensors") == 400
    assert steps.step_of("r/pytorch_lora_weights.safetensors") is None
    assert export.download_name("runs/sks-dog-20250101-120000") == "sks-dog-20250101-120000_kohya.safetensors"
    assert export.download_name("runs/sks-dog-20250101-120000", 400) == \
        "sks-dog-20250101-120000_step-000400_kohya.safetensors"


def test_save_lora_every_is_validated_in_one_line_and_left_out_of_the_hash():
    with pytest.raises(C.ConfigError, match=r"train\.save_lora_every=-1: use 0 \(off\) or a step count") as err:
        C.with_overrides(C.Config(), {"train.save_lora_every": -1}).validate()
    lines = [line for line in str(err.value).splitlines() if line.strip() != "Invalid config:"]
    assert len(lines) == 1  # one line, naming the field and what to use
    cfg = C.Config()
    for key, value in (("train.save_lora_every", 200), ("train.step_images", False)):
        assert C.with_overrides(cfg, {key: value}).hash() == cfg.hash()


# ---- what a run writes ------------------------------------------------------------------------------

def test_a_run_writes_a_loadable_lora_and_pictures_at_each_saved_step(stepped, tiny_pipe):
    run = stepped.run_dir
    assert list(steps.step_loras(run)) == [2, 4, 5] and list(steps.step_image_dirs(run)) == [2, 4, 5]
    meta = export.read_metadata(steps.lora_path(run, 2))
    final_meta = export.read_metadata(stepped.lora_path)
    assert meta["dreambooth_lab.step"] == "2" and "dreambooth_lab.step" not in final_meta
    assert {k: v for k, v in meta.items() if k != "dreambooth_lab.step"} == final_meta  # the final file's metadata
    # the last step's file holds the final LoRA's tensors; an earlier step's differs
    last, final = load_file(str(steps.lora_path(run, 5))), load_file(str(stepped.lora_path))
    assert last.keys() == final.keys() and all((last[k] == final[k]).all() for k in final)
    early = load_file(str(steps.lora_path(run, 2)))
    assert any(not (early[k] == final[k]).all() for k in final)
    inference.load_lora(tiny_pipe, steps.lora_path(run, 2))  # loads as any LoRA file does
    try:
        assert inference.has_text_encoder_lora(tiny_pipe)
    finally:
        tiny_pipe.delete_adapters(sample.ADAPTER)
    pngs = sorted(p.name for p in steps.images_dir(run, 4).glob("*.png"))
    assert pngs == ["img-00-seed0.png", "img-01-seed1.png"]  # tiny_config's sample.seeds
    spec = sample.read_sidecar(steps.images_dir(run, 4) / pngs[1])
    assert (spec.prompt, spec.seed, spec.extra, spec.lora_scale_unet, spec.lora_scale_text_encoder) == \
        ("A sks dog", 1, {"step": 4}, 0.7, 0.5)
    assert spec.lora == str(steps.lora_path(run, 4).resolve())


def test_step_pictures_are_what_sample_draws_with_that_steps_lora(stepped):
    png = steps.images_dir(stepped.run_dir, 4) / "img-00-seed0.png"
    drawn = np.asarray(Image.open(png)).astype(int)
    again = np.asarray(inference.regenerate(png)).astype(int)  # a fresh pipeline with loras/step-000004
    assert np.abs(drawn - again).max() <= 1
    spec = sample.read_sidecar(png)
    pipe = inference.pipeline_for(spec)
    full = np.asarray(sample.generate(pipe, [replace(spec, lora_scale_unet=1.0, lora_scale_text_encoder=1.0)],
                                      progress=False)[0]).astype(int)
    assert np.abs(drawn - full).max() > 1  # drawn at the sample scales, not as trained


def test_drawing_pictures_mid_run_changes_no_weight(stepped, tmp_path):
    plain = train(tiny_config(tmp_path, **{**OVER, "train.save_lora_every": 0}), resume=None, progress=False)
    assert plain.lora_path.read_bytes() == stepped.lora_path.read_bytes()
    assert not (plain.run_dir / steps.LORAS).exists() and not (plain.run_dir / steps.STEP_IMAGES).exists()


def test_step_images_false_keeps_the_loras_only(tmp_path):
    run = train(tiny_config(tmp_path, **{**OVER, "train.step_images": False, "train.steps": 2}), resume=None,
                progress=False).run_dir
    assert list(steps.step_loras(run)) == [2] and not (run / steps.STEP_IMAGES).exists()


class Interrupt(Exception):
    pass


def test_a_resumed_run_keeps_its_files_and_writes_the_same_bytes(stepped, tmp_path):
    over = {**OVER, "train.steps": 5, "train.checkpoint_every": 3}
    cfg = tiny_config(tmp_path, **over)

    def stop_at_5(record):
        if record["step"] == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, resume="auto", progress=False, on_step=stop_at_5)
    run = next((tmp_path / "runs").iterdir())
    assert list(steps.step_loras(run)) == [2, 4]  # step 4 came after the checkpoint at 3
    assert not (run / "steps" / steps.SHEET).exists()  # stopped before its last step: no sheet yet
    kept = {p: p.stat().st_mtime_ns for p in [*steps.step_loras(run).values(), *steps.images_dir(run, 2).iterdir()]}
    import shutil

    shutil.rmtree(steps.images_dir(run, 4))  # as if killed between step 4's LoRA and its pictures
    (run / "loras" / ".step-000006.safetensors.x.tmp").write_bytes(b"half")  # left by a kill
    resumed = train(cfg, resume="auto", progress=False)
    assert resumed.run_dir == run and resumed.resumed_from == 3
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # step 4 was trained again; its file was kept
    assert sorted(p.name for p in (run / "loras").iterdir()) == [f"step-00000{s}.safetensors" for s in (2, 4, 5)]
    for step in (2, 4, 5):
        assert steps.lora_path(run, step).read_bytes() == steps.lora_path(stepped.run_dir, step).read_bytes()
        for png in steps.images_dir(stepped.run_dir, step).glob("*.png"):
            assert (steps.images_dir(run, step) / png.name).read_bytes() == png.read_bytes(), (step, png.name)
    assert resumed.lora_path.read_bytes() == stepped.lora_path.read_bytes()
    sheet = run / "steps" / steps.SHEET  # drawn once the resumed call drew the last step's pictures
    layout, whole = (json.loads(p.with_suffix(".json").read_text()) for p in (sheet, stepped.run_dir / "steps" / steps.SHEET))
    assert layout["row_labels"] == whole["row_labels"] and layout["cells"] == whole["cells"]  # the titles name the runs


def test_a_step_with_a_learned_identifier_keeps_its_embedding_beside_it(tmp_path):
    run = train(tiny_config(tmp_path, **{"identifier.learned": True, "train.steps": 2, "prior.enabled": False,
                                         "train.save_lora_every": 1, "train.step_images": False}),
                resume=None, progress=False).run_dir
    first = run / "loras" / "step-000001_learned_embeds.safetensors"
    assert first.is_file() and first.read_bytes() != (run / "learned_embeds.safetensors").read_bytes()
    assert identifier.embedding_beside(steps.lora_path(run, 1)) == first
    kohya = export.kohya_for_download(run, step=1)
    assert export.embedding_export_path(kohya).read_bytes() == first.read_bytes()


# ---- the sheet ----------------------------------------------------------------------------------------

def test_steps_sheet_has_a_row_per_step_and_a_column_per_seed(stepped, tmp_path):
    from dreambooth_lab.steps import steps_sheet

    sheet = stepped.run_dir / "steps" / "steps_x_seeds.png"  # train() draws it after the last step
    assert sheet.is_file()
    layout = json.loads(sheet.with_suffix(".json").read_text())
    assert layout["row_labels"] == ["step 2", "step 4", "step 5\n(final)"]
    assert layout["col_labels"] == ["seed 0", "seed 1"]
    assert layout["cells"][1] == ["step-000004/img-00-seed0.png", "step-000004/img-01-seed1.png"]
    assert layout["params"]["lora_scale_unet"] == 0.7 and layout["params"]["sampling_steps"] == 4
    again = steps_sheet(stepped.run_dir, tmp_path / "again.png")
    assert json.loads(again.with_suffix(".json").read_text())["row_labels"] == layout["row_labels"]


def test_steps_sheet_of_a_run_without_step_pictures_says_what_to_set(trained_run):
    from dreambooth_lab.steps import steps_sheet

    with pytest.raises(FileNotFoundError, match=r"no step pictures .*train\.save_lora_every=N"):
        steps_sheet(trained_run.run_dir)


def test_cli_sheet_steps_and_export_step(stepped, tmp_path, capsys):
    from dreambooth_lab.cli import main

    assert main(["sheet", "steps", str(stepped.run_dir), "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").is_file()
    assert main(["export", str(stepped.run_dir), "--step", "4", "--out", str(tmp_path / "k.safetensors")]) == 0
    assert export.read_metadata(tmp_path / "k.safetensors")["dreambooth_lab.step"] == "4"
    capsys.readouterr()
    assert main(["export", str(stepped.run_dir), "--step", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no LoRA at step 3" in err and "2, 4, 5" in err


# ---- files to download ------------------------------------------------------------------------------

def test_download_files_carry_the_run_and_step_and_load_back(stepped, tmp_path):
    other = train(tiny_config(tmp_path, **{**OVER, "train.steps": 2}), resume=None, progress=False)
    names = {export.kohya_for_download(r, step=s, out_dir=tmp_path / "dl").name
             for r in (stepped.run_dir, other.run_dir) for s in (None, 2)}
    assert len(names) == 4  # two runs x (final, step 2): no two share a name
    step_file = export.kohya_for_download(stepped.run_dir, step=2, out_dir=tmp_path / "dl")
    assert stepped.run_dir.name in step_file.name and "step-000002" in step_file.name
    final = export.kohya_for_download(stepped.run_dir)
    assert final == stepped.run_dir / "export" / f"{stepped.run_dir.name}_kohya.safetensors"
    assert export.kohya_for_download(stepped.run_dir) == final  # a notebook cell run twice: the same file
    keys = load_file(str(step_file)).keys()
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    assert export.read_metadata(step_file)["dreambooth_lab.step"] == "2"
    pipe = inference.pipeline_for(sample.ImageSpec(prompt="A sks dog", seed=0))
    inference.load_lora(pipe, step_file)  # what A1111 / ComfyUI read; diffusers reads it too
    assert inference.has_text_encoder_lora(pipe)
    # the step's own file exports to the same bytes as the run folder with step=
    assert export.export_kohya(steps.lora_path(stepped.run_dir, 2), tmp_path / "x.safetensors").read_bytes() == \
        step_file.read_bytes()


def test_download_of_a_missing_step_names_the_saved_ones(stepped, trained_run):
    with pytest.raises(FileNotFoundError, match=r"no LoRA at step 3 \(its saved steps: 2, 4, 5\)"):
        export.kohya_for_download(stepped.run_dir, step=3)
    with pytest.raises(FileNotFoundError, match=r"it saved none \(train with train\.save_lora_every=N"):
        export.kohya_for_download(trained_run.run_dir, step=2)


def test_sdxl_step_pictures_scale_both_text_encoders_as_sample_does(tmp_path):
    run = train(tiny_config(tmp_path, **{**OVER, "model.name": "tiny-sdxl", "train.steps": 2,
                                         "sample.lora_scale_text_encoder_2": 0.3, "sample.seeds": [3]}),
                resume=None, progress=False).run_dir
    png = steps.images_dir(run, 2) / "img-00-seed3.png"
    assert sample.read_sidecar(png).lora_scale_text_encoder_2 == 0.3
    drawn = np.asarray(Image.open(png)).astype(int)
    assert np.abs(drawn - np.asarray(inference.regenerate(png)).astype(int)).max() <= 1


def test_load_run_pipeline_loads_a_chosen_steps_lora(stepped):
    from dreambooth_lab.report import load_run_pipeline

    png = steps.images_dir(stepped.run_dir, 2) / "img-00-seed0.png"
    spec = sample.read_sidecar(png)
    at_2 = np.asarray(sample.generate(load_run_pipeline(stepped.run_dir, device="cpu", step=2), [spec],
                                      progress=False)[0])
    final = np.asarray(sample.generate(load_run_pipeline(stepped.run_dir, device="cpu"), [spec], progress=False)[0])
    drawn = np.asarray(Image.open(png)).astype(int)
    assert np.abs(at_2.astype(int) - drawn).max() <= 1 and np.abs(final.astype(int) - drawn).max() > 1
    with pytest.raises(FileNotFoundError, match="no LoRA at step 3"):
        load_run_pipeline(stepped.run_dir, device="cpu", step=3)
