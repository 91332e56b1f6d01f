"""The toy world: the generator is deterministic, the judge reads it, and DreamBooth visibly works.

The last tests train on the committed `toyworld` model and let the judge decide: a short run
must raise the subject-trait rate of "a sks dog" well above the base model's, the same LoRA at
scale 0 must give the base model's pictures, and a broken objective (prior rows trained on the
instance prompt) must fail the same check.
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dreambooth_lab.files import current_umask
from dreambooth_lab.world.captions import RARE_TOKENS, caption, parse_prompt
from dreambooth_lab.world.draw import render
from dreambooth_lab.world.scene import (CLASSES, SUBJECTS, has_subject_look, sample_base_scene, sample_open_scene,
                                        subject_scene)


# ---- generator -----------------------------------------------------------------------------------

def test_same_seed_same_scene_caption_and_pixels():
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(5):
        sa, sb = sample_open_scene(a), sample_open_scene(b)
        assert sa == sb
        assert caption(sa, a) == caption(sb, b)
        assert render(sa).tobytes() == render(sb).tobytes()
    assert render(sa).size == (64, 64)


def test_base_world_never_shows_the_subjects_or_the_rare_tokens():
    rng = np.random.default_rng(0)
    scenes = [sample_base_scene(rng) for _ in range(600)]
    caps = [caption(s, rng) for s in scenes]
    assert not any(has_subject_look(s, sub) for s in scenes for sub in SUBJECTS.values())
    # ...though each of their traits occurs: DreamBooth binds a combination the model can draw
    near = lambda a, b: max(abs(x - y) for x, y in zip(a, b)) < 40  # noqa: E731
    for sub in SUBJECTS.values():
        assert any(s.cls == sub.cls and near(s.body, sub.body) for s in scenes), sub.name
        assert any(s.cls == sub.cls and s.marking == sub.marking and near(s.marking_colour, sub.marking_colour)
                   for s in scenes), sub.name
    words = {w for c in caps for w in c.split()}
    assert not words & set(RARE_TOKENS)
    assert "http" in words  # `http` has a meaning of its own in the world (the lime cap)
    for needed in ("in red t-shirts", "in the style of van gogh", "in the forest", "driving car", "a photo of a"):
        assert any(needed in c for c in caps), needed
    assert {s.cls for s in scenes} == {"dog", "cat", "toy", "backpack", "vase"}


def test_min_contrast_recolours_only_the_things_that_blend_into_their_ground():
    """Build v10's rule: a body colour too close to what the thing stands against is drawn again
    from the class's colours that stand out; every other scene is exactly the default one."""
    from dreambooth_lab.world.scene import BASE_COLOURS, CONTEXTS, contrast, standing_out

    a, b = np.random.default_rng(5), np.random.default_rng(5)
    plain = [sample_base_scene(a) for _ in range(1500)]
    kept = [sample_base_scene(b, min_contrast=60) for _ in range(1500)]
    changed = [(x, y) for x, y in zip(plain, kept) if x != y]
    assert 0.05 < len(changed) / len(plain) < 0.35
    for x, y in changed:  # only the body colour moves, and away from the ground (a new colour that
        # happens to make a subject's look turns its marking into a patch, as any base scene's does)
        assert (x.cls, x.context, x.detail_seed) == (y.cls, y.context, y.detail_seed)
        assert y.marking in (x.marking, "patch")
        assert contrast(x.body, x.context) < 60 + 14 * 3 ** 0.5 < contrast(y.body, y.context) + 28 * 3 ** 0.5
    toys_on_plain = [s for s in plain if s.cls == "toy" and s.context == "plain"]
    assert any(contrast(s.body, "plain") < 40 for s in toys_on_plain)  # the default world blends some in
    assert min(contrast(s.body, s.context) for s in kept) > 60 - 14 * 3 ** 0.5  # nominal >= 60, jitter <= 14
    for cls, colours in BASE_COLOURS.items():  # a class keeps colours in every context
        for ctx in CONTEXTS:
            assert len(standing_out(colours, ctx, 60)) >= 4, (cls, ctx)
    assert standing_out(((220, 214, 210),), "plain", 60) == ((220, 214, 210),)  # never empty


