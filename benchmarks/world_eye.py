"""How far the toy world's judge can be trusted on generated pictures: its readings against labels
given by eye.

The judge is trained and checked on rendered scenes; every figure of the world, though, is its
reading of pictures a tuned model generated (decoded through the VAE, with the fine-tune's own
artefacts). Two judges of equal accuracy on rendered scenes read the same generated pictures up to
0.16 apart (BENCHMARKS, build v8 held-out sets), so this measures each judge against people:

    python benchmarks/world_eye.py collect --subject dog --draw 12 --train-seed 23 --token ofi \
        --sample-seeds 400 406 --sheet /tmp/eye-sheet.png
        trains one world recipe run (deterministic, as world_calibrate.py does), samples its binding,
        test, drift and other-class prompts, and saves each picture (64x64 PNG) under
        benchmarks/world_eye/pictures/ with a line in pictures.jsonl. The sheet numbers every picture
        and prints no judge reading, so the labels are given blind.
    python benchmarks/world_eye.py collect --base --sample-seeds 400 412 [--tag v10]
        the base model's own pictures of every class prompt (the base target, by eye); with --tag,
        another build's (DREAMBOOTH_LAB_TOYWORLD=<its folder>), named base-<tag>-s<seed>.
    python benchmarks/world_eye.py reference --subject dog --sheet /tmp/ref.png
        the subject and its single-trait near misses after the VAE: what the eye compares with.
    labels.jsonl (by hand): one line per picture, {"file", "class", "subject", "asked"}; subject and
        asked are true, false or null (cannot be told from the picture, e.g. the marking hidden by a
        shirt); class is the one whole thing drawn, "none" (nothing, or only fragments) or null
        (cannot tell). Through the VAE the eye tells the body colour and the marking's colour, not
        the marking's shape (dots and stripes both decode to a blob): "subject" by eye is the
        subject's body colour with its marking colour on it.
    python benchmarks/world_eye.py score [--judge FOLDER ...]
        each judge's readings of the committed pictures against the labels: agreement per reading
        (subject, asked attribute, class) and per prompt, the rates each would report, and the
        pictures where they part (BENCHMARKS.md "the judge against the eye").
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EYE = ROOT / "benchmarks" / "world_eye"
TILE = 192  # a 64x64 picture shown 3x on the labelling sheet


def picture_roles(subject: str, cls: str) -> dict[str, str]:
    """{role: prompt template} read by eye: the binding, the test prompts the class can take, drift
    ("a <class>") and one other class ("a cat", the one a dog run costs most; "a dog" for a cat)."""
    from dreambooth_lab.world.scene import ANIMATE
    from dreambooth_lab.world.study import CLASS_PROMPT, SUBJECT_PROMPT, TEST_PROMPTS

    roles = {"binding": SUBJECT_PROMPT}
    for t in TEST_PROMPTS:
        if cls in ANIMATE or not ("t-shirts" in t or "driving" in t):
            roles["test:" + t.split("{class} ", 1)[1]] = t
    roles["drift"] = CLASS_PROMPT
    roles["other:" + ("cat" if cls != "cat" else "dog")] = "a " + ("cat" if cls != "cat" else "dog")
    return roles


def slug(role: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in role).strip("-")


def run_name(subject: str, draw: int, train_seed: int, token: str) -> str:
    return f"{subject}-d{draw}-t{train_seed}-{token}"


def labelling_sheet(rows: list[dict], images: list, path: Path) -> Path:
    """Every picture 3x, numbered, one prompt per row; no judge reading anywhere on it."""
    from PIL import Image, ImageDraw

    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    label_w = 260
    sheet = Image.new("RGB", (label_w + TILE * len(seeds), (TILE + 14) * len(prompts)), "white")
    d = ImageDraw.Draw(sheet)
    for n, (r, im) in enumerate(zip(rows, images)):
        i, j = prompts.index(r["prompt"]), seeds.index(r["seed"])
        x, y = label_w + j * TILE, i * (TILE + 14)
        sheet.paste(im.convert("RGB").resize((TILE, TILE), Image.NEAREST), (x, y + 14))
        d.text((x + 4, y + 1), f"#{n}  seed {r['seed']}", fill=(0, 0, 0))
        if j == 0:
            d.text((4, y + TILE // 2), r["prompt"], fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def save_pictures(out: Path, name: str, rows: list[dict], images: list, sheet: Path | None) -> None:
    """The pictures under out/pictures/<name>/ and their lines in pictures.jsonl (never overwritten)."""
    folder = out / "pictures" / name
    folder.mkdir(parents=True, exist_ok=False)
    for r, im in zip(rows, images):
        r["file"] = (folder / f"{slug(r['role'])}-s{r['seed']}.png").relative_to(out).as_posix()
        im.save(out / r["file"], optimize=False)
    with open(out / "pictures.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    if sheet:
        print(f"sheet: {labelling_sheet(rows, images, sheet)} (pictures #0-#{len(rows) - 1} of {name})")
    print(f"{len(rows)} pictures of {name} under {folder}")


def already(out: Path, name: str) -> None:
    manifest = out / "pictures.jsonl"
    if manifest.is_file() and any(json.loads(line)["run"] == name for line in manifest.read_text().splitlines()):
        raise SystemExit(f"error: {manifest} already holds {name}; pictures are never overwritten "
                         "(remove its lines and folder first to collect it again)")


def collect_base(args) -> None:
    """The base model's own pictures of every class prompt (benchmarks/world.py's base_prompts): the
    base target (every class >= 0.8, alone and in each context, outfit, style and car) by eye."""
    from benchmarks.world import base_prompts
    from dreambooth_lab.world.study import load_world_pipeline, sample_prompts

    seeds = list(range(*args.sample_seeds))
    name = f"base-{args.tag + '-' if args.tag else ''}s{seeds[0]}"
    already(args.out, name)
    images = sample_prompts(load_world_pipeline(), base_prompts(), seeds)
    rows, ims = [], []
    for prompt, pics in images.items():
        for seed, im in zip(seeds, pics):
            rows.append({"run": name, "subject": None, "role": "base:" + prompt, "prompt": prompt, "seed": seed,
                         "scale": 0.0})
            ims.append(im)
    save_pictures(args.out, name, rows, ims, args.sheet)


def import_kept(args) -> None:
    """One prompt's pictures from runs kept by `world_calibrate.py --keep-pictures`, for labelling
    (e.g. "a vase" after each dog run of a held-out set)."""
    from PIL import Image

    cls = args.prompt.split()[-1]
    stems = sorted(p.stem for p in args.kept.glob(f"{args.subject}-*.json"))
    if not stems:
        raise SystemExit(f"error: no kept {args.subject} runs in {args.kept} (world_calibrate.py --keep-pictures)")
    for stem in stems:
        ident = json.loads((args.kept / f"{stem}.json").read_text())
        if args.prompt not in ident["prompts"]:
            raise SystemExit(f"error: {args.kept / (stem + '.json')} has no prompt {args.prompt!r}; "
                             f"it has {ident['prompts']}")
        row, name = ident["row"], f"{stem}-{slug(args.prompt)}"
        already(args.out, name)
        arr = np.load(args.kept / f"{stem}.npz")[f"p{ident['prompts'].index(args.prompt)}"]
        seeds = list(range(*args.sample_seeds))
        if len(seeds) != len(arr):
            raise SystemExit(f"error: {stem} kept {len(arr)} pictures per prompt; give their --sample-seeds")
        rows = [{"run": name, "subject": row["subject"], "draw": row["draw"], "train_seed": row["train_seed"],
                 "token": row["token"], "role": f"other:{cls}", "prompt": args.prompt, "seed": seed,
                 "scale": row["scale"]} for seed in seeds]
        save_pictures(args.out, name, rows, [Image.fromarray(a) for a in arr], None)


def collect(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    if args.base:
        collect_base(args)
        return
    from dreambooth_lab.train import train
    from dreambooth_lab.world.study import WORLD_RECIPE_SCALE, load_world_pipeline, sample_prompts, world_recipe_config
    from dreambooth_lab.inference import load_lora

    if args.draw is None or args.train_seed is None or args.token is None:
        raise SystemExit("error: collect needs --draw, --train-seed and --token (or --base for the base model)")
    name = run_name(args.subject, args.draw, args.train_seed, args.token)
    already(args.out, name)
    work = Path(tempfile.mkdtemp(prefix="world-eye-"))
    atexit.register(shutil.rmtree, work, True)
    cfg = world_recipe_config(args.subject, 5, args.token, output_dir=work / "runs", draw=args.draw,
                              seed=args.train_seed, overrides={"prior.cache_dir": str(work / "cache")})
    res = train(cfg, resume=None, progress=False)
    roles = picture_roles(args.subject, cfg.data.class_name)
    fill = lambda t: t.replace("{token}", cfg.prompt_token).replace("{class}", cfg.data.class_name)  # noqa: E731
    said = lambda t: t.replace("{token}", args.token).replace("{class}", cfg.data.class_name)  # noqa: E731
    seeds = list(range(*args.sample_seeds))
    pipe = load_world_pipeline()
    load_lora(pipe, res.run_dir)
    images = sample_prompts(pipe, [fill(t) for t in roles.values()], seeds, scale=WORLD_RECIPE_SCALE)
    rows, ims = [], []
    for role, t in roles.items():
        for seed, im in zip(seeds, images[fill(t)]):
            rows.append({"run": name, "subject": args.subject, "draw": args.draw, "train_seed": args.train_seed,
                         "token": args.token, "role": role, "prompt": said(t), "seed": seed,
                         "scale": WORLD_RECIPE_SCALE})
            ims.append(im)
    save_pictures(args.out, name, rows, ims, args.sheet)


def near_miss_looks(subject: str) -> dict[str, dict]:
    """{row name: Scene changes} for the reference sheet: the subject, then one trait changed at a time."""
    from dreambooth_lab.world.scene import BASE_COLOURS, MARKING_COLOURS, SUBJECTS, _far

    sub = SUBJECTS[subject]
    body = next(c for c in BASE_COLOURS[sub.cls] if _far(c, sub.body))
    colour = next(c for c in MARKING_COLOURS if _far(c, sub.marking_colour))
    marking = "stripes" if sub.marking == "dots" else "dots"  # the shape nearest the subject's
    return {"the subject": {}, f"marking colour {colour}": {"marking_colour": colour},
            f"marking {marking}": {"marking": marking}, f"body {body}": {"body": body}}


def reference(args) -> None:
    """What the subject and its near misses look like after the VAE: the eye's yardstick. Rows: the
    subject and one trait changed at a time; columns: three photos' poses in the forest, then the
    same three in their own contexts."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dataclasses import replace

    import torch
    from PIL import Image, ImageDraw

    from dreambooth_lab.world.draw import render
    from dreambooth_lab.world.judge import round_trip, to_batch, to_images
    from dreambooth_lab.world.scene import SUBJECTS, subject_scene
    from dreambooth_lab.world.study import load_world_pipeline

    torch.set_num_threads(args.threads)
    rows = near_miss_looks(args.subject)
    scenes = [replace(subject_scene(SUBJECTS[args.subject], j, args.draw), **change) for change in rows.values()
              for j in range(6)]
    scenes = [replace(sc, context="forest") if k % 6 < 3 else sc for k, sc in enumerate(scenes)]
    decoded = to_images(round_trip(to_batch([render(sc) for sc in scenes]), load_world_pipeline().vae))
    label_w, T = 200, TILE
    sheet = Image.new("RGB", (label_w + 6 * T, T * len(rows)), "white")
    d = ImageDraw.Draw(sheet)
    for i, name in enumerate(rows):
        d.text((4, i * T + T // 2), name, fill=(0, 0, 0))
        for j in range(6):
            sheet.paste(decoded[i * 6 + j].resize((T, T), Image.NEAREST), (label_w + j * T, i * T))
    args.sheet.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.sheet)
    print(f"reference sheet: {args.sheet}")


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"error: no {path}; collect pictures first (python benchmarks/world_eye.py collect ...)")
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"error: {path} line {i} is not JSON ({e}); fix or remove that line")
    return out


