import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_lab import prompts
from dreambooth_lab.config import EvalConfig, SampleConfig
from dreambooth_lab.evaluate import EvalResult, evaluate_run, read_result
from dreambooth_lab.experiments import scan_runs
from dreambooth_lab.metrics import Embedder, mean_pairwise_cosine, nearest_rows, paired_cosine, strip_token


@pytest.fixture(scope="module")
def embedder():
    return Embedder("tiny", "tiny", device="cpu")


def _images(n, seed=0, size=48):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_identical_images_score_one(embedder):
    ims = _images(3)
    for emb in (embedder.dino, embedder.clip_image):
        a = emb(ims[:1])
        assert mean_pairwise_cosine(a, emb(ims[:1])) == pytest.approx(1.0, abs=1e-6)
        assert mean_pairwise_cosine(a, emb(ims[1:])) < 1.0


def test_clip_t_equals_the_models_own_similarity_head(embedder):
    from transformers import AutoImageProcessor, CLIPModel, CLIPTokenizer

    from dreambooth_lab.builtin.metric_models import metric_model_path

    ims, texts = _images(3, seed=1), ["a dog in the jungle", "a red dog", "a dog wearing a santa hat"]
    ours = paired_cosine(embedder.clip_image(ims), embedder.clip_text(texts))
    path = metric_model_path("tiny", "clip")
    model = CLIPModel.from_pretrained(path).eval()
    tok, proc = CLIPTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    with torch.no_grad():
        out = model(**tok(texts, padding=True, return_tensors="pt"), pixel_values=proc(images=ims, return_tensors="pt")["pixel_values"])
    reference = (out.logits_per_image / model.logit_scale.exp()).diagonal()
    assert torch.allclose(torch.tensor(ours), reference, atol=1e-5)


def test_nearest_finds_a_training_image_among_the_generations(embedder):
    train = _images(4, seed=2)
    generated = _images(2, seed=3) + [train[2]]
    found = nearest_rows(embedder.dino(generated), embedder.dino(train))
    assert found[2][0] == 2 and found[2][1] == pytest.approx(1.0, abs=1e-6)


def test_strip_token():
    assert strip_token("a sks dog in the jungle", "sks") == "a dog in the jungle"
    assert strip_token("a red sks dog", "sks") == "a red dog"
    assert strip_token("a sksx dog", "sks") == "a sksx dog"


def test_dreambench_prompt_sets():
    live, obj = prompts.dreambench("live"), prompts.dreambench("object")
    assert len(live) == len(obj) == 25 and live[:10] == obj[:10]
    assert live[0] == "a {token} {class} in the jungle" and "wearing a santa hat" in live[11]
    assert obj[-1] == "a cube shaped {token} {class}" and "Eiffel Tower" in obj[12]
    assert prompts.class_kind("dog") == "live" and prompts.class_kind("backpack") == "object"
    assert prompts.prompt_set("dreambench", "dog")[10] == "a {token} {class} wearing a red hat"
    assert len(prompts.prompt_set("study", "dog")) == 4


def test_evaluate_run_writes_metrics_and_round_trips(trained_run, embedder):
    ev = EvalConfig(dino_model="tiny", clip_model="tiny", images_per_prompt=2, drift_images=3)
    result = evaluate_run(trained_run.run_dir, ev, embedder=embedder, progress=False)
    s = result.summary
    assert s["images"] == 8 and len(result.per_image) == 8 and len(result.per_prompt) == 4
    for key in ("dino", "clip_i", "clip_t", "memorisation_max", "drift", "diversity_base", "diversity_finetuned"):
        assert np.isfinite(s[key]), key
    assert result.per_image[0]["clip_t_prompt"] == "A dog in red t-shirts"  # token stripped
    back = read_result(trained_run.run_dir)
    assert back == result and EvalResult.from_json(result.to_json()) == result
    assert (trained_run.run_dir / "eval").is_dir()
    assert (next((trained_run.run_dir / "eval").iterdir()) / "memorisation.png").is_file()
    row = next(r for r in scan_runs(trained_run.run_dir.parent) if r["run_dir"] == str(trained_run.run_dir))
    assert row["metric_dino"] == s["dino"] and row["metric_clip_t"] == s["clip_t"]


