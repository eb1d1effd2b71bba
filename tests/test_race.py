"""The denoising race: noise models, Rician bias correction, SURE against the true error, the
blend, and the CLI on real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from napari_strainer.errors import BadArgumentError, BadInputError
from napari_strainer.io.scan import Scan
from napari_strainer.restore import race
from napari_strainer.restore.noise import (
    estimate_sigma,
    noise_model,
    rician_mean,
    rician_unbias,
    rician_variance,
)
from napari_strainer.restore.plan import Options, make_plan, run


def phantom(shape=(24, 48, 48), seed=0) -> np.ndarray:
    """Nested ellipsoids of different intensities on a dark background, with a smooth ramp."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = (z / 0.9) ** 2 + (y / 0.8) ** 2 + (x / 0.7) ** 2
    img = 0.6 * (r < 1) + 0.3 * ((z / 0.4) ** 2 + (y / 0.3) ** 2 + ((x - 0.2) / 0.25) ** 2 < 1)
    img += 0.1 * (r < 1) * (1 + y)
    rng = np.random.default_rng(seed)
    blobs = rng.uniform(-0.5, 0.5, (6, 3))
    for c in blobs:
        img -= 0.25 * (((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) < 0.02) * (r < 1)
    return np.clip(img, 0, None).astype(np.float32)


def rician(clean: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.hypot(clean + sigma * rng.standard_normal(clean.shape),
                    sigma * rng.standard_normal(clean.shape)).astype(np.float32)


def psnr(x, ref) -> float:
    return float(10 * np.log10(np.ptp(ref) ** 2 / np.mean((x - ref) ** 2)))


def test_rician_mean_unbias_and_variance_match_simulation():
    rng = np.random.default_rng(0)
    for value in (0.0, 0.7, 2.0, 6.0):
        m = np.hypot(value + rng.standard_normal(400_000), rng.standard_normal(400_000))
        assert rician_mean(np.array(value), 1.0) == pytest.approx(m.mean(), rel=5e-3)
        assert rician_variance(np.array(value), 1.0) == pytest.approx(m.var(), rel=2e-2)
    values = np.array([0.0, 0.3, 1.0, 3.0, 20.0, 100.0])
    np.testing.assert_allclose(rician_unbias(rician_mean(values, 2.0), 2.0), values,
                               atol=1e-3)
    assert rician_unbias(np.array([0.5, 1.0]), 1.0).tolist() == [0.0, 0.0]  # below the floor


def ncchi(clean: np.ndarray, sigma: float, coils: int, seed: int = 1) -> np.ndarray:
    """Root sum of squares of ``coils`` complex channels, the signal in the first."""
    rng = np.random.default_rng(seed)
    power = (clean + sigma * rng.standard_normal(clean.shape)) ** 2
    power += (sigma * rng.standard_normal(clean.shape)) ** 2
    for _ in range(2 * coils - 2):
        power += (sigma * rng.standard_normal(clean.shape)) ** 2
    return np.sqrt(power).astype(np.float32)


def test_non_central_chi_moments_match_simulation():
    rng = np.random.default_rng(0)
    for coils in (2, 4, 8):
        for value in (0.0, 1.0, 3.0, 10.0):
            m = ncchi(np.full(300_000, value), 1.0, coils, seed=coils)
            assert rician_mean(np.array(value), 1.0, coils) == pytest.approx(m.mean(), rel=5e-3)
            assert rician_variance(np.array(value), 1.0, coils) == pytest.approx(m.var(),
                                                                                rel=3e-2)
        values = rng.uniform(0, 60, 50)
        np.testing.assert_allclose(rician_unbias(rician_mean(values, 2.0, coils), 2.0, coils),
                                   values, atol=1e-3)


def test_race_with_the_coil_count_darkens_a_non_central_chi_background(monkeypatch):
    monkeypatch.setattr(race, "BM4D_MAX_VOXELS", 0)
    clean = phantom((16, 48, 48), seed=8)
    noisy = ncchi(clean, 0.04, coils=4, seed=9)
    scan = Scan(noisy, np.eye(4), meta={"modality": "MR"})
    four = run(make_plan(scan, Options(task="denoise", coils=4), eta=False))
    one = run(make_plan(scan, Options(task="denoise"), eta=False))  # taken as Rician
    assert four.history["noise"]["coils"] == 4
    assert "non-central chi of 4 coils" in four.history["noise"]["text"]
    assert four.history["noise"]["sigma"] == pytest.approx(0.04, rel=0.2)
    background = clean == 0
    assert noisy[background].mean() > 2.5 * 0.04  # four coils lift the floor to 2.7 sigma
    assert four.scan.data[background].mean() < 0.3 * 0.04
    assert psnr(four.scan.data, clean) > psnr(one.scan.data, clean) + 3
    with pytest.raises(BadArgumentError, match="--coils 2 describes magnitude data"):
        make_plan(scan, Options(task="denoise", coils=2, noise="gaussian"))
    with pytest.raises(BadArgumentError, match="--coils must be an integer >= 1"):
        make_plan(scan, Options(task="denoise", coils=0))


def test_sigma_of_rician_volume_ignores_the_dark_background():
    clean = phantom((32, 64, 64))
    clean[:, :, :20] = 0  # a large empty background, where Rician noise is Rayleigh
    noisy = rician(clean, 0.05)
    every_block = estimate_sigma(noisy)
    assert estimate_sigma(noisy, signal_only=True) == pytest.approx(0.05, rel=0.1)
    assert every_block < 0.9 * 0.05  # why signal_only exists


def test_noise_model_by_modality_and_values():
    mr = rician(phantom(), 0.05) * 1000
    m = noise_model(mr, "MR")
    assert m.kind == "rician" and m.sigma == pytest.approx(50, rel=0.15)
    assert noise_model(mr, "OT").kind == "rician"  # NIfTI: non-negative magnitude data
    assert noise_model(mr - 500, "OT").kind == "gaussian"
    assert noise_model(mr, "CT").kind == "gaussian"
    assert noise_model(mr, "MR", "gaussian", 12.5).sigma == 12.5
    with pytest.raises(BadArgumentError, match="ct.nii: --noise rician needs magnitude"):
        noise_model(mr - 1024, "CT", "rician", name="ct.nii")
    with pytest.raises(BadArgumentError, match="--noise must be one of"):
        noise_model(mr, "MR", "poisson")


@pytest.mark.parametrize("kind", ["gaussian", "rician"])
def test_sure_tracks_true_error_and_the_blend_is_never_worse(kind):
    clean = phantom()
    sigma = 0.06
    if kind == "rician":
        noisy, target = rician(clean, sigma), rician_mean(clean, sigma)
    else:
        noisy = clean + sigma * np.random.default_rng(2).standard_normal(clean.shape)
        noisy, target = noisy.astype(np.float32), clean
    cands = [c for c in race.candidates(clean.shape) if c.name != "BM4D"]
    outs = {}
    res = race.race(noisy, sigma, kind, cands, seed=0,
                    callback=lambda p: outs.setdefault(p.phase, p.preview()))
    assert list(outs) == [c.name for c in cands] and cands[-1].name == race.WIENER
    region = res.region  # Rician: where the signal is (SURE's Gaussian approximation holds)
    assert region.all() if kind == "gaussian" else 0.15 < region.mean() < 0.9
    true = {k: float(np.mean((v - target)[region] ** 2)) for k, v in outs.items()}
    for name, est in res.risks.items():  # SURE within 15% of the true error, every candidate
        assert est == pytest.approx(true[name], rel=0.15), name
    order = sorted(true, key=true.get)
    assert min(res.risks, key=res.risks.get) in order[:2]
    blend_true = float(np.mean((res.mean - target)[region] ** 2))
    assert res.risk <= min(res.risks.values()) + 1e-12
    assert blend_true <= 1.03 * min(true.values())
    assert sum(res.weights.values()) == pytest.approx(1.0)


def test_default_denoise_beats_dipy_rician_nlm_and_darkens_the_background():
    from dipy.denoise.nlmeans import nlmeans
    from dipy.denoise.noise_estimate import estimate_sigma as dipy_sigma

    clean = phantom((24, 56, 56), seed=3)
    sigma = 0.05
    noisy = rician(clean, sigma, seed=4)
    scan = Scan(noisy, np.diag([1.0, 1.0, 1.0, 1.0]), meta={"modality": "MR"})
    plan = make_plan(scan, Options(task="denoise"), eta=False)
    assert plan.path == "race" and plan.noise["model"] == "rician"
    res = run(plan)
    out = res.scan.data
    dipy = nlmeans(noisy, sigma=float(np.mean(dipy_sigma(noisy, N=0))), rician=True)
    assert psnr(out, clean) > psnr(dipy, clean)
    background = clean == 0
    assert noisy[background].mean() > 1.1 * sigma  # Rician: lifted
    assert out[background].mean() < 0.3 * sigma  # corrected
    h = res.history
    assert h["path"] == "race" and h["race"]["psnr_estimate"] > psnr(noisy, clean)
    assert abs(sum(h["race"]["weights"].values()) - 1) < 1e-9


def test_a_large_volume_races_slab_by_slab_with_bounded_memory_and_no_seams(monkeypatch):
    monkeypatch.setattr(race, "BM4D_MAX_VOXELS", 0)  # as the product installs
    clean = phantom((48, 28, 28), seed=2)
    scan = Scan(rician(clean, 0.05, seed=3), np.eye(4), meta={"modality": "MR"})
    whole = run(make_plan(scan, Options(task="denoise"), eta=False))
    monkeypatch.setattr(race, "SLAB_VOXELS", 15_000)
    monkeypatch.setattr(race, "SLAB_MARGIN", 4)
    assert race.slabs(48, 28 * 28) == [(0, 20, 0, 16), (12, 36, 16, 32), (28, 48, 32, 48)]
    weights = sum(np.pad(race._fade(a, b, lo, hi, 48), (a, 48 - b))
                  for a, b, lo, hi in race.slabs(48, 28 * 28))
    assert np.allclose(weights, 1.0)  # the cross-fades sum to one on every slice
    plan = make_plan(scan, Options(task="denoise"), eta=False)
    assert "in 3 slabs of about 16 slices" in plan.route
    unslabbed = race.memory_bytes(clean.shape, len(race.candidates(clean.shape)), clean.size)
    fixed = race.WIENER_BYTES  # one slab's worth and the scan's copies
    assert plan.memory_bytes - fixed < 0.6 * (unslabbed - fixed)
    seen = []
    res = run(plan, callback=lambda p: seen.append((p.step, p.total, p.phase, p.slices)))
    per_slab = 2 * len(res.history["race"]["candidates"])
    assert [s[0] for s in seen] == list(range(2, 3 * per_slab + 1, 2))
    assert seen[0][1:] == (3 * per_slab, "slab 1/3: NLM 1s p1", (0, 20))
    assert seen[-1][2].startswith("slab 3/3") and seen[-1][3] == (28, 48)
    h = res.history["race"]
    assert "(mean over 3 slabs)" in h["winner"] and sum(h["weights"].values()) == \
        pytest.approx(1.0)
    a, b = whole.scan.data, res.scan.data
    assert psnr(b, clean) > psnr(a, clean) - 0.15  # slabs cost no quality
    # slabs blend a little differently (at most a fifth of sigma per slice); no seam: the cross-
    # fades around the cuts at 16 and 32 stay between their slabs, not above them
    per_slice = np.abs(a - b).mean(axis=(1, 2))
    fades = np.r_[12:20, 28:36]
    assert per_slice.max() < 0.25 * 0.05
    assert per_slice[fades].max() <= np.delete(per_slice, fades).max() + 1e-4
    assert psnr(b, clean) > psnr(scan.data, clean) + 5


def test_nan_voxels_are_refused_with_their_count():
    data = rician(phantom(), 0.05)
    data[0, :3, :5] = np.nan
    scan = Scan(data, np.eye(4), source="scan.nii.gz")
    with pytest.raises(BadInputError, match="scan.nii.gz: 15 voxels are not finite"):
        make_plan(scan, Options(task="denoise"))


def test_a_race_that_cannot_fit_in_memory_is_refused_before_it_starts(monkeypatch):
    from napari_strainer.restore import plan as plan_module

    scan = Scan(rician(phantom(), 0.05), np.eye(4), source="big.nii.gz")
    monkeypatch.setattr(plan_module, "available_bytes", lambda device: 1 << 20)  # 1 MiB free
    with pytest.raises(BadInputError, match=r"big.nii.gz: the denoising race needs about "
                                            r"\d+ MiB for 55,296 voxels, but 1 MiB is free"):
        make_plan(scan, Options(task="denoise"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "napari_strainer.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600, check=False)


def test_cli_denoise_real_nifti_prints_winner_noise_and_estimate(tmp_path):
    clean = phantom((20, 48, 40), seed=5) * 800
    noisy = rician(clean, 40, seed=6)
    src = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(noisy.transpose(2, 1, 0), np.diag([1.2, 1.0, 1.0, 1.0])), src)
    out, hist = tmp_path / "out.nii.gz", tmp_path / "h.json"
    r = _cli("denoise", src, "-o", out, "--history", hist)
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert "denoised by" in last and "noise rician sigma" in last and "estimated PSNR" in last
    h = json.loads(hist.read_text())
    assert h["noise"]["sigma"] == pytest.approx(40, rel=0.15)
    restored = np.asarray(nib.load(out).dataobj, np.float32).transpose(2, 1, 0)
    assert psnr(restored, clean) > psnr(noisy, clean) + 5
    plan = _cli("denoise", src, "-o", tmp_path / "x.nii.gz", "--plan")
    assert "path: race" in plan.stdout and "rician" in plan.stdout
    assert not (tmp_path / "x.nii.gz").exists()


def test_cli_rician_on_ct_values_is_one_line_exit_2(tmp_path):
    hu = (np.random.default_rng(0).normal(0, 30, (6, 32, 32)) - 1000).astype(np.float32)
    src = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.eye(4)), src)
    r = _cli("denoise", src, "-o", tmp_path / "o.nii.gz", "--noise", "rician")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--noise rician needs magnitude" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o.nii.gz").exists()


