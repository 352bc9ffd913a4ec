"""DragBench runner end to end on a tiny DragBench-layout folder, its safe pickle reading, and the metrics."""

import argparse
import json
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from adaptivedrag_core import cli_bench
from adaptivedrag_core.bench import dragbench
from adaptivedrag_core.bench.dragbench import Metrics, read_sample, run_dragbench, safe_load_pickle
from adaptivedrag_core.bench.metrics import (
    ALEXNET_CHANNELS,
    AlexLPIPS,
    DiftFeaturizer,
    DiftSettings,
    image_fidelity,
    load_lpips,
    match_distances,
    match_handles,
)
from adaptivedrag_core.errors import InputError
from adaptivedrag_core.models import tiny_sd_components
from adaptivedrag_core.pipeline import DragPipeline, EditSettings, step_budget

SIZE = 48
GOOD = [("animals", "cat"), ("art_work", "painting")]


def _settings(method="dragdiffusion"):
    return EditSettings(method=method, work_size=64, lora_steps=2, num_steps=10,
                        drag_options=step_budget(method, 3))


def _write_sample(root, category, name, points, meta=None, image=True):
    folder = root / category / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(name))
    if image:
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / "original_image.png")
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[8:40, 8:40] = 1
    meta = meta if meta is not None else {"prompt": f"a {name}", "points": points, "mask": mask}
    (folder / "meta_data.pkl").write_bytes(pickle.dumps(meta))
    (folder / "user_drag.png").write_bytes(b"")  # present in DragBench, unused


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.fixture
def bench_dir(tmp_path):
    root = tmp_path / "drag_bench_data"
    _write_sample(root, *GOOD[0], [[10, 12], [20, 14]])
    _write_sample(root, *GOOD[1], [np.array([30, 30]), np.array([25, 20]), [8, 9], [12, 9]])
    _write_sample(root, "other_objects", "evil", None, meta=_Exploit())
    (root / ".DS_Store").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    """A random-weight LPIPS file in the lpips package's whole-model naming (net.sliceK.N, linK.model.1)."""
    from torchvision.models import alexnet

    torch.manual_seed(0)
    features = alexnet(weights=None).features
    slices = {0: 1, 3: 2, 6: 3, 8: 4, 10: 5}
    state = {f"net.slice{slices[int(k.split('.')[0])]}.{k}": v for k, v in features.state_dict().items()}
    state.update({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(ALEXNET_CHANNELS)})
    path = tmp_path_factory.mktemp("lpips") / "lpips_alex.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def metrics(lpips_file):
    dift = DiftFeaturizer(tiny_sd_components(seed=1), settings=DiftSettings(ensemble_size=2))
    return Metrics(dift=dift, lpips=load_lpips(lpips_file))


def _forbid(*_args, **_kwargs):
    raise AssertionError("a finished sample was worked on again")


def test_runs_scores_skips_the_corrupt_sample_and_resumes(bench_dir, tmp_path, tiny, metrics, monkeypatch, caplog):
    out = tmp_path / "results"
    lines = []
    with caplog.at_level(logging.WARNING, logger=dragbench.__name__):
        first = run_dragbench(bench_dir, out, tiny, _settings(), metrics, model_id="tiny", limit=1, log=lines.append)
    assert first.edited == ["animals/cat"] and not first.skipped and len(lines) == 1

    edits = []
    original_edit = DragPipeline.edit
    monkeypatch.setattr(DragPipeline, "edit", lambda self, *a, **k: edits.append(1) or original_edit(self, *a, **k))
    with caplog.at_level(logging.WARNING, logger=dragbench.__name__):
        second = run_dragbench(bench_dir, out, tiny, _settings(), metrics, model_id="tiny", log=lines.append)
    assert second.already_done == ["animals/cat"] and second.edited == ["art_work/painting"] and len(edits) == 1
    assert list(second.skipped) == ["other_objects/evil"]
    assert "refusing to load" in second.skipped["other_objects/evil"]
    assert any("other_objects/evil" in record.getMessage() for record in caplog.records)

    for category, name in GOOD:
        with Image.open(out / category / f"{name}.png") as edited:
            assert edited.size == (SIZE, SIZE)
        record = json.loads((out / category / f"{name}.json").read_text())
        assert record["drag_steps"] >= 1 and record["metrics"]["if"] < 1  # random LPIPS weights: any scale
        assert len(record["metrics"]["md_terms"]) == len(record["points"]["pairs"])
    summary = json.loads((out / "summary.json").read_text())
    terms = [t for c, n in GOOD for t in json.loads((out / c / f"{n}.json").read_text())["metrics"]["md_terms"]]
    assert summary["samples_done"] == 2 and summary["points_scored"] == 3 == len(terms)
    assert summary["md"] == pytest.approx(np.mean(terms))
    assert summary["skipped"] == second.skipped and summary["notes"] == []

    # Everything is done: a third run edits and scores nothing.
    monkeypatch.setattr(DragPipeline, "edit", _forbid)
    monkeypatch.setattr(Metrics, "measure", _forbid)
    third = run_dragbench(bench_dir, out, tiny, _settings(), metrics, model_id="tiny", log=lines.append)
    assert third.already_done == [f"{c}/{n}" for c, n in GOOD] and not third.edited and not third.rescored


