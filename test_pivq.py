"""Tests for PI-VQ: exactness of the matching, invariance of the decoder, delayed init, training,
checkpoints, resume, and the handling of bad input. CPU only, no downloaded weights."""

import itertools
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import pivq
from pivq import Config, matching_assign, nearest_assign

HERE = os.path.dirname(os.path.abspath(__file__))


def small(tmp_path, **kw):
    """A config small enough to train a few dozen steps in seconds."""
    base = dict(image_size=16, patch_size=4, codes=4, codebook_size=16, code_dim=8, width=32,
                enc_depth=1, dec_depth=1, set_depth=1, heads=2, batch_size=8, init_steps=5,
                init_batches=2, steps=20, warmup=5, lr=2e-3, disc_start=10, disc_channels=8,
                disc_layers=1, log_every=5, save_every=10, out=str(tmp_path / "run"))
    return Config(**{**base, **kw})


def brute_force_cost(cost):
    """Minimal total cost over all injective assignments of N rows to K columns."""
    N, K = cost.shape
    return min(sum(cost[i, c] for i, c in enumerate(cols)) for cols in itertools.permutations(range(K), N))


# --- the quantizers ----------------------------------------------------------


@pytest.mark.parametrize("N,K", [(1, 1), (1, 5), (2, 2), (3, 3), (3, 6), (4, 4), (4, 7), (5, 6)])
def test_matching_assign_is_optimal_and_distinct(N, K):
    g = torch.Generator().manual_seed(N * 100 + K)
    for kind in ("random", "tied", "collide"):
        if kind == "random":
            cost = torch.rand(6, N, K, generator=g)
        elif kind == "tied":  # few distinct values: many optimal answers, all must reach the optimum
            cost = torch.randint(0, 3, (6, N, K), generator=g).float()
        else:  # every row prefers the same column: nearest collides, matching must resolve it
            cost = torch.rand(6, N, K, generator=g) + 1.0
            cost[:, :, 0] = 0.0
        idx = matching_assign(cost)
        assert idx.shape == (6, N) and idx.dtype == torch.long
        for b in range(6):
            assert len(set(idx[b].tolist())) == N, "codes of one image must be distinct"
            got = cost[b].gather(1, idx[b][:, None]).sum().item()
            assert got == pytest.approx(brute_force_cost(cost[b].double().numpy()), abs=1e-5)


def test_matching_assign_large_against_scipy():
    """The candidate-restricted solve must give the dense optimum at a realistic size."""
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 16, generator=g)  # clustered, like encoder outputs: many collisions
    z = centers[torch.randint(0, 8, (16, 32), generator=g)] + 0.1 * torch.randn(16, 32, 16, generator=g)
    cost = pivq.squared_distances(z, torch.randn(200, 16, generator=g))
    idx = matching_assign(cost.clone())
    assert (pivq.distinct_per_image(idx) == 32).all()
    for b in range(16):
        r, c = linear_sum_assignment(cost[b].numpy())
        assert cost[b].gather(1, idx[b][:, None]).sum().item() == pytest.approx(cost[b].numpy()[r, c].sum(), rel=1e-6)


def test_nearest_assign_is_argmin():
    cost = torch.rand(5, 7, 11)
    assert torch.equal(nearest_assign(cost), cost.argmin(-1))


def test_squared_distances():
    z, c = torch.randn(3, 5, 4), torch.randn(9, 4)
    torch.testing.assert_close(pivq.squared_distances(z, c), torch.cdist(z, c[None].expand(3, -1, -1)) ** 2,
                               atol=1e-4, rtol=1e-4)


# --- the model ---------------------------------------------------------------


def initialized_model(tmp_path, **kw):
    torch.manual_seed(0)
    model = pivq.PIVQ(small(tmp_path, **kw)).eval()
    x = torch.stack([pivq.SyntheticFaces(16)[i] for i in range(8)])
    model.quantizer.init_codebook(model.encoder(x).flatten(0, 1).detach())
    return model, x


