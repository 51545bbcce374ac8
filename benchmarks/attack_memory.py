"""Peak memory of the clique filter + verification: streamed from PNG blocks vs in memory, N and 10N.

    python benchmarks/attack_memory.py                       # N = 1,000 generations, 500 training images
    python benchmarks/attack_memory.py --prompts 8 --per-prompt 250 --train 1000
    python benchmarks/attack_memory.py --whole               # evaluate's whole attack (run_attack), 10x generations

Writes N generations (`--prompts` folders of `--per-prompt` PNGs, as evaluate's samples/<prompt>/)
and a training set of PNGs into a temporary folder, then the same with 10x the prompts and 10x
the training images. Each (mode, size) runs in its own subprocess and reports its peak RSS
(VmHWM) and its peak right after the imports, so the attack's own share is the difference:

- streamed (what the attack does): per prompt, find_cliques(PngFiles(...)); then
  verify_extraction(PngFiles(all generations), PngFiles(training set)), both directions.
- in memory (the baseline, what it did before): all PNGs loaded as float tensors, one dense
  tiled-l2 matrix per prompt for the filter, and nearest() both ways for the verification.

--whole: the whole extraction attack as evaluate.py runs it (run_attack: filter, Def. 1 both ways,
adaptive and Gu scores, FID/KID features, replication, the pictures' nearest generations; the
semantic classifier is not included), 10x the generations and prompts but the same training set
and null reference (those are held in memory by design): generations as PngFiles (what
evaluate.py passes now) vs loaded as tensors (what it passed before); random-projection features.

The target (issue 18): the streamed peak at 10N within +-20% of the one at N. Generations are
smooth random images, with one training image copied 15 times in every 4th prompt. The block size
is 256 here (the library's default is 1024) so that at N both sets already fill whole blocks: below
one block, memory is smaller still.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

import torch
import torch.nn.functional as F
from PIL import Image

COPIES = 15


def peak_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child
    would report the parent's peak (the parent held the images it wrote)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: KiB (macOS: bytes)


# Purpose: smooth random images in [0, 1] (bilinear upsampling of 4x4 noise), like generations.
def smooth(n: int, g: torch.Generator) -> torch.Tensor:
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=32, mode="bilinear", align_corners=False)


def save(images: torch.Tensor, folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, img in enumerate((images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()):
        Image.fromarray(img).save(folder / f"{i:06d}.png")


# Purpose: a run folder with prompts x per_prompt generations and a training set, all PNGs.
def make_data(root: Path, prompts: int, per_prompt: int, train: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    x = smooth(train, g)
    save(x, root / "train")
    for p in range(prompts):
        gens = smooth(per_prompt, g)
        if p % 4 == 0:  # a memorized training image: near-copies of it
            copies = (x[p % train][None] + 0.01 * torch.randn(COPIES, 3, 32, 32, generator=g)).clamp(0, 1)
            gens[:COPIES] = copies
        save(gens, root / "samples" / f"prompt_{p:04d}")


def child(mode: str, root: Path, block_size: int) -> dict:
    from ambient.attack.cliques import cliques_from_distances, find_cliques
    from ambient.attack.distances import nearest, tiled_l2
    from ambient.attack.extraction import verify_extraction
    from ambient.attack.streaming import PngFiles

    after_imports = peak_mb()
    folders = sorted((root / "samples").iterdir())
    train_files = sorted((root / "train").glob("*.png"))
    flagged = 0
    with torch.no_grad():
        if mode == "streamed":
            for folder in folders:
                flagged += len(find_cliques(PngFiles(sorted(folder.glob("*.png"))), block_size=block_size))
            gen_files = [f for folder in folders for f in sorted(folder.glob("*.png"))]
            result = verify_extraction(PngFiles(gen_files), PngFiles(train_files), block_size=block_size)
            extracted = int((result.train_nn_distance <= result.delta).sum())
        else:
            load = lambda files: PngFiles(files).block(0, len(files))
            gens = {folder.name: load(sorted(folder.glob("*.png"))) for folder in folders}
            x = load(train_files)
            for images in gens.values():
                flagged += len(cliques_from_distances(tiled_l2(images, images)))
            gen = torch.cat(list(gens.values()))
            nearest(gen, x, k=1, block_size=block_size)
            extracted = int((nearest(x, gen, k=1, block_size=block_size)[0][:, 0] <= 0.15).sum())
    return {"after_imports_mb": after_imports, "peak_mb": peak_mb(), "flagged": flagged, "extracted": extracted,
            "generations": sum(len(list(f.glob("*.png"))) for f in folders), "train": len(train_files)}


def child_whole(mode: str, root: Path) -> dict:
    from omegaconf import OmegaConf

    from ambient.attack.run import TrainingImages, run_attack
    from ambient.attack.streaming import PngFiles

    after_imports = peak_mb()
    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "evaluate.yaml").attack
    cfg.features = "random_projection"
    folders = sorted((root / "samples").iterdir())
    files = {f.name: sorted(f.glob("*.png")) for f in folders}
    if mode == "streamed":
        generations = {name: PngFiles(fs) for name, fs in files.items()}
    else:
        generations = {name: PngFiles(fs).block(0, len(fs)) for name, fs in files.items()}
    train_files = sorted((root / "train").glob("*.png"))
    x = PngFiles(train_files).block(0, len(train_files))
    reference = {"reference": PngFiles(sorted((root / "reference").glob("*.png"))).block(0, 500)}
    with torch.no_grad():
        report, pairs = run_attack(generations, TrainingImages(x, list(range(len(x)))), cfg, "cpu", reference, "unseen")
    return {"after_imports_mb": after_imports, "peak_mb": peak_mb(), "flagged": report["cliques"]["flagged"],
            "extracted": report["extraction"]["extracted"], "generations": report["counts"]["generations"],
            "train": len(x)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4, help="prompts at size N (10x at 10N)")
    ap.add_argument("--per-prompt", type=int, default=250)
    ap.add_argument("--train", type=int, default=500, help="training images at size N (10x at 10N)")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--whole", action="store_true", help="the whole attack (run_attack), 10x generations only")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run = child_whole if args.whole else lambda m, r: child(m, r, args.block_size)
        print(json.dumps(run(args.child[0], Path(args.child[1]))))
        return

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (1, 10):
            root = Path(tmp) / f"x{scale}"
            make_data(root, args.prompts * scale, args.per_prompt, args.train * (1 if args.whole else scale))
            if args.whole:
                save(smooth(500, torch.Generator().manual_seed(99)), root / "reference")
            for mode in ("streamed", "in-memory"):
                out = subprocess.run([sys.executable, __file__, "--child", mode, str(root), "--block-size",
                                      str(args.block_size)] + (["--whole"] if args.whole else []),
                                     capture_output=True, text=True, check=True)
                rows[mode, scale] = json.loads(out.stdout.strip().splitlines()[-1])

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; block size {args.block_size}; "
          f"3x32x32 images; peak RSS per subprocess (VmHWM)")
    print(f"{'mode':<10} {'generations':>11} {'prompts':>7} {'train':>6} {'flagged':>7} {'extracted':>9} "
          f"{'after imports':>13} {'peak':>9} {'attack share':>12}")
    for (mode, scale), r in rows.items():
        print(f"{mode:<10} {r['generations']:>11,} {args.prompts * scale:>7} {r['train']:>6,} {r['flagged']:>7} "
              f"{r['extracted']:>9} {r['after_imports_mb']:>10.0f} MB {r['peak_mb']:>6.0f} MB "
              f"{r['peak_mb'] - r['after_imports_mb']:>9.0f} MB")
    for mode in ("streamed", "in-memory"):
        small, big = rows[mode, 1], rows[mode, 10]
        share = (big["peak_mb"] - big["after_imports_mb"]) / max(small["peak_mb"] - small["after_imports_mb"], 1e-9)
        print(f"{mode:<10} peak 10N / N = {big['peak_mb'] / small['peak_mb']:.2f}  (attack share: {share:.2f}x)")
    ok = abs(rows["streamed", 10]["peak_mb"] / rows["streamed", 1]["peak_mb"] - 1) <= 0.2
    print(f"target: streamed peak at 10N within +-20% of N: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
