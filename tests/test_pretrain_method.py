"""``strainer pretrain --method reptile``: a whole-network initialisation on real sample slices,
its card, ``strainer info``, fitting from it (every layer loaded), resuming, bad methods; and
``--method reptile-encoder``: an encoder-only file that fitting solves a head for."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import SAMPLES

from napari_strainer.cli import main
from napari_strainer.core import load_encoder
from napari_strainer.core.siren import SirenConfig
from napari_strainer.errors import BadArgumentError
from napari_strainer.io import read_scan
from napari_strainer.pretrain.cards import card, evaluation_split, format_card, measure_gain
from napari_strainer.pretrain.train import pretrain

TINY = ["--width", "32", "--layers", "4", "--shared-layers", "3"]


@pytest.fixture(scope="module")
def reptile_encoder(tmp_path_factory):
    """A tiny Reptile initialisation: 40 outer steps on 4 slices of the sample brain, 16 x 16."""
    out = tmp_path_factory.mktemp("reptile") / "reptile.safetensors"
    assert main(["pretrain", str(SAMPLES / "mr_brain.nii.gz"), "-o", str(out), "--method",
                 "reptile", "--size", "16", "--steps", "40", "--lr", "1e-3", "--max-slices",
                 "4", "--device", "cpu", "--quiet", *TINY]) == 0
    return out


def test_reptile_file_holds_the_whole_network_and_says_so(reptile_encoder, capsys):
    enc = load_encoder(reptile_encoder)
    assert enc.whole and len(enc.weights) == enc.config.layers == 4
    assert enc.info["method"] == "reptile" and enc.info["steps"] == 40 and enc.info["complete"]
    assert card(enc)["method"] == "reptile"
    assert "method: reptile" in format_card(card(enc))
    assert main(["info", str(reptile_encoder)]) == 0
    assert "method: reptile" in capsys.readouterr().out
    assert main(["info", str(reptile_encoder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "reptile"


def test_strainer_card_says_strainer(tiny_encoder, capsys):
    enc = load_encoder(tiny_encoder)
    assert not enc.whole and enc.info["method"] == "strainer"
    assert main(["info", str(tiny_encoder)]) == 0
    assert "method: strainer" in capsys.readouterr().out


def test_fit_routes_load_every_layer_head_included(reptile_encoder):
    from napari_strainer.restore.routes import Route

    enc = load_encoder(reptile_encoder)
    net = Route("encoder", enc).build(enc.config, 2, seed=5, device=torch.device("cpu"))
    for i, (w, b) in enumerate(enc.weights):  # freeze 0: every layer per member
        torch.testing.assert_close(net.weights[i][1], w)
        torch.testing.assert_close(net.biases[i][1], b)


def test_fit_from_reptile_beats_siren_on_held_out_slices(samples, reptile_encoder):
    enc = load_encoder(reptile_encoder)
    _, held = evaluation_split([read_scan(samples / "mr_brain.nii.gz")], size=16,
                               max_slices=4)
    ev = measure_gain(enc, held, steps=(10, 30), device="cpu")
    assert min(ev["gain_db"]) > 3, ev  # its own head, at step 10 and 30


def test_cli_fit_from_a_reptile_file(samples, reptile_encoder, tmp_path):
    out, hist = tmp_path / "fit.nii.gz", tmp_path / "h.json"
    assert main(["fit", str(samples / "mr_brain.nii.gz"), "-o", str(out), "--encoder",
                 str(reptile_encoder), "--init", "fixed", "--steps", "3", "--device", "cpu",
                 "--history", str(hist), "--quiet"]) == 0
    # the output and its history name the start it had: Reptile's network, its own head
    assert json.loads(hist.read_text())["head"] == "the network's own"
    assert "INR fit (Reptile, napari-strainer)" in str(read_scan(out).meta)


def test_reptile_encoder_writes_an_encoder_that_fits_held_out_slices(tmp_path, capsys):
    train, held = evaluation_split([read_scan(SAMPLES / "mr_brain.nii.gz")], size=16,
                                   max_slices=4)
    out = tmp_path / "renc.safetensors"
    pretrain(train, out, method="reptile-encoder", config=SirenConfig(width=32, layers=4,
             shared_layers=3), steps=40, lr=1e-3, device="cpu")
    enc = load_encoder(out)
    assert not enc.whole and len(enc.weights) == enc.config.shared_layers == 3
    assert enc.info["method"] == "reptile-encoder" and enc.info["steps"] == 40
    assert card(enc)["method"] == "reptile-encoder"
    assert main(["info", str(out)]) == 0
    assert "method: reptile-encoder" in capsys.readouterr().out
    ev = measure_gain(enc, held, steps=(10, 30), device="cpu")
    # solved head + warm-up, as fitting does (an untrained encoder so: +3 and +9 dB)
    assert min(ev["gain_db_solved"]) > 15, ev
    fit_out, hist = tmp_path / "fit.nii.gz", tmp_path / "h.json"
    assert main(["fit", str(SAMPLES / "mr_brain.nii.gz"), "-o", str(fit_out), "--encoder",
                 str(out), "--init", "fixed", "--steps", "3", "--device", "cpu",
                 "--history", str(hist), "--quiet"]) == 0
    assert json.loads(hist.read_text())["head"] == "solved"
    assert "INR fit (Reptile encoder, napari-strainer)" in str(read_scan(fit_out).meta)


@pytest.mark.parametrize("method", ["reptile", "reptile-encoder"])
def test_reptile_resume_equals_an_uninterrupted_run(tmp_path, method):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 8, 8, generator=g)
    cfg = SirenConfig(width=8, layers=3, shared_layers=2)
    full = pretrain(images, tmp_path / "full.safetensors", method=method, config=cfg,
                    steps=6, device="cpu")
    stop = threading.Event()
    out = tmp_path / "cut.safetensors"
    cut = pretrain(images, out, method=method, config=cfg, steps=6, device="cpu",
                   callback=lambda p: p.step >= 3 and stop.set(), cancel=stop)
    assert not cut.info["complete"] and cut.info["steps"] == 3
    again = pretrain(images, out, method=method, config=cfg, steps=6, device="cpu",
                     resume=True)
    assert again.info["complete"] and not out.with_name(out.name + ".state.safetensors").exists()
    for (a, b), (c, d) in zip(full.weights, again.weights):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, d)


def test_unknown_method_is_one_line_and_exit_2(samples, tmp_path, capsys):
    out = tmp_path / "e.safetensors"
    code = main(["pretrain", str(samples / "mr_brain.nii.gz"), "-o", str(out), "--method",
                 "maml"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--method" in err, err
    assert "Traceback" not in err and not out.exists()
    with pytest.raises(BadArgumentError, match="--method"):
        pretrain(torch.rand(1, 4, 4), out, method="maml")


def test_bundle_training_takes_the_method(samples, tmp_path):
    pytest.importorskip("monai")
    from napari_strainer.bundle import run_training

    data = tmp_path / "data"
    data.mkdir()
    (data / "brain.nii.gz").write_bytes((samples / "mr_brain.nii.gz").read_bytes())
    out = tmp_path / "bundle.safetensors"
    enc = run_training(str(data), str(out), method="reptile", steps=2, size=8, max_slices=2,
                       width=8, layers=3, shared_layers=2, device="cpu", quiet=True)
    assert enc.whole and load_encoder(out).info["method"] == "reptile"
    with pytest.raises(BadArgumentError, match="method"):
        run_training(str(data), str(out), method="maml")


def test_pretrain_dock_runs_reptile(make_napari_viewer, qtbot, tmp_path):
    pytest.importorskip("pytestqt")
    from napari_strainer.gui._pretrain import PretrainWidget
    from napari_strainer.pretrain.train import PRETRAIN_STEPS, REPTILE_STEPS

    viewer = make_napari_viewer()
    layer = viewer.add_image(read_scan(SAMPLES / "mr_brain.nii.gz").data[10:13, ::8, ::8])
    w = PretrainWidget(viewer)
    w.method.value = "reptile"
    assert w.steps.value == REPTILE_STEPS
    w.method.value = "strainer"
    assert w.steps.value == PRETRAIN_STEPS
    w.method.value = "reptile-encoder"
    assert w.steps.value == REPTILE_STEPS
    w.method.value = "reptile"
    w.layers.value = [layer]
    w.steps.value = 3
    w.net_width.value, w.n_layers.value, w.shared.value = 8, 3, 2
    w.device.value = "cpu"
    out = tmp_path / "dock.safetensors"
    w.output.value = str(out)
    w.run()
    qtbot.waitUntil(lambda: w.job is not None and not w.running, timeout=60_000)
    assert w.job.error is None, w.job.error
    enc = load_encoder(out)
    assert enc.whole and enc.info["method"] == "reptile" and enc.info["steps"] == 3
