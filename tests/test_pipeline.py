"""The whole edit with the tiny model: shapes, caching of LoRA/inversion/reference, determinism, inference mode."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from adaptivedrag_core import lora as lora_module
from adaptivedrag_core.automask import AutoMaskWarning
from adaptivedrag_core.drag import EmptyMaskWarning
from adaptivedrag_core.errors import InputError
from adaptivedrag_core.models import tiny_sd_components
from adaptivedrag_core.pipeline import DragPipeline, EditSettings, lora_checkpointing, step_budget
from adaptivedrag_core.points import DragPoints


def _settings(method="adaptive", **overrides):
    base = dict(work_size=64, lora_steps=2, num_steps=10, drag_options=step_budget(method, 3))
    return EditSettings(method=method, **{**base, **overrides})


def _picture(mode="RGB", size=(45, 38)):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8), "RGBA").convert(mode)


@pytest.fixture(scope="module")
def pipeline():
    return DragPipeline(tiny_sd_components(seed=0), model_id="tiny")


def test_edit_returns_an_image_like_the_input(pipeline):
    image = _picture("RGBA")
    points = DragPoints.from_pairs(["10,10:20,12"], *image.size)
    with pytest.warns(AutoMaskWarning):   # adaptive makes the auto mask; without SAM2 from Lab colour
        result = pipeline.edit(image, points, _settings())
    assert result.image.size == image.size and result.image.mode == "RGBA"
    assert np.array_equal(np.asarray(result.image.getchannel("A")), np.asarray(image.getchannel("A")))
    assert len(result.final_handles) == 1 and 1 <= result.drag_steps <= 6
    assert set(result.timings) == {"auto_mask", "inversion", "reference", "drag", "sampling", "decode"}


class _Spy:
    """Records the mask and regions the pipeline's drag stage and the latent mask its sampling stage receive."""

    def __init__(self, monkeypatch):
        self.seen = {}
        drag, sample = DragPipeline.drag, DragPipeline.sample

        def spy_drag(pipeline, inversion, handles, targets, feature_size, settings, mask=None, regions=None,
                     progress=None):
            self.seen.update(mask=mask, regions=regions)
            return drag(pipeline, inversion, handles, targets, feature_size, settings, mask, regions, progress)

        def spy_sample(pipeline, *args, latent_mask=None, **kwargs):
            self.seen.update(latent_mask=latent_mask)
            return sample(pipeline, *args, latent_mask=latent_mask, **kwargs)

        monkeypatch.setattr(DragPipeline, "drag", spy_drag)
        monkeypatch.setattr(DragPipeline, "sample", spy_sample)


@pytest.mark.parametrize("method, auto_mask, expected", [
    ("adaptive", None, True), ("adaptive", False, False), ("freedrag", None, False), ("dragdiffusion", True, True),
])
def test_adaptive_makes_the_auto_mask_and_its_regions_by_default(pipeline, monkeypatch, method, auto_mask, expected):
    spy = _Spy(monkeypatch)
    image = _picture()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutoMaskWarning)
        pipeline.edit(image, DragPoints.from_pairs(["10,10:20,12"], *image.size),
                      _settings(method=method, auto_mask=auto_mask, closs=True))
    if not expected:
        assert spy.seen["mask"] is None and spy.seen["regions"] is None and spy.seen["latent_mask"] is None
        return
    mask, regions = spy.seen["mask"], spy.seen["regions"]
    assert mask.shape == regions.shape == (image.height, image.width) and 0 < mask.mean() < 1
    # CLoss gets the same mask on the latent grid (64 px working copy -> 8x8 latent, as the image's aspect).
    assert spy.seen["latent_mask"].shape == (7, 8) and spy.seen["latent_mask"].any()


def test_a_given_mask_is_kept_and_adaptive_still_gets_regions(pipeline, monkeypatch):
    spy = _Spy(monkeypatch)
    image = _picture()
    mask = np.zeros((image.height, image.width), bool)
    mask[5:30, 5:35] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AutoMaskWarning)
        pipeline.edit(image, DragPoints.from_pairs(["10,10:20,12"], *image.size), _settings(), mask=mask)
    assert spy.seen["mask"] is mask and spy.seen["regions"].shape == mask.shape


def test_an_empty_mask_is_no_mask_with_a_warning(pipeline, monkeypatch):
    spy = _Spy(monkeypatch)
    image = _picture()
    with pytest.warns(EmptyMaskWarning, match="empty"):
        pipeline.edit(image, DragPoints.from_pairs(["10,10:20,12"], *image.size), _settings(method="dragdiffusion"),
                      mask=np.zeros((image.height, image.width), bool))
    assert spy.seen["mask"] is None and spy.seen["latent_mask"] is None


