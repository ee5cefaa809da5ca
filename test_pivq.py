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


@pytest.mark.parametrize("N,K", [(1, 3), (3, 3), (4, 7), (5, 9)])
def test_candidate_solver_is_optimal(N, K):
    """The GPU path's sparse solve on each row's N cheapest codes reaches the full optimum."""
    g = torch.Generator().manual_seed(K)
    for cost in (torch.rand(4, N, K, generator=g).double(), torch.randint(0, 3, (4, N, K), generator=g).double()):
        vals, cols = cost.topk(N, dim=-1, largest=False)
        for b, assigned in enumerate(pivq._solve_candidates((vals.numpy(), cols.numpy(), K))):
            assert len(set(assigned.tolist())) == N
            got = cost[b].gather(1, torch.as_tensor(assigned)[:, None]).sum().item()
            assert got == pytest.approx(brute_force_cost(cost[b].numpy()), abs=1e-9)


def test_optional_batched_solver_agrees():
    """The optional GPU backend (torch-linear-assignment): same contract, same optimum."""
    tla = pytest.importorskip("torch_linear_assignment")
    cost = torch.rand(8, 4, 7, generator=torch.Generator().manual_seed(0))
    got = tla.batch_linear_assignment(cost).long()
    for b in range(8):
        assert len(set(got[b].tolist())) == 4
        assert cost[b].gather(1, got[b][:, None]).sum().item() == pytest.approx(brute_force_cost(cost[b].double().numpy()), abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_matching_assign_on_gpu_is_optimal():
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(16, 6, 40, generator=g)
    cost[:, :, 0] = 0  # everyone collides
    got = matching_assign(cost.cuda()).cpu()
    want = matching_assign(cost)
    assert (pivq.distinct_per_image(got) == 6).all()
    torch.testing.assert_close(cost.gather(2, got[..., None]).sum((1, 2)), cost.gather(2, want[..., None]).sum((1, 2)))


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
    x = torch.stack([pivq.SyntheticFaces(16, seed=1)[i] for i in range(32)])  # held out
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        before = (pivq.PIVQ(cfg)(x)[0] - x).abs().mean().item()
    model = pivq.train(cfg).eval()
    with torch.no_grad():
        after = (model.decode(model.encode(x)) - x).abs().mean().item()
    assert after < 0.7 * before
    rows = [json.loads(l) for l in open(os.path.join(cfg.out, "log.jsonl"))]
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
    with pytest.raises(SystemExit, match="weights missing: .*vgg16-397923af.pth.*--perceptual-weight 0"):
        pivq.make_lpips("cpu")
    with pytest.raises(SystemExit, match="weights missing: .*vgg16-397923af.pth.*--features pixels"):
        pivq_eval.feature_extractor("vgg16", "cpu")


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


# --- faults ---------------------------------------------------------------------------------

SMALL_FLAGS = ["--image-size", "16", "--patch-size", "4", "--codes", "4", "--codebook-size", "16",
               "--code-dim", "8", "--width", "32", "--enc-depth", "1", "--dec-depth", "1", "--heads", "2",
               "--batch-size", "8", "--init-steps", "3", "--init-batches", "2", "--disc-channels", "8",
               "--disc-layers", "1", "--log-every", "1"]


def start_trainer(out, *flags):
    return subprocess.Popen([sys.executable, "pivq.py", "--out", str(out), *SMALL_FLAGS, *flags], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(out, n, proc, timeout=120):
    import time

    log, t = out / "log.jsonl", time.time()
    while time.time() - t < timeout and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"trainer did not reach {n} steps: {proc.communicate()[1][-2000:]}")


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = start_trainer(out, "--steps", "100000", "--save-every", "100000")
    wait_for_steps(out, 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "stopped by signal" in err and "Traceback" not in err
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["step"] >= 5
    r = start_trainer(out, "--steps", str(ckpt["step"] + 2), "--resume")
    assert r.wait(timeout=120) == 0
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == ckpt["step"] + 2


def test_sigkill_never_leaves_a_broken_checkpoint(tmp_path):
    out = tmp_path / "run"
    for kill_at in (4, 7, 10):  # a save every step: the kill lands in or near a write
        proc = start_trainer(out, "--steps", "100000", "--save-every", "1", "--init-steps", "0",
                             *(["--resume"] if kill_at > 4 else []))
        wait_for_steps(out, kill_at, proc)
        proc.kill()
        proc.wait()
        ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # complete and loadable
        assert ckpt["step"] >= 1 and pivq.load(str(out / "ckpt.pt"))[1].codes == 4
    (out / "ckpt.pt.tmp123").write_bytes(b"half")  # what a kill inside a save leaves: cleared at start
    assert start_trainer(out, "--steps", str(ckpt["step"] + 1), "--init-steps", "0", "--resume").wait(timeout=120) == 0
    assert not list(out.glob("ckpt.pt.tmp*"))


def test_non_finite_loss_is_skipped_then_stops(tmp_path, monkeypatch):
    real = pivq.train_step
    poison = {3}
    monkeypatch.setattr(pivq, "train_step",
                        lambda model, disc, opt, opt_d, x, step, *a: real(model, disc, opt, opt_d,
                                                                        x * float("nan") if step in poison else x, step, *a))
    cfg = small(tmp_path, steps=8, init_steps=2, log_every=1)
    model = pivq.train(cfg)
    rows = [json.loads(l) for l in open(os.path.join(cfg.out, "log.jsonl"))]
    assert rows[-1]["bad_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = torch.load(os.path.join(cfg.out, "ckpt.pt"), weights_only=True)["model"]
    poison.update(range(8, 100))  # now every step: the run stops, the last good checkpoint stays
    with pytest.raises(SystemExit, match="non-finite losses in a row"):
        pivq.train(Config(**{**cfg.__dict__, "steps": 30}), resume=True, overrides=("steps",))
    after = torch.load(os.path.join(cfg.out, "ckpt.pt"), weights_only=True)["model"]
    assert all(torch.equal(saved[k], after[k]) for k in saved)


def test_checkpoint_loading_runs_no_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"config": {}, "x": Evil()}, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match="not a PI-VQ checkpoint"):
        pivq.load(str(tmp_path / "ckpt.pt"))
    assert not (tmp_path / "pwned").exists()


# --- DDP ------------------------------------------------------------------------------------


def _ddp_worker(rank, world, port, cfg, result_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    real = pivq.train_step
    # a NaN on rank 1 only, at step 9 (quantized, GAN on): both ranks must skip that step together
    pivq.train_step = lambda model, disc, opt, opt_d, x, step, *a: real(
        model, disc, opt, opt_d, x * float("nan") if (rank, step) == (1, 9) else x, step, *a)
    model = pivq.train(cfg)
    torch.save(model.state_dict(), os.path.join(result_dir, f"rank{rank}.pt"))


def test_ddp_two_processes_agree(tmp_path):
    import socket
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = small(tmp_path, steps=12, init_steps=4, disc_start=8, log_every=4, device="cpu")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, cfg, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(240)
            assert p.exitcode == 0, "a rank failed or hung"
    finally:
        for p in (p for p in procs if p.is_alive()):
            p.kill()
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert bool(a["quantizer.initialized"]) and torch.equal(a["quantizer.codebook"], b["quantizer.codebook"])
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between ranks"
    ddp_rows = [json.loads(l) for l in open(os.path.join(cfg.out, "log.jsonl"))]
    assert ddp_rows[-1]["bad_steps"] == 1
    single = small(tmp_path / "single", steps=12, init_steps=4, disc_start=8, log_every=4)
    pivq.train(single)
    one_rows = [json.loads(l) for l in open(os.path.join(single.out, "log.jsonl"))]
    assert abs(ddp_rows[-1]["rec"] - one_rows[-1]["rec"]) < 0.25 * one_rows[-1]["rec"]


# --- sampling and evaluation -------------------------------------------------------------------

import eval as pivq_eval  # noqa: E402  (the repo's eval.py)
import sample  # noqa: E402


def prdc_by_definition(real, fake, k):
    """PRDC written straight from Naeem et al. 2020 on full distance matrices (no chunks)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    d_ff = np.linalg.norm(fake[:, None] - fake[None], axis=-1)
    d_rf = np.linalg.norm(real[:, None] - fake[None], axis=-1)
    r = np.sort(d_rr, axis=1)[:, k]  # k-th neighbour, index 0 being the point itself
    s = np.sort(d_ff, axis=1)[:, k]
    return dict(precision=np.mean([(d_rf[:, j] < r).any() for j in range(len(fake))]),
                recall=np.mean([(d_rf[i] < s).any() for i in range(len(real))]),
                density=np.mean([(d_rf[:, j] < r).sum() for j in range(len(fake))]) / k,
                coverage=np.mean([d_rf[i].min() < r[i] for i in range(len(real))]))


def test_prdc_matches_definitions_in_chunks():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(150, 8)), rng.normal(0.3, 1.2, size=(120, 8))
    want = prdc_by_definition(real, fake, 5)
    for chunk in (7, 1024):
        got = pivq_eval.compute_prdc(real, fake, 5, chunk=chunk)
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert 0 < want["precision"] < 1 and 0 < want["coverage"] < 1, "a case where the metrics discriminate"


def test_prdc_matches_reference_package():
    prdc = pytest.importorskip("prdc")
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(200, 16)).astype(np.float32), rng.normal(0.2, 1.1, size=(180, 16)).astype(np.float32)
    want = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=5)
    got = pivq_eval.compute_prdc(real, fake, 5, chunk=64)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_capacity_formula():
    assert pivq_eval.capacity_bits(10, 3) == pytest.approx(np.log2(120))
    assert pivq_eval.capacity_bits(1024, 64) == pytest.approx(
        sum(np.log2(1024 - i) - np.log2(i + 1) for i in range(64)), rel=1e-9)
    assert pivq_eval.capacity_bits(5, 1) == pytest.approx(np.log2(5))
    assert pivq_eval.capacity_bits(2, 5) == 0.0


def test_probe_beats_majority_on_linear_attribute():
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(32, generator=g)[:6] for _ in range(400)])
    y = (idx == 3).any(1).float()  # the attribute is "code 3 is in the set"
    acc, majority = pivq_eval.logistic_probe(pivq_eval.bag_of_codes(idx, 32), y)
    assert acc > 0.95 and acc > majority + 0.1


def test_every_sample_and_frame_has_distinct_codes():
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(20, 4, generator=g)
    a = torch.stack([torch.randperm(20, generator=g)[:6] for _ in range(50)])
    b = torch.stack([torch.randperm(20, generator=g)[:6] for _ in range(50)])  # overlapping sets
    a2, b2 = sample.pair_sets(codebook, a, b)
    assert all(set(b2[i].tolist()) == set(b[i].tolist()) for i in range(50)), "b' reorders b"
    for trial in range(20):
        mixed = sample.mix(a2, b2, torch.rand(a.shape, generator=g) < 0.5)
        assert (pivq.distinct_per_image(mixed) == 6).all()
    rep_a, rep_b = torch.tensor([[1, 1, 2, 5]]), torch.tensor([[5, 3, 3, 1]])  # nearest: multisets
    _, rep_b2 = sample.pair_sets(codebook, rep_a, rep_b)
    assert sorted(rep_b2[0].tolist()) == [1, 3, 3, 5] and rep_b2[0, 0] == 1 and rep_b2[0, 3] == 5
    frames = sample.interpolation_sets(codebook, a[0], b[0], steps=7)
    assert frames.shape == (7, 6) and (pivq.distinct_per_image(frames) == 6).all()
    assert torch.equal(frames[0], a[0]) and set(frames[-1].tolist()) == set(b[0].tolist())


def test_interpolation_endpoints_are_reconstructions(tmp_path):
    model, x = initialized_model(tmp_path, codes=8, codebook_size=16)
    a, b = model.encode(x[:2])
    frames = model.decode(sample.interpolation_sets(model.quantizer.codebook, a, b, steps=5))
    rec = model.decode(model.encode(x[:2]))
    torch.testing.assert_close(frames[0], rec[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(frames[-1], rec[1], atol=1e-5, rtol=0)
    assert (frames[2] - rec[0]).abs().max() > 1e-3, "the middle frame is neither endpoint"


def test_sample_and_eval_commands(tmp_path):
    cfg = small(tmp_path, steps=6, init_steps=2)
    pivq.train(cfg)
    ckpt = os.path.join(cfg.out, "ckpt.pt")
    sample.main(["--ckpt", ckpt, "--n", "6", "--out", str(tmp_path / "s")])
    assert len(list((tmp_path / "s").glob("0*.png"))) == 6 and (tmp_path / "s" / "grid.png").exists()
    sample.main(["--ckpt", ckpt, "--interpolate", str(tmp_path / "s" / "00000.png"), str(tmp_path / "s" / "00001.png"),
                 "--steps", "4", "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "interpolation.png").exists()
    r = subprocess.run([sys.executable, "eval.py", "--ckpt", ckpt, "--n", "40", "--prdc", "--features", "pixels",
                        "--samples", str(tmp_path / "s")], cwd=HERE, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("mse", "psnr", "codebook_usage", "perplexity", "distinct_per_image", "capacity_bits",
                "precision", "recall", "density", "coverage", "attr_acc", "attr_majority"):
        assert key in res
    assert res["distinct_per_image"] == 4 and res["capacity_bits"] > 0
