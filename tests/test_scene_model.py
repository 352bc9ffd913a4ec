"""The shipped scene model: what it is, and that the training command would still train it on the same scenes."""

from adaptivedrag_core.scene_model import SCENE_MODEL_DIR, load_scene_model, scene_model_info
from adaptivedrag_core.scene_training import TrainingPlan, data_digest
from adaptivedrag_core.scenes import scene_set


def test_the_shipped_model_is_small_and_has_sd15s_layout():
    weights = sum(path.stat().st_size for path in SCENE_MODEL_DIR.rglob("*.safetensors"))
    assert weights <= 40 * 2**20
    model = load_scene_model()
    assert model.native_size == 128
    unet = model.unet
    assert [type(block).__name__ for block in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert sum(name.endswith("attn1") for name, _ in unet.named_modules()) == 16
    assert len(model.vae.encoder.down_blocks) == 4
    assert model.latent_scale == scene_model_info()["latent_scale"]


def test_the_shipped_model_was_made_by_the_training_commands_defaults():
    assert scene_model_info()["training"] == TrainingPlan().info()


def test_the_generator_still_makes_the_scenes_the_model_was_trained_on():
    info = scene_model_info()
    first, _ = scene_set(TrainingPlan().seed, 16, info["native_size"])
    assert data_digest(first) == info["data_digest"]
