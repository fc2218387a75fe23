"""Request-body checks and admission policy (comfy_multigpu.policy.errors, comfy_multigpu.policy.admission): what the
stock handlers would answer with 500 is refused with a 400 that says what is wrong; queue caps answer
429 and draining 503, each with Retry-After. Pure, table-driven."""
import pytest

from comfy_multigpu.policy.admission import Limits, admit, retry_after
from comfy_multigpu.policy.errors import ApiError, BODY_CHECKS, check_prompt_body, parse_json_object


@pytest.mark.parametrize("body, fragment", [
    (b"", "body was empty"), (b"   ", "body was empty"), (b"\xff\xfe{}", "not UTF-8"), (b"{", "not valid JSON"),
    (b"[1, 2]", "got list"), (b"null", "got NoneType"), (b'"x"', "got str"), (b"[" * 100 + b"]" * 100, "nested deeper"),
    (b'{"a": ' * 70 + b"1" + b"}" * 70, "nested deeper"),
])
def test_bodies_that_are_not_json_objects_are_refused(body, fragment):
    with pytest.raises(ApiError, match=fragment) as info:
        parse_json_object(body, "/prompt")
    assert info.value.status == 400 and info.value.kind == "invalid_json"
    assert info.value.body("/prompt")["node_errors"] == {}


def test_an_empty_interrupt_body_is_no_prompt_id_as_in_stock():
    assert parse_json_object(b"", "/interrupt", empty_ok=True) == {}
    assert parse_json_object(b'{"s": "[[[{{"}', "/x") == {"s": "[[[{{"}     # brackets in strings do not count


@pytest.mark.parametrize("data, fragment", [
    ({"prompt": "text"}, "'prompt' must be an API-format workflow object"),
    ({"prompt": {}, "extra_data": []}, "'extra_data' must be an object"),
    ({"prompt": {}, "client_id": 5}, "'client_id' must be a string"),
    ({"prompt": {}, "number": "abc"}, "'number' must be a finite number"),
    ({"prompt": {}, "number": float("nan")}, "'number' must be a finite number"),
    ({"prompt": {}, "number": True}, "'number' must be a finite number"),
    ({"prompt": {}, "partial_execution_targets": "1"}, "must be a list of strings"),
    ({"prompt": {"1": "node"}}, "node '1' must be an object"),
    ({"prompt": {"1": {"class_type": 5}}}, "class_type must be a string"),
    ({"prompt": {"1": {"class_type": "X", "inputs": []}}}, "inputs must be an object"),
])
def test_prompt_bodies_stock_would_crash_on_are_400(data, fragment):
    with pytest.raises(ApiError, match=fragment):
        check_prompt_body(data)


@pytest.mark.parametrize("data", [
    {}, {"prompt": {}}, {"prompt": {"1": {"class_type": "X", "inputs": {}}}, "number": 3, "front": 1},
    {"prompt": {"1": {"class_type": "Nope"}}, "number": "4.5", "client_id": None, "extra_data": {}},
])
def test_well_formed_prompt_bodies_are_left_to_stock_validation(data):
    check_prompt_body(data)


@pytest.mark.parametrize("route, data, fragment", [
    ("/queue", {"delete": "abc"}, "list of strings"), ("/queue", {"delete": [1]}, "list of strings"),
    ("/history", {"delete": {"a": 1}}, "list of strings"), ("/interrupt", {"prompt_id": 7}, "prompt id string"),
])
def test_other_bodies(route, data, fragment):
    checker, _ = BODY_CHECKS[route]
    with pytest.raises(ApiError, match=fragment):
        checker(data)


@pytest.mark.parametrize("limits, counts, target, eligible, draining, status", [
    (Limits(), [50, 50], None, None, False, None),                     # no caps
    (Limits(per_gpu=8), [8, 7], None, None, False, None),              # GPU 1 has room
    (Limits(per_gpu=8), [8, 8], None, None, False, 429),
    (Limits(per_gpu=8), [8, 0], 0, None, False, 429),                  # pinned to the full one
    (Limits(per_gpu=8), [0, 8, 8], None, frozenset({1, 2}), False, 429),   # its pool is full
    (Limits(total=10), [5, 4], None, None, False, None),
    (Limits(total=10), [5, 5], 1, None, False, 429),
    (Limits(), [0, 0], None, None, True, 503),
])
def test_admission(limits, counts, target, eligible, draining, status):
    refusal = admit(limits, counts, target, eligible, draining, mean_run_s=2.2)
    assert (refusal.status if refusal else None) == status
    if refusal:
        assert refusal.headers == {"Retry-After": "3"} and refusal.message


def test_retry_after_follows_the_mean_run_time_within_bounds():
    assert [retry_after(x) for x in (0, 0.2, 2.2, 500)] == [5, 1, 3, 60]
