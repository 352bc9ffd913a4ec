import json

import pytest

from adaptivedrag_core.points import DragPoints, PointsError


def test_cli_pairs_parse_to_handles_and_targets():
    points = DragPoints.from_pairs(["10,20:30,40", "1.5,2:3,4.25"], 64, 48)
    assert points.handles == ((10.0, 20.0), (1.5, 2.0))
    assert points.targets == ((30.0, 40.0), (3.0, 4.25))
    assert len(points) == 2


@pytest.mark.parametrize(
    "pairs, message",
    [
        (["10,20:30"], "4 numbers"),
        (["10,20,30,40,50"], "4 numbers"),
        (["a,b:c,d"], "must be numbers"),
        ([], "no drag pairs"),
        (["10,20:10,20"], "same point"),
        (["10,20:64,40"], "outside the 64x48 image"),
        (["-1,20:10,40"], "outside"),
        (["nan,20:10,40"], "not a finite number"),
    ],
)
def test_bad_cli_pairs_name_the_problem(pairs, message):
    with pytest.raises(PointsError, match=message):
        DragPoints.from_pairs(pairs, 64, 48)


def test_json_round_trip():
    points = DragPoints.from_pairs(["10,20:30,40", "5,6:7,8"], 64, 48)
    again = DragPoints.from_json(points.to_json())
    assert again == points
    assert json.loads(points.to_json())["pairs"][1] == {"handle": [5.0, 6.0], "target": [7.0, 8.0]}


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ("[]", "must be an object"),
        ('{"version": 2, "width": 4, "height": 4, "pairs": []}', "unsupported"),
        ('{"version": 1, "width": "4", "height": 4, "pairs": []}', "integer width"),
        ('{"version": 1, "width": 4, "height": 4, "pairs": {}}', "list of pairs"),
        ('{"version": 1, "width": 4, "height": 4, "pairs": [{"handle": [1, 1]}]}', "target must be"),
        ('{"version": 1, "width": 4, "height": 4, "pairs": [{"handle": [1, true], "target": [2, 2]}]}', "handle"),
        ('{"version": 1, "width": 4, "height": 4, "pairs": []}', "no drag pairs"),
    ],
)
def test_bad_json_names_the_problem(text, message):
    with pytest.raises(PointsError, match=message):
        DragPoints.from_json(text)


def test_lengths_must_match():
    with pytest.raises(PointsError, match="2 handles but 1 targets"):
        DragPoints(((1, 1), (2, 2)), ((3, 3),), 8, 8)


def test_flat_coordinates_need_whole_pairs():
    with pytest.raises(PointsError, match="6 coordinates"):
        DragPoints.from_flat([1, 2, 3, 4, 5, 6], 8, 8)
    assert DragPoints.from_flat([1, 2, 3, 4], 8, 8).targets == ((3.0, 4.0),)


def test_size_check_and_rescale():
    points = DragPoints.from_pairs(["0,0:63,47"], 64, 48)
    with pytest.raises(PointsError, match="image is 128x96 but points were placed on 64x48"):
        points.check_image_size(128, 96)
    doubled = points.rescaled(128, 96)
    # Pixel centres scale: pixel 0 covers [0, 1) -> [0, 2), centre 0.5 -> 1.0, i.e. pixel coordinate 0.5.
    assert doubled.handles[0] == (0.5, 0.5)
    assert doubled.targets[0] == (126.5, 94.5)


def test_grid_mapping_is_pixel_centre_aligned():
    points = DragPoints.from_pairs(["255.5,127.5:0,0"], 512, 256)
    handles, targets = points.to_grid(64, 32)
    assert handles[0] == (31.5, 15.5)
    assert targets[0] == (0.0, 0.0)


@pytest.mark.parametrize("text, message", [
    ("[" * 50_000 + "]" * 50_000, "nested too deeply"),
    ('{"version": 1, "width": 4, "height": 4, "pairs": [{"handle": [1' + "0" * 400 + ', 1], "target": [2, 2]}]}',
     "handle"),
    ('{"version": 1, "width": 1' + "0" * 5000 + ', "height": 4, "pairs": []}', "drag points"),
    ('{"version": 1, "width": 4, "height": 4, "pairs": [], "pad": "' + "x" * 100_000 + '"}', "too long"),
    ('{"version": 1, "width": 65537, "height": 4, "pairs": [{"handle": [1, 1], "target": [2, 2]}]}', "65536"),
])
def test_hostile_json_raises_only_points_error(text, message):
    with pytest.raises(PointsError, match=message):
        DragPoints.from_json(text)


def test_pairs_are_capped_like_the_widget():
    with pytest.raises(PointsError, match="too many drag pairs: 257"):
        DragPoints.from_pairs(["1,1:2,2"] * 257, 64, 48)
    assert len(DragPoints.from_pairs(["1,1:2,2"] * 256, 64, 48)) == 256
    with pytest.raises(PointsError, match="at most 65536"):
        DragPoints.from_pairs(["1,1:2,2"], 70_000, 48)


def test_huge_numbers_in_any_form_are_a_points_error():
    with pytest.raises(PointsError):
        DragPoints.from_flat([10**400, 1, 2, 2], 64, 48)
    with pytest.raises(PointsError):
        DragPoints.from_pairs(["1" * 5000 + ",1:2,2"], 64, 48)


def test_python_caps_match_the_widget():
    from pathlib import Path

    from adaptivedrag_core import points

    widget = (Path(__file__).resolve().parents[1] / "web" / "points_model.js").read_text(encoding="utf-8")
    for name, value in (("maxTextLength", points.MAX_TEXT_LENGTH), ("maxPairs", points.MAX_PAIRS),
                        ("maxSide", points.MAX_SIDE), ("maxDepth", points.MAX_DEPTH)):
        assert f"{name}: {value:_}," in widget or f"{name}: {value}," in widget, name