def test_a_stopped_race_resumes_its_finished_slabs(tmp_path, monkeypatch):
    import threading

    from napari_strainer.restore.noise import NoiseModel

    monkeypatch.setattr(race, "BM4D_MAX_VOXELS", 0)
    monkeypatch.setattr(race, "SLAB_MARGIN", 4)
    clean = phantom((48, 24, 24), seed=4)
    scan = Scan(rician(clean, 0.05, seed=5), np.eye(4))
    model, key = NoiseModel("rician", 0.05, "given", "test"), {"input": "scan.nii.gz"}
    full = race.denoise(scan, model, slab_voxels=10_000, workdir=tmp_path / "a", key=key)
    stop = threading.Event()

    def stop_in_slab_2(p):
        if p.phase.startswith("slab 2/3"):
            stop.set()

    race.denoise(scan, model, slab_voxels=10_000, workdir=tmp_path / "b", key=key,
                 cancel=stop, callback=stop_in_slab_2)
    assert sorted(p.name for p in (tmp_path / "b").glob("slab*.json")) == ["slab000.json"]
    again = race.denoise(scan, model, slab_voxels=10_000, workdir=tmp_path / "b", key=key)
    assert again.history["race"]["slabs_resumed"] == 1
    # equal to the uninterrupted race (up to dipy's multithreaded NLM, not bit-reproducible)
    assert np.abs(again.scan.data - full.scan.data).mean() < 1e-4
    assert psnr(again.scan.data, clean) == pytest.approx(psnr(full.scan.data, clean), abs=0.01)
    other = race.denoise(scan, model, slab_voxels=10_000, workdir=tmp_path / "b",
                         key={"input": "another.nii.gz"})  # another scan: nothing reused
    assert other.history["race"]["slabs_resumed"] == 0


