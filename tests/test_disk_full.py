"""A full disk or quota (ENOSPC / EDQUOT) at each write site (issue #25 items 1 and 8): one line
naming the folder and what to do, the run marked failed with its step, nothing half-written left
behind, and the same command going on once there is space (at the last step when the final LoRA
write failed). The fault is injected into files.atomic_write's write, after a partial write, so the
real atomic_write has to clean up its temporary file."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from dreambooth_lab import files
from dreambooth_lab.runs import LORA_FILE, SUMMARY

from conftest import SAMPLE_SUBJECT, tiny_config


def fill_disk(monkeypatch, when, after: int = 0, code: int = errno.ENOSPC) -> dict:
    """Writes whose path satisfies `when` fail with `code` after `after` of them succeeded (each
    failing one first writes a few bytes into its temp file). Returns a dict: set ["on"] = False to
    free the disk again; ["failed"] counts the failures."""
    real = files.atomic_write
    state = {"on": True, "seen": 0, "failed": 0}

    def atomic_write(path, write, size=None):
        path = Path(path)
        if state["on"] and when(path):
            state["seen"] += 1
            if state["seen"] > after:
                state["failed"] += 1

                def partial(tmp: Path) -> None:
                    tmp.write_bytes(b"half")
                    raise OSError(code, "No space left on device" if code == errno.ENOSPC else "Disk quota exceeded")

                return real(path, partial, size)
        return real(path, write, size)

    monkeypatch.setattr(files, "atomic_write", atomic_write)
    return state


def leftovers(folder: Path) -> list[str]:
    """Temp files and folders of interrupted writes under folder."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*")
                  if p.name.endswith((".tmp", files.PARTIAL)) or p.name.startswith(".ckpt-"))


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def error_line(stderr: str) -> str:
    """The CLI's one error line (progress bars aside), and no traceback."""
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


# ---- the writers ----------------------------------------------------------------------------------

def test_atomic_write_turns_enospc_into_disk_full_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "out" / "a.bin"
    fill_disk(monkeypatch, lambda p: True)
    with pytest.raises(files.DiskFull) as err:
        files.write_bytes(target, b"x" * 3000)
    msg = one_line(str(err.value))
    assert str(target.parent) in msg and "2.9 KB needed" in msg and "free" in msg and "free space" in msg
    assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    assert not target.exists() and leftovers(tmp_path) == []


def test_quota_is_named_and_other_errors_pass_unchanged(tmp_path, monkeypatch):
    fill_disk(monkeypatch, lambda p: p.name == "q.json", code=errno.EDQUOT)
    with pytest.raises(files.DiskFull, match="over its quota.*Google Drive"):
        files.write_json(tmp_path / "q.json", {"a": 1})
    fill_disk(monkeypatch, lambda p: p.name == "e.json", code=errno.EIO)
    with pytest.raises(OSError) as err:
        files.write_json(tmp_path / "e.json", {"a": 1})
    assert not isinstance(err.value, files.DiskFull) and err.value.errno == errno.EIO
    assert leftovers(tmp_path) == []


def test_disk_full_message_and_sizes_are_pure():
    assert files.human_bytes(512) == "512 B" and files.human_bytes(3 * 1024 * 1024) == "3.0 MB"
    msg = files.disk_full_message(Path("/d/runs"), 2048, None, False, "do this")
    assert msg == "the disk of /d/runs is full (2.0 KB needed): do this"
    assert files.disk_full_message(Path("/d"), None, None, True, "x").startswith("the disk of /d is over its quota")
    e = files.DiskFull("/d", 10, free=1).again(folder="/elsewhere", hint="go")
    assert e.folder == Path("/elsewhere") and e.needed == 10 and str(e).endswith(": go")


def test_building_folder_appears_only_complete(tmp_path, monkeypatch):
    with files.Building(tmp_path / "s", "samples") as b:
        files.write_text(b.tmp / "a.txt", "a")
        assert b.tmp.name.startswith(".samples-") and not list((tmp_path / "s").glob("samples-*"))
    assert b.path.name.startswith("samples-") and (b.path / "a.txt").read_text() == "a"
    assert b.final(b.tmp / "a.txt") == b.path / "a.txt"
    fill_disk(monkeypatch, lambda p: p.name == "b.txt")
    with pytest.raises(files.DiskFull) as err:
        with files.Building(tmp_path / "s", "samples") as b2:
            files.write_text(b2.tmp / "a.txt", "a")
            files.write_text(b2.tmp / "b.txt", "b")
    assert err.value.folder == tmp_path / "s"  # the folder the user knows, not the hidden one
    assert [p.name for p in (tmp_path / "s").iterdir()] == [b.path.name]


# ---- training -------------------------------------------------------------------------------------

def cli_train(tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--model", "tiny", "--data", str(SAMPLE_SUBJECT), "--set", f"train.output_dir={tmp_path / 'runs'}",
            "--set", f"prior.cache_dir={tmp_path / 'class_cache'}", "--set", "prior.num_class_images=2",
            "--set", "prior.steps=2", "--set", "train.steps=6", "--set", "train.checkpoint_every=2", *extra]


