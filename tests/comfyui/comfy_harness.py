"""Tests against ComfyUI's real code: they run when COMFYUI_PATH names a ComfyUI checkout
(its code is GPL-3.0 and not on the package registries, so it is never part of this
repository), and are skipped with that reason otherwise. Run them with the packages
ComfyUI's imports need beside ours (README, "ComfyUI"):

    COMFYUI_PATH=/path/to/ComfyUI python -m pytest tests/comfyui

Test modules import the `comfy` fixture and `requires_comfyui` from here.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from pathlib import Path

import pytest
import torch

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
REPO = Path(__file__).resolve().parents[2]
STUBBED = ("torchvision", "torchaudio")


def _skip_reason() -> str | None:
    if not COMFYUI_PATH:
        return "COMFYUI_PATH is not set (it names a ComfyUI checkout to test the nodes against)"
    if not (Path(COMFYUI_PATH) / "comfy").is_dir():
        return f"COMFYUI_PATH {COMFYUI_PATH} does not name a ComfyUI checkout (no comfy/ folder)"
    return None


# Every test module here starts with `pytestmark = requires_comfyui`.
requires_comfyui = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


class _Stub(types.ModuleType):
    """A module whose every attribute is another stub: imports succeed, use fails."""

    __path__: list = []

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Stub(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__} is a stub in these tests")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """torchvision and torchaudio: ComfyUI imports them in model files these tests never run
    (Cascade, Cosmos, audio VAEs, ...), and their PyPI builds do not import beside a CPU-only
    torch of another build."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Stub(spec.name)

    def exec_module(self, module):
        pass


def load_comfyui(path: str | None = None) -> types.SimpleNamespace:
    """ComfyUI's modules, imported once, on the CPU; and this repository's node pack."""
    # diffusers and transformers decide at import whether torchvision is there: before the stubs.
    import diffusers.pipelines.flux.pipeline_flux  # noqa: F401
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl  # noqa: F401

    for name in STUBBED:
        try:
            __import__(name)
        except Exception:
            sys.modules.pop(name, None)
            if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
                sys.meta_path.insert(0, _StubFinder())
    if str(path or COMFYUI_PATH) not in sys.path:
        sys.path.insert(0, str(path or COMFYUI_PATH))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management reads it
    import comfy.model_management
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    import nodes

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import comfyui_iclora

    return types.SimpleNamespace(comfy=comfy, nodes=nodes, pack=comfyui_iclora)


@pytest.fixture(scope="session")
def comfy():
    return load_comfyui()


def comfyui_version() -> str:
    namespace: dict = {}
    exec((Path(COMFYUI_PATH) / "comfyui_version.py").read_text(), namespace)
    return namespace["__version__"]


TINY_SDXL_TIME_DIM = 8  # the tiny UNet's size-embedding width (SDXL's is 256)


def comfy_sdxl(comfy, unet):
    """ComfyUI's SDXL model (model_base.SDXL, its UNetModel) holding the tiny UNet's weights,
    converted by ComfyUI's own diffusers -> SGM key map."""
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep

    config = unet.config
    unet_config = {
        "use_checkpoint": False, "image_size": 32, "in_channels": config.in_channels, "out_channels": 4,
        "model_channels": config.block_out_channels[0], "num_res_blocks": [1, 1], "channel_mult": [1, 2],
        "transformer_depth": [0, 2], "transformer_depth_output": [0, 0, 2, 2], "transformer_depth_middle": 2,
        "use_spatial_transformer": True, "use_linear_in_transformer": True,
        "legacy": False, "context_dim": config.cross_attention_dim, "num_classes": "sequential",
        "adm_in_channels": config.projection_class_embeddings_input_dim, "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }
    keys = comfy.utils.unet_to_diffusers(unet_config)
    weights = unet.state_dict()
    sgm = {theirs: weights[ours] for ours, theirs in keys.items() if ours in weights}
    assert len(sgm) == len(weights)
    model_config = comfy.supported_models.SDXL(dict(unet_config))
    model_config.unet_config["num_head_channels"] = 16  # the tiny UNet's heads (SDXL's are 64 wide)
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    base.embedder = Timestep(TINY_SDXL_TIME_DIM)  # SDXL's size embedding, at the tiny width
    base.load_model_weights(sgm)
    device = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=device)
