"""The inference benchmark's --tiny run: ours against the stock pipeline and the folder mode, CPU.

    pytest tests/test_inference_benchmark.py        (~20 s: one tiny run shared by the tests)
"""

import os

# Before diffusers/huggingface_hub are imported: they read it once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import pytest

from conftest import load_benchmark, markdown_rows


bench = load_benchmark("inference_speed")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report.md"
    rows = bench.main(["--tiny", "--out", str(out)])
    return rows, out.read_text()


def test_tiny_report_has_every_row_with_positive_timings(tiny_run):
    rows, text = tiny_run
    assert "- device: " in text and "- date: " in text and "diffusers " in text
    assert "- command: `python benchmarks/inference_speed.py --tiny --out " in text
    table = markdown_rows(text)
    assert list(table[0]) == bench.COLUMNS
    folder = "folder (3 inputs, 1 load)"
    assert [(r["model"], r["mode"], r["bs"], r["images"]) for r in table] == [
        (model, mode, bs, images) for model in ["sdxl", "flux"]
        for mode, bs, images in [("pipeline", "1", "2"), ("pipeline", "2", "2"), (folder, "1", "3")]
    ]
    assert len(rows) == len(table)
    for row, result in zip(table, rows):
        assert row["W×H"] == "64×64" and row["steps"] == "2"
        for key in ["ours", "ours_load"]:
            assert math.isfinite(result[key]) and result[key] > 0, (row, key)
        assert float(row["ours s/img"]) == pytest.approx(result["ours"], abs=6e-4)
        if row["mode"] == "pipeline":
            assert math.isfinite(result["stock"]) and result["stock"] > 0 and result["stock_load"] > 0, row
            assert float(row["×stock"]) == pytest.approx(result["ours"] / result["stock"], abs=6e-4)
        else:  # no stock folder mode; its per-image time carries the one model load
            assert row["stock s/img"] == row["×stock"] == row["stock load s"] == "-"
            assert result["ours"] * result["images"] > result["ours_load"]


def test_defaults_are_the_full_size_matrix_on_cuda(monkeypatch):
    """Without a GPU the run is tiny whatever the flags; on CUDA the full-size defaults apply."""
    cpu = bench.build_parser().parse_args([])
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: False)
    bench.resolve(cpu)
    assert cpu.tiny and (cpu.sizes, cpu.steps, cpu.batch_size, cpu.images) == ([(64, 64)], 2, 2, 2)
    cuda = bench.build_parser().parse_args(["--sizes", "1024,1024x1536"])
    monkeypatch.setattr(bench.torch.cuda, "is_available", lambda: True)
    bench.resolve(cuda)
    assert not cuda.tiny and cuda.sizes == [(1024, 1024), (1024, 1536)]
    assert (cuda.steps, cuda.batch_size, cuda.images, cuda.folder_images, cuda.rank) == (None, 4, 4, 4, 16)


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--models", "sd3"], "--models: unknown sd3"),
])
def test_bad_flags_are_one_line(argv, message):
    with pytest.raises(SystemExit, match=message):
        bench.main(argv)
