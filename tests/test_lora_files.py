"""The LoRA files we write, read the way the programs that load them do: ComfyUI (its own key
rules, ported in comfyui_lora.py) on the full-size SDXL UNet and FLUX transformer built on
the meta device, stock diffusers on the tiny models; checkpoints as LoRAs; foreign files;
the convert command.

    pytest tests/test_lora_files.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionXLInpaintPipeline,
    UNet2DConditionModel,
)
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import comfyui_lora as comfy
from iclora.backends.flux import FluxBackend
from iclora.backends.lora_files import (
    COMFYUI_WEIGHT_NAME,
    CONV_IN_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    METADATA_NAME,
    lora_layers,
)
from iclora.backends.sdxl import SDXLBackend
from iclora.backends.tiny import TINY_MODELS, build_tiny_flux_components, build_tiny_sdxl_components, save_tiny_model
from iclora.cli import run_cli
from iclora.convert import main as convert_main
from iclora.inference import sdxl_ic_lora_inference
from iclora.toy import make_dataset

ROOT = Path(__file__).resolve().parents[1]
RANK, ALPHA = 4, 2  # alpha != rank: every file must carry the scale 0.5


def _memory_models():
    spec = importlib.util.spec_from_file_location("memory_models", ROOT / "benchmarks" / "memory_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_files_data")
    make_dataset(folder, n=4, panel_size=32)  # 64 x 64 composites, 2x2 panels
    return folder


@pytest.fixture(scope="module")
def flux_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora_files_flux_data")
    make_dataset(folder, n=2, panel_size=64)
    return folder


def _train_sdxl(data, out, model_id, conditioning, *extra):
    from iclora.training.train_sdxl_ic_lora import main

    return main(["--data_dir", str(data), "--output_dir", str(out), "--model_id", model_id,
                 "--conditioning", conditioning, "--image_size", "64", "--batch_size", "2",
                 "--lora_rank", str(RANK), "--lora_alpha", str(ALPHA), "--learning_rate", "1e-2",
                 "--max_train_steps", "2", "--save_every", "1", "--lora_dropout", "0", *extra])


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """Two steps each: concat on the 9-channel base, concat on a 4-channel base, blend; and
    concat on the 9-channel base with the LoRA on the ResNet convs too (--lora_convs)."""
    return {
        "inpaint": _train_sdxl(data, tmp_path_factory.mktemp("inpaint"), "tiny-sdxl-inpaint", "concat"),
        "concat4": _train_sdxl(data, tmp_path_factory.mktemp("concat4"), "tiny-sdxl", "concat"),
        "blend": _train_sdxl(data, tmp_path_factory.mktemp("blend"), "tiny-sdxl", "blend"),
        "convs": _train_sdxl(data, tmp_path_factory.mktemp("convs"), "tiny-sdxl-inpaint", "concat", "--lora_convs"),
    }


@pytest.fixture(scope="module")
def flux_run(flux_data, tmp_path_factory):
    from iclora.training.train_flux_ic_lora import main

    return main(["--data_dir", str(flux_data), "--output_dir", str(tmp_path_factory.mktemp("flux")),
                 "--model_id", "tiny-flux", "--image_size", "128", "--batch_size", "2", "--lora_rank", str(RANK),
                 "--lora_alpha", str(ALPHA), "--learning_rate", "1e-2", "--max_train_steps", "2",
                 "--cache_text_embeddings", "--lora_dropout", "0"])


@torch.no_grad()
def _unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    text = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return unet(
        torch.randn(1, cfg.in_channels, 8, 8, generator=g), torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 5, cfg.cross_attention_dim, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(1, text, generator=g),
                           "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])},
        return_dict=False,
    )[0]


@torch.no_grad()
def _flux_out(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    return transformer(
        hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(1, 7, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([0.6]), guidance=torch.tensor([1.0]), txt_ids=torch.zeros(7, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32), return_dict=False,
    )[0]


# ---- full-size models on the meta device, read with ComfyUI's rules --------------------------


@pytest.mark.parametrize("in_channels, conditioning", [(4, "blend"), (4, "concat"), (9, "concat")])
def test_comfyui_applies_every_sdxl_lora_layer_full_size(in_channels, conditioning):
    config = {**_memory_models().SDXL_UNET_CONFIG, "in_channels": in_channels}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    to_sgm = comfy.unet_to_diffusers(comfy.sdxl_unet_config(unet.config))
    assert set(unet.state_dict()) <= set(to_sgm)  # ComfyUI's SDXL model has every weight of ours
    backend = SDXLBackend({**build_tiny_sdxl_components(), "unet": unet}, "meta", conditioning)
    backend.add_lora(64, 32, 0.0)

    patches, not_loaded = comfy.load_lora(backend.comfyui_state(), comfy.sdxl_key_map(to_sgm))
    assert not_loaded == set()
    trained = {to_sgm[f"{m}.weight"] for m in lora_layers(unet)["default"]}
    lora = {t: p for t, p in patches.items() if p[0] == "lora"}
    assert set(lora) == trained and len(trained) == 700  # 70 transformer blocks x 10 layers
    assert {p[3] / p[2].shape[0] for p in lora.values()} == {0.5}  # alpha / rank, as trained
    diffs = {t: p[1].shape for t, p in patches.items() if p[0] == "diff"}
    if in_channels == 9:  # the inpainting base: the trained conv_in as a same-shape difference
        assert diffs == {"input_blocks.0.0.weight": unet.conv_in.weight.shape, "input_blocks.0.0.bias": (320,)}
    else:
        assert diffs == {}

    # Why this file exists: the diffusers file loses every attention layer in ComfyUI.
    diffusers_keys = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    _, dropped = comfy.load_lora(diffusers_keys, comfy.sdxl_key_map(to_sgm))
    assert len(dropped) == 2 * 560 and all(".attn" in k for k in dropped)


def test_comfyui_applies_every_sdxl_resnet_conv_lora_layer_full_size():
    """--lora_convs: the two 3x3 convs of each of the 17 ResNet blocks (down 3 x 2, mid 2, up
    3 x 3) land on ComfyUI's in_layers.2 / out_layers.3, as 4-d patches of the conv's shape."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_memory_models().SDXL_UNET_CONFIG)
    to_sgm = comfy.unet_to_diffusers(comfy.sdxl_unet_config(unet.config))
    shapes = {name: p.shape for name, p in unet.named_parameters()}  # before PEFT renames them
    backend = SDXLBackend({**build_tiny_sdxl_components(), "unet": unet}, "meta", "blend")
    backend.add_lora(64, 32, 0.0, convs=True)

    patches, not_loaded = comfy.load_lora(backend.comfyui_state(), comfy.sdxl_key_map(to_sgm))
    assert not_loaded == set()
    trained = {to_sgm[f"{m}.weight"] for m in lora_layers(unet)["default"]}
    assert set(patches) == trained and len(trained) == 700 + 2 * 17
    convs = {t: p for t, p in patches.items() if ".in_layers." in t or ".out_layers." in t}
    assert len(convs) == 34 and {t.split(".")[0] for t in convs} == {"input_blocks", "middle_block", "output_blocks"}
    back = {sgm: name for name, sgm in to_sgm.items()}
    for target, (_, up, down, alpha) in convs.items():
        assert (up.shape[0], *down.shape[1:]) == shapes[back[target]]  # (out, in, 3, 3)
        assert alpha / down.shape[0] == 0.5