def test_torchrun_spreads_one_volumes_slabs_over_two_ranks(tmp_path):
    """``batch denoise --spread slabs`` under torchrun (2 CPU ranks, gloo): both ranks work on
    the one scan, each racing its share of the slabs; the output equals one process's."""
    clean = phantom((96, 24, 24), seed=6) * 800
    src = tmp_path / "in" / "scan.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(rician(clean, 40, seed=7).transpose(2, 1, 0), np.eye(4)), src)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    args = ["-m", "napari_strainer.cli", "batch", "denoise", str(src.parent), "--quiet",
            "--slab-voxels", "20000"]
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", *args, str(tmp_path / "two"), "--spread",
                          "slabs"], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (np.asarray(nib.load(tmp_path / d / "scan.nii.gz").dataobj) for d in ("one", "two"))
    assert np.abs(b - a).mean() < 1e-4 * 800  # as one process (dipy's NLM: not bit-exact)
    truth = clean.transpose(2, 1, 0)  # NIfTI (x, y, z); the scan's first axis has 96 slices
    assert psnr(b, truth) == pytest.approx(psnr(a, truth), abs=0.05)
    state = tmp_path / "two" / ".strainer"
    summary = json.loads((state / "summary.json").read_text())
    assert summary["world_size"] == 2 and [r["name"] for r in summary["results"]] == \
        ["scan.nii.gz"]
    manifest = json.loads((state / "scan.nii.gz.json").read_text())
    assert manifest["rank"] == 0 and "(mean over 3 slabs)" in manifest["stop_reason"]
    assert not (state / "scan.nii.gz.slabs").exists()  # removed once the output is written
    # a rank that fails (here rank 1 cannot save its slab) stops the job with one line naming
    # it and the kept slabs; a rerun then finishes the scan as one process would
    kept = tmp_path / "three" / ".strainer" / "scan.nii.gz.slabs"
    (kept / "slab001.npy").mkdir(parents=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *args, str(tmp_path / "three"), "--spread", "slabs"]
    failed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    assert failed.returncode != 0
    assert f"rank 1: scan.nii.gz: {kept / 'slab001.npy'}: a folder is in the way" in \
        failed.stderr and f"every rank stops (finished slabs are kept in {kept}" in failed.stderr
    assert not (tmp_path / "three" / "scan.nii.gz").exists()
    (kept / "slab001.npy").rmdir()
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                           check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    c = np.asarray(nib.load(tmp_path / "three" / "scan.nii.gz").dataobj)
    assert np.abs(c - a).mean() < 1e-4 * 800


