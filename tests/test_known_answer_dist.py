"""The known-answer benchmark over a distribution of toy bases (benchmarks/known_answer_dist.py).

The fast test runs the command's plumbing end to end at tiny settings (a 2-step fit, 2
training steps, one evaluation composite): its figures mean nothing, only that every
column is filled and the reports are written. The slow tests run the real distribution
(minutes per base on 2 CPU cores; see benchmarks/RESULTS.md, *The known-answer benchmark
over a distribution of bases*):

    python -m pytest -m slow tests/test_known_answer_dist.py
"""

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from conftest import load_benchmark


def test_the_distribution_command_fits_a_base_and_reports_it(tmp_path, capsys):
    dist = load_benchmark("known_answer_dist")
    assets, out = tmp_path / "assets", tmp_path / "out"
    with pytest.raises(SystemExit):
        dist.main(["report", "--only", "sdxl-lpb1-s2", "--assets", str(assets)])
    assert f"error: {assets / 'toy_dist' / 'sdxl_lpb1_s2'}: base sdxl-lpb1-s2 is not fitted" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dist.main(["fit", "--only", "sdxl-nope"])
    assert "--only: unknown base(s) sdxl-nope" in capsys.readouterr().err

    dist.main(["fit", "--smoke", "--only", "sdxl-lpb1-s2", "--assets", str(assets), "--threads", "1"])
    fitted = json.loads((assets / "toy_dist" / "sdxl_lpb1_s2" / "fit_report.json").read_text())
    assert fitted["steps"] == 2 and fitted["seed"] == 2 and fitted["toy"]["background"] == "per_composite"
    dist.main(["fit", "--only", "sdxl-lpb1-s2", "--assets", str(assets)])  # cached: nothing refitted
    assert "sdxl-lpb1-s2: cached" in capsys.readouterr().out

    summary = dist.main(["report", "--smoke", "--only", "sdxl-lpb1-s2", "--assets", str(assets), "--threads", "1",
                         "--out", str(tmp_path / "dist.md"), "--out_dir", str(out), "--train_args=--lora_convs",
                         "--mask_probability", "0.9", "--max_masked_panels", "3"])
    row = summary["rows"]["sdxl-lpb1-s2"]
    assert all(math.isfinite(row[k]) and 0 <= row[k] <= 255 for k in ("untrained", "masked", "whole", "blind"))
    assert row["goal"] == (row["masked"] < 0.6 * row["untrained"] and row["masked"] < 0.85 * row["whole"])
    table = (tmp_path / "dist.md").read_text()
    assert "| sdxl-lpb1-s2 (layers_per_block 1, seed 2, fit 1000 x 16) | 64 px panels, per-composite" in table
    assert "| mean ± sd over 1 |" in table and "| masked (--mask_probability 0.9 --max_masked_panels 3) |" in table
    base = json.loads((out / "sdxl-lpb1-s2.json").read_text())
    assert base["settings"]["toy"]["scale"] == [0.2, 0.5] and base["settings"]["conditioning"] == "concat"
    assert base["settings"]["train_args"] == "--lora_convs"  # added to the defaults for (b) and (c)
    assert "(b) IC-LoRA, --mask_probability 0.9 --max_masked_panels 3 --lora_convs" in base["table"]  # (b)'s masking
    assert base["settings"]["mask_probability"] == 0.9 and base["settings"]["max_masked_panels"] == 3
    assert all("masked_loss" in window for window in base["train_logs"]["b"])  # the masked loss per window
    assert "visible_loss" not in base["train_logs"]["c"][0]  # whole composites: nothing visible


def test_the_report_trains_the_backend_scripts_masking_unless_given():
    dist = load_benchmark("known_answer_dist")
    masking = lambda argv: (argv[argv.index("--mask_probability") + 1], argv[argv.index("--max_masked_panels") + 1])  # noqa: E731
    assert masking(dist.masking_argv("sdxl", None, None)) == ("0.7", "2")  # train_sdxl_ic_lora.py's defaults
    assert masking(dist.masking_argv("flux", None, None)) == ("1.0", "3")
    assert masking(dist.masking_argv("sdxl", 0.9, 3)) == ("0.9", "3")
    assert masking(dist.masking_argv("flux2", None, 2)) == ("1.0", "2")
    assert dist.DEFAULTS["sdxl"][dist.DEFAULTS["sdxl"].index("--mask_probability") + 1] == "0.7"  # not changed in place