def test_the_surroundings_of_the_contrast_rule_are_the_colours_the_backgrounds_are_drawn_in():
    """scene.SURROUNDINGS repeats draw._background's large areas (scene cannot import draw): each
    colour it names covers a good part of every rendered background of its context."""
    from dataclasses import replace

    from dreambooth_lab.world.scene import CONTEXTS, SURROUNDINGS

    assert sorted(SURROUNDINGS) == sorted(CONTEXTS)
    base = sample_base_scene(np.random.default_rng(0))
    for ctx in CONTEXTS:
        for seed in range(4):
            scene = replace(base, context=ctx, style=False, driving=False, outfit=False, detail_seed=seed)
            px = np.asarray(render(scene, thing=False)).reshape(-1, 3).astype(float)
            near = 45 if ctx == "plain" else 25  # the plain ground is any grey from 200 to 240, tinted
            for colour in SURROUNDINGS[ctx]:
                share = (np.linalg.norm(px - np.array(colour, dtype=float), axis=1) < near).mean()
                assert share > 0.1, (ctx, seed, colour, share)


def test_captions_name_colours_and_markings_sometimes_in_several_wordings():
    """Build v4's grammar: colour and marking are controllable from text, the opening varies (so a
    fine-tune on "a photo of sks dog" is read in "a photo of a sks dog" too), and no caption ever
    describes a subject's whole look (the base world never shows it)."""
    from dreambooth_lab.world.captions import OPENINGS, colour_word

    rng = np.random.default_rng(11)
    scenes = [sample_base_scene(rng) for _ in range(800)]
    caps = [caption(s, rng) for s in scenes]
    assert {o for o, _ in OPENINGS} == {next(o for o, _ in sorted(OPENINGS, key=lambda x: -len(x[0]))
                                             if c.startswith(o + " ")) for c in caps}
    assert colour_word((130, 40, 200)) == "violet" and colour_word((5, 185, 200)) == "turquoise"
    named = [(s, c) for s, c in zip(scenes, caps) if f"{colour_word(s.body)} {s.cls}" in c]
    assert 0.3 < len(named) / len(caps) < 0.7  # the colour is said about half the time
    assert any("with yellow dots" in c for c in caps) and any("with pink stripes" in c for c in caps)
    assert not any("violet dog with yellow dots" in c or "turquoise backpack with pink stripes" in c for c in caps)


def test_subject_photos_carry_their_traits_and_vary():
    for sub in SUBJECTS.values():
        scenes = [subject_scene(sub, i) for i in range(18)]
        assert all(has_subject_look(s, sub) for s in scenes)
        assert len({(round(s.x, 3), s.context) for s in scenes}) == 18
        assert "forest" not in {s.context for s in scenes}  # "in the forest" stays a composition test


@pytest.mark.parametrize("prompt, expected", [
    ("a dog", {"class": "dog", "context": None, "outfit": False, "style": False, "driving": False}),
    ("a photo of sks dog in the forest", {"class": "dog", "context": "forest"}),
    ("A sks dog in red t-shirts", {"class": "dog", "outfit": True}),
    ("a sks dog in the style of van gogh", {"class": "dog", "style": True}),
    ("a sks backpack driving car", {"class": "backpack", "driving": True}),
    ("a photo of a http cat on the beach", {"class": "cat", "http": True, "context": "beach"}),
])
def test_parse_prompt(prompt, expected):
    got = parse_prompt(prompt)
    assert {k: got[k] for k in expected} == expected


def test_subject_folder_is_deterministic(tmp_path):
    from dreambooth_lab.world.subjects import subject_dir

    a = subject_dir("dog", 5, root=tmp_path / "a")
    b = subject_dir("dog", 5, root=tmp_path / "b")
    files_a = sorted(p.name for p in a.glob("*.png"))
    assert files_a == [f"dog_{i:02d}.png" for i in range(5)]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


def test_diversity_and_nearest_distance():
    from PIL import Image

    from dreambooth_lab.world.study import diversity, nearest_training_distance

    red, blue = Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))
    assert diversity([red, red]) == 0.0
    assert diversity([red, blue]) > 0.5
    assert nearest_training_distance([red], [blue, red]) == [0.0]


def test_a_build_can_start_from_a_finished_pipeline(tmp_path):
    """`build --init <pipeline>`: the VAE is taken over and UNet/text encoder start from its weights."""
    import torch
    from safetensors.torch import load_file

    from dreambooth_lab.world.architecture import make_text_encoder, make_unet
    from dreambooth_lab.world.build import _load_init, init_from
    from dreambooth_lab.world.paths import TOYWORLD_DIR

    if not (TOYWORLD_DIR / "model_index.json").is_file():
        pytest.skip(f"no committed toyworld model at {TOYWORLD_DIR}")
    shape = json.loads((TOYWORLD_DIR / "unet" / "config.json").read_text())  # the shipped build's (v8, v10: 64,128)
    unet = make_unet(0, widths=tuple(shape["block_out_channels"]), layers=shape["layers_per_block"])
    te = make_text_encoder(1)
    assert _load_init(TOYWORLD_DIR, unet, te) == []  # every tensor taken: the same shape
    want = load_file(str(TOYWORLD_DIR / "unet" / "diffusion_pytorch_model.safetensors"))
    got = unet.state_dict()
    assert all(torch.equal(got[k], v.float()) for k, v in want.items())
    init_from(tmp_path, TOYWORLD_DIR)
    vae_file = "diffusion_pytorch_model.safetensors"
    assert all(torch.equal(load_file(str(tmp_path / "vae" / vae_file))[k], v.float())
               for k, v in load_file(str(TOYWORLD_DIR / "vae" / vae_file)).items())


