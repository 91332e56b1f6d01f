"""`python -m dreambooth_lab train|sample|compare|tokens|sweep|compare-runs|sheet|evaluate|export|info|demo` —
argument parsing only."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from . import config as config_mod


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise config_mod.ConfigError(f"--set {pair!r}: write it as section.key=value, e.g. train.steps=800")
        key, value = pair.split("=", 1)
        out[key.strip()] = config_mod.parse_override(key.strip(), value)
    return out


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line, `warning: …`, like the CLI's errors (no source line of our code)."""
    print(f"warning: {message}", file=file or sys.stderr)


# Options that fill a config field: a ConfigError about the field names the option the user typed.
SAMPLE_OPTIONS = {"seeds": "--seeds", "lora_scale_unet": "--scale-unet",
                  "lora_scale_text_encoder": "--scale-text-encoder",
                  "lora_scale_text_encoder_2": "--scale-text-encoder-2", "guidance": "--guidance", "steps": "--steps"}


def _name_options(exc: config_mod.ConfigError, given: dict[str, str]) -> config_mod.ConfigError:
    """'sample.steps=0: use ...' -> '--steps 0 (sample.steps): use ...' for the options in `given`
    (field -> option)."""
    import re

    def rename(m: re.Match) -> str:
        field, index, value = m.group(1), m.group(2) or "", m.group(3)
        return f"{given[field]} {value} (sample.{field}{index}):" if field in given else m.group(0)

    return config_mod.ConfigError(re.sub(r"sample\.(\w+)(\[\d+\])?=([^:\n]*):", rename, str(exc)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dreambooth_lab", description="DreamBooth LoRA workbench")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a LoRA; writes runs/<name>-<timestamp>/")
    t.add_argument("--config", help="YAML config (missing keys take the defaults)")
    t.add_argument("--model", help="hub id, local diffusers folder, 'tiny', 'tiny-sdxl', 'tiny-sd2v' or 'toyworld' (offline)")
    t.add_argument("--data", help="folder of instance photos")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.steps=800")
    t.add_argument("--new-run", action="store_true", help="do not resume an unfinished run of the same config")
    t.add_argument("--resume", metavar="RUN_FOLDER", help="resume this run folder (default: the newest unfinished "
                   "run of the same config and photos)")
    t.add_argument("--allow-change", action="store_true", help="with --resume: continue the run even though its "
                   "config or photos differ (recorded in summary.json)")
    t.add_argument("--profile", action="store_true", help="write profile.json: seconds per phase of a step")

    s = sub.add_parser("sample", help="seed grid and test prompts of a run")
    s.add_argument("run_dir")
    s.add_argument("--seeds", type=int, nargs="+")
    s.add_argument("--prompt", help='base prompt template, e.g. "A {token} {class} on the beach"')
    s.add_argument("--scale-unet", type=float)
    s.add_argument("--scale-text-encoder", type=float)
    s.add_argument("--scale-text-encoder-2", type=float,
                   help="SDXL's second text encoder (default: the --scale-text-encoder value)")
    s.add_argument("--guidance", type=float)
    s.add_argument("--steps", type=int)

    c = sub.add_parser("compare", help="dataset-versus-generation sheet of a run's latest samples")
    c.add_argument("run_dir")
    c.add_argument("--samples", help="samples folder (default: the latest)")

    k = sub.add_parser("tokens", help="rare-token tools on the model's own tokenizer")
    k.add_argument("--model", default="tiny",
                   help="whose tokenizer/text encoder ('tiny' has SD1.x's CLIP vocabulary; a hub id for neighbours)")
    ksub = k.add_subparsers(dest="tokens_command", required=True)
    ka = ksub.add_parser("analyze", help="pieces, merge rank, English frequency and warnings per token")
    ka.add_argument("tokens", nargs="+")
    ka.add_argument("--class", dest="class_name", default="dog")
    ks = ksub.add_parser("suggest", help="rare single-token identifiers, reproducible under a seed")
    ks.add_argument("-n", type=int, default=10)
    ks.add_argument("--max-chars", type=int, default=3)
    ks.add_argument("--seed", type=int, default=0)
    kn = ksub.add_parser("neighbours", help="nearest vocabulary entries by input embedding")
    kn.add_argument("tokens", nargs="+")
    kn.add_argument("-k", type=int, default=10)

    w = sub.add_parser("sweep", help="run every not-yet-finished run of a sweep spec; writes the registry")
    w.add_argument("spec", help="sweep YAML, e.g. configs/study/tokens.yaml")
    w.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run, e.g. --set train.steps=400 --set data.instance_dir=/photos "
                   "(relative paths are from the project root)")
    w.add_argument("--only", metavar="RUN[,RUN...]", help="run only these runs of the spec, e.g. --only exp2,exp8")
    w.add_argument("--dry-run", action="store_true", help="per run: token, text encoder, steps, lr, dataset folder "
                   "(exists? photos) and status; trains nothing")
    w.add_argument("--replicates", type=int, metavar="N", help="train each run N times with different training "
                   "seeds, as runs RUN-r0 ... RUN-r{N-1} (default: the spec's `replicates`, else 1)")
    w.add_argument("--launcher", choices=["local", "ray"], default="local", help="local: the runs one after another "
                   "in this process (default); ray: each run a Ray task in its own worker, on this machine's GPUs or a "
                   "Ray cluster (pip install 'dreambooth_lab[cluster]')")
    w.add_argument("--address", help="with --launcher ray: the cluster to join (auto: the one `ray start` made on this "
                   "machine; ray://HOST:10001 a remote one); default: a local Ray on this machine")
    w.add_argument("--gpus-per-run", type=float, metavar="N", help="with --launcher ray: GPUs each run reserves "
                   "(default 1 when the cluster has GPUs, else 0; 0.5 puts two runs on a GPU)")
    w.add_argument("--cpus-per-run", type=float, metavar="N", help="with --launcher ray: CPUs each run reserves "
                   "(default 1; on a CPU also its torch threads)")
    w.add_argument("--max-retries", type=int, metavar="N", help="with --launcher ray: how often a run whose worker "
                   "died (killed, out of memory, node lost) is started again, resuming (default 2)")

    r = sub.add_parser("compare-runs", help="do two settings differ? the difference of a metric across replicates, "
                       "its 95%% interval and a verdict")
    r.add_argument("registry", help="a sweep folder, its registry.jsonl or registry.csv")
    r.add_argument("--metric", required=True, help="e.g. judge_subject_fidelity, dino, clip_t, final_loss")
    r.add_argument("--a", help="a group: a run id without its -rK (see the table without --a/--b)")
    r.add_argument("--b", help="the group to compare it with")
    r.add_argument("--by", default="group", help="group runs by this registry column instead (e.g. lr_unet)")

    h = sub.add_parser("sheet", help="comparison sheets: runs x prompts, or one run's parameter grid")
    hsub = h.add_subparsers(dest="sheet_command", required=True)
    hr = hsub.add_parser("runs", help="rows: runs; columns: base prompt x seeds, then the test prompts")
    hr.add_argument("run_dirs", nargs="+")
    hr.add_argument("--out", default="runs/sheets")
    hr.add_argument("--seeds", type=int, nargs="+", help="the same seeds in every row (default: the first run's)")
    hr.add_argument("--own-seeds", action="store_true", help="each run with its own sample.seeds (as the study did)")
    hg = hsub.add_parser("grid", help="one run, one seed: e.g. --rows lora_scale_unet=0.2,0.6,1 --cols guidance=3,6,9")
    hg.add_argument("run_dir")
    hg.add_argument("--rows", default="lora_scale_unet=0.2,0.4,0.6,0.8,1.0")
    hg.add_argument("--cols", default="guidance=3,4.5,6,7.5,9")
    hg.add_argument("--seed", type=int)
    hg.add_argument("--prompt")
    hs = hsub.add_parser("steps", help="one run's saved steps x its seeds (train.save_lora_every)")
    hs.add_argument("run_dir")
    hs.add_argument("--out", help="PNG path (default: RUN/steps/steps_x_seeds.png)")
    hx = hsub.add_parser("axis", help="a metric against one setting: each run a dot, the mean with its 95%% interval")
    hx.add_argument("registry", help="a sweep folder, its registry.jsonl or registry.csv")
    hx.add_argument("--axis", required=True, help="a registry column, e.g. lr_unet, token, steps")
    hx.add_argument("--metric", required=True, help="e.g. judge_subject_fidelity, dino, final_loss")
    hx.add_argument("--out", help="PNG path (default: <sweep folder>/axis_<axis>_<metric>.png)")

    v = sub.add_parser("evaluate", help="DINO, CLIP-I, CLIP-T, memorisation and drift; writes RUN/metrics.json")
    v.add_argument("run_dirs", nargs="+")
    v.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE",
                   help="e.g. eval.prompt_set=dreambench eval.images_per_prompt=4 eval.dino_model=tiny")

    x = sub.add_parser("export", help="the run's LoRA for AUTOMATIC1111/ComfyUI (kohya), or fused into a pipeline")
    x.add_argument("run_dir")
    x.add_argument("--format", choices=["kohya", "fused"], default="kohya")
    x.add_argument("--out", help="file (kohya) or folder (fused); default under RUN/export/")
    x.add_argument("--step", type=int, help="kohya: the LoRA the run saved at this step (train.save_lora_every)")
    x.add_argument("--scale-unet", type=float, help="fused: UNet LoRA scale (default: the run's)")
    x.add_argument("--scale-text-encoder", type=float, help="fused: text-encoder LoRA scale (default: the run's)")

    i = sub.add_parser("info", help="metadata of a LoRA file (or of a run folder's)")
    i.add_argument("file", help="a LoRA .safetensors file or a run folder")

    d = sub.add_parser("demo", help="train, sample and compare: the toy world's 5-photo dog on its offline base model")
    d.add_argument("--model", default=config_mod.TOYWORLD, help="'toyworld' (the default: a learned offline model, CPU), 'tiny' "
                   "(random weights, the sample subject: code paths only) or a hub id for a GPU box")
    d.add_argument("--output-dir", default="runs")
    d.add_argument("--steps", type=int)
    return p


