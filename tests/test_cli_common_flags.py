"""Every `strainer` verb takes the common flags; `strainer demo` prints no matplotlib notices."""

import argparse
import os
import subprocess
import sys

from napari_strainer.cli import build_parser, main

COMMON = {"--device", "--seed", "--quiet"}


def _verbs(parser: argparse.ArgumentParser, prefix: str = ""):
    """(name, parser) of every leaf verb, ``batch fit`` and the like included."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix.strip(), parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _verbs(sub, f"{prefix} {name}")


def test_every_verb_accepts_the_common_flags():
    verbs = dict(_verbs(build_parser()))
    assert {"info", "convert", "demo", "fit", "batch fit", "pretrain"} <= verbs.keys()
    for name, parser in verbs.items():
        flags = {s for a in parser._actions for s in a.option_strings}
        assert COMMON <= flags, f"strainer {name} lacks {sorted(COMMON - flags)}"


def test_convert_quiet_prints_nothing(samples, tmp_path, capsys):
    out = tmp_path / "ct.nii.gz"
    assert main(["convert", str(samples / "ct_small.dcm"), "-o", str(out), "--quiet",
                 "--device", "cpu", "--seed", "1"]) == 0
    assert out.exists() and capsys.readouterr().out == ""
    assert main(["convert", str(samples / "ct_small.dcm"), "-o", str(tmp_path / "b.nii")]) == 0
    assert capsys.readouterr().out.startswith("wrote ")


def test_info_takes_the_common_flags(samples, capsys):
    assert main(["info", str(samples / "ct_small.dcm"), "--quiet", "--device", "cpu",
                 "--seed", "3"]) == 0
    assert "shape: [1, 128, 128]" in capsys.readouterr().out


def test_demo_plots_print_no_font_cache_notice_on_a_fresh_machine(tmp_path):
    """A fresh MPLCONFIGDIR makes matplotlib build its font cache, which it logs; the demo's
    plotting (under the CLI's INFO logging) must not show it."""
    code = ("import logging; logging.basicConfig(level=logging.INFO, format='strainer: "
            "%(message)s')\nfrom napari_strainer.demo import _pyplot\nplt = _pyplot()\n"
            "fig = plt.figure(); fig.text(0.5, 0.5, 'x'); fig.savefig('x.png')")
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl")}
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert list((tmp_path / "mpl").glob("fontlist*.json")), "the font cache was not built"
    assert "font" not in (run.stdout + run.stderr).lower(), run.stdout + run.stderr