def test_a_4x_vae_gives_16x16_latents_and_a_unet_that_takes_them():
    """`build --vae-factor 4`: the UNet's shape follows the VAE's config (builds v1-v4 are 8x, 8x8x8)."""
    import torch

    from dreambooth_lab.world.architecture import make_unet, make_vae, vae_shape

    for factor, shape in ((8, (8, 8)), (4, (4, 16))):
        vae = make_vae(1, factor)
        assert vae_shape(vae.config) == shape
        with torch.no_grad():
            z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        assert tuple(z.shape) == (1, shape[0], shape[1], shape[1])
        unet = make_unet(0, *shape)
        with torch.no_grad():
            out = unet(z, torch.tensor([10]), torch.zeros(1, 77, 64)).sample
        assert out.shape == z.shape
    with pytest.raises(ValueError, match="VAE factor 3"):
        make_vae(1, 3)


def test_a_build_can_take_the_committed_4x_vae_stage(tmp_path):
    """`build --vae-from weights/stages/vae4x`: the measured VAE stage starts the next build (fp32)."""
    import torch
    from safetensors.torch import load_file

    from dreambooth_lab.world.architecture import vae_shape
    from dreambooth_lab.world.build import vae_from
    from dreambooth_lab.world.paths import WEIGHTS

    stage = WEIGHTS / "stages" / "vae4x"
    vae_from(tmp_path, stage)
    got = load_file(str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    want = load_file(str(stage / "diffusion_pytorch_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], v.float()) for k, v in want.items())
    import json

    assert vae_shape(json.loads((tmp_path / "vae" / "config.json").read_text())) == (4, 16)
    with pytest.raises(FileNotFoundError, match="--vae-from"):
        vae_from(tmp_path / "other", tmp_path / "nowhere")


def test_a_build_folder_in_the_environment_is_the_toyworld_with_its_own_cache_key(monkeypatch, tmp_path):
    """$DREAMBOOTH_LAB_TOYWORLD (a build snapshot or a stage to try) replaces the shipped toyworld
    through the real loading code, and class images never mix the two folders."""
    from safetensors.torch import load_file, save_file

    from dreambooth_lab.builtin.toyworld import ENV, toyworld_key
    from dreambooth_lab.config import ModelConfig
    from dreambooth_lab.models import load_pipeline
    from dreambooth_lab.world.paths import TOYWORLD_DIR

    other = tmp_path / "snapshot"
    shutil.copytree(TOYWORLD_DIR, other)
    shipped_key = toyworld_key()
    monkeypatch.setenv(ENV, str(other))
    assert toyworld_key() == shipped_key  # the same weights draw the same class images
    pipe = load_pipeline(ModelConfig(name="toyworld", dtype="float32"), device="cpu")
    assert Path(pipe.unet.config._name_or_path).parent == other
    unet_file = other / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(unet_file))
    name = sorted(weights)[0]
    save_file({**weights, name: weights[name] + 1}, str(unet_file))
    assert toyworld_key() != shipped_key  # another build: its own class images
    monkeypatch.setenv(ENV, str(tmp_path / "missing"))
    with pytest.raises(Exception, match="missing"):
        load_pipeline(ModelConfig(name="toyworld", dtype="float32"), device="cpu")


def test_a_build_can_make_a_wider_deeper_unet_and_will_not_resume_it_as_another_shape(tmp_path, capsys):
    """`build --unet-widths 48,96 --unet-layers 2`: the whole UNet phase on a few scenes, saved in the
    diffusers layout with that shape; going on in the same folder with another shape is refused in one
    line naming the folder, and with the same shape it goes on from its state."""
    import json

    from diffusers import UNet2DConditionModel

    from dreambooth_lab.world.build import main
    from dreambooth_lab.world.paths import WEIGHTS

    out = tmp_path / "wide"
    common = ["--out", str(out), "--vae-from", str(WEIGHTS / "stages" / "vae4x"), "--scenes", "64",
              "--snapshot-minutes", "60"]
    main([*common, "--unet-steps", "2", "--unet-widths", "48,96", "--unet-layers", "2"])
    unet = UNet2DConditionModel.from_pretrained(out / "final" / "unet")
    assert list(unet.config.block_out_channels) == [48, 96] and unet.config.layers_per_block == 2
    assert unet.config.in_channels == 4 and unet.config.sample_size == 16  # the 4x VAE's latents
    meta = json.loads((out / "unet_state.json").read_text())
    assert (meta["step"], meta["unet_widths"], meta["unet_layers"]) == (2, [48, 96], 2)
    with pytest.raises(SystemExit, match=f"{out}: its UNet was built with --unet-widths 48,96 --unet-layers 2"):
        main([*common, "--unet-steps", "3"])
    main([*common, "--unet-steps", "3", "--unet-widths", "48,96", "--unet-layers", "2"])
    assert json.loads((out / "unet_state.json").read_text())["step"] == 3


def test_export_checks_its_source_before_touching_the_target(tmp_path):
    """`build --export` with a build folder that has no snapshot leaves the shipped model alone; a
    good export replaces the target whole."""
    from dreambooth_lab.world.build import export, main

    target = tmp_path / "toyworld"
    target.mkdir()
    (target / "model_index.json").write_text("{}")
    (tmp_path / "empty-build").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        main(["--out", str(tmp_path / "empty-build"), "--export", str(target)])
    assert (target / "model_index.json").read_text() == "{}"
    src = tmp_path / "snap"
    src.mkdir()
    (src / "model_index.json").write_text('{"new": 1}')
    (src / "build_step.json").write_text('{"step": 3}')
    (src / "unet").mkdir()
    save_file({"w": torch.zeros(2)}, str(src / "unet" / "w.safetensors"))  # safetensors writes it 0600
    export(src, target)
    assert (target / "model_index.json").read_text() == '{"new": 1}' and (target / "BUILD.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty-build", "snap", "toyworld"]
    want = 0o666 & ~current_umask()  # readable by others, like any ordinary write
    assert {stat.S_IMODE(p.stat().st_mode) for p in target.rglob("*") if p.is_file()} == {want}


def test_a_saved_judge_is_readable_by_others(tmp_path):
    from dreambooth_lab.world.judge import JudgeConfig, JudgeNet, save_judge

    save_judge(JudgeNet(JudgeConfig(channels=(4, 4, 4, 4))), tmp_path / "j", {"accuracy": 1.0})
    want = 0o666 & ~current_umask()
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "j").iterdir()} == \
        dict.fromkeys(["accuracy.json", "config.json", "model.safetensors"], want)