def test_missing_metric_models_are_noted_and_added_later_without_editing(bench_dir, tmp_path, tiny, metrics,
                                                                         monkeypatch):
    out = tmp_path / "results"
    report = run_dragbench(bench_dir, out, tiny, _settings(), model_id="tiny", limit=1, log=lambda line: None)
    assert report.summary["md"] is None and report.summary["if"] is None
    assert any("--dift-model" in note for note in report.summary["notes"])
    assert any("--lpips-weights" in note for note in report.summary["notes"])
    monkeypatch.setattr(DragPipeline, "edit", _forbid)
    again = run_dragbench(bench_dir, out, tiny, _settings(), Metrics(lpips=metrics.lpips), model_id="tiny",
                          limit=1, log=lambda line: None)
    assert again.rescored == ["animals/cat"] and again.summary["if"] is not None and again.summary["md"] is None


def test_resuming_with_other_settings_is_refused(bench_dir, tmp_path, tiny):
    out = tmp_path / "results"
    run_dragbench(bench_dir, out, tiny, _settings(), model_id="tiny", limit=1, log=lambda line: None)
    with pytest.raises(InputError, match="other settings"):
        run_dragbench(bench_dir, out, tiny, _settings("freedrag"), model_id="tiny", limit=1, log=lambda line: None)


