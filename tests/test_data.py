import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_lab import data
from conftest import SAMPLE_SUBJECT


def _img(color=(200, 30, 30), size=(80, 60), mode="RGB"):
    return Image.new(mode, size, color)


def test_finds_images_with_any_case_extension(tmp_path):
    for name in ("a.JPG", "b.jpeg", "c.Png", "d.webp", "notes.txt", ".hidden.jpg"):
        if name.endswith("txt"):
            (tmp_path / name).write_text("x")
        else:
            _img().save(tmp_path / name, format={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[name.rsplit(".", 1)[1].lower()])
    assert [p.name for p in data.find_images(tmp_path)] == ["a.JPG", "b.jpeg", "c.Png", "d.webp"]


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(data.DatasetError, match="no images"):
        data.find_images(tmp_path)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(data.DatasetError, match="does_not_exist"):
        data.find_images(tmp_path / "does_not_exist")


def test_every_unreadable_file_is_named_in_one_error(tmp_path):
    _img().save(tmp_path / "good.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    good = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 3])
    with pytest.raises(data.DatasetError) as exc:
        data.ImageSet.from_folder(tmp_path, 32)
    msg = str(exc.value)
    for name in ("empty.jpg", "text.png", "truncated.jpg"):
        assert name in msg
    assert "good.jpg" not in msg


def test_exif_orientation_is_applied():
    # subject_01 is stored rotated with EXIF orientation 6 (see datasets/make_sample_subject.py):
    # upright, the sky (blue) is at the top and the grass (green) at the bottom.
    with Image.open(SAMPLE_SUBJECT / "subject_01.jpg") as raw:
        assert raw.getexif().get(0x0112) == 6
    a = np.asarray(data.open_image(SAMPLE_SUBJECT / "subject_01.jpg")).astype(int)
    top, bottom = a[:10].reshape(-1, 3).mean(0), a[-10:].reshape(-1, 3).mean(0)
    assert top[2] > top[1] and bottom[1] > bottom[2]


def test_transparency_becomes_white(tmp_path):
    im = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    im.putpixel((0, 0), (255, 0, 0, 255))
    im.save(tmp_path / "t.png")
    out = np.asarray(data.open_image(tmp_path / "t.png"))
    assert out.shape == (10, 10, 3)
    assert tuple(out[5, 5]) == (255, 255, 255) and tuple(out[0, 0]) == (255, 0, 0)


def test_crops_resize_to_resolution_and_flip_mirrors():
    im = Image.fromarray(np.tile(np.arange(120, dtype=np.uint8)[None, :, None], (80, 1, 3)))
    s = data.ImageSet([None], [data.resize_shorter_side(im, 40)], 40)
    centre = s.example(0, center_crop=True, flip=False)
    assert centre.shape == (3, 40, 40) and centre.min() >= -1 and centre.max() <= 1
    flipped = s.example(0, center_crop=True, flip=True)
    assert torch.equal(flipped, centre.flip(-1))
    g = torch.Generator().manual_seed(0)
    crops = {tuple(s.example(0, center_crop=False, flip=False, gen=g)[0, 0, :2].tolist()) for _ in range(8)}
    assert len(crops) > 1  # random crops move


def test_data_order_sees_every_photo_once_per_epoch_and_is_pure():
    n = 5
    seen = [data.indices_for_step(n, 1, 42, s)[0] for s in range(3 * n)]
    for e in range(3):
        assert sorted(seen[e * n:(e + 1) * n]) == list(range(n))
    assert seen == [data.indices_for_step(n, 1, 42, s)[0] for s in range(3 * n)]
    assert seen != [data.indices_for_step(n, 1, 43, s)[0] for s in range(3 * n)]
    assert data.indices_for_step(n, 2, 42, 1) == seen[2:4]


def test_a_file_given_as_the_photo_folder_is_called_a_file(tmp_path):
    photo = tmp_path / "dog.jpg"
    _img().save(photo)
    with pytest.raises(data.DatasetError, match=r"dog\.jpg is a file, not a folder") as exc:
        data.find_images(photo)
    assert "does not exist" not in str(exc.value)


@pytest.mark.parametrize("n", [1, 2])
def test_fewer_than_three_photos_warn_with_folder_and_count(tmp_path, n):
    for i in range(n):
        _img(color=(40 * i, 90, 200 - 40 * i), size=(64, 64)).save(tmp_path / f"p{i}.png")
    with pytest.warns(UserWarning, match=rf"only {n} photo\(s\) in {tmp_path}") as rec:
        data.ImageSet.from_folder(tmp_path, 32)
    assert any(issubclass(w.category, data.DatasetWarning) for w in rec)


def test_three_photos_do_not_warn_about_the_count(tmp_path):
    import warnings

    for i in range(3):
        _img(color=(60 * i, 90, 200 - 60 * i), size=(64, 64)).save(tmp_path / f"p{i}.png")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        data.ImageSet.from_folder(tmp_path, 32)
    assert not [w for w in rec if "photo(s) in" in str(w.message)]