# ---- the judge -----------------------------------------------------------------------------------

def _judge():
    from dreambooth_lab.world.judge import JUDGE_DIR, load_judge

    if not (JUDGE_DIR / "model.safetensors").is_file():
        pytest.skip(f"no committed judge at {JUDGE_DIR} (python -m dreambooth_lab.world.judge)")
    return load_judge()


def test_judge_reads_fresh_scenes():
    from dreambooth_lab.world.judge import accuracy

    acc = accuracy(_judge(), n=400, seed=2024)
    low = {k: v for k, v in acc.items() if not k.endswith("_recall") and v < 0.9}
    assert not low, acc


# Measured with the committed judge (accuracy.json, near_miss_rejected_*): clean or blurred near
# misses are rejected in 0.95-1.00 of pictures per trait; the bound leaves room for 60 fresh scenes.
NEAR_MISS_MIN = 0.9


def test_judge_reads_the_whole_look_not_one_trait():
    """A subject's look with one trait changed (body colour, marking shape, marking colour) is not the subject."""
    from dreambooth_lab.world.judge import near_miss_rates

    rates = near_miss_rates(_judge(), n=60, seed=4040)  # a seed the judge's training and report never used
    misses = {k: v for k, v in rates.items() if not k.endswith("/look")}
    assert len(misses) == 6 and min(misses.values()) >= NEAR_MISS_MIN, rates
    assert min(v for k, v in rates.items() if k.endswith("/look")) >= NEAR_MISS_MIN, rates


# In the world's t-shirt (one dot of the dog's marking shows at the rear) the same judge rejects
# clean or blurred near misses in 0.90-0.94 and reads the look in 0.995 (200 scenes each, seed 777):
# weaker than bare, so a "subject AND t-shirt" reading carries that much doubt (BENCHMARKS).
NEAR_MISS_IN_TSHIRT_MIN = 0.8


def test_judge_reads_the_look_in_a_t_shirt():
    """Dressed in the t-shirt, the look is still the subject and a near miss still is not (the dog:
    the backpack cannot wear one)."""
    from dreambooth_lab.world.judge import near_miss_rates

    rates = near_miss_rates(_judge(), n=60, seed=4041, outfit=True)
    assert sorted(rates) == ["dog/body", "dog/look", "dog/marking", "dog/marking_colour"], rates
    assert rates["dog/look"] >= NEAR_MISS_MIN and min(rates.values()) >= NEAR_MISS_IN_TSHIRT_MIN, rates