@pytest.mark.parametrize("fill", [False, True])
def test_comfyui_applies_every_flux_lora_layer_full_size(fill):
    config = dict(_memory_models().FLUX_DEV_TRANSFORMER_CONFIG)
    if fill:
        config.update(in_channels=384, out_channels=64)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(config)
    components = build_tiny_flux_components()
    components["vae"] = AutoencoderKL.from_config({**components["vae"].config, "latent_channels": 16})
    backend = FluxBackend({**components, "transformer": transformer}, "meta", "concat" if fill else "blend")
    backend.add_lora(16, 8, 0.0)

    to_bfl = comfy.flux_to_diffusers(config["num_layers"], config["num_single_layers"], 3072)
    patches, not_loaded = comfy.load_lora(backend.comfyui_state(), comfy.flux_key_map(to_bfl))
    assert not_loaded == set()
    trained = {to_bfl[f"{m}.weight"] for m in lora_layers(transformer)["default"]}
    assert set(patches) == trained and len(trained) == 19 * 12 + 38 * 5
    assert {p[3] / p[2].shape[0] for p in patches.values()} == {0.5}


@pytest.mark.parametrize("backend_name, rank, convs", [("sdxl", 64, False), ("sdxl", 64, True), ("flux", 16, False)])
def test_params_per_rank_counts_the_full_size_lora(backend_name, rank, convs):
    """The count behind the free-space check and the LoRA file sizes the README gives
    (2 bytes a weight at the default fp16, 4 at fp32), and the memory estimate's count."""
    from iclora.prepare.memory import _lora_params
    from iclora.training.checkpoints import estimate_trainable_params

    models = _memory_models()
    with torch.device("meta"):
        if backend_name == "sdxl":
            model = UNet2DConditionModel.from_config(models.SDXL_UNET_CONFIG)
        else:
            model = FluxTransformer2DModel.from_config(models.FLUX_DEV_TRANSFORMER_CONFIG)
    if backend_name == "sdxl":
        from iclora.backends.sdxl_lora import LORA_TARGET_MODULES
        from iclora.backends.sdxl_spec import SPEC

        estimated = _lora_params(model, LORA_TARGET_MODULES, rank, SPEC.lora_conv_targets if convs else ())
        backend = SDXLBackend({**build_tiny_sdxl_components(), "unet": model}, "meta", "blend")
    else:
        components = build_tiny_flux_components()
        components["vae"] = AutoencoderKL.from_config({**components["vae"].config, "latent_channels": 16})
        backend = FluxBackend({**components, "transformer": model}, "meta", "context")
    backend.add_lora(rank, rank, 0.0, convs=convs)
    count = sum(v.numel() for v in get_peft_model_state_dict(model).values())
    assert count == estimate_trainable_params(backend_name, "someone/model", rank, convs)
    assert count == {"sdxl": 188_375_040 if convs else 167_444_480, "flux": 65_372_160}[backend_name]
    if backend_name == "sdxl":
        assert estimated == count


