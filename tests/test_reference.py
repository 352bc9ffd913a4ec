import torch

from adaptivedrag_core.inversion import make_schedule
from adaptivedrag_core.reference import ReferenceRecording, reference_control, self_attention_names
from adaptivedrag_core.sampling import record_reference, sample_dragged


def test_self_attention_layers_are_in_forward_order(tiny):
    names = self_attention_names(tiny.unet)
    assert len(names) == 16  # SD1.x layout: 6 down, 1 mid, 9 up
    assert names[6].startswith("mid_block")
    assert all(n.startswith("up_blocks.2") or n.startswith("up_blocks.3") for n in names[10:])


def test_processors_are_restored(tiny):
    before = {name: type(p) for name, p in tiny.unet.attn_processors.items()}
    with reference_control(tiny.unet, ReferenceRecording(), start_layer=10):
        changed = {name: type(p) for name, p in tiny.unet.attn_processors.items()}
    assert sum(before[n] != changed[n] for n in before) == 6
    assert {name: type(p) for name, p in tiny.unet.attn_processors.items()} == before


def _setup(tiny):
    schedule = make_schedule(tiny.make_scheduler(), 10, 0.7)
    generator = torch.Generator().manual_seed(0)
    reference_latent = torch.randn(1, 4, 8, 8, generator=generator)
    edited_latent = reference_latent + 0.5 * torch.randn(1, 4, 8, 8, generator=generator)
    return schedule, reference_latent, edited_latent


def test_recording_covers_every_step_and_controlled_layer(tiny, empty_prompt):
    schedule, reference_latent, _ = _setup(tiny)
    branch = record_reference(tiny.unet, empty_prompt, schedule, reference_latent, start_layer=10, start_step=2)
    assert set(branch.recording.keys_values) == {(s, l) for s in range(2, 7) for l in range(10, 16)}


def test_replay_changes_sampling_only_through_controlled_layers(tiny, empty_prompt):
    schedule, reference_latent, edited_latent = _setup(tiny)
    reference = record_reference(tiny.unet, empty_prompt, schedule, reference_latent)
    plain = record_reference(tiny.unet, empty_prompt, schedule, edited_latent, start_layer=99).reconstruction
    controlled = sample_dragged(tiny.unet, empty_prompt, schedule, edited_latent, reference)
    uncontrolled = sample_dragged(tiny.unet, empty_prompt, schedule, edited_latent, reference, start_layer=99)
    assert torch.allclose(uncontrolled, plain, atol=1e-5)  # no controlled layer: ordinary sampling
    assert not torch.allclose(controlled, plain, atol=1e-3)
    # Denoising the reference itself with its own recording gives the reference back.
    same = sample_dragged(tiny.unet, empty_prompt, schedule, reference_latent, reference)
    assert torch.allclose(same, reference.reconstruction, atol=1e-5)


def test_sampling_works_under_inference_mode(tiny, empty_prompt):
    schedule, reference_latent, edited_latent = _setup(tiny)
    reference = record_reference(tiny.unet, empty_prompt, schedule, reference_latent)
    expected = sample_dragged(tiny.unet, empty_prompt, schedule, edited_latent, reference)
    with torch.inference_mode():
        reference = record_reference(tiny.unet, empty_prompt, schedule, reference_latent)
        got = sample_dragged(tiny.unet, empty_prompt, schedule, edited_latent, reference)
    assert torch.allclose(got, expected)


class _BatchedMutualAttention:
    """DragDiffusion's batched form: batch [reference, edited], both attend to the reference's keys/values."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch, tokens, _ = hidden_states.shape
        heads = attn.heads
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states[:1]).expand(batch, -1, -1)
        value = attn.to_v(hidden_states[:1]).expand(batch, -1, -1)
        split = lambda x: x.reshape(batch, tokens, heads, -1).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(split(query), split(key), split(value))
        return attn.to_out[0](out.transpose(1, 2).reshape(batch, tokens, -1))


def test_record_and_replay_equals_the_batched_mutual_self_attention(tiny, empty_prompt):
    from adaptivedrag_core.inversion import ddim_step

    schedule, reference_latent, edited_latent = _setup(tiny)
    reference = record_reference(tiny.unet, empty_prompt, schedule, reference_latent)
    replayed = sample_dragged(tiny.unet, empty_prompt, schedule, edited_latent, reference)

    original = tiny.unet.attn_processors
    tiny.unet.set_attn_processor(
        {n: (_BatchedMutualAttention() if n in self_attention_names(tiny.unet)[10:] else p) for n, p in original.items()}
    )
    try:
        latents = torch.cat([reference_latent, edited_latent])
        with torch.no_grad():
            for t in schedule.timesteps:
                noise = tiny.unet(latents, t, encoder_hidden_states=empty_prompt.expand(2, -1, -1)).sample
                latents = ddim_step(latents, noise, schedule, t, t - schedule.step_ratio)
    finally:
        tiny.unet.set_attn_processor(original)
    assert torch.allclose(latents[1:], replayed, atol=1e-4)
    assert torch.allclose(latents[:1], reference.reconstruction, atol=1e-4)
