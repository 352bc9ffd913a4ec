"""The repeated steps are capture-ready (one CUDA graph serves every step) and give the results they gave before.

Capture-ready, checked on the CPU with :mod:`tests.capture_check`: inside the part a CUDA graph would record, nothing
syncs with the host (no value read back, no tensor made from Python data, no data-dependent size), and two different
steps run the same operators on the same tensors with the same arguments once their inputs are loaded. The same
checks on the code as it was (a Python int timestep, keys and values looked up by step, PyTorch's default AdamW)
fail, which the tests show too. Results: the steps give bitwise the same numbers as the plain code on the CPU
(tolerance zero).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from adaptivedrag_core.features import make_feature_fn
from adaptivedrag_core.graphs import NoiseStep, StepGraphs
from adaptivedrag_core.inversion import ddim_invert, make_schedule, unet_noise_fn
from adaptivedrag_core.lora import NoiseFitting, lora_in_training, lora_weights, train_identity_lora, training_batch
from adaptivedrag_core.models import SD15_SCHEDULER_CONFIG
from adaptivedrag_core.reference import reference_control
from adaptivedrag_core.sampling import CLossSettings, record_reference, sample_dragged

from capture_check import OpStream, counting_host_syncs

CPU_STEPS = StepGraphs("cpu")


def _latent(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def schedule(tiny):
    return make_schedule(tiny.make_scheduler(), 10, 0.7)


@pytest.fixture(scope="module")
def reference(tiny, empty_prompt, schedule):
    return record_reference(tiny.unet, empty_prompt, schedule, _latent(0), start_layer=10)


def _recorded(step):
    """(host syncs, operator stream) of ``step()``."""
    with counting_host_syncs() as syncs, OpStream() as stream:
        step()
    return syncs, stream.operators


# ------------------------------------------------------------------------------------------------- the drag step


@pytest.mark.parametrize("with_prediction", [True, False])
def test_drag_step_forward_and_backward_are_capture_ready(tiny, empty_prompt, schedule, with_prediction):
    feature_fn = make_feature_fn(tiny.unet, empty_prompt, schedule, (16, 16), with_prediction=with_prediction)
    latent = _latent(1).requires_grad_(True)

    def step():  # what make_graphed_callables records: the forward, and the backward to the latent
        outputs = tree_leaves(feature_fn(latent))
        return torch.autograd.grad(outputs, latent, [torch.ones_like(output) for output in outputs])

    first_syncs, first = _recorded(step)
    with torch.no_grad():
        latent.add_(0.5)  # Adam's update, in place
    second_syncs, second = _recorded(step)
    assert first_syncs.counts == second_syncs.counts == {"reads": 0, "from_python": 0, "data_dependent": 0}
    assert len(first) > 100 and first == second


def test_a_python_timestep_would_not_be_capture_ready(tiny, empty_prompt, schedule):
    """The check bites: diffusers turns a Python int timestep into a tensor from host data at every call."""
    noise_fn = unet_noise_fn(tiny.unet, empty_prompt)
    with torch.no_grad(), counting_host_syncs() as syncs:
        noise_fn(_latent(1), schedule.timesteps[0])
    assert syncs.counts["from_python"] >= 1


# ------------------------------------------------------------------------------------------ the sampling steps


def _sampling_streams(tiny, empty_prompt, schedule, reference, differentiable: bool, static: bool = True):
    """Host syncs and operator streams of the captured part of two sampling steps (steps 1 and 4)."""
    results = []
    with torch.no_grad(), reference_control(tiny.unet, reference.recording, 10, 0) as control:
        control.mode = "replay"
        noise_fn = unet_noise_fn(tiny.unet, empty_prompt.clone())
        step = NoiseStep(noise_fn, CPU_STEPS, "sampling", control if static else None)
        latent = _latent(2).requires_grad_(differentiable)
        for index in (1, 4):
            control.step = index
            step.load(latent, schedule.timesteps[index])

            def run():
                if not differentiable:
                    return step.forward()
                with torch.enable_grad():
                    noise = step.noise(latent)
                    return torch.autograd.grad(noise, latent, torch.ones_like(noise))

            results.append(_recorded(run))
    return results


@pytest.mark.parametrize("differentiable", [False, True], ids=["sampling forward", "CLoss step"])
def test_sampling_steps_are_capture_ready(tiny, empty_prompt, schedule, reference, differentiable):
    (first_syncs, first), (second_syncs, second) = _sampling_streams(tiny, empty_prompt, schedule, reference,
                                                                     differentiable)
    assert first_syncs.total == second_syncs.total == 0
    assert len(first) > 100 and first == second


def test_keys_and_values_looked_up_by_step_would_not_be_capture_ready(tiny, empty_prompt, schedule, reference):
    """The check bites: without the static buffers each step reads other tensors (a graph would replay step 1's)."""
    (_, first), (_, second) = _sampling_streams(tiny, empty_prompt, schedule, reference, False, static=False)
    assert first != second


def test_noise_step_gives_the_unet_s_noise_and_gradient(tiny, empty_prompt, schedule):
    plain = unet_noise_fn(tiny.unet, empty_prompt)
    step = NoiseStep(unet_noise_fn(tiny.unet, empty_prompt), CPU_STEPS, "inversion")
    timestep = schedule.timesteps[2]
    with torch.no_grad():
        assert torch.equal(step(_latent(3), timestep), plain(_latent(3), timestep))
    gradients = []
    for noise_fn in (plain, step):
        latent = _latent(3).requires_grad_(True)
        noise_fn(latent, timestep).square().sum().backward()
        gradients.append(latent.grad)
    assert torch.equal(*gradients)


def test_inversion_through_the_steps_is_unchanged(tiny, empty_prompt, schedule):
    plain = ddim_invert(unet_noise_fn(tiny.unet, empty_prompt), _latent(4), schedule)
    stepped = ddim_invert(NoiseStep(unet_noise_fn(tiny.unet, empty_prompt), CPU_STEPS, "inversion"), _latent(4),
                          schedule)
    assert torch.equal(stepped, plain)


@pytest.mark.parametrize("closs", [None, CLossSettings(steps=3)], ids=["no CLoss", "CLoss for 3 steps"])
def test_sampling_through_the_steps_is_unchanged(tiny, empty_prompt, schedule, closs):
    """Static buffers, tensor timesteps, and separate steps for the reference's inactive steps (start_step 2)."""
    inverted = _latent(5)
    reference = record_reference(tiny.unet, empty_prompt, schedule, inverted, start_layer=10, start_step=2)
    dragged = inverted + 0.1 * _latent(6)
    common = dict(start_layer=10, start_step=2, closs=closs, original_latent=_latent(7), handles=[(3.0, 3.0)],
                  targets=[(5.0, 4.0)])
    plain = sample_dragged(tiny.unet, empty_prompt, schedule, dragged, reference, **common)
    stepped = sample_dragged(tiny.unet, empty_prompt, schedule, dragged, reference, graphs=CPU_STEPS, **common)
    assert torch.equal(stepped, plain)


# --------------------------------------------------------------------------------------------- the LoRA step


def _lora_step_streams(tiny, empty_prompt, cuda_optimiser: bool):
    """Host syncs and operator streams of three LoRA steps (the first is the warm-up, never captured)."""
    results = []
    with torch.enable_grad():
        latents, context = training_batch(tiny.unet, _latent(8), empty_prompt, 2)
        with lora_in_training(tiny.unet, 4, 0) as (_, parameters):
            fitting = NoiseFitting(tiny.unet, latents, context, parameters, 3, 5e-4, 0,
                                   fused_optimiser=cuda_optimiser, loss_scaling=cuda_optimiser)
            for index in range(3):
                fitting.load(index)
                results.append(_recorded(fitting.step))
    return results


def test_lora_step_is_capture_ready_with_the_cuda_configuration(tiny, empty_prompt):
    """As it runs on CUDA: fused, capturable AdamW and loss scaling (both forced on here, on the CPU)."""
    (_, _), (second_syncs, second), (third_syncs, third) = _lora_step_streams(tiny, empty_prompt, True)
    assert second_syncs.total == third_syncs.total == 0
    assert len(second) > 100 and second == third


def test_default_adamw_would_not_be_capture_ready(tiny, empty_prompt):
    """The check bites: PyTorch's default AdamW computes its bias correction on the host at every step."""
    (_, _), (second_syncs, second), (_, third) = _lora_step_streams(tiny, empty_prompt, False)
    assert second_syncs.counts["reads"] > 0 and second != third


def _lora_as_before(unet, latent, text_embeddings, steps, rank, lr, batch_size, seed):
    """The training loop as it was before its step was made capture-ready: noise drawn at each step."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    noise_schedule = DDPMScheduler(**{key: SD15_SCHEDULER_CONFIG[key] for key in keys})
    with torch.enable_grad():
        latents, context = training_batch(unet, latent, text_embeddings, batch_size)
        with lora_in_training(unet, rank, seed) as (layers, parameters):
            generator = torch.Generator().manual_seed(seed)
            optimizer = torch.optim.AdamW(parameters, lr=lr)
            for _ in range(steps):
                noise = torch.randn(latents.shape, generator=generator)
                timesteps = torch.randint(0, 1000, (latents.shape[0],), generator=generator)
                noisy = noise_schedule.add_noise(latents, noise, timesteps)
                prediction = unet(noisy, timesteps, encoder_hidden_states=context).sample
                loss = F.mse_loss(prediction.float(), noise)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            return lora_weights(layers)


def test_lora_training_is_unchanged(tiny, empty_prompt):
    settings = dict(steps=4, rank=4, lr=5e-3, batch_size=2, seed=3)
    expected = _lora_as_before(tiny.unet, _latent(9), empty_prompt, **settings)
    got = train_identity_lora(tiny.unet, _latent(9), empty_prompt, graphs=CPU_STEPS, **settings)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[key], expected[key]) for key in expected)
