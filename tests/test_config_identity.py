"""Config.hash(): which fields make a run what it is (declared on the fields), and the
validation of names and ranks that decide where and whether a run can start."""

import pytest

from dreambooth_lab import config as C

# Switches that change no weight: a finished run with any of them changed is still the same run.
SPEED_SWITCHES = [
    ("model.dtype", "float16"),
    ("train.cache_latents", False),
    ("train.cache_text_embeddings", False),
    ("train.offload_frozen", False),
    ("train.allow_tf32", False),
    ("train.channels_last", True),
    ("train.compile", True),
    ("train.eval_loss", "on"),  # a measurement before and after; the steps are the same
    ("prior.batch_size", 1),
]
# Where things go, what they are called, how often they are written or logged.
BOOKKEEPING = [
    ("train.output_dir", "elsewhere/runs"),
    ("train.name", "my-dog"),
    ("prior.cache_dir", "/tmp/class-cache"),
    ("train.checkpoint_every", 7),
    ("train.checkpoints_to_keep", 5),
    ("train.save_lora_every", 200),  # more files; each holds the weights of its step, which this does not change
    ("train.step_images", False),
    ("train.log_with", "tensorboard"),
    ("train.validation_every", 10),
    ("train.validation_prompt", "A {token} {class} on a boat"),
    ("train.validation_images", 4),
]
# Pictures made from a run, and how they are scored (a section left out as a whole).
SECTIONS_OUT = ("sample.", "eval.")

TRAINING_KNOBS = [
    ("model.name", "tiny"),
    ("model.revision", "refs/pr/1"),
    ("model.variant", "fp16"),
    ("model.safety_checker", True),
    ("data.instance_dir", "datasets/other_subject"),
    ("data.token", "oue"),
    ("data.class_name", "cat"),
    ("data.instance_prompt", "a {token} {class}"),
    ("data.class_prompt", "a {class}"),
    ("data.resolution", 256),
    ("data.center_crop", False),
    ("data.random_flip", True),
    ("prior.enabled", False),
    ("prior.num_class_images", 50),
    ("prior.loss_weight", 0.5),
    ("prior.sampler", "ddim"),
    ("prior.steps", 30),
    ("prior.guidance", 5.0),
    ("prior.seed", 1),
    ("prior.dtype", "float16"),
    ("prior.target", "base_model"),
    ("lora.use_dora", True),
    ("data.buckets", True),
    ("data.captions", "sidecar"),
    ("prior.preserve_prompts", ["a photo of a cat"]),
    ("prior.preserve_on", "class_images"),
    ("lora.conv", True),
    ("identifier.learned", True),
    ("identifier.num_vectors", 2),
    ("identifier.init", "random"),
    ("identifier.lr", 5e-4),
    ("identifier.embedding_only_steps", 10),
    ("loss.kind", "huber"),
    ("loss.huber_c", 0.2),
    ("loss.min_snr_gamma", 5.0),
    ("loss.noise_offset", 0.05),
    ("loss.timestep_min", 100),
    ("loss.timestep_max", 900),
    ("lora.rank", 8),
    ("lora.alpha", 2.0),
    ("lora.dropout", 0.1),
    ("lora.unet_targets", ["to_q", "to_v"]),
    ("lora.text_encoder_targets", ["q_proj"]),
    ("optim.optimizer", "adamw8bit"),
    ("optim.lr_unet", 1e-4),
    ("optim.lr_text_encoder", 5e-5),
    ("optim.lr_text_encoder_2", 5e-5),
    ("optim.weight_decay", 0.0),
    ("optim.adam_beta1", 0.8),
    ("optim.adam_beta2", 0.99),
    ("optim.adam_epsilon", 1e-6),
    ("optim.max_grad_norm", 0.5),
    ("optim.lr_scheduler", "cosine"),
    ("optim.lr_warmup_steps", 10),
    ("train.steps", 800),
    ("train.batch_size", 2),
    ("train.gradient_accumulation_steps", 2),
    ("train.train_text_encoder", True),
    ("train.gradient_checkpointing", True),
    ("train.mixed_precision", "fp16"),
    ("train.seed", 7),
]


