"""Identity LoRA: training, the identity_lora context, and saving/loading, on the tiny SD1.x model."""

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adaptivedrag_core.errors import InputError
from adaptivedrag_core.lora import identity_lora, load_lora, lora_in_training, save_lora, train_identity_lora
from adaptivedrag_core.models import SD15_SCHEDULER_CONFIG, encode_prompt, tiny_sd_components

STEPS = 8
TRAINING = dict(steps=STEPS, lr=5e-3, batch_size=2, rank=4, seed=0)


@pytest.fixture(scope="module")
def tiny():
    return tiny_sd_components(seed=0)


@pytest.fixture(scope="module")
def image(tiny):
    """A fixed latent (the stand-in for the encoded image) and the empty prompt's embeddings."""
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    return latent, encode_prompt(tiny, "")


@pytest.fixture(scope="module")
def trained(tiny, image):
    """Weights, outputs and module layout of the UNet before training, and the LoRA trained with TRAINING."""
    unet = tiny.unet
    before = {
        "weights": {key: value.clone() for key, value in unet.state_dict().items()},
        "modules": [(name, type(module)) for name, module in unet.named_modules()],
        "attributes": set(vars(unet)),
        "output": _prediction(unet, image),
    }
    calls = []
    state = train_identity_lora(unet, *image, progress=lambda step, total: calls.append((step, total)), **TRAINING)
    return before, state, calls


def _prediction(unet, image):
    latent, context = image
    noisy = torch.randn(latent.shape, generator=torch.Generator().manual_seed(11)).to(latent.dtype)
    with torch.no_grad():
        return unet(noisy, 300, encoder_hidden_states=context).sample


def _denoising_loss(unet, image, draws=16):
    """Epsilon-prediction loss of the image at fixed timesteps and noises (the quantity training lowers)."""
    from diffusers import DDPMScheduler

    latent, context = image
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    schedule = DDPMScheduler(**{key: SD15_SCHEDULER_CONFIG[key] for key in keys})
    generator = torch.Generator().manual_seed(123)
    noise = torch.randn((draws,) + latent.shape[1:], generator=generator)
    timesteps = torch.randint(0, 1000, (draws,), generator=generator)
    noisy = schedule.add_noise(latent.expand(draws, -1, -1, -1), noise, timesteps)
    with torch.no_grad():
        prediction = unet(noisy, timesteps, encoder_hidden_states=context.expand(draws, -1, -1)).sample
    return torch.nn.functional.mse_loss(prediction, noise).item()


def _assert_unet_as_before(unet, before, image):
    weights = unet.state_dict()
    assert weights.keys() == before["weights"].keys()
    assert all(torch.equal(weights[key], value) for key, value in before["weights"].items())
    assert [(name, type(module)) for name, module in unet.named_modules()] == before["modules"]
    assert set(vars(unet)) == before["attributes"]
    assert not any(parameter.requires_grad for parameter in unet.parameters())
    assert torch.equal(_prediction(unet, image), before["output"])


def test_state_covers_every_attention_projection(tiny, trained):
    _, state, _ = trained
    projections = [name for name, _ in tiny.unet.named_modules() if name.endswith(("to_q", "to_k", "to_v", "to_out.0"))]

    assert sorted(state) == sorted(f"{name}.lora_{ab}.weight" for name in projections for ab in "AB")
    assert all(value.dtype == torch.float32 and value.device.type == "cpu" for value in state.values())
    assert {state[f"{name}.lora_A.weight"].shape[0] for name in projections} == {TRAINING["rank"]}


def test_progress_is_called_every_step(trained):
    _, _, calls = trained
    assert calls == [(step, STEPS) for step in range(1, STEPS + 1)]


def test_training_leaves_the_unet_unchanged(tiny, trained, image):
    before, _, _ = trained
    _assert_unet_as_before(tiny.unet, before, image)


def test_training_lowers_the_denoising_loss(tiny, trained, image):
    _, state, _ = trained
    loss_before = _denoising_loss(tiny.unet, image)
    with identity_lora(tiny.unet, state):
        loss_with_lora = _denoising_loss(tiny.unet, image)
    assert loss_with_lora < loss_before


def test_identity_lora_changes_output_then_restores_the_unet(tiny, trained, image):
    before, state, _ = trained
    with identity_lora(tiny.unet, state) as unet:
        assert unet is tiny.unet
        inside = _prediction(unet, image)
    assert not torch.allclose(inside, before["output"])
    _assert_unet_as_before(tiny.unet, before, image)


