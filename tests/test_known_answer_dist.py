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
                         "--out", str(tmp_path / "dist.md"), "--out_dir", str(out)])
    row = summary["rows"]["sdxl-lpb1-s2"]
    assert all(math.isfinite(row[k]) and 0 <= row[k] <= 255 for k in ("untrained", "masked", "whole", "blind"))
    assert row["goal"] == (row["masked"] < 0.6 * row["untrained"] and row["masked"] < 0.85 * row["whole"])
    table = (tmp_path / "dist.md").read_text()
    assert "| sdxl-lpb1-s2 (layers_per_block 1, seed 2, fit 1000 x 16) | 64 px panels, per-composite" in table
    assert "| mean ± sd over 1 |" in table
    base = json.loads((out / "sdxl-lpb1-s2.json").read_text())
    assert base["settings"]["toy"]["scale"] == [0.2, 0.5] and base["settings"]["conditioning"] == "concat"
    assert all("masked_loss" in window for window in base["train_logs"]["b"])  # the masked loss per window
    assert "visible_loss" not in base["train_logs"]["c"][0]  # whole composites: nothing visible