# ---- the tiny models, patched the way ComfyUI patches them -----------------------------------


@pytest.mark.parametrize("run", ["inpaint", "convs"])
def test_comfyui_applies_the_sdxl_inpaint_file_as_trained(run, runs):
    final = runs[run].final_dir
    ours = SDXLBackend.from_pretrained("tiny-sdxl-inpaint", conditioning="concat")
    ours.load_lora(final)
    theirs = TINY_MODELS["tiny-sdxl-inpaint"]()["unet"]
    base = _unet_out(theirs)
    to_sgm = comfy.unet_to_diffusers(comfy.sdxl_unet_config(theirs.config))
    patches, not_loaded = comfy.load_lora(load_file(final / COMFYUI_WEIGHT_NAME), comfy.sdxl_key_map(to_sgm))
    assert not_loaded == set()
    assert comfy.merge_into_diffusers(theirs, patches, to_sgm) == []
    assert (_unet_out(theirs) - base).abs().max() > 1e-3
    torch.testing.assert_close(_unet_out(theirs), _unet_out(ours.unet), atol=1e-5, rtol=1e-4)


def test_comfyui_applies_the_flux_file_as_trained(flux_run):
    ours = FluxBackend.from_pretrained("tiny-flux")
    ours.load_lora(flux_run.final_dir)
    theirs = TINY_MODELS["tiny-flux"]()["transformer"]
    cfg = theirs.config
    to_bfl = comfy.flux_to_diffusers(cfg.num_layers, cfg.num_single_layers, cfg.num_attention_heads * cfg.attention_head_dim)
    patches, not_loaded = comfy.load_lora(load_file(flux_run.final_dir / COMFYUI_WEIGHT_NAME), comfy.flux_key_map(to_bfl))
    assert not_loaded == set()
    assert comfy.merge_into_diffusers(theirs, patches, to_bfl) == []
    torch.testing.assert_close(_flux_out(theirs), _flux_out(ours.transformer), atol=1e-5, rtol=1e-4)


