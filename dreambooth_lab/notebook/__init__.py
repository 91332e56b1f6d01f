"""What the notebooks' cells call, as `from dreambooth_lab import notebook as nb`; one module per job.

The notebooks stay thin: a cell sets a few values or calls one function from here and shows what
it returned. `runtime` sets up the machine (Colab, Drive, the install, the hub token, the GPU, the
smoke switch and where results go); `photos` checks and adds the training photos; `form` builds a
run's config from the form and a preset (`configure`, the one way); `display` shows pictures, the
live loss and a config's summary; `training` is the train and export cells; `sweeps` loads,
checks, evaluates and tabulates a study. ``DREAMBOOTH_LAB_SMOKE=1`` turns any notebook into a
seconds-long run on the tiny model (the test suite sets it); the defaults a user sees in the form
stay the real ones. Smoke mode shrinks steps and sizes only: it never swaps in other photos, so a
missing photo folder stops a notebook at its dataset cell in smoke mode too. Importing the package
loads the standard library and the config only: the set-up cell imports it before the install.
"""

from __future__ import annotations

from .display import LiveLoss, format_sources, leaves, memory_note, show, show_dataset, summary
from .form import (ALWAYS_FORM, BASE_MODELS, FORM_DEFAULTS, FORM_FIELDS, FORM_SWITCHES, GRADIENT_CHECKPOINTING_CHOICES,
                   MACHINE_FIELDS, MACHINE_KEYS, MEMORY_MARGIN, SDXL_BASE, configure, field_overrides, fits,
                   form_overrides, form_wins, machine_overrides, machine_settings, merge_form, preset_choices,
                   preset_keys, preset_path, prompt_list, smoke_overrides)
from .photos import PhotosMissing, add_photos, check_photos, drive_location, photos_message
from .runtime import (COLAB_CHECKOUT, DRIVE, DRIVE_DATASETS, DRIVE_HOME, DRIVE_RUNS, INSTALL_COMMANDS, INSTALL_MARKER,
                      MODEL_CACHE, OUTPUT_ENV, SMOKE_ENV, T4_GIB, NotebookStop, bf16_supported, default_output_dir,
                      device_report, ensure_installed, find_repo_root, hub_login, in_colab, install_key,
                      output_folder, restore_checkout, setup, smoke, this_gpu, versions)
from .sweeps import (eval_settings, evaluate_finished, finished_runs, intervals, load_study, runtime_settings,
                     sweep_results, sweep_status, write_registry)
from .training import export_lora, locked_message, mismatch_message, train_run

__all__ = [
    "ALWAYS_FORM", "BASE_MODELS", "COLAB_CHECKOUT", "DRIVE", "DRIVE_DATASETS", "DRIVE_HOME", "DRIVE_RUNS",
    "FORM_DEFAULTS", "FORM_FIELDS", "FORM_SWITCHES", "GRADIENT_CHECKPOINTING_CHOICES", "INSTALL_COMMANDS",
    "INSTALL_MARKER", "MACHINE_FIELDS", "MACHINE_KEYS", "MEMORY_MARGIN", "MODEL_CACHE", "OUTPUT_ENV", "SDXL_BASE",
    "SMOKE_ENV", "T4_GIB", "LiveLoss", "NotebookStop", "PhotosMissing", "add_photos", "bf16_supported",
    "check_photos", "configure", "default_output_dir", "device_report", "drive_location", "ensure_installed",
    "eval_settings", "evaluate_finished", "export_lora", "field_overrides", "find_repo_root", "finished_runs", "fits",
    "form_overrides", "form_wins", "format_sources", "hub_login", "in_colab", "install_key", "intervals", "leaves",
    "load_study", "locked_message", "machine_overrides", "machine_settings", "memory_note", "merge_form",
    "mismatch_message", "output_folder", "photos_message", "preset_choices", "preset_keys", "preset_path", "prompt_list",
    "restore_checkout", "runtime_settings", "setup", "show", "show_dataset", "smoke", "smoke_overrides", "summary",
    "sweep_results", "sweep_status", "this_gpu", "train_run", "versions", "write_registry",
]
