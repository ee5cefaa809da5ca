"""
Evaluate a PI-VQ checkpoint: reconstruction, codebook use and capacity, PRDC of samples, and
an attribute probe on bags of codes. Also the quantizer benchmark (--bench).

    python eval.py --ckpt out/ckpt.pt [--data DIR] [--n 1000] [--prdc] [--attributes FILE]
    python eval.py --bench

The last line of stdout is one JSON object with every number computed.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import pivq
from sample import dataset_for, generate


def capacity_bits(perplexity, distinct):
    """log2 C(perplexity, distinct): bits in a set of `distinct` codes drawn from `perplexity`
    equally used ones. Gamma-function binomial, so both may be fractional; 0 if p < d - 1."""
    p, d = perplexity, distinct
    if p - d + 1 <= 0:
        return 0.0
    return (math.lgamma(p + 1) - math.lgamma(d + 1) - math.lgamma(p - d + 1)) / math.log(2)


# --- PRDC ------------------------------------------------------------------------------


def _dists(a, b, b_sq):
    """(n, D), (m, D), |b|^2 (m,) -> (n, m) Euclidean distances, built in place: no (m, D) temporaries."""
    d = a @ b.t()
    return d.mul_(-2).add_(a.pow(2).sum(1, keepdim=True)).add_(b_sq).clamp_min_(0).sqrt_()


def kth_neighbour_distances(x, k, chunk=512):
    """Distance of each row of x to its k-th nearest other row, O(n * chunk) memory."""
    x_sq, out = torch.linalg.vector_norm(x, dim=1).pow_(2), torch.empty(len(x), dtype=x.dtype)
    for s in range(0, len(x), chunk):
        d = _dists(x[s:s + chunk], x, x_sq)
        out[s:s + chunk] = d.topk(k + 1, dim=1, largest=False).values[:, -1]   # +1: itself at 0
    return out


def compute_prdc(real, fake, k=5, chunk=512):
    """Precision, recall, density and coverage (Naeem et al. 2020) of fake against real features.

    With r_i the distance of real i to its k-th nearest real neighbour and s_j that of fake j
    among fakes, and B(x, r) the open ball:
      precision = share of fakes inside some B(real_i, r_i)
      recall    = share of reals inside some B(fake_j, s_j)
      density   = (1 / k) * mean over fakes of the number of balls B(real_i, r_i) holding them
      coverage  = share of reals whose nearest fake lies inside B(real_i, r_i)
    The same numbers as clovaai's `prdc` package, computed in row chunks: memory is
    O((n + m) * chunk), not O(n * m).
    """
    real, fake = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    r, s = kth_neighbour_distances(real, k, chunk), kth_neighbour_distances(fake, k, chunk)
    in_some_real = torch.zeros(len(fake), dtype=torch.bool)
    balls_holding = torch.zeros(len(fake), dtype=torch.float64)
    recalled, covered = torch.zeros(len(real), dtype=torch.bool), torch.zeros(len(real), dtype=torch.bool)
    fake_sq = torch.linalg.vector_norm(fake, dim=1).pow_(2)
    for a in range(0, len(real), chunk):
        d = _dists(real[a:a + chunk], fake, fake_sq)                   # (chunk, m)
        inside = d < r[a:a + chunk, None]                              # fake j in B(real i, r_i)
        in_some_real |= inside.any(0)
        balls_holding += inside.sum(0)
        recalled[a:a + chunk] = (d < s[None, :]).any(1)
        covered[a:a + chunk] = d.min(1).values < r[a:a + chunk]
    return dict(precision=in_some_real.double().mean().item(), recall=recalled.double().mean().item(),
                density=(balls_holding.mean() / k).item(), coverage=covered.double().mean().item())


def feature_extractor(kind, device):
    """images in [-1, 1] -> (B, D) features: VGG16 fc2 (the PRDC paper's), Inception pool, or pixels."""
    if kind == "pixels":
        return lambda x: x.flatten(1)
    import torchvision

    if kind == "vgg16":
        net = torchvision.models.vgg16()
        net.load_state_dict(torch.load(pivq.hub_weights(fallback="use --features pixels"), map_location="cpu",
                                       weights_only=True))
        net.classifier = net.classifier[:-1]            # up to fc2 and its ReLU: 4096-d
        size = 224
    else:
        path = pivq.hub_weights("inception_v3_google-0cc3c7bd.pth", fallback="use --features pixels")
        net = torchvision.models.inception_v3(aux_logits=True, init_weights=False)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        net.fc = torch.nn.Identity()                    # 2048-d pool features
        size = 299
    net = net.eval().to(device)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def features(x):
        x = F.interpolate((x + 1) / 2, size=(size, size), mode="bilinear", align_corners=False)
        return net((x - mean) / std).float()
    return features


# --- attribute probe -------------------------------------------------------------------


def bag_of_codes(idx, K):
    """(n, N) code sets -> (n, K) multi-hot vectors."""
    return torch.zeros(len(idx), K).scatter_(1, idx.cpu(), 1.0)


def logistic_probe(x, y, train_frac=0.8, l2=1e-3):
    """Accuracy of a logistic regression (LBFGS, L2) of binary y on x, on a held-out split,
    and the accuracy of predicting the training majority class on the same split."""
    n = int(len(x) * train_frac)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x[:n] @ w + b, y[:n]) + l2 * w.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        acc = ((x[n:] @ w + b > 0).float() == y[n:]).float().mean().item()
    majority = float(y[:n].mean() >= 0.5)
    return acc, (y[n:] == majority).float().mean().item()


