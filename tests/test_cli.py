"""The CLI: every bad-input path exits 2 with one line and writes nothing; the demo runs end to end."""

import numpy as np
import pytest
from image_files import orientation_6_jpeg, ramp16
from PIL import Image

from adaptivedrag_core.cli import main
from adaptivedrag_core.errors import InputError


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr()


def _only(tmp_path, *names):
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


@pytest.mark.parametrize(
    "drag, message",
    [
        ("10,10:50,10", "outside the 40x30 image"),
        ("10,10:20", "4 numbers"),
        ("10,10:10,10", "same point"),
    ],
)
def test_bad_points(tmp_path, picture, capsys, drag, message):
    code, out = _run(capsys, "edit", picture, "--drag", drag, "--demo", "--out", tmp_path / "o.png")
    assert code == 2
    assert message in out.err and out.err.count("\n") == 1
    _only(tmp_path, "in.png")


def test_zero_pairs(tmp_path, picture, capsys):
    code, out = _run(capsys, "edit", picture, "--model", tmp_path / "m.safetensors", "--out", tmp_path / "o.png")
    assert code == 2 and "no drag pairs" in out.err
    _only(tmp_path, "in.png")


def test_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    code, out = _run(capsys, "edit", bad, "--drag", "1,1:2,2", "--demo", "--out", tmp_path / "o.png")
    assert code == 2 and "cannot read image" in out.err
    _only(tmp_path, "bad.png")


def test_mask_of_the_wrong_size(tmp_path, picture, capsys):
    mask = tmp_path / "mask.png"
    Image.new("L", (20, 20), 255).save(mask)
    code, out = _run(capsys, "edit", picture, "--drag", "1,1:5,5", "--mask", mask, "--demo", "--out", tmp_path / "o.png")
    assert code == 2 and "mask" in out.err and "20x20" in out.err and "40x30" in out.err
    _only(tmp_path, "in.png", "mask.png")


def test_missing_model(tmp_path, picture, capsys):
    code, out = _run(capsys, "edit", picture, "--drag", "1,1:5,5", "--model", tmp_path / "nope.safetensors",
                     "--out", tmp_path / "o.png")
    assert code == 2 and "nope.safetensors" in out.err
    _only(tmp_path, "in.png")


def test_existing_output_is_not_overwritten(tmp_path, picture, capsys):
    out_path = tmp_path / "o.png"
    out_path.write_bytes(b"precious")
    code, out = _run(capsys, "edit", picture, "--drag", "1,1:5,5", "--demo", "--out", out_path)
    assert code == 2 and "--force" in out.err
    assert out_path.read_bytes() == b"precious"


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    out_path = tmp_path / "demo.png"
    fast = ["--lora-steps", "2", "--drag-steps", "3", "--work-size", "64", "--ddim-steps", "10"]
    code, out = _run(capsys, "edit", "--demo", "--out", out_path, *fast)
    assert code == 0, out.err
    assert "scene model" in out.out
    result = Image.open(out_path)
    assert result.size == (256, 256) and result.mode == "RGB"
    preview = Image.open(tmp_path / "demo_preview.png")
    assert preview.width > 2 * 256 and preview.height == 256
    # A second run refuses to overwrite, a forced one succeeds.
    assert main(["edit", "--demo", "--out", str(out_path), *fast]) == 2
    assert main(["edit", "--demo", "--out", str(out_path), *fast, "--force"]) == 0


def test_lora_file_is_saved_then_reused(tmp_path, capsys, monkeypatch):
    from adaptivedrag_core import lora as lora_module

    fast = ["--lora-steps", "2", "--drag-steps", "2", "--work-size", "64", "--ddim-steps", "6", "--no-closs"]
    lora_file = tmp_path / "identity.safetensors"
    assert main(["edit", "--demo", "--out", str(tmp_path / "a.png"), "--lora", str(lora_file), *fast]) == 0
    assert lora_file.is_file()

    def must_not_train(*args, **kwargs):
        raise AssertionError("trained again although --lora names an existing file")

    monkeypatch.setattr(lora_module, "train_identity_lora", must_not_train)
    assert main(["edit", "--demo", "--out", str(tmp_path / "b.png"), "--lora", str(lora_file), *fast]) == 0


