"""The scene generator, the drag cases and the scores of ``bench scenes``."""

import numpy as np
import pytest

from adaptivedrag_core.bench.scene_metrics import footprint_iou, locate, score_case
from adaptivedrag_core.bench.scenes import user_mask
from adaptivedrag_core import scenes
from adaptivedrag_core.scenes import CASE_KINDS, make_cases, random_scene, scene_set


def test_scenes_are_reproducible_and_varied():
    first = random_scene(np.random.default_rng(3), 128).render().image
    again = random_scene(np.random.default_rng(3), 128).render().image
    other = random_scene(np.random.default_rng(4), 128).render().image
    assert first.shape == (128, 128, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert np.abs(first.astype(int) - other).mean() > 10


def test_rendering_in_several_processes_gives_the_same_scenes_in_order(monkeypatch):
    monkeypatch.setattr(scenes, "_RENDER_CHUNK", 4)  # 10 scenes in chunks of 4, 4 and 2
    calls = []
    parallel, parallel_captions = scene_set(3, 10, 64, workers=2, progress=lambda done, total: calls.append(done))
    alone, captions = scene_set(3, 10, 64)
    rng = np.random.default_rng(3)
    first = random_scene(rng, 64)
    assert np.array_equal(parallel, alone) and parallel_captions == captions
    assert np.array_equal(alone[0], first.render().image) and captions[0] == first.caption()
    assert not np.array_equal(alone[1], alone[0])
    assert calls == [4, 8, 10]


def test_visible_masks_respect_occlusion():
    scene = random_scene(np.random.default_rng(7), 128, min_objects=6, max_objects=7)
    rendered = scene.render()
    covered = np.zeros((128, 128), bool)
    for index in reversed(range(len(scene.objects))):
        assert not (rendered.visible[index] & covered).any()  # nothing in front shows through
        assert (rendered.visible[index] <= rendered.footprint(index)).all()
        covered |= rendered.footprint(index)


def test_cases_cover_every_kind_and_are_reproducible():
    cases = make_cases(8, seed=11)
    assert [case.kind for case in cases] == list(CASE_KINDS) * 2
    again = make_cases(8, seed=11)
    assert [c.handles for c in cases] == [c.handles for c in again]
    several = [c for c in cases if c.kind == "several"]
    assert all(len(c.moved) >= 2 for c in several)
    for case in cases:
        lengths = case.drag_lengths()
        assert all(length > 5 for length in lengths)
        case.points()  # valid DragPoints: inside the image, handle != target
    long_lengths = [max(c.drag_lengths()) for c in cases if c.kind == "long"]
    short_lengths = [max(c.drag_lengths()) for c in cases if c.kind == "short"]
    assert min(long_lengths) > max(short_lengths)


def test_look_alike_has_the_moved_objects_kind_and_colour():
    case = next(c for c in make_cases(8, seed=5) if c.kind == "lookalike")
    moved = case.scene.objects[case.moved[0]]
    twin = case.scene.objects[case.distractor]
    assert (twin.kind, twin.colour, twin.size) == (moved.kind, moved.colour, moved.size)
    assert (twin.x, twin.y) != (moved.x, moved.y)


def test_ground_truth_moves_only_the_dragged_object():
    case = make_cases(1, seed=2)[0]
    before, after = case.scene.render(), case.ground_truth().render()
    index = case.moved[0]
    (dx, dy), = case.moves.values()
    ys, xs = np.nonzero(before.footprint(index))
    ys2, xs2 = np.nonzero(after.footprint(index))
    assert xs2.mean() - xs.mean() == pytest.approx(dx, abs=0.6)
    assert ys2.mean() - ys.mean() == pytest.approx(dy, abs=0.6)
    changed = np.abs(before.image.astype(int) - after.image).sum(-1) > 0
    assert not (changed & ~(before.footprint(index) | after.footprint(index)) & ~_edge(case)).any()


def _edge(case):
    return user_mask(case, margin=2)  # anti-aliased corners reach one pixel diagonally


def test_perfect_edit_scores_perfectly_and_no_edit_scores_the_drag_length():
    for case in make_cases(4, seed=9):
        truth = case.ground_truth().render().image
        perfect = score_case(case, truth)
        assert perfect.md < 0.75
        assert perfect.iou > 0.9
        assert perfect.gt_psnr == 99.0
        unchanged = score_case(case, case.scene.render().image)
        assert unchanged.md == pytest.approx(np.mean(case.drag_lengths()), rel=0.1, abs=1.0)
        assert unchanged.outside_psnr == 99.0
        assert unchanged.iou < perfect.iou


def test_locate_finds_a_known_shift():
    case = make_cases(1, seed=4)[0]
    before = case.scene.render()
    index = case.moved[0]
    shifted = case.scene.with_moves({index: (7.0, -3.0)}).render().image.astype(np.float32)
    dx, dy = locate(shifted, before.image.astype(np.float32), before.visible[index])
    assert (dx, dy) == (pytest.approx(7.0, abs=0.5), pytest.approx(-3.0, abs=0.5))


def test_iou_drops_when_the_object_is_smeared():
    case = make_cases(1, seed=6)[0]
    after = case.ground_truth().render()
    index = case.moved[0]
    sharp = footprint_iou(case, index, after.image.astype(np.float32), after)
    from scipy.ndimage import uniform_filter

    blurred = uniform_filter(after.image.astype(np.float32), size=(9, 9, 1))
    assert footprint_iou(case, index, blurred, after) < sharp - 0.1
