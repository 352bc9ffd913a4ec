"""``bench scenes``: records per (case, variant), resume, summary, on a tiny scene model trained in seconds."""

import json

import pytest

from adaptivedrag_core.bench import scenes as bench_scenes
from adaptivedrag_core.bench.scenes import NO_EDIT, SceneBenchConfig, run_scene_bench, summary_table
from adaptivedrag_core.errors import InputError
from adaptivedrag_core.scene_model import load_scene_model
from adaptivedrag_core.scene_training import train_scene_model
from test_scene_training import TINY_PLAN

QUICK = dict(cases=2, lora_steps=1, drag_steps=2, num_steps=4,
             variants=["dragdiffusion + user mask", "adaptive + auto mask + CLoss"])


@pytest.fixture(scope="module")
def scene_model(tmp_path_factory):
    folder = train_scene_model(tmp_path_factory.mktemp("model"), TINY_PLAN, progress_factory=lambda name: None,
                               log=lambda line: None)
    return load_scene_model(folder)


def _records(folder):
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def test_every_case_and_variant_is_scored_once_and_a_rerun_resumes(scene_model, tmp_path, monkeypatch):
    summary = run_scene_bench(SceneBenchConfig(**QUICK), scene_model, tmp_path, log=lambda line: None)
    records = _records(tmp_path)
    assert sorted((r["case"], r["variant"]) for r in records) == sorted(
        (case, variant) for case in range(2) for variant in [NO_EDIT] + QUICK["variants"])
    edited = [r for r in records if r["variant"] != NO_EDIT]
    assert all(r["timings"]["drag"] > 0 and r["peak_memory_bytes"] > 0 for r in edited)
    assert all(0 <= r["iou"] <= 1 and r["md"] >= 0 for r in records)
    assert [row["variant"] for row in summary["rows"]] == [NO_EDIT] + QUICK["variants"]
    table = summary_table(summary)
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
