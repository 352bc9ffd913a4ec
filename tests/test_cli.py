"""The CLI: every bad-input path exits 2 with one line and writes nothing; the demo runs end to end."""

import numpy as np
import pytest
from PIL import Image

from adaptivedrag_core.cli import main


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
    assert "noise, not an edit" in out.out
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


def _spy_on_the_drag(monkeypatch) -> dict:
    from adaptivedrag_core import pipeline as pipeline_module

    seen = {}
    original = pipeline_module.DragPipeline.drag

    def spy(self, inversion, handles, targets, feature_size, settings, mask=None, regions=None, progress=None):
        seen.update(mask=mask, regions=regions, feature_size=feature_size)
        return original(self, inversion, handles, targets, feature_size, settings, mask, regions, progress)

    monkeypatch.setattr(pipeline_module.DragPipeline, "drag", spy)
    return seen


@pytest.mark.parametrize("mask_option", [[], ["--mask", "auto"]], ids=["adaptive default", "--mask auto"])
def test_auto_mask_without_sam2_warns_and_feeds_mask_and_regions_to_the_optimiser(tmp_path, capsys, monkeypatch,
                                                                                  mask_option):
    seen = _spy_on_the_drag(monkeypatch)
    fast = ["--lora-steps", "1", "--drag-steps", "2", "--work-size", "64", "--ddim-steps", "6", "--no-closs"]
    code, out = _run(capsys, "edit", "--demo", *mask_option, "--out", tmp_path / "o.png", *fast)
    assert code == 0, out.err
    assert "warning:" in out.err and "colour" in out.err.lower()
    # Both arrive at image resolution, aligned: every masked pixel belongs to a superpixel the mask took whole.
    mask, regions = seen["mask"], seen["regions"]
    assert mask.shape == regions.shape == (256, 256)
    assert 0 < mask.mean() < 0.5
    inside = set(regions[mask].tolist())
    assert all(mask[regions == label].all() for label in inside)


@pytest.mark.parametrize("method", ["adaptive", "dragdiffusion"])
def test_mask_none_and_the_other_methods_default_run_without_mask_or_regions(tmp_path, capsys, monkeypatch, method):
    seen = _spy_on_the_drag(monkeypatch)
    fast = ["--lora-steps", "1", "--drag-steps", "2", "--work-size", "64", "--ddim-steps", "6", "--no-closs"]
    mask_option = ["--mask", "none"] if method == "adaptive" else []
    code, out = _run(capsys, "edit", "--demo", "--method", method, *mask_option, "--out", tmp_path / "o.png", *fast)
    assert code == 0, out.err
    assert seen["mask"] is None and seen["regions"] is None and "warning:" not in out.err