def test_panel_reach_measures_how_much_the_hidden_panels_depend_on_the_visible_ones():
    reach = load_benchmark("panel_reach").main(["--only", "sdxl-hard", "--samples", "1", "--panel_sizes", "64",
                                                "--timesteps", "0.5", "--threads", "1"])
    (shares,) = reach["rows"]["sdxl-hard 64"].values()
    assert 0.0 < shares["noisy"] < 0.5 and "clean" not in shares  # blend: no masked-image channels
    assert "| sdxl-hard | 64 px (8x8 latents) |" in reach["table"]


def _report(tmp_path, members: str, *extra: str) -> dict:
    dist = load_benchmark("known_answer_dist")
    dist.main(["fit", "--only", members, "--threads", "1"])  # cached: nothing to do
    return dist.main(["report", "--only", members, "--threads", "1", "--out_dir", str(tmp_path), *extra])["rows"]


@pytest.mark.slow
def test_sdxl_defaults_over_the_distribution(tmp_path):
    """SDXL concat at the script's defaults on the shipped hard base, on its own toy and on the
    aside toy's data, and on a second base fitted the same way at another seed (~3 x 60 min on
    a shared 2-core machine). Margins halved from
    benchmarks/RESULTS.md, *The known-answer benchmark over a distribution of bases*."""
    rows = _report(tmp_path, "sdxl-hard,sdxl-hard-aside,sdxl-lpb1-s2-std-long")
    hard, aside, other = rows["sdxl-hard"], rows["sdxl-hard-aside"], rows["sdxl-lpb1-s2-std-long"]
    # Measured 2026-12-06 at the defaults (the LoRA on the ResNet convs too): (b) 17.4, (c)
    # 28.6, (a) 67.6: the goal is met on the standard toy (attention only: 24.7, 41.2).
    assert hard["masked"] < 0.6 * hard["untrained"] and hard["masked"] < hard["untrained"] - 25, hard
    assert hard["masked"] < hard["whole"] - 5.6, hard
    # On the aside toy's data (same base, same recipe): (b) 32.8, (c) 36.9, (a) 57.7, blind
    # guess 51.3. Masked training reads the visible panels (57 % of (a)) but leads (c) by
    # little: 89 % of it (goal < 85 %). Attention only: 37.7, 40.7.
    assert aside["masked"] < aside["untrained"] - 12, aside
    assert aside["masked"] < aside["blind"] - 9, aside
    assert aside["masked"] < aside["whole"] - 2, aside
    # The shipped base's fit at seed 2, aside data: (b) 33.1, (c) 33.2, (a) 57.7, blind 51.3
    # (attention only: (b) 41.5). (b) and (c) tie: the goal's second half is not met.
    assert other["masked"] < other["untrained"] - 12 and other["masked"] < other["blind"] - 9, other


@pytest.mark.slow
def test_sdxl_completion_masking_over_the_distribution(tmp_path):
    """The masking README recommends for SDXL completion LoRAs (0.9 / 3) on two aside-fitted
    bases where the default masking does not meet the goal (~2 x 15 min on 2 CPU cores).
    Margins halved from benchmarks/RESULTS.md, *128-px panels, vivid colours, and 0.9 / 3
    masking*."""
    rows = _report(tmp_path, "sdxl-lpb2-s1,sdxl-lpb1-s2-long", "--mask_probability", "0.9", "--max_masked_panels", "3")
    other, long = rows["sdxl-lpb2-s1"], rows["sdxl-lpb1-s2-long"]
    # Measured 2026-12-06: (b) 37.3, (c) 45.1, (a) 71.2 (at 0.7 / 2: (b) 40.7, 90 % of (c)).
    assert other["masked"] < other["untrained"] - 17 and other["masked"] < other["whole"] - 3.9, other
    # Measured 2026-12-06: (b) 31.6, (c) 40.3, (a) 62.1 (at 0.7 / 2: (b) 37.0, 92 % of (c)).
    assert long["masked"] < long["untrained"] - 15.2 and long["masked"] < long["whole"] - 4.3, long