def test_cli_runs_a_quick_subset(bench_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli_bench.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli"
    args = parser.parse_args(["bench", "dragbench", str(bench_dir), "--model", "tiny-random", "--method", "adaptive",
                              "--out", str(out), "--limit", "1", "--work-size", "64", "--lora-steps", "2",
                              "--ddim-steps", "10", "--drag-steps", "3"])
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    assert "edited 1" in printed and "MD None" in printed and "Lab colour" in printed
    assert (out / "animals" / "cat.png").is_file() and (out / "summary.json").is_file()


@pytest.mark.parametrize("method, mask_source, mask_kind, with_regions", [
    ("adaptive", None, "auto", True),             # the paper's AdaptiveDrag is mask-free
    ("adaptive", "dragbench", "dragbench", True),
    ("adaptive", "none", None, False),
    ("dragdiffusion", None, "dragbench", False),
])
def test_mask_source_defaults_to_the_auto_mask_for_adaptive(bench_dir, tmp_path, tiny, monkeypatch, method,
                                                          mask_source, mask_kind, with_regions):
    seen = {}
    monkeypatch.setattr(DragPipeline, "edit", lambda self, image, points, settings, mask=None, regions=None:
                        seen.update(mask=mask, regions=regions, settings=settings) or _forbid())
    with pytest.raises(AssertionError):
        run_dragbench(bench_dir, tmp_path / "out", tiny, _settings(method), model_id="tiny", limit=1,
                      mask_source=mask_source, log=lambda line: None)
    sample = read_sample(bench_dir, *GOOD[0])
    assert seen["settings"].use_auto_mask is False   # the runner decides, the pipeline adds nothing
    if mask_kind is None:
        assert seen["mask"] is None
    elif mask_kind == "dragbench":
        assert np.array_equal(seen["mask"], sample.mask)
    else:
        assert seen["mask"].shape == sample.mask.shape and not np.array_equal(seen["mask"], sample.mask)
    assert (seen["regions"] is not None) == with_regions


@pytest.mark.parametrize("points, message", [
    ([[10, 12], [20, 14], [5, 5]], "handle and target alternating"),
    ([[10, 12], [60, 14]], "outside"),
    ([[10, 12], ["a", 14]], "not numbers"),
])
def test_unusable_points_name_the_problem(tmp_path, points, message):
    _write_sample(tmp_path, "c", "s", points)
    with pytest.raises(InputError, match=message):
        read_sample(tmp_path, "c", "s")


def test_unreadable_image_and_wrong_mask_are_reported(tmp_path):
    _write_sample(tmp_path, "c", "no_image", [[1, 1], [2, 2]], image=False)
    with pytest.raises(InputError, match="original_image.png"):
        read_sample(tmp_path, "c", "no_image")
    _write_sample(tmp_path, "c", "bad_mask", None, meta={"prompt": "", "points": [[1, 1], [2, 2]],
                                                          "mask": np.zeros((3, 3), np.uint8)})
    with pytest.raises(InputError, match="mask"):
        read_sample(tmp_path, "c", "bad_mask")


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_safe_unpickler_reads_numpy_data_and_refuses_code(tmp_path, protocol):
    data = {"prompt": "p", "points": [np.array([1, 2]), [np.int64(3), 4]], "mask": np.eye(3, dtype=np.uint8)}
    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = safe_load_pickle(path)
    assert np.array_equal(loaded["mask"], data["mask"]) and int(loaded["points"][1][0]) == 3
    path.write_bytes(pickle.dumps(_Exploit(), protocol=protocol))
    with pytest.raises(InputError, match="refusing"):
        safe_load_pickle(path)


def test_match_handles_finds_a_shifted_feature():
    generator = torch.Generator().manual_seed(0)
    source = torch.randn(1, 16, 12, 12, generator=generator)
    edited = torch.roll(source, shifts=(2, 3), dims=(2, 3))  # content moved 3 right, 2 down (feature pixels)
    # Upsampled 2x to 24x24 the move is 6 right and 4 down, and interpolation commutes with the shift.
    assert match_handles(source, edited, [(8, 10), (3.2, 5.9)], (24, 24)) == [(14, 14), (9, 10)]
    assert match_distances([(0, 0), (3, 4)], [(0, 0), (0, 0)]) == [0.0, 5.0]


def test_lpips_is_zero_for_identical_images_and_weights_are_checked(lpips_file, tmp_path):
    lpips = load_lpips(lpips_file)
    rng = np.random.default_rng(0)
    first = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    second = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    assert image_fidelity(lpips, first, first) == pytest.approx(1.0)
    assert image_fidelity(lpips, first, second) < 1.0
    partial = {k: v for k, v in torch.load(lpips_file).items() if not k.startswith("lin4")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(InputError, match="lin"):
        load_lpips(tmp_path / "partial.pth")
    assert isinstance(lpips, AlexLPIPS)


def test_dift_model_loads_offline_from_a_diffusers_folder(tmp_path):
    from diffusers import DDIMScheduler

    from adaptivedrag_core.bench.metrics import load_dift_components

    tiny = tiny_sd_components(seed=1)
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        getattr(tiny, name).save_pretrained(tmp_path / name)
    config = {**tiny.scheduler_config, "skip_prk_steps": True}  # SD folders carry settings DDIM does not know
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    loaded = load_dift_components(tmp_path)
    assert loaded.latent_scale == tiny.vae.config.scaling_factor
    assert isinstance(loaded.make_scheduler(), DDIMScheduler)
    image = Image.new("RGB", (32, 32), (120, 30, 200))
    features = DiftFeaturizer(loaded, settings=DiftSettings(ensemble_size=1)).features(image, "a cat")
    assert features.shape[:2] == (1, tiny.unet.config.block_out_channels[-2])
    with pytest.raises(InputError, match="no unet/ folder"):
        load_dift_components(tmp_path / "unet")
