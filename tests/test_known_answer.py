"""Known-answer check: masked-panel training learns in-context completion.

Runs benchmarks/known_answer.py end to end (real training CLI, real inference code, the
fitted toy VAE so errors are in pixels): several minutes on 2 CPU cores, so it is marked
slow and left out of the default run. Run it with

    python -m pytest -m slow tests/test_known_answer.py

The run is seeded; the thresholds are about half the margins measured in
benchmarks/RESULTS.md (2 CPU cores, seed 0), to allow for floating-point differences
between machines. Measured (hidden panels, unseen pairs, MAE 0-255): (a) 24.8, (b) 11.5,
(c) 19.4, flat background 14.6; right colour (b) 62%, (c) 12%.

FLUX (toy FLUX.1-Fill layout, concat), ~10 min: (a) 28.9, (b) 14.6, (c) 15.9 (training
composites: (b) 14.5, (c) 16.8); right colour (b) 25%, (c) 0%. The FLUX margins over (c) are
small, so its thresholds are too.

    python -m pytest -m slow tests/test_known_answer.py -k flux

Context conditioning (visible panels clean in the denoiser input), measured 2026-12-01:
SDXL ~25 min, FLUX (per-token timestep 0) ~30 min on a shared 2-core machine:

    python -m pytest -m slow tests/test_known_answer.py -k context

FLUX.2 [klein] (its own toy base, the FLUX.2 CLIs), 1x3: `-k flux2`; its 2x2 run is in
tests/test_known_answer_dist.py.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from conftest import load_benchmark


B = "(b) IC-LoRA, --mask_probability 0.7"
A = "(a) untrained model"
C = "(c) LoRA, --mask_probability 0"
BLANK = "(e) flat background"


@pytest.mark.slow
def test_masked_panel_training_beats_untrained_and_unmasked_training(tmp_path):
    report = load_benchmark("known_answer").main(["--json", str(tmp_path / "known_answer.json")])
    table = report["table"]
    b, a, c, blank = table[B], table[A], table[C], table[BLANK]

    # The visible panels are pasted back exactly, whatever the model.
    for row in (a, b, c):
        assert row["visible"] == 0.0

    # Hidden panels of (colour, shape) pairs never seen in training. Measured (2026-12-01,
    # concat inference resetting the visible latents, visible panels at half loss weight):
    # (b) 6.8, (a) 23.9, (c) 9.3, blank guess 14.6; training composites (b) 5.9, (c) 8.4.
    # With the LoRA on the ResNet convs (the default since 2026-12-06): (b) 6.0, (c) 8.1;
    # training composites (b) 5.3, (c) 7.5; right colour 75 % / 50 %.
    assert b["hidden_unseen"] < a["hidden_unseen"] - 8.5, table
    assert b["hidden_unseen"] < c["hidden_unseen"] - 1.2, table
    assert b["hidden_unseen"] < blank["hidden_unseen"] - 3.9, table
    assert b["hidden_seen"] < c["hidden_seen"] - 1.2, table
    # The in-context part: the hidden objects take the visible panels' colour
    # (measured: 75% of hidden panels for (b), 50% for (c)).
    assert b["colour_unseen"] >= c["colour_unseen"] + 0.12, table


@pytest.mark.slow
def test_flux_masked_panel_training_reads_the_visible_panels(tmp_path):
    report = load_benchmark("known_answer").main(["--backend", "flux", "--json", str(tmp_path / "known_answer_flux.json")])
    table = report["table"]
    b, a, c = table[B], table[A], table[C]
    for row in (a, b, c):
        assert row["visible"] == 0.0
    # Measured: (b) 14.3 below the untrained model and 1.3 below (c) on unseen pairs, 2.3
    # below (c) on training composites.
    assert b["hidden_unseen"] < a["hidden_unseen"] - 7, table
    assert b["hidden_unseen"] < c["hidden_unseen"] - 0.5, table
    assert b["hidden_seen"] < c["hidden_seen"] - 1, table
    # Measured: hidden objects in the visible panels' colour for 25% / 31% of hidden panels
    # (unseen / training) with masked training, 0% / 6% without.
    assert b["colour_unseen"] >= c["colour_unseen"] + 0.12, table
    assert b["colour_seen"] >= c["colour_seen"] + 0.12, table


@pytest.mark.slow
def test_flux_concat_with_more_masked_panels_beats_the_flat_background(tmp_path):
    """FLUX.1-Fill layout with every sample completing 1-3 panels (~6 min on 2 cores).
    Measured (unseen pairs): (b) 12.0 hidden MAE, 50 % right colour; (a) 28.9; flat
    background 14.6 (the trainer's 0.7 / 2 masking only ties it, 14.6)."""
    report = load_benchmark("known_answer").main(["--backend", "flux", "--mask_probability", "1.0", "--max_masked_panels", "3",
                                     "--skip_c", "--threads", "1", "--json", str(tmp_path / "flux_concat.json")])
    table = report["table"]
    b = table["(b) IC-LoRA, --mask_probability 1 --max_masked_panels 3"]
    a, blank = table[A], table[BLANK]
    assert b["visible"] == 0.0
    assert b["hidden_unseen"] < blank["hidden_unseen"] - 1.3, table
    assert b["hidden_unseen"] < a["hidden_unseen"] - 8, table
    assert b["colour_unseen"] >= 0.25, table


THROUGH_BLEND = "(b) through blend inference"


@pytest.mark.slow
def test_sdxl_context_training_reads_the_visible_panels(tmp_path):
    report = load_benchmark("known_answer").main(["--conditioning", "context", "--threads", "1",
                                     "--json", str(tmp_path / "known_answer_context.json")])
    table = report["table"]
    b, a, c, blank, blended = table[B], table[A], table[C], table[BLANK], table[THROUGH_BLEND]
    for row in (a, b, c, blended):
        assert row["visible"] == 0.0
    # Measured (unseen pairs): (b) 5.2, (a) 22.0, (c) 7.0, blank 14.6, (b) through blend 10.3;
    # right colour (b) 100 %, (c) 62 %. Thresholds: about half of each margin.
    assert b["hidden_unseen"] < a["hidden_unseen"] - 8, table
    assert b["hidden_unseen"] < blank["hidden_unseen"] - 4, table
    assert b["hidden_unseen"] < c["hidden_unseen"] - 0.9, table
    assert b["hidden_unseen"] < blended["hidden_unseen"] - 2.5, table
    assert b["colour_unseen"] >= c["colour_unseen"] + 0.19, table


@pytest.mark.slow
def test_flux_context_training_beats_every_blend_run(tmp_path):
    report = load_benchmark("known_answer").main(["--backend", "flux", "--conditioning", "context", "--context_timestep", "zero",
                                     "--threads", "1", "--json", str(tmp_path / "known_answer_flux_context.json")])
    table = report["table"]
    b, a, c, blank, blended = table[B], table[A], table[C], table[BLANK], table[THROUGH_BLEND]
    for row in (a, b, c, blended):
        assert row["visible"] == 0.0
    # Measured (unseen pairs): (b) 7.7, (a) 46.4, (c) 8.5, blank 14.6, (b) through blend
    # 10.2; right colour (b) 100 %, (c) 94 %. The best blend run measured 10.0 (whole
    # composites, benchmarks/RESULTS.md): (b) must stay under it by half the margin.
    assert b["hidden_unseen"] < a["hidden_unseen"] - 19, table
    assert b["hidden_unseen"] < blank["hidden_unseen"] - 3.4, table
    assert b["hidden_unseen"] < 10.0 - 1.1, table
    assert b["hidden_unseen"] < blended["hidden_unseen"] - 1.2, table
    assert b["hidden_unseen"] < c["hidden_unseen"] + 0.5, table  # measured 0.8 below; about a tie
    assert b["colour_unseen"] >= c["colour_unseen"], table


@pytest.mark.slow
def test_sdxl_context_training_reads_continuous_colours_on_the_harder_toy(tmp_path):
    """benchmarks/known_answer_hard.py, SDXL context, 2x2 (~15 min on a shared 2-core machine).
    Measured colour error with the LoRA on the ResNet convs (the default since 2026-12-06): (b)
    14.3, (a) 70.4, blind guess 53.1; within 25: (b) 90 %, (a) 2 % (attention only: 24.9, 56 %)."""
    report = load_benchmark("known_answer_hard").main(["--backend", "sdxl", "--conditioning", "context", "--threads", "1",
                                          "--skip_c", "--json", str(tmp_path / "hard.json")])
    table = report["table"]
    b, a, blind = table[B], table["(a) untrained base"], table["blind guess (mean colour)"]
    assert b["colour_error"] < a["colour_error"] - 28, table
    assert b["colour_error"] < 0.6 * a["colour_error"], table
    assert b["colour_error"] < blind["colour_error"] - 19, table
    assert b["close"] >= a["close"] + 0.44, table


@pytest.mark.slow
def test_flux_context_training_reads_continuous_colours_on_the_harder_toy(tmp_path):
    """benchmarks/known_answer_hard.py, FLUX context (zero) at the FLUX script's masking
    (1.0 / 3), 2x2 (~25 min on a shared 2-core machine). Measured colour error: (b) 13.5,
    (a) 57.1, (c) 20.2, blind guess 53.1; within 25: (b) 92 %, (c) 71 %, (a) 10 %."""
    report = load_benchmark("known_answer_hard").main([
        "--backend", "flux", "--conditioning", "context", "--context_timestep", "zero", "--steps", "1650",
        "--batch_size", "4", "--mask_probability", "1.0", "--max_masked_panels", "3", "--threads", "1",
        "--json", str(tmp_path / "hard_flux.json")])
    table = report["table"]
    b, a, c = table["(b) IC-LoRA, --mask_probability 1 --max_masked_panels 3"], table["(a) untrained base"], table[C]
    blind = table["blind guess (mean colour)"]
    assert b["colour_error"] < 0.6 * a["colour_error"], table
    assert b["colour_error"] < a["colour_error"] - 21, table
    assert b["colour_error"] < blind["colour_error"] - 19, table
    assert b["colour_error"] < c["colour_error"] - 3.3, table
    assert b["close"] >= c["close"] + 0.1, table


@pytest.mark.slow
def test_sdxl_concat_training_reads_continuous_colours_on_the_harder_toy(tmp_path):
    """benchmarks/known_answer_hard.py, SDXL concat (the SDXL default) at the trainer's
    defaults, 2x2 (~30 min on a shared 2-core machine). Measured colour error with the LoRA on
    the ResNet convs (the default since 2026-12-06): (b) 17.4, (c) 28.6, (a) 67.6; within 25:
    (b) 77 %, (c) 46 %; (b) with the visible latents left to the model, as diffusers'
    9-channel pipeline does, 31.8 (attention only: 24.7, 41.2, 60 %, 15 %, 39.2)."""
    report = load_benchmark("known_answer_hard").main(["--backend", "sdxl", "--conditioning", "concat", "--threads", "1",
                                          "--json", str(tmp_path / "hard_concat.json")])
    table = report["table"]
    b, a, c = table[B], table["(a) untrained base"], table[C]
    free = table["(b), visible latents left to the model (--no_blend_visible)"]
    assert b["colour_error"] < 0.6 * a["colour_error"], table
    assert b["colour_error"] < a["colour_error"] - 25, table
    assert b["colour_error"] < c["colour_error"] - 5.6, table
    assert b["close"] >= c["close"] + 0.15, table
    assert b["colour_error"] < free["colour_error"] - 7, table


@pytest.mark.slow
def test_flux2_context_training_reads_continuous_colours_on_the_harder_toy_1x3(tmp_path):
    """benchmarks/known_answer_hard.py through the FLUX.2 CLIs, context at the FLUX.2 script's
    defaults, 1x3 (~27 min on a shared 2-core machine). Measured 2026-12-06, colour error:
    (b) 18.2, (a) 35.7, (c) 32.9, blind guess 45.9; within 25: (b) 83 %, (c) 42 %."""
    report = load_benchmark("known_answer_hard").main([
        "--backend", "flux2", "--conditioning", "context", "--context_timestep", "zero", "--steps", "1650",
        "--batch_size", "4", "--mask_probability", "1.0", "--max_masked_panels", "3", "--grid", "1x3",
        "--n_sets", "0", "--threads", "1", "--json", str(tmp_path / "hard_flux2_1x3.json")])
    table = report["table"]
    b, a, c = table["(b) IC-LoRA, --mask_probability 1 --max_masked_panels 3"], table["(a) untrained base"], table[C]
    blind = table["blind guess (mean colour)"]
    assert b["colour_error"] < 0.6 * a["colour_error"] and b["colour_error"] < a["colour_error"] - 8.7, table
    assert b["colour_error"] < c["colour_error"] - 7.3, table
    assert b["colour_error"] < blind["colour_error"] - 13.8, table
    assert b["close"] >= c["close"] + 0.2, table
