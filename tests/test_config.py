import pytest

from dreambooth_lab import config as C


def test_defaults_follow_the_reference_study():
    cfg = C.Config()
    assert (cfg.data.token, cfg.data.class_name) == ("sks", "dog")
    assert cfg.fill(cfg.data.instance_prompt) == "a photo of sks dog"
    assert cfg.fill(cfg.data.class_prompt) == "a photo of dog"
    assert (cfg.train.batch_size, cfg.train.seed) == (1, 42)
    assert (cfg.optim.lr_unet, cfg.optim.lr_text_encoder) == (3e-4, 1e-4)
    assert (cfg.sample.lora_scale_unet, cfg.sample.lora_scale_text_encoder, cfg.sample.guidance) == (0.4, 0.4, 6.4)
    assert cfg.prior.loss_weight == 1.0
    assert cfg.resolution == 512
    cfg.model.name = "tiny"
    assert cfg.resolution == 64
    cfg.validate()


def test_yaml_round_trip(tmp_path):
    cfg = C.with_overrides(C.Config(), {"data.token": "oue", "train.train_text_encoder": True, "sample.seeds": [2**63 - 1]})
    path = tmp_path / "c.yaml"
    path.write_text(C.to_yaml(cfg))
    back = C.load(path)
    assert back == cfg
    assert back.hash() == cfg.hash()
    assert C.with_overrides(back, {"train.steps": 7}).hash() != cfg.hash()
    # what pictures are made from a run does not change what the run trained
    assert C.with_overrides(back, {"sample.lora_scale_unet": 0.9}).hash() == cfg.hash()


def test_unknown_key_suggests_the_closest(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("optim:\n  lr_unte: 1.0e-4\n")
    with pytest.raises(C.ConfigError) as exc:
        C.load(path)
    assert "optim.lr_unet" in str(exc.value) and str(path) in str(exc.value)


def test_wrong_type_names_the_field():
    with pytest.raises(C.ConfigError, match=r"train\.steps"):
        C.from_dict({"train": {"steps": "many"}})
    with pytest.raises(C.ConfigError, match=r"train: expected a mapping"):
        C.from_dict({"train": 5})


def test_yaml_exponent_without_dot_is_a_float():
    # PyYAML reads 3e-4 as a string; it is still accepted as the number it means.
    assert C.from_dict({"optim": {"lr_unet": "3e-4"}}).optim.lr_unet == 3e-4


@pytest.mark.parametrize("key,value,field", [
    ("optim.lr_unet", 0.0, "optim.lr_unet"),
    ("train.steps", -1, "train.steps"),
    ("lora.rank", 0, "lora.rank"),
    ("train.batch_size", 0, "train.batch_size"),
    ("data.token", "two words", "data.token"),
    ("data.class_name", " ", "data.class_name"),
    ("sample.lora_scale_unet", 3.0, "sample.lora_scale_unet"),
    ("prior.num_class_images", 0, "prior.num_class_images"),
    ("data.resolution", 100, "data.resolution"),
    ("train.mixed_precision", "fp8", "train.mixed_precision"),
    ("sample.sampler", "magic", "sample.sampler"),
])
def test_validation_names_field_and_fix(key, value, field):
    cfg = C.with_overrides(C.Config(), {key: value})
    with pytest.raises(C.ConfigError) as exc:
        cfg.validate()
    assert field in str(exc.value)


def test_prior_off_needs_no_class_images():
    C.with_overrides(C.Config(), {"prior.enabled": False, "prior.num_class_images": 0}).validate()


def test_resolved_config_makes_auto_values_explicit():
    cfg = C.Config()
    r = cfg.resolved()
    assert (r.data.resolution, r.train.name, r.lora.alpha) == (512, "sks-dog", 4.0)
    assert cfg.data.resolution is None  # the original is untouched


def test_fill_prompt_leaves_other_braces_alone():
    assert C.fill_prompt("{token} {class} {x}", "oue", "cat") == "oue cat {x}"


def test_the_prior_term_is_decided_by_the_prior_section():
    prior = C.PriorConfig()
    assert prior.term == "class_images"
    assert C.PriorConfig(target="base_model").term == "base_model"
    assert C.PriorConfig(loss_weight=0.0).term is None  # a zero weight trains as if the prior were off
    assert C.PriorConfig(enabled=False, target="base_model").term is None


def test_lora_alpha_null_means_the_rank():
    assert C.LoraConfig(rank=8).effective_alpha == 8.0 == C.Config(lora=C.LoraConfig(rank=8)).lora_alpha
    assert C.LoraConfig(rank=8, alpha=4).effective_alpha == 4.0