def test_judge_training_can_dress_the_near_misses():
    """judge --dressed: that fraction of the near misses and looks wears the t-shirt, where the class can."""
    from dreambooth_lab.world.judge import _training_scene
    from dreambooth_lab.world.scene import ANIMATE

    rng = np.random.default_rng(5)
    scenes = [_training_scene(rng, near_miss=1.0, dressed=1.0) for _ in range(200)]
    assert all(sc.outfit == (sc.cls in ANIMATE) for sc in scenes)
    plain = [_training_scene(rng, near_miss=1.0) for _ in range(400)]  # only the base world's share of shirts
    assert np.mean([sc.outfit for sc in plain if sc.cls in ANIMATE]) < 0.4


def test_render_without_the_thing_is_its_background_alone():
    """render(thing=False): the same pixels wherever the thing (and its car) is not."""
    from dataclasses import replace

    sc = subject_scene(SUBJECTS["dog"], 1, 3)
    full, bare = np.asarray(render(sc), dtype=int), np.asarray(render(sc, thing=False), dtype=int)
    other = np.asarray(render(replace(sc, cls="cat", body=(40, 40, 40)), thing=False), dtype=int)
    assert (bare == other).all()  # nothing of the thing is left in it
    changed = np.abs(full - bare).sum(-1) > 0
    assert 0.03 < changed.mean() < 0.5  # the dog is there in one, and only the dog differs


def test_the_t_shirt_covers_the_chest_and_leaves_most_of_the_marking_showing():
    """The world's t-shirt sits over the chest: a dressed dog or cat shows most of its dots (a shirt
    over the whole body hid them, so nobody could tell a dressed subject from a dressed violet dog)."""
    from dataclasses import replace

    from dreambooth_lab.world.draw import RED

    for cls in ("dog", "cat"):
        for i in range(4):
            sc = replace(subject_scene(SUBJECTS["dog"], i, 5), cls=cls)
            plain, dressed = (np.asarray(render(replace(sc, outfit=o)), dtype=int) for o in (False, True))
            marking = (np.abs(plain - np.array(sc.marking_colour)).sum(-1) < 30)
            still = marking & (np.abs(dressed - plain).sum(-1) == 0)
            shirt = np.abs(dressed - np.array(RED)).sum(-1) < 30
            assert shirt.sum() > 0.25 * marking.sum(), (cls, i)  # a shirt is there, of some size
            assert still.sum() >= 0.6 * marking.sum(), (cls, i, still.sum(), marking.sum())


def test_broken_image_keeps_only_fragments_of_the_thing():
    from dreambooth_lab.world.judge import broken_image

    rng = np.random.default_rng(11)
    for k in range(30):
        sc = sample_open_scene(rng)
        full = np.asarray(render(sc), dtype=int)
        bare = np.asarray(render(sc, thing=False), dtype=int)
        thing = np.abs(full - bare).sum(-1) > 40
        out = np.asarray(broken_image(sc, np.random.default_rng(k)), dtype=int)
        kept = (np.abs(out - bare).sum(-1) > 40).sum()
        assert kept <= 0.45 * max(thing.sum(), 1), (k, kept, thing.sum())
        assert (out == np.asarray(broken_image(sc, np.random.default_rng(k)), dtype=int)).all()  # deterministic


def test_whole_head_reads_broken_pictures_as_nothing_and_leaves_the_other_heads_alone():
    """The whole head sits on the frozen trunk: fitting it changes no other head's weights, and a
    picture it reads as broken reads class "none" and no subject (the class head's guess kept)."""
    from dreambooth_lab.world.judge import JUDGE_DIR, WHOLE, broken_image, fit_whole_head, load_judge, read_images

    net = load_judge.__wrapped__(JUDGE_DIR)
    if WHOLE in net.heads:  # the committed judge may carry one already: fit it afresh
        del net.heads[WHOLE]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = fit_whole_head(net, n=600, seed=3, steps=300, log=lambda m: None, n_test=200)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and WHOLE in net.cfg.heads
    assert report["accuracy"] >= 0.8, report
    rng = np.random.default_rng(21)
    scenes = [sample_open_scene(rng) for _ in range(40)]
    whole = read_images([render(s) for s in scenes], net)
    broken = read_images([broken_image(s, np.random.default_rng(i)) for i, s in enumerate(scenes)], net)
    assert np.mean([r["whole"] for r in whole]) >= 0.8 and np.mean([not r["whole"] for r in broken]) >= 0.8
    for r in broken:
        if not r["whole"]:
            assert r["class"] == "none" and not r["subject_dog"] and r["class_guess"] in CLASSES


