"""Runs say what is real once and none of the stack's known noise; progress bars print plain
lines when stderr is not a terminal (a log file, a pipe).

The suite turns transformers' and diffusers' warnings off (conftest.py); these tests turn
them back on, as a user's run has them, and collect what reaches the libraries' own root
loggers (they do not propagate further), so a message the filters drop is never seen.

    pytest tests/test_quiet.py
"""

import ast
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iclora import logs

NOISE = ("Token indices sequence length is longer", "No LoRA keys associated to", "truncated because",
         "Skipping publisher trust check", "Failed to load CPU gemm_4bit_forward")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def library_messages():
    """Warnings of transformers and diffusers on (restored after); yields what reaches them."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    collect = _Collect()
    roots = [logging.getLogger(name) for name in ("transformers", "diffusers", "kernels", "bitsandbytes")]
    before = transformers_logging.get_verbosity(), diffusers_logging.get_verbosity()
    transformers_logging.set_verbosity(logging.WARNING)
    diffusers_logging.set_verbosity(logging.WARNING)
    for root in roots:
        root.addHandler(collect)
    yield collect.messages
    for root in roots:
        root.removeHandler(collect)
    transformers_logging.set_verbosity(before[0])
    diffusers_logging.set_verbosity(before[1])


def lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_sdxl_training_and_inference_say_each_real_thing_once(library_messages, data_2x2, tmp_path, capfd):
    from iclora.inference.sdxl_ic_lora_inference import main as infer
    from iclora.training.train_sdxl_ic_lora import main as train

    from conftest import TINY_ARGS

    out = tmp_path / "run"
    train(["--data_dir", str(data_2x2), "--output_dir", str(out), *TINY_ARGS, "--max_train_steps", "2",
           "--validation_every", "2", "--validation_inference_steps", "1"])
    trained = capfd.readouterr().err
    infer(["--lora_path", str(out / "final_model"), "--input_image", str(data_2x2 / "00000.png"),
           "--prompt", (data_2x2 / "00000.txt").read_text(), "--num_inference_steps", "2", "--num_images", "2",
           "--output_dir", str(tmp_path / "inference")])
    inferred = capfd.readouterr().err
    # The toy captions are 249 CLIP tokens: cut to 150, said once per run, by us.
    assert len(lines(trained, "prompt of 249 tokens is cut to --max_token_length 150")) == 1
    assert len(lines(inferred, "prompt of 249 tokens is cut to --max_token_length 150")) == 1
    for fragment in NOISE:
        assert not [m for m in library_messages if fragment in m], fragment
        assert fragment not in trained + inferred
    # Off a terminal the bars are plain lines: one at the start, one at the end, no redraws.
    assert "\r" not in trained + inferred
    assert [line.split(" [")[0] for line in lines(trained, "train: ")] == ["train: 0/2", "train: 2/2"]
    assert [line.split(" [")[0] for line in lines(inferred, "images: ")] == ["images: 0/2", "images: 2/2"]
    assert not lines(inferred, "denoising")  # an inner bar prints only every PLAIN_INTERVAL seconds
    # What the libraries say otherwise still comes through.
    logging.getLogger("diffusers.loaders.lora_base").warning("a real problem")
    assert library_messages[-1] == "a real problem"


def test_flux_says_once_how_clip_and_t5_read_a_long_prompt(library_messages, data_2x2, tmp_path, capfd):
    from iclora.inference.flux_ic_lora_inference import main as infer
    from iclora.training.train_flux_ic_lora import main as train

    out = tmp_path / "run"
    train(["--data_dir", str(data_2x2), "--output_dir", str(out), "--model_id", "tiny-flux", "--image_size", "64",
           "--batch_size", "2", "--lora_rank", "4", "--lora_alpha", "4", "--max_train_steps", "2",
           "--validation_every", "2", "--validation_inference_steps", "1"])
    trained = capfd.readouterr().err
    infer(["--lora_path", str(out / "final_model"), "--input_image", str(data_2x2 / "00000.png"),
           "--prompt", (data_2x2 / "00000.txt").read_text(), "--num_inference_steps", "1",
           "--output_dir", str(tmp_path / "inference")])
    inferred = capfd.readouterr().err
    notice = "prompts longer than 75 CLIP tokens: CLIP's pooled embedding reads their start"
    assert len(lines(trained, notice)) == 1 and len(lines(inferred, notice)) == 1
    for fragment in NOISE:
        assert not [m for m in library_messages if fragment in m], fragment


def test_plain_lines_come_every_interval_and_a_terminal_gets_tqdm(monkeypatch):
    monkeypatch.setattr(logs, "PLAIN_INTERVAL", 0.0)
    stream = io.StringIO()
    with logs.progress_bar(total=3, desc="train", file=stream) as bar:
        for _ in range(3):
            bar.update(1)
    assert [line.split(" [")[0] for line in stream.getvalue().splitlines()] == [
        "train: 0/3", "train: 1/3", "train: 2/3", "train: 3/3"]  # the end is not said twice

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    with logs.progress_bar(total=1, desc="train", file=terminal) as bar:
        bar.update(1)
    assert type(bar) is logs.tqdm and "\r" in terminal.getvalue()


def test_importing_bitsandbytes_offline_prints_nothing_after_setup_logging(tmp_path):
    """Its kernel loader logs at import: the filters must be in place first, as the entry
    points do it (a fresh process: bitsandbytes is imported once)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    code = "from iclora.logs import setup_logging; setup_logging(); import bitsandbytes"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert not [fragment for fragment in NOISE if fragment in run.stderr], run.stderr


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# What a benchmark may import before it quiets the stack: nothing that logs at import.
QUIET_IMPORTS = {"__future__", "numpy", "torch", "PIL", "_bootstrap", "iclora.logs", *sys.stdlib_module_names}


def _top_level(body):
    """Module-level statements, those of `if` blocks (the run-by-path bootstrap) included."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _top_level(node.body)


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")
                                          if 'if __name__ == "__main__"' in p.read_text()))
def test_each_benchmark_script_quiets_the_stack_before_any_noisy_import(script):
    """The benchmarks print what the CLIs print: setup_logging() before any import of
    diffusers, peft, transformers, bitsandbytes or a sibling that does."""
    nodes = list(_top_level(ast.parse((BENCHMARKS / script).read_text()).body))
    calls = [i for i, node in enumerate(nodes) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
             and getattr(node.value.func, "id", None) == "setup_logging"]
    assert calls, f"{script} never calls setup_logging()"
    for node in nodes[:calls[0]]:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module] if isinstance(node, ast.ImportFrom) else [])
        for name in names:
            assert name in QUIET_IMPORTS or name.split(".")[0] in QUIET_IMPORTS - {"iclora"}, (script, name)


def test_a_benchmark_prints_none_of_the_noise_the_clis_filter():
    """A fresh process (bitsandbytes logs once, at its import) loading the training benchmark."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    code = f"import runpy; runpy.run_path({str(BENCHMARKS / 'train_memory.py')!r}); import peft, bitsandbytes"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert not [fragment for fragment in NOISE if fragment in run.stderr], run.stderr