def run_tokens(args) -> str:
    from . import tokens
    from .models import load_tokenizer

    tok = load_tokenizer(args.model)
    if args.tokens_command == "analyze":
        return tokens.format_table(tokens.analyze(args.tokens, tok, class_name=args.class_name))
    if args.tokens_command == "suggest":
        return tokens.format_suggestions(tokens.suggest(tok, args.n, max_chars=args.max_chars, seed=args.seed))
    if not 1 <= args.k < len(tok):  # before the text encoder loads (a hub model's takes a while)
        raise ValueError(tokens.neighbours_k_problem(args.k, len(tok) - 3))
    from .models import load_text_encoder

    encoder = load_text_encoder(args.model)
    lines = [tokens.format_neighbours(t, tokens.neighbours(t, encoder, tok, args.k)) for t in args.tokens]
    lines.append(tokens.NEIGHBOURS_HELP)
    if args.model == config_mod.TINY_MODEL:
        lines.append(tokens.RANDOM_WEIGHTS_NOTE)
    return "\n".join(lines)


def _axis(text: str) -> tuple[str, list]:
    name, _, values = text.partition("=")
    if not values:
        raise ValueError(f"{text!r}: write an axis as name=v1,v2,... e.g. guidance=3,6,9")
    name = name.strip()  # each value as `--set sample.<name>=` reads it; parameter_grid checks them
    return name, [config_mod.parse_override(f"sample.{name}", v) for v in values.split(",")]


