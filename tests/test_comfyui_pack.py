"""The ComfyUI node pack's ComfyUI-free parts (comfyui_iclora/completion.py, panels.py):
mask to token alignment, token order and its inverse, modulation slices, the LoRA's record,
panel masks, compose and split. The nodes themselves run against ComfyUI in tests/comfyui/."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
from PIL import Image

from comfyui_iclora import completion as cm
from iclora.backends.flux_context import clean_token_mask
from iclora.panels import Grid, inpaint_mask, latent_mask

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / "comfyui_iclora"


def test_panels_module_is_iclora_own():
    """The pack ships a copy of src/panels.py (it must load without iclora installed): the same file."""
    assert (PACK / "panels.py").read_text() == (REPO / "src" / "panels.py").read_text()


def test_pack_is_registry_ready():
    meta = tomllib.loads((PACK / "pyproject.toml").read_text())
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"]
    assert meta["project"]["license"]["file"] == "LICENSE"
    assert "GNU GENERAL PUBLIC LICENSE" in (PACK / "LICENSE").read_text()[:200]
    workflows = {p.name: json.loads(p.read_text()) for p in (PACK / "example_workflows").glob("*.json")}
    assert set(workflows) == {"flux_context_complete_panels_2_3.json", "sdxl_concat_inpaint.json", "flux_text_to_set.json"}
    types = {name: {n["type"] for n in w["nodes"]} for name, w in workflows.items()}
    assert {"ICLoRALoader", "ICLoRAPanelMask", "SetLatentNoiseMask"} <= types["flux_context_complete_panels_2_3.json"]
    assert {"InpaintModelConditioning", "LoraLoader"} <= types["sdxl_concat_inpaint.json"]
    assert "ICLoRAContext" not in types["sdxl_concat_inpaint.json"]  # concat needs no context node


def test_token_mask_matches_iclora_flux_rule():
    """A token is masked when any of its 2x2 latent pixels is: FluxContextPipeline's rule."""
    torch.manual_seed(0)
    soft = torch.rand(3, 1, 6, 10)  # ComfyUI's soft denoise mask at latent size
    binary = cm.binary_mask(soft)
    assert torch.equal(binary, (soft >= 0.5).float())
    masked = cm.masked_tokens(binary)  # (B, N)
    assert torch.equal(masked, ~clean_token_mask(binary)[..., 0])
    aligned = cm.token_aligned(binary)
    assert torch.equal(cm.masked_tokens(aligned), masked)  # aligning keeps the tokens
    assert torch.all(aligned >= binary) and torch.equal(cm.token_aligned(aligned), aligned)
    odd = cm.token_aligned(torch.ones(1, 1, 3, 5) * (torch.arange(5) == 4))  # padded as ComfyUI pads
    assert odd.shape == (1, 1, 3, 5) and odd[0, 0, :, 4].all() and not odd[0, 0, :, :4].any()


def test_masked_first_order_and_inverse():
    masked = torch.tensor([False, True, False, True, True, False])
    order, inverse, n = cm.masked_first(masked)
    assert n == 3 and order.tolist() == [1, 3, 4, 0, 2, 5]  # masked first, each group in place order
    tokens = torch.arange(6) * 10
    assert torch.equal(tokens[order][inverse], tokens)
    assert masked[order].tolist() == [True] * 3 + [False] * 3


def test_modulation_slices():
    assert cm.modulation_slices(3, 16) == [(0, 3, 0), (3, 16, 1)]
    assert cm.modulation_slices(3, 16, offset=5) == [(5, 8, 0), (8, 21, 1)]
    assert cm.modulation_slices(0, 4) == [(0, 4, 1)] and cm.modulation_slices(4, 4) == [(0, 4, 0)]


def test_repeat_rows_for_stacked_conditionings():
    rows = torch.arange(2.0)[:, None]
    assert cm.repeat_rows(rows, 4)[:, 0].tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match="whole number"):
        cm.repeat_rows(rows, 3)


def test_lora_record_picks_the_mode(tmp_path):
    lora = tmp_path / "pytorch_lora_weights_comfyui.safetensors"
    assert cm.read_lora_config(lora) == {}  # a foreign LoRA
    assert cm.context_mode({}, "flux") == "zero" and cm.context_mode({}, "sdxl") == "shared"
    (tmp_path / cm.CONFIG_NAME).write_text(json.dumps({"backend": "flux", "conditioning": "context",
                                                       "context_timestep": "shared", "grid": "1x3"}))
    record = cm.read_lora_config(lora)
    assert cm.context_mode(record, "flux") == "shared" and cm.context_mode(record, "flux", "zero") == "zero"
    with pytest.raises(ValueError, match="trained for FLUX, the model is SDXL"):
        cm.context_mode(record, "sdxl")
    with pytest.raises(ValueError, match="InpaintModelConditioning"):
        cm.context_mode({"conditioning": "concat"}, "sdxl")
    with pytest.raises(ValueError, match="SetLatentNoiseMask"):
        cm.context_mode({"conditioning": "blend"}, "flux")
    with pytest.raises(ValueError, match="one timestep"):
        cm.context_mode({}, "sdxl", "zero")
    (tmp_path / cm.CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=r"iclora_config.json: not valid JSON"):
        cm.read_lora_config(lora)


@pytest.mark.parametrize("gradient", [0, 12])
def test_panel_mask_is_the_cli_mask_on_token_sized_panels(gradient):
    grid = Grid(2, 2)
    mask = cm.aligned_panel_mask([2, 3], grid, 64, 96, 16, gradient)
    assert torch.equal(mask, inpaint_mask([2, 3], grid, 64, 96, gradient)[0])


def test_panel_mask_edges_fall_on_whole_tokens():
    grid = Grid(1, 3)
    mask = cm.aligned_panel_mask([1], grid, 40, 100, 16)  # 100 px: panels of 33.3 px, 6.25 tokens wide
    cols = mask[0].nonzero()[:, 0]
    assert cols.min() % 16 == 0 and (cols.max() + 1) % 16 == 0
    tokens = cm.masked_tokens(latent_mask(mask[None, None], 8))
    assert torch.equal(cm.token_aligned(latent_mask(mask[None, None], 8)), latent_mask(mask[None, None], 8))
    assert tokens.any() and not tokens.all()
    with pytest.raises(ValueError, match="outside the 1x3 grid"):
        cm.parse_indices("3", grid)
    assert cm.parse_indices("all", grid) == [0, 1, 2] and cm.parse_indices("2, 0", grid) == [0, 2]


def test_compose_and_split_round_trip():
    grid = Grid(1, 3)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    panels = [Image.new("RGB", (40, 20), c) for c in colours]
    composite = cm.compose(panels, grid, 32, 32, "letterbox", (255, 255, 255))
    assert composite.size == (96, 32)
    assert composite.getpixel((16, 16)) == colours[0] and composite.getpixel((16, 1)) == (255, 255, 255)
    assert cm.compose(panels, grid, 32, 32, "crop").getpixel((48, 1)) == colours[1]
    tensor = torch.from_numpy(__import__("numpy").asarray(composite, dtype="float32") / 255)
    parts = cm.split(tensor, grid)
    assert parts.shape == (3, 32, 32, 3) and parts[2, 16, 16].tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="2 image"):
        cm.compose(panels[:2], grid, 32, 32, "crop")
