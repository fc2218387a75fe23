"""X-TARGET-GPU parsing and least-loaded placement (comfy_multigpu.routing): pure, table-driven."""
import pytest

from comfy_multigpu.routing import TargetError, WorkerLoad, choose_least_loaded, parse_target


@pytest.mark.parametrize("raw, expected", [
    (None, None), ("", None), ("auto", None), ("AUTO", None), (" auto ", None),
    ("0", 0), ("1", 1), (" 3 ", 3),
])
def test_valid_targets(raw, expected):
    assert parse_target(raw, 4) == expected


@pytest.mark.parametrize("raw, fragment", [
    ("4", "out of range"), ("99", "out of range"), ("-1", "not a GPU index"), ("1.0", "not a GPU index"),
    ("one", "not a GPU index"), ("0x1", "not a GPU index"), ("١", "not a GPU index"),
    ("1,2", "not a GPU index"),
])
def test_invalid_targets_name_the_value_and_the_valid_ones(raw, fragment):
    with pytest.raises(TargetError, match=fragment) as info:
        parse_target(raw, 4)
    body = info.value.as_json()
    assert body["error"]["extra_info"]["value"] == raw
    assert body["error"]["extra_info"]["valid"] == ["auto", 0, 1, 2, 3]
    assert raw in body["error"]["message"]


def test_a_down_gpu_is_refused_and_left_out_of_the_valid_list():
    with pytest.raises(TargetError, match="down") as info:
        parse_target("2", 4, frozenset({2}))
    assert info.value.valid == ["auto", 0, 1, 3]


@pytest.mark.parametrize("loads, expected", [
    ([(0, True, 1, 0), (1, True, 0, 0)], 1),
    ([(0, True, 0, 0), (1, True, 0, 0)], 0),                  # ties: lowest index
    ([(0, True, 1, 3), (1, True, 1, 1), (2, True, 1, 2)], 1),
    ([(0, False, 0, 0), (1, True, 5, 5)], 1),                 # down workers are never chosen
    ([(0, False, 0, 0), (1, False, 0, 0)], None),
])
def test_least_loaded_choice(loads, expected):
    assert choose_least_loaded([WorkerLoad(*w) for w in loads]) == expected
