"""Flags as users type them: no prefix matching, a suggestion for a typo, grids written with
'×', and `--help` of the command groups.

    pytest tests/test_flags.py
"""

import pytest

from iclora.cli import parse_config, run_cli
from iclora.inference.config import InferConfig
from iclora.prepare.__main__ import main as prepare_main
from iclora.prepare.caption import CaptionConfig
from iclora.prepare.compose import ComposeConfig
from iclora.training.config import TrainConfig


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err  # one line, no usage block
    assert err.startswith("error: ")
    return err


@pytest.mark.parametrize("typed, meant", [
    (["--max_train_step", "5"], "--max_train_steps"),  # a prefix is not taken for the flag
    (["--max_trian_steps", "5"], "--max_train_steps"),
    (["--lerning_rate=1e-4"], "--learning_rate"),
    (["--conf", "run.yaml"], "--config"),
    (["--no_cache_latent"], "--no_cache_latents"),
])
def test_a_mistyped_flag_is_refused_with_a_suggestion(typed, meant, capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(TrainConfig, ["--data_dir", "d", *typed], prog="train")
    assert info.value.code == 2
    line = _error_line(capsys)
    assert f"unrecognized arguments: {' '.join(typed)}" in line
    assert line.endswith(f"(did you mean {meant}?)")


def test_a_flag_with_nothing_close_gets_no_suggestion(capsys):
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--data_dir", "d", "--zzzzzz"], prog="train")
    assert "did you mean" not in _error_line(capsys)


def test_a_mistyped_key_in_a_config_file_gets_a_suggestion(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("data_dir: d\nmax_train_step: 5\n")
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--config", str(config)], prog="train")
    assert _error_line(capsys).endswith("(did you mean max_train_steps?)")


@pytest.mark.parametrize("written", ["2×2", "2X2", " 2 x 2 "])
def test_a_grid_written_with_a_times_sign_is_read_as_rows_x_cols(written):
    assert parse_config(TrainConfig, ["--data_dir", "d", "--grid", written], prog="t").grid == "2x2"
    assert parse_config(InferConfig, ["--lora_path", "none", "--prompt", "p", "--grid", written], prog="i").grid == "2x2"
    assert parse_config(ComposeConfig, ["--input_dir", "a", "--output_dir", "b", "--grid", written], prog="c").grid == "2x2"
    assert parse_config(CaptionConfig, ["--data_dir", "a", "--grid", written], prog="c").grid == "2x2"


@pytest.mark.parametrize("written", ["2*2", "2,2", "2x", "×2"])
def test_a_grid_that_is_not_rows_x_cols_is_one_error_line(written, capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(TrainConfig, ["--data_dir", "d", "--grid", written], prog="t")
    assert info.value.code == 2
    assert "--grid: expected ROWSxCOLS" in _error_line(capsys)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_prepare_help_lists_its_commands(flag, capsys):
    with pytest.raises(SystemExit) as info:
        prepare_main([flag])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python -m iclora.prepare COMMAND" in out
    for command in ("compose", "caption"):
        assert any(line.split()[:1] == [command] for line in out.splitlines()), command


def test_prepare_suggests_a_command(capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(prepare_main, ["compse", "--input_dir", "x"])
    assert info.value.code == 2
    assert "got 'compse' (did you mean compose?)" in _error_line(capsys)