def test_identity_lora_restores_the_unet_after_an_error(tiny, trained, image):
    before, state, _ = trained
    with pytest.raises(KeyError):
        with identity_lora(tiny.unet, state):
            raise KeyError("inside")
    _assert_unet_as_before(tiny.unet, before, image)


def _unmerged_prediction(unet, state, image):
    """The prediction with peft's LoRA layers on the UNet (the unmerged arithmetic), as a reference."""
    rank = next(value for key, value in state.items() if key.endswith("lora_A.weight")).shape[0]
    with torch.inference_mode(False), lora_in_training(unet, rank, seed=0) as (layers, _):
        with torch.no_grad():
            for path, layer in layers.items():
                layer.lora_A["identity"].weight.copy_(state[f"{path}.lora_A.weight"])
                layer.lora_B["identity"].weight.copy_(state[f"{path}.lora_B.weight"])
            return _prediction(unet, image)


def test_merged_lora_matches_the_unmerged_layers(tiny, trained, image):
    _, state, _ = trained
    with identity_lora(tiny.unet, state):
        merged = _prediction(tiny.unet, image)
    unmerged = _unmerged_prediction(tiny.unet, state, image)
    assert torch.allclose(merged, unmerged, rtol=1e-4, atol=1e-5)


def test_merged_lora_in_half_precision_stays_close(tiny, trained, image):
    _, state, _ = trained
    unet = copy.deepcopy(tiny.unet).half()
    half_image = tuple(x.half() for x in image)
    with identity_lora(unet, state):
        merged = _prediction(unet, half_image).float()
    unmerged = _unmerged_prediction(unet, state, half_image).float()
    assert ((merged - unmerged).abs().max() / unmerged.abs().max()) < 5e-3


def test_identity_lora_puts_back_the_same_weight_tensors(tiny, trained):
    _, state, _ = trained
    projections = {name: module for name, module in tiny.unet.named_modules() if name.endswith("attn1.to_q")}
    weights = {name: module.weight for name, module in projections.items()}
    tiny.unet.requires_grad_(True)
    try:
        with identity_lora(tiny.unet, state):
            assert all(module.weight is not weights[name] for name, module in projections.items())
            assert not any(module.weight.requires_grad for module in projections.values())
        assert all(module.weight is weights[name] for name, module in projections.items())
        assert all(parameter.requires_grad for parameter in tiny.unet.parameters())
    finally:
        tiny.unet.requires_grad_(False)


def test_identity_lora_takes_gradients_inside_inference_mode(tiny, trained, image):
    # The drag stage optimises the latent through the UNet with the LoRA active, called from ComfyUI's
    # inference mode.
    _, state, _ = trained
    latent, context = image
    with torch.inference_mode():
        inference_state = {key: value.clone() for key, value in state.items()}  # as if loaded in a node
        with identity_lora(tiny.unet, inference_state), torch.inference_mode(False), torch.enable_grad():
            variable = latent.clone().requires_grad_(True)
            tiny.unet(variable, 300, encoder_hidden_states=context.clone()).sample.square().mean().backward()
    assert variable.grad is not None and variable.grad.abs().sum() > 0


def test_training_is_deterministic_and_works_in_inference_mode(tiny, trained, image):
    before, state, _ = trained
    latent, context = image
    with torch.inference_mode():
        inference_image = (latent.clone(), context.clone())
        again = train_identity_lora(tiny.unet, *inference_image, **TRAINING)
    other_seed = train_identity_lora(tiny.unet, *image, **{**TRAINING, "steps": 1, "seed": 1})
    same_seed_short = train_identity_lora(tiny.unet, *image, **{**TRAINING, "steps": 1})

    assert all(torch.equal(again[key], state[key]) for key in state)
    assert any(not torch.equal(other_seed[key], same_seed_short[key]) for key in state)
    _assert_unet_as_before(tiny.unet, before, image)


def test_lora_for_another_unet_is_refused(tiny, trained):
    _, state, _ = trained
    key = next(key for key in state if key.endswith("attn2.to_k.lora_A.weight"))
    wrong = {**state, key: torch.zeros(TRAINING["rank"], 768)}
    with pytest.raises(InputError, match="does not fit this UNet.*to_k"):
        with identity_lora(tiny.unet, wrong):
            pass


