"""The base model resolved once (models.resolve) and the one refusal of what a family cannot do."""

import json
import shutil
from pathlib import Path

import pytest

from dreambooth_lab import config as C
from dreambooth_lab import models


@pytest.mark.parametrize("name,family,resolution", [("tiny", "sd1", 64), ("tiny-sdxl", "sdxl", 64),
                                                    ("tiny-sd2v", "sd2", 64), ("sdxl-random", "sdxl", 1024)])
def test_builtin_models_resolve_to_their_family(name, family, resolution):
    base = models.resolve(C.ModelConfig(name=name))
    assert (base.name, base.revision, base.family) == (name, None, family)
    assert C.default_resolution(name) == resolution  # the resolution data.resolution defaults to


def test_a_local_folder_is_resolved_from_its_configs(tmp_path):
    folder = Path(shutil.copytree(models.pretrained_path("tiny"), tmp_path / "copy"))
    assert models.resolve(C.ModelConfig(name=str(folder))).family == "sd1"
    index = json.loads((folder / "model_index.json").read_text())
    xl = Path(shutil.copytree(folder, tmp_path / "renamed"))  # an XL pipeline class makes it SDXL
    (xl / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    v = Path(shutil.copytree(folder, tmp_path / "v"))  # v-prediction makes it SD2
    (v / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sched, "prediction_type": "v_prediction"}))
    assert [models.resolve(C.ModelConfig(name=str(f))).family for f in (xl, v)] == ["sdxl", "sd2"]
    assert C.default_resolution(str(folder)) == 64  # its native size


def test_sdxl_with_a_learned_identifier_is_refused_once():
    cfg = C.with_overrides(C.Config(), {"model.name": "tiny-sdxl", "identifier.learned": True})
    with pytest.raises(C.ConfigError, match=r"identifier.learned is not supported for SDXL models yet \(its tokens "
                                            r"would need both text encoders\): use a rare token"):
        models.check_supported(models.resolve(cfg.model), cfg)
    models.check_supported(models.resolve(C.ModelConfig(name="tiny")), cfg)  # SD1 can learn one
    ok = C.with_overrides(cfg, {"identifier.learned": False})
    models.check_supported(models.resolve(ok.model), ok)


def test_the_registry_knows_each_builtin_model_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys; import dreambooth_lab.builtin as b; import dreambooth_lab.config; "
            "print(list(b.MODELS)); print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["['tiny', 'tiny-sdxl', 'tiny-sd2v', 'sd15-random', 'sdxl-random', 'toyworld']", "[]"]


def test_what_the_registry_says_of_each_model():
    from dreambooth_lab import builtin, colab, prior

    assert colab.CPU_MODELS == builtin.CPU_MODELS == ("tiny", "tiny-sdxl", "tiny-sd2v", "toyworld")
    assert [n for n in builtin.MODELS if builtin.is_toy_world(n)] == ["toyworld"]
    toyworld = models.pretrained_path("toyworld")
    assert not builtin.is_toy_world(toyworld) and not builtin.is_toy_world("stabilityai/sdxl")  # by name only
    assert builtin.get("stable-diffusion-v1-5/stable-diffusion-v1-5") is None
    assert [prior.model_key(n) for n in builtin.TINY_MODELS] == ["tiny-sd1-v1", "tiny-sdxl-v1", "tiny-sd2v-v1"]
    assert prior.model_key("sd15-random") == "sd15-random" and prior.model_key("toyworld").startswith("toyworld-")
    assert [C.default_resolution(n) for n in builtin.MODELS] == [64, 64, 64, 512, 1024, 64]
    assert models.resolve(C.ModelConfig(name="toyworld")) == models.BaseModel("toyworld", None, "sd1")
