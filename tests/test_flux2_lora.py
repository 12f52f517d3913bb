"""FLUX.2's LoRA files, read the way the programs that load them do: ComfyUI (its own key
rules, ported in comfyui_lora.py) on the full-size FLUX.2 [klein] 4B transformer built on the
meta device, stock diffusers (Flux2KleinPipeline.load_lora_weights) and ComfyUI's rules on a
tiny random one; foreign ai-toolkit and musubi-tuner files, applied in full or refused.

    pytest tests/test_flux2_lora.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import logging
import re

import pytest
import torch
from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import comfyui_lora as comfy
from iclora.backends.flux2_lora import LORA_TARGET_MODULES, comfyui_state, load_lora, save_lora
from iclora.backends.lora_files import COMFYUI_WEIGHT_NAME, LORA_WEIGHT_NAME, lora_layers
from iclora.backends.tiny import TINY_MODELS, save_tiny_model

RANK, ALPHA = 4, 2  # alpha != rank: every file must carry the scale 0.5

# FLUX.2 [klein] 4B's transformer: diffusers' scripts/convert_flux2_to_diffusers.py,
# model_type "klein-4b" (the diffusers_config it writes as transformer/config.json of
# black-forest-labs/FLUX.2-klein-4B and FLUX.2-klein-base-4B).
KLEIN_4B_TRANSFORMER_CONFIG = {
    "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 7680, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False,
}
KLEIN_HIDDEN = 24 * 128

# The layers each FLUX.2 LoRA of ours trains, in ComfyUI's (the original) names.
DOUBLE_BFL = ["img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
              "txt_mlp.0", "txt_mlp.2"]
SINGLE_BFL = ["linear1", "linear2"]


def _bfl_weights(depth: int, depth_single: int) -> set[str]:
    return ({f"double_blocks.{i}.{m}.weight" for i in range(depth) for m in DOUBLE_BFL}
            | {f"single_blocks.{i}.{m}.weight" for i in range(depth_single) for m in SINGLE_BFL})


def _tiny_transformer(seed: int = 0) -> Flux2Transformer2DModel:
    """Two double and two single blocks (block indices past 0 are mapped too)."""
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    ).eval()


def _pipe(transformer) -> Flux2KleinPipeline:
    """Loading a LoRA touches only the transformer."""
    return Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)


def _hidden(transformer) -> int:
    return transformer.config.num_attention_heads * transformer.config.attention_head_dim


@torch.no_grad()
def _out(transformer, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    img_ids = torch.cartesian_prod(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), torch.zeros(1))
    txt_ids = torch.cartesian_prod(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.arange(7.0))
    return transformer(
        hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 7, cfg.joint_attention_dim, generator=g),
        timestep=torch.tensor([0.6]), img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
    )[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny transformer with a LoRA of random A and B (rounded to float16, as written),
    its files and its output."""
    transformer = _tiny_transformer()
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGET_MODULES))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.copy_((torch.randn(param.shape, generator=g) * 0.3).half().float())
    folder = tmp_path_factory.mktemp("flux2_lora")
    save_lora(transformer, folder)
    return transformer, folder, _out(transformer)


# ---- the layers trained, and the full-size model read with ComfyUI's rules -------------------


def _klein_4b_on_meta() -> Flux2Transformer2DModel:
    with torch.device("meta"):
        return Flux2Transformer2DModel.from_config(KLEIN_4B_TRANSFORMER_CONFIG)


def test_targets_on_the_full_size_klein_4b():
    transformer = _klein_4b_on_meta()
    # diffusers' train_dreambooth_lora_flux2_klein.py default (PEFT suffix matching)
    official = ["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                *[f"single_transformer_blocks.{i}.attn.to_out" for i in range(24)]]
    names = [n for n, _ in transformer.named_modules()]
    theirs = {n for n in names if any(n == t or n.endswith(f".{t}") for t in official)}
    transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=LORA_TARGET_MODULES))
    ours = lora_layers(transformer)["default"]
    assert len(ours) == 5 * 12 + 20 * 2
    assert all(isinstance(transformer.get_submodule(m).base_layer, torch.nn.Linear) for m in ours)
    assert theirs < ours
    assert {re.sub(r"^transformer_blocks\.\d+\.", "", m) for m in ours - theirs} == {
        "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"}
    assert all(m.startswith(("transformer_blocks.", "single_transformer_blocks.")) for m in ours)