def test_stock_diffusers_loads_the_flux_comfyui_file_at_its_scale(flux_run, tmp_path):
    pipe = FluxPipeline(**build_tiny_flux_components())
    pipe.load_lora_weights(str(flux_run.final_dir), weight_name=COMFYUI_WEIGHT_NAME)
    ours = FluxBackend.from_pretrained("tiny-flux")
    ours.load_lora(flux_run.final_dir)
    torch.testing.assert_close(_flux_out(pipe.transformer), _flux_out(ours.transformer), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("run", ["inpaint", "convs"])
def test_lora_path_takes_the_comfyui_file(run, runs):
    """A kohya-key SDXL file (ours for ComfyUI, with the conv_in difference; with --lora_convs
    the ResNet convs in kohya's names) loads as trained."""
    final = runs[run].final_dir
    folder = SDXLBackend.from_pretrained("tiny-sdxl-inpaint", conditioning="concat")
    folder.load_lora(final)
    lone = SDXLBackend.from_pretrained("tiny-sdxl-inpaint", conditioning="concat")
    lone.load_lora(final / COMFYUI_WEIGHT_NAME)
    torch.testing.assert_close(_unet_out(lone.unet), _unet_out(folder.unet), atol=1e-5, rtol=1e-4)


# ---- checkpoints -----------------------------------------------------------------------------


def test_every_checkpoint_is_a_usable_lora(runs, data, tmp_path):
    out = runs["concat4"].final_dir.parent
    checkpoint = out / "checkpoints" / "checkpoint-1"
    files = {p.name for p in checkpoint.iterdir()}
    assert {LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME, CONV_IN_WEIGHT_NAME, METADATA_NAME} <= files
    assert json.loads((checkpoint / METADATA_NAME).read_text())["global_step"] == 1
    last = load_file(out / "checkpoints" / "checkpoint-2" / LORA_WEIGHT_NAME)
    final = load_file(runs["concat4"].final_dir / LORA_WEIGHT_NAME)
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in final)

    files = sdxl_ic_lora_inference.main(["--lora_path", str(checkpoint), "--input_image", str(data / "00001.png"),
                                         "--prompt", "p", "--num_inference_steps", "1", "--output_dir", str(tmp_path)])
    assert (tmp_path / "00001_0.png").is_file() and files


def test_inference_applies_the_resnet_conv_layers_of_a_lora(runs, data, tmp_path):
    """A --lora_convs LoRA through the inference command: every conv layer it holds is applied
    (a partly applied file is refused) and the output is written."""
    final = runs["convs"].final_dir
    backend = SDXLBackend.from_pretrained("tiny-sdxl-inpaint", conditioning="concat")
    backend.load_lora(final)
    (applied,) = lora_layers(backend.unet).values()
    convs = {m for m, _ in backend.unet.named_modules() if m.endswith((".conv1", ".conv2")) and "base_layer" not in m}
    assert convs and convs <= set(applied)
    files = sdxl_ic_lora_inference.main(["--lora_path", str(final), "--input_image", str(data / "00001.png"),
                                         "--prompt", "p", "--num_inference_steps", "1", "--output_dir", str(tmp_path)])
    assert (tmp_path / "00001_0.png").is_file() and files


# ---- foreign files and refusals --------------------------------------------------------------


