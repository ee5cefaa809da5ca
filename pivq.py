"""
PI-VQ: a permutation-invariant vector-quantized autoencoder, in one file.

An ordinary VQ-VAE / VQGAN turns an image into a *grid* of codes, so making a new image needs a
learned prior over grids. PI-VQ turns an image into an unordered *set* of N codes out of a
codebook of K. With no position in the latent, the codes of aligned images (faces) come to
describe global content, and a new image is made by mixing the code sets of real images and
decoding once: no prior, no iteration.

Where each idea lives, top to bottom:
  - `Encoder`: a transformer over image patches plus N learned latent queries; the N query
    outputs are the continuous latent set, (B, N, d).
  - `matching_assign`: the matching quantizer. Each image's N vectors get N *distinct* codes
    at minimal total squared distance, by an exact optimal bipartite matching (scipy).
    `nearest_assign` is the nearest-neighbour baseline, which lets several vectors share a code.
  - `Quantizer`: the VQ-VAE codebook with its straight-through gradient and codebook/commitment
    losses. `Quantizer.init_codebook` is the delayed initialization: the bottleneck stays
    continuous for `init_steps`, then the codebook is set by k-means on the encoder's own outputs.
  - `Decoder`: permutation-invariant by construction. The codes get no position or index
    embedding; they attend to each other, then learned 2-D patch-position queries cross-attend
    to them. Shuffling the code set leaves the image unchanged.
  - `Discriminator`, `train_step`: VQGAN's losses: L1/L2 + LPIPS + hinge PatchGAN loss with the
    adaptive weight, plus the codebook and commitment terms.
  - `train`: the training loop (one GPU, CPU, or torchrun/DDP), with atomic checkpoints and resume.
  - `SyntheticFaces`: a built-in procedural dataset of aligned cartoon faces with attributes, so
    that everything runs with no download.

Train: `python pivq.py` (built-in data, CPU is enough) or `python pivq.py --data ffhq/`.
`sample.py` and `eval.py` import from this file.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def die(msg):
    """Stop with a one-line message for the user instead of a traceback."""
    raise SystemExit(f"pivq: error: {msg}")


# -----------------------------------------------------------------------------
# config


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # data
    data: str = opt("", "image folder, read recursively; empty: the built-in synthetic faces")
    image_size: int = opt(32, "images are resized on the shorter side and center-cropped to this")
    workers: int = opt(0, "data loader worker processes")
    # model
    patch_size: int = opt(4, "pixels per patch side, for the encoder's input and decoder's output")
    codes: int = opt(16, "N, codes per image (the size of the latent set)")
    codebook_size: int = opt(128, "K, codes in the codebook (K >= N)")
    code_dim: int = opt(16, "d, dimension of a code vector")
    width: int = opt(128, "transformer width of encoder and decoder")
    enc_depth: int = opt(2, "encoder transformer blocks")
    dec_depth: int = opt(2, "decoder blocks in which patch queries cross-attend to the codes")
    set_depth: int = opt(1, "decoder blocks of self-attention among the codes, before the queries")
    heads: int = opt(4, "attention heads")
    quantizer: str = opt("matching", "matching: N distinct codes per image; nearest: the baseline")
    beta: float = opt(0.25, "commitment loss weight")
    init_steps: int = opt(100, "steps with a continuous bottleneck before the codebook is set")
    init_batches: int = opt(4, "batches of encoder outputs that the codebook is initialized from")
    init_method: str = opt("kmeans", "kmeans or sample: how encoder outputs become the codebook")
    # losses
    recon_loss: str = opt("l1", "pixel reconstruction loss: l1 or l2")
    perceptual_weight: float = opt(0.0, "LPIPS (VGG) loss weight; 0 needs no pretrained weights")
    disc_weight: float = opt(0.1, "adversarial loss weight (times VQGAN's adaptive weight); 0: off")
    disc_start: int = opt(2000, "step at which the discriminator switches on")
    disc_channels: int = opt(32, "PatchGAN width")
    disc_layers: int = opt(2, "PatchGAN stride-2 layers")
    # optimization
    steps: int = opt(3000, "total training steps")
    batch_size: int = opt(32, "images per step, over all processes under torchrun")
    lr: float = opt(1e-3, "peak learning rate (AdamW), cosine-decayed to lr/10")
    warmup: int = opt(50, "linear warmup steps")
    weight_decay: float = opt(0.01, "AdamW weight decay, on matrices only")
    grad_clip: float = opt(1.0, "gradient norm clip; 0: off")
    max_bad_steps: int = opt(5, "stop after this many non-finite losses in a row")
    # run
    out: str = opt("out", "output folder: ckpt.pt, log.jsonl, recon.png")
    log_every: int = opt(25, "steps between lines in OUT/log.jsonl")
    save_every: int = opt(500, "steps between checkpoints (one is also written at the end)")
    device: str = opt("auto", "auto, cpu or cuda")
    seed: int = opt(0, "seed of model init and data order")


PRESETS = {
    # the default without --data: built-in faces, trains on 2 CPU cores in about 10 minutes
    "tiny": dict(),
    # CelebA aligned crops (178x218) at 64x64
    "celeba64": dict(image_size=64, patch_size=8, codes=32, codebook_size=512, code_dim=32,
                     width=384, enc_depth=6, dec_depth=6, set_depth=2, heads=6, init_steps=1000,
                     init_batches=8, perceptual_weight=1.0, disc_weight=0.5, disc_start=20000,
                     disc_channels=64, disc_layers=3, steps=100000, batch_size=64, lr=3e-4,
                     warmup=1000, workers=8, log_every=100, save_every=2000),
    # FFHQ 256x256 on one modern GPU (bf16)
    "ffhq256": dict(image_size=256, patch_size=16, codes=64, codebook_size=1024, code_dim=32,
                    width=512, enc_depth=8, dec_depth=8, set_depth=2, heads=8, init_steps=2000,
                    init_batches=8, perceptual_weight=1.0, disc_weight=0.5, disc_start=30000,
                    disc_channels=64, disc_layers=3, steps=200000, batch_size=32, lr=2e-4,
                    warmup=2000, workers=8, log_every=100, save_every=2000),
}

# flags that may differ between a run and the checkpoint it resumes
RESUME_MAY_CHANGE = {"steps", "out", "log_every", "save_every", "device", "workers", "data"}


def check_config(cfg):
    """Reject configs that cannot run, with a message that says which flag to change."""
    if cfg.image_size % cfg.patch_size:
        die(f"--image-size {cfg.image_size} is not a multiple of --patch-size {cfg.patch_size}")
    if cfg.codebook_size < cfg.codes:
        die(f"--codebook-size {cfg.codebook_size} is smaller than --codes {cfg.codes}: "
            "matching needs K >= N distinct codes")
    if cfg.width % cfg.heads:
        die(f"--width {cfg.width} is not a multiple of --heads {cfg.heads}")
    for name in ("image_size", "patch_size", "codes", "code_dim", "width", "heads", "steps",
                 "batch_size", "log_every", "save_every", "init_batches"):
        if getattr(cfg, name) < 1:
            die(f"--{name.replace('_', '-')} must be at least 1")
    for name, allowed in (("quantizer", ("matching", "nearest")), ("recon_loss", ("l1", "l2")),
                          ("init_method", ("kmeans", "sample")), ("device", ("auto", "cpu", "cuda"))):
        if getattr(cfg, name) not in allowed:
            die(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}")
    return cfg


# -----------------------------------------------------------------------------
# data

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ATTRIBUTES = ["smiling", "eyeglasses", "long_hair", "blond", "dark_skin", "big_eyes", "beard",
              "light_background"]


def draw_face(size, seed):
    """One procedural aligned face: (3, size, size) in [-1, 1] and its attributes (8,) in {0, 1}.

    Drawn with soft-edged shapes on a coordinate grid in [-1, 1]^2, so any size looks the same.
    """
    g = torch.Generator().manual_seed(seed)
    u = lambda lo=0.0, hi=1.0: lo + (hi - lo) * torch.rand((), generator=g).item()
    a = {k: torch.rand((), generator=g).item() < 0.5 for k in ATTRIBUTES}
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    aa = 0.6 / size  # edge softness: about a pixel, at any size

    def ellipse(cx, cy, rx, ry):
        d = (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2).sqrt()
        return torch.sigmoid((1 - d) * min(rx, ry) / aa)

    def ring(cx, cy, r, w):
        d = ((xs - cx) ** 2 + (ys - cy) ** 2).sqrt()
        return torch.sigmoid((w - (d - r).abs()) / aa)

    def box(y0, y1, x0, x1):
        return (torch.sigmoid((ys - y0) / aa) * torch.sigmoid((y1 - ys) / aa)
                * torch.sigmoid((xs - x0) / aa) * torch.sigmoid((x1 - xs) / aa))

    def color(rgb, jitter=0.06):
        return torch.tensor([min(1, max(0, c + u(-jitter, jitter))) for c in rgb]).view(3, 1, 1)

    img = torch.zeros(3, size, size)

    def paint(mask, rgb):
        nonlocal img
        img = img * (1 - mask) + rgb * mask

    img += color([u(0.75, 0.95)] * 3 if a["light_background"] else
                 [u(0.1, 0.35), u(0.1, 0.35), u(0.2, 0.45)], 0.1)
    skin = color([0.42, 0.27, 0.18] if a["dark_skin"] else [0.93, 0.76, 0.62])
    v = u(0.08, 0.4)
    hair = color([0.9, 0.78, 0.4] if a["blond"] else [v, 0.7 * v, 0.45 * v], 0.03)
    cx, cy = u(-0.04, 0.04), u(-0.06, 0.02)  # aligned: the head barely moves
    hw, hh = u(0.40, 0.48), u(0.52, 0.60)
    paint(box(0.55, 1.2, -0.75, 0.75) * ellipse(0, 1.25, 0.85, 0.75),        # shoulders
          color([u(0.1, 0.9), u(0.1, 0.9), u(0.1, 0.9)], 0))
    paint(box(0.3, 0.8, cx - 0.15, cx + 0.15), skin * 0.9)                   # neck
    if a["long_hair"]:
        paint(box(cy - 0.2, cy + 0.95, cx - hw - 0.1, cx + hw + 0.1)
              * ellipse(cx, cy + 0.2, hw + 0.14, 1.0), hair)
    paint(ellipse(cx, cy - 0.08, hw + 0.05, hh + 0.02) * box(-2, cy - 0.05, -2, 2), hair)
    paint(ellipse(cx, cy, hw, hh), skin)                                     # head
    paint(ellipse(cx, cy - hh * 0.55, hw * 0.95, hh * 0.5) * box(-2, cy + u(-0.45, -0.3), -2, 2),
          hair)                                                              # fringe
    if a["beard"]:
        paint(ellipse(cx, cy + hh * 0.45, hw * 0.85, hh * 0.5) * box(cy + 0.18, 2, -2, 2), hair * 0.8)
    er = u(0.085, 0.11) if a["big_eyes"] else u(0.045, 0.06)
    ey, ex = cy - 0.05, u(0.17, 0.22)
    iris = color([u(0.05, 0.4), u(0.1, 0.5), u(0.1, 0.6)], 0)
    for s in (-1, 1):
        paint(box(ey - er - 0.09, ey - er - 0.05, cx + s * ex - 0.1, cx + s * ex + 0.1), hair * 0.7)
        paint(ellipse(cx + s * ex, ey, er * 1.4, er), color([0.97, 0.97, 0.97], 0.02))
        paint(ellipse(cx + s * ex, ey, er * 0.6, er * 0.6), iris)
    if a["eyeglasses"]:
        frame = color([0.08, 0.08, 0.08], 0.03)
        for s in (-1, 1):
            paint(ring(cx + s * ex, ey, 0.14, 0.025), frame)
        paint(box(ey - 0.02, ey + 0.01, cx - ex + 0.13, cx + ex - 0.13), frame)
    paint(ellipse(cx, cy + 0.12, 0.04, 0.09), skin * 0.8)                    # nose
    my, mw = cy + 0.32, u(0.12, 0.18)
    lips = color([0.7, 0.2, 0.25])
    if a["smiling"]:  # lower half of an ellipse, teeth showing
        paint(ellipse(cx, my - 0.02, mw, 0.09) * box(my - 0.02, 2, -2, 2), lips)
        paint(ellipse(cx, my - 0.02, mw * 0.8, 0.055) * box(my - 0.02, 2, -2, 2),
              color([0.95, 0.95, 0.92], 0.02))
    else:
        paint(box(my - 0.02, my + 0.02, cx - mw, cx + mw), lips)
    attrs = torch.tensor([a[k] for k in ATTRIBUTES], dtype=torch.float32)
    return img.clamp(0, 1) * 2 - 1, attrs


class SyntheticFaces(torch.utils.data.Dataset):
    """Built-in aligned faces: image i is drawn from seed (seed, i), in memory, at any size."""

    def __init__(self, size, n=60000, seed=0):
        self.size, self.n, self.seed = size, n, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return draw_face(self.size, self.seed * 1_000_003 + i)[0]

    def attributes(self, i):
        return draw_face(8, self.seed * 1_000_003 + i)[1]  # same seed, same attributes, cheaper


def load_image(path, size):
    """RGB (3, size, size) in [-1, 1]: shorter side resized to `size` (up or down), center crop.

    Grayscale and palette images become RGB; transparency is composited onto white.
    """
    from PIL import Image
    from torchvision.transforms import functional as TF

    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
    im = TF.center_crop(TF.resize(im, size, antialias=True), size)
    return TF.to_tensor(im) * 2 - 1


class ImageFolder(torch.utils.data.Dataset):
    """Every image under a folder, recursively (FFHQ's and CelebA's layouts work as they are).

    An unreadable image yields None; `collate` drops it and counts it, so a bad file never stops
    a run.
    """

    def __init__(self, root, size):
        if not os.path.isdir(root):
            die(f"--data {root}: no such folder")
        self.paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root, followlinks=True)
                            for f in files if f.lower().endswith(IMAGE_EXTS))
        if not self.paths:
            die(f"--data {root}: no images found (looked for {', '.join(IMAGE_EXTS)} files, "
                "recursively)")
        self.size = size
        probe = self.paths[:16]
        if all(self[i] is None for i in range(len(probe))):
            die(f"--data {root}: none of the first {len(probe)} images can be read "
                f"(e.g. {probe[0]}); check that they are image files")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return load_image(self.paths[i], self.size)
        except Exception as e:  # a corrupt or truncated file: skip it, never stop the run
            print(f"pivq: warning: skipping unreadable image {self.paths[i]} ({e})", file=sys.stderr)
            return None


def collate(items):
    """Stack the readable images; also return how many were skipped."""
    good = [x for x in items if x is not None]
    return (torch.stack(good) if good else None), len(items) - len(good)


def make_dataset(cfg):
    return ImageFolder(cfg.data, cfg.image_size) if cfg.data else SyntheticFaces(cfg.image_size)


class StreamSampler(torch.utils.data.Sampler):
    """An endless stream of batches, indexed by position in the stream.

    Epoch e is a permutation seeded by (seed, e); global batch t holds stream positions
    [t*B, (t+1)*B), and rank r of w takes every w-th of them (a DistributedSampler that can
    start anywhere). So a resumed run sees exactly the data the uninterrupted run would have,
    and a dataset smaller than a batch just wraps into the next epoch.
    """

    def __init__(self, n, batch_size, seed, start_batch=0, rank=0, world=1):
        self.n, self.B, self.seed, self.start, self.rank, self.world = n, batch_size, seed, start_batch, rank, world

    def __iter__(self):
        t = self.start
        while True:
            positions = range(t * self.B + self.rank, (t + 1) * self.B, self.world)
            yield [epoch_order(self.n, self.seed, pos // self.n)[pos % self.n] for pos in positions]
            t += 1


@functools.lru_cache(maxsize=4)
def epoch_order(n, seed, epoch):
    """The order of the n items in an epoch: a permutation seeded by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()