def test_comfyui_applies_every_flux2_lora_layer_full_size():
    transformer = _klein_4b_on_meta()
    to_bfl = comfy.flux2_to_diffusers(5, 20, KLEIN_HIDDEN)
    assert set(to_bfl) <= set(transformer.state_dict())
    shapes = comfy.fused_weight_shapes(transformer, to_bfl)  # ComfyUI's weights and their shapes
    transformer.add_adapter(LoraConfig(r=16, lora_alpha=8, target_modules=LORA_TARGET_MODULES))
    key_map = comfy.flux_key_map(to_bfl)

    patches, not_loaded = comfy.load_lora(comfyui_state(transformer), key_map)
    assert not_loaded == set()
    assert set(patches) == _bfl_weights(5, 20) and len(patches) == 5 * 8 + 20 * 2
    for target, (_, up, down, alpha) in patches.items():
        assert (up.shape[0], down.shape[1]) == shapes[target], target  # lands on the whole weight
        assert alpha / down.shape[0] == 0.5  # alpha / rank, as trained
    assert shapes["double_blocks.0.img_attn.qkv.weight"] == (3 * KLEIN_HIDDEN, KLEIN_HIDDEN)
    assert shapes["single_blocks.0.linear1.weight"] == (3 * KLEIN_HIDDEN + 2 * 3 * KLEIN_HIDDEN, KLEIN_HIDDEN)

    # Why the second file: ComfyUI maps the diffusers keys too, but with no alpha at scale 1.0.
    diffusers_keys = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(transformer).items()}
    patches, not_loaded = comfy.load_lora(diffusers_keys, key_map)
    assert not_loaded == set() and len(patches) == 100
    assert all(p[3] is None for p in patches.values())


# ---- our files on the tiny model -------------------------------------------------------------


def test_stock_diffusers_loads_our_file_in_full_at_its_scale(trained):
    transformer, folder, expected = trained
    metadata = json.loads(safe_open(str(folder / LORA_WEIGHT_NAME), "pt").metadata()["lora_adapter_metadata"])
    assert (metadata["transformer.r"], metadata["transformer.lora_alpha"], metadata["transformer.lora_dropout"]) == (
        RANK, ALPHA, 0.0)
    fresh = _tiny_transformer()
    base = _out(fresh)
    _pipe(fresh).load_lora_weights(str(folder), weight_name=LORA_WEIGHT_NAME)
    assert lora_layers(fresh)["default_0"] == lora_layers(transformer)["default"]
    assert fresh.peft_config["default_0"].lora_alpha == ALPHA
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(_out(fresh), expected, atol=1e-5, rtol=1e-4)


def test_stock_pipeline_from_a_folder_runs_our_lora(tmp_path):
    """What a diffusers user does: Flux2KleinPipeline.from_pretrained(base), then
    load_lora_weights(our folder): every layer loaded, at its scale, and the image changes."""
    transformer = TINY_MODELS["tiny-flux2"]()["transformer"]
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGET_MODULES))
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for name, param in transformer.named_parameters():
            if "lora_" in name:  # rounded to float16, as written
                param.copy_((torch.randn(param.shape, generator=g) * 0.5).half().float())
    save_lora(transformer, tmp_path / "lora")
    save_tiny_model("tiny-flux2", tmp_path / "base")
    pipe = Flux2KleinPipeline.from_pretrained(tmp_path / "base")

    def image():
        return pipe(prompt="a red ball", height=64, width=64, num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    before = image()
    pipe.load_lora_weights(str(tmp_path / "lora"), weight_name=LORA_WEIGHT_NAME)
    assert lora_layers(pipe.transformer)["default_0"] == lora_layers(transformer)["default"]
    assert len(lora_layers(transformer)["default"]) == 12 + 2  # its 1 + 1 blocks
    g = torch.Generator().manual_seed(5)
    cfg = transformer.config
    args = dict(hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, 7, cfg.joint_attention_dim, generator=g),
                timestep=torch.tensor([0.6]), img_ids=torch.zeros(16, 4), txt_ids=torch.zeros(7, 4), return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**args)[0], transformer.eval()(**args)[0], atol=1e-5, rtol=1e-4)
    assert (image() - before).abs().max() > 1e-3