def test_second_drag_on_the_same_image_reuses_what_only_depends_on_the_image(pipeline, monkeypatch):
    image = _picture()
    pipeline.edit(image, DragPoints.from_pairs(["10,10:20,12"], *image.size), _settings(method="dragdiffusion"))
    monkeypatch.setattr(lora_module, "train_identity_lora", _must_not_train)
    again = pipeline.edit(image, DragPoints.from_pairs(["30,20:25,30"], *image.size), _settings(method="freedrag"))
    assert again.reused == ["drag_start", "inversion", "lora", "prompt", "reference", "vae_encode"]


class _Calls:
    """Counts the forward calls of a few modules."""

    def __init__(self, **modules):
        self.counts = dict.fromkeys(modules, 0)
        self.hooks = [module.register_forward_pre_hook(self._counter(name)) for name, module in modules.items()]

    def _counter(self, name):
        def count(*args):
            self.counts[name] += 1
        return count

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def test_a_re_drag_runs_only_the_drag_and_the_sampling():
    """Nothing the inversion fixed runs again: no VAE encode, no text encoder, no UNet call for the drag's starting
    features; the drag's last evaluation (tracking only) stops after the feature block."""
    pipeline = DragPipeline(tiny_sd_components(seed=0), model_id="tiny")
    image = _picture()
    mask = np.ones((image.height, image.width), bool)  # with a mask, every drag step runs the whole UNet
    settings = _settings(method="dragdiffusion")  # 10 DDIM steps at strength 0.7: 7 sampling steps
    pipeline.edit(image, DragPoints.from_pairs(["10,10:20,12"], *image.size), settings, mask=mask)
    components = pipeline.components
    calls = _Calls(unet=components.unet, last_decoder_block=components.unet.up_blocks[3],
                   vae_encoder=components.vae.encoder, text_encoder=components.text_encoder)
    try:
        again = pipeline.edit(image, DragPoints.from_pairs(["30,20:25,30"], *image.size), settings, mask=mask)
    finally:
        calls.remove()
    assert again.drag_steps >= 1
    # One UNet call per drag step, one for the last tracking, one per sampling step.
    assert calls.counts == {"unet": again.drag_steps + 1 + 7, "last_decoder_block": again.drag_steps + 7,
                            "vae_encoder": 0, "text_encoder": 0}


def test_a_re_drag_gives_what_a_first_edit_of_the_same_points_gives():
    """Bitwise (tolerance zero): the cached latent, prompt, inversion and starting features are what a fresh
    pipeline computes."""
    image = _picture()
    mask = np.zeros((image.height, image.width), bool)
    mask[5:30, 5:35] = True
    points = DragPoints.from_pairs(["30,20:25,30"], *image.size)
    cached = DragPipeline(tiny_sd_components(seed=0), model_id="tiny")
    cached.edit(image, DragPoints.from_pairs(["10,10:20,12"], *image.size), _settings(), mask=mask)
    again = cached.edit(image, points, _settings(), mask=mask)
    fresh = DragPipeline(tiny_sd_components(seed=0), model_id="tiny").edit(image, points, _settings(), mask=mask)
    assert "drag_start" in again.reused and fresh.reused == []
    assert np.array_equal(np.asarray(again.image), np.asarray(fresh.image))
    assert again.final_handles == fresh.final_handles and again.drag_steps == fresh.drag_steps


def test_the_drag_start_is_kept_at_the_feature_block_s_resolution():
    pipeline = DragPipeline(tiny_sd_components(seed=0), model_id="tiny")
    image = _picture()
    pipeline.edit(image, DragPoints.from_pairs(["10,10:20,12"], *image.size), _settings(method="dragdiffusion"))
    kept = {stage: value for (stage, _), value in pipeline._memory.items()}
    block_output, prediction = kept["drag_start"]
    # up_blocks[2]'s output has the latent's size, a quarter of the side of the map the drag compares.
    assert block_output.shape[-2:] == kept["inversion"].shape[-2:] and prediction is None


def test_disk_cache_survives_a_new_pipeline(tmp_path, monkeypatch):
    image = _picture()
    points = DragPoints.from_pairs(["10,10:20,12"], *image.size)
    first = DragPipeline(tiny_sd_components(seed=0), model_id="tiny", cache_dir=tmp_path)
    expected = first.edit(image, points, _settings())
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["inversion", "lora"]
    monkeypatch.setattr(lora_module, "train_identity_lora", _must_not_train)
    second = DragPipeline(tiny_sd_components(seed=0), model_id="tiny", cache_dir=tmp_path)
    result = second.edit(image, points, _settings())
    assert "lora" in result.reused and "inversion" in result.reused
    assert np.array_equal(np.asarray(result.image), np.asarray(expected.image))


