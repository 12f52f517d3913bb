"""benchmarks/gpu_suite.py --tiny: every run of the GPU suite through the real CLIs on the CPU,
each phase's record beside the dry run's estimate, inference at batch 1 and 4, and the
reference-step comparison, into one results file.

    pytest tests/test_gpu_suite.py
"""

import json

import pytest

from conftest import load_benchmark


def test_tiny_suite_runs_every_phase_and_writes_one_results_file(tmp_path):
    gpu_suite = load_benchmark("gpu_suite")
    out = tmp_path / "suite.json"
    report = gpu_suite.main(["--tiny", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text())["runs"] == json.loads(json.dumps(report["runs"]))
    assert out.with_suffix(".md").read_text().startswith("gpu_suite ")
    names = [run["name"] for run in report["runs"]]
    assert names == [spec["name"] for spec in gpu_suite.runs(True)] and len(names) == 6
    for run in report["runs"]:
        assert "error" not in run["process"], run["process"]
        phases = [r["phase"] for r in run["phases"]]
        assert phases[:3] == ["load", "caching text embeddings", "caching latents"], phases
        for phase in ("first step", "sample sheet", "checkpoint", "final save"):
            assert phase in phases
        for r in run["phases"]:
            assert r["estimate_gib"] is not None and 0 < r["estimate_gib"] < 2  # tiny models: sane, small
            assert r["host_peak_rss_gib"] > 0
        assert run["estimate"]["line"].startswith("memory: peak ")
    inference = {run["name"]: [row["batch_size"] for row in run["inference"] if "error" not in row]
                 for run in report["runs"] if run["inference"]}
    assert inference == {"sdxl concat bs1": [1, 4], "flux context nf4 1024²": [1, 4]}
    for run in report["runs"]:  # the composites each inference wrote, and its phases beside their estimates
        for row in run["inference"]:
            assert row["seconds"] > 0
            assert [r["phase"] for r in row["phases"]] == ["load", "text encoding", "denoising", "VAE decode"]
            for r in row["phases"]:
                assert r["estimate_gib"] is not None and 0 < r["estimate_gib"] < 2, r
                assert r["host_peak_rss_gib"] > 0
            assert row["estimate"]["line"].startswith("memory: peak ")
    assert "inference bs 4: denoising" in out.with_suffix(".md").read_text()
    assert [r["model"] for r in report["reference"]] == ["sdxl", "flux"]
    assert all(r["ours"]["s_per_step"] and r["reference"]["s_per_step"] for r in report["reference"])
    assert report["goals"] == []  # no GPU figure on the CPU: nothing claimed
    assert report["multi_gpu"]["rows"] == [] and "need two or more" in report["multi_gpu"]["skipped"]
    assert "multi-GPU rows: not run" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_ddp_and_fsdp_rows_run_on_two_cpu_processes(tmp_path):
    """The multi-GPU rows' launches (torchrun, as on GPUs), on two gloo processes: ~2-4 min."""
    gpu_suite = load_benchmark("gpu_suite")
    report = gpu_suite.main(["--tiny", "--workdir", str(tmp_path / "work"), "--only", "sdxl", "--no_reference",
                             "--processes", "2"])
    rows = report["multi_gpu"]["rows"]
    assert [row["name"] for row in rows] == ["sdxl ddp", "sdxl fsdp"]
    for row in rows:
        assert "error" not in row, row["error"]
        assert row["processes"] == 2 and row["s_per_step"] > 0 and row["rank0_host_peak_rss_gib"] > 0
