"""The training benchmark's --tiny run: the GPU benchmark's code path on tiny configs, CPU.

    pytest tests/test_benchmark_smoke.py        (~30 s: one tiny run shared by the tests)
"""

import os

# Before diffusers/huggingface_hub are imported: they read it once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import math

import pytest

from conftest import load_benchmark, markdown_rows

GIB = 2**30


bench = load_benchmark("train_memory")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "report.md"
    results = bench.main(["--tiny", "--out", str(out)])
    return results, out.read_text()


def test_tiny_report_has_every_row_and_column(tiny_run):
    results, text = tiny_run
    assert "- device: CPU" in text and "- date: " in text and "diffusers " in text
    assert "- command: `python benchmarks/train_memory.py --tiny --out " in text
    rows = markdown_rows(text)
    assert list(rows[0]) == bench.COLUMNS
    # SDXL: bs 1/2 x checkpointing on/off; FLUX (NF4 through bitsandbytes on CPU): checkpointing on/off;
    # FLUX.2: base-4B in bf16 and base-9B's 8-bit row (bitsandbytes int8 on CPU), checkpointing on.
    assert sorted((r["model"], r["bs"], r["ckpt"], r["nf4"]) for r in rows) == sorted([
        ("sdxl", "1", "on", "off"), ("sdxl", "1", "off", "off"), ("sdxl", "2", "on", "off"),
        ("sdxl", "2", "off", "off"), ("flux", "1", "on", "on"), ("flux", "1", "off", "on"),
        ("flux2", "1", "on", "off"), ("flux2-9b-int8", "1", "on", "off"),
    ])
    assert len(results) == len(rows)
    for row, result in zip(rows, results):
        ours, ref = result["ours"]["s_per_step"], result["reference"]["s_per_step"]
        assert math.isfinite(ours) and ours > 0 and math.isfinite(ref) and ref > 0, row
        assert float(row["s/step"]) == pytest.approx(ours, abs=6e-4)
        assert float(row["img/s"]) == pytest.approx(int(row["bs"]) / ours, abs=6e-3)
        assert float(row["time ×ref"]) == pytest.approx(ours / ref, abs=6e-4)
        assert row["peak alloc GiB"] == row["peak resv GiB"] == row["resv ×ref"] == "n/a"  # no CUDA
        assert row["MFU"] == "n/a"
        assert "time ≤ ref PASS" in row["targets"] or "time ≤ ref FAIL" in row["targets"]
        assert float(row["TFLOP/step"]) > 0


def test_flops_per_step_are_those_of_a_lora_step(tiny_run):
    """Frozen matmuls cost a forward plus an input gradient (2x), attention and the LoRA
    weights a forward plus two gradients (3x); checkpointing recomputes the blocks' forward
    once more. So step/forward lies in [~2, 3] without and about one more with checkpointing."""
    results, _ = tiny_run
    ratios = {}
    for result in results:
        s = result["setting"]
        for phase in ("ours", "reference"):
            counted = result[phase]
            assert counted["forward_flops"] > 0 and counted["step_flops"] > 0
            ratio = counted["step_flops"] / counted["forward_flops"]
            low, high = (2.4, 4.1) if s["checkpointing"] else (1.5, 3.1)
            assert low <= ratio <= high, (s, phase, ratio)
            ratios[(s["model"], s["batch_size"], s["checkpointing"], phase)] = ratio
        # Same architecture, same shapes: the reference does the same model math as ours.
        assert result["ours"]["forward_flops"] == pytest.approx(result["reference"]["forward_flops"], rel=0.01)
    for (model, bs, ckpt, phase), ratio in ratios.items():
        if ckpt and (model, bs, False, phase) in ratios:  # the recomputed forward: one more of the checkpointed blocks
            assert 0.6 <= ratio - ratios[(model, bs, False, phase)] <= 1.05, (model, bs, phase)
    by_batch = {(r["setting"]["model"], r["setting"]["batch_size"], r["setting"]["checkpointing"]): r for r in results}
    one, two = by_batch[("sdxl", 1, True)], by_batch[("sdxl", 2, True)]
    assert two["ours"]["forward_flops"] == pytest.approx(2 * one["ours"]["forward_flops"], rel=0.02)


def test_default_matrix_is_the_target_rows():
    settings = bench.settings_matrix(bench.build_parser().parse_args([]))
    limits = sorted(bench.target_limit(s, tiny=False) for s in settings)
    assert limits == [9.0, 12.0, 14.0, 16.0, 16.0, 16.0]  # FLUX.2 4B bf16 and 9B 8-bit at 1024² in 16 GB


def test_target_rows_are_judged_on_peak_reserved_memory_and_time():
    sdxl = bench.Setting("sdxl", (1024, 1024), 1, 64, True, True, "fp16", False)
    assert bench.target_limit(dataclasses.replace(sdxl, batch_size=4), tiny=False) == 14.0
    assert bench.target_limit(dataclasses.replace(sdxl, rank=16), tiny=False) is None
    assert bench.target_limit(sdxl, tiny=True) is None
    flux = bench.Setting("flux", (1536, 1024), 1, 16, True, True, "bf16", True)
    assert bench.target_limit(flux, tiny=False) == 16.0  # either orientation of 1024x1536

    def phase(seconds, reserved):
        return {"s_per_step": seconds, "peak_allocated": reserved - GIB, "peak_reserved": reserved,
                "step_flops": 3e14, "forward_flops": 1e14, "optimizer": "adamw8bit"}

    result = {"setting": dataclasses.asdict(sdxl), "ours": phase(1.0, 9.5 * GIB), "reference": phase(1.25, 10 * GIB)}
    row = dict(zip(bench.COLUMNS, bench.table_row(result, peak_flops=1e15, tiny=False)))
    assert row["targets"] == "resv ≤ 9 GiB FAIL; time ≤ ref PASS"
    assert row["MFU"] == "30.0%" and row["step/fwd FLOPs"] == "3.00"
    assert row["time ×ref"] == "0.800" and row["resv ×ref"] == "0.95"
    result["ours"] = {"error": "OOM"}
    row = dict(zip(bench.COLUMNS, bench.table_row(result, peak_flops=1e15, tiny=False)))
    assert row["peak resv GiB"] == "OOM" and row["targets"] == "resv ≤ 9 GiB FAIL"


def test_each_row_is_reported_as_soon_as_it_is_measured(tmp_path, capsys):
    out = tmp_path / "partial.md"
    bench.main(["--tiny", "--models", "sdxl", "--batch_sizes", "1", "--checkpointing", "off,on", "--no_reference",
                "--out", str(out)])
    err = capsys.readouterr().err
    rows = [line for line in err.splitlines() if line.startswith("| sdxl | 64×64 | 1 |")]
    assert len(rows) == 2 and err.index(rows[0]) < err.index("[2/2]")  # row 1 printed before setting 2 ran
    assert len(markdown_rows(out.read_text())) == 2