def test_same_seed_same_result_and_inference_mode_changes_nothing(pipeline):
    image = _picture()
    points = DragPoints.from_pairs(["10,10:20,12"], *image.size)
    settings = _settings(seed=3, closs=True)
    first = pipeline.edit(image, points, settings)
    fresh = DragPipeline(tiny_sd_components(seed=0), model_id="tiny")
    with torch.inference_mode():  # how ComfyUI runs every node
        second = fresh.edit(image, points, settings)
    assert np.array_equal(np.asarray(first.image), np.asarray(second.image))


def test_mask_and_regions_must_match_the_image(pipeline):
    image = _picture()
    points = DragPoints.from_pairs(["10,10:20,12"], *image.size)
    with pytest.raises(InputError, match="mask is 10x10 but the image is 45x38"):
        pipeline.edit(image, points, _settings(), mask=np.ones((10, 10), bool))
    with pytest.raises(InputError, match="image is 45x38 but points were placed on 40x40"):
        pipeline.edit(image, DragPoints.from_pairs(["10,10:20,12"], 40, 40), _settings())


def test_unknown_method_is_refused():
    with pytest.raises(InputError, match="unknown method 'nope'"):
        EditSettings(method="nope")


def _must_not_train(*args, **kwargs):
    raise AssertionError("the identity LoRA was trained again")


@pytest.mark.parametrize("method", ["adaptive", "freedrag", "dragdiffusion"])
def test_half_precision_unet_runs_every_stage(method):
    # On a GPU the UNet runs in fp16; on the CPU this catches dtype mismatches between the stages.
    half = DragPipeline(tiny_sd_components(seed=0), dtype=torch.float16, model_id="tiny-fp16")
    image = _picture()
    mask = np.zeros((image.height, image.width), bool)
    mask[5:30, 5:35] = True
    result = half.edit(image, DragPoints.from_pairs(["10,10:20,12"], *image.size),
                       _settings(method=method, closs=True), mask=mask)
    assert result.image.size == image.size
    assert next(half.components.unet.parameters()).dtype == torch.float16
    assert np.isfinite(np.asarray(result.image, dtype=float)).all() and np.asarray(result.image).std() > 0


@pytest.mark.parametrize("setting, memory_gib, expected", [
    (None, 7.6, True), (None, 9.8, True), (None, 11.8, False), (None, 80, False), (True, 80, True), (False, 7.6, False),
])
def test_lora_checkpointing_is_on_by_default_only_on_small_gpus(monkeypatch, setting, memory_gib, expected):
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=memory_gib * 2**30))
    assert lora_checkpointing(setting, "cuda") is expected
    assert lora_checkpointing(None, "cpu") is False


@pytest.mark.parametrize("setting", [True, False])
def test_the_pipeline_trains_the_lora_with_the_checkpointing_setting(monkeypatch, setting):
    seen = []
    train = lora_module.train_identity_lora

    def recording(*args, **kwargs):
        seen.append(kwargs["gradient_checkpointing"])
        return train(*args, **kwargs)

    monkeypatch.setattr(lora_module, "train_identity_lora", recording)
    image = _picture()
    pipeline = DragPipeline(tiny_sd_components(seed=0), model_id="tiny")
    pipeline.edit(image, DragPoints.from_pairs(["10,10:20,12"], *image.size),
                  _settings(lora_gradient_checkpointing=setting))
    assert seen == [setting]


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("overrides, message", [
    (dict(guidance_scale=NAN), "guidance_scale"), (dict(guidance_scale=INF), "guidance_scale"),
    (dict(closs_weight=INF), "closs_weight"), (dict(closs_weight=-1.0), "closs_weight"),
    (dict(closs_weight=NAN), "closs_weight"), (dict(closs_kind="nope"), "CLoss kind"),
    (dict(drag_options={"lr": INF}), "lr"), (dict(drag_options={"lam": INF}), "lam"),
    (dict(drag_options={"nope": 1}), "unknown option"), (dict(drag_options={"max_steps": 0}), "max_steps"),
    (dict(strength=1.5), "strength"), (dict(strength=NAN), "strength"), (dict(strength=0.0), "strength"),
    (dict(num_steps=0), "num_steps"), (dict(num_steps=1001), "num_steps"), (dict(num_steps=2.5), "num_steps"),
    (dict(work_size=4), "work_size"), (dict(lora_steps=-1), "lora_steps"), (dict(lora_rank=0), "lora_rank"),
    (dict(lora_lr=NAN), "lora_lr"), (dict(lora_lr=0.0), "lora_lr"), (dict(lora_batch_size=0), "lora_batch_size"),
    (dict(seed=-1), "seed"), (dict(feature_scale=0.0), "feature_scale"), (dict(feature_block=7), "feature_block"),
    (dict(reference_start_layer=-1), "reference_start_layer"), (dict(reference_start_step=INF), "reference_start_step"),
    (dict(lora_gradient_checkpointing="yes"), "lora_gradient_checkpointing"), (dict(cuda_graphs="on"), "cuda_graphs"),
])
def test_every_setting_is_checked_before_any_stage_runs(pipeline, monkeypatch, overrides, message):
    import adaptivedrag_core.pipeline as pipeline_module

    def must_not_start(*args, **kwargs):
        raise AssertionError("a stage started although a setting is bad")

    monkeypatch.setattr(pipeline_module, "prepare_image", must_not_start)
    monkeypatch.setattr(lora_module, "train_identity_lora", must_not_start)
    image = _picture()
    with pytest.raises(InputError, match=message):
        pipeline.edit(image, DragPoints.from_pairs(["10,10:20,12"], *image.size), _settings(**overrides))