def test_official_ic_lora_flux_file_is_applied_in_full(tmp_path):
    """ai-toolkit / PEFT keys and no alpha (scale 1), as the official IC-LoRA files."""
    model = TINY_MODELS["tiny-flux"]()["transformer"]
    g = torch.Generator().manual_seed(0)
    state, merged = {}, dict(model.named_parameters())
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and re.search(r"(single_)?transformer_blocks\.\d+\.(attn\.to_[qkv]|proj_mlp|ff\.net\.2)$", n)]
    with torch.no_grad():
        for name in names:
            weight = merged[f"{name}.weight"]
            down = torch.randn(2, weight.shape[1], generator=g) * 0.3
            up = torch.randn(weight.shape[0], 2, generator=g) * 0.3
            state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"] = down, up
            weight += up @ down
    save_file(state, tmp_path / "ic_lora.safetensors")
    backend = FluxBackend.from_pretrained("tiny-flux")
    backend.load_lora(tmp_path / "ic_lora.safetensors")
    assert set(lora_layers(backend.transformer)["default_0"]) == set(names)
    torch.testing.assert_close(_flux_out(backend.transformer), _flux_out(model), atol=1e-5, rtol=1e-4)


def test_a_lora_for_another_model_is_an_error(runs, flux_run):
    cases = [
        (FluxBackend.from_pretrained("tiny-flux"), runs["blend"].final_dir / LORA_WEIGHT_NAME),
        (FluxBackend.from_pretrained("tiny-flux"), runs["blend"].final_dir / COMFYUI_WEIGHT_NAME),
        (SDXLBackend.from_pretrained("tiny-sdxl", conditioning="blend"), flux_run.final_dir / LORA_WEIGHT_NAME),
        (SDXLBackend.from_pretrained("tiny-sdxl", conditioning="blend"), flux_run.final_dir / COMFYUI_WEIGHT_NAME),
    ]
    for backend, file in cases:
        with pytest.raises(ValueError, match=r"^--lora_path ") as error:
            backend.load_lora(file)
        assert "\n" not in str(error.value), str(error.value)


def test_a_partly_matching_lora_warns_with_counts(flux_run, tmp_path, caplog):
    state = load_file(flux_run.final_dir / LORA_WEIGHT_NAME)
    keys = [k for k in state if k.startswith("transformer.transformer_blocks.0.attn.to_q.")]
    # One layer of a block the tiny transformer lacks; the adapter metadata kept.
    state.update({k.replace("transformer_blocks.0.", "transformer_blocks.7."): state[k].clone() for k in keys})
    metadata = safe_open(str(flux_run.final_dir / LORA_WEIGHT_NAME), "pt").metadata()
    save_file(state, tmp_path / "partial.safetensors", metadata=metadata)
    backend = FluxBackend.from_pretrained("tiny-flux")
    backend.load_lora(tmp_path / "partial.safetensors")
    total = sum(k.endswith("lora_A.weight") for k in state)
    assert f"only {total - 1} of {total} LoRA layers" in caplog.text


def _infer(lora, data, tmp_path, *flags):
    return sdxl_ic_lora_inference.main(["--lora_path", str(lora), "--input_image", str(data / "00001.png"),
                                        "--prompt", "p", "--num_inference_steps", "1",
                                        "--output_dir", str(tmp_path / "out"), *flags])


def test_a_concat_lora_without_its_conv_in_is_refused(runs, data, tmp_path, capsys):
    with pytest.raises(SystemExit):  # blend would silently drop the trained input channels
        run_cli(lambda argv: _infer(runs["concat4"].final_dir, data, tmp_path, "--conditioning", "blend"))
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "concat" in errors[0], errors
    with pytest.raises(SystemExit):  # the other way round: no trained input channels to use
        run_cli(lambda argv: _infer(runs["blend"].final_dir, data, tmp_path, "--conditioning", "concat"))
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and "trained with --conditioning blend" in errors[0], errors
    for run in ("inpaint", "concat4"):  # conv_in.safetensors lost
        folder = tmp_path / run
        shutil.copytree(runs[run].final_dir, folder)
        (folder / CONV_IN_WEIGHT_NAME).unlink()
        with pytest.raises(SystemExit):
            run_cli(lambda argv: _infer(folder, data, tmp_path))
        errors = capsys.readouterr().err.strip().splitlines()
        assert len(errors) == 1 and CONV_IN_WEIGHT_NAME in errors[0], errors