def judge_says(judge_row: dict, picture: dict) -> dict:
    """What a judge's reading of one picture says in the labels' terms."""
    from dreambooth_lab.world.captions import parse_prompt
    from dreambooth_lab.world.study import asked_ok

    from dreambooth_lab.world.scene import SUBJECTS

    asked = asked_ok(judge_row, parse_prompt(picture["prompt"]))
    heads = [f"subject_{picture['subject']}"] if picture["subject"] else [f"subject_{s}" for s in SUBJECTS]
    return {"class": judge_row["class"], "subject": any(bool(judge_row[h]) for h in heads),  # base: any subject
            "asked": None if asked is None else bool(asked)}


def agreement(pairs: list[tuple]) -> dict:
    """pairs of (eye, judge) booleans, eye None left out: how often they agree, and the two errors."""
    known = [(e, j) for e, j in pairs if e is not None]
    pos = [j for e, j in known if e]
    neg = [j for e, j in known if not e]
    return {"n": len(known), "unclear": len(pairs) - len(known),
            "agree": round(float(np.mean([e == j for e, j in known])), 3) if known else None,
            "missed": round(1 - float(np.mean(pos)), 3) if pos else None,  # eye yes, judge no
            "false": round(float(np.mean(neg)), 3) if neg else None}  # eye no, judge yes


