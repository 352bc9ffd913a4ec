"""``bench scenes``: records per (case, variant), resume, summary, on a tiny scene model trained in seconds."""

import json

import pytest
from PIL import Image

from adaptivedrag_core.bench import scenes as bench_scenes
from adaptivedrag_core.bench.scenes import (NO_EDIT, SceneBenchConfig, run_scene_bench, summarise, summary_table,
                                            tracked_ratio)
from adaptivedrag_core.cli import main
from adaptivedrag_core.errors import InputError
from adaptivedrag_core.scene_model import load_scene_model
from adaptivedrag_core.scene_training import train_scene_model
from adaptivedrag_core.scenes import make_cases
from test_scene_training import TINY_PLAN

QUICK = dict(cases=2, lora_steps=1, drag_steps=2, num_steps=4,
             variants=["dragdiffusion + user mask", "adaptive + auto mask + CLoss"])


@pytest.fixture(scope="module")
def scene_model_folder(tmp_path_factory):
    return train_scene_model(tmp_path_factory.mktemp("model"), TINY_PLAN, progress_factory=lambda name: None,
                             log=lambda line: None)


@pytest.fixture(scope="module")
def scene_model(scene_model_folder):
    return load_scene_model(scene_model_folder)


def _records(folder):
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def test_every_case_and_variant_is_scored_once_and_a_rerun_resumes(scene_model, tmp_path, monkeypatch):
    summary = run_scene_bench(SceneBenchConfig(**QUICK), scene_model, tmp_path, log=lambda line: None)
    records = _records(tmp_path)
    cases = make_cases(2, SceneBenchConfig().seed, scene_model.native_size)
    assert sorted((r["case"], r["variant"]) for r in records) == sorted(
        (case, variant) for case in range(2) for variant in [NO_EDIT] + QUICK["variants"])
    edited = [r for r in records if r["variant"] != NO_EDIT]
    assert all(r["timings"]["drag"] > 0 and r["peak_memory_bytes"] > 0 for r in edited)
    assert all(0 <= r["iou"] <= 1 and r["md"] >= 0 for r in records)
    for r in edited:  # where the optimiser left its handles, beside where the picture has the object
        assert len(r["final_handles"]) == len(r["found"])
        assert r["tracked_ratio"] == pytest.approx(tracked_ratio(cases[r["case"]], r["final_handles"]))
    assert [row["variant"] for row in summary["rows"]] == [NO_EDIT] + QUICK["variants"]
    table = summary_table(summary)
    no_edit_row = table.splitlines()[2].split(" | ")
    assert no_edit_row[0] == "| " + NO_EDIT and no_edit_row[3] == "–"  # nothing was tracked
    assert table.count("\n") == 2 + 3 - 1 and "adaptive + auto mask + CLoss" in table
    assert (tmp_path / "summary.md").read_text().strip() == table

    def must_not_edit(*args, **kwargs):
        raise AssertionError("edited again although every result is in results.jsonl")

    monkeypatch.setattr(bench_scenes.DragPipeline, "edit", must_not_edit)
    run_scene_bench(SceneBenchConfig(**QUICK), scene_model, tmp_path, log=lambda line: None)
    assert len(_records(tmp_path)) == len(records)


