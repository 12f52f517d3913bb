"""The shared context loop on its own: what it feeds the backend's prediction at each step."""

from __future__ import annotations

import torch

from iclora.backends.context_loop import Schedule, complete_in_context


def _setup():
    torch.manual_seed(0)
    clean = torch.randn(2, 4, 4, 6)  # (B, C, h, w)
    noise = torch.randn(2, 4, 4, 6)
    mask = torch.zeros(2, 1, 4, 6)
    mask[0, :, :, 3:] = 1  # sample 0: right half generated
    mask[1, :, 2:, :] = 1  # sample 1: bottom half: a mask per sample
    schedule = Schedule(
        timesteps=torch.tensor([900.0, 500.0, 100.0]),
        noised=lambda x, n, t: 0.5 * x + 0.5 * n,
        step=lambda prediction, t, x: x - 0.25 * prediction,
        model_input=lambda x, t: x * 2,
        init_noise_sigma=3.0,
    )
    return clean, noise, mask, schedule


def test_every_step_feeds_the_visible_latents_clean_and_keeps_them():
    clean, noise, mask, schedule = _setup()
    calls = []

    def predict(x, t, prompt, m, masked_latents, conditions):
        calls.append((x.clone(), t.clone(), m.clone(), masked_latents, conditions))
        return torch.ones_like(x)

    out = complete_in_context(predict, schedule, clean, mask, noise, {"e": torch.zeros(2, 3)},
                              conditions={"size": torch.tensor([[8, 8], [8, 8]])})
    assert len(calls) == 3
    visible = (mask < 0.5).expand_as(clean)
    latents = noise * 3.0  # strength 1: pure noise at the scheduler's scale
    for (x, t, m, masked_latents, conditions), step in zip(calls, schedule.timesteps):
        assert torch.equal(x[visible], clean[visible])  # clean, bit for bit
        assert torch.equal(x[~visible], (latents * 2)[~visible])  # the scheduler's model input
        assert torch.equal(t, step.expand(2)) and torch.equal(m, mask) and masked_latents is None
        assert conditions["size"].shape == (2, 2)
        latents = latents - 0.25
    assert torch.equal(out[visible], clean[visible])
    assert torch.equal(out[~visible], latents[~visible])


def test_guidance_is_one_call_on_negative_then_prompt():
    clean, noise, mask, schedule = _setup()
    seen = []

    def predict(x, t, prompt, m, masked_latents, conditions):
        seen.append((prompt["e"].clone(), m.shape[0], conditions["g"]))
        # The unconditional half predicts 1, the prompted half 3.
        return torch.cat([torch.ones_like(x[:2]), 3 * torch.ones_like(x[2:])])

    out = complete_in_context(predict, schedule, clean, mask, noise, {"e": torch.ones(2, 3)},
                              negative={"e": torch.zeros(2, 3)}, guidance_scale=2.0, conditions={"g": 7.0})
    assert len(seen) == 3
    embeds, rows, g = seen[0]
    assert torch.equal(embeds, torch.cat([torch.zeros(2, 3), torch.ones(2, 3)])) and rows == 4 and g == 7.0
    generated = (mask > 0.5).expand_as(clean)
    # Each step moves by 0.25 * (1 + 2 * (3 - 1)) = 1.25.
    torch.testing.assert_close(out[generated], (noise * 3.0 - 3 * 1.25)[generated])


def test_part_way_starts_from_the_noised_input():
    clean, noise, mask, schedule = _setup()
    firsts = []

    def predict(x, t, prompt, m, masked_latents, conditions):
        firsts.append(x.clone())
        return torch.zeros_like(x)

    complete_in_context(predict, schedule, clean, mask, noise, {"e": torch.zeros(2, 3)}, strength=0.5)
    generated = (mask > 0.5).expand_as(clean)
    assert torch.equal(firsts[0][generated], ((0.5 * clean + 0.5 * noise) * 2)[generated])


def test_context_widens_what_is_denoised_beyond_the_mask():
    """FLUX.1 denoises a whole 2x2 token when any of its latent pixels is masked."""
    clean, noise, mask, schedule = _setup()
    context = torch.ones_like(mask)  # everything denoised, whatever the mask says
    seen = []

    def predict(x, t, prompt, m, masked_latents, conditions):
        seen.append((x.clone(), m.clone()))
        return torch.zeros_like(x)

    complete_in_context(predict, schedule, clean, mask, noise, {"e": torch.zeros(2, 3)}, context=context)
    x, m = seen[0]
    assert torch.equal(x, noise * 3.0 * 2) and torch.equal(m, mask)  # the prediction still gets the mask