def test_drift_baseline_is_the_base_model_without_lora(trained_run, embedder):
    """The drift baseline (the fine-tuned pipeline at LoRA scale 0) must be the base model itself."""
    from dreambooth_lab.config import ModelConfig
    from dreambooth_lab.evaluate import real_photos
    from dreambooth_lab.models import load_pipeline
    from dreambooth_lab.report import load_run_config
    from dreambooth_lab.sample import generate, read_sidecar

    ev = EvalConfig(dino_model="tiny", clip_model="tiny", images_per_prompt=1, drift_images=3, prompt_set="study")
    full = SampleConfig(lora_scale_unet=1.5, lora_scale_text_encoder=1.5, steps=4)
    result = evaluate_run(trained_run.run_dir, ev, settings=full, embedder=embedder, progress=False)
    pngs = sorted(Path(result.folder).glob("drift-*.png"))
    assert len(pngs) == 6
    base_pngs = pngs[:3]  # the baseline comes first, then the fine-tuned images with the same seeds

    base_pipe = load_pipeline(ModelConfig(name="tiny"), device="cpu")  # no LoRA loaded at all
    assert not base_pipe.get_list_adapters()
    specs = [read_sidecar(p) for p in base_pngs]
    fresh = generate(base_pipe, specs, batch_size=4, progress=False)
    for png, image in zip(base_pngs, fresh):
        assert np.abs(np.asarray(Image.open(png)).astype(int) - np.asarray(image).astype(int)).max() <= 1, png.name
    assert all(sp.lora_scale_unet == sp.lora_scale_text_encoder == 0.0 for sp in specs)  # and say so
    real = embedder.dino(real_photos(load_run_config(trained_run.run_dir))[0])
    s = result.summary
    assert s["drift_subject_similarity_base"] == pytest.approx(mean_pairwise_cosine(embedder.dino(fresh), real),
                                                               abs=1e-4)
    assert s["drift"] != 0.0  # the fine-tuned images did move


def test_a_missing_metric_model_fails_before_any_image_is_generated(trained_run, tmp_path, monkeypatch, capsys):
    from dreambooth_lab import evaluate
    from dreambooth_lab.cli import main

    def no_generation(*a, **k):
        raise AssertionError("images were generated before the metric models loaded")

    monkeypatch.setattr(evaluate, "generate", no_generation)
    run = trained_run.run_dir
    before = sorted((run / "eval").glob("*")) if (run / "eval").exists() else []
    metrics = (run / "metrics.json").read_bytes() if (run / "metrics.json").exists() else None
    for dotted, value in (("eval.dino_model", str(tmp_path / "no-dino")), ("eval.clip_model", "nobody/no-clip")):
        assert main(["evaluate", str(run), "--set", "eval.dino_model=tiny", "--set", "eval.clip_model=tiny",
                     "--set", f"{dotted}={value}"]) == 2
        err = capsys.readouterr().err  # the tiny DINO's loading bar may come first
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert dotted in errors[0] and value in errors[0] and f"{dotted}=tiny" in errors[0], errors[0]
    assert (sorted((run / "eval").glob("*")) if (run / "eval").exists() else []) == before
    assert ((run / "metrics.json").read_bytes() if (run / "metrics.json").exists() else None) == metrics


def test_a_failure_while_measuring_leaves_no_half_filled_folder(trained_run, embedder, tmp_path, monkeypatch):
    import shutil

    run = Path(shutil.copytree(trained_run.run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("eval", "metrics.json")))

    def broken(images):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(embedder, "dino", broken)
    ev = EvalConfig(dino_model="tiny", clip_model="tiny", images_per_prompt=1, drift_images=2)
    with pytest.raises(RuntimeError, match="out of memory"):
        evaluate_run(run, ev, embedder=embedder, progress=False)
    assert not (run / "eval").exists() and not (run / "metrics.json").exists()
    monkeypatch.undo()
    result = evaluate_run(run, ev, embedder=embedder, progress=False)  # and a good evaluation lands whole
    assert [p.name for p in (run / "eval").iterdir()] == [Path(result.folder).name]
    assert (Path(result.folder) / "metrics.json").is_file() and (Path(result.folder) / "memorisation.png").is_file()


def test_score_scale_multiplies_the_scores(trained_run, embedder):
    ev = EvalConfig(dino_model="tiny", clip_model="tiny", images_per_prompt=1, drift_images=0)
    one = evaluate_run(trained_run.run_dir, ev, embedder=embedder, progress=False).summary
    hundred = evaluate_run(trained_run.run_dir, EvalConfig(**{**ev.__dict__, "score_scale": 100.0}),
                           embedder=embedder, progress=False).summary
    assert hundred["dino"] == pytest.approx(100 * one["dino"]) and hundred["clip_t"] == pytest.approx(100 * one["clip_t"])


def test_evaluate_cli(trained_run, capsys):
    from dreambooth_lab.cli import main

    assert main(["evaluate", str(trained_run.run_dir), "--set", "eval.dino_model=tiny", "--set", "eval.clip_model=tiny",
                 "--set", "eval.images_per_prompt=1", "--set", "eval.drift_images=2"]) == 0
    out = capsys.readouterr().out
    assert "dino=" in out and "clip_t=" in out
    assert json.loads((trained_run.run_dir / "metrics.json").read_text())["settings"]["images_per_prompt"] == 1
    # every file it wrote is printed, and tiny metric models are called what they are
    folder = Path(json.loads((trained_run.run_dir / "metrics.json").read_text())["folder"])
    assert f"metrics:      {trained_run.run_dir / 'metrics.json'}" in out
    assert f"memorisation: {folder / 'memorisation.png'}" in out
    n_eval = len(list(folder.glob("eval-*.png")))
    assert f"eval images:  {n_eval} in {folder}" in out and "drift images: 4 in" in out
    assert "NOT MEANINGFUL" in out and "note: scores marked NOT MEANINGFUL" in out
