"""What a world VAE keeps: the judge on pictures round-tripped through the toyworld model's 8x VAE and
through the VAE folder given, same scenes and seeds (subject recall, near misses rejected, class, the
cap, the subjects' photos of draw 3).

    python benchmarks/world_vae.py dreambooth_lab/world/weights/stages/vae4x
"""
import sys, json, torch
torch.set_num_threads(1)
ROOT = __import__('pathlib').Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffusers import AutoencoderKL
from dreambooth_lab.world.judge import accuracy, near_miss_rates, load_judge, read_images, to_batch
from dreambooth_lab.world.subjects import subject_photos
from PIL import Image
import numpy as np
out = {}
for name, path in (("8x (the toyworld model)", str(ROOT / "dreambooth_lab/world/weights/toyworld/vae")), ("given", sys.argv[1])):
    vae = AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        nm = near_miss_rates(n=100, seed=777, vae=vae)
        acc = accuracy(n=1000, seed=12345, vae=vae, through_vae=1.0)
        ceil = {}
        for s in ("dog", "backpack"):
            x = to_batch(subject_photos(s, 5, 3))
            r = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            ims = [Image.fromarray(((a.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)) for a in r]
            ceil[s] = float(np.mean([row[f"subject_{s}"] for row in read_images(ims)]))
    out[name] = {"near_miss_rejected": nm, "subject_recall": {k: v for k, v in acc.items() if "subject" in k},
                 "class": acc["class"], "http_recall": acc.get("http_recall"), "vae_ceiling_draw3": ceil}
    print(name, json.dumps(out[name], indent=1), flush=True)
print(json.dumps(out))