def test_decoder_is_permutation_invariant(tmp_path):
    model, x = initialized_model(tmp_path)
    idx = torch.randint(0, 16, (8, 4))
    out = model.decode(idx)
    for seed in range(5):
        perm = torch.randperm(4, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(model.decode(idx[:, perm]), out, atol=1e-5, rtol=0)
    # ...while changing the set does change the image (the check above is not vacuous)
    assert (model.decode((idx + 1) % 16) - out).abs().max() > 1e-3


def test_encode_gives_distinct_codes_under_matching(tmp_path):
    model, x = initialized_model(tmp_path, codes=8, codebook_size=16)
    idx = model.encode(x)
    assert idx.shape == (8, 8)
    assert (pivq.distinct_per_image(idx) == 8).all()
    nearest, _ = initialized_model(tmp_path, codes=8, codebook_size=16, quantizer="nearest")
    assert torch.equal(nearest.encode(x), pivq.squared_distances(nearest.encoder(x), nearest.quantizer.codebook).argmin(-1))


def test_init_codebook_from_encoder_outputs():
    q = pivq.Quantizer(Config(codes=4, codebook_size=8, code_dim=3))
    z = torch.randn(50, 3)
    q.init_codebook(z, method="sample")
    assert all((z == c).all(1).any() for c in q.codebook), "sample: every code is an encoder output"
    q.init_codebook(z, method="kmeans")
    a = pivq.squared_distances(z[None], q.codebook.detach())[0].argmin(1)
    for k in range(8):  # k-means: each code is the mean of the outputs nearest to it
        if (a == k).any():
            torch.testing.assert_close(q.codebook[k].detach(), z[a == k].mean(0), atol=1e-4, rtol=1e-4)
    assert bool(q.initialized)


def test_delayed_init_in_training(tmp_path):
    cfg = small(tmp_path, steps=4, init_steps=5)
    torch.manual_seed(cfg.seed)
    before = pivq.PIVQ(cfg).quantizer.codebook.detach().clone()
    model = pivq.train(cfg)
    assert not model.quantizer.initialized and torch.equal(model.quantizer.codebook.detach(), before)
    x = torch.stack([pivq.SyntheticFaces(16)[i] for i in range(4)])
    assert model(x)[2] is None, "no quantization before init_steps"
    model = pivq.train(cfg.__class__(**{**cfg.__dict__, "steps": 6}), resume=True, overrides=("steps",))
    assert model.quantizer.initialized and not torch.equal(model.quantizer.codebook.detach(), before)
    _, vq_loss, idx = model(x)
    assert idx is not None and idx.shape == (4, 4) and vq_loss > 0
    rows = [json.loads(l) for l in open(os.path.join(cfg.out, "log.jsonl"))]
    assert rows[-1]["distinct"] == 4 and rows[0]["distinct"] is None


# --- training, checkpoints, resume --------------------------------------------


def test_training_reduces_reconstruction_loss(tmp_path):
    cfg = small(tmp_path, steps=60, init_steps=20, log_every=10, disc_start=40)
    pivq.train(cfg)
    rows = [json.loads(l) for l in open(os.path.join(cfg.out, "log.jsonl"))]
    assert rows[-1]["rec"] < 0.8 * rows[0]["rec"]
    assert rows[-1]["d"] > 0, "the discriminator was switched on after disc_start"
    assert os.path.isfile(os.path.join(cfg.out, "recon.png"))


def test_checkpoint_round_trip(tmp_path):
    cfg = small(tmp_path, steps=8, init_steps=2)
    model = pivq.train(cfg).eval()
    loaded, cfg2 = pivq.load(os.path.join(cfg.out, "ckpt.pt"))
    assert cfg2 == cfg and not loaded.training
    idx = torch.randint(0, 16, (3, 4))
    assert torch.equal(loaded.decode(idx), model.decode(idx))


def stop_at(monkeypatch, at):
    """Send this process SIGTERM during step `at`, as a preemption would."""
    real = pivq.train_step

    def step(*args, **kw):
        if args[5] == at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kw)

    monkeypatch.setattr(pivq, "train_step", step)


