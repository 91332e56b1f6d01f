"""The photos: check the training photos are there, or stop with where to put them; add photos.

`check_photos` is every notebook's dataset cell: the photos in a folder (relative = from the
repository root), or one `PhotosMissing` message that says where to put them, how many, and which
parameter to set (smoke mode checks the same way: no photos are ever substituted). `add_photos`
brings photos in from Colab's file picker or a .zip on Drive.
"""

from __future__ import annotations

import io
from pathlib import Path

from .runtime import DRIVE, NotebookStop, from_root, in_colab


class PhotosMissing(NotebookStop, ValueError):
    """The photo folder is missing or holds no photos."""


def drive_location(path: str | Path) -> str | None:
    """'My Drive › a › b' for a path on the mounted Drive, else None (pure)."""
    try:
        rel = Path(path).relative_to(DRIVE)
    except ValueError:
        return None
    return " › ".join(("My Drive", *rel.parts))


def photos_message(folder: str | Path, problem: str, expect: str, *, param: str = "DATASET_DIR",
                   colab: bool = False, drive_mounted: bool = False) -> str:
    """The message a notebook stops with when its photos are not there (pure)."""
    lines = [f"No training photos: {problem}.", f"Put {expect} (JPEG or PNG) in {folder or 'a folder'}"]
    where = drive_location(folder) if folder else None
    if where:
        lines[-1] += f" — in Google Drive: {where}"
    lines[-1] += f" — or set {param} in the parameters cell to the folder that holds them, then run again."
    if where and not colab:
        lines.append(f"This is not Colab, so there is no Google Drive here: set {param} to a folder on this machine "
                     "(absolute, or relative to the repository root).")
    elif where and not drive_mounted:
        lines.append("Google Drive is not mounted: run the set-up cell with MOUNT_DRIVE checked first.")
    lines.append("To try the workbench without photos of your own, use the synthetic sample: "
                 f"{param} = \"datasets/sample_subject\" (class 'toy').")
    return "\n".join(lines)


def check_photos(folder: str | Path, expect: str = "3–30 photos of the subject",
                 param: str = "DATASET_DIR") -> list[Path]:
    """The photos in `folder` (relative = from the repository root), or stop the notebook with one
    message: where to put them, how many, which parameter to set. Smoke mode checks the same way."""
    from ..data import DatasetError, find_images

    path = Path(from_root(folder)) if str(folder).strip() else None
    if path is None:
        raise PhotosMissing(photos_message("", f"{param} is empty", expect, param=param,
                                           colab=in_colab(), drive_mounted=DRIVE.is_dir()))
    if not path.exists():
        problem = f"{path} does not exist"
    else:
        try:
            photos = find_images(path)
        except DatasetError as exc:
            problem = f"{path} holds no photos" if str(exc).startswith("no images in") else str(exc)
        else:
            print(f"{len(photos)} photo(s) in {path}")
            return photos
    raise PhotosMissing(photos_message(path, problem, expect, param=param, colab=in_colab(),
                                       drive_mounted=DRIVE.is_dir()))


def add_photos(folder: str | Path, *, upload: bool = False, zip_path: str = "") -> list[Path]:
    """Photos into the dataset folder: from Colab's file picker (upload=True; .zip files are
    unpacked) and/or a .zip on Drive (zip_path). Folders inside an archive are flattened, caption
    .txt files come along, other files are skipped and named; a different photo of the same name
    is never overwritten. Returns the photos added (the notebook's next cell checks the folder)."""
    from ..colab import add_files, read_zip

    dest = Path(from_root(folder))
    items: dict[str, bytes] = {}
    try:
        if upload:
            if not in_colab():
                raise NotebookStop(f"the file picker is Colab's: here, copy the photos into {dest} "
                                   "(or give ZIP_PATH, a .zip of them)")
            from google.colab import files as colab_files  # type: ignore

            for name, data in colab_files.upload().items():
                items.update(read_zip(io.BytesIO(data)) if name.lower().endswith(".zip") else {name: data})
        if zip_path:
            items.update(read_zip(from_root(zip_path)))
        added, skipped = add_files(dest, items)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        raise NotebookStop(str(exc)) from None
    photos = [p for p in added if p.suffix.lower() != ".txt"]
    print(f"added {len(photos)} photo(s) to {dest}" + (f"; skipped (not photos or captions): {', '.join(skipped)}"
                                                        if skipped else ""))
    return photos