# ---- the convert command ---------------------------------------------------------------------


def _same_tensors(a: Path, b: Path) -> None:
    first, second = load_file(a), load_file(b)
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.parametrize("run", ["inpaint", "concat4", "blend", "convs", "flux"])
def test_convert_writes_what_training_writes(run, runs, flux_run, tmp_path):
    final = flux_run.final_dir if run == "flux" else runs[run].final_dir
    convert_main(["--lora_path", str(final), "--output_dir", str(tmp_path / "folder")])
    _same_tensors(tmp_path / "folder" / COMFYUI_WEIGHT_NAME, final / COMFYUI_WEIGHT_NAME)
    if run in ("blend", "flux"):  # a lone file: its alpha travels in its own metadata
        lone = tmp_path / "lone" / "my_lora.safetensors"
        lone.parent.mkdir()
        shutil.copy(final / LORA_WEIGHT_NAME, lone)
        base = [] if run == "flux" else ["--base_model", "tiny-sdxl"]  # its layout (default: SDXL's)
        convert_main(["--lora_path", str(lone), *base])
        _same_tensors(tmp_path / "lone" / "my_lora_comfyui.safetensors", final / COMFYUI_WEIGHT_NAME)


def test_export_unet_merges_a_concat_lora_into_a_9_channel_unet(runs, tmp_path, tiny_sdxl_dir):
    final = runs["concat4"].final_dir
    files = convert_main(["--lora_path", str(final), "--export_unet", "--unet_dtype", "float32",
                          "--output_dir", str(tmp_path)])
    assert tmp_path / "unet" in files
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert unet.config.in_channels == 9 and not lora_layers(unet)
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_sdxl_dir, unet=unet)
    ours = SDXLBackend.from_pretrained("tiny-sdxl", conditioning="concat")
    ours.load_lora(final)
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(ours.unet), atol=1e-5, rtol=1e-4)

    with pytest.raises(ValueError, match="--export_unet is for SDXL concat"):
        convert_main(["--lora_path", str(runs["blend"].final_dir), "--export_unet", "--output_dir", str(tmp_path)])


@pytest.mark.parametrize("run, base", [("concat4", "tiny-sdxl"), ("inpaint", "tiny-sdxl-inpaint"),
                                       ("convs", "tiny-sdxl-inpaint")])