def test_save_and_load_round_trip(trained, tmp_path):
    _, state, _ = trained
    path = save_lora(state, tmp_path / "loras" / "identity.safetensors", metadata={"image": "abc", "steps": 8})

    loaded = load_lora(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata()["image"] == "abc"
        assert handle.metadata()["steps"] == "8"
        assert handle.metadata()["rank"] == str(TRAINING["rank"])


def test_save_refuses_to_overwrite(trained, tmp_path):
    _, state, _ = trained
    path = tmp_path / "identity.safetensors"
    path.write_bytes(b"precious")

    with pytest.raises(InputError, match="already exists.*overwrite=True"):
        save_lora(state, path)
    assert path.read_bytes() == b"precious"

    save_lora(state, path, overwrite=True)
    assert load_lora(path).keys() == state.keys()


def test_load_missing_or_invalid_files(tmp_path):
    with pytest.raises(InputError, match="LoRA file not found: .*absent.safetensors"):
        load_lora(tmp_path / "absent.safetensors")

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00notjson!")
    with pytest.raises(InputError, match="cannot read LoRA file .*junk.safetensors"):
        load_lora(junk)

    not_lora = tmp_path / "weights.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(not_lora))
    with pytest.raises(InputError, match="weights.safetensors is not a LoRA state"):
        load_lora(not_lora)


def test_a_lora_file_with_nan_weights_is_refused(trained, tmp_path):
    _, state, _ = trained
    broken = dict(state)
    name = sorted(broken)[0]
    broken[name] = broken[name].clone()
    broken[name][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(broken, str(path))
    with pytest.raises(InputError, match=f"nan.safetensors: its weight '{name}' holds NaN"):
        load_lora(path)


def test_gradient_checkpointing_trains_the_same_weights_and_is_switched_off_after(tiny, image, trained):
    _, state, _ = trained
    checkpointed = train_identity_lora(tiny.unet, *image, gradient_checkpointing=True, **TRAINING)
    assert not tiny.unet.is_gradient_checkpointing
    assert checkpointed.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(checkpointed[key], value, rtol=1e-5, atol=1e-7)
    assert any(value.abs().max() > 0 for key, value in checkpointed.items() if "lora_B" in key)  # it trained


def test_gradient_checkpointing_recomputes_the_blocks_in_the_backward_pass(tiny, image):
    """Checkpointing is really on while training: a block's forward runs again during the backward pass (a
    block after the first LoRA layers: the gradient does not reach further back). A pre-hook, because the
    recomputation stops as soon as it has what the backward pass needs, before the forward ends."""
    calls = []
    handle = tiny.unet.up_blocks[-1].resnets[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        train_identity_lora(tiny.unet, *image, **{**TRAINING, "steps": 1})
        plain = len(calls)
        calls.clear()
        train_identity_lora(tiny.unet, *image, gradient_checkpointing=True, **{**TRAINING, "steps": 1})
    finally:
        handle.remove()
    assert (plain, len(calls)) == (1, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_float32_down_projection_matches_peft_arithmetic_and_keeps_only_its_input(dtype):
    """Same output and gradients as ``F.linear(x.float(), w)``; what it keeps for backward is x itself."""
    from adaptivedrag_core.lora import Float32Down

    generator = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(24, 4, bias=False)
    x = torch.randn(2, 10, 24, generator=generator).to(dtype).requires_grad_(True)
    grad_out = torch.randn(2, 10, 4, generator=generator)
    reference_x = x.detach().clone().requires_grad_(True)
    expected = torch.nn.functional.linear(reference_x.float(), linear.weight)
    expected.backward(grad_out)
    expected_weight_grad = linear.weight.grad.clone()
    linear.weight.grad = None

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = Float32Down(linear)(x)
    out.backward(grad_out)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(linear.weight.grad, expected_weight_grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=0, atol=0)
    assert [t.dtype for t in saved] == [dtype, torch.float32] and saved[0] is x


def test_half_precision_training_keeps_less_than_float32_copies_for_the_same_weights(tiny, image, monkeypatch):
    """On an fp16 UNet, training with the float32 down projections ends with the weights that peft's own casting
    gives, and keeps less for the backward pass (counted by the estimate's live-byte counter)."""
    from adaptivedrag_core import lora as lora_module
    from adaptivedrag_core.bench.estimate import CostCounter

    class PeftCast(torch.nn.Module):
        """peft's arithmetic: a float32 copy of the input, which autograd keeps."""

        def __init__(self, linear):
            super().__init__()
            self.weight = linear.weight

        def forward(self, x):
            return torch.nn.functional.linear(x.float(), self.weight)

    def train():
        counter = CostCounter()
        counter.track_module(tiny.unet)
        with counter:
            state = train_identity_lora(tiny.unet, *image, **{**TRAINING, "steps": 2})
        return state, counter.peak

    tiny.unet.half()
    try:
        state, peak = train()
        monkeypatch.setattr(lora_module, "Float32Down", PeftCast)
        peft_state, peft_peak = train()
    finally:
        tiny.unet.float()
    assert peak < peft_peak
    for key, value in peft_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-7)