def test_checkpoint_on_a_full_disk_is_one_line_marks_the_run_failed_and_the_same_command_resumes(
        tmp_path, monkeypatch, capsys):
    from dreambooth_lab.cli import main

    # the second checkpoint (step 4) fails on its second file; the first (step 2) is whole
    disk = fill_disk(monkeypatch, lambda p: p.parent.name.startswith(".ckpt-"), after=6 + 1)
    assert main(cli_train(tmp_path)) == 1
    line = error_line(capsys.readouterr().err)
    (run,) = (tmp_path / "runs").iterdir()
    assert line.startswith(f"error: the disk of {run / 'checkpoints'} is full (") and "needed" in line
    assert "train.output_dir" in line and "resume from step 2" in line and "marked failed" in line
    summary = json.loads((run / SUMMARY).read_text())
    assert summary["status"] == "failed" and summary["reason"] == "disk_full"
    assert summary["failed_at_step"] == 4 and summary["resumable"] is True
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000002"]
    assert leftovers(run) == [] and not (run / "train.lock").exists()

    disk["on"] = False  # space again: the same command goes on from step 2 in the same folder
    assert main(cli_train(tmp_path)) == 0
    capsys.readouterr()
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]
    summary = json.loads((run / SUMMARY).read_text())
    assert summary["status"] == "finished" and summary["resumed_from"] == 2 and summary["steps"] == 6


def test_final_lora_on_a_full_disk_keeps_every_step(tmp_path, monkeypatch):
    from dreambooth_lab.train import train

    cfg = tiny_config(tmp_path, **{"train.steps": 4, "prior.num_class_images": 2, "prior.steps": 2})
    assert cfg.train.checkpoint_every > cfg.train.steps  # no checkpoint due during the run
    disk = fill_disk(monkeypatch, lambda p: p.name == LORA_FILE)
    with pytest.raises(files.DiskFull) as err:
        train(cfg, progress=False)
    (run,) = (tmp_path / "runs").iterdir()
    msg = one_line(str(err.value))
    assert str(run) in msg and "resume from step 4" in msg and "train.output_dir" in msg
    summary = json.loads((run / SUMMARY).read_text())
    assert summary["status"] == "failed" and summary["failed_at_step"] == 4 and summary["resumable"] is True
    assert not (run / LORA_FILE).exists() and (run / "checkpoints" / "step-000004" / "state.json").is_file()
    assert leftovers(run) == []

    disk["on"] = False
    result = train(cfg, progress=False)  # the same call: resumes at the last step, trains nothing again
    assert result.run_dir == run and result.resumed_from == 4
    assert json.loads((run / SUMMARY).read_text())["status"] == "finished"
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())  # the keep-alive went
    whole = train(tiny_config(tmp_path / "other", **{"train.steps": 4, "prior.num_class_images": 2,
                                                      "prior.steps": 2,
                                                      "prior.cache_dir": str(tmp_path / "class_cache")}),
                  resume=None, progress=False)
    assert (run / LORA_FILE).read_bytes() == whole.lora_path.read_bytes()  # as if nothing had happened


def test_when_even_summary_json_cannot_be_written_the_line_says_so_and_the_run_stays_open(tmp_path, monkeypatch):
    from dreambooth_lab.runs import is_open
    from dreambooth_lab.train import train

    cfg = tiny_config(tmp_path, **{"train.steps": 2, "prior.num_class_images": 2, "prior.steps": 2})
    disk = fill_disk(monkeypatch, lambda p: p.name in (LORA_FILE, SUMMARY))
    with pytest.raises(files.DiskFull) as err:
        train(cfg, progress=False)
    (run,) = (tmp_path / "runs").iterdir()
    assert "summary.json could not be written either" in one_line(str(err.value))
    assert not (run / SUMMARY).exists() and is_open(run) and leftovers(run) == []
    disk["on"] = False
    assert train(cfg, progress=False).resumed_from == 2


