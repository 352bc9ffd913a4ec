"""Training the scene model: fixed seeds, exact resume, export that loads offline like any model."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from adaptivedrag_core import scene_training
from adaptivedrag_core.cli import main
from adaptivedrag_core.errors import InputError
from adaptivedrag_core.scene_model import SceneModelSpec, build_scene_components, load_scene_model
from adaptivedrag_core.scene_training import TrainingPlan, train_scene_model, weights_digest

TINY_PLAN = TrainingPlan(
    spec=SceneModelSpec(native_size=64, unet_channels=(8, 8, 16, 16), unet_heads=2, vae_channels=(8, 8, 16, 16),
                        text_width=16, text_length=16, norm_groups=4),
    scenes=6, vae_steps=3, vae_batch=2, vae_crop=32, decoder_steps=4, decoder_batch=2, unet_steps=4, unet_batch=3,
    warmup_steps=2, checkpoint_every=2,
)


class _Interrupted(Exception):
    pass


def _interrupt_at(stage: str, step_to_stop: int):
    def factory(name):
        def progress(step, total):
            if name == stage and step == step_to_stop:
                raise _Interrupted

        return progress

    return factory


def _silent(name):
    return None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    return train_scene_model(folder, TINY_PLAN, progress_factory=_silent, log=lambda line: None)


@pytest.mark.parametrize("stage, checkpoint", [("decoder", "decoder.pt"), ("UNet", "unet.pt")])
def test_an_interrupted_run_resumes_to_the_same_weights(trained, tmp_path, stage, checkpoint):
    with pytest.raises(_Interrupted):
        train_scene_model(tmp_path, TINY_PLAN, progress_factory=_interrupt_at(stage, 3), log=lambda line: None)
    assert (tmp_path / checkpoint).is_file() and not (tmp_path / "model").exists()
    resumed = train_scene_model(tmp_path, TINY_PLAN, progress_factory=_silent, log=lambda line: None)
    assert weights_digest(resumed) == weights_digest(trained)


def test_training_moves_the_weights_and_seeds_decide_them(trained, tmp_path):
    other = train_scene_model(tmp_path, replace(TINY_PLAN, seed=1), progress_factory=_silent, log=lambda line: None)
    assert weights_digest(other) != weights_digest(trained)


def test_the_decoder_stage_refines_the_decoder_alone(tmp_path):
    plan = replace(TINY_PLAN, decoder_steps=30, decoder_lr=3e-3, unet_steps=1)
    model = load_scene_model(train_scene_model(tmp_path, plan, progress_factory=_silent, log=lambda line: None))
    after_vae = build_scene_components(plan.spec, seed=plan.seed).vae
    after_vae.load_state_dict(torch.load(tmp_path / "vae.pt", weights_only=True)["model"])
    for side in ("encoder", "quant_conv"):
        assert weights_equal(getattr(model.vae, side), getattr(after_vae, side)), side
    assert not weights_equal(model.vae.decoder, after_vae.decoder)
    # What is exported is the moving average of the decoder's weights, not its last step's.
    checkpoint = torch.load(tmp_path / "decoder.pt", weights_only=True)
    exported = {**model.vae.post_quant_conv.state_dict(prefix="post_quant_conv."),
                **model.vae.decoder.state_dict(prefix="decoder.")}
    assert exported.keys() == checkpoint["ema"].keys()
    assert all(torch.equal(exported[name], checkpoint["ema"][name]) for name in exported)
    assert not all(torch.equal(exported[name], checkpoint["model"][name]) for name in exported)
    cached = torch.load(tmp_path / "latents.pt", weights_only=True)["latents"]
    scenes = torch.from_numpy(np.load(tmp_path / "scenes.npy")).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        errors = [float((vae.decode(cached).sample - scenes).pow(2).mean()) for vae in (after_vae, model.vae)]
    assert errors[1] < 0.8 * errors[0]


@pytest.mark.parametrize("bfloat16", [True, False])
def test_a_decoder_step_decodes_in_bfloat16_only_when_the_plan_says_so(bfloat16):
    vae = build_scene_components(TINY_PLAN.spec, seed=0).vae
    optimiser = scene_training._trainable(vae, "decoder", TINY_PLAN, "cpu")
    before = [parameter.detach().clone() for parameter in vae.decoder.parameters()]
    decoded_dtypes = []
    decode = vae.decode

    def recording_decode(latents):
        output = decode(latents)
        decoded_dtypes.append(output.sample.dtype)
        return output

    vae.decode = recording_decode
    batch = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 64, 64) * 2 - 1
    scene_training._decoder_step(vae, optimiser, batch, "cpu", bfloat16)
    assert decoded_dtypes == [torch.bfloat16 if bfloat16 else torch.float32]
    assert all(parameter.dtype == torch.float32 for parameter in vae.parameters())
    assert not all(torch.equal(old, new) for old, new in zip(before, vae.decoder.parameters()))


def weights_equal(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_a_folder_of_another_plan_is_refused(trained):
    with pytest.raises(InputError, match="other settings"):
        train_scene_model(trained.parent, replace(TINY_PLAN, unet_steps=5), progress_factory=_silent)


def test_the_export_loads_offline_with_its_native_size_and_latent_scale(trained):
    components = load_scene_model(trained)
    assert components.native_size == 64
    assert components.latent_scale == pytest.approx(components.vae.config.scaling_factor)
    assert components.latent_scale != 1.0  # set from the training latents' spread
    ids = components.tokenizer("a red ball", padding="max_length", max_length=16, return_tensors="pt").input_ids
    assert components.text_encoder(ids)[0].shape == (1, 16, 16)
    unet = components.unet
    self_attention = [name for name, _ in unet.named_modules() if name.endswith("attn1")]
    assert len(self_attention) == 16  # SD1.5's layout: 6 down, 1 middle, 9 up
    latent = torch.zeros(1, 4, 8, 8)
    assert unet(latent, 10, encoder_hidden_states=torch.zeros(1, 16, 16)).sample.shape == latent.shape


def test_a_missing_scene_model_names_the_command(tmp_path):
    with pytest.raises(InputError, match="train-scenes"):
        load_scene_model(tmp_path)


def test_train_scenes_builds_its_plan_from_the_command_line(monkeypatch, tmp_path, capsys):
    runs = []
    monkeypatch.setattr(scene_training, "train_scene_model", lambda out, plan, device: runs.append((out, plan)))
    argv = ["train-scenes", "--out", str(tmp_path), "--vae-batch", "16", "--unet-batch", "128", "--unet-lr", "1e-3",
            "--checkpoint-every", "1000", "--size", "256"]
    assert main(argv) == 0
    [(out, plan)] = runs
    assert out == str(tmp_path)
    assert (plan.vae_batch, plan.unet_batch, plan.unet_lr, plan.checkpoint_every) == (16, 128, 1e-3, 1000)
    assert plan.spec.native_size == 256
    defaults = TrainingPlan()
    assert replace(plan, vae_batch=defaults.vae_batch, unet_batch=defaults.unet_batch, unet_lr=defaults.unet_lr,
                   checkpoint_every=defaults.checkpoint_every, spec=defaults.spec) == defaults
    assert main(["train-scenes", "--out", str(tmp_path), "--unet-batch", "0"]) == 2
    assert "--unet-batch must be at least 1" in capsys.readouterr().err
    assert main(["train-scenes", "--out", str(tmp_path), "--unet-lr", "0"]) == 2
    assert "--unet-lr must be above 0" in capsys.readouterr().err
    assert len(runs) == 1


def test_seconds_become_the_steps_a_timed_step_allows_and_a_rerun_keeps_them(monkeypatch, tmp_path):
    lines = []
    for stage in ("vae", "decoder", "unet"):
        assert 0 < scene_training.step_seconds(TINY_PLAN, stage, torch.device("cpu"), steps=2, warmup=1) < 60
    monkeypatch.setattr(scene_training, "step_seconds", lambda plan, stage, device: {"vae": 0.5, "unet": 0.25}[stage])
    plan = scene_training.fit_steps(tmp_path, TINY_PLAN, {"vae": 10, "unet": 10}, "cpu", log=lines.append)
    assert plan == replace(TINY_PLAN, vae_steps=20, unet_steps=40)
    assert "--vae-steps 20" in lines[-2] and "--unet-steps 40" in lines[-1]
    assert scene_training.fit_steps(tmp_path, TINY_PLAN, {"unet": 10}, "cpu", log=lines.append) == replace(
        TINY_PLAN, unet_steps=40)
    train_scene_model(tmp_path, replace(plan, unet_steps=3, vae_steps=1), progress_factory=_silent, log=lines.append)
    # Another plan in the folder: measured again (and training would refuse the folder, as without the option).
    assert scene_training.fit_steps(tmp_path, TINY_PLAN, {"unet": 10}, "cpu", log=lines.append).unet_steps == 40
    other = tmp_path / "other"
    train_scene_model(other, replace(TINY_PLAN, vae_steps=2, unet_steps=3), progress_factory=_silent,
                      log=lines.append)
    monkeypatch.setattr(scene_training, "step_seconds", lambda plan, stage, device: 0.01)
    # The same plan but for its step counts: the folder's counts are kept, so the run resumes rather than restarts.
    kept = scene_training.fit_steps(other, TINY_PLAN, {"vae": 10, "unet": 10}, "cpu", log=lines.append)
    assert (kept.vae_steps, kept.unet_steps) == (2, 3)
    assert "2 VAE steps, 3 UNet steps, as the run in" in lines[-1]
    # Only the stages given are fitted: a folder whose VAE count differs from the plan's is another plan.
    assert scene_training.fit_steps(other, TINY_PLAN, {"unet": 10}, "cpu", log=lines.append).unet_steps == 1000
    # A stage whose step outlasts its time still takes one step, and the log says so.
    monkeypatch.setattr(scene_training, "step_seconds", lambda plan, stage, device: 20.0)
    assert scene_training.fit_steps(tmp_path / "slow", TINY_PLAN, {"vae": 10}, "cpu", log=lines.append).vae_steps == 1
    assert "so 1 step for 10 s, though it takes longer than that" in lines[-1]


def test_train_scenes_takes_seconds_instead_of_steps(monkeypatch, tmp_path, capsys):
    runs = []
    monkeypatch.setattr(scene_training, "train_scene_model", lambda out, plan, device: runs.append(plan))
    monkeypatch.setattr(scene_training, "step_seconds",
                        lambda plan, stage, device: {"vae": 0.2, "decoder": 0.5, "unet": 0.1}[stage])
    assert main(["train-scenes", "--out", str(tmp_path), "--unet-seconds", "30", "--unet-batch", "64"]) == 0
    assert runs == [replace(TrainingPlan(), unet_steps=300, unet_batch=64)]
    assert main(["train-scenes", "--out", str(tmp_path / "all"), "--vae-seconds", "30", "--decoder-seconds", "20",
                 "--unet-seconds", "60"]) == 0
    assert runs[-1] == replace(TrainingPlan(), vae_steps=150, decoder_steps=40, unet_steps=600)
    for stage in ("vae", "decoder", "unet"):
        with pytest.raises(SystemExit):
            main(["train-scenes", "--out", str(tmp_path), f"--{stage}-seconds", "30", f"--{stage}-steps", "10"])
        assert "not allowed with argument" in capsys.readouterr().err
        assert main(["train-scenes", "--out", str(tmp_path), f"--{stage}-seconds", "0"]) == 2
        assert f"--{stage}-seconds must be above 0" in capsys.readouterr().err
    assert len(runs) == 2
