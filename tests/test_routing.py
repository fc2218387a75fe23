"""Request routing rules (comfy_multigpu.policy.routing): X-TARGET-GPU, X-GPU-POOL, X-PRIORITY and their
extra_data twins, read into where a prompt may run; pure, table-driven."""
import pytest

from comfy_multigpu.policy.routing import RequestError, TargetError, parse_target, resolve


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



POOLS = {"fast": (0, 1), "slow": (2, 3), "vip": (3,), "all": (0, 1, 2, 3)}


@pytest.mark.parametrize("target, headers, extra, default, expected", [
    (None, {}, {}, None, (None, None, None, None)),
    (None, {"X-GPU-POOL": "fast"}, {}, None, (None, "fast", {0, 1}, None)),
    (None, {"X-GPU-POOL": " FAST "}, {}, None, (None, "fast", {0, 1}, None)),          # case and spaces
    (None, {}, {"gpu_pool": "slow"}, None, (None, "slow", {2, 3}, None)),
    (None, {"X-GPU-POOL": "vip"}, {"gpu_pool": "VIP"}, None, (None, "vip", {3}, None)),  # agreeing twins
    (3, {"X-GPU-POOL": "slow"}, {}, None, (3, "slow", {2, 3}, None)),                  # pin inside its pool
    (None, {}, {}, "fast", (None, "fast", {0, 1}, None)),                              # default pool
    (2, {}, {}, "fast", (2, None, None, None)),                                        # pin beats default
    (None, {"X-GPU-POOL": "all"}, {}, "fast", (None, "all", {0, 1, 2, 3}, None)),
    (None, {"X-PRIORITY": "High"}, {}, None, (None, None, None, "high")),
    (None, {}, {"priority": "low"}, None, (None, None, None, "low")),
    (None, {"X-GPU-POOL": ""}, {}, None, (None, None, None, None)),                    # empty = absent
    (None, {}, "not a dict", None, (None, None, None, None)),                          # stock's problem
])
def test_requests_resolve_to_a_gpu_pool_and_priority(target, headers, extra, default, expected):
    r = resolve(target, headers, extra, POOLS, default)
    assert (r.target, r.pool, set(r.eligible) if r.eligible is not None else None, r.priority) == expected


@pytest.mark.parametrize("target, headers, extra, kind, fragment, valid", [
    (None, {"X-GPU-POOL": "gpu"}, {}, "invalid_gpu_pool", "not a configured GPU pool",
     ["all", "fast", "slow", "vip"]),
    (None, {}, {"gpu_pool": 3}, "invalid_gpu_pool", "not a pool name", ["all", "fast", "slow", "vip"]),
    (None, {"X-GPU-POOL": "fast"}, {"gpu_pool": "slow"}, "invalid_gpu_pool", "disagrees", None),
    (0, {"X-GPU-POOL": "slow"}, {}, "invalid_target_gpu", "not in GPU pool 'slow'", [2, 3]),
    (None, {"X-PRIORITY": "urgent"}, {}, "invalid_priority", "not a priority", ["high", "normal", "low"]),
    (None, {}, {"priority": 1}, "invalid_priority", "not a priority", ["high", "normal", "low"]),
    (None, {"X-PRIORITY": "high"}, {"priority": "low"}, "invalid_priority", "disagrees", None),
])
def test_bad_pools_and_priorities_are_400_errors_naming_the_valid_values(target, headers, extra, kind,
                                                                        fragment, valid):
    with pytest.raises(RequestError, match=fragment) as info:
        resolve(target, headers, extra, POOLS)
    body = info.value.as_json()["error"]
    assert body["type"] == kind
    if valid is not None:
        assert body["extra_info"]["valid"] == valid
        assert body["details"] == "valid values: " + ", ".join(str(v) for v in valid)
