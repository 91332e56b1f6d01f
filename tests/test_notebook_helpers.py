import json
import os

import pytest

from dreambooth_lab import notebook as nb
from dreambooth_lab.config import Config, ConfigError, load, with_overrides
from dreambooth_lab.report import load_run_config, load_run_pipeline
from dreambooth_lab.widgets import GenerationPanel

FORM = dict(nb.FORM_DEFAULTS, BASE_MODEL="stable-diffusion-v1-5/stable-diffusion-v1-5",
            DATASET_DIR="datasets/sample_subject", OUTPUT_DIR="runs", RARE_TOKEN="oue", CLASS="dog",
            TRAIN_TEXT_ENCODER=True, STEPS=450, BATCH_SIZE=1, LR_UNET=3e-4, LR_TEXT_ENCODER=1e-4, SEED=42,
            PRIOR_PRESERVATION=True, NUM_CLASS_IMAGES=100, PRIOR_LOSS_WEIGHT=1.0, RANK=8, MIXED_PRECISION="no",
            USE_8BIT_ADAM=True, GRADIENT_CHECKPOINTING=False, LORA_SCALE_UNET=0.6, LORA_SCALE_TEXT_ENCODER=0.64,
            GUIDANCE=6.4, GEN_SEED=8)


def test_form_fills_the_config(monkeypatch):
    monkeypatch.delenv(nb.SMOKE_ENV, raising=False)
    cfg, _ = nb.configure(dict(FORM))
    assert (cfg.data.token, cfg.train.steps, cfg.lora.rank, cfg.lora.alpha) == ("oue", 450, 8, 8.0)
    assert cfg.optim.optimizer == "adamw8bit" and cfg.train.train_text_encoder
    assert cfg.sample.seeds == [8, 9, 10, 11] and cfg.sample.lora_scale_text_encoder == 0.64
    assert os.path.isabs(cfg.data.instance_dir) and cfg.data.instance_dir.endswith("datasets/sample_subject")


def test_preserve_prompts_field_keeps_other_classes(monkeypatch, tmp_path):
    """PRESERVE_PROMPTS: prompts split on ';' into prior.preserve_prompts; left at its default ("")
    under a preset it is the preset's (none); empty pieces and spaces are dropped."""
    monkeypatch.delenv(nb.SMOKE_ENV, raising=False)
    cfg, sources = nb.configure(dict(FORM, PRESERVE_PROMPTS=" a photo of a cat ;; a photo of a {class} toy; "))
    assert cfg.prior.preserve_prompts == ["a photo of a cat", "a photo of a {class} toy"]
    assert sources["prior.preserve_prompts"] == "form"
    assert nb.configure(dict(FORM))[0].prior.preserve_prompts == []
    form = dict(nb.FORM_DEFAULTS, OUTPUT_DIR=str(tmp_path), DATASET_DIR="datasets/sample_subject")
    cfg, sources = nb.configure(form, "configs/colab_t4.yaml")
    assert cfg.prior.preserve_prompts == [] and "prior.preserve_prompts" not in sources
    cfg, _ = nb.configure(dict(form, PRESERVE_PROMPTS="a photo of a cat"), "configs/colab_t4.yaml")
    assert cfg.prior.preserve_prompts == ["a photo of a cat"]
    assert nb.prompt_list(["a", " ", "b "]) == ["a", "b"] and nb.prompt_list("") == []


def test_form_missing_a_field_is_named():
    form = dict(FORM)
    del form["RANK"]
    with pytest.raises(KeyError, match="RANK"):
        nb.form_overrides(form)


