"""ComfyUI's LoRA loading rules, rewritten for the tests: which keys of a LoRA file ComfyUI
applies, to which weight of its own model (the original SGM / BFL layouts), at what scale.

The rules follow comfyanonymous/ComfyUI:
    comfy/lora.py      model_lora_keys_unet (the key map), load_lora (which suffixes load)
    comfy/utils.py     unet_to_diffusers, flux_to_diffusers (diffusers names -> its names)
    comfy/lora.py      calculate_weight, "lora" patches (moved to comfy/weight_adapter/lora.py
                       later): scale = alpha / rank (rank = lora_down rows), 1.0 without an
                       alpha key; "diff" patches are added as they are, a shape mismatch is
                       not merged ("WARNING SHAPE MISMATCH ... WEIGHT NOT MERGED").
Only the parts that concern SDXL, FLUX.1 and FLUX.2 UNet/transformer LoRAs are kept; model
weights are named without ComfyUI's "diffusion_model." prefix.
"""

from __future__ import annotations

import torch

# comfy/utils.py: name pieces per block type (diffusers name -> SGM name where they differ).
_ATTENTION_PARTS = ["proj_in", "proj_out", "norm"]
_TRANSFORMER_PARTS = ["norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                      "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"]
_RESNET_PARTS = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
                 "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_UNET_BASIC = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}


def sdxl_unet_config(config) -> dict:
    """The UNet description ComfyUI's model detection reads off an SDXL checkpoint."""
    blocks = len(config["block_out_channels"])
    layers = config["layers_per_block"]
    per_block = config["transformer_layers_per_block"]
    per_block = [per_block] * blocks if isinstance(per_block, int) else list(per_block)
    depth = [per_block[b] if config["down_block_types"][b].startswith("CrossAttn") else 0 for b in range(blocks)]
    return {
        "num_res_blocks": [layers] * blocks,
        "channel_mult": list(range(blocks)),
        "transformer_depth": [d for d in depth for _ in range(layers)],
        "transformer_depth_output": [d for d in depth for _ in range(layers + 1)],
        "transformer_depth_middle": per_block[-1],
    }


def unet_to_diffusers(unet_config: dict) -> dict[str, str]:
    """comfy/utils.py unet_to_diffusers: {diffusers parameter: SGM parameter}."""
    res_blocks = unet_config["num_res_blocks"]
    depth = list(unet_config["transformer_depth"])
    depth_out = list(unet_config["transformer_depth_output"])
    blocks = len(unet_config["channel_mult"])
    out: dict[str, str] = {}

    def both(src: str, dst: str) -> None:
        for end in ("weight", "bias"):
            out[f"{src}.{end}"] = f"{dst}.{end}"

    def attention(src: str, dst: str, transformers: int) -> None:
        for part in _ATTENTION_PARTS:
            both(f"{src}.{part}", f"{dst}.{part}")
        for t in range(transformers):
            for part in _TRANSFORMER_PARTS:
                both(f"{src}.transformer_blocks.{t}.{part}", f"{dst}.transformer_blocks.{t}.{part}")

    for x in range(blocks):
        n = 1 + (res_blocks[x] + 1) * x
        for i in range(res_blocks[x]):
            for ours, theirs in _RESNET_PARTS.items():
                both(f"down_blocks.{x}.resnets.{i}.{ours}", f"input_blocks.{n}.0.{theirs}")
            transformers = depth.pop(0)
            if transformers > 0:
                attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n}.1", transformers)
            n += 1
        both(f"down_blocks.{x}.downsamplers.0.conv", f"input_blocks.{n}.0.op")
    attention("mid_block.attentions.0", "middle_block.1", unet_config["transformer_depth_middle"])
    for i, n in enumerate([0, 2]):
        for ours, theirs in _RESNET_PARTS.items():
            both(f"mid_block.resnets.{i}.{ours}", f"middle_block.{n}.{theirs}")
    res_blocks = list(reversed(res_blocks))
    for x in range(blocks):
        n = (res_blocks[x] + 1) * x
        layers = res_blocks[x] + 1
        for i in range(layers):
            c = 1
            for ours, theirs in _RESNET_PARTS.items():
                both(f"up_blocks.{x}.resnets.{i}.{ours}", f"output_blocks.{n}.0.{theirs}")
            transformers = depth_out.pop()
            if transformers > 0:
                c += 1
                attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", transformers)
            if i == layers - 1:
                both(f"up_blocks.{x}.upsamplers.0.conv", f"output_blocks.{n}.{c}.conv")
            n += 1
    for ours, theirs in _UNET_BASIC.items():
        both(ours, theirs)
    return out


