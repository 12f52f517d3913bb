"""`iclora convert` picks each backend's own ComfyUI file: from the run's iclora_config.json,
else from the file's layer names (FLUX.2's fused single blocks against FLUX.1's), and says
in one line when a file fits more than one backend.

    pytest tests/test_convert_backends.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from iclora.backends.lora_files import COMFYUI_WEIGHT_NAME, LORA_WEIGHT_NAME
from iclora.backends.lora_formats import guess_backend
from iclora.commands import main as iclora
from iclora.convert import main as convert_main
from iclora.toy import make_dataset
from iclora.training import train_flux2_ic_lora as train


@pytest.fixture(scope="module")
def flux2_run(tmp_path_factory):
    """Two steps of FLUX.2 training on tiny-flux2, with a checkpoint at step 2."""
    data = tmp_path_factory.mktemp("flux2_convert_data")
    make_dataset(data, n=2, panel_size=32)
    return train.main([
        "--data_dir", str(data), "--output_dir", str(tmp_path_factory.mktemp("flux2_convert")),
        "--model_id", "tiny-flux2", "--image_size", "64", "--batch_size", "2", "--lora_rank", "4",
        "--lora_alpha", "8", "--learning_rate", "5e-3", "--max_train_steps", "2", "--save_every", "2",
        "--seed", "0", "--max_token_length", "128",
    ])


def _same_tensors(a, b) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype, key
        torch.testing.assert_close(first[key], second[key], atol=0, rtol=0, msg=key)


def test_flux2_convert_writes_what_training_writes(flux2_run, tmp_path):
    final = flux2_run.final_dir
    assert any(k.startswith("lora_unet_single_blocks_") for k in load_file(final / COMFYUI_WEIGHT_NAME))
    convert_main(["--lora_path", str(final), "--output_dir", str(tmp_path / "final")])
    _same_tensors(tmp_path / "final" / COMFYUI_WEIGHT_NAME, final / COMFYUI_WEIGHT_NAME)

    checkpoint = final.parent / "checkpoints" / "checkpoint-2"
    iclora(["convert", "--lora_path", str(checkpoint), "--output_dir", str(tmp_path / "checkpoint")])
    _same_tensors(tmp_path / "checkpoint" / COMFYUI_WEIGHT_NAME, checkpoint / COMFYUI_WEIGHT_NAME)

    # A bare diffusers file, no iclora_config.json beside it: FLUX.2 told by its layer names.
    lone = tmp_path / "lone" / "my_lora.safetensors"
    lone.parent.mkdir()
    shutil.copy(final / LORA_WEIGHT_NAME, lone)
    iclora(["convert", "--lora_path", str(lone)])
    _same_tensors(tmp_path / "lone" / "my_lora_comfyui.safetensors", final / COMFYUI_WEIGHT_NAME)


def _lora_file(path, modules) -> None:
    g = torch.Generator().manual_seed(0)
    state = {}
    for module in modules:
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(4, 16, generator=g)
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(16, 4, generator=g)
    save_file(state, str(path))


def test_a_file_both_flux_models_could_load_is_one_error_line(tmp_path, capsys):
    ambiguous = tmp_path / "double_only.safetensors"
    _lora_file(ambiguous, ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"])
    with pytest.raises(SystemExit) as stop:
        iclora(["convert", "--lora_path", str(ambiguous)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --lora_path {ambiguous}: ")
    assert "FLUX.1 or FLUX.2 [klein]" in err and "--backend" in err
    assert not (tmp_path / "double_only_comfyui.safetensors").exists()

    # --backend settles it: FLUX.2's q and k go into its fused qkv weight.
    iclora(["convert", "--lora_path", str(ambiguous), "--backend", "flux2"])
    keys = set(load_file(tmp_path / "double_only_comfyui.safetensors"))
    assert keys == {"lora_unet_double_blocks_0_img_attn_qkv" + s for s in (".lora_down.weight", ".lora_up.weight",
                                                                           ".alpha")}
    iclora(["convert", "--lora_path", str(ambiguous), "--backend", "flux"])
    assert "transformer.transformer_blocks.0.attn.to_q.alpha" in load_file(tmp_path / "double_only_comfyui.safetensors")


def test_flux1_files_are_told_from_flux2_files_by_their_layer_names(tmp_path):
    flux1 = tmp_path / "flux1.safetensors"
    _lora_file(flux1, ["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp"])
    iclora(["convert", "--lora_path", str(flux1)])
    out = load_file(tmp_path / "flux1_comfyui.safetensors")
    assert "transformer.single_transformer_blocks.0.proj_mlp.alpha" in out  # FLUX.1's file, not kohya keys
    state = {"transformer.single_transformer_blocks.3.attn.to_qkv_mlp_proj.lora_A.weight": 0,
             "transformer.single_transformer_blocks.3.attn.to_qkv_mlp_proj.lora_B.weight": 0}
    assert guess_backend(state, "x") == "flux2"
    assert guess_backend({"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": 0}, "x") == "sdxl"
    assert guess_backend({"text_encoder.x.lora_A.weight": 0}, "x") is None