def test_validate_accepts_the_defaults_and_the_papers_options():
    for method in ("adaptive", "freedrag", "dragdiffusion"):
        assert EditSettings(method=method, drag_options=step_budget(method, 10)).validate().method == method
    assert EditSettings(lora_steps=0, closs_weight=0.0, guidance_scale=7.5).validate().lora_steps == 0


def test_damaged_cache_entries_are_reported_and_computed_again(tmp_path):
    from adaptivedrag_core.cache import CacheWarning
    from adaptivedrag_core.lora import load_lora

    image = _picture()
    points = DragPoints.from_pairs(["10,10:20,12"], *image.size)
    expected = DragPipeline(tiny_sd_components(seed=0), model_id="tiny", cache_dir=tmp_path).edit(
        image, points, _settings())
    entries = sorted(tmp_path.iterdir())
    for entry in entries:  # as a killed write or a full disk leaves them
        entry.write_bytes(entry.read_bytes()[:100])
    with pytest.warns(CacheWarning, match="computing it again") as seen:
        result = DragPipeline(tiny_sd_components(seed=0), model_id="tiny", cache_dir=tmp_path).edit(
            image, points, _settings())
    # Only the two damaged entries warn (the adaptive default's auto mask adds its no-SAM2 warning besides).
    assert len([w for w in seen if issubclass(w.category, CacheWarning)]) == 2 and result.reused == []
    assert np.array_equal(np.asarray(result.image), np.asarray(expected.image))
    assert sorted(tmp_path.iterdir()) == entries
    load_lora(next(p for p in entries if p.name.startswith("lora-")))  # rewritten whole


def test_an_interrupted_cache_write_leaves_no_entry(tmp_path, monkeypatch):
    import safetensors.torch

    def killed_while_writing(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as file:
            file.write(b"\x08\x00\x00")
        raise KeyboardInterrupt

    image = _picture()
    pipeline = DragPipeline(tiny_sd_components(seed=0), model_id="tiny", cache_dir=tmp_path)
    monkeypatch.setattr(safetensors.torch, "save_file", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        pipeline.edit(image, DragPoints.from_pairs(["10,10:20,12"], *image.size), _settings(lora_steps=0))
    assert list(tmp_path.iterdir()) == []


def test_a_given_lora_reuses_no_inversion_of_another_image(tmp_path):
    lora = DragPipeline(tiny_sd_components(seed=0), model_id="tiny").edit(
        _picture(), DragPoints.from_pairs(["10,10:20,12"], 45, 38), _settings()).lora
    pipeline = DragPipeline(tiny_sd_components(seed=0), model_id="tiny", cache_dir=tmp_path)
    first = pipeline.edit(_picture(), DragPoints.from_pairs(["10,10:20,12"], 45, 38), _settings(), lora=lora)
    other = Image.fromarray(255 - np.asarray(_picture()))
    pipeline.clear_cache()
    second = pipeline.edit(other, DragPoints.from_pairs(["10,10:20,12"], 45, 38), _settings(), lora=lora)
    assert first.reused == [] and second.reused == []


def test_the_dtype_is_part_of_every_cache_key(tmp_path):
    image = _picture()
    points = DragPoints.from_pairs(["10,10:20,12"], *image.size)
    DragPipeline(tiny_sd_components(seed=0), model_id="tiny", cache_dir=tmp_path).edit(image, points, _settings())
    half = DragPipeline(tiny_sd_components(seed=0), dtype=torch.float16, model_id="tiny", cache_dir=tmp_path)
    assert half.edit(image, points, _settings()).reused == []


def test_a_cache_folder_that_is_a_file_stops_the_pipeline_before_any_work(tmp_path):
    (tmp_path / "cache").write_bytes(b"")
    with pytest.raises(InputError, match="not a folder"):
        DragPipeline(tiny_sd_components(seed=0), model_id="tiny", cache_dir=tmp_path / "cache")