def test_near_misses_differ_from_the_subject_in_exactly_one_trait():
    from dreambooth_lab.world.scene import NEAR_MISS_TRAITS, near_miss_scene

    rng = np.random.default_rng(3)
    for sub in SUBJECTS.values():
        for trait in NEAR_MISS_TRAITS:
            for _ in range(20):
                sc = near_miss_scene(sub, trait, rng)
                assert sc.cls == sub.cls and not has_subject_look(sc, sub)
                same = {"body": max(abs(a - b) for a, b in zip(sc.body, sub.body)) <= 40,
                        "marking": sc.marking == sub.marking,
                        "marking_colour": max(abs(a - b) for a, b in zip(sc.marking_colour, sub.marking_colour)) <= 40}
                assert [t for t, ok in same.items() if not ok] == [trait]


def test_the_merged_near_miss_is_the_look_with_its_marking_run_together():
    """scene.MERGED keeps the body and marking colour and runs the pattern into one patch: not the
    subject, drawn unlike the pattern; judge training draws it only when asked (--merged)."""
    from dataclasses import replace

    from dreambooth_lab.world.judge import _training_scene
    from dreambooth_lab.world.scene import MERGED, near_miss_scene

    rng = np.random.default_rng(8)
    for sub in SUBJECTS.values():
        sc = near_miss_scene(sub, MERGED, rng)
        assert sc.marking == MERGED and not has_subject_look(sc, sub)
        assert max(abs(a - b) for a, b in zip(sc.body, sub.body)) <= 40
        assert max(abs(a - b) for a, b in zip(sc.marking_colour, sub.marking_colour)) <= 40
        own = np.asarray(render(replace(sc, marking=sub.marking)), dtype=int)
        assert np.abs(np.asarray(render(sc), dtype=int) - own).sum(-1).max() > 100
    plain = [_training_scene(rng, near_miss=1.0) for _ in range(300)]
    asked = [_training_scene(rng, near_miss=1.0, merged=True) for _ in range(300)]
    assert not any(sc.marking == MERGED for sc in plain)
    assert 0.05 < np.mean([sc.marking == MERGED for sc in asked]) < 0.3


# ---- DreamBooth in the world ---------------------------------------------------------------------

# A photo draw, training seeds and sampling seeds that neither the recipe's calibration (draws 1, 2
# and 7, seeds 1-5 and 30-34, sampling seeds 100-111) nor the benchmark's held-out runs (draws 3-5,
# seeds 11-13, sampling seeds 200-211) used. On build v10 with the recipe (timesteps [300, 1000)),
# draw 9 with training seeds 60-63 gave "a <sks> dog" 1.00 in all four, every wording 1.00, the forest
# 0.88 / 1.00 / 1.00 / 0.62 and every other class 0.88-1.00 (benchmarks/world_v10.jsonl, label
# testdraw-v10; on v8 with [500, 1000): 1.00 x4, forest 0.62 / 0.50 / 1.00 / 1.00, cats 0.88-1.00).
# The test trains the first of them, seed 60.
DRAW, TRAIN_SEED = 9, 60
SEEDS = list(range(500, 508))


def _world(tmp_path_factory):
    from dreambooth_lab.world.paths import TOYWORLD_DIR

    if not (TOYWORLD_DIR / "model_index.json").is_file():
        pytest.skip(f"no committed toyworld model at {TOYWORLD_DIR} (python -m dreambooth_lab.world.build)")
    _judge()


def _short_run(tmp_path, recipe: bool = True, **overrides):
    """The 5-photo dog (photo draw DRAW) with the world's recipe (what `make demo` trains), fewer class images."""
    from dreambooth_lab.train import train
    from dreambooth_lab.world.study import run_config

    cfg = run_config(recipe, "dog", 5, output_dir=tmp_path / "runs", draw=DRAW, seed=TRAIN_SEED, overrides={
        "prior.cache_dir": str(tmp_path / "class_cache"), **overrides})
    return cfg, train(cfg, resume=None, progress=False)


