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