def test_auto_mask_without_sam2_warns_and_feeds_mask_and_regions_to_the_optimiser(tmp_path, capsys, monkeypatch):
    from adaptivedrag_core import pipeline as pipeline_module

    seen = {}
    original = pipeline_module.DragPipeline.drag

    def spy(self, inversion, handles, targets, feature_size, settings, mask=None, regions=None, progress=None):
        seen.update(mask=mask, regions=regions, feature_size=feature_size)
        return original(self, inversion, handles, targets, feature_size, settings, mask, regions, progress)

    monkeypatch.setattr(pipeline_module.DragPipeline, "drag", spy)
    fast = ["--lora-steps", "1", "--drag-steps", "2", "--work-size", "64", "--ddim-steps", "6", "--no-closs"]
    code, out = _run(capsys, "edit", "--demo", "--mask", "auto", "--out", tmp_path / "o.png", *fast)
    assert code == 0, out.err
    assert "warning:" in out.err and "colour" in out.err.lower()
    # Both arrive at image resolution, aligned: every masked pixel belongs to a superpixel the mask took whole.
    mask, regions = seen["mask"], seen["regions"]
    assert mask.shape == regions.shape == (256, 256)
    assert 0 < mask.mean() < 0.5
    inside = set(regions[mask].tolist())
    assert all(mask[regions == label].all() for label in inside)


