"""Startup: config and path errors come back before torch/diffusers are imported (a second, not a
minute on Colab), and the library noise every command used to print is gone, narrowly.

Start-up and finish of a run (issue #25, start-up): where the time before the first step and after
the last goes (summary.json's `timings`), the fixed-noise evaluation that only runs where it is
cheap (train.eval_loss), caches that fill as the steps need them (the same LoRA bytes as filled up
front), and a token check without the word-frequency table. Timings themselves are measured by
benchmarks/run.py --startup and recorded in BENCHMARKS.md, never asserted here."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, tiny_config
from dreambooth_lab import config as C
from dreambooth_lab import tokens, trainer
from dreambooth_lab import train as train_mod
from dreambooth_lab.models import resolve
from dreambooth_lab.runs import load_result, read_metrics
from dreambooth_lab.train import train

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes")

# Runs the CLI as `python -m dreambooth_lab ...` would, then reports what got imported.
WRAPPER = """
import json, runpy, sys
sys.argv = ["dreambooth_lab"] + json.loads(sys.argv[1])
code = 0
try:
    runpy.run_module("dreambooth_lab", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def _run_cli(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", WRAPPER, json.dumps(args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--set", "train.stepz=1"], "did you mean 'train.steps'"),
    (["--set", "train.name=../../x"], "train.name='../../x' contains a path separator"),
    (["--set", "lora.rank=0"], "lora.rank=0"),
    (["--data", "{tmp}/photo.jpg"], "is a file, not a folder"),
    (["--data", "{tmp}/nowhere"], "does not exist"),
    (["--config", "{tmp}/missing.yaml"], "missing.yaml does not exist"),
], ids=["unknown-key", "name-escapes", "rank-zero", "data-is-a-file", "data-missing", "config-missing"])
def test_train_reports_config_and_path_errors_before_importing_torch(tmp_path, args, message):
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result, err = _run_cli(["train", "--model", "tiny", *args], cwd=tmp_path)
    assert result["code"] == 2 and message in err, err
    assert "Traceback" not in err and "alpha" not in err, err
    assert result["heavy"] == [], f"imported before the error was reported: {result['heavy']}"