@pytest.mark.slow
def test_128px_panels_sdxl_and_flux(tmp_path):
    """Bases fitted on 128-px panels of the aside data, each backend's defaults (~60 min on 2
    CPU cores). Margins halved from benchmarks/RESULTS.md, *128-px panels*."""
    rows = _report(tmp_path, "sdxl-lpb1-s3-128,flux-b13-s3-128")
    sdxl, flux = rows["sdxl-lpb1-s3-128"], rows["flux-b13-s3-128"]
    # Measured 2026-12-06: (b) 68.9, (c) 74.8, (a) 94.9: the LoRA reads the visible panels, the
    # goal is not met (73 % of (a), 92 % of (c)).
    assert sdxl["masked"] < sdxl["untrained"] - 13 and sdxl["masked"] < sdxl["whole"] - 2.9, sdxl
    # Measured 2026-12-06: (b) 17.4, (c) 36.2, (a) 42.7, blind 51.3: met.
    assert flux["masked"] < flux["untrained"] - 12.6 and flux["masked"] < flux["whole"] - 9.4, flux
    assert flux["masked"] < flux["blind"] - 16.9, flux


@pytest.mark.slow
def test_flux_defaults_over_the_distribution(tmp_path):
    """FLUX context at the script's defaults on two independently fitted bases (the shipped
    2+4-block base, and a 1+3-block base of another seed fitted on the aside toy), on the
    aside toy's data (~3 x 45 min on a shared 2-core machine). Margins halved from
    benchmarks/RESULTS.md, *The known-answer benchmark over a distribution of bases*."""
    rows = _report(tmp_path, "flux-hard,flux-hard-aside,flux-b13-s1")
    hard, aside, other = rows["flux-hard"], rows["flux-hard-aside"], rows["flux-b13-s1"]
    # Measured 2026-12-01 on the standard toy: (b) 13.5, (c) 20.2, (a) 57.1.
    assert hard["masked"] < hard["untrained"] - 21.8 and hard["masked"] < hard["whole"] - 3.3, hard
    # Measured 2026-12-06 on the aside toy's data: (b) 25.6, (c) 32.6, (a) 51.5, blind 51.3.
    assert aside["masked"] < aside["untrained"] - 12.9 and aside["masked"] < aside["whole"] - 3.5, aside
    assert aside["masked"] < aside["blind"] - 12.8, aside
    # Measured 2026-12-06, a base fitted on the aside toy: (b) 26.6, (c) 41.2, (a) 61.6, blind 51.3.
    assert other["masked"] < other["untrained"] - 17.5 and other["masked"] < other["whole"] - 7.3, other
    assert other["masked"] < other["blind"] - 12.3, other


@pytest.mark.slow
def test_flux2_defaults_over_the_distribution(tmp_path):
    """FLUX.2 [klein] context at the FLUX.2 script's defaults (clean context tokens at
    timestep zero, 1.0 / 3 masking), 2x2, on two independently fitted bases: the hard-toy base
    on the standard toy and on the aside toy's data, and a 1+3-block base of another seed
    fitted on the aside toy (~3 x 30 min on a shared 2-core machine). Margins halved from
    benchmarks/RESULTS.md, *FLUX.2 [klein] on the harder toy* and *FLUX.2 members*."""
    rows = _report(tmp_path, "flux2-hard,flux2-hard-aside,flux2-b13-s1")
    hard, aside, other = rows["flux2-hard"], rows["flux2-hard-aside"], rows["flux2-b13-s1"]
    # Measured 2026-12-06: (b) 17.1, (c) 28.5, (a) 41.4, blind guess 53.1.
    assert hard["masked"] < 0.6 * hard["untrained"] and hard["masked"] < hard["untrained"] - 12.1, hard
    assert hard["masked"] < hard["whole"] - 5.7, hard
    assert hard["masked"] < hard["blind"] - 18, hard
    # Measured 2026-12-06 on the aside toy's data: (b) 25.5, (c) 37.9, (a) 51.2, blind 51.3.
    assert aside["masked"] < aside["untrained"] - 12.8 and aside["masked"] < aside["whole"] - 6.2, aside
    assert aside["masked"] < aside["blind"] - 12.9, aside
    # Measured 2026-12-06, flux2-b13-s1: (b) 28.0, (c) 34.3, (a) 63.2, blind 51.3.
    assert other["masked"] < 0.6 * other["untrained"] and other["masked"] < other["untrained"] - 17.6, other
    assert other["masked"] < other["whole"] - 3.1 and other["masked"] < other["blind"] - 11.6, other