@pytest.mark.parametrize("weight_name", [LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME])
def test_lora_path_loads_our_files_as_trained(trained, weight_name):
    """Ours, the folder or either file; the ComfyUI file also through stock diffusers (its
    kohya conversion reads the alphas and splits the fused q/k/v back)."""
    _, folder, expected = trained
    ours = _tiny_transformer()
    load_lora(_pipe(ours), ours, folder / weight_name, "context")
    torch.testing.assert_close(_out(ours), expected, atol=1e-5, rtol=1e-4)
    stock = _tiny_transformer()
    _pipe(stock).load_lora_weights(str(folder), weight_name=weight_name)
    torch.testing.assert_close(_out(stock), expected, atol=1e-5, rtol=1e-4)
    assert len(lora_layers(stock)["default_0"]) == 2 * 12 + 2 * 2


def test_comfyui_rules_apply_the_comfyui_file_as_trained(trained):
    _, folder, expected = trained
    state = load_file(folder / COMFYUI_WEIGHT_NAME)
    assert {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in state} == {
        "lora_unet_" + w.removesuffix(".weight").replace(".", "_") for w in _bfl_weights(2, 2)}
    assert all(v.dtype == torch.float32 for k, v in state.items() if k.endswith(".alpha"))
    theirs = _tiny_transformer()
    to_bfl = comfy.flux2_to_diffusers(2, 2, _hidden(theirs))
    patches, not_loaded = comfy.load_lora(state, comfy.flux_key_map(to_bfl))
    assert not_loaded == set() and set(patches) == _bfl_weights(2, 2)
    assert comfy.merge_fused(theirs, patches, to_bfl) == []
    torch.testing.assert_close(_out(theirs), expected, atol=1e-5, rtol=1e-4)


def test_save_lora_without_compat_writes_only_the_diffusers_file(trained, tmp_path):
    transformer, folder, _ = trained
    save_lora(transformer, tmp_path, compat=False, dtype=torch.bfloat16)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LORA_WEIGHT_NAME]
    state = load_file(tmp_path / LORA_WEIGHT_NAME)
    assert state.keys() == load_file(folder / LORA_WEIGHT_NAME).keys()
    assert {v.dtype for v in state.values()} == {torch.bfloat16}


# ---- foreign files ---------------------------------------------------------------------------


def _foreign(seed: int = 3, rank: int = 2) -> tuple[dict, torch.Tensor]:
    """A random LoRA on every layer we train, in the original layout: {ComfyUI weight:
    (up, down)}, and the output of the tiny model with it merged (alpha = rank)."""
    model = _tiny_transformer()
    to_bfl = comfy.flux2_to_diffusers(2, 2, _hidden(model))
    shapes = comfy.fused_weight_shapes(model, to_bfl)
    g = torch.Generator().manual_seed(seed)
    factors = {w: (torch.randn(shapes[w][0], rank, generator=g) * 0.2,
                   torch.randn(rank, shapes[w][1], generator=g) * 0.2) for w in sorted(_bfl_weights(2, 2))}
    assert comfy.merge_fused(model, {w: ("lora", up, down, None) for w, (up, down) in factors.items()}, to_bfl) == []
    return factors, _out(model)


def _ai_toolkit(factors):
    state = {}
    for weight, (up, down) in factors.items():
        stem = "diffusion_model." + weight.removesuffix(".weight")
        state[f"{stem}.lora_A.weight"], state[f"{stem}.lora_B.weight"] = down, up
    return state


def _musubi(factors, alpha: float):
    """musubi-tuner (kohya keys): up scaled so that alpha / rank gives the same update."""
    state = {}
    for weight, (up, down) in factors.items():
        stem = "lora_unet_" + weight.removesuffix(".weight").replace(".", "_")
        state[f"{stem}.lora_down.weight"] = down
        state[f"{stem}.lora_up.weight"] = up * down.shape[0] / alpha
        state[f"{stem}.alpha"] = torch.tensor(alpha)
    return state