def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    full = small(tmp_path / "a", steps=16, disc_start=6)
    pivq.train(full)
    part = small(tmp_path / "b", steps=16, disc_start=6)
    stop_at(monkeypatch, 8)  # after init, before the discriminator
    pivq.train(part)
    assert torch.load(os.path.join(part.out, "ckpt.pt"), weights_only=True)["step"] == 9, "SIGTERM saves"
    monkeypatch.undo()
    pivq.train(part, resume=True)
    a = torch.load(os.path.join(full.out, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(part.out, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 16
    for part_name in ("model", "disc", "opt", "opt_d"):
        flat_a, flat_b = flatten(a[part_name]), flatten(b[part_name])
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            va, vb = flat_a[k], flat_b[k]
            same = torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb
            assert same, f"{part_name}{k} differs after resume"


def flatten(d, prefix=""):
    if isinstance(d, dict):
        return {k2: v2 for k, v in d.items() for k2, v2 in flatten(v, f"{prefix}.{k}").items()}
    if isinstance(d, (list, tuple)):
        return {k2: v2 for i, v in enumerate(d) for k2, v2 in flatten(v, f"{prefix}[{i}]").items()}
    return {prefix: d}


def test_resume_rejects_other_config(tmp_path):
    cfg = small(tmp_path, steps=2)
    pivq.train(cfg)
    with pytest.raises(SystemExit, match="--codes 4 \\(not 8\\)"):
        pivq.train(Config(**{**cfg.__dict__, "codes": 8}), resume=True, overrides=("codes",))
    with pytest.raises(SystemExit, match="exists: add --resume"):
        pivq.train(cfg)


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        pivq.train(small(tmp_path), resume=True)


def test_cli_rejects_bad_flags(tmp_path):
    for args, msg in ((["--quantizer", "best"], "invalid choice"), (["--codes", "many"], "invalid int"),
                      (["--codes", "64", "--codebook-size", "32"], "smaller than --codes"),
                      (["--image-size", "30"], "not a multiple of --patch-size")):
        r = subprocess.run([sys.executable, "pivq.py", "--out", str(tmp_path / "x"), *args], cwd=HERE,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr


def test_missing_vgg_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(SystemExit, match="VGG16 weights missing: .*vgg16-397923af.pth.*--perceptual-weight 0"):
        pivq.make_lpips("cpu")


def test_lpips_loss_trains_with_random_trunk(tmp_path):
    """The perceptual path runs end to end (random VGG trunk: no download)."""
    cfg = small(tmp_path, perceptual_weight=1.0)
    model, x = initialized_model(tmp_path)
    disc = pivq.Discriminator(cfg)
    opt, opt_d = pivq.make_optimizers(model.train(), disc, cfg)
    s = pivq.train_step(model, disc, opt, opt_d, x, 0, cfg, pivq.make_lpips("cpu", pretrained=False))
    assert s["finite"] and s["perceptual"] > 0


# --- data and bad input ----------------------------------------------------------


def test_synthetic_faces_deterministic_and_varied():
    a, b = pivq.SyntheticFaces(32, seed=3), pivq.SyntheticFaces(32, seed=3)
    assert torch.equal(a[5], b[5]) and a[5].shape == (3, 32, 32)
    assert a[5].min() >= -1 and a[5].max() <= 1
    assert not torch.equal(a[5], a[6])
    attrs = torch.stack([a.attributes(i) for i in range(200)])
    assert attrs.shape == (200, len(pivq.ATTRIBUTES))
    assert ((attrs.mean(0) > 0.3) & (attrs.mean(0) < 0.7)).all(), "every attribute varies"
    assert torch.equal(pivq.draw_face(64, 9)[1], pivq.draw_face(8, 9)[1]), "attributes do not depend on size"


def write_images(folder, n=3, size=(40, 30), mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
        Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(folder / f"img{i}.png")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images found"):
        pivq.ImageFolder(str(tmp_path / "empty"), 16)
    with pytest.raises(SystemExit, match="no such folder"):
        pivq.ImageFolder(str(tmp_path / "missing"), 16)


def test_folder_of_non_images(tmp_path):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "a.txt").write_text("hello")
    with pytest.raises(SystemExit, match="no images found"):
        pivq.ImageFolder(str(d), 16)
    (d / "fake.png").write_text("not a png")
    with pytest.raises(SystemExit, match="can be read"):
        pivq.ImageFolder(str(d), 16)


def test_corrupt_image_is_skipped_and_counted(tmp_path, capsys):
    d = tmp_path / "data" / "sub"  # nested, as in FFHQ's folders
    write_images(d, n=5)
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    ds = pivq.ImageFolder(str(tmp_path / "data"), 16)
    assert len(ds) == 6
    x, skipped = pivq.collate([ds[i] for i in range(len(ds))])
    assert x.shape == (5, 3, 16, 16) and skipped == 1
    assert "skipping unreadable image" in capsys.readouterr().err
    cfg = small(tmp_path, data=str(tmp_path / "data"), steps=4, init_steps=2, batch_size=6)
    pivq.train(cfg)  # a bad file in every batch does not stop the run
    rows = [json.loads(l) for l in open(os.path.join(cfg.out, "log.jsonl"))]
    assert rows[-1]["skipped_images"] == 4


@pytest.mark.parametrize("mode,size", [("L", (40, 30)), ("RGBA", (30, 40)), ("RGB", (5, 3))])
def test_odd_images_become_rgb_squares(tmp_path, mode, size):
    write_images(tmp_path / "d", n=1, size=size, mode=mode)
    x = pivq.ImageFolder(str(tmp_path / "d"), 16)[0]
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_fewer_images_than_batch(tmp_path):
    write_images(tmp_path / "few", n=3)
    cfg = small(tmp_path, data=str(tmp_path / "few"), steps=3, init_steps=1, init_batches=2, batch_size=8)
    pivq.train(cfg)
    assert pivq.load(os.path.join(cfg.out, "ckpt.pt"))[1].steps == 3


def test_stream_sampler_shards_and_resumes():
    full = pivq.StreamSampler(10, 4, seed=1)
    it = iter(full)
    first = [next(it) for _ in range(6)]
    assert all(len(b) == 4 for b in first)
    assert sorted(sum(first[:2], []) + first[2][:2]) == list(range(10)), "an epoch covers the data once"
    later = iter(pivq.StreamSampler(10, 4, seed=1, start_batch=3))
    assert [next(later) for _ in range(3)] == first[3:]
    ranks = [iter(pivq.StreamSampler(10, 4, seed=1, rank=r, world=2)) for r in range(2)]
    for b in first[:3]:
        parts = [next(r) for r in ranks]
        assert sorted(parts[0] + parts[1]) == sorted(b)