def run_sweep_command(args) -> str:
    from .experiments import format_plan, format_registry, load_sweep, run_sweep, select_runs, sweep_plan

    sweep = select_runs(load_sweep(args.spec, _overrides(args.set), replicates=args.replicates), args.only)
    if args.dry_run:
        return format_plan(sweep, sweep_plan(sweep))
    given = {"address": args.address, "gpus_per_run": args.gpus_per_run, "cpus_per_run": args.cpus_per_run,
             "max_retries": args.max_retries}
    ray_options = {k: v for k, v in given.items() if v is not None}
    if ray_options and args.launcher != "ray":
        raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in ray_options)}: options of the Ray launcher; "
                         "add --launcher ray")
    rows = run_sweep(sweep, launcher=args.launcher, **ray_options)
    return f"{format_registry(rows)}\nregistry: {sweep.folder / 'registry.csv'}"


def run_compare_runs_command(args) -> str:
    from . import stats
    from .experiments import load_registry

    rows = load_registry(args.registry)
    if (args.a is None) != (args.b is None):
        raise ValueError("compare-runs: give both --a GROUP and --b GROUP (or neither, for the table of groups)")
    by = [c.strip() for c in args.by.split(",")] if "," in args.by else args.by
    if args.a is None:
        return stats.format_summary(stats.summarise(rows, by=by, metrics=[args.metric]))
    result = stats.compare(rows, args.a, args.b, args.metric, by=by)
    summary = stats.summarise(rows, by=by, metrics=[args.metric])
    table = [s for g in dict.fromkeys((result["group_a"], result["group_b"])) for s in summary if s["group"] == g]
    return f"{stats.format_summary(table)}\n{result['sentence']}"


