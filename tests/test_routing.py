"""X-TARGET-GPU parsing and least-loaded placement (comfy_multigpu.routing): pure, table-driven."""
import pytest

from comfy_multigpu.routing import (TargetError, Waiting, WorkerLoad, choose_least_loaded, choose_takeover,
                                    parse_target, prompt_models)


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


@pytest.mark.parametrize("loads, models, expected", [
    ([(0, True, 0, 0, {"ckpt_name:a"}), (1, True, 0, 0, {"ckpt_name:b"})], {"ckpt_name:b"}, 1),   # affinity among idle
    ([(0, True, 0, 0, set()), (1, True, 1, 0, {"ckpt_name:b"})], {"ckpt_name:b"}, 0),            # idle beats affinity
    ([(0, True, 1, 0, {"ckpt_name:a"}), (1, True, 1, 0, {"ckpt_name:b"})], {"ckpt_name:a"}, 0),
    ([(0, True, 0, 0, {"ckpt_name:a"}), (1, True, 0, 0, {"ckpt_name:a", "lora_name:x"})],
     {"ckpt_name:a", "lora_name:x"}, 1),                                                         # most overlap
    ([(0, False, 0, 0, {"ckpt_name:b"}), (1, True, 3, 0, set())], {"ckpt_name:b"}, 1),          # down never
])
def test_placement_prefers_idle_then_the_gpu_that_has_the_models(loads, models, expected):
    snapshot = [WorkerLoad(g, up, r, p, frozenset(m)) for g, up, r, p, m in loads]
    assert choose_least_loaded(snapshot, frozenset(models)) == expected


def test_prompt_models_reads_the_loader_nodes():
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
              "2": {"class_type": "LoraLoader", "inputs": {"lora_name": "x.safetensors", "model": ["1", 0]}},
              "3": {"class_type": "KSampler", "inputs": {"seed": 1}},
              "4": "not a node", "5": {"inputs": "nor this"}}
    assert prompt_models(prompt) == {"ckpt_name:sd15.safetensors", "lora_name:x.safetensors"}
    assert prompt_models({}) == frozenset() and prompt_models([]) == frozenset()


@pytest.mark.parametrize("idle_models, waiting, expected", [
    (set(), [("a", 5, 0, set()), ("b", 3, 1, set())], "b"),                          # earliest queued
    ({"ckpt_name:m"}, [("a", 3, 0, set()), ("b", 5, 1, {"ckpt_name:m"})], "b"),     # no load needed
    ({"ckpt_name:m"}, [("a", -1, 0, set()), ("b", 5, 0, set())], "a"),              # front first
    (set(), [], None),
])
def test_an_idle_worker_takes_the_best_waiting_auto_prompt(idle_models, waiting, expected):
    candidates = [Waiting(pid, n, owner, frozenset(m)) for pid, n, owner, m in waiting]
    chosen = choose_takeover(frozenset(idle_models), candidates)
    assert (chosen.prompt_id if chosen else None) == expected