def read_celeba_attributes(path):
    """CelebA's list_attr_celeba.txt: a count, the names, then 'file v1 v2 ...' with -1/1."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
        names = lines[1].split()
        table = {}
        for line in lines[2:]:
            parts = line.split()
            if parts:
                table[parts[0]] = [float(int(v) > 0) for v in parts[1:]]
    except (OSError, IndexError, ValueError) as e:
        pivq.die(f"--attributes {path}: cannot read it as CelebA's list_attr_celeba.txt ({e})")
    return names, table


# --- benchmark -------------------------------------------------------------------------


def bench(device):
    """Time the quantizers (cost build included) and full training steps; medians after warm-up."""

    def median_time(fn, reps):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return float(np.median(times)) * 1000

    from scipy.optimize import linear_sum_assignment

    def scipy_loop(cost):  # the plain way: one dense solve per image
        return torch.from_numpy(np.stack([linear_sum_assignment(c)[1] for c in cost.cpu().numpy()]))

    rows = []
    print(f"device: {device}, torch threads: {torch.get_num_threads()}")
    print(f"{'(B, N, K, d)':>20} {'nearest ms':>11} {'scipy loop ms':>14} {'matching ms':>12} "
          f"{'match/near':>11} {'solve-only loop/match':>22}")
    for B, N, K, d in [(64, 16, 256, 32), (64, 64, 1024, 32), (32, 256, 4096, 32)]:
        g = torch.Generator().manual_seed(0)
        centers = torch.randn(32, d, generator=g)   # encoder-like: clustered vectors
        z = (centers[torch.randint(0, 32, (B, N), generator=g)] + 0.3 * torch.randn(B, N, d, generator=g)).to(device)
        codebook = (centers[torch.randint(0, 32, (K,), generator=g)] + 0.3 * torch.randn(K, d, generator=g)).to(device)
        reps = 10 if N < 256 else 3
        t_near = median_time(lambda: pivq.nearest_assign(pivq.squared_distances(z, codebook)).cpu(), reps)
        t_loop = median_time(lambda: scipy_loop(pivq.squared_distances(z, codebook)), reps)
        t_match = median_time(lambda: pivq.matching_assign(pivq.squared_distances(z, codebook)).cpu(), reps)
        cost = pivq.squared_distances(z, codebook)
        s_loop = median_time(lambda: scipy_loop(cost), reps)
        s_match = median_time(lambda: pivq.matching_assign(cost).cpu(), reps)
        rows.append(dict(shape=[B, N, K, d], nearest_ms=t_near, scipy_loop_ms=t_loop, matching_ms=t_match,
                         matching_over_nearest=t_match / t_near, solve_loop_over_matching=s_loop / s_match))
        print(f"{str((B, N, K, d)):>20} {t_near:11.1f} {t_loop:14.1f} {t_match:12.1f} {t_match / t_near:11.2f} "
              f"{s_loop / s_match:22.1f}")
    print("\none training step (ms), matching vs nearest")
    steps = {}
    for name, over in [("tiny", {}), ("ffhq256-quantizer", dict(codes=64, codebook_size=1024, code_dim=32))]:
        for q in ("matching", "nearest"):
            cfg = pivq.Config(**{**over, "quantizer": q, "init_steps": 0})
            torch.manual_seed(0)
            model, disc = pivq.PIVQ(cfg).to(device), pivq.Discriminator(cfg).to(device)
            opt, opt_d = pivq.make_optimizers(model, disc, cfg)
            x = torch.stack([pivq.SyntheticFaces(cfg.image_size)[i] for i in range(cfg.batch_size)]).to(device)
            model.quantizer.init_codebook(model.encoder(x).flatten(0, 1).detach())
            it = iter(range(10 ** 9))
            steps[(name, q)] = median_time(lambda: pivq.train_step(model, disc, opt, opt_d, x, 100 + next(it), cfg), 10)
        ratio = steps[(name, "matching")] / steps[(name, "nearest")]
        rows.append(dict(step=name, matching_ms=steps[(name, "matching")], nearest_ms=steps[(name, "nearest")], ratio=ratio))
        print(f"{name:>20}: matching {steps[(name, 'matching')]:.1f}, nearest {steps[(name, 'nearest')]:.1f}, "
              f"ratio {ratio:.3f}")
    return dict(bench=rows)


# --- main --------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a PI-VQ checkpoint; or --bench the quantizer.")
    p.add_argument("--ckpt", help="checkpoint written by pivq.py")
    p.add_argument("--data", default="", help="images to evaluate on (default: held-out training data)")
    p.add_argument("--n", type=int, default=1000, help="number of images")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--prdc", action="store_true", help="precision/recall/density/coverage of samples")
    p.add_argument("--k", type=int, default=5, help="nearest neighbours for PRDC")
    p.add_argument("--features", default="vgg16", choices=["vgg16", "inception", "pixels"],
                   help="PRDC feature space (vgg16: fc2, needs its ImageNet weights)")
    p.add_argument("--samples", help="folder of samples for PRDC (default: n interpolation samples)")
    p.add_argument("--attributes", help="CelebA list_attr_celeba.txt for the attribute probe "
                                        "(built-in data: its own attributes, automatically)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bench", action="store_true", help="benchmark the quantizers and a training step")
    args = p.parse_args(argv)
    device = pivq.pick_device(args.device)
    if args.bench:
        print(json.dumps(bench(device)))
        return
    if not args.ckpt:
        p.error("--ckpt is required (or --bench)")
    if args.n < 2 or args.k < 1:
        p.error("--n must be at least 2 and --k at least 1")
    model, cfg = pivq.load(args.ckpt, device)
    dataset = dataset_for(cfg, args.data)
    n = min(args.n, len(dataset))
    res = {}

    # reconstruction and code statistics over n images (and their PRDC features, in one read)
    perceptual = pivq.make_lpips(device) if os.path.isfile(pivq.hub_path()) else None
    feats = feature_extractor(args.features, device) if args.prdc else None
    sq_err, lp, codes, kept, real = [], [], [], [], []
    for s in range(0, n, args.batch_size):
        items = [(i, dataset[i]) for i in range(s, min(n, s + args.batch_size))]
        items = [(i, x) for i, x in items if x is not None]
        if not items:
            continue
        x = torch.stack([x for _, x in items]).to(device)
        idx = model.encode(x)
        rec = model.decode(idx)
        sq_err.append(((rec - x) / 2).pow(2).flatten(1).mean(1).cpu())   # on the [0, 1] scale
        if perceptual is not None:
            lp.append(perceptual(x, rec).flatten().cpu())
        codes.append(idx.cpu())
        kept += [i for i, _ in items]
        if feats is not None:
            real.append(feats(x).cpu())
    codes = torch.cat(codes)
    mse = torch.cat(sq_err)
    res["mse"] = mse.mean().item()
    res["psnr"] = (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean().item()
    if lp:
        res["lpips"] = torch.cat(lp).mean().item()
    stats = pivq.code_stats(torch.bincount(codes.flatten(), minlength=cfg.codebook_size).float(),
                            pivq.distinct_per_image(codes).float().mean().item())
    res.update(codebook_usage=stats["usage"], perplexity=stats["perplexity"],
               distinct_per_image=stats["distinct"])
    res["capacity_bits"] = capacity_bits(res["perplexity"], res["distinct_per_image"])

    if args.prdc:
        if args.samples:
            fake_ds = pivq.ImageFolder(args.samples, cfg.image_size)
            fake_imgs = [x for x in (fake_ds[i] for i in range(min(n, len(fake_ds)))) if x is not None]
            fake = torch.cat([feats(torch.stack(fake_imgs[s:s + args.batch_size]).to(device)).cpu()
                              for s in range(0, len(fake_imgs), args.batch_size)])
        else:
            fake = torch.cat([feats(generate(model, dataset, min(args.batch_size, n - s), args.batch_size,
                                             args.seed + s, device)).cpu() for s in range(0, n, args.batch_size)])
        res.update(compute_prdc(torch.cat(real), fake, args.k))

    # attribute probe: logistic regression on bags of codes against the majority class
    attrs = None
    if args.attributes:
        names, table = read_celeba_attributes(args.attributes)
        base = [os.path.basename(dataset.paths[i]) for i in kept] if isinstance(dataset, pivq.ImageFolder) else []
        found = [j for j, b in enumerate(base) if b in table]
        if len(found) < 20:
            pivq.die(f"--attributes {args.attributes}: only {len(found)} of the evaluated images are listed in it")
        attrs, x_bag = torch.tensor([table[base[j]] for j in found]), bag_of_codes(codes[found], cfg.codebook_size)
    elif isinstance(dataset, pivq.SyntheticFaces):
        names = pivq.ATTRIBUTES
        attrs, x_bag = torch.stack([dataset.attributes(i) for i in kept]), bag_of_codes(codes, cfg.codebook_size)
    if attrs is not None:
        per = {name: logistic_probe(x_bag, attrs[:, j]) for j, name in enumerate(names)}
        res["attr_acc"] = float(np.mean([a for a, _ in per.values()]))
        res["attr_majority"] = float(np.mean([m for _, m in per.values()]))
        res["attributes"] = {name: dict(acc=a, majority=m) for name, (a, m) in per.items()}

    print(f"{args.ckpt}: {len(kept)} images, quantizer {cfg.quantizer}, N={cfg.codes}, K={cfg.codebook_size}")
    for key, v in res.items():
        if key != "attributes":
            print(f"  {key:>20}  {v:.4f}")
    for name, r in res.get("attributes", {}).items():
        print(f"  {'attr ' + name:>20}  {r['acc']:.3f}  (majority {r['majority']:.3f})")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