def test_an_interrupted_run_finishes_only_what_is_missing(scene_model, tmp_path, monkeypatch):
    calls = []
    original = bench_scenes.DragPipeline.edit

    def edit_then_stop(self, *args, **kwargs):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(bench_scenes.DragPipeline, "edit", edit_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_scene_bench(SceneBenchConfig(**QUICK), scene_model, tmp_path, log=lambda line: None)
    assert len([r for r in _records(tmp_path) if r["variant"] != NO_EDIT]) == 1
    monkeypatch.setattr(bench_scenes.DragPipeline, "edit", original)
    run_scene_bench(SceneBenchConfig(**QUICK), scene_model, tmp_path, log=lambda line: None)
    edited = [r for r in _records(tmp_path) if r["variant"] != NO_EDIT]
    assert len(edited) == 4 and len({(r["case"], r["variant"]) for r in edited}) == 4


def test_results_of_other_settings_are_not_mixed(scene_model, tmp_path):
    run_scene_bench(SceneBenchConfig(**{**QUICK, "cases": 1}), scene_model, tmp_path, log=lambda line: None)
    with pytest.raises(InputError, match="other settings"):
        run_scene_bench(SceneBenchConfig(**{**QUICK, "cases": 1, "drag_steps": 3}), scene_model, tmp_path)


def test_unknown_variant_names_the_valid_ones():
    with pytest.raises(InputError, match="dragdiffusion \\+ user mask"):
        SceneBenchConfig(variants=["nope"]).chosen_variants()


def test_the_closs_kind_reaches_the_closs_variants_and_keeps_folders_apart(scene_model, tmp_path):
    variant = next(v for v in bench_scenes.VARIANTS if v.name == "adaptive + auto mask + CLoss")
    assert SceneBenchConfig(closs_kind="contrastive").settings(variant, 128).closs_settings().kind == "contrastive"
    assert "closs_kind" not in SceneBenchConfig().identity()  # folders from before the option still resume
    run_scene_bench(SceneBenchConfig(**{**QUICK, "cases": 1}), scene_model, tmp_path, log=lambda line: None)
    with pytest.raises(InputError, match="other settings"):
        run_scene_bench(SceneBenchConfig(**{**QUICK, "cases": 1, "closs_kind": "contrastive"}), scene_model, tmp_path)


def test_the_tracked_ratio_is_the_handles_distance_to_its_target_per_drag_length():
    case = make_cases(4, SceneBenchConfig().seed, 128)[2]  # "several": more than one pair
    assert len(case.handles) > 1
    assert tracked_ratio(case, case.targets) == pytest.approx(0.0)
    assert tracked_ratio(case, case.handles) == pytest.approx(1.0)
    halfway = [((hx + tx) / 2, (hy + ty) / 2) for (hx, hy), (tx, ty) in zip(case.handles, case.targets)]
    assert tracked_ratio(case, halfway) == pytest.approx(0.5)


def test_bench_scene_model_reports_every_figure_and_draws_its_samples(scene_model_folder, tmp_path, capsys):
    report_file, grid_file = tmp_path / "report.json", tmp_path / "samples.png"
    assert main(["bench", "scene-model", "--model", str(scene_model_folder), "--scenes", "2", "--round-trips", "1",
                 "--tracking-cases", "1", "--transplant-cases", "2", "--grid", str(grid_file),
                 "--transplant-grid", str(tmp_path / "transplant.png"), "--out", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    assert report["scenes"] == 2 and report["round_trips"] == 1 and report["transplant_cases"] == 2
    assert set(report["tracking_error"]) == {"0.7", "0.5", "0.3"}
    assert set(report["latent_transplant"]) == {"0.7", "0.5"}
    for figures in report["latent_transplant"].values():
        assert figures["drags"] >= 2 and 0 <= figures["halfway_kept"] <= figures["drags"]
        assert 0 <= figures["iou_mean"] <= 1 and figures["md_per_drag_median"] >= 0
    assert Image.open(grid_file).size == (8 * 64, 2 * 64)
    assert Image.open(tmp_path / "transplant.png").size == (4 * 64, 2 * 64)  # a row per case
    assert "half-way, the object is drawn at its start or its target in" in capsys.readouterr().err


def test_bench_scene_model_refuses_a_negative_count(capsys):
    assert main(["bench", "scene-model", "--transplant-cases", "-1"]) == 2
    assert "--transplant-cases must be 0 or more" in capsys.readouterr().err


def test_the_time_of_an_edit_counts_the_stages_its_case_shares_once_each():
    def record(variant, inversion, reference, drag, mask_seconds=0.0):
        return {"case": 0, "kind": "short", "variant": variant, "drag_length": 10.0, "md": 5.0, "iou": 0.5,
                "outside_psnr": 30.0, "outside_mae": 2.0, "gt_psnr": 25.0, "peak_memory_bytes": 2**20,
                "mask_seconds": mask_seconds, "timings": {"inversion": inversion, "reference": reference,
                                                          "drag": drag, "sampling": 1.0, "decode": 0.1}}

    records = [record("a", 10.0, 1.0, 2.0, mask_seconds=0.5),  # computed the shared stages
               record("b", 0.001, 0.0, 3.0),  # reused them
               record("c", 9.0, 0.9, 4.0)]  # computed them again after a resume: counted once, as the longest
    rows = {row["variant"]: row for row in summarise(records, ["a", "b", "c"], cases=1)["rows"]}
    assert rows["a"]["edit_s"] == pytest.approx(10 + 1 + 2 + 1 + 0.1 + 0.5)
    assert rows["b"]["edit_s"] == pytest.approx(10 + 1 + 3 + 1 + 0.1)
    assert rows["c"]["edit_s"] == pytest.approx(10 + 1 + 4 + 1 + 0.1)
    assert rows["b"]["drag_s"] == 3.0 and rows["b"]["peak_memory_mib"] == 1