def run_sheet_command(args) -> Path:
    if args.sheet_command == "axis":
        from .experiments import axis_sheet

        return axis_sheet(args.registry, args.axis, args.metric, args.out)
    from .compare import parameter_grid, runs_by_prompts
    from .steps import steps_sheet

    if args.sheet_command == "steps":
        return steps_sheet(args.run_dir, args.out)
    if args.sheet_command == "runs":
        if args.own_seeds and args.seeds:
            raise ValueError("--own-seeds and --seeds exclude each other: pick one")
        return runs_by_prompts(args.run_dirs, args.out, seeds="own" if args.own_seeds else args.seeds)
    return parameter_grid(args.run_dir, rows=_axis(args.rows), cols=_axis(args.cols), seed=args.seed,
                          prompt=args.prompt)


def run_evaluate_command(args) -> str:
    from .evaluate import evaluate_run, written_files
    from .experiments import format_registry, metrics_note, scan_runs, write_registry
    from .metrics import Embedder, random_metric_models
    from .report import load_run_config

    lines, embedder, random_models = [], None, set()
    for run_dir in map(Path, args.run_dirs):
        ev = config_mod.with_overrides(load_run_config(run_dir), _overrides(args.set)).validate().eval
        embedder = embedder or Embedder(ev.dino_model, ev.clip_model, batch_size=ev.batch_size)
        result = evaluate_run(run_dir, ev, embedder=embedder)
        random_models.update(random_metric_models(result.settings))
        lines.append(f"{run_dir}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in result.summary.items()))
        lines += ["  " + w for w in written_files(run_dir, result)]
        if (run_dir.parent / "registry.jsonl").is_file():  # a sweep folder: refresh its registry
            write_registry(run_dir.parent)
            lines.append(f"  registry:     {run_dir.parent / 'registry.csv'} (and registry.jsonl)")
    cols = ("id", "metric_dino", "metric_clip_i", "metric_clip_t", "metric_memorised", "metric_drift", "metric_models")
    rows = [r for r in scan_runs(Path(args.run_dirs[0]).parent) if "metric_dino" in r]
    note = metrics_note(rows, random_models)
    return "\n".join(lines + ["", format_registry(rows, cols)] + ([note] if note else []))


def disk_full_line(exc: OSError) -> str:
    """A full-disk error as one line: DiskFull says it all; a raw ENOSPC from a library is named
    by its file's folder (or the working folder)."""
    from . import files

    if isinstance(exc, files.DiskFull):
        return str(exc)
    return str(files.as_disk_full(exc, Path(exc.filename).parent if exc.filename else Path.cwd()))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # restores the caller's warning display afterwards
        warnings.showwarning = _show_warning
        return _run(args)


def _run(args) -> int:
    try:
        if args.command == "train":
            cfg = config_mod.load(args.config) if args.config else config_mod.Config()
            extra = _overrides(args.set)
            if args.model:
                extra["model.name"] = args.model
            if args.data:
                extra["data.instance_dir"] = args.data
            cfg = config_mod.with_overrides(cfg, extra)
            # Config and photo-folder errors in a second, before torch and diffusers are imported.
            cfg.resolved().validate()
            from .data import find_images

            find_images(cfg.data.instance_dir)
            from .train import train

            resume = args.resume or (None if args.new_run else "auto")
            result = train(cfg, resume=resume, allow_change=args.allow_change, profile=args.profile)
            print(f"run folder: {result.run_dir}\nLoRA:       {result.lora_path}")
        elif args.command == "sample":
            from .report import sample_run

            given = {f: opt for f, opt in SAMPLE_OPTIONS.items() if getattr(args, opt[2:].replace("-", "_")) is not None}
            try:
                out = sample_run(args.run_dir, seeds=args.seeds, prompt=args.prompt, lora_scale_unet=args.scale_unet,
                                 lora_scale_text_encoder=args.scale_text_encoder,
                                 lora_scale_text_encoder_2=args.scale_text_encoder_2, guidance=args.guidance,
                                 steps=args.steps)
            except config_mod.ConfigError as exc:
                raise _name_options(exc, given) from exc
            print(f"images:       {out.folder}\nseed grid:    {out.seed_grid}\nprompt suite: {out.prompt_suite}")
        elif args.command == "compare":
            from .report import compare_run

            print(f"comparison sheet: {compare_run(args.run_dir, args.samples)}")
        elif args.command == "tokens":
            print(run_tokens(args))
        elif args.command == "sweep":
            print(run_sweep_command(args))
        elif args.command == "compare-runs":
            print(run_compare_runs_command(args))
        elif args.command == "sheet":
            print(f"sheet: {run_sheet_command(args)}")
        elif args.command == "evaluate":
            print(run_evaluate_command(args))
        elif args.command == "export":
            from .export import export_fused, export_kohya

            if args.format == "kohya":
                print(f"kohya LoRA: {export_kohya(args.run_dir, args.out, step=args.step)}")
            elif args.step is not None:
                raise ValueError(f"--step {args.step} works with --format kohya; a fused export uses the final LoRA")
            else:
                given = {f: opt for f, opt in SAMPLE_OPTIONS.items() if f.startswith("lora_scale")
                         and getattr(args, opt[2:].replace("-", "_"), None) is not None}
                try:
                    path = export_fused(args.run_dir, args.scale_unet, args.scale_text_encoder, args.out)
                except config_mod.ConfigError as exc:
                    raise _name_options(exc, given) from exc
                print(f"fused pipeline: {path}")
        elif args.command == "info":
            from .export import format_info

            print(format_info(args.file))
        elif args.command == "demo":
            from .demo import run_demo

            r = run_demo(model=args.model, output_dir=args.output_dir, steps=args.steps)
            print("\n".join([
                f"run folder:   {r.run.run_dir}",
                f"LoRA:         {r.run.lora_path}",
                f"loss curve:   {Path(r.run.run_dir) / 'loss.png'}",
                f"seed grid:    {r.seed_grid}",
                f"test prompts: {r.prompt_suite}",
                f"comparison:   {r.compare}",
                f"instance loss on fixed noise: {r.run.eval_loss_before:.4f} -> {r.run.eval_loss_after:.4f}"
                if r.run.eval_loss_before is not None else
                "instance loss on fixed noise: not measured (a short run: train.eval_loss=auto skips it)",
            ]))
    except (config_mod.ConfigError, FileNotFoundError, FileExistsError, PermissionError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or quota, wherever it happened: one line naming the folder
        from . import files

        if not files.is_disk_full(exc):
            raise
        print(f"error: {disk_full_line(exc)}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # a run that is locked, stopped (NaN) or has unusable checkpoints: one line
        if type(exc).__module__.startswith("dreambooth_lab."):
            print(f"error: {getattr(exc, 'cli_message', None) or exc}", file=sys.stderr)  # the CLI's own words
            return 1
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C: say how to go on, not a traceback
        print(str(exc) or "interrupted", file=sys.stderr)
        return 130
    return 0
