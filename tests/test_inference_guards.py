"""Inference refuses (or with --allow_crop crops) an input far from the grid's shape, as
training does, and says in one line when it replaces an earlier run's outputs.

    pytest tests/test_inference_guards.py
"""

import logging
import shutil

import pytest
from PIL import Image

from iclora.cli import run_cli
from iclora.inference.sdxl_ic_lora_inference import main

BASE = ["--lora_path", "none", "--base_model", "tiny-sdxl", "--prompt", "p", "--panels_to_inpaint", "3",
        "--num_inference_steps", "1", "--seed", "0"]


def replacing(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "replacing an earlier run's outputs" in r.getMessage()]


def test_a_second_run_into_the_same_folder_says_it_replaces_the_first(data_2x2, tmp_path, caplog):
    out = tmp_path / "out"
    argv = [*BASE, "--input_image", str(data_2x2 / "00000.png"), "--output_dir", str(out)]
    with caplog.at_level(logging.INFO, logger="iclora"):
        main(argv)
        assert replacing(caplog) == []
        main(["--input_image", str(data_2x2 / "00001.png"), *argv[:-4], "--output_dir", str(out)])  # another input
        assert replacing(caplog) == []
        main(argv)
    assert replacing(caplog) == [f"--output_dir {out}: replacing an earlier run's outputs of 00000"]


def test_a_folder_run_names_every_input_it_replaces_in_one_line(data_2x2, tmp_path, caplog):
    inputs, out = tmp_path / "inputs", tmp_path / "out"
    inputs.mkdir()
    for name in ("00000.png", "00001.png"):
        shutil.copy(data_2x2 / name, inputs / name)
    argv = [*BASE, "--input_dir", str(inputs), "--output_dir", str(out)]
    with caplog.at_level(logging.INFO, logger="iclora"):
        main(argv)
        assert replacing(caplog) == []
        main(argv)
    assert replacing(caplog) == [f"--output_dir {out}: replacing an earlier run's outputs of 00000, 00001"]


def test_an_input_training_would_refuse_is_refused_or_cropped(data_2x2, train, tmp_path, capsys):
    lora = str(train(data_2x2, "--max_train_steps", "1").final_dir)  # trained at --image_size 64
    capsys.readouterr()
    strip = tmp_path / "strip.png"
    Image.new("RGB", (1000, 20), (200, 30, 30)).save(strip)
    argv = ["--lora_path", lora, *BASE[2:], "--input_image", str(strip), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        run_cli(main, argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --input_image {strip}: 1000x20 is far from a shape the 2x2 grid holds: as training at "
                   "--image_size 64, it would be cropped to 8.0% of its width to fit 64x16 for the 2x2 grid "
                   "(--allow_crop crops it to fit)"]
    assert not (tmp_path / "out").exists()

    main([*argv, "--allow_crop"])
    with Image.open(tmp_path / "out" / "strip_0.png") as made:
        assert made.size == (80, 20)  # the centre of the strip, in the 64x16 bucket's shape
    # Without a LoRA's record the check is that of training at 1024: a 100:1 strip is refused, 1000x20 taken.
    wide = tmp_path / "wide.png"
    Image.new("RGB", (2000, 20), (200, 30, 30)).save(wide)
    with pytest.raises(ValueError, match="as training at --image_size 1024, it would be cropped to 64.0% of its width"):
        main([*BASE, "--input_image", str(wide), "--output_dir", str(tmp_path / "out2")])