def test_shared_stages_are_computed_once_and_give_the_same_result():
    from napari_strainer.restore.classical import guided_nlm

    y = rician(phantom((12, 24, 24)), 0.05)
    guide = race.nlm_denoise(y, 0.05, race.GUIDE_PATCH)
    both = guided_nlm(y, guide, (0.025, 0.04), search=2)
    for h, got in zip((0.025, 0.04), both):
        np.testing.assert_allclose(got, guided_nlm(y, guide, h, search=2), atol=1e-6)
    calls = []
    orig = race.nlm_denoise
    try:
        race.nlm_denoise = lambda *a: calls.append(a[2]) or orig(*a)
        cands = {c.name: c for c in race.candidates(y.shape)}
        p2 = cands["NLM 1s p2"].run(y, 0.05)
        second = [cands[f"NLM2 {f:g}s"].run(y, 0.05) for f in race.GUIDED_H]
    finally:
        race.nlm_denoise = orig
    assert calls == [race.GUIDE_PATCH]  # the pilot once, for NLM 1s p2 and both NLM2
    np.testing.assert_allclose(second[0], guided_nlm(y, p2, 0.5 * 0.05, search=2), atol=1e-6)


@pytest.mark.parametrize("shape", [(22, 37, 29), (70, 53)])
def test_collaborative_wiener_improves_on_its_pilot_on_any_shape(shape):
    """BM3D's Wiener stage: given a pilot (here a first-stage NLM), the result is closer to
    the truth than the pilot, on shapes that are not a multiple of the block grid (the
    phantom; 2D: a crop of scikit-image's camera photograph), the same on every run, and an
    oracle pilot (the truth) does better still."""
    from skimage import data

    from napari_strainer.restore.classical import collaborative_wiener, nlm_denoise

    clean = (phantom(shape, seed=5) if len(shape) == 3 else
             data.camera()[100:100 + shape[0], 200:200 + shape[1]].astype(np.float32) / 255)
    sigma = 0.06
    noisy = (clean + sigma * np.random.default_rng(3).standard_normal(shape)).astype(np.float32)
    pilot = nlm_denoise(noisy, sigma, 1)
    out = collaborative_wiener(noisy, pilot, sigma)
    assert out.shape == shape and out.dtype == np.float32
    np.testing.assert_array_equal(out, collaborative_wiener(noisy, pilot, sigma))
    assert psnr(out, clean) > psnr(pilot, clean) + 0.3
    assert psnr(collaborative_wiener(noisy, clean, sigma), clean) > psnr(out, clean)


