"""Every example config runs on a CPU with the tiny models, overriding only the model, the
size and the step counts (plus where data and outputs go): CUDA-only settings fall back with
a one-line notice instead of failing.

    pytest tests/test_examples.py
"""

import logging
from pathlib import Path

import pytest
import yaml

from conftest import toy_dataset

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))
TINY = {("sdxl", "concat"): "tiny-sdxl", ("sdxl", "blend"): "tiny-sdxl",
        ("sdxl", "context"): "tiny-sdxl", ("flux", "blend"): "tiny-flux", ("flux", "context"): "tiny-flux",
        ("flux", "concat"): "tiny-flux-fill"}


def test_there_are_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_on_a_cpu(example, tmp_path, caplog):
    from iclora.training import train_flux_ic_lora, train_sdxl_ic_lora

    written = yaml.safe_load(example.read_text())
    backend = written.get("backend", "sdxl")
    main = train_flux_ic_lora.main if backend == "flux" else train_sdxl_ic_lora.main
    rows, cols = (int(n) for n in written.get("grid", "2x2").split("x"))
    data = toy_dataset(tmp_path / "data", n=2, grid=(rows, cols), panel_size=32)
    argv = ["--config", str(example), "--data_dir", str(data), "--output_dir", str(tmp_path / "out"),
            "--model_id", TINY[backend, written.get("conditioning", "concat")],
            "--image_size", str(32 * max(rows, cols)), "--max_train_steps", "2", "--validation_inference_steps", "2"]
    with caplog.at_level(logging.INFO, logger="iclora"):
        result = main(argv)
    assert result.global_step == 2
    assert (result.final_dir / "iclora_config.json").is_file()
    notices = [r.getMessage() for r in caplog.records if "needs CUDA" in r.getMessage()]
    if written.get("mixed_precision") == "fp16":
        assert "--mixed_precision fp16 needs CUDA: training in float32 on the CPU" in notices
    if written.get("quantize"):
        assert any(n.startswith(f"--quantize {written['quantize']} needs CUDA") for n in notices)
    assert all("\n" not in n for n in notices)
