"""
Sample new images from a PI-VQ checkpoint by interpolating between the code sets of real images.

No prior and no iteration: two real images' code sets A and B are paired code to code by an
optimal matching on code-vector distance; a new set takes one code of each pair at random, an
interpolation swaps the pairs one by one. Every set so made holds N distinct codes, and each
batch of sets is decoded in one forward pass.

    python sample.py --ckpt out/ckpt.pt [--data DIR] [--n 64] [--out samples] [--seed 0]
    python sample.py --ckpt out/ckpt.pt --interpolate a.png b.png [--steps 8]   (or dataset indices: 0 1)
"""

import argparse
import os

import torch

import pivq


def pair_sets(codebook, a, b):
    """Pair code sets a, b (B, N) for mixing. Returns (a, b') with b' a reordering of b such that
    codes shared by a and b sit opposite themselves, and the rest are paired by an optimal
    matching on squared code-vector distance. Swapping any subset of pairs then never repeats a
    code: what comes in is from b minus a, what stays is from a. (Sets from the nearest
    quantizer may hold repeats; they are paired the same way, as multisets.)"""
    b = b.clone()
    for i in range(len(a)):
        rest = b[i].tolist()
        paired = []
        for code in a[i].tolist():                 # shared codes opposite themselves
            paired.append(code if code in rest else None)
            if code in rest:
                rest.remove(code)
        free = [p for p, code in enumerate(paired) if code is None]
        if free:
            cost = pivq.squared_distances(codebook[a[i][free]][None], codebook[rest])     # (1, f, f)
            for p, j in zip(free, pivq.matching_assign(cost)[0].tolist()):
                paired[p] = rest[j]
        b[i] = torch.tensor(paired)
    return a, b


def mix(a, b, take_b):
    """Sets made of a's codes where take_b is False and the paired b' codes where it is True."""
    return torch.where(take_b, b, a)


def interpolation_sets(codebook, a, b, steps, seed=0):
    """(N,), (N,) -> (steps, N): from set a to set b, swapping differing pairs in a random order."""
    a, b = pair_sets(codebook, a[None], b[None])
    a, b = a[0], b[0]
    diff = (a != b).nonzero().squeeze(1)
    order = diff[torch.randperm(len(diff), generator=torch.Generator().manual_seed(seed))]
    frames = []
    for t in range(steps):
        take = torch.zeros_like(a, dtype=torch.bool)
        take[order[:round(t * len(order) / max(1, steps - 1))]] = True
        frames.append(mix(a, b, take))
    return torch.stack(frames)


@torch.no_grad()
def sample_sets(model, images, generator):
    """Encode 2B real images, pair them up, and take one code of each pair at random: (B, N)."""
    idx = model.encode(images)
    half = len(idx) // 2
    a, b = pair_sets(model.quantizer.codebook, idx[:half], idx[half:2 * half])
    return mix(a, b, torch.rand(a.shape, generator=generator).to(a.device) < 0.5)


@torch.no_grad()
def generate(model, dataset, n, batch_size=64, seed=0, device="cpu"):
    """n novel images (n, 3, H, W) in [-1, 1] from random pairs of real images in `dataset`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while sum(len(o) for o in out) < n:
        m = min(batch_size, n - sum(len(o) for o in out))
        picks = torch.randint(0, len(dataset), (4 * m,), generator=g).tolist()
        imgs = [x for x in (dataset[i] for i in picks) if x is not None][:2 * m]
        if len(imgs) < 2:
            pivq.die("not enough readable images to sample from")
        out.append(model.decode(sample_sets(model, torch.stack(imgs).to(device), g)))
    return torch.cat(out)[:n]


def dataset_for(cfg, data, split_seed=1):
    """The images to sample or evaluate with: --data, else the data the checkpoint was trained
    on. For the built-in faces, a held-out draw (another seed) than the training one."""
    if data:
        return pivq.ImageFolder(data, cfg.image_size)
    if cfg.data:
        if not os.path.isdir(cfg.data):
            pivq.die(f"this checkpoint was trained on {cfg.data}, which is not here: pass --data DIR")
        return pivq.ImageFolder(cfg.data, cfg.image_size)
    return pivq.SyntheticFaces(cfg.image_size, n=10000, seed=split_seed)


def main(argv=None):
    p = argparse.ArgumentParser(description="Interpolation samples from a PI-VQ checkpoint.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by pivq.py (OUT/ckpt.pt)")
    p.add_argument("--data", default="", help="real images to mix (default: the training data)")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--interpolate", nargs=2, metavar=("A", "B"), help="write a strip from image A to B (files, or indices into the data)")
    p.add_argument("--steps", type=int, default=8, help="frames of the interpolation strip")
    args = p.parse_args(argv)
    if args.n < 1 or args.steps < 2:
        p.error("--n must be at least 1 and --steps at least 2")
    device = pivq.pick_device(args.device)
    model, cfg = pivq.load(args.ckpt, device)
    os.makedirs(args.out, exist_ok=True)
    from torchvision.utils import save_image

    if args.interpolate:
        imgs = []
        for path in args.interpolate:
            if path.isdigit() and not os.path.exists(path):  # an index into the dataset
                imgs.append(dataset_for(cfg, args.data)[int(path)])
                continue
            try:
                imgs.append(pivq.load_image(path, cfg.image_size))
            except Exception as e:
                pivq.die(f"cannot read image {path} ({e})")
        a, b = model.encode(torch.stack(imgs).to(device))
        frames = model.decode(interpolation_sets(model.quantizer.codebook, a, b, args.steps, args.seed))
        path = os.path.join(args.out, "interpolation.png")
        save_image(frames * 0.5 + 0.5, path, nrow=args.steps)
        print(f"wrote {path} ({args.steps} frames)")
        return
    images = generate(model, dataset_for(cfg, args.data), args.n, seed=args.seed, device=device)
    for i, img in enumerate(images):
        save_image(img * 0.5 + 0.5, os.path.join(args.out, f"{i:05d}.png"))
    save_image(images[:64] * 0.5 + 0.5, os.path.join(args.out, "grid.png"), nrow=8)
    print(f"wrote {len(images)} samples and grid.png to {args.out}")


if __name__ == "__main__":
    main()