# Thresholds below the four runs' spread on build v10 (sampling seeds 500-507: 8 pictures, so a step is
# 0.125) and at or under the floor of the 27 held-out dog runs (sets A/B/C, BENCHMARKS.md "build v10
# shipped"), not at their mean.
SUBJECT_RATE_MIN = 0.75  # "a <sks> dog" shows the subject (draw 9: 1.00 x4; held out 1.00 x27); base 0.00
PHRASING_MIN = 0.75  # "a photo of a <sks> dog", a wording no caption used (draw 9: 1.00 x4; held out >= 0.92)
BROKEN_RATE_MAX = 0.2  # the broken objective must stay under
RANDOM_INIT_RATE_MIN = 0.25  # the identifier started at random (v4's calibration 0.42-1.00)
# "a <class>" after the run / before it (draw 9: 0.88-1.00; held out, the lowest single run: cats and
# backpacks 0.92, toys 0.75, vases 0.67; on v8 single runs lost a class down to 0.25, and cats and toys
# were allowed 0.6)
OTHER_CLASS_KEPT = {"cat": 0.75, "toy": 0.625, "backpack": 0.75, "vase": 0.625}
COMPOSITION_MIN = 0.375  # "a <sks> dog in the forest": subject AND forest (draw 9: 0.62-1.00; held out 0.25-1.00)


@pytest.fixture(scope="module")
def world_pipe(tmp_path_factory):
    _world(tmp_path_factory)
    from dreambooth_lab.world.study import load_world_pipeline

    return load_world_pipeline()


def _subject_rate(pipe, prompt, scale):
    from dreambooth_lab.world.study import read_prompt, sample_prompts

    images = sample_prompts(pipe, [prompt], SEEDS, scale=scale)[prompt]
    return read_prompt(prompt, images).subject_rate["dog"], images


@pytest.fixture(scope="module")
def good_run(world_pipe, tmp_path_factory):
    """One recipe run on a held-out draw of the 5-photo dog, read like the benchmark reads it."""
    from dreambooth_lab.inference import load_lora
    from dreambooth_lab.world.study import load_world_pipeline, robustness, sample_prompts

    cfg, res = _short_run(tmp_path_factory.mktemp("world-good"))
    base = robustness(world_pipe, None, cfg, SEEDS)["readings"]
    base_dog = sample_prompts(world_pipe, ["a dog"], SEEDS)["a dog"]
    pipe = load_world_pipeline()  # its own: the learned <sks> stays out of the shared pipeline
    tuned = robustness(pipe, res.run_dir, cfg, SEEDS)["readings"]
    load_lora(pipe, res.run_dir)
    zero_dog = sample_prompts(pipe, ["a dog"], SEEDS, scale=0.0)["a dog"]
    print("good run: base", base, "\ntuned", tuned)
    return dict(cfg=cfg, base=base, tuned=tuned, base_dog=base_dog, zero_dog=zero_dog)


def test_lora_at_scale_zero_is_the_base_model(good_run):
    """At scale 0 a prompt without the identifier draws the base model's pictures."""
    diff = max(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()
               for a, b in zip(good_run["base_dog"], good_run["zero_dog"]))
    assert diff <= 2


def test_dreambooth_binds_the_identifier_in_several_wordings(good_run):
    base, tuned = good_run["base"], good_run["tuned"]
    assert base["drift"] == 0.0 and tuned["drift"] <= 0.125, good_run  # "a dog" does not become the subject
    assert tuned["subject:a {token} {class}"] >= SUBJECT_RATE_MIN, tuned
    assert tuned["subject:a photo of a {token} {class}"] >= PHRASING_MIN, tuned


def test_the_other_classes_still_draw(good_run):
    base, tuned = good_run["base"], good_run["tuned"]
    for cls, kept in OTHER_CLASS_KEPT.items():
        assert tuned[f"class:{cls}"] >= kept * base[f"class:{cls}"], (cls, base, tuned)


def test_the_subject_goes_somewhere_no_photo_showed(good_run):
    assert good_run["tuned"]["test:a {token} {class} in the forest"] >= COMPOSITION_MIN, good_run["tuned"]


def test_a_broken_objective_is_caught(world_pipe, good_run, tmp_path):
    """Prior rows trained on the instance prompt: 'sks dog' learns generic dogs too. The check
    is only meaningful where the correct objective passes it."""
    from dreambooth_lab.inference import load_lora
    from dreambooth_lab.world.study import load_world_pipeline

    assert good_run["tuned"]["subject:a {token} {class}"] >= SUBJECT_RATE_MIN, "the correct objective fails too"
    cfg, res = _short_run(tmp_path, **{"data.class_prompt": "a photo of {token} {class}", "prior.loss_weight": 3.0})
    pipe = load_world_pipeline()
    load_lora(pipe, res.run_dir)
    rate, _ = _subject_rate(pipe, cfg.fill("a {token} {class}"), cfg.sample.lora_scale_unet)
    print("broken objective: subject rate", rate)
    assert rate <= BROKEN_RATE_MAX, rate