def test_preset_is_the_base_and_changed_form_fields_win(monkeypatch, tmp_path):
    """The issue's case: RARE_TOKEN=oue, CLASS=cat with PRESET=colab_t4 trains 'oue cat', not 'sks dog'."""
    monkeypatch.delenv(nb.SMOKE_ENV, raising=False)
    form = dict(nb.FORM_DEFAULTS, RARE_TOKEN="oue", CLASS="cat", OUTPUT_DIR=str(tmp_path),
                DATASET_DIR="datasets/sample_subject")
    cfg, sources = nb.configure(form, "configs/colab_t4.yaml")
    assert (cfg.data.token, cfg.data.class_name) == ("oue", "cat")
    assert sources["data.token"] == sources["data.class_name"] == "form"
    assert cfg.train.steps == 1300 and sources["train.steps"] == "preset"  # left at the form's default
    # the machine's settings are the form's, never the preset's: checkpointing 'auto' asks the memory
    # model (SD1.5 at 512 px fits a T4 without it), the checkpoint interval is the form's 400
    assert not cfg.train.gradient_checkpointing and sources["train.gradient_checkpointing"].startswith("auto (")
    assert cfg.train.checkpoint_every == 400 and sources["train.checkpoint_every"] == "form"
    assert cfg.prior.steps == 25 and "prior.steps" not in sources  # neither: the package default
    assert cfg.train.output_dir == str(tmp_path) and sources["train.output_dir"] == "form"
    assert cfg.data.instance_dir.endswith("datasets/sample_subject") and sources["data.instance_dir"] == "form"


def test_preset_from_extends_keeps_its_values(monkeypatch, tmp_path):
    monkeypatch.delenv(nb.SMOKE_ENV, raising=False)
    form = dict(nb.FORM_DEFAULTS, OUTPUT_DIR=str(tmp_path), DATASET_DIR="datasets/sample_subject", STEPS=100)
    cfg, sources = nb.configure(form, "configs/study/exp3.yaml")
    assert cfg.data.token == "http" and sources["data.token"] == "preset"  # set by exp3 itself
    assert cfg.optim.lr_unet == 3e-4 and sources["optim.lr_unet"] == "preset"  # set by base.yaml
    assert cfg.train.steps == 100 and sources["train.steps"] == "form"
    assert cfg.sample.seeds == load(nb.find_repo_root() / "configs/study/exp3.yaml").sample.seeds
    assert sources["sample.seeds"] == "preset"  # GEN_SEED left at its default: the study's own seed


def test_a_form_of_folders_only_takes_the_preset_as_it_is(monkeypatch, tmp_path):
    """Notebook 03's form is PRESET, DATASET_DIR and OUTPUT_DIR: `configure(globals(), PRESET)` is the
    preset with this machine's folders, its own precision and checkpointing included."""
    monkeypatch.delenv(nb.SMOKE_ENV, raising=False)
    preset = "configs/study/small_dog_scale060.yaml"
    form = {"PRESET": preset, "DATASET_DIR": "datasets/sample_subject", "OUTPUT_DIR": str(tmp_path), "nb": nb}
    cfg, sources = nb.configure(form, preset)
    own = load(nb.find_repo_root() / preset)
    assert (cfg.train.steps, cfg.data.token, cfg.optim.optimizer) == (own.train.steps, own.data.token,
                                                                     own.optim.optimizer)
    assert cfg.train.gradient_checkpointing == own.train.gradient_checkpointing
    assert not any(src == "form" for k, src in sources.items() if k not in ("data.instance_dir", "train.output_dir"))
    assert cfg.train.output_dir == str(tmp_path) and sources["train.output_dir"] == "form"
    assert cfg.data.instance_dir.endswith("datasets/sample_subject") and sources["data.instance_dir"] == "form"
    with pytest.raises(KeyError, match="does not define"):  # without a preset, the form is the whole config
        nb.configure(form)


def test_fits_is_the_one_memory_check():
    assert nb.fits(10.0, 15.0) and not nb.fits(12.0, 15.0)  # 12 GiB x 1.3 margin is over a T4's 15


def test_merge_form_without_a_preset_uses_every_field():
    over, used = nb.merge_form(dict(nb.FORM_DEFAULTS), preset=False)
    assert used == list(nb.FORM_FIELDS)
    assert over["data.class_name"] == "dog" and over["train.checkpoint_every"] == 400
    assert over["data.resolution"] == 512 and over["sample.steps"] == 30 and over["sample.negative_prompt"] == ""


