"""Two training processes (DDP over gloo on the CPU) through the script run by path."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def test_two_process_training_saves_one_lora_and_resumes(tmp_path):
    # `accelerate launch --cpu --num_processes 2` silently runs one process on a CPU;
    # torchrun gives two real ranks.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    base = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "src/training/train_sdxl_ic_lora.py"), "--data_dir", str(REPO / "data/sample"),
        "--output_dir", str(out), "--model_id", "tiny-sdxl", "--image_size", "64", "--batch_size", "2",
        "--lora_rank", "4", "--save_every", "2", "--learning_rate", "1e-3",
        "--validation_every", "2", "--validation_inference_steps", "2",  # rendered by rank 0 alone
    ]
    first = subprocess.run(base + ["--max_train_steps", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = out / "checkpoints" / "checkpoint-2"
    # One RNG state per rank: each process resumes its own stream.
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    resumed = subprocess.run(
        base + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    meta = json.loads((out / "final_model" / "iclora_config.json").read_text())
    assert meta["global_step"] == 3
    lora = load_file(out / "final_model" / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith("unet.") for k in lora)
    assert sorted(p.name for p in (out / "samples").glob("step_*")) == ["step_000000", "step_000002", "step_000003"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]  # one line per step, not one per rank
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.slow
def test_two_processes_stop_together_on_a_non_finite_loss(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    done = subprocess.run([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "src/training/train_sdxl_ic_lora.py"), "--data_dir", str(REPO / "data/sample"),
        "--output_dir", str(out), "--model_id", "tiny-sdxl", "--image_size", "64", "--batch_size", "2",
        "--lora_rank", "4", "--save_every", "1", "--learning_rate", "1e6", "--max_train_steps", "8",
    ], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error: step" in line]
    assert len(errors) == 1 and "the loss is nan" in errors[0], done.stderr[-3000:]  # one rank speaks
    assert "exitcode  : 1" in done.stderr and done.stderr.count("exitcode  : 1") == 2  # both ranks stopped
    assert not (out / "final_model").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-1"]