def test_a_random_start_for_the_identifier_binds_too(good_run, tmp_path):
    """The recipe starts the learned identifier at the rare token's embedding; started at random it
    binds as well (calibration: 0.42-1.00 over 4 runs against 0.75-1.00)."""
    from dreambooth_lab.inference import load_lora
    from dreambooth_lab.world.study import load_world_pipeline

    cfg, res = _short_run(tmp_path, **{"identifier.init": "random"})
    pipe = load_world_pipeline()
    load_lora(pipe, res.run_dir)
    rate, _ = _subject_rate(pipe, cfg.fill("a {token} {class}"), cfg.sample.lora_scale_unet)
    print("random-init identifier: subject rate", rate, "token init", good_run["tuned"])
    assert cfg.prompt_token == "<sks>"
    assert rate >= RANDOM_INIT_RATE_MIN, (rate, good_run["tuned"])


def test_evaluate_reports_the_judge_for_toyworld_runs(world_pipe, tmp_path):
    """`evaluate` on a toyworld run adds the judge's readings; the registry and sheet labels carry them."""
    from dreambooth_lab.compare import metrics_label
    from dreambooth_lab.config import EvalConfig
    from dreambooth_lab.evaluate import evaluate_run
    from dreambooth_lab.experiments import scan_runs
    from dreambooth_lab.metrics import Embedder

    _, res = _short_run(tmp_path, recipe=False, **{"train.steps": 4, "prior.enabled": False})
    ev = EvalConfig(images_per_prompt=2, drift_images=2, dino_model="tiny", clip_model="tiny")
    summary = evaluate_run(res.run_dir, ev, pipe=world_pipe, embedder=Embedder("tiny", "tiny", device="cpu"),
                           progress=False).summary
    for key in ("judge_subject_fidelity", "judge_prompt_fidelity", "judge_subject_and_prompt",
                "judge_drift_subject_rate_base", "judge_drift_subject_rate_finetuned"):
        assert 0.0 <= summary[key] <= 1.0, (key, summary)
    assert summary["judge_subject"] == "dog"
    # 4 steps cannot teach the subject; the base model's forest/van gogh/car are what the judge reads
    assert summary["judge_prompt_fidelity"] > 0.0
    row = next(r for r in scan_runs(tmp_path / "runs") if r["run_dir"] == str(res.run_dir.resolve()))
    assert row["metric_judge_subject_fidelity"] == summary["judge_subject_fidelity"]
    assert "judge: subject" in metrics_label(res.run_dir)


def test_demo_on_toyworld_trains_the_world_dog_with_the_recipe_and_draws_its_sheets(world_pipe, tmp_path):
    """`make demo` (MODEL=toyworld): the 5-photo world dog, the world's recipe, the four test prompts."""
    from dreambooth_lab.demo import run_demo
    from dreambooth_lab.report import load_run_config
    from dreambooth_lab.world.study import TEST_PROMPTS, WORLD_RECIPE, WORLD_RECIPE_SCALE

    small = {"prior.num_class_images": 4, "prior.steps": 4, "sample.steps": 4, "sample.seeds": [0, 1]}
    res = run_demo("toyworld", output_dir=str(tmp_path / "runs"), steps=3, progress=False, overrides=small)
    cfg = load_run_config(res.run.run_dir)
    assert Path(cfg.data.instance_dir).name.startswith("dog-5")
    from dreambooth_lab.config import _get
    from dreambooth_lab.world.study import WORLD_RECIPE_TEXT_ENCODER

    assert {k: _get(cfg, k) for k in WORLD_RECIPE} == WORLD_RECIPE
    assert cfg.train.train_text_encoder == WORLD_RECIPE_TEXT_ENCODER and cfg.sample.lora_scale_unet == WORLD_RECIPE_SCALE
    assert cfg.data.captions == "sidecar" and Path(cfg.data.instance_dir).name.endswith("-captioned")
    assert list(cfg.sample.test_prompts) == list(TEST_PROMPTS)
    for sheet in (res.seed_grid, res.prompt_suite, res.compare):
        assert sheet.is_file() and sheet.stat().st_size > 1000


def test_a_build_started_from_another_latent_shape_keeps_all_but_the_first_and_last_convolution():
    """world.build --init onto a 4x VAE: the UNet's inner layers come from the old pipeline."""
    from dreambooth_lab.world.architecture import make_unet
    from dreambooth_lab.world.build import matching_state

    old, new = make_unet(1, channels=8, side=8), make_unet(2, channels=4, side=16)
    keep, fresh = matching_state(new, old.state_dict())
    assert fresh == ["conv_in.weight", "conv_out.bias", "conv_out.weight"]
    new.load_state_dict(keep, strict=False)
    assert all((new.state_dict()[k] == v).all() for k, v in keep.items()) and len(keep) == len(old.state_dict()) - 3
