"""Context completion inside ComfyUI's sampler, through its wrapper hooks only.

Two wrappers on a clone of the MODEL (comfy/patcher_extension.py):

    SAMPLER_SAMPLE   sees the clean latent (after process_latent_in) and the denoise mask;
                     binarizes the mask as iclora's inference does (FLUX: whole 2x2 tokens),
                     hands that mask to the sampler in place of the soft one (so ComfyUI's own
                     inpaint blend keeps exactly the visible latents) and stashes both in
                     transformer_options for the model call. At full denoise the masked
                     region starts from pure noise, as iclora's pipelines start it.
    DIFFUSION_MODEL  gets x after calculate_input (the model's own input space: x_t for EPS,
                     the flow interpolation for FLUX), puts the clean latent into the visible
                     region (exact for both), and for FLUX `zero` runs `flux_context_forward`:
                     the stock blocks with the visible tokens modulated as timestep 0.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

import comfy.patcher_extension
from comfy.ldm.flux.layers import timestep_embedding

from .completion import binary_mask, masked_first, masked_tokens, modulation_slices, repeat_rows, token_aligned

KEY = "iclora_context"  # the wrappers' key, and where the stash lives in transformer_options


def _sampler_sample(family: str):
    def wrapper(executor, guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar):
        options = extra_args["model_options"].setdefault("transformer_options", {})
        options.pop(KEY, None)
        if denoise_mask is None or latent_image is None:
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        mask = binary_mask(denoise_mask)  # (B, 1, h, w) 0/1
        if family == "flux":
            mask = token_aligned(mask)
        mask = mask.to(denoise_mask)
        if bool((mask > 0).all()):  # every panel regenerated (text -> set): nothing is context
            return executor(guider, sigmas, extra_args, callback, noise, latent_image, mask, disable_pbar)
        options[KEY] = {"clean": latent_image, "mask": mask}
        sigma_max = float(guider.inner_model.model_sampling.sigma_max)
        if math.isclose(float(sigmas[0]), sigma_max, rel_tol=1e-5) or float(sigmas[0]) > sigma_max:
            # ComfyUI adds the latent to the starting noise; iclora's pipelines (and diffusers'
            # at strength 1) start the masked region from noise alone.
            latent_image = latent_image * (1 - mask)
        return executor(guider, sigmas, extra_args, callback, noise, latent_image, mask, disable_pbar)

    return wrapper


def _with_context(x: torch.Tensor, stash: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, C, h, w) with the visible region clean; and the (rows, 1, h, w) mask."""
    if x.shape[-2:] != stash["mask"].shape[-2:]:
        raise ValueError(f"IC-LoRA Context: the model input is {tuple(x.shape[-2:])} latents, the composite "
                         f"{tuple(stash['mask'].shape[-2:])}: area conditioning (a part of the latent) is not supported")
    mask = repeat_rows(stash["mask"], x.shape[0]).to(x)
    clean = repeat_rows(stash["clean"], x.shape[0]).to(x)
    return x * mask + clean * (1 - mask), mask


def sdxl_wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
    stash = transformer_options.get(KEY)
    if stash is not None:
        x, _ = _with_context(x, stash)
    return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


def _flux_wrapper(mode: str):
    def wrapper(executor, x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs):
        stash = transformer_options.get(KEY)
        if stash is None:
            return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
        x, mask = _with_context(x, stash)
        if mode == "shared":
            return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
        if control is not None:
            raise ValueError("IC-LoRA Context (FLUX, timestep zero): a ControlNet input cannot be combined with "
                             "per-token context; remove the ControlNet or use context_timestep shared")
        if ref_latents is not None:
            raise ValueError("IC-LoRA Context (FLUX, timestep zero): reference latents (Kontext) are not supported")
        if transformer_options.get("patches_replace", {}).get("dit"):
            raise ValueError("IC-LoRA Context (FLUX, timestep zero): another node replaces FLUX blocks; "
                             "the per-token forward cannot run through it")
        model = executor.class_obj
        masked = masked_tokens(mask)  # (rows, N)
        rows, group = torch.unique(masked, dim=0, return_inverse=True)
        out = None
        for g in range(rows.shape[0]):  # rows with one mask share a token order
            pick = (group == g).nonzero()[:, 0]
            part = flux_context_forward(
                model, x[pick], timestep[pick], context[pick], None if y is None else y[pick],
                None if guidance is None else guidance[pick], rows[g], transformer_options,
                None if kwargs.get("attention_mask") is None else kwargs["attention_mask"][pick],
            )
            out = part.new_empty(x.shape[0], *part.shape[1:]) if out is None else out
            out[pick] = part
        return out

    return wrapper