def class_agreement(pairs: list[tuple]) -> dict:
    """pairs of (eye, judge) class names, eye None (cannot tell) left out: how often they agree."""
    known = [(e, j) for e, j in pairs if e is not None]
    return {"n": len(known), "unclear": len(pairs) - len(known),
            "agree": round(float(np.mean([e == j for e, j in known])), 3) if known else None}


def role_reading(role: str) -> str:
    """What a picture of this role is read for: the subject (binding, drift), the subject AND the asked
    attribute (test prompts), the class (another class's prompt), the class and the asked attribute
    (the base model's prompts)."""
    return {"test": "both", "other": "class", "base": "class and asked"}.get(role.split(":")[0], "subject")


def role_value(d: dict, picture: dict) -> bool | None:
    """What one picture shows for its role's reading, from eye labels or a judge's (the same terms);
    None: the eye cannot tell."""
    from dreambooth_lab.world.captions import parse_prompt

    reading = role_reading(picture["role"])
    if reading == "class":
        return None if d["class"] is None else d["class"] == picture["role"].split(":", 1)[1]
    if reading == "class and asked":
        asked = parse_prompt(picture["prompt"])
        asks = any(asked[k] for k in ("context", "outfit", "style", "driving"))
        if d["class"] is None or (asks and d["class"] == asked["class"] and d["asked"] is None):
            return None
        return d["class"] == asked["class"] and (not asks or bool(d["asked"]))
    if reading == "both":
        return None if d["subject"] is None or d["asked"] is None else bool(d["subject"] and d["asked"])
    return d["subject"]