@pytest.mark.parametrize(("changes", "expected"), [
    ({}, ["DATASET_DIR", "OUTPUT_DIR"]),
    ({"STEPS": 100}, ["DATASET_DIR", "OUTPUT_DIR", "STEPS"]),
    ({"RANK": 16, "USE_8BIT_ADAM": False}, ["DATASET_DIR", "OUTPUT_DIR", "RANK"]),
])
def test_merge_form_with_a_preset_uses_changed_fields_and_the_machine_s(changes, expected):
    over, used = nb.merge_form(dict(nb.FORM_DEFAULTS, **changes), preset=True)
    machine = [n for n in nb.FORM_FIELDS if n in nb.MACHINE_FIELDS]
    assert used == [n for n in nb.FORM_FIELDS if n in expected or n in machine]
    if "RANK" in changes:
        assert over["lora.rank"] == 16 and over["lora.alpha"] == 16.0 and over["optim.optimizer"] == "adamw"


def test_form_wins_sets_a_field_back_to_the_form_default_over_a_preset(tmp_path):
    """A preset's 1300 steps cannot be set back to the form's 800 by typing 800 (it is the form's
    default, so it reads as "not set"); naming STEPS in FORM_WINS makes the form's value win."""
    form = dict(nb.FORM_DEFAULTS, OUTPUT_DIR=str(tmp_path), DATASET_DIR="datasets/sample_subject")
    preset = "configs/study/exp2.yaml"
    cfg, sources = nb.configure(form, preset)
    assert cfg.train.steps != nb.FORM_DEFAULTS["STEPS"] and sources["train.steps"] == "preset"
    cfg, sources = nb.configure(dict(form, FORM_WINS="steps, LR_UNET"), preset)
    assert cfg.train.steps == nb.FORM_DEFAULTS["STEPS"] and sources["train.steps"] == "form"
    assert sources["optim.lr_unet"] == "form" and sources["data.token"] == "preset"
    with pytest.raises(ValueError, match="FORM_WINS names STEP,"):
        nb.configure(dict(form, FORM_WINS="STEP, RANK"), preset)


def test_preset_keys_follow_extends():
    keys = nb.preset_keys(nb.find_repo_root() / "configs/study/exp5.yaml")
    assert {"data.token", "train.train_text_encoder", "sample.seeds", "optim.lr_unet", "model.name"} <= keys
    assert "extends" not in keys and "prior.steps" not in keys