def test_fused_export_on_a_full_disk_leaves_no_folder(short_run, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    from dreambooth_lab.export import export_fused

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DiffusionPipeline, "save_pretrained", full)
    with pytest.raises(files.DiskFull) as err:
        export_fused(short_run, out=tmp_path / "out" / "fused")
    assert str(tmp_path / "out") in one_line(str(err.value)) and "--out" in str(err.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_full_disk_at_the_start_leaves_no_run_folder(tmp_path, monkeypatch):
    from dreambooth_lab.train import train

    cfg = tiny_config(tmp_path, **{"train.steps": 2, "prior.num_class_images": 2, "prior.steps": 2})
    fill_disk(monkeypatch, lambda p: p.name == "identity.json")
    with pytest.raises(files.DiskFull) as err:
        train(cfg, progress=False)
    assert "no run folder was made" in one_line(str(err.value)) and "train.output_dir" in str(err.value)
    assert list((tmp_path / "runs").iterdir()) == []


def test_full_class_image_cache_names_prior_cache_dir_and_leaves_no_orphan_run(tmp_path, monkeypatch):
    from dreambooth_lab.prior import cache_folder
    from dreambooth_lab.train import train

    cfg = tiny_config(tmp_path, **{"train.steps": 2, "prior.num_class_images": 3, "prior.steps": 2,
                                   "prior.batch_size": 1})
    disk = fill_disk(monkeypatch, lambda p: p.name == "class_00002.png")
    with pytest.raises(files.DiskFull) as err:
        train(cfg, progress=False)
    folder, _ = cache_folder(cfg)
    msg = one_line(str(err.value))
    assert str(folder) in msg and "prior.cache_dir" in msg and "2 of 3 class images are kept" in msg
    assert "run folder" in msg and list((tmp_path / "runs").iterdir()) == []  # no orphan run folder
    assert leftovers(tmp_path) == []
    assert json.loads((folder / "manifest.json").read_text())["images"] == ["class_00000.png", "class_00001.png"]
    disk["on"] = False
    assert train(cfg, progress=False).class_images_generated == 1  # the rest, and training


# ---- samples, sheets, export, registry ------------------------------------------------------------

@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from dreambooth_lab.train import train

    tmp = tmp_path_factory.mktemp("disk_full_run")
    return train(tiny_config(tmp, **{"train.steps": 2, "prior.enabled": False, "sample.steps": 2,
                                     "sample.test_prompts": []}), progress=False).run_dir


def test_sample_on_a_full_disk_leaves_no_samples_folder_and_compare_never_uses_a_half_one(
        short_run, tmp_path, monkeypatch, tiny_pipe):
    from dreambooth_lab.report import compare_run, latest_samples, sample_run
    from dreambooth_lab.inference import load_lora

    load_lora(tiny_pipe, short_run)
    disk = fill_disk(monkeypatch, lambda p: p.name.startswith("img-01-"))
    with pytest.raises(files.DiskFull) as err:
        sample_run(short_run, pipe=tiny_pipe, progress=False)
    assert str(short_run / "samples") in one_line(str(err.value)) and "sample again" in str(err.value)
    assert list((short_run / "samples").iterdir()) == []
    with pytest.raises(FileNotFoundError, match="no samples yet"):
        compare_run(short_run)

    # a half-filled folder (as an older version left it): skipped by compare, refused when named
    half = short_run / "samples" / "samples-20000101-000000"
    half.mkdir()
    (half / "img-00-00-seed0.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no samples yet"):
        latest_samples(short_run)
    with pytest.raises(FileNotFoundError, match="not a complete samples folder"):
        compare_run(short_run, half)

    disk["on"] = False
    done = sample_run(short_run, pipe=tiny_pipe, progress=False)
    assert latest_samples(short_run) == done.folder and all(p.is_file() for p in done.images)
    assert done.prompt_suite.is_file() and compare_run(short_run).parent == done.folder


def test_sheet_on_a_full_disk_leaves_nothing(short_run, tmp_path, monkeypatch, tiny_pipe):
    from dreambooth_lab.compare import parameter_grid
    from dreambooth_lab.inference import load_lora

    load_lora(tiny_pipe, short_run)
    fill_disk(monkeypatch, lambda p: p.suffix == ".png" and "_x_" in p.name)  # the sheet itself, last
    with pytest.raises(files.DiskFull) as err:
        parameter_grid(short_run, tmp_path / "sheets", rows=("guidance", [3.0]), cols=("steps", [2]),
                       pipe=tiny_pipe, progress=False)
    assert str(tmp_path / "sheets") in one_line(str(err.value))
    assert list((tmp_path / "sheets").iterdir()) == []


def test_export_on_a_full_disk_is_one_line_and_leaves_no_file(short_run, tmp_path, monkeypatch, capsys):
    from dreambooth_lab.cli import main

    target = tmp_path / "x_kohya.safetensors"
    fill_disk(monkeypatch, lambda p: p == target)
    assert main(["export", str(short_run), "--out", str(target)]) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: the disk of {tmp_path} is full (") and "needed" in line
    assert not target.exists() and leftovers(tmp_path) == []


def test_registry_on_a_full_disk_is_one_line_and_keeps_the_old_one(tmp_path, monkeypatch):
    from dreambooth_lab.experiments import write_registry

    write_registry(tmp_path)
    before = (tmp_path / "registry.csv").read_bytes()
    fill_disk(monkeypatch, lambda p: p.name == "registry.csv")
    with pytest.raises(files.DiskFull) as err:
        write_registry(tmp_path)
    assert str(tmp_path) in one_line(str(err.value))
    assert (tmp_path / "registry.csv").read_bytes() == before and leftovers(tmp_path) == []


def test_a_run_stopped_by_a_full_disk_with_a_checkpoint_stays_open(tmp_path):
    from dreambooth_lab.runs import is_open

    run = tmp_path / "r"
    run.mkdir()
    assert is_open(run)
    files.write_json(run / SUMMARY, {"status": "failed", "reason": "disk_full", "resumable": True})
    assert is_open(run)
    for ended in ({"status": "failed", "resumable": False}, {"status": "failed"}, {"status": "finished"}, [1]):
        files.write_json(run / SUMMARY, ended)
        assert not is_open(run)
