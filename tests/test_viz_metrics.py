import numpy as np
from PIL import Image

from dreambooth_lab import metrics, viz


def test_nearest_finds_a_training_image_among_the_generations():
    rng = np.random.default_rng(0)
    train = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(4)]
    gen = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)), train[2]]
    (i0, s0), (i1, s1) = metrics.nearest(gen, train)
    assert i1 == 2 and abs(s1 - 1.0) < 1e-9
    assert s0 < 0.5


def test_format_params_wraps_and_formats_floats():
    text = viz.format_params({"lr": 0.0003, "token": "sks", "long": "x" * 50}, width=30)
    assert "lr=0.0003" in text and all(len(line) <= 60 for line in text.splitlines())
    assert len(text.splitlines()) >= 2


def test_moving_average():
    assert viz.moving_average([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]


def test_sheets_are_pngs(tmp_path):
    ims = [Image.new("RGB", (16, 16), c) for c in ("red", "blue", "green")]
    p = viz.image_grid(ims, ["a", "b", "c"], tmp_path / "g.png", title="t", params={"seed": 1})
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hist = [{"step": i, "loss": 1 / i, "instance_loss": 0.5 / i, "prior_loss": None} for i in range(1, 30)]
    assert viz.plot_loss_curve(hist, tmp_path / "l.png").is_file()
    pairs = [(ims[0], "gen", ims[1], "train.jpg", 0.5)] * 5
    assert viz.dataset_vs_generation(pairs, tmp_path / "c.png").is_file()
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files


def test_random_metric_models_are_named_and_marked_in_labels(tmp_path):
    import json

    from dreambooth_lab.compare import metrics_label
    from dreambooth_lab.experiments import metrics_note

    assert metrics.random_metric_models({"dino_model": "tiny", "clip_model": "openai/clip-vit-base-patch32"}) == \
        ["eval.dino_model=tiny"]
    assert metrics.random_metric_models({"dino_model": "facebook/dino-vits16", "clip_model": "x"}) == []
    (tmp_path / "metrics.json").write_text(json.dumps({"summary": {"dino": 0.5, "clip_t": 0.25},
                                                       "settings": {"dino_model": "tiny", "clip_model": "tiny"}}))
    assert metrics_label(tmp_path) == "\nDINO 0.50 CLIP-T 0.25\n(tiny metric models: not meaningful)"
    (tmp_path / "metrics.json").write_text(json.dumps({"summary": {"dino": 0.5},
                                                       "settings": {"dino_model": "facebook/dino-vits16"}}))
    assert metrics_label(tmp_path) == "\nDINO 0.50"
    (tmp_path / "metrics.json").write_text(json.dumps({"summary": {"dino": 0.5, "judge_subject_fidelity": 0.75,
                                                                   "judge_prompt_fidelity": 0.5},
                                                       "settings": {"dino_model": "tiny"}}))
    assert metrics_label(tmp_path) == ("\nDINO 0.50\n(tiny metric models: not meaningful)"
                                       "\njudge: subject 0.75 prompt 0.50")
    assert metrics_note([{"metric_models": "facebook/dino-vits16, openai/clip-vit-base-patch32"}]) == ""
    note = metrics_note([{"metric_models": "tiny, tiny (random weights): NOT MEANINGFUL"}])
    assert note.startswith("note: scores marked NOT MEANINGFUL") and "facebook/dino-vits16" in note


def test_column_headers_fill_what_the_rows_share():
    from dreambooth_lab.compare import column_prompt
    from dreambooth_lab.config import Config, with_overrides

    a = with_overrides(Config(), {"data.token": "sks"})
    b = with_overrides(Config(), {"data.token": "oue"})
    cat = with_overrides(Config(), {"data.token": "oue", "data.class_name": "cat"})
    assert column_prompt("A {token} {class} on the beach", [a]) == "A sks dog on the beach"
    assert column_prompt("A {token} {class} on the beach", [a, b]) == "A [token] dog on the beach"
    assert column_prompt("A {token} {class}", [b, cat]) == "A oue [class]"


def test_dataset_sheet_shows_every_photo(tmp_path):
    from conftest import SAMPLE_SUBJECT
    from dreambooth_lab.data import ImageSet

    images = ImageSet.from_folder(SAMPLE_SUBJECT, 32)
    out = viz.dataset_sheet(images, tmp_path / "run" / "dataset.png", title="6 photos")
    assert out == tmp_path / "run" / "dataset.png" and Image.open(out).size[0] > Image.open(out).size[1]


def test_written_files_lists_sheets_and_counts_images(tmp_path):
    from dreambooth_lab.evaluate import EvalResult, written_files

    folder = tmp_path / "eval" / "eval-1"
    folder.mkdir(parents=True)
    for stem in ("eval-00-seed0", "eval-01-seed1", "drift-00-seed0"):
        Image.new("RGB", (8, 8)).save(folder / f"{stem}.png")
        (folder / f"{stem}.json").write_text("{}")
    Image.new("RGB", (8, 8)).save(folder / "memorisation.png")
    (folder / "metrics.json").write_text("{}")
    result = EvalResult(run=str(tmp_path), created="", settings={}, summary={}, folder=str(folder))
    lines = written_files(tmp_path, result)
    assert lines[0] == f"metrics:      {tmp_path / 'metrics.json'}"
    assert f"memorisation: {folder / 'memorisation.png'}" in lines
    assert any(line.startswith(f"eval images:  2 in {folder}") for line in lines)
    assert any(line.startswith(f"drift images: 1 in {folder}") for line in lines)
    assert f"also:         {folder / 'metrics.json'}" in lines