def batches(dataset, cfg, start_batch=0, rank=0, world=1):
    """Iterate (images, n_skipped) from global batch `start_batch` on, forever."""
    sampler = StreamSampler(len(dataset), cfg.batch_size, cfg.seed, start_batch, rank, world)
    return iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                            num_workers=cfg.workers, pin_memory=torch.cuda.is_available()))


# -----------------------------------------------------------------------------
# model: transformer parts


class Attention(nn.Module):
    """Multi-head cosine attention (Swin V2) of x over a context (x itself for self-attention).

    logits = tau * cos(q, k), with tau learned per head, from 10. Plain q.k / sqrt(hs) attention
    starts out nearly uniform and takes hundreds of steps to focus on anything; this is sharp
    from the first step (+1 dB PSNR after 300 tiny steps, measured) and stays bounded later.
    """

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)
        self.log_tau = nn.Parameter(torch.full((heads,), math.log(10.0)))

    def forward(self, x, context=None):
        context = x if context is None else context
        B, T, W = x.shape
        S, h = context.shape[1], self.heads
        q = self.q(x).view(B, T, h, W // h).transpose(1, 2)                          # (B, h, T, hs)
        k, v = self.kv(context).view(B, S, 2, h, W // h).permute(2, 0, 3, 1, 4)    # (B, h, S, hs)
        tau = self.log_tau.clamp(max=math.log(100.0)).exp().view(1, h, 1, 1).to(q.dtype)
        y = F.scaled_dot_product_attention(F.normalize(q, dim=-1) * tau, F.normalize(k, dim=-1), v, scale=1.0)
        return self.proj(y.transpose(1, 2).reshape(B, T, W))                          # (B, T, W)


class Block(nn.Module):
    """Pre-LayerNorm transformer block; with `cross`, it also attends to a context set."""

    def __init__(self, width, heads, cross=False):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.ln2, self.cross = (nn.LayerNorm(width), Attention(width, heads)) if cross else (None, None)
        self.ln3 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, context=None):
        x = x + self.attn(self.ln1(x))
        if self.cross is not None:
            x = x + self.cross(self.ln2(x), context)
        return x + self.mlp(self.ln3(x))


class PositionGrid(nn.Module):
    """Learned 2-D position embeddings for a g x g grid: row embedding + column embedding.

    Initialized to 2-D sine-cosine (MAE): rows in the first half of the channels, columns in the
    second. Starting at unit scale, position is visible from the first step; from a small random
    init, the encoder spends hundreds of steps learning where its patches are.
    """

    def __init__(self, g, width):
        super().__init__()
        half = width // 2
        freq = 1.0 / 100 ** (torch.arange(half // 2) / max(1, half // 2))
        angle = torch.arange(g)[:, None] * freq                                  # (g, half/2)
        sincos = torch.cat([angle.sin(), angle.cos()], 1)                          # (g, half)
        rows, cols = torch.zeros(g, 1, width), torch.zeros(1, g, width)
        rows[:, 0, :sincos.shape[1]], cols[0, :, half:half + sincos.shape[1]] = sincos, sincos
        self.rows, self.cols = nn.Parameter(rows), nn.Parameter(cols)

    def forward(self):
        return (self.rows + self.cols).flatten(0, 1)  # (g*g, W), row-major like the patches


# -----------------------------------------------------------------------------
# model: encoder, quantizers, decoder


class Encoder(nn.Module):
    """Image -> N continuous vectors: patches with 2-D positions, plus N learned latent queries."""

    def __init__(self, cfg):
        super().__init__()
        self.patch = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size)
        self.pos = PositionGrid(cfg.image_size // cfg.patch_size, cfg.width)
        self.latents = nn.Parameter(torch.randn(cfg.codes, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.enc_depth))
        self.ln, self.out = nn.LayerNorm(cfg.width), nn.Linear(cfg.width, cfg.code_dim)

    def forward(self, img):
        x = self.patch(img).flatten(2).transpose(1, 2) + self.pos()          # (B, T, W)
        N = self.latents.shape[0]
        x = torch.cat([x, self.latents.expand(x.shape[0], -1, -1)], dim=1)   # (B, T+N, W)
        for block in self.blocks:
            x = block(x)
        return self.out(self.ln(x[:, -N:]))                                   # (B, N, d)


def squared_distances(z, codebook):
    """(B, N, d), (K, d) -> (B, N, K) squared distances, in one batched matmul, in float32."""
    z, codebook = z.float(), codebook.float()
    return ((z * z).sum(-1, keepdim=True) - 2 * z @ codebook.t() + (codebook * codebook).sum(-1)).clamp_min_(0)


def nearest_assign(cost):
    """Nearest-neighbour quantization (VQ-VAE): (B, N, K) -> (B, N), codes may repeat."""
    return cost.argmin(-1)


_solver_pool, THREADS = None, min(8, os.cpu_count() or 1)
try:  # optional exact batched solver that runs on the GPU: pip install torch-linear-assignment
    from torch_linear_assignment import batch_linear_assignment
except ImportError:
    batch_linear_assignment = None


def _solve_dense(costs):
    """Exact assignments for a stack of (N, K) numpy cost matrices: rows -> distinct columns."""
    return [linear_sum_assignment(c)[1] for c in costs]  # rows come back sorted: cols[i] is row i's


def _solve_candidates(problem):
    """The same on a sparse graph of each row's N cheapest columns, (b, N, N) values and columns.

    Exact: if an optimal matching gave row i a column outside its N cheapest, one of those N
    would be free (only N - 1 other rows), and moving row i there costs no more.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    vals, cols, K = problem
    out = []
    for v, c in zip(vals, cols):
        N = len(v)
        # +1: every row takes exactly one edge, so a shift keeps the optimum and no weight is 0
        graph = csr_matrix((v.ravel() - v.min() + 1.0, c.ravel(), np.arange(0, N * N + 1, N)), shape=(N, K))
        rows, cols_of_rows = min_weight_full_bipartite_matching(graph)
        out.append(cols_of_rows[np.argsort(rows)])
    return out


def matching_assign(cost):
    """Matching quantization: (B, N, K) costs -> (B, N) codes, N distinct per image, at exactly
    minimal total cost (an optimal bipartite matching per image).

    Only images whose nearest codes collide are solved; the others are optimal as they are (when
    N*N >= 2K, the birthday bound, nearly all collide and the check is skipped on a CPU). On a
    GPU, the `torch-linear-assignment` package solves them there when installed; else each row's
    N cheapest codes are picked there and only (b, N, N) values leave the device for a sparse
    solve. On a CPU that selection costs more than it saves, and the dense solve (scipy's
    `linear_sum_assignment`) runs directly. Host solves are split over threads (scipy releases
    the GIL).
    """
    global _solver_pool
    B, N, K = cost.shape
    if N * N >= 2 * K and not cost.is_cuda:
        nearest, todo = torch.empty(B, N, dtype=torch.long), torch.arange(B)
    else:
        nearest = cost.argmin(-1)                                     # (B, N)
        s = nearest.sort(-1).values
        clash = (s[:, 1:] == s[:, :-1]).any(-1)                       # (B,) a code taken twice
        if not clash.any():
            return nearest
        todo = clash.nonzero().squeeze(1)
    w = min(THREADS, len(todo))
    if cost.is_cuda and batch_linear_assignment is not None:
        nearest[todo] = batch_linear_assignment(cost[todo]).long()
        return nearest
    if cost.is_cuda and N < K:
        vals, cols = cost[todo].topk(N, dim=-1, largest=False)        # (b, N, N) each
        vals, cols = vals.double().cpu().numpy(), cols.cpu().numpy()
        chunks = [(vals[i::w], cols[i::w], K) for i in range(w)]
        solve = _solve_candidates
    else:
        host = (cost if len(todo) == len(cost) else cost[todo]).detach().cpu().numpy()  # (b, N, K)
        chunks, solve = [host[i::w] for i in range(w)], _solve_dense
    _solver_pool = _solver_pool or ThreadPoolExecutor(THREADS)
    solved = [None] * len(todo)
    try:
        for i, part in enumerate(_solver_pool.map(solve, chunks)):
            solved[i::w] = part
    except ValueError:  # NaN/inf costs from a diverged step (to be skipped): solve, don't crash
        return matching_assign(torch.nan_to_num(cost, nan=1e30, posinf=1e30, neginf=-1e30))
    nearest[todo] = torch.from_numpy(np.stack(solved)).to(nearest.device, torch.long)
    return nearest


class Quantizer(nn.Module):
    """VQ-VAE codebook (van den Oord et al. 2017): straight-through gradients, codebook and
    commitment losses; the assignment is `matching_assign` or `nearest_assign`."""

    def __init__(self, cfg):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(cfg.codebook_size, cfg.code_dim))
        self.register_buffer("initialized", torch.tensor(False))
        self.assign = matching_assign if cfg.quantizer == "matching" else nearest_assign
        self.beta = cfg.beta

    def indices(self, z):
        return self.assign(squared_distances(z.detach(), self.codebook.detach()))

    def forward(self, z):
        """(B, N, d) -> quantized (B, N, d), vq loss, indices (B, N); continuous before init."""
        if not self.initialized:
            return z, z.new_zeros(()), None
        idx = self.indices(z)
        q = self.codebook[idx]                                                        # (B, N, d)
        loss = F.mse_loss(q, z.detach().float()) + self.beta * F.mse_loss(z.float(), q.detach())
        return z + (q - z).detach(), loss, idx

    @torch.no_grad()
    def init_codebook(self, z, method="kmeans", iters=20, seed=0):
        """Delayed init: set the codebook from encoder outputs z (M, d), M >= K, then quantize.

        k-means (Lloyd, from a random sample of z) places every code where the data is, so no
        code starts dead; `sample` just takes K random encoder outputs.
        """
        z = z.float()
        K = self.codebook.shape[0]
        if len(z) < K:
            die(f"delayed init needs at least K={K} encoder outputs, got {len(z)}: "
                "raise --init-batches")
        g = torch.Generator().manual_seed(seed)
        c = z[torch.randperm(len(z), generator=g)[:K].to(z.device)].clone()
        for _ in range(iters if method == "kmeans" else 0):
            a = squared_distances(z[None], c)[0].argmin(1)                            # (M,)
            sums = torch.zeros_like(c).index_add_(0, a, z)
            counts = torch.bincount(a, minlength=K)[:, None]
            c = torch.where(counts > 0, sums / counts.clamp_min(1), c)                # empty: keep
        self.codebook.copy_(c)
        self.initialized.fill_(True)


class Decoder(nn.Module):
    """Code set -> image, invariant to the order of the set by construction.

    The codes carry no position or index embedding and only ever meet attention, which is
    permutation-equivariant among the codes (self-attention) and permutation-invariant as keys
    and values (cross-attention, a weighted sum over the set). Position enters only through the
    learned 2-D patch queries.
    """

    def __init__(self, cfg):
        super().__init__()
        self.inp = nn.Linear(cfg.code_dim, cfg.width)
        self.set_blocks = nn.ModuleList(Block(cfg.width, cfg.heads) for _ in range(cfg.set_depth))
        self.set_ln = nn.LayerNorm(cfg.width)
        self.queries = PositionGrid(cfg.image_size // cfg.patch_size, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cross=True) for _ in range(cfg.dec_depth))
        self.ln = nn.LayerNorm(cfg.width)
        self.out = nn.Linear(cfg.width, 3 * cfg.patch_size ** 2)
        self.p, self.g = cfg.patch_size, cfg.image_size // cfg.patch_size

    def forward(self, codes):
        s = self.inp(codes)                                                   # (B, N, W)
        for block in self.set_blocks:
            s = block(s)
        s = self.set_ln(s)
        x = self.queries().expand(codes.shape[0], -1, -1)                     # (B, T, W)
        for block in self.blocks:
            x = block(x, s)
        x = self.out(self.ln(x))                                              # (B, T, p*p*3)
        B, g, p = x.shape[0], self.g, self.p
        return x.view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, g * p, g * p)


class PIVQ(nn.Module):
    """The autoencoder: Encoder -> Quantizer -> Decoder."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.quantizer, self.decoder = Encoder(cfg), Quantizer(cfg), Decoder(cfg)

    def forward(self, x):
        """Training: images (B, 3, H, W) -> reconstruction, vq loss, indices (B, N) or None."""
        zq, vq_loss, idx = self.quantizer(self.encoder(x))
        return self.decoder(zq), vq_loss, idx

    @torch.no_grad()
    def encode(self, x):
        """Images in [-1, 1] (B, 3, H, W) -> code sets, LongTensor (B, N)."""
        if not self.quantizer.initialized:
            raise RuntimeError("the codebook is not initialized yet (the run stopped before --init-steps)")
        return self.quantizer.indices(self.encoder(x))

    @torch.no_grad()
    def decode(self, idx):
        """Code sets (B, N), in any order -> images (B, 3, H, W) in [-1, 1]."""
        return self.decoder(self.quantizer.codebook[idx]).clamp(-1, 1)


class Discriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) as in VQGAN: a real/fake logit per overlapping patch.
    GroupNorm instead of BatchNorm, so it behaves the same in eval and across DDP ranks."""

    def __init__(self, cfg):
        super().__init__()
        ch, layers = cfg.disc_channels, [nn.Conv2d(3, cfg.disc_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, cfg.disc_layers + 1):
            stride, nxt = (2 if i < cfg.disc_layers else 1), cfg.disc_channels * min(2 ** i, 8)
            layers += [nn.Conv2d(ch, nxt, 4, stride, 1, bias=False), nn.GroupNorm(8, nxt), nn.LeakyReLU(0.2)]
            ch = nxt
        self.net = nn.Sequential(*layers, nn.Conv2d(ch, 1, 4, 1, 1))

    def forward(self, x):
        return self.net(x)


# -----------------------------------------------------------------------------
# losses and one training step

VGG16_FILE = "vgg16-397923af.pth"


def hub_path(filename=VGG16_FILE):
    """Where torchvision keeps (and we look for) a pretrained weight file."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def hub_weights(filename=VGG16_FILE, fallback="train without LPIPS: --perceptual-weight 0"):
    """Path of a torchvision ImageNet weight file in torch's hub cache; a clear stop when absent
    (no download is attempted: many training machines have no internet)."""
    path = hub_path(filename)
    if not os.path.isfile(path):
        die(f"pretrained weights missing: {path}. On a machine with internet download "
            f"https://download.pytorch.org/models/{filename} and copy it there (or set TORCH_HOME); "
            f"or {fallback}")
    return path


def make_lpips(device, pretrained=True):
    """LPIPS-VGG (Zhang et al. 2018); pretrained=False builds it with a random trunk (tests)."""
    import lpips

    if pretrained:
        hub_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = lpips.LPIPS(net="vgg", pnet_rand=not pretrained, verbose=False)
    return net.eval().requires_grad_(False).to(device)


def lr_at(step, cfg):
    """Linear warmup, then cosine decay to lr/10 at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def make_optimizers(model, disc, cfg):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "codebook" not in n]
    other = [p for n, p in model.named_parameters() if p.dim() < 2 or "codebook" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9), weight_decay=0.0)
    return opt, opt_d


def autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def train_step(model, disc, opt, opt_d, x, step, cfg, perceptual=None, sync=lambda t: t):
    """One step of VQGAN-style training; returns the step's statistics (floats, indices).

    Loss = pixel + perceptual + lambda * hinge-GAN + vq; lambda is VQGAN's adaptive weight, the
    ratio of the reconstruction and adversarial gradient norms at the decoder's last layer.
    A non-finite loss (checked on all ranks through `sync`) skips the step.
    """
    raw = model.module if hasattr(model, "module") else model
    raw_disc = disc.module if hasattr(disc, "module") else disc
    use_gan = cfg.disc_weight > 0 and step >= cfg.disc_start
    for group in opt.param_groups + opt_d.param_groups:
        group["lr"] = lr_at(step, cfg)
    with autocast(x.device):
        xhat, vq_loss, idx = model(x)
        xhat = xhat.float()
        rec = (xhat - x).abs().mean() if cfg.recon_loss == "l1" else F.mse_loss(xhat, x)
        p_loss = perceptual(x, xhat).mean() if perceptual is not None and cfg.perceptual_weight > 0 else xhat.new_zeros(())
        nll = rec + cfg.perceptual_weight * p_loss
        g_loss, d_weight = xhat.new_zeros(()), xhat.new_zeros(())
        if use_gan:
            g_loss = -raw_disc(xhat).float().mean()  # raw module: D's own update comes below
            last = raw.decoder.out.weight
            g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
            g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
            d_weight = (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach() * cfg.disc_weight
        loss = nll + d_weight * g_loss + vq_loss
    finite = bool(sync(torch.isfinite(loss.detach()).float().reshape(1)).min() > 0)
    opt.zero_grad(set_to_none=True)
    if finite:  # all ranks agree (sync), so under DDP they all skip the backward together
        loss.backward()
    stats = dict(loss=loss.item(), rec=rec.item(), perceptual=p_loss.item(), vq=vq_loss.detach().item(),
                 g=g_loss.item(), d_weight=float(d_weight), d=0.0, finite=finite, indices=idx)
    if not finite:
        return stats
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    if use_gan:
        with autocast(x.device):
            d_loss = (F.relu(1 - disc(x).float()).mean() + F.relu(1 + disc(xhat.detach()).float()).mean())
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        stats["d"] = d_loss.item()
    return stats


def code_stats(counts, distinct):
    """Codebook usage (fraction of K used), perplexity of code use, mean distinct codes per image."""
    p = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum()).item()
    return dict(usage=(counts > 0).float().mean().item(), perplexity=perplexity, distinct=distinct)


def distinct_per_image(idx):
    """(B, N) -> (B,) number of distinct codes in each set."""
    s = idx.sort(-1).values
    return (s[:, 1:] != s[:, :-1]).sum(-1) + 1


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, state):
    """Write atomically: a temp file, fsync, then rename over the old one. A kill at any moment
    leaves either the previous checkpoint or the new one, never half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint(path, device="cpu"):
    if not os.path.isfile(path):
        die(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)  # loads data, never code
        cfg = Config(**ckpt["config"])
    except Exception as e:
        die(f"{path} is not a PI-VQ checkpoint that this version can read ({type(e).__name__}: {e})")
    return ckpt, cfg


def load_state(module, state, path):
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        die(f"{path} does not fit this model's config: {detail}")


def load(path, device="cpu"):
    """A trained model (eval mode) and its Config from a checkpoint written by `train`."""
    ckpt, cfg = read_checkpoint(path, device)
    model = PIVQ(cfg).to(device)
    load_state(model, ckpt["model"], path)
    if not model.quantizer.initialized:
        die(f"{path} stopped before --init-steps: it has no codebook yet; train longer")
    return model.eval(), cfg


def pick_device(name):
    """'auto' | 'cpu' | 'cuda' -> torch.device, with a clear stop when CUDA is asked for but absent."""
    if name == "cuda" and not torch.cuda.is_available():
        die("--device cuda, but no CUDA GPU is visible; use --device cpu")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


# -----------------------------------------------------------------------------
# training loop


def setup_distributed(cfg):
    """Under torchrun: one process per GPU (nccl), or per CPU process (gloo). Returns
    (device, rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(cfg.device)
    use_cuda = device.type == "cuda"
    if world == 1:
        return device, 0, 1
    if cfg.batch_size % world:
        die(f"--batch-size {cfg.batch_size} (global) does not split over {world} processes")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return torch.device(f"cuda:{local}" if use_cuda else "cpu"), dist.get_rank(), world


def init_codebook(raw, dataset, step, cfg, device, world):
    """Delayed initialization: gather encoder outputs over `init_batches` batches (from all
    ranks), fit the codebook on rank 0 and broadcast it, so that every rank holds the same one."""
    rank = dist.get_rank() if world > 1 else 0
    stream = (x for x, _ in batches(dataset, cfg, start_batch=step, rank=rank, world=world) if x is not None)
    with torch.no_grad(), autocast(device):
        z = torch.cat([raw.encoder(next(stream).to(device)).flatten(0, 1).float()
                       for _ in range(cfg.init_batches)])                         # (M, d)
    if world > 1:
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([z.shape[0]], device=device))
        parts = [torch.empty(int(s), z.shape[1], device=device) for s in sizes]
        dist.all_gather(parts, z)
        z = torch.cat(parts)
    raw.quantizer.init_codebook(z, cfg.init_method, seed=cfg.seed)
    if world > 1:
        dist.broadcast(raw.quantizer.codebook.data, 0)


def save_recon(path, model, fixed):
    from torchvision.utils import save_image

    model.eval()
    with torch.no_grad():
        if model.quantizer.initialized:
            rec = model.decode(model.encode(fixed))
        else:
            rec = model.decoder(model.encoder(fixed)).clamp(-1, 1)
    model.train()
    save_image(torch.cat([fixed, rec]) * 0.5 + 0.5, path, nrow=len(fixed))


def train(cfg, resume=False, overrides=()):
    """Train PI-VQ. `overrides`: the config fields given explicitly (checked against a resumed
    checkpoint). Returns the trained model (unwrapped)."""
    check_config(cfg)
    device, rank, world = setup_distributed(cfg)
    master = rank == 0
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    ckpt = None
    if resume:
        ckpt, saved = read_checkpoint(ckpt_path, device)
        changed = [k for k in overrides if k not in RESUME_MAY_CHANGE and getattr(cfg, k) != getattr(saved, k)]
        if changed:
            die(f"{ckpt_path} was trained with " + ", ".join(
                f"--{k.replace('_', '-')} {getattr(saved, k)} (not {getattr(cfg, k)})" for k in changed)
                + "; drop those flags to resume, or use a new --out")
        cfg = dataclasses.replace(saved, **{k: getattr(cfg, k) for k in overrides if k in RESUME_MAY_CHANGE})
    elif os.path.exists(ckpt_path):
        die(f"{ckpt_path} exists: add --resume to continue that run, or choose another --out")
    check_config(cfg)
    if master:
        os.makedirs(cfg.out, exist_ok=True)
        for f in os.listdir(cfg.out):  # half-written checkpoints of a killed run
            if f.startswith("ckpt.pt.tmp"):
                os.remove(os.path.join(cfg.out, f))

    torch.manual_seed(cfg.seed)
    dataset = make_dataset(cfg)
    model, disc = PIVQ(cfg).to(device), Discriminator(cfg).to(device)
    opt, opt_d = make_optimizers(model, disc, cfg)
    perceptual = make_lpips(device) if cfg.perceptual_weight > 0 else None
    step, skipped_images, bad_steps = 0, 0, 0
    if ckpt is not None:
        load_state(model, ckpt["model"], ckpt_path)
        load_state(disc, ckpt["disc"], ckpt_path)
        opt.load_state_dict(ckpt["opt"])
        opt_d.load_state_dict(ckpt["opt_d"])
        step, skipped_images, bad_steps = ckpt["step"], ckpt["skipped_images"], ckpt["bad_steps"]
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), device)
    raw = model
    sync = lambda t: t
    if world > 1:
        # find_unused_parameters: the codebook gets no gradient before the delayed init
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        disc = nn.parallel.DistributedDataParallel(disc)

        def sync(t):
            t = t.to(device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            return t

    fixed = torch.stack([x for x in (dataset[i] for i in range(min(len(dataset), 64))) if x is not None][:8]).to(device)

    def save():
        for name, p in raw.state_dict().items():  # the same on every rank
            if p.is_floating_point() and not torch.isfinite(p).all():
                die(f"non-finite weights in {name}; not saving over {ckpt_path}")
        if not master:
            return
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        save_checkpoint(ckpt_path, dict(config=dataclasses.asdict(cfg), model=raw.state_dict(),
                                        disc=(disc.module if world > 1 else disc).state_dict(),
                                        opt=opt.state_dict(), opt_d=opt_d.state_dict(), step=step,
                                        skipped_images=skipped_images, bad_steps=bad_steps, rng=rng))
        save_recon(os.path.join(cfg.out, "recon.png"), raw, fixed)

    # SIGINT/SIGTERM: finish the current step, save, exit cleanly
    stop = {"signal": None}

    def handler(signum, frame):
        if stop["signal"] is not None:  # a second Ctrl-C: stop now, without saving
            raise KeyboardInterrupt
        stop["signal"] = signum
    old_handlers = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    from tqdm import tqdm

    stream = batches(dataset, cfg, start_batch=step, rank=rank, world=world)
    bar = tqdm(total=cfg.steps, initial=step, disable=not master, dynamic_ncols=True)
    counts = torch.zeros(cfg.codebook_size, device=device)
    distinct, seen, bad_in_row, t0 = [], 0, 0, time.time()
    log = open(os.path.join(cfg.out, "log.jsonl"), "a") if master else None
    model.train()
    try:
        while step < cfg.steps:
            if step >= cfg.init_steps and not raw.quantizer.initialized:
                init_codebook(raw, dataset, step, cfg, device, world)
            x, n_bad = next(stream)
            skipped_images += n_bad
            if x is None:
                continue
            x = x.to(device, non_blocking=True)
            s = train_step(model, disc, opt, opt_d, x, step, cfg, perceptual, sync)
            if not s["finite"]:
                bad_steps += 1
                bad_in_row += 1
                if master:
                    print(f"pivq: warning: non-finite loss at step {step}, step skipped", file=sys.stderr)
                if bad_in_row >= cfg.max_bad_steps:
                    die(f"{bad_in_row} non-finite losses in a row at step {step}; lower --lr or "
                        f"check the data. Last good checkpoint: {ckpt_path}")
                step += 1
                continue
            bad_in_row = 0
            if s["indices"] is not None:
                counts += torch.bincount(s["indices"].flatten(), minlength=cfg.codebook_size)
                distinct.append(distinct_per_image(s["indices"]).float().mean().item())
            seen += len(x) * world
            step += 1
            bar.update(1)
            if master and (step % cfg.log_every == 0 or step == cfg.steps):
                rate = seen / (time.time() - t0)
                cs = code_stats(counts, float(np.mean(distinct)) if distinct else None)
                row = dict(step=step, **{k: round(s[k], 5) for k in ("loss", "rec", "perceptual", "vq", "g", "d", "d_weight")},
                           **cs, img_per_s=round(rate, 1), lr=lr_at(step - 1, cfg),
                           skipped_images=skipped_images, bad_steps=bad_steps)
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{s['loss']:.3f}", usage=f"{cs['usage']:.2f}", img_s=f"{rate:.0f}")
                counts.zero_()
                distinct, seen, t0 = [], 0, time.time()
            stopping = stop["signal"] is not None
            if world > 1:  # every rank stops at the same step
                stopping = sync(torch.tensor([0.0 if stopping else 1.0])).item() == 0
            if stopping or step % cfg.save_every == 0 or step == cfg.steps:
                save()
            if stopping:
                if master:
                    print(f"\npivq: stopped by signal at step {step}; checkpoint saved to {ckpt_path}. "
                          "Continue with --resume.", file=sys.stderr)
                break
    finally:
        bar.close()
        if log:
            log.close()
        for s_, h in old_handlers.items():
            signal.signal(s_, h)
        if world > 1:
            dist.destroy_process_group()
    return raw


# -----------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    """Flags override the preset; every Config field is a flag. Returns (cfg, resume, overrides)."""
    p = argparse.ArgumentParser(description="Train PI-VQ, a permutation-invariant VQ autoencoder.",
)
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="hyperparameter preset: ffhq256 when --data is given, else tiny")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT/ckpt.pt")
    choices = dict(quantizer=["matching", "nearest"], recon_loss=["l1", "l2"], init_method=["kmeans", "sample"],
                   device=["auto", "cpu", "cuda"])
    for f in dataclasses.fields(Config):
        p.add_argument("--" + f.name.replace("_", "-"), type=f.type,
                       default=None, choices=choices.get(f.name),
                       help=f"{f.metadata['help']} (tiny: {f.default!r})")
    args = p.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    preset = args.preset or ("ffhq256" if overrides.get("data") else "tiny")
    cfg = Config(**{**PRESETS[preset], **overrides})
    return cfg, args.resume, tuple(overrides)


if __name__ == "__main__":
    cfg, resume, overrides = parse_args()
    train(cfg, resume, overrides)
