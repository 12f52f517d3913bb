"""CPU runs pick their thread count when OMP_NUM_THREADS is unset, and say so in one line.

    pytest tests/test_cpu.py
"""

import logging

import pytest
import torch

from iclora.cpu import cpu_threads

LINE = "CPU run: 1 thread(s) (the tiny models gain nothing from more); set OMP_NUM_THREADS to choose"


def test_threads_follow_the_free_cores():
    assert cpu_threads(cores=8, busy=0.2, tiny=False, default=8) == 8
    assert cpu_threads(cores=8, busy=5.6, tiny=False, default=8) == 2  # six cores busy elsewhere
    assert cpu_threads(cores=2, busy=7.0, tiny=False, default=2) == 1
    assert cpu_threads(cores=16, busy=0.0, tiny=False, default=8) == 8  # never above one per physical core
    assert cpu_threads(cores=8, busy=0.0, tiny=True, default=8) == 1


@pytest.fixture
def two_threads(monkeypatch):
    """torch at two threads, as a fresh process on a 2-core machine starts; restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def cpu_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("CPU run")]


def test_training_without_omp_num_threads_sets_its_threads(two_threads, monkeypatch, data_2x2, train, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with caplog.at_level(logging.INFO, logger="iclora"):
        train(data_2x2, "--max_train_steps", "1")
    assert torch.get_num_threads() == 1
    assert cpu_lines(caplog) == [LINE]


def test_inference_without_omp_num_threads_sets_its_threads(two_threads, monkeypatch, data_2x2, tmp_path, caplog):
    from iclora.inference.sdxl_ic_lora_inference import main

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with caplog.at_level(logging.INFO, logger="iclora"):
        main(["--lora_path", "none", "--base_model", "tiny-sdxl", "--input_image", str(data_2x2 / "00000.png"),
              "--prompt", "x", "--panels_to_inpaint", "3", "--num_inference_steps", "1", "--output_dir", str(tmp_path)])
    assert torch.get_num_threads() == 1
    assert cpu_lines(caplog) == [LINE]


def test_omp_num_threads_is_the_users_choice(two_threads, monkeypatch, data_2x2, train, caplog):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    with caplog.at_level(logging.INFO, logger="iclora"):
        train(data_2x2, "--max_train_steps", "1")
    assert torch.get_num_threads() == 2
    assert cpu_lines(caplog) == []
