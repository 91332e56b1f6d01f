"""The interactive generation panel (ipywidgets): prompt, LoRA scales, guidance, steps, seed.

It reuses the pipeline it is given (no reload per click) and saves every image with its sidecar
in ``<run>/samples/panel-<timestamp>/``. ``generate()`` is the button's callback and can be
called directly, which is how the tests press the button headless.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from . import files
from .config import Config
from .runs import LORA_FILE, SAMPLES
from .sample import ImageSpec, generate, save_with_sidecars


class GenerationPanel:
    def __init__(self, pipe, cfg: Config, run_dir: str | Path | None = None):
        import ipywidgets as W

        self.pipe, self.cfg = pipe, cfg
        self.run_dir = Path(run_dir) if run_dir else None
        self.folder: Path | None = None  # made on the first click
        self.clicks = 0
        s = cfg.sample
        slider = dict(continuous_update=False, style={"description_width": "150px"},
                      layout=W.Layout(width="480px"))
        self.prompt = W.Textarea(value=cfg.fill(s.prompt), description="prompt", layout=W.Layout(width="640px"))
        self.negative = W.Text(value=s.negative_prompt, description="negative", layout=W.Layout(width="640px"))
        self.scale_unet = W.FloatSlider(value=s.lora_scale_unet, min=0, max=1.5, step=0.05,
                                        description="LoRA scale (UNet)", **slider)
        self.scale_te = W.FloatSlider(value=s.lora_scale_text_encoder, min=0, max=1.5, step=0.05,
                                      description="LoRA scale (text enc.)", **slider)
        # SDXL's second text encoder has its own LoRA scale (the family comes from the pipeline)
        self.scale_te2 = None
        if getattr(pipe, "text_encoder_2", None) is not None:
            te2 = s.lora_scale_text_encoder_2
            self.scale_te2 = W.FloatSlider(value=s.lora_scale_text_encoder if te2 is None else te2, min=0, max=1.5,
                                           step=0.05, description="LoRA scale (text enc. 2)", **slider)
        self.guidance = W.FloatSlider(value=s.guidance, min=1, max=15, step=0.1, description="guidance", **slider)
        self.steps = W.IntSlider(value=s.steps, min=1, max=100, description="steps", **slider)
        self.count = W.IntSlider(value=1, min=1, max=8, description="images", **slider)
        self.seed = W.IntText(value=s.seeds[0], description="seed")
        self.random_seed = W.Checkbox(value=False, description="random")
        self.button = W.Button(description="Generate", button_style="primary", icon="play")
        self.status = W.HTML()
        self.output = W.Output()
        self.button.on_click(self.generate)
        scales = [self.scale_unet, self.scale_te] + ([self.scale_te2] if self.scale_te2 is not None else [])
        self.widget = W.VBox([self.prompt, self.negative, *scales, self.guidance,
                              self.steps, self.count, W.HBox([self.seed, self.random_seed, self.button]),
                              self.status, self.output])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    def specs(self) -> list[ImageSpec]:
        """What one click makes, from the widgets' current values."""
        if self.random_seed.value:
            self.seed.value = secrets.randbits(63)
        lora = str((self.run_dir / LORA_FILE).resolve()) if self.run_dir else None
        return [ImageSpec(prompt=self.prompt.value, seed=int(self.seed.value) + i, negative_prompt=self.negative.value,
                          guidance=float(self.guidance.value), steps=int(self.steps.value),
                          sampler=self.cfg.sample.sampler, width=self.cfg.resolution, height=self.cfg.resolution,
                          lora_scale_unet=float(self.scale_unet.value),
                          lora_scale_text_encoder=float(self.scale_te.value),
                          lora_scale_text_encoder_2=None if self.scale_te2 is None else float(self.scale_te2.value),
                          model=self.cfg.model.name,
                          lora=lora, run=str(self.run_dir.resolve()) if self.run_dir else None)
                for i in range(int(self.count.value))]

    def generate(self, _button=None) -> list[Path]:
        """The Generate button: make the images, save them with sidecars, show them."""
        from IPython.display import Image, display

        specs = self.specs()
        self.button.disabled = True
        self.status.value = f"generating {len(specs)} image(s)..."
        try:
            images = generate(self.pipe, specs, batch_size=self.cfg.sample.batch_size, progress=False)
            if self.folder is None:
                base = (self.run_dir / SAMPLES) if self.run_dir else Path(self.cfg.train.output_dir) / "panel"
                self.folder = files.new_dir(base, "panel")
            self.clicks += 1
            paths = save_with_sidecars(images, specs, self.folder, f"click{self.clicks:03d}")
        finally:
            self.button.disabled = False
        self.status.value = f"saved {len(paths)} image(s) in {self.folder}"
        with self.output:
            self.output.clear_output(wait=True)
            for p in paths:
                display(Image(filename=str(p)))
        return paths