def score(args) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from PIL import Image

    from dreambooth_lab.world.judge import JUDGE_DIR, load_judge, read_images

    pictures = read_jsonl(args.out / "pictures.jsonl")
    labels = {r["file"]: r for r in read_jsonl(args.out / "labels.jsonl")}
    unlabelled = [p["file"] for p in pictures if p["file"] not in labels]
    if unlabelled:
        raise SystemExit(f"error: {len(unlabelled)} pictures have no line in {args.out / 'labels.jsonl'}, "
                         f"first {unlabelled[0]}; label them (or score after labelling)")
    images = [Image.open(args.out / p["file"]).convert("RGB") for p in pictures]
    eye = [labels[p["file"]] for p in pictures]
    report = {"pictures": len(pictures), "judges": {}}
    for folder in args.judge or [JUDGE_DIR]:
        said = [judge_says(r, p) for r, p in zip(read_images(images, load_judge(folder)), pictures)]
        per = {"subject": agreement([(e["subject"], s["subject"]) for e, s in zip(eye, said)]),
               "asked": agreement([(e["asked"], s["asked"]) for e, s in zip(eye, said) if s["asked"] is not None]),
               "class": class_agreement([(e["class"], s["class"]) for e, s in zip(eye, said)])}
        roles = {}
        for role in dict.fromkeys(p["role"] for p in pictures):
            pairs = [(role_value(eye[i], p), role_value(said[i], p)) for i, p in enumerate(pictures) if p["role"] == role]
            known = [(e, bool(j)) for e, j in pairs if e is not None]
            roles[role] = {"reading": role_reading(role), "n": len(pairs), "unclear_by_eye": len(pairs) - len(known),
                           "eye": round(float(np.mean([e for e, _ in known])), 3) if known else None,
                           "judge": round(float(np.mean([j for _, j in known])), 3) if known else None}
        parted = [{"file": pictures[i]["file"], "eye": {k: eye[i][k] for k in ("class", "subject", "asked")},
                   "judge": said[i]} for i in range(len(pictures))
                  if (eye[i]["subject"] is not None and eye[i]["subject"] != said[i]["subject"])
                  or (eye[i]["asked"] is not None and said[i]["asked"] is not None and eye[i]["asked"] != said[i]["asked"])]
        key = str(Path(folder).resolve().relative_to(ROOT)) if Path(folder).resolve().is_relative_to(ROOT) else str(folder)
        report["judges"][key] = {"readings": per, "roles": roles, "parted": parted}
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="train one recipe run and save its pictures for labelling")
    c.add_argument("--subject", default="dog")
    c.add_argument("--base", action="store_true", help="the base model's class prompts instead of a tuned run")
    c.add_argument("--tag", default=None, help="with --base: names another base model's pictures (base-<tag>-s<seed>; "
                   "the model is $DREAMBOOTH_LAB_TOYWORLD, e.g. a build's final folder)")
    c.add_argument("--draw", type=int, default=None)
    c.add_argument("--train-seed", type=int, default=None)
    c.add_argument("--token", default=None)
    c.add_argument("--sample-seeds", type=int, nargs=2, default=[400, 406], metavar=("FIRST", "STOP"))
    c.add_argument("--sheet", type=Path, default=None, help="write the numbered labelling sheet here (PNG)")
    c.add_argument("--threads", type=int, default=1)
    k = sub.add_parser("import", help="one prompt's pictures of runs kept by world_calibrate.py --keep-pictures")
    k.add_argument("kept", type=Path, help="the --keep-pictures folder")
    k.add_argument("--subject", default="dog")
    k.add_argument("--prompt", required=True, help='e.g. "a vase"')
    k.add_argument("--sample-seeds", type=int, nargs=2, required=True, metavar=("FIRST", "STOP"))
    r = sub.add_parser("reference", help="the subject and its near misses through the VAE, to label by")
    r.add_argument("--subject", default="dog")
    r.add_argument("--draw", type=int, default=12, help="whose photos' poses the sheet borrows")
    r.add_argument("--sheet", type=Path, required=True)
    r.add_argument("--threads", type=int, default=1)
    s = sub.add_parser("score", help="each judge's readings of the pictures against the labels")
    s.add_argument("--judge", type=Path, action="append", default=None,
                   help="a judge folder (repeatable; default the committed judge)")
    s.add_argument("--json", type=Path, default=None, help="write the report here as well")
    for p in (c, s, k):
        p.add_argument("--out", type=Path, default=EYE, help="pictures, manifest and labels (default benchmarks/world_eye)")
    args = ap.parse_args(argv)
    if args.cmd in ("collect", "reference", "import"):
        {"collect": collect, "reference": reference, "import": import_kept}[args.cmd](args)
        return
    report = score(args)
    text = json.dumps(report, indent=1, sort_keys=True)
    if args.json:
        args.json.write_text(text + "\n")
    for name, r in report["judges"].items():
        print(f"judge {name}: {json.dumps(r['readings'])}")
        for role, v in r["roles"].items():
            print(f"  {role:32s} eye {v['eye']}  judge {v['judge']}  (n {v['n']}, unclear {v['unclear_by_eye']})")
        print(f"  parted on {len(r['parted'])} pictures")


if __name__ == "__main__":
    main()