def sdxl_key_map(diffusers_to_sgm: dict[str, str]) -> dict[str, str]:
    """comfy/lora.py model_lora_keys_unet for an SDXL model: {LoRA key stem: model weight}."""
    key_map = {}
    for sgm in diffusers_to_sgm.values():  # the model's own state dict ("diffusion_model.*")
        if sgm.endswith(".weight"):
            stem = sgm[: -len(".weight")]
            key_map["lora_unet_" + stem.replace(".", "_")] = sgm
            key_map[f"diffusion_model.{stem}"] = sgm  # "generic" keys: the model's own names
    for diffusers, sgm in diffusers_to_sgm.items():
        if not diffusers.endswith(".weight"):
            continue
        stem = diffusers[: -len(".weight")]
        key_map["lora_unet_" + stem.replace(".", "_")] = sgm
        key_map["lycoris_" + stem.replace(".", "_")] = sgm
        for prefix in ("", "unet."):
            # The diffusers spelling ComfyUI knows is the old attention-processor one.
            key = prefix + stem.replace(".to_", ".processor.to_")
            key_map[key[:-2] if key.endswith(".to_out.0") else key] = sgm
    return key_map


def flux_to_diffusers(depth: int, depth_single: int, hidden: int) -> dict[str, object]:
    """comfy/utils.py flux_to_diffusers (weights only): {diffusers parameter: BFL parameter,
    or (BFL parameter, (dim, start, length)) for a slice of a fused one}."""
    out: dict[str, object] = {}
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, name in enumerate(["to_q", "to_k", "to_v"]):
            out[f"{src}.attn.{name}.weight"] = (f"{dst}.img_attn.qkv.weight", (0, j * hidden, hidden))
        for j, name in enumerate(["add_q_proj", "add_k_proj", "add_v_proj"]):
            out[f"{src}.attn.{name}.weight"] = (f"{dst}.txt_attn.qkv.weight", (0, j * hidden, hidden))
        for ours, theirs in {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin",
                             "norm1_context.linear": "txt_mod.lin", "attn.to_add_out": "txt_attn.proj",
                             "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                             "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}.items():
            out[f"{src}.{ours}.weight"] = f"{dst}.{theirs}.weight"
    for i in range(depth_single):
        src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, name in enumerate(["attn.to_q", "attn.to_k", "attn.to_v"]):
            out[f"{src}.{name}.weight"] = (f"{dst}.linear1.weight", (0, j * hidden, hidden))
        out[f"{src}.proj_mlp.weight"] = (f"{dst}.linear1.weight", (0, 3 * hidden, 4 * hidden))
        out[f"{src}.norm.linear.weight"] = f"{dst}.modulation.lin.weight"
        out[f"{src}.proj_out.weight"] = f"{dst}.linear2.weight"
    for ours, theirs in {"proj_out": "final_layer.linear", "x_embedder": "img_in", "context_embedder": "txt_in",
                         "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
                         "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
                         "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
                         "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
                         "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
                         "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}.items():
        out[f"{ours}.weight"] = f"{theirs}.weight"
    return out


def flux_key_map(diffusers_to_bfl: dict[str, object]) -> dict[str, object]:
    """comfy/lora.py model_lora_keys_unet for a FLUX model: {LoRA key stem: model weight}."""
    key_map: dict[str, object] = {}
    for target in diffusers_to_bfl.values():
        weight = target[0] if isinstance(target, tuple) else target
        stem = weight[: -len(".weight")]
        key_map["lora_unet_" + stem.replace(".", "_")] = weight
        key_map[f"diffusion_model.{stem}"] = weight
    for diffusers, target in diffusers_to_bfl.items():
        stem = diffusers[: -len(".weight")]
        key_map[f"transformer.{stem}"] = target
        key_map["lycoris_" + stem.replace(".", "_")] = target
        key_map["lora_transformer_" + stem.replace(".", "_")] = target
    return key_map


def flux2_to_diffusers(depth: int, depth_single: int, hidden: int) -> dict[str, object]:
    """comfy/utils.py flux_to_diffusers for a FLUX.2 model (ComfyUI's Flux2 model is a Flux
    one, so the same function maps it), weights of the layers FLUX.2 has: double blocks with
    FLUX.2's feed-forward names (linear_in / linear_out), single blocks with the fused
    to_qkv_mlp_proj -> linear1 and to_out -> linear2, the embedders and final projection.
    The shared modulations (double_stream_modulation_img/txt, single_stream_modulation) and
    the time embedder (time_guidance_embed, which ComfyUI's table names time_text_embed) have
    no diffusers name there: they are reached only by their own ComfyUI names."""
    out: dict[str, object] = {}
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, name in enumerate(["to_q", "to_k", "to_v"]):
            out[f"{src}.attn.{name}.weight"] = (f"{dst}.img_attn.qkv.weight", (0, j * hidden, hidden))
        for j, name in enumerate(["add_q_proj", "add_k_proj", "add_v_proj"]):
            out[f"{src}.attn.{name}.weight"] = (f"{dst}.txt_attn.qkv.weight", (0, j * hidden, hidden))
        for ours, theirs in {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                             "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
                             "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}.items():
            out[f"{src}.{ours}.weight"] = f"{dst}.{theirs}.weight"
    for i in range(depth_single):
        src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        out[f"{src}.attn.to_qkv_mlp_proj.weight"] = f"{dst}.linear1.weight"
        out[f"{src}.attn.to_out.weight"] = f"{dst}.linear2.weight"
    for ours, theirs in {"proj_out": "final_layer.linear", "x_embedder": "img_in",
                         "context_embedder": "txt_in"}.items():
        out[f"{ours}.weight"] = f"{theirs}.weight"
    return out


def fused_weight_shapes(model: torch.nn.Module, diffusers_to_comfy: dict) -> dict[str, torch.Size]:
    """{ComfyUI weight: its shape} for the weights `diffusers_to_comfy` reaches, from a
    diffusers model (a fused weight stacks its slices along dim 0)."""
    params = dict(model.named_parameters())
    shapes: dict[str, torch.Size] = {}
    for name, target in diffusers_to_comfy.items():
        shape = params[name].shape
        if isinstance(target, tuple):
            weight, (dim, start, length) = target
            assert dim == 0 and shape[0] == length
            old = shapes.get(weight, torch.Size([0, shape[1]]))
            shapes[weight] = torch.Size([max(old[0], start + length), shape[1]])
        else:
            shapes[target] = shape
    return shapes


def merge_fused(model: torch.nn.Module, patches: dict, diffusers_to_comfy: dict) -> list[str]:
    """Apply ComfyUI's patches to a diffusers model whose weights are ComfyUI's weights or
    slices of its fused ones (FLUX q, k, v in one qkv); returns the patches not merged."""
    params = dict(model.named_parameters())
    shapes = fused_weight_shapes(model, diffusers_to_comfy)
    parts: dict[object, list[tuple[str, tuple | None]]] = {}
    for name, target in diffusers_to_comfy.items():
        weight, where = target if isinstance(target, tuple) else (target, None)
        parts.setdefault(weight, []).append((name, where))
        if where is not None:
            parts[target] = [(name, None)]
    refused = []
    with torch.no_grad():
        for target, patch in patches.items():
            pieces = parts[target]
            shape = params[pieces[0][0]].shape if isinstance(target, tuple) else shapes[target]
            delta = weight_delta(patch, shape)
            if delta is None:
                refused.append(str(target))
                continue
            for name, where in pieces:
                piece = delta if where is None else delta.narrow(where[0], where[1], where[2])
                params[name] += piece.to(params[name].dtype)
    return refused


def load_lora(lora: dict[str, torch.Tensor], key_map: dict[str, object]):
    """comfy/lora.py load_lora for plain LoRAs and diffs: (patches, keys not loaded).
    patches: {model weight: ("lora", up, down, alpha or None) | ("diff", tensor)}; a weight
    may be a (name, (dim, start, length)) slice."""
    patches, loaded = {}, set()
    for stem, target in key_map.items():
        alpha = None
        if f"{stem}.alpha" in lora:
            alpha = lora[f"{stem}.alpha"].item()
            loaded.add(f"{stem}.alpha")
        for up, down in ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                         (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
                         (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight")):
            if stem + up in lora:
                patches[target] = ("lora", lora[stem + up], lora[stem + down], alpha)
                loaded |= {stem + up, stem + down}
                break
        if f"{stem}.diff" in lora:
            patches[target] = ("diff", lora[f"{stem}.diff"])
            loaded.add(f"{stem}.diff")
        if f"{stem}.diff_b" in lora:
            patches[target[: -len(".weight")] + ".bias"] = ("diff", lora[f"{stem}.diff_b"])
            loaded.add(f"{stem}.diff_b")
    return patches, set(lora) - loaded


def weight_delta(patch, shape: torch.Size) -> torch.Tensor | None:
    """What ComfyUI adds to a weight of `shape` (strength 1); None where it refuses to merge."""
    if patch[0] == "diff":
        return patch[1].float() if patch[1].shape == shape else None
    _, up, down, alpha = patch
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    return scale * (up.float().flatten(1) @ down.float().flatten(1)).reshape(shape)


def merge_into_diffusers(model: torch.nn.Module, patches: dict, diffusers_to_comfy: dict) -> list[str]:
    """Apply ComfyUI's patches to a diffusers model with the same weights (translating its
    weight names back); returns the patches that could not be merged."""
    back = {(t if isinstance(t, tuple) else (t, None)): name for name, t in diffusers_to_comfy.items()}
    back.update({(t[: -len(".weight")] + ".bias", None): name[: -len(".weight")] + ".bias"
                 for name, t in diffusers_to_comfy.items() if isinstance(t, str) and t.endswith(".weight")})
    params = dict(model.named_parameters())
    refused = []
    with torch.no_grad():
        for target, patch in patches.items():
            name = back[target if isinstance(target, tuple) else (target, None)]
            param = params[name]
            delta = weight_delta(patch, param.shape)
            if delta is None:
                refused.append(name)
            else:
                param += delta.to(param.dtype)
    return refused