@pytest.mark.parametrize("layout", ["ai-toolkit", "musubi-tuner"])
def test_foreign_flux2_files_are_applied_in_full(layout, tmp_path):
    factors, expected = _foreign()
    state = _ai_toolkit(factors) if layout == "ai-toolkit" else _musubi(factors, alpha=1.0)
    save_file(state, tmp_path / "foreign.safetensors")
    model = _tiny_transformer()
    load_lora(_pipe(model), model, tmp_path / "foreign.safetensors", "context")
    assert lora_layers(model)["default_0"] == {m.removeprefix("transformer.").removesuffix(".weight")
                                               for m in comfy.flux2_to_diffusers(2, 2, 32)
                                               if not m.startswith(("proj_out", "x_embedder", "context_embedder"))}
    torch.testing.assert_close(_out(model), expected, atol=1e-5, rtol=1e-4)


def _refused(model, file) -> str:
    with pytest.raises(ValueError, match=r"^--lora_path ") as error:
        load_lora(_pipe(model), model, file, "context")
    assert "\n" not in str(error.value), str(error.value)
    return str(error.value)


@pytest.mark.parametrize("extra, reason", [
    ("lora_te_model_layers_0_self_attn_q_proj", "would not be applied"),  # a text encoder layer
    ("lora_unet_double_stream_modulation_img_lin", "would not be applied"),  # not converted by diffusers
    ("dora", "would not be applied"),
])
def test_a_musubi_file_diffusers_would_load_in_part_is_refused(extra, reason, tmp_path):
    factors, _ = _foreign()
    state = _musubi(factors, alpha=1.0)
    if extra == "dora":
        state["lora_unet_single_blocks_0_linear2.dora_scale"] = torch.ones(1, 32)
    else:
        state[f"{extra}.lora_down.weight"], state[f"{extra}.lora_up.weight"] = torch.zeros(2, 32), torch.zeros(32, 2)
    save_file(state, tmp_path / "partial.safetensors")
    assert reason in _refused(_tiny_transformer(), tmp_path / "partial.safetensors")


def test_unreadable_and_other_model_files_are_refused_in_one_line(trained, tmp_path):
    _, folder, _ = trained
    factors, _ = _foreign()
    cases = {}
    # ai-toolkit keys with alphas: diffusers' conversion leaves them over and fails
    state = _ai_toolkit(factors)
    state["diffusion_model.single_blocks.0.linear1.alpha"] = torch.tensor(2.0)
    cases["alpha.safetensors"] = state
    # a diffusers file carrying text-encoder layers, which FLUX.2's pipelines never load
    state = load_file(folder / LORA_WEIGHT_NAME)
    state["text_encoder.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 8)
    state["text_encoder.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(8, 2)
    cases["text_encoder.safetensors"] = state
    # an SDXL LoRA
    cases["sdxl.safetensors"] = {"unet.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 8),
                                 "unet.down_blocks.1.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 2)}
    # a FLUX.1 kohya LoRA (its single blocks' qkv and MLP are not FLUX.2's shapes)
    cases["flux1.safetensors"] = {"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(2, 32),
                                  "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(3 * 32 + 4 * 32, 2)}
    for name, state in cases.items():
        save_file(state, tmp_path / name)
        message = _refused(_tiny_transformer(), tmp_path / name)
        assert name in message


def test_a_lora_for_a_larger_flux2_warns_with_counts(trained, tmp_path, caplog):
    """As on FLUX.1: layers of blocks the model lacks (a 9B LoRA on a 4B) are named and counted."""
    _, folder, expected = trained
    state = load_file(folder / LORA_WEIGHT_NAME)
    keys = [k for k in state if k.startswith("transformer.transformer_blocks.0.attn.to_q.")]
    state.update({k.replace("transformer_blocks.0.", "transformer_blocks.7."): state[k].clone() for k in keys})
    metadata = safe_open(str(folder / LORA_WEIGHT_NAME), "pt").metadata()
    save_file(state, tmp_path / "larger.safetensors", metadata=metadata)
    model = _tiny_transformer()
    with caplog.at_level(logging.WARNING):
        load_lora(_pipe(model), model, tmp_path / "larger.safetensors", "context")
    total = sum(k.endswith("lora_A.weight") for k in state)
    assert f"only {total - 1} of {total} LoRA layers" in caplog.text
    torch.testing.assert_close(_out(model), expected, atol=1e-5, rtol=1e-4)