FAST = ["--lora-steps", "1", "--drag-steps", "2", "--work-size", "64", "--ddim-steps", "6", "--no-closs"]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the CLI loads a model: bad input must be found before."""
    from adaptivedrag_core import models

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded although the input is bad")

    monkeypatch.setattr(models, "tiny_sd_components", must_not_load)
    monkeypatch.setattr(models, "load_sd15", must_not_load)


def test_a_phone_photo_is_edited_as_it_is_shown(tmp_path, capsys):
    photo = orientation_6_jpeg(tmp_path / "r.jpg")
    # (90, 120) is inside the picture as a viewer shows it (96x128), outside the stored 128x96 one.
    code, out = _run(capsys, "edit", photo, "--drag", "90,120:80,110", "--demo", "--out", tmp_path / "o.png", *FAST)
    assert code == 0, out.err
    assert Image.open(tmp_path / "o.png").size == (96, 128)


def test_a_16_bit_picture_comes_back_16_bit(tmp_path, capsys):
    ramp16().save(tmp_path / "in16.png")
    code, out = _run(capsys, "edit", tmp_path / "in16.png", "--drag", "10,10:20,12", "--demo", "--out",
                     tmp_path / "o.png", *FAST)
    assert code == 0, out.err
    assert Image.open(tmp_path / "o.png").mode == "I;16"
    preview = np.asarray(Image.open(tmp_path / "o_preview.png").convert("L"))
    assert (preview[:, : preview.shape[1] // 2] == 255).mean() < 0.5  # the original half is not clipped white


@pytest.mark.parametrize("where, message", [("/proc/adaptivedrag-x.png", "cannot write"), ("d.png", "is a folder")])
def test_an_unwritable_output_is_found_before_any_work(tmp_path, picture, capsys, no_model, where, message):
    (tmp_path / "d.png").mkdir()
    lora = tmp_path / "l.safetensors"
    code, out = _run(capsys, "edit", picture, "--drag", "1,1:5,5", "--demo", "--out", tmp_path / where, "--lora",
                     lora, "--force", *FAST)
    assert code == 2 and message in out.err and out.err.count("\n") == 1
    _only(tmp_path, "in.png", "d.png")
    assert list((tmp_path / "d.png").iterdir()) == []


def test_a_lora_path_in_a_missing_folder_is_found_before_any_work(tmp_path, picture, capsys, no_model):
    code, out = _run(capsys, "edit", picture, "--drag", "1,1:5,5", "--demo", "--out", tmp_path / "o.png",
                     "--lora", tmp_path / "no" / "l.safetensors")
    assert code == 2 and "--lora" in out.err and "does not exist" in out.err
    _only(tmp_path, "in.png")


def test_a_cache_folder_that_is_a_file_is_found_before_any_work(tmp_path, picture, capsys, no_model):
    (tmp_path / "cache").write_bytes(b"")
    code, out = _run(capsys, "edit", picture, "--drag", "1,1:5,5", "--demo", "--out", tmp_path / "o.png",
                     "--cache-dir", tmp_path / "cache")
    assert code == 2 and "not a folder" in out.err and out.err.count("\n") == 1
    _only(tmp_path, "in.png", "cache")


@pytest.mark.parametrize("option", [
    ["--guidance-scale", "nan"], ["--guidance-scale", "inf"], ["--closs-weight", "inf"], ["--closs-weight", "-1"],
    ["--closs-weight", "nan"], ["--drag-option", "lr=inf"], ["--drag-option", "lam=inf"],
    ["--drag-option", "nope=1"], ["--drag-option", "max_steps=2.5"], ["--strength", "2"], ["--strength", "nan"],
    ["--ddim-steps", "0"], ["--work-size", "4"], ["--lora-steps", "-3"], ["--seed", "-1"],
])
def test_bad_settings_stop_before_any_model_with_one_line(tmp_path, picture, capsys, no_model, option):
    code, out = _run(capsys, "edit", picture, "--drag", "1,1:5,5", "--demo", "--out", tmp_path / "o.png", *option)
    assert code == 2, out.err
    assert out.err.startswith("error: ") and out.err.count("\n") == 1
    _only(tmp_path, "in.png")


def test_ctrl_c_prints_one_line_and_leaves_no_file(tmp_path, picture, capsys, monkeypatch):
    from adaptivedrag_core import pipeline as pipeline_module

    def pressed_ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline_module.DragPipeline, "edit", pressed_ctrl_c)
    code, out = _run(capsys, "edit", picture, "--drag", "1,1:5,5", "--demo", "--out", tmp_path / "o.png",
                     "--lora", tmp_path / "l.safetensors", *FAST)
    assert code == 130 and out.err == "interrupted\n"
    _only(tmp_path, "in.png")


def test_a_missing_mask_is_named_as_a_mask(tmp_path, picture, capsys, no_model):
    code, out = _run(capsys, "edit", picture, "--drag", "1,1:5,5", "--mask", tmp_path / "m.png", "--demo", "--out",
                     tmp_path / "o.png")
    assert code == 2 and "mask not found" in out.err
    _only(tmp_path, "in.png")


def test_damaged_cache_entries_are_reported_in_one_line_each_and_recomputed(tmp_path, picture, capsys):
    cache = tmp_path / "cache"
    common = ["edit", picture, "--drag", "1,1:5,5", "--demo", "--cache-dir", cache, *FAST]
    assert _run(capsys, *common, "--out", tmp_path / "a.png")[0] == 0
    # Besides the stages' entries, the cache remembers the demo model's file hashes.
    entries = sorted(p for p in cache.iterdir() if p.name.split("-")[0] in ("inversion", "lora"))
    assert [p.name.split("-")[0] for p in entries] == ["inversion", "lora"]
    for entry in entries:
        entry.write_bytes(entry.read_bytes()[:64])
    code, out = _run(capsys, *common, "--out", tmp_path / "b.png")
    assert code == 0, out.err
    warnings = [line for line in out.err.splitlines() if line.startswith("warning: cache entry")]
    assert len(warnings) == 2 and all("computing it again" in line for line in warnings)
    assert "Traceback" not in out.err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


def test_the_cache_key_follows_the_model_files_and_the_tokenizer(tmp_path, picture, capsys, monkeypatch):
    import os

    from adaptivedrag_core import models
    from adaptivedrag_core import pipeline as pipeline_module

    model = tmp_path / "model"
    for part in ("unet", "vae", "text_encoder"):
        (model / part).mkdir(parents=True)
        (model / part / "diffusion_pytorch_model.safetensors").write_bytes(part.encode() * 8)
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "vocab.json").write_text("{}")
    seen = []

    def spy(components, device="cpu", dtype=None, model_id="model", cache_dir=None):
        seen.append(model_id)
        raise InputError("stop here")

    monkeypatch.setattr(models, "load_sd15", lambda *args, **kwargs: None)
    monkeypatch.setattr(pipeline_module, "DragPipeline", spy)

    def run(*extra):
        assert main(["edit", str(picture), "--drag", "1,1:5,5", "--model", str(model), "--out",
                     str(tmp_path / "o.png"), "--cache-dir", str(tmp_path / "cache"), *extra]) == 2

    run()
    run()
    times = model.stat()
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"U" * weights.stat().st_size)  # other weights of the same size
    os.utime(model, ns=(times.st_atime_ns, times.st_mtime_ns))
    run()
    run("--tokenizer", str(tokenizer))
    assert seen[0] == seen[1] and len(set(seen)) == 3