@pytest.mark.parametrize("key,value", SPEED_SWITCHES + BOOKKEEPING, ids=[k for k, _ in SPEED_SWITCHES + BOOKKEEPING])
def test_switch_that_changes_no_weight_leaves_the_hash_alone(key, value):
    cfg = C.Config()
    changed = C.with_overrides(cfg, {key: value})
    assert C._get(changed, key) != C._get(cfg, key)
    assert changed.hash() == cfg.hash()


@pytest.mark.parametrize("key,value", TRAINING_KNOBS, ids=[k for k, _ in TRAINING_KNOBS])
def test_training_knob_changes_the_hash(key, value):
    cfg = C.Config()
    changed = C.with_overrides(cfg, {key: value})
    assert changed.hash() != cfg.hash()


def test_every_field_has_decided_whether_it_is_in_the_hash():
    """A new config field must join one of the lists above: in the hash, or out and why."""
    ins, outs = C.hash_fields()
    assert set(ins) == {k for k, _ in TRAINING_KNOBS}
    assert set(outs) == {k for k, _ in SPEED_SWITCHES + BOOKKEEPING} | {o for o in outs if o.startswith(SECTIONS_OUT)}
    assert all(f.startswith(SECTIONS_OUT) for f in set(outs) - {k for k, _ in SPEED_SWITCHES + BOOKKEEPING})


def test_hash_membership_lives_on_the_fields():
    import dataclasses

    train = {f.name: f for f in dataclasses.fields(C.TrainConfig)}
    assert train["cache_latents"].metadata == {"hash": False}
    assert train["steps"].metadata.get("hash", True) is True
    assert not hasattr(C, "NOT_IN_HASH")


def test_explicit_defaults_hash_like_the_auto_values():
    # resolved() fills alpha, resolution and name; writing them out is the same run
    cfg = C.Config()
    explicit = C.with_overrides(cfg, {"lora.alpha": 4.0, "data.resolution": 512})
    assert explicit.hash() == cfg.hash()


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", "x/../y", "..\\evil", "/abs"])
def test_run_name_that_escapes_the_output_folder_is_refused(name):
    with pytest.raises(C.ConfigError, match=r"train\.name=.*(path separator|'\.\.')"):
        C.with_overrides(C.Config(), {"train.name": name}).resolved().validate()


def test_run_name_from_token_and_class_is_checked_too():
    cfg = C.with_overrides(C.Config(), {"data.class_name": "cats/dogs"})
    with pytest.raises(C.ConfigError, match=r"data\.class_name.*set train\.name"):
        cfg.resolved().validate()
    C.with_overrides(cfg, {"train.name": "cats-and-dogs"}).resolved().validate()


@pytest.mark.parametrize("name", ["dog-v2", "st.bernard", "my dog", "sks_dog.1"])
def test_plain_run_names_are_accepted(name):
    C.with_overrides(C.Config(), {"train.name": name}).resolved().validate()


def test_rank_zero_reports_only_the_rank():
    for cfg in (C.with_overrides(C.Config(), {"lora.rank": 0}),
                C.with_overrides(C.Config(), {"lora.rank": 0}).resolved()):  # train() validates the resolved copy
        errors = C.validation_errors(cfg)
        assert len(errors) == 1 and errors[0].startswith("lora.rank=0"), errors
    # an alpha the user did set is still checked
    errors = C.validation_errors(C.with_overrides(C.Config(), {"lora.rank": 0, "lora.alpha": -1.0}).resolved())
    assert any(e.startswith("lora.alpha") for e in errors)


def test_generation_dtype_is_validated():
    with pytest.raises(C.ConfigError, match=r"prior\.dtype='fp8'"):
        C.with_overrides(C.Config(), {"prior.dtype": "fp8"}).validate()
    for dtype in C.DTYPES:
        C.with_overrides(C.Config(), {"prior.dtype": dtype}).validate()
