"""Aspect-ratio bucketing for non-square photos (issue: beyond the recipe, item 5)."""

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from dreambooth_lab import buckets
from dreambooth_lab.models import resolve


def test_bucket_sizes_keep_the_area_the_step_and_the_ratio():
    sizes = buckets.bucket_sizes(512, 64)
    assert (512, 512) in sizes and (768, 320) in sizes and (320, 768) in sizes
    for w, h in sizes:
        assert w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 and max(w / h, h / w) <= 2.5
    assert buckets.nearest_bucket((1000, 1000), sizes) == (512, 512)
    wide = buckets.nearest_bucket((1600, 900), sizes)
    assert wide[0] > wide[1] and abs(wide[0] / wide[1] - 16 / 9) < 0.3
    assert buckets.nearest_bucket((900, 1600), sizes) == wide[::-1]


def test_every_step_draws_one_bucket_and_every_photo_is_seen():
    bucket_of = [(64, 64), (96, 32), (96, 32), (32, 96), (64, 64), (96, 32)]
    seen = set()
    for step in range(12):
        idx = buckets.indices_for_step(bucket_of, 2, seed=7, step=step)
        assert len(idx) == 2 and len({bucket_of[i] for i in idx}) == 1
        assert idx == buckets.indices_for_step(bucket_of, 2, seed=7, step=step), "a pure function"
        seen.update(idx)
    assert seen == set(range(6))


def test_cover_and_crop_keeps_the_bucket_inside_the_resized_image():
    resized, box = buckets.cover_and_crop_box((400, 300), (96, 64), True, None)
    assert resized[0] >= 96 and resized[1] >= 64 and box[2] - box[0] == 96 and box[3] - box[1] == 64
    assert box[2] <= resized[0] and box[3] <= resized[1]


def _non_square_photos(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(128, 64), (128, 64), (64, 128), (96, 96), (64, 128)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


@pytest.mark.parametrize("flip", [False, True])
def test_buckets_train_with_cached_and_uncached_latents_alike(tmp_path, flip):
    from dreambooth_lab.train import train

    photos = _non_square_photos(tmp_path / "photos")
    over = {"data.instance_dir": str(photos), "data.buckets": True, "data.random_flip": flip,
            "train.batch_size": 2, "train.steps": 4}
    cached = train(tiny_config(tmp_path / "a", **over), resume=None, progress=False)
    plain = train(tiny_config(tmp_path / "b", **{**over, "train.cache_latents": False}), resume=None, progress=False)
    for x, y in zip(cached.history, plain.history):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-4)


def test_a_step_with_buckets_feeds_one_shape_to_the_unet(tmp_path, tiny_pipe):
    from accelerate import Accelerator

    from dreambooth_lab.data import ImageSet
    from dreambooth_lab.trainer import DreamBoothObjective

    photos = _non_square_photos(tmp_path / "photos")
    cfg = tiny_config(tmp_path, **{"data.instance_dir": str(photos), "data.buckets": True, "train.batch_size": 2})
    classes = ImageSet.from_folder(photos, 64, check=False)
    obj = DreamBoothObjective(cfg.resolved(), tiny_pipe, ImageSet.from_folder(photos, 64), classes, Accelerator(),
                              base=resolve(cfg.model))
    shapes = set()
    for step in range(6):
        rows, positions, n, gen = obj.plan(step, 0)
        latents = obj.latents(rows, positions, n, gen)
        assert len({r.bucket for r in rows}) == 1 and latents.shape[0] == 4
        shapes.add(tuple(latents.shape[2:]))
    assert len(shapes) > 1, "non-square photos give non-square latents"
