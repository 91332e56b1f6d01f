"""Per-photo captions (data.captions: sidecar): read beside each photo, part of the run's identity,
trained on per photo, shown on dataset.png; a missing, empty or subject-less caption names its file."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import SAMPLE_SUBJECT, tiny_config
from dreambooth_lab.data import DatasetError, ImageSet, caption_path, find_images, read_captions
from dreambooth_lab.models import resolve


def _captioned_copy(tmp_path, captions=None):
    folder = tmp_path / "photos"
    shutil.copytree(SAMPLE_SUBJECT, folder)
    for i, p in enumerate(find_images(folder)):
        text = captions[i] if captions else f"a photo of {{token}} {{class}} on the beach {i}"
        caption_path(p).write_text(text + "\n")
    return folder


def test_sidecar_captions_are_read_per_photo_on_one_line(tmp_path):
    folder = _captioned_copy(tmp_path)
    (folder / "subject_01.txt").write_text("a photo of\n  {token} {class}\n  in the snow\n")
    paths = find_images(folder)
    caps = read_captions(paths, "sks")
    assert len(caps) == len(paths)
    assert caps[0] == "a photo of {token} {class} on the beach 0"
    assert caps[1] == "a photo of {token} {class} in the snow"


def test_every_bad_caption_file_is_named_in_one_error(tmp_path):
    folder = _captioned_copy(tmp_path)
    (folder / "subject_00.txt").unlink()
    (folder / "subject_02.txt").write_text("   \n")
    (folder / "subject_03.txt").write_text("a photo of a dog on the beach")  # never names the subject
    (folder / "subject_04.txt").write_text("a photo of sks dog")  # the token written out is fine
    with pytest.raises(DatasetError) as err:
        ImageSet.from_folder(folder, 64, captions="sidecar", token="sks")
    msg = str(err.value)
    assert "3 caption file(s)" in msg
    assert "subject_00.txt: missing" in msg and "subject_02.txt: empty" in msg
    assert "subject_03.txt" in msg and "never names the subject" in msg
    assert "subject_04.txt" not in msg
    assert "data.captions: none" in msg  # says what to do


def test_captions_none_ignores_caption_files(tmp_path):
    folder = _captioned_copy(tmp_path)
    (folder / "subject_00.txt").unlink()
    images = ImageSet.from_folder(folder, 64, check=False)
    assert images.captions is None and images.label(0) == "subject_00.jpg"


def test_captions_are_part_of_the_run_identity_only_in_sidecar_mode(tmp_path):
    from dreambooth_lab.config import Config, _hashed
    from dreambooth_lab.runs import Identity

    folder = _captioned_copy(tmp_path)
    cfg = tiny_config(tmp_path, **{"data.instance_dir": str(folder)})
    side = tiny_config(tmp_path, **{"data.instance_dir": str(folder), "data.captions": "sidecar"})
    none_a, side_a = Identity.of(cfg), Identity.of(side)
    (folder / "subject_01.txt").write_text("a photo of {token} {class} in the city")
    assert Identity.of(cfg).dataset_digest == none_a.dataset_digest  # not read, not counted
    changed = Identity.of(side)
    assert changed.dataset_digest != side_a.dataset_digest
    assert "1 changed (subject_01.txt)" in " ".join(changed.differences(side_a))
    # the field is in the hash when used, and absent at its default (older runs keep their hash)
    assert side.hash() != cfg.hash()
    assert "captions" not in _hashed(Config())["data"] and _hashed(side)["data"]["captions"] == "sidecar"


def test_a_bad_captions_mode_is_named():
    from dreambooth_lab.config import ConfigError

    cfg = tiny_config(__import__("pathlib").Path("/tmp"), **{"data.captions": "txt"})
    with pytest.raises(ConfigError, match="data.captions='txt'"):
        cfg.validate()


def test_the_objective_trains_each_photo_on_its_caption(tmp_path, tiny_pipe):
    from accelerate import Accelerator

    from dreambooth_lab.trainer import DreamBoothObjective, Row

    folder = _captioned_copy(tmp_path)
    cfg = tiny_config(tmp_path, **{"data.instance_dir": str(folder), "data.captions": "sidecar",
                                   "train.offload_frozen": False}).resolved()
    photos = ImageSet.from_folder(folder, cfg.resolution, captions="sidecar", token="sks")
    t = DreamBoothObjective(cfg, tiny_pipe, photos, None, Accelerator(), base=resolve(cfg.model))
    n = len(photos)
    decoded = tiny_pipe.tokenizer.batch_decode(t.prompt_ids[0], skip_special_tokens=True)
    assert [d.strip() for d in decoded[:n]] == [f"a photo of sks dog on the beach {i}" for i in range(n)]
    assert decoded[n].strip() == cfg.fill(cfg.data.class_prompt)
    assert t.text_cache.shape[0] == n + 1
    rows = [Row("instance", 3, False, (0, 0, 64, 64)), Row("instance", 0, False, (0, 0, 64, 64)),
            Row("class", 0, False, (0, 0, 64, 64))]
    assert [t.prompt_index(r) for r in rows] == [3, 0, n]
    states = t.states(rows).states
    assert not torch.allclose(states[0], states[1])  # two photos, two captions, two conditionings


def test_a_sidecar_run_trains_and_differs_from_one_prompt_for_all(tmp_path):
    from safetensors.torch import load_file

    from dreambooth_lab.train import train

    folder = _captioned_copy(tmp_path)
    over = {"data.instance_dir": str(folder), "train.steps": 4, "prior.enabled": False}
    plain = train(tiny_config(tmp_path / "a", **over), resume=None, progress=False)
    side = train(tiny_config(tmp_path / "b", **over, **{"data.captions": "sidecar"}), resume=None, progress=False)
    a, b = load_file(str(plain.lora_path)), load_file(str(side.lora_path))
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert (side.run_dir / "dataset.png").stat().st_size > 0


def test_dataset_sheet_labels_each_photo_with_its_caption(tmp_path, monkeypatch):
    from dreambooth_lab import viz

    folder = _captioned_copy(tmp_path)
    images = ImageSet.from_folder(folder, 64, captions="sidecar", token="sks", check=False)
    assert images.label(2) == "subject_02.jpg\na photo of {token} {class} on the beach 2"
    texts = []
    real = viz.Figure

    class Spy(real):
        def add_axes(self, *a, **k):
            ax = super().add_axes(*a, **k)
            orig = ax.text
            ax.text = lambda x, y, s, *aa, **kk: (texts.append(s), orig(x, y, s, *aa, **kk))[1]
            return ax

    monkeypatch.setattr(viz, "Figure", Spy)
    out = viz.dataset_sheet(images, tmp_path / "dataset.png")
    assert out.is_file()
    assert any("on the beach 2" in " ".join(t.split()) for t in texts)


def test_world_subject_captions_name_each_photo_context(tmp_path):
    from dreambooth_lab.world.scene import SUBJECTS, subject_scene
    from dreambooth_lab.world.subjects import photo_caption, subject_dir

    folder = subject_dir("dog", 5, root=tmp_path, captions=True)
    assert folder.name.endswith("-captioned")
    caps = read_captions(find_images(folder), "sks")
    for i, cap in enumerate(caps):
        ctx = subject_scene(SUBJECTS["dog"], i).context
        assert cap == photo_caption("dog", i)
        assert cap.startswith("a photo of {token} {class}")
        assert (ctx in cap) == (ctx != "plain")
    plain = subject_dir("dog", 5, root=tmp_path)
    assert not list(plain.glob("dog_*.txt"))  # SUBJECT.txt describes the folder, no photo has a caption


# ---- prior.preserve_prompts (kept in this file: it shares the per-prompt plumbing of captions) ----

def test_preserve_prompts_are_pulled_toward_the_base_model(tmp_path):
    """Rows of another prompt on the step's noisy instance latents, with the frozen base model's
    prediction as target: zero loss while the LoRA is still zero, positive once it has moved."""
    from accelerate import Accelerator

    from dreambooth_lab.config import ModelConfig
    from dreambooth_lab.lora import add_adapters
    from dreambooth_lab.models import load_pipeline
    from dreambooth_lab.trainer import DreamBoothObjective

    cfg = tiny_config(tmp_path, **{"prior.enabled": False, "train.offload_frozen": False,
                                   "prior.preserve_prompts": ["a photo of a cat", "a photo of a {class} toy"]}).resolved()
    pipe = load_pipeline(ModelConfig(name="tiny"), device="cpu")  # its own: adapters go on it
    photos = ImageSet.from_folder(cfg.data.instance_dir, cfg.resolution)
    add_adapters(cfg.lora, pipe.unet, pipe.text_encoder, train_text_encoder=cfg.train.train_text_encoder)
    t = DreamBoothObjective(cfg, pipe, photos, None, Accelerator(), base=resolve(cfg.model))
    decoded = [d.strip() for d in pipe.tokenizer.batch_decode(t.prompt_ids[0], skip_special_tokens=True)]
    assert decoded[-2:] == ["a photo of a cat", "a photo of a dog toy"]
    assert t.text_cache.shape[0] == 4  # instance, class, two kept prompts
    out = t.loss(0, 0)
    assert out.prior.item() < 1e-10 and out.loss.item() == pytest.approx(out.instance.item())  # LoRA B = 0: the base itself
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    assert t.loss(1, 0).prior.item() > 1e-6


@pytest.mark.parametrize("on", ["photos", "class_images"])
def test_preserve_on_picks_whose_latents_the_kept_prompts_train_on(tmp_path, on):
    """prior.preserve_on: the kept prompts' rows take the noisy latents (and timesteps) of the step's
    instance rows (photos) or of its class rows (class_images), and nothing else changes."""
    from accelerate import Accelerator
    from PIL import Image

    from dreambooth_lab.config import ModelConfig
    from dreambooth_lab.models import load_pipeline
    from dreambooth_lab.trainer import DreamBoothObjective

    class_dir = tmp_path / "class"
    class_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(class_dir / f"c{i}.png")
    cfg = tiny_config(tmp_path, **{"train.batch_size": 2, "prior.preserve_on": on,
                                   "prior.preserve_prompts": ["a photo of a cat"]}).resolved().validate()
    pipe = load_pipeline(ModelConfig(name="tiny"), device="cpu")
    photos = ImageSet.from_folder(cfg.data.instance_dir, cfg.resolution)
    classes = ImageSet.from_folder(class_dir, cfg.resolution, check=False)
    t = DreamBoothObjective(cfg, pipe, photos, classes, Accelerator(), base=resolve(cfg.model))
    seen = {}
    t.base_prediction = lambda noisy, timesteps, ids=None, rows=None: seen.update(keep=(noisy, timesteps)) or noisy * 0
    t.predict = lambda noisy, timesteps, cond, ids: seen.update(all=(noisy, timesteps)) or noisy * 0
    out = t.loss(0, 0)
    assert [r.kind for r in out.rows] == ["instance", "instance", "class", "class"]
    noisy, timesteps = seen["all"]
    assert noisy.shape[0] == 6  # 2 instance, 2 class, 2 kept-prompt rows
    rows = slice(2, 4) if on == "class_images" else slice(0, 2)
    assert torch.equal(seen["keep"][0], noisy[rows]) and torch.equal(noisy[4:], noisy[rows])
    assert torch.equal(timesteps[4:], timesteps[rows])
    assert not torch.equal(noisy[0:2], noisy[2:4])  # the two kinds of rows differ: the test can tell them apart


def test_preserve_prompts_are_validated_and_recorded(tmp_path):
    from dreambooth_lab.config import ConfigError, experiment_axes

    with pytest.raises(ConfigError, match="prior.preserve_prompts"):
        tiny_config(tmp_path, **{"prior.preserve_prompts": ["a cat", " "]}).validate()
    cfg = tiny_config(tmp_path, **{"prior.preserve_prompts": ["a photo of a cat"], "data.captions": "sidecar"})
    assert experiment_axes(cfg)["preserve_prompts"] == 1 and experiment_axes(cfg)["captions"] == "sidecar"
    assert "preserve_prompts" not in experiment_axes(tiny_config(tmp_path))
    assert experiment_axes(cfg)["preserve_on"] == "photos"
    with pytest.raises(ConfigError, match="prior.preserve_on=class_images .*prior.target=base_model"):
        tiny_config(tmp_path, **{"prior.preserve_prompts": ["a cat"], "prior.preserve_on": "class_images",
                                 "prior.target": "base_model"}).validate()
    with pytest.raises(ConfigError, match="prior.preserve_on='latents': use photos"):
        tiny_config(tmp_path, **{"prior.preserve_on": "latents"}).validate()