def test_flat_keys_is_the_dotted_leaves():
    from dreambooth_lab.sweep_spec import flat_keys

    assert flat_keys({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b", "a.c.d", "e"}


def test_preset_choices_list_the_study_presets_not_sweeps():
    choices = nb.preset_choices()
    assert choices[:3] == ["configs/colab_t4.yaml", "configs/colab_t4_sdxl.yaml", "configs/tiny.yaml"]
    assert [f"configs/study/exp{i}.yaml" for i in range(1, 9)] == [c for c in choices if "/exp" in c]
    assert "configs/study/small_dog_scale060.yaml" in choices and "configs/study/small_dog_scale064.yaml" in choices
    assert "configs/study/tokens.yaml" not in choices and "configs/study/base.yaml" not in choices


def test_summary_prints_every_value_with_its_source(monkeypatch, tmp_path):
    monkeypatch.delenv(nb.SMOKE_ENV, raising=False)
    form = dict(nb.FORM_DEFAULTS, CLASS="cat", OUTPUT_DIR=str(tmp_path), DATASET_DIR="datasets/sample_subject")
    cfg, sources = nb.configure(form, "configs/colab_t4.yaml")
    text = nb.summary(cfg, sources)
    lines = {line.split()[0]: line for line in text.splitlines()[:-1]}
    assert set(lines) == {k for k, _ in nb.leaves(cfg) if not k.startswith("eval.")}
    assert lines["data.class_name"].split()[-1] == "form" and "'cat'" in lines["data.class_name"]
    assert lines["train.steps"].split()[-1] == "preset"
    assert lines["prior.steps"].split()[-1] == "default"
    assert "config hash" in text.splitlines()[-1]


def test_empty_dataset_dir_without_a_preset_is_an_error_not_the_sample(monkeypatch):
    monkeypatch.delenv(nb.SMOKE_ENV, raising=False)
    with pytest.raises(ConfigError, match="instance_dir"):
        nb.configure(dict(nb.FORM_DEFAULTS, DATASET_DIR=""))


def test_bf16_on_a_gpu_without_it_becomes_fp16(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    sources = {}
    cfg = nb.form._machine_precision(with_overrides(Config(), {"train.mixed_precision": "bf16"}), sources)
    assert cfg.train.mixed_precision == "fp16" and sources["train.mixed_precision"] == "this machine"
    assert "Tesla T4 has no bf16" in capsys.readouterr().out


def test_smoke_switch_selects_the_tiny_model(monkeypatch, tmp_path):
    monkeypatch.setenv(nb.SMOKE_ENV, "1")
    monkeypatch.setenv(nb.OUTPUT_ENV, str(tmp_path))
    cfg, _ = nb.configure(dict(FORM, MIXED_PRECISION="fp16"))
    assert cfg.is_tiny and cfg.train.steps < 50 and cfg.train.output_dir == str(tmp_path)
    assert cfg.train.mixed_precision == "no"
    assert cfg.data.token == "oue"  # what the study varies is kept


def test_hub_token_is_kept_in_memory_only(monkeypatch, tmp_path, capsys):
    secret = "hf_test_SECRET_do_not_leak_123"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr("getpass.getpass", lambda prompt="": secret)
    assert nb.hub_login() is True
    assert os.environ["HF_TOKEN"] == secret
    out = capsys.readouterr()
    assert secret not in out.out + out.err
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="ignore"), path


def test_panel_generate_writes_images_and_sidecars_with_its_values(trained_run):
    pipe = load_run_pipeline(trained_run.run_dir, device="cpu")
    panel = GenerationPanel(pipe, load_run_config(trained_run.run_dir), trained_run.run_dir)
    panel.prompt.value = "A sks dog on the moon"
    panel.negative.value = "blurry"
    panel.scale_unet.value, panel.scale_te.value = 0.85, 0.15
    panel.guidance.value, panel.steps.value = 3.5, 3
    panel.seed.value, panel.count.value = 123, 2
    panel.button.click()  # the button's own callback, headless
    pngs = sorted(panel.folder.glob("click001-*.png"))
    assert len(pngs) == 2
    sides = [json.loads(p.with_suffix(".json").read_text()) for p in pngs]
    assert [s["seed"] for s in sides] == [123, 124]
    for s in sides:
        assert (s["prompt"], s["negative_prompt"], s["steps"]) == ("A sks dog on the moon", "blurry", 3)
        assert (s["lora_scale_unet"], s["lora_scale_text_encoder"], s["guidance"]) == (0.85, 0.15, 3.5)
    panel.random_seed.value, panel.count.value = True, 1
    paths = panel.generate()
    side = json.loads(paths[0].with_suffix(".json").read_text())
    assert side["seed"] == panel.seed.value and side["seed"] != 123
    assert panel.pipe is pipe  # no reload per click
    assert "saved 1 image" in panel.status.value


# ---- the photos -----------------------------------------------------------------------------

def test_missing_photos_stop_with_where_how_many_and_what_to_set(tmp_path, monkeypatch):
    monkeypatch.setenv(nb.SMOKE_ENV, "1")  # smoke mode checks the same way: no substitute photos
    folder = tmp_path / "study_dog"
    with pytest.raises(nb.PhotosMissing) as err:
        nb.check_photos(folder, expect="the study's 18 photos of the dog")
    text = str(err.value)
    assert f"{folder} does not exist" in text and "18 photos" in text and "DATASET_DIR" in text
    assert err.value._render_traceback_()[0].startswith("PhotosMissing: the notebook stops here")
    folder.mkdir()
    (folder / "readme.txt").write_text("x")
    with pytest.raises(nb.PhotosMissing, match="holds no photos"):
        nb.check_photos(folder)
    with pytest.raises(nb.PhotosMissing, match="DATASET_DIR is empty"):
        nb.check_photos("")


def test_photos_present_are_listed(capsys):
    photos = nb.check_photos("datasets/sample_subject")  # relative: from the repository root
    folder = nb.find_repo_root() / "datasets/sample_subject"
    assert photos and f"{len(photos)} photo(s) in {folder}" in capsys.readouterr().out


@pytest.mark.parametrize(("colab", "mounted", "hint"), [
    (False, False, "This is not Colab"),
    (True, False, "Google Drive is not mounted"),
    (True, True, None),
])
def test_photos_message_for_a_drive_folder(colab, mounted, hint):
    folder = nb.DRIVE_DATASETS / "study_dog"
    text = nb.photos_message(folder, f"{folder} does not exist", "18 photos", colab=colab, drive_mounted=mounted)
    assert "My Drive › dreambooth_lab › datasets › study_dog" in text and "18 photos" in text
    for other in ("This is not Colab", "Google Drive is not mounted"):
        assert (other in text) == (other == hint)


def test_drive_location():
    assert nb.drive_location(nb.DRIVE / "a" / "b") == "My Drive › a › b"
    assert nb.drive_location("/tmp/a") is None


def test_smoke_mode_keeps_a_missing_photo_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(nb.SMOKE_ENV, "1")
    missing = tmp_path / "nothing"
    cfg, _ = nb.configure(dict(FORM, DATASET_DIR=str(missing)))
    assert cfg.data.instance_dir == str(missing)  # never swapped for the sample subject
    assert nb.machine_overrides(str(missing))["data.instance_dir"] == str(missing)


# ---- set-up ---------------------------------------------------------------------------------

class FakeRun:
    """Stands in for subprocess.run: records commands, fails the n-th call when asked."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, cmd, check=False, **kw):
        import subprocess

        self.calls.append(cmd)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise subprocess.CalledProcessError(1, cmd)


def test_an_interrupted_install_is_retried_and_a_finished_one_skipped(tmp_path):
    import subprocess

    (tmp_path / "requirements.txt").write_text("diffusers==0.42.1\n")
    broken = FakeRun(fail_at=2)  # the second command fails: half installed
    with pytest.raises(subprocess.CalledProcessError):
        nb.ensure_installed(tmp_path, run=broken)
    assert not (tmp_path / nb.INSTALL_MARKER).exists()
    again = FakeRun()
    assert nb.ensure_installed(tmp_path, run=again) is True  # the folder exists, still installs
    assert len(again.calls) == len(nb.INSTALL_COMMANDS) and "requirements.txt" in again.calls[0]
    assert (tmp_path / nb.INSTALL_MARKER).is_file()
    skipped = FakeRun()
    assert nb.ensure_installed(tmp_path, run=skipped) is False and skipped.calls == []
    (tmp_path / "requirements.txt").write_text("diffusers==0.43.0\n")  # the requirements changed
    changed = FakeRun()
    assert nb.ensure_installed(tmp_path, run=changed) is True and changed.calls


def test_restore_checkout_checks_out_missing_files():
    class Git(FakeRun):
        def __call__(self, cmd, check=False, **kw):
            super().__call__(cmd, check, **kw)
            return type("R", (), {"stdout": "dreambooth_lab/train.py\nREADME.md\n"})()

    git = Git()
    assert nb.restore_checkout("/repo", run=git) == ["dreambooth_lab/train.py", "README.md"]
    assert git.calls[-1] == ["git", "-C", "/repo", "checkout", "--", "dreambooth_lab/train.py", "README.md"]


def test_setup_reports_versions_device_and_where_results_go():
    text = nb.setup()
    for name in ("torch", "diffusers", "transformers", "peft"):
        assert f"{name} " in text
    assert "GPU" in text and "results go to" in text


def test_setup_on_colab_mounts_drive_installs_once_and_enables_widgets(tmp_path, monkeypatch):
    """Colab's modules faked: the calls setup() makes there, in order, and the install marker."""
    import sys
    import types

    calls = []
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(mount=lambda path: calls.append(("mount", path)))
    colab.output = types.SimpleNamespace(enable_custom_widget_manager=lambda: calls.append(("widgets",)))
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    (tmp_path / "requirements.txt").write_text("peft==0.21.2\n")
    first = FakeRun()
    text = nb.setup(root=tmp_path, run=first)
    assert calls == [("mount", "/content/drive"), ("widgets",)]
    assert len(first.calls) == len(nb.INSTALL_COMMANDS) and "packages: installed now" in text
    assert "Google Drive: not mounted" in text and "a disconnect erases" in text  # the fake mount made nothing
    second = FakeRun()
    assert "packages: already installed" in nb.setup(root=tmp_path, run=second, mount_drive=False)
    assert second.calls == []


def test_the_form_offers_sdxl_base_and_its_t4_preset():
    """main.ipynb's form: BASE_MODEL's dropdown has SD1.5 and SDXL base, PRESET has colab_t4_sdxl,
    RESOLUTION has 1024; nothing else in the form is SDXL's own."""
    import ast

    import nbformat

    cell = next(c for c in nbformat.read(nb.find_repo_root() / "main.ipynb", as_version=4).cells
                if "parameters" in c.metadata.get("tags", []))
    lines = {line.split("=")[0].strip(): line for line in cell.source.splitlines() if "#@param" in line}

    def offered(name):
        return ast.literal_eval(lines[name].split("#@param", 1)[1].split("]", 1)[0].strip() + "]")

    assert tuple(offered("BASE_MODEL")) == nb.BASE_MODELS == (nb.FORM_DEFAULTS["BASE_MODEL"], nb.SDXL_BASE)
    assert "allow-input: true" in lines["BASE_MODEL"]  # any other hub id or folder can be typed in
    assert "configs/colab_t4_sdxl.yaml" in offered("PRESET") and 1024 in offered("RESOLUTION")
    summary_cell = next(c.source for c in nbformat.read(nb.find_repo_root() / "main.ipynb", as_version=4).cells
                        if "nb.configure(globals(), PRESET)" in c.source)
    assert "nb.memory_note(cfg)" in summary_cell


def test_sdxl_preset_through_the_form(monkeypatch, tmp_path):
    """PRESET=colab_t4_sdxl with the form at its defaults trains SDXL at 1024 px with the preset's
    switches; a field the user changes still wins."""
    monkeypatch.delenv(nb.SMOKE_ENV, raising=False)
    form = dict(nb.FORM_DEFAULTS, OUTPUT_DIR=str(tmp_path), DATASET_DIR="datasets/sample_subject", CLASS="cat")
    cfg, sources = nb.configure(form, "configs/colab_t4_sdxl.yaml")
    assert cfg.model.name == nb.SDXL_BASE and sources["model.name"] == "preset"
    assert cfg.resolution == 1024 and sources["data.resolution"] == "preset"
    assert cfg.train.gradient_checkpointing and cfg.optim.optimizer == "adamw8bit"
    assert not cfg.train.train_text_encoder and sources["train.train_text_encoder"] == "preset"
    assert cfg.data.class_name == "cat" and sources["data.class_name"] == "form"


def test_memory_note_says_whether_it_fits(tmp_path):
    from conftest import tiny_config

    cfg = tiny_config(tmp_path)
    fits = nb.memory_note(cfg, gpu_gib=15.0, gpu_name="Tesla T4")
    assert fits.startswith("memory model: ") and "Tesla T4 (15.0 GiB): fits" in fits
    tiny_gpu = nb.memory_note(cfg, gpu_gib=0.001, gpu_name="a tiny GPU")
    assert "likely out of memory" in tiny_gpu and "GRADIENT_CHECKPOINTING" in tiny_gpu
    cfg.model.name = "no-such-org/no-such-model"  # configs not readable here: a note, never an error
    assert nb.memory_note(cfg, gpu_gib=15.0).startswith("memory model: no estimate for 'no-such-org/no-such-model'")


def test_panel_on_an_sdxl_pipeline_has_the_second_text_encoder_scale(tmp_path):
    """The panel takes the family from the pipeline: SDXL gets a third LoRA scale, SD1 does not."""
    from dreambooth_lab.config import Config, ModelConfig
    from dreambooth_lab.models import load_pipeline

    cfg = Config()
    cfg.model.name = "tiny-sdxl"
    cfg.train.output_dir = str(tmp_path)
    cfg.sample.lora_scale_text_encoder = 0.3
    pipe = load_pipeline(ModelConfig(name="tiny-sdxl", dtype="float32"), device="cpu")
    panel = GenerationPanel(pipe, cfg)
    assert panel.scale_te2 is not None and panel.scale_te2.value == 0.3  # follows the text-encoder scale
    assert panel.scale_te2 in panel.widget.children
    panel.scale_te2.value = 0.7
    assert panel.specs()[0].lora_scale_text_encoder_2 == 0.7
    sd1 = GenerationPanel(load_pipeline(ModelConfig(name="tiny", dtype="float32"), device="cpu"), Config())
    assert sd1.scale_te2 is None and sd1.specs()[0].lora_scale_text_encoder_2 is None
