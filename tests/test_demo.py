"""`strainer demo`, the README's main command, end to end with a tiny budget."""

import json

from napari_strainer.cli import main


def test_demo_writes_outputs_table_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--steps", "2", "--pretrain-steps", "1",
                 "--device", "cpu"]) == 0
    rows = json.loads((out / "demo.json").read_text())
    assert [(r["task"], r["init"]) for r in rows] == [
        (t, i) for t in ("fit", "superres", "denoise") for i in ("default", "STRAINER", "SIREN")]
    assert all(r["route"] for r in rows) and all(r["steps"] <= 2 for r in rows)
    for name in ("psnr_curves.png", "panel.png", "encoder_brief.safetensors",
                 "superres_default.nii.gz", "denoise_siren.nii.gz"):
        assert (out / name).stat().st_size > 0, name
    printed = capsys.readouterr().out
    assert "route" in printed and "superres" in printed