def test_config_module_and_cli_import_nothing_heavy():
    code = ("import sys, dreambooth_lab, dreambooth_lab.config, dreambooth_lab.cli\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_irrelevant_library_warnings_are_silenced_and_only_those():
    """The image-processor fallback lines (transformers without torchvision) and bitsandbytes'
    missing-`kernels` line are dropped; other messages on the same loggers still show."""
    code = "\n".join([
        "import importlib.util, logging",
        "import dreambooth_lab",
        "from diffusers import StableDiffusionPipeline  # imports CLIP/Siglip image processors",
        "import transformers",
        "if importlib.util.find_spec('torchvision') is None:  # the fallback that used to warn did run",
        "    print('fallback', transformers.CLIPImageProcessor.__name__)",
        "bnb = logging.getLogger('bitsandbytes.backends.cpu.ops')",
        "bnb.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
        "already `pip install kernels` and the kernels >= 0.11.1', 'No module named kernels')",
        "bnb.warning('another bitsandbytes message')",
        "from transformers.utils import logging as tlog",
        "tlog.get_logger('transformers.utils.import_utils').warning('another transformers message')",
    ])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        assert "fallback CLIPImageProcessorPil" in proc.stdout
    for noise in ("requires torchvision", "CLIPImageProcessor", "SiglipImageProcessor", "gemm_4bit_forward"):
        assert noise not in proc.stderr, proc.stderr
    assert "another bitsandbytes message" in proc.stderr and "another transformers message" in proc.stderr


# ==== a run's start-up and finish (issue #25) ==================================================

SHORT = {"train.steps": 2, "prior.num_class_images": 2, "prior.steps": 2}


def count_evals(monkeypatch) -> list:
    calls = []
    real = trainer.DreamBoothObjective.eval_instance_loss

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(trainer.DreamBoothObjective, "eval_instance_loss", counted)
    return calls


def lora(run) -> dict:
    return load_file(run.lora_path)


# ---- where the time goes ------------------------------------------------------------------------

def test_summary_records_the_phases_and_the_two_totals(tmp_path):
    from dreambooth_lab.timing import format_timings

    result = train(tiny_config(tmp_path, **SHORT), resume=None, progress=False)
    timings = json.loads((result.run_dir / "summary.json").read_text())["timings"]
    assert {"dataset_checks", "model_load", "token_check", "class_images", "latent_cache", "adapters",
            "optimizer", "last_checkpoint", "lora_file", "loss_plot"} <= set(timings["phases"])
    assert all(v >= 0 for v in timings["phases"].values())
    assert timings["to_first_step"] > 0 and timings["after_last_step"] > 0 and timings["steps"] > 0
    # what happens before the first step is counted in it: the phases before it add up to no more
    before = sum(v for k, v in timings["phases"].items() if k not in ("last_checkpoint", "lora_file", "loss_plot"))
    assert before <= timings["to_first_step"] + 1e-3
    assert result.timings == timings and load_result(result.run_dir).timings == timings
    text = format_timings(timings)
    assert "model_load" in text and "to_first_step" in text and "after_last_step" in text



def test_the_loop_loads_the_loss_plots_library_while_the_steps_run(tmp_path, monkeypatch):
    """matplotlib (viz) is imported in the background from the loop's start, not after the last step."""
    asked = []
    monkeypatch.setattr(train_mod, "prefetch_import", lambda name: asked.append(name))
    result = train(tiny_config(tmp_path, **SHORT), resume=None, progress=False)
    assert asked == ["dreambooth_lab.viz"] and (result.run_dir / "loss.png").is_file()


def test_prefetch_import_loads_a_module_in_the_background_and_leaves_failures_to_the_real_import(
        tmp_path, monkeypatch):
    from dreambooth_lab.runtime import prefetch_import

    (tmp_path / "prefetched_ok.py").write_text("import time\ntime.sleep(0.2)\nVALUE = 7\n")
    (tmp_path / "prefetched_bad.py").write_text("raise RuntimeError('broken module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    raised = []
    monkeypatch.setattr("threading.excepthook", lambda args: raised.append(args))
    thread = prefetch_import("prefetched_ok")
    import prefetched_ok  # waits for the thread's import under Python's import lock: one module, loaded once

    assert prefetched_ok.VALUE == 7 and sys.modules["prefetched_ok"] is prefetched_ok
    thread.join(5)
    prefetch_import("prefetched_bad").join(5)
    assert raised == [] and "prefetched_bad" not in sys.modules
    with pytest.raises(RuntimeError, match="broken module"):
        import prefetched_bad  # noqa: F401
    for name in ("prefetched_ok", "prefetched_bad"):
        sys.modules.pop(name, None)

# ---- the fixed-noise evaluation: where it is cheap, or asked for ------------------------------

def test_a_short_run_skips_the_evaluation_and_its_fields_are_null(tmp_path, monkeypatch):
    calls = count_evals(monkeypatch)
    result = train(tiny_config(tmp_path, **SHORT), resume=None, progress=False)
    assert calls == []  # no UNet pass for it, before or after
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["eval_instance_loss_before"] is None and summary["eval_instance_loss_after"] is None
    assert result.eval_loss_before is None and result.eval_loss_after is None
    assert "eval_before" not in summary["timings"]["phases"]
    assert load_result(result.run_dir).eval_loss_before is None


def test_off_skips_it_where_auto_would_measure(tmp_path, monkeypatch):
    calls = count_evals(monkeypatch)
    monkeypatch.setattr(trainer, "EVAL_SHARE", 1e9)  # auto would measure even this short run
    cfg = tiny_config(tmp_path, **{**SHORT, "train.eval_loss": "off"})
    assert trainer.evaluates(C.with_overrides(cfg, {"train.eval_loss": "auto"}), 6)
    result = train(cfg, resume=None, progress=False)
    assert calls == [] and result.eval_loss_before is None


def test_on_measures_before_and_after_and_trains_the_same_bytes(tmp_path, monkeypatch, tiny_pipe):
    from accelerate import Accelerator

    from dreambooth_lab.data import ImageSet

    calls = count_evals(monkeypatch)
    on = train(tiny_config(tmp_path / "on", **{**SHORT, "train.eval_loss": "on"}), resume=None, progress=False)
    assert len(calls) == 2
    assert isinstance(on.eval_loss_before, float) and isinstance(on.eval_loss_after, float)
    assert on.eval_loss_after != on.eval_loss_before
    phases = json.loads((on.run_dir / "summary.json").read_text())["timings"]["phases"]
    assert phases["eval_before"] > 0 and phases["eval_after"] > 0
    # "before" is the base model's loss (LoRA starts at zero), computed the uncached way as ever
    cfg = tiny_config(tmp_path / "x", **{"train.cache_latents": False, "train.cache_text_embeddings": False}).resolved()
    photos = ImageSet.from_folder(cfg.data.instance_dir, cfg.resolution)
    objective = trainer.DreamBoothObjective(cfg, tiny_pipe, photos, None, Accelerator(), base=resolve(cfg.model))
    base = objective.eval_instance_loss()
    assert on.eval_loss_before == pytest.approx(base, rel=1e-6)
    # the evaluation changes no weight
    off = train(tiny_config(tmp_path / "off", **{**SHORT, "train.eval_loss": "off"}), resume=None, progress=False)
    assert on.lora_path.read_bytes() == off.lora_path.read_bytes()


def test_auto_measures_where_it_is_a_small_share_of_the_training():
    study = C.load(REPO / "configs" / "study" / "exp1.yaml")
    assert study.train.eval_loss == "auto" and trainer.evaluates(study, 18)  # 1300 steps, 18 photos
    assert not trainer.evaluates(C.with_overrides(study, {"train.steps": 2}), 18)
    assert not trainer.evaluates(C.with_overrides(study, {"train.steps": 100}), 18)
    assert trainer.evaluates(C.with_overrides(study, {"train.steps": 2, "train.eval_loss": "on"}), 18)
    assert not trainer.evaluates(C.with_overrides(study, {"train.eval_loss": "off"}), 18)


@pytest.mark.parametrize("value", ["yes", "true", "", "ON"])
def test_eval_loss_accepts_auto_on_off_only(value):
    for good in ("auto", "on", "off"):
        C.with_overrides(C.Config(), {"train.eval_loss": good}).validate()
    with pytest.raises(C.ConfigError, match="train.eval_loss=.*: use auto, on or off"):
        C.with_overrides(C.Config(), {"train.eval_loss": value}).validate()


def test_eval_loss_leaves_the_hash_alone():
    cfg = C.Config()
    for value in ("on", "off"):
        assert C.with_overrides(cfg, {"train.eval_loss": value}).hash() == cfg.hash()


def test_demo_prints_the_losses_or_says_they_were_not_measured(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from dreambooth_lab import cli, demo
    from dreambooth_lab.runs import RunResult

    def fake(model, output_dir, steps, before):
        run = RunResult(run_dir=Path(tmp_path), lora_path=Path(tmp_path) / "x", steps=2, final_loss=0.1,
                        eval_loss_before=before, eval_loss_after=None if before is None else 0.5,
                        class_images_generated=0)
        return demo.DemoResult(run, Path("a"), Path("b"), Path("c"))

    for before, said in ((None, "not measured"), (0.75, "0.7500 -> 0.5000")):
        monkeypatch.setattr(demo, "run_demo", lambda model, output_dir, steps, b=before: fake(model, output_dir,
                                                                                              steps, b))
        assert cli.main(["demo", "--output-dir", str(tmp_path)]) == 0
        assert said in capsys.readouterr().out


# ---- caches that fill as the steps need them ----------------------------------------------------

def inspect_first_step(monkeypatch) -> dict:
    """What the objective holds when the first step is about to run."""
    seen = {}
    real = train_mod.run_loop

    def spy(s, on_step, progress):
        o = s.objective
        seen.update(entries=len(o.latent_cache.entries), keys=len(o.latent_cache.keys), text_pending=o._text_pending)
        callbacks = real(s, on_step, progress)
        seen.update(after=len(o.latent_cache.entries))
        return callbacks

    monkeypatch.setattr(train_mod, "run_loop", spy)
    return seen


def test_the_first_step_waits_for_no_photo_and_a_short_run_encodes_only_what_it_draws(tmp_path, monkeypatch):
    seen = inspect_first_step(monkeypatch)
    train(tiny_config(tmp_path, **SHORT), resume=None, progress=False)
    assert seen["entries"] == 0 and seen["text_pending"]  # nothing encoded before the first step
    assert seen["keys"] == 6 + 2  # six photos and two class images could be drawn
    assert 0 < seen["after"] <= 2 * 2  # two steps drew two photos and two class images


@pytest.mark.parametrize("over", [{}, {"data.random_flip": True}, {"data.buckets": True},
                                  {"train.gradient_accumulation_steps": 2, "train.batch_size": 2}],
                         ids=["plain", "flip", "buckets", "batch"])
def test_lazy_caches_train_the_same_lora_bytes_as_filled_up_front(tmp_path, monkeypatch, over):
    cfg = {"train.steps": 4, **over}
    lazy = train(tiny_config(tmp_path / "lazy", **cfg), resume=None, progress=False)
    monkeypatch.setattr(trainer, "encode_lazily", lambda offload_frozen, device: False)  # a GPU with offloading
    seen = inspect_first_step(monkeypatch)
    eager = train(tiny_config(tmp_path / "eager", **cfg), resume=None, progress=False)
    assert seen["entries"] == seen["keys"] and not seen["text_pending"]  # all of them, before the first step
    a, b = lora(lazy), lora(eager)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert lazy.lora_path.read_bytes() == eager.lora_path.read_bytes()
    la = [r["loss"] for r in read_metrics(lazy.run_dir)]
    assert la == [r["loss"] for r in read_metrics(eager.run_dir)]


def test_lazy_entries_equal_the_vae_of_the_photo(tmp_path, tiny_pipe):
    from accelerate import Accelerator

    from dreambooth_lab.data import ImageSet

    cfg = tiny_config(tmp_path, **{"data.random_flip": True}).resolved()
    photos = ImageSet.from_folder(cfg.data.instance_dir, cfg.resolution)
    o = trainer.DreamBoothObjective(cfg, tiny_pipe, photos, None, Accelerator(), base=resolve(cfg.model))
    assert o.latent_cache.entries == {} and o._text_pending
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as inside a mixed-precision step: no effect on the entry
        mean, std = o.latent_cache.get("instance", True, 2)
    dist = tiny_pipe.vae.encode(photos.example(2, center_crop=True, flip=True)[None]).latent_dist
    assert torch.equal(mean, dist.mean[0]) and torch.equal(std, dist.std[0]) and mean.dtype == torch.float32
    assert len(o.latent_cache.entries) == 1


# ---- dataset.png ---------------------------------------------------------------------------------

def test_a_run_on_the_same_photos_copies_the_dataset_sheet_instead_of_drawing_it(tmp_path, monkeypatch):
    import errno

    from dreambooth_lab import dataset_sheet, files, viz

    monkeypatch.setattr(dataset_sheet, "sheet_cache_dir", lambda: tmp_path / "sheets")
    drawn = []
    real = viz.dataset_sheet
    monkeypatch.setattr(viz, "dataset_sheet", lambda *a, **k: (drawn.append(1), real(*a, **k))[1])
    first = train(tiny_config(tmp_path / "a", **SHORT), resume=None, progress=False)
    second = train(tiny_config(tmp_path / "b", **SHORT), resume=None, progress=False)
    assert len(drawn) == 1 and len(list((tmp_path / "sheets").iterdir())) == 1
    assert (second.run_dir / "dataset.png").read_bytes() == (first.run_dir / "dataset.png").read_bytes()
    # another token is another sheet (its parameters are written under the photos)
    third = train(tiny_config(tmp_path / "c", **{**SHORT, "data.token": "oue"}), resume=None, progress=False)
    assert len(drawn) == 2
    assert (third.run_dir / "dataset.png").read_bytes() != (first.run_dir / "dataset.png").read_bytes()
    # a cache that cannot be written costs the run nothing
    real_write = files.atomic_write

    def full_cache(path, write, size=None):
        if (tmp_path / "sheets") in Path(path).parents:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, write, size)

    monkeypatch.setattr(files, "atomic_write", full_cache)
    fourth = train(tiny_config(tmp_path / "d", **{**SHORT, "data.token": "hta"}), resume=None, progress=False)
    assert len(drawn) == 3 and (fourth.run_dir / "dataset.png").stat().st_size > 0


# ---- the token check ----------------------------------------------------------------------------

def test_the_token_check_before_training_reads_no_word_frequencies(monkeypatch, tiny_pipe):
    cfg = C.Config()
    expected = {}
    for token in ("sks", "qzxwvk"):
        cfg.data.token = token
        report = tokens.analyze([token], tiny_pipe.tokenizer, cfg.data.class_name, cfg.data.instance_prompt)[0]
        expected[token] = None if report.single else f"data.token '{token}' {report.warnings[0]}"

    def no_table(word):
        raise AssertionError("the word-frequency table was loaded")

    monkeypatch.setattr(tokens, "word_frequency", no_table)
    for token, message in expected.items():
        cfg.data.token = token
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tokens.warn_about_token(token, tiny_pipe.tokenizer)
        said = [str(w.message) for w in caught if issubclass(w.category, tokens.TokenWarning)]
        assert said == ([] if message is None else [message])
    assert expected["qzxwvk"] is not None  # the split token is warned about, in analyze's words
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens.warn_about_token("qzxwvk", tiny_pipe.tokenizer, learned=True)  # becomes <qzxwvk>: nothing to split
    assert not [w for w in caught if issubclass(w.category, tokens.TokenWarning)]


# ---- imports --------------------------------------------------------------------------------------

def test_importing_the_training_module_loads_no_model_library():
    """`python -m dreambooth_lab train` checks the config and the photos before diffusers,
    transformers, peft, accelerate or matplotlib are imported (they load where they are needed)."""
    code = ("import sys, dreambooth_lab.train, dreambooth_lab.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'diffusers', 'transformers', 'peft', 'accelerate', 'matplotlib', 'wordfreq', 'bitsandbytes'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