def test_readme_snippet_loads_a_concat_lora_into_stock_diffusers(run, base, runs, tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- concat-lora-snippet -->\s*```python\n(.*?)```", readme, re.S)[1]
    final = runs[run].final_dir
    save_tiny_model(base, tmp_path / "base")
    code = re.sub(r'^base = ".*"$', f'base = "{tmp_path / "base"}"', code, flags=re.M)
    code = re.sub(r'^lora = ".*"$', f'lora = "{final}"', code, flags=re.M)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    ours = SDXLBackend.from_pretrained(base, conditioning="concat")
    ours.load_lora(final)
    unet = namespace["pipe"].unet
    assert unet.config.in_channels == 9
    torch.testing.assert_close(_unet_out(unet), _unet_out(ours.unet), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("run", ["inpaint", "convs"])
def test_convert_rebuilds_the_lora_of_an_older_checkpoint(run, runs, tmp_path):
    """Checkpoints used to hold only the trainable weights and the optimizer state."""
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(runs[run].final_dir.parent / "checkpoints" / "checkpoint-2", checkpoint)
    for name in (LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME, CONV_IN_WEIGHT_NAME, METADATA_NAME):
        (checkpoint / name).unlink()
    with pytest.raises(FileNotFoundError, match="an older checkpoint: python src/convert.py"):
        SDXLBackend.from_pretrained("tiny-sdxl-inpaint", conditioning="concat").load_lora(checkpoint)
    convert_main(["--lora_path", str(checkpoint)])
    for name in (LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME, CONV_IN_WEIGHT_NAME):
        _same_tensors(checkpoint / name, runs[run].final_dir / name)
    meta = json.loads((checkpoint / METADATA_NAME).read_text())
    assert (meta["base_model"], meta["conditioning"], meta["global_step"]) == ("tiny-sdxl-inpaint", "concat", 2)
    final = json.loads((runs[run].final_dir / METADATA_NAME).read_text())
    for key in ("backend", "grid", "context_timestep", "image_size", "bucket_by", "max_token_length"):
        assert meta[key] == final[key], key


def test_a_rebuilt_checkpoint_records_what_inference_reads(runs, tmp_path):
    """--bucket_by and --pretrained_vae reach the rebuilt record, where inference looks for them."""
    from iclora.inference.sizing import bucket_rule
    from iclora.inference.vae import resolve_vae

    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(runs["inpaint"].final_dir.parent / "checkpoints" / "checkpoint-2", checkpoint)
    for name in (LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME, CONV_IN_WEIGHT_NAME, METADATA_NAME):
        (checkpoint / name).unlink()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["run"].update(bucket_by="area", pretrained_vae="someone/fp16-vae", max_token_length=150)
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    convert_main(["--lora_path", str(checkpoint)])
    meta = json.loads((checkpoint / METADATA_NAME).read_text())
    assert bucket_rule(meta) == "area" and meta["max_token_length"] == 150
    assert resolve_vae(None, meta, str(checkpoint)) == "someone/fp16-vae"
    del state["run"]["bucket_by"]  # a checkpoint from before --bucket_by: the longer side
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    for name in (LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME, CONV_IN_WEIGHT_NAME, METADATA_NAME):
        (checkpoint / name).unlink()
    convert_main(["--lora_path", str(checkpoint)])
    assert json.loads((checkpoint / METADATA_NAME).read_text())["bucket_by"] == "longest"


def test_an_older_kohya_file_with_diffusers_block_names_is_applied_in_full(runs, tmp_path):
    """What --output_kohya_format wrote before: diffusers' own kohya conversion (alpha = rank
    replaced by the real alpha), down_blocks/up_blocks names."""
    from diffusers.utils import convert_state_dict_to_kohya

    final = runs["blend"].final_dir
    kohya = convert_state_dict_to_kohya(load_file(final / LORA_WEIGHT_NAME))
    kohya = {k: torch.tensor(float(ALPHA)) if k.endswith(".alpha") else v for k, v in kohya.items()}
    assert any("down_blocks" in k for k in kohya)
    save_file(kohya, tmp_path / "old_kohya.safetensors")
    old = SDXLBackend.from_pretrained("tiny-sdxl", conditioning="blend")
    old.load_lora(tmp_path / "old_kohya.safetensors")
    ours = SDXLBackend.from_pretrained("tiny-sdxl", conditioning="blend")
    ours.load_lora(final)
    assert lora_layers(old.unet)["default_0"] == lora_layers(ours.unet)["default_0"]
    torch.testing.assert_close(_unet_out(old.unet), _unet_out(ours.unet), atol=1e-5, rtol=1e-4)


def test_no_output_kohya_format_skips_the_comfyui_file(data, tmp_path, flux_run):
    from iclora.training.train_sdxl_ic_lora import main

    assert (flux_run.final_dir / COMFYUI_WEIGHT_NAME).is_file()  # written by default, FLUX too
    result = main(["--data_dir", str(data), "--output_dir", str(tmp_path), "--model_id", "tiny-sdxl",
                   "--conditioning", "blend", "--image_size", "64", "--batch_size", "2", "--lora_rank", "4",
                   "--max_train_steps", "1", "--save_every", "1", "--no_output_kohya_format"])
    for folder in (result.final_dir, tmp_path / "checkpoints" / "checkpoint-1"):
        assert (folder / LORA_WEIGHT_NAME).is_file() and not (folder / COMFYUI_WEIGHT_NAME).exists()
