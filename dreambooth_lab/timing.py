"""Where a run's time goes: the phases of a step (`PhaseTimer`, profile.json) and what train() does
around the steps (`Timeline`, summary.json's `timings`), with their printed forms."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Wall time per phase of a step (with CUDA synchronised at the edges when enabled)."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device, self.seconds = enabled, device, {}

    @contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


class Timeline:
    """Wall-clock seconds of what train() does around the steps, phase by phase (model load,
    family detection, dataset checks, class-image cache, latent caching, the fixed-noise
    evaluation before and after, saving...), with the time to the first step and after the last.
    summary.json records `report()` as `timings` for every run; profile=True prints it."""

    def __init__(self):
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.first_step: float | None = None  # perf_counter when the first step of this call began
        self.last_step: float | None = None  # ... and when its last step ended

    @contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    def report(self) -> dict:
        now = time.perf_counter()
        out = {"phases": {k: round(v, 3) for k, v in self.phases.items()}}
        if self.first_step is not None:
            out["to_first_step"] = round(self.first_step - self.start, 3)
        if self.last_step is not None:
            out["after_last_step"] = round(now - self.last_step, 3)
            if self.first_step is not None:
                out["steps"] = round(self.last_step - self.first_step, 3)
        return out


def format_timings(timings: dict) -> str:
    """The timings of a run as lines: each phase in seconds, then the two totals (pure)."""
    lines = ["start-up and finish (s):"]
    lines += [f"  {name:<18} {sec:8.2f}" for name, sec in timings.get("phases", {}).items()]
    for key in ("to_first_step", "steps", "after_last_step"):
        if key in timings:
            lines.append(f"  {key:<18} {timings[key]:8.2f}")
    return "\n".join(lines)


def profile_report(seconds: dict[str, float], steps: int) -> dict:
    """Seconds per phase in total, per step, and as a share of the profiled time (pure)."""
    total = sum(seconds.values()) or 1.0
    return {"steps": steps, "total_seconds": round(total, 4), "phases": {
        name: {"seconds": round(t, 4), "per_step": round(t / max(steps, 1), 5), "share": round(t / total, 4)}
        for name, t in sorted(seconds.items(), key=lambda kv: -kv[1])}}


def format_profile(report: dict) -> str:
    lines = [f"profile over {report['steps']} steps ({report['total_seconds']:.2f} s):"]
    lines += [f"  {name:<14} {p['per_step'] * 1000:9.1f} ms/step  {p['share'] * 100:5.1f}%"
              for name, p in report["phases"].items()]
    return "\n".join(lines)
