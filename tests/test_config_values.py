"""What a value typed into `--set`, a YAML file, a sweep spec, the form or a sheet axis becomes, and
the checks that run on it before anything is made (issue #25: items 2, 3, 9, 12, 16, 17, 18, 19)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import yaml

from conftest import SAMPLE_SUBJECT
from dreambooth_lab import config as C
from dreambooth_lab.cli import _overrides, main


def _one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# ---- item 2: a string field takes the text as typed ---------------------------------------------

SPELLINGS = ["no", "on", "yes", "off", "1e3", "0x10", "null", "~", "1.5", "2024-01-01"]


@pytest.mark.parametrize("text", SPELLINGS)
def test_set_gives_a_string_field_the_text_as_typed(text):
    cfg = C.with_overrides(C.Config(), _overrides([f"data.token={text}", f"data.class_name={text}"]))
    assert (cfg.data.token, cfg.data.class_name) == (text, text)


def test_accelerates_own_spelling_of_mixed_precision_is_accepted(capsys):
    assert C.with_overrides(C.Config(), _overrides(["train.mixed_precision=no"])).train.mixed_precision == "no"
    # end to end: the only error left is the one planted, not "expected str, got False"
    assert main(["train", "--model", "tiny", "--set", "train.mixed_precision=no", "--set", "train.steps=0"]) == 2
    err = _one_line_error(capsys, "train.steps=0")
    assert "mixed_precision" not in err


def test_set_keeps_yaml_meaning_for_other_fields_and_quotes_and_null():
    got = _overrides(["train.train_text_encoder=yes", "train.steps=0x10", "optim.lr_unet=1e-4", "train.name=null",
                      "model.revision=no", 'data.token="a b"', "data.resolution=null", "lora.unet_targets=[to_q, on]"])
    assert got == {"train.train_text_encoder": True, "train.steps": 16, "optim.lr_unet": 1e-4, "train.name": None,
                   "model.revision": "no", "data.token": "a b", "data.resolution": None,
                   "lora.unet_targets": ["to_q", "on"]}


def test_yaml_config_file_gives_string_fields_their_text(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  token: no\n  class_name: 0x10\n  instance_prompt: a photo of {token} {class}\n"
                    "train:\n  mixed_precision: no\n  train_text_encoder: yes\n  steps: 0x10\n  name: null\n"
                    "model:\n  revision: on\n  variant: null\n"
                    "prior:\n  preserve_prompts: [yes, 1e3, a cat]\n  guidance: 7\n")
    cfg = C.load(path)
    assert (cfg.data.token, cfg.data.class_name, cfg.train.mixed_precision) == ("no", "0x10", "no")
    assert (cfg.train.train_text_encoder, cfg.train.steps, cfg.train.name) == (True, 16, None)
    assert (cfg.model.revision, cfg.model.variant) == ("on", None)
    assert cfg.prior.preserve_prompts == ["yes", "1e3", "a cat"] and cfg.prior.guidance == 7.0
    # a run's config.yaml reads back as written
    (tmp_path / "again.yaml").write_text(C.to_yaml(cfg))
    assert C.load(tmp_path / "again.yaml").to_dict() == cfg.to_dict()


def test_extends_and_plain_reading_still_work(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  token: yes\n")
    (tmp_path / "top.yaml").write_text("extends: base.yaml\ntrain:\n  mixed_precision: no\n")
    cfg = C.load(tmp_path / "top.yaml")
    assert (cfg.data.token, cfg.train.mixed_precision) == ("yes", "no")
    assert C.read_yaml(tmp_path / "top.yaml") == {"extends": "base.yaml", "train": {"mixed_precision": False}}


def test_sweep_spec_gives_string_fields_their_text(tmp_path):
    from dreambooth_lab.experiments import load_sweep

    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"name: s\noutput_dir: {tmp_path / 'runs'}\n"
                    f"base:\n  model: {{name: tiny}}\n  data: {{instance_dir: {SAMPLE_SUBJECT}, class_name: no}}\n"
                    "  train: {mixed_precision: no}\n"
                    "runs:\n  - {name: a, set: {data.token: on}}\n"
                    "grid:\n  train.train_text_encoder: [false, true]\n")
    sweep = load_sweep(spec, _overrides(["data.instance_prompt=a photo of {token} {class} in a garden"]))
    assert [r.id for r in sweep.runs] == ["a_train_text_encoder=false", "a_train_text_encoder=true"]
    c = sweep.runs[0].config
    assert (c.data.token, c.data.class_name, c.train.mixed_precision) == ("on", "no", "no")
    assert c.data.instance_prompt == "a photo of {token} {class} in a garden"
    assert [r.config.train.train_text_encoder for r in sweep.runs] == [False, True]


def test_the_form_gives_string_fields_their_text():
    from dreambooth_lab.notebook import FORM_DEFAULTS, form_overrides

    form = {**FORM_DEFAULTS, "RARE_TOKEN": "no", "MIXED_PRECISION": "no"}
    cfg = C.with_overrides(C.Config(), form_overrides(form))
    assert (cfg.data.token, cfg.train.mixed_precision) == ("no", "no")


# ---- item 9: `--set` values that are not YAML ---------------------------------------------------

@pytest.mark.parametrize("pair,field,value", [
    ("data.instance_prompt={token} {class} in a garden", "instance_prompt", "{token} {class} in a garden"),
    ("data.instance_prompt={token}", "instance_prompt", "{token}"),
    ("data.instance_prompt=a #1 {token} dog", "instance_prompt", "a #1 {token} dog"),
    ("data.token=@sks", "token", "@sks"),
    ("data.token='sks", "token", "'sks"),
    ("data.token=`sks", "token", "`sks"),
    ("data.token=%sks", "token", "%sks"),
])
def test_text_that_is_not_yaml_is_the_string_typed(pair, field, value):
    cfg = C.with_overrides(C.Config(), _overrides([pair]))
    assert getattr(cfg.data, field) == value


@pytest.mark.parametrize("pair,needle", [
    ("train.steps=[1", "train.steps"),
    ("train.steps={", "train.steps"),
    ("lora.unet_targets=[to_q", "lora.unet_targets"),
    ("data.resolution=@64", "data.resolution"),
])
def test_unparseable_value_for_a_non_string_field_is_one_line(capsys, pair, needle):
    assert main(["train", "--model", "tiny", "--set", pair]) == 2
    _one_line_error(capsys, needle, "--set")


@pytest.mark.parametrize("key", ["train.steps", "data.token", "data.instance_prompt"])
def test_a_yaml_tag_is_refused_in_one_line_and_never_built(tmp_path, capsys, key):
    marker = tmp_path / "pwned"
    pair = f"{key}=!!python/object/apply:os.system ['touch {marker}']"
    assert main(["train", "--model", "tiny", "--set", pair]) == 2
    _one_line_error(capsys, key, "!!python/object/apply", "not accepted")
    assert not marker.exists()


def test_a_yaml_file_with_a_tag_is_one_error_naming_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(C.ConfigError, match="c.yaml: not valid YAML") as err:
        C.load(path)
    assert "\n" not in str(err.value)


# ---- item 3: warnings in the CLI are one line ---------------------------------------------------

def test_cli_prints_a_warning_as_one_line_and_leaves_the_display_alone(monkeypatch, capsys):
    from dreambooth_lab import export

    def warns(path):
        warnings.warn("something to know about 7b1e", UserWarning, stacklevel=1)
        return "info"

    monkeypatch.setattr(export, "format_info", warns)
    before = warnings.showwarning
    assert main(["info", "whatever.safetensors"]) == 0
    err = capsys.readouterr().err
    assert err == "warning: something to know about 7b1e\n", err
    assert warnings.showwarning is before  # only inside the CLI: importing or calling it changes nothing


# ---- item 12 / 17: numbers of sampling and class images ------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("sample.guidance", "nan"), ("sample.guidance", "-50"), ("sample.guidance", "inf"), ("sample.guidance", ".nan"),
    ("prior.guidance", "nan"), ("prior.guidance", "-1"), ("prior.guidance", "1000"),
    ("prior.seed", "-1"), ("eval.seed", "-1"), ("prior.loss_weight", "nan"), ("optim.lr_unet", "inf"),
    ("identifier.lr", "inf"), ("sample.lora_scale_unet", "nan"), ("loss.noise_offset", "nan"),
])
def test_numbers_are_checked_and_nan_is_named_once(key, value):
    cfg = C.with_overrides(C.Config(), _overrides([f"{key}={value}"]))
    errors = C.validation_errors(cfg)
    assert len(errors) == 1 and errors[0].startswith(f"{key}="), errors


@pytest.mark.parametrize("value", ["nan", "-50"])
def test_sample_guidance_is_validated(trained_run, capsys, value):
    before = set((trained_run.run_dir / "samples").glob("*"))
    assert main(["sample", str(trained_run.run_dir), "--guidance", value]) == 2
    _one_line_error(capsys, f"--guidance {value}", "sample.guidance")
    assert set((trained_run.run_dir / "samples").glob("*")) == before


def test_sane_sampling_numbers_pass():
    cfg = C.with_overrides(C.Config(), {"sample.guidance": 1.0, "prior.guidance": 0.0, "prior.seed": 2**62})
    assert C.validation_errors(cfg) == []


@pytest.mark.parametrize("content", ["[1, 2]", "garbage{", '"a string"', "", "null", '{"key": {}, "images": 5}',
                                     '{"key": {}, "images": [1]}'])
def test_a_class_cache_manifest_that_is_not_one_is_named(tmp_path, content):
    from dreambooth_lab.prior import MANIFEST, ClassCacheError, read_manifest

    (tmp_path / MANIFEST).write_text(content)
    with pytest.raises(ClassCacheError) as err:
        read_manifest(tmp_path, {"prompt": "a photo of dog"})
    message = str(err.value)
    assert str(tmp_path / MANIFEST) in message and "delete the folder" in message and "\n" not in message
    assert ClassCacheError.__module__.startswith("dreambooth_lab.")  # the CLI prints it as one line


# ---- item 18: checks that ran late, after a run folder was made ----------------------------------

@pytest.mark.parametrize("pair,field", [
    ("loss.timestep_max=5000", "loss.timestep_max"),
    ("loss.timestep_min=1500", "loss.timestep_min"),
    ("lora.unet_targets=[nonexistent]", "lora.unet_targets"),
    ("lora.unet_targets=[to_q, to_qq]", "lora.unet_targets"),
    ("lora.text_encoder_targets=[q_porj]", "lora.text_encoder_targets"),
    ("optim.lr_scheduler=bogus", "optim.lr_scheduler"),
    ("optim.adam_beta1=5", "optim.adam_beta1"),
    ("optim.adam_beta2=1", "optim.adam_beta2"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.adam_epsilon=0", "optim.adam_epsilon"),
    ("data.token=<|endoftext|>", "data.token"),
    ("data.token=<|startoftext|>", "data.token"),
])
def test_late_checks_fail_with_the_config_before_any_folder(tmp_path, capsys, pair, field):
    out = tmp_path / "runs"
    argv = ["train", "--model", "tiny", "--data", str(SAMPLE_SUBJECT), "--set", f"train.output_dir={out}",
            "--set", f"prior.cache_dir={tmp_path / 'cache'}", "--set", "train.steps=2", "--set", pair]
    assert main(argv) == 2
    _one_line_error(capsys, field)
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_module_targets_accept_tails_and_the_defaults():
    cfg = C.with_overrides(C.Config(), {"lora.unet_targets": ["attn1.to_q", "to_out.0", "ff.net.2", "proj_in"],
                                        "lora.conv": True, "lora.text_encoder_targets": ["self_attn.q_proj", "fc1"]})
    assert C.validation_errors(cfg) == []


def _adaptable_tails(model) -> set[str]:
    import torch

    out = set()
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)):
            parts = name.split(".")
            out.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    return out


def test_known_module_names_are_those_of_the_models():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from dreambooth_lab.builtin import shaped

    with init_empty_weights():
        unets = [UNet2DConditionModel(**shaped.sd15_unet_kwargs()), UNet2DConditionModel(**shaped.sdxl_unet_kwargs())]
        clip_l, clip_g = shaped.sdxl_text_configs()
        encoders = [CLIPTextModel(clip_l), CLIPTextModelWithProjection(clip_g)]
    assert set().union(*map(_adaptable_tails, unets)) == set(C.UNET_MODULES)
    assert set().union(*map(_adaptable_tails, encoders)) == set(C.TEXT_ENCODER_MODULES)


def test_known_lr_schedulers_are_diffusers():
    from diffusers.optimization import SchedulerType

    assert set(C.LR_SCHEDULERS) == {s.value for s in SchedulerType}


# ---- item 19: a sweep's name is a folder name ------------------------------------------------------

@pytest.mark.parametrize("name", ["../../escaped_sweep", "a/b", "ABSOLUTE", ".", ".."])
def test_a_sweep_name_that_leaves_the_output_folder_is_refused(tmp_path, capsys, name):
    name = str(tmp_path / "abs_sweep") if name == "ABSOLUTE" else name
    out = tmp_path / "deep" / "er" / "runs"
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"name": name, "output_dir": str(out),
                                    "base": {"model": {"name": "tiny"}, "data": {"instance_dir": str(SAMPLE_SUBJECT)},
                                             "train": {"steps": 1}, "prior": {"enabled": False}},
                                    "runs": [{"name": "a", "set": {}}]}))
    assert main(["sweep", str(spec)]) == 2
    _one_line_error(capsys, "name=", str(spec))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]


# ---- item 16: sheet axes go through the sampling checks -------------------------------------------

@pytest.mark.parametrize("axis,needle", [
    ("lora_scale_unet=5,9", "sample.lora_scale_unet"),
    ("lora_scale_text_encoder=0.5,-1", "sample.lora_scale_text_encoder"),
    ("steps=0,1", "sample.steps"),
    ("guidance=nan,3", "sample.guidance"),
    ("seed=-1,2", "sample.seeds"),
    ("steps=abc", "sample.steps"),
])
def test_sheet_axes_are_validated_like_sample(trained_run, capsys, axis, needle):
    sheets = trained_run.run_dir / "sheets"
    before = set(sheets.glob("*")) if sheets.exists() else set()
    assert main(["sheet", "grid", str(trained_run.run_dir), "--rows", axis, "--cols", "guidance=3,6"]) == 2
    _one_line_error(capsys, needle)
    assert (set(sheets.glob("*")) if sheets.exists() else set()) == before


def test_axis_values_are_read_as_the_field():
    from dreambooth_lab.cli import _axis
    from dreambooth_lab.compare import axis_values

    s = C.SampleConfig()
    assert axis_values(s, *_axis("guidance=3,4.5")) == [3.0, 4.5]
    assert axis_values(s, *_axis("seed=3,4")) == [3, 4]
    assert axis_values(s, *_axis("negative_prompt=no,blurry")) == ["no", "blurry"]
    assert all(isinstance(v, float) for v in axis_values(s, *_axis("lora_scale_unet=0,1")))
    assert not math.isnan(axis_values(s, *_axis("guidance=7"))[0])
    json.dumps(axis_values(s, *_axis("guidance=7")))