def flux_context_forward(model, x, timestep, context, y, guidance, masked, transformer_options, attn_mask=None):
    """comfy.ldm.flux.model.Flux._forward + forward_orig for FLUX.1, with the image tokens
    ordered masked-first (ids carried along) and the visible ones modulated as timestep 0.
    x: (B, C, h, w) with the visible region clean; masked: (N,) bool for every row."""
    bs, _, h_orig, w_orig = x.shape
    p = model.patch_size
    h_len, w_len = (h_orig + p // 2) // p, (w_orig + p // 2) // p
    img, img_ids = model.process_img(x, transformer_options=transformer_options)  # (B, N, C*p*p), (B, N, 3)
    order, inverse, n_masked = masked_first(masked.to(img.device))
    img, img_ids = img[:, order], img_ids[:, order]
    txt_ids = torch.zeros((bs, context.shape[1], len(model.params.axes_dim)), device=x.device, dtype=torch.float32)
    for i in model.params.txt_ids_dims:
        txt_ids[:, :, i] = torch.linspace(0, context.shape[1] - 1, steps=context.shape[1], device=x.device)

    img = model.img_in(img)

    def embed(t: torch.Tensor) -> torch.Tensor:  # forward_orig's vec for timestep t: (B, D)
        vec = model.time_in(timestep_embedding(t, 256).to(img.dtype))
        if model.params.guidance_embed and guidance is not None:
            vec = vec + model.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        if model.vector_in is not None:
            pooled = y if y is not None else torch.zeros((bs, model.params.vec_in_dim), device=x.device, dtype=img.dtype)
            vec = vec + model.vector_in(pooled[:, : model.params.vec_in_dim])
        return vec

    vec = torch.stack([embed(timestep), embed(torch.zeros_like(timestep))], dim=1)  # (B, 2, D): k = 0 at t, 1 at 0
    txt = model.txt_in(model.txt_norm(context) if model.txt_norm is not None else context)
    pe = model.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
    n, t_len = img.shape[1], txt.shape[1]
    dims_img = modulation_slices(n_masked, n)
    dims_txt = [(0, t_len, 0)]  # text keeps the global timestep, as in training

    options = transformer_options.copy()
    options["total_blocks"], options["block_type"] = len(model.double_blocks), "double"
    for i, block in enumerate(model.double_blocks):
        options["block_index"] = i
        img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=attn_mask, modulation_dims_img=dims_img,
                         modulation_dims_txt=dims_txt, transformer_options=options)
    img = torch.cat((txt, img), 1)  # (B, T + N, D)
    dims = dims_txt + modulation_slices(n_masked, n, t_len)
    options["total_blocks"], options["block_type"] = len(model.single_blocks), "single"
    options["img_slice"] = [t_len, img.shape[1]]
    for i, block in enumerate(model.single_blocks):
        options["block_index"] = i
        img = block(img, vec=vec, pe=pe, attn_mask=attn_mask, modulation_dims=dims, transformer_options=options)
    img = model.final_layer(img[:, t_len:], vec, modulation_dims=dims_img)  # (B, N, C*p*p)
    img = img[:, inverse.to(img.device)]
    return rearrange(img, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h_len, w=w_len, ph=p, pw=p)[:, :, :h_orig, :w_orig]


def add_context_wrappers(model_patcher, family: str, mode: str):
    """A clone of `model_patcher` that samples with clean context (wrappers, under KEY)."""
    clone = model_patcher.clone()
    types = comfy.patcher_extension.WrappersMP
    clone.remove_wrappers_with_key(types.SAMPLER_SAMPLE, KEY)
    clone.remove_wrappers_with_key(types.DIFFUSION_MODEL, KEY)
    clone.add_wrapper_with_key(types.SAMPLER_SAMPLE, KEY, _sampler_sample(family))
    clone.add_wrapper_with_key(types.DIFFUSION_MODEL, KEY, sdxl_wrapper if family == "sdxl" else _flux_wrapper(mode))
    return clone