def test_collaborative_wiener_on_a_volume_thinner_than_its_group():
    """Four slices: fewer blocks fit the search window than a group holds; the block itself
    fills the group and the result is still finite and better than the noisy volume."""
    from napari_strainer.restore.classical import collaborative_wiener

    clean = phantom((4, 8, 8), seed=1)
    noisy = clean + 0.05 * np.random.default_rng(0).standard_normal(clean.shape)
    out = collaborative_wiener(noisy.astype(np.float32), clean, 0.05, search=1)
    assert np.isfinite(out).all() and psnr(out, clean) > psnr(noisy, clean)


@pytest.mark.parametrize("mode,shape,steps", [("slices", (3, 48, 48), 150),
                                              ("volume", (12, 32, 32), 150)])
def test_inr_denoisers_map_rician_data_through_the_inverse_mean(mode, shape, steps):
    """The INR paths fit the mean of the noisy magnitude; on Rician data their output goes
    through the inverse Rician mean, like the race's: a darker background and a better PSNR
    than the same fit left biased (``--noise gaussian``)."""
    clean = phantom(shape, seed=5)
    sigma = 0.06
    noisy = rician(clean, sigma, seed=6)
    scan = Scan(noisy, np.eye(4), meta={"modality": "MR"})
    outs = {}
    for noise in ("auto", "gaussian"):
        plan = make_plan(scan, Options(task="denoise", mode=mode, encoder="none", noise=noise,
                                       steps=steps, device="cpu"),
                         reference=scan.derive(clean), eta=False)
        assert plan.path == mode
        res = run(plan)
        outs[noise] = res.scan.data
        if noise == "auto":
            model = res.history["bias_correction"]
            assert model["model"] == "rician" and abs(model["sigma"] / sigma - 1) < 0.3
            assert "inverse Rician mean" in plan.noise["text"]
            assert "inverse Rician mean" in res.scan.meta["derivation"]
            # the fit's curve stays whole; the corrected output's PSNR is recorded beside it
            h = res.history
            assert len(h["psnr"]) == len(h["iterations"]) > 1
            assert abs(h["psnr_final"] - psnr(res.scan.data, clean)) < 0.05
        else:
            assert "bias_correction" not in res.history
    background = clean == 0
    lifted = outs["gaussian"][background].mean()
    assert lifted > sigma and outs["auto"][background].mean() < 0.7 * lifted  # darker
    assert psnr(outs["auto"], clean) > psnr(outs["gaussian"], clean) + 1
