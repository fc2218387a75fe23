"""Placement policy (comfy_multigpu.policy.placement): where an auto prompt is queued, what an idle worker takes
over, model keys of a prompt, priority bands; pure functions over snapshots, table-driven."""
import pytest

from comfy_multigpu.policy.placement import (GIB, PRIORITY_SPAN, Waiting, WorkerLoad, choose_least_loaded,
                                      choose_next, overtaken_by, priority_rank, prompt_models, queue_number)

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
    ([(0, True, 0, 0, ["ckpt_name:a"]), (1, True, 0, 0, ["ckpt_name:b"])], {"ckpt_name:b"}, 1),   # affinity among idle
    ([(0, True, 0, 0, []), (1, True, 1, 0, ["ckpt_name:b"])], {"ckpt_name:b"}, 0),                # idle beats affinity
    ([(0, True, 1, 0, ["ckpt_name:a"]), (1, True, 1, 0, ["ckpt_name:b"])], {"ckpt_name:a"}, 0),
    ([(0, True, 0, 0, ["ckpt_name:a"]), (1, True, 0, 0, ["ckpt_name:a", "lora_name:x"])],
     {"ckpt_name:a", "lora_name:x"}, 1),                                                          # most overlap
    ([(0, True, 0, 0, ["ckpt_name:a", "ckpt_name:b", "ckpt_name:c"]), (1, True, 0, 0, ["ckpt_name:b", "ckpt_name:a"])],
     {"ckpt_name:a"}, 1),                                                                        # used it more lately
    ([(0, True, 0, 0, ["ckpt_name:a", "ckpt_name:b"]), (1, True, 0, 0, ["ckpt_name:b", "ckpt_name:a"])],
     {"ckpt_name:b"}, 0),
    ([(0, False, 0, 0, ["ckpt_name:b"]), (1, True, 3, 0, [])], {"ckpt_name:b"}, 1),               # down never
])
def test_placement_prefers_idle_then_the_gpu_that_has_the_models(loads, models, expected):
    snapshot = [WorkerLoad(g, up, r, p, tuple(m)) for g, up, r, p, m in loads]
    assert choose_least_loaded(snapshot, frozenset(models)) == expected


def test_prompt_models_reads_the_loader_nodes():
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
              "2": {"class_type": "LoraLoader", "inputs": {"lora_name": "x.safetensors", "model": ["1", 0]}},
              "3": {"class_type": "KSampler", "inputs": {"seed": 1}},
              "4": "not a node", "5": {"inputs": "nor this"}}
    assert prompt_models(prompt) == {"ckpt_name:sd15.safetensors", "lora_name:x.safetensors"}
    assert prompt_models({}) == frozenset() and prompt_models([]) == frozenset()


@pytest.mark.parametrize("idle_models, waiting, expected", [
    ([], [("a", 5, 0, set()), ("b", 3, 1, set())], "b"),                                 # earliest queued
    (["ckpt_name:m"], [("a", 3, 0, {"ckpt_name:x"}), ("b", 5, 1, {"ckpt_name:m"})], "b"),  # no load needed
    (["ckpt_name:m"], [("a", 3, 0, set()), ("b", 5, 1, {"ckpt_name:m"})], "a"),           # neither loads
    (["ckpt_name:m", "ckpt_name:n"], [("a", 3, 0, {"ckpt_name:m"}), ("b", 5, 1, {"ckpt_name:n"})], "b"),  # fresher
    (["ckpt_name:m"], [("a", -1, 0, {"ckpt_name:x"}), ("b", 5, 0, {"ckpt_name:m"})], "a"),  # front first
    ([], [], None),
])
def test_a_free_worker_starts_the_best_waiting_prompt(idle_models, waiting, expected):
    candidates = [Waiting(pid, n, owner, frozenset(m)) for pid, n, owner, m in waiting]
    chosen = choose_next(5, tuple(idle_models), candidates, max_overtakes=4)
    assert (chosen.prompt_id if chosen else None) == expected


def test_without_overtakes_it_is_first_come_first_served():
    waiting = [Waiting("a", 3, 0, frozenset({"ckpt_name:x"})), Waiting("b", 5, 1, frozenset({"ckpt_name:m"}))]
    assert choose_next(5, ("ckpt_name:m",), waiting, max_overtakes=0).prompt_id == "a"


def test_a_prompt_overtaken_too_often_goes_first():
    waiting = [Waiting("c1", 3, 0, frozenset({"ckpt_name:c"}), overtaken=1),
               Waiting("c0", 2, 0, frozenset({"ckpt_name:c"}), overtaken=1),
               Waiting("a", 5, 1, frozenset({"ckpt_name:a"}))]
    assert choose_next(5, ("ckpt_name:a",), waiting, max_overtakes=2).prompt_id == "a"
    assert overtaken_by(5, waiting[2], waiting) == ["c1", "c0"]
    worn = [Waiting("c1", 3, 0, frozenset({"ckpt_name:c"}), overtaken=2),
            Waiting("c0", 2, 0, frozenset({"ckpt_name:c"}), overtaken=2), waiting[2]]
    assert choose_next(5, ("ckpt_name:a",), worn, max_overtakes=2).prompt_id == "c0"   # oldest overdue first


@pytest.mark.parametrize("loads, expected", [
    # (gpu, running, pending, weight): all busy -> the queue that drains first at its speed
    ([(0, 1, 3, 2.0), (1, 1, 1, 1.0)], 0),         # (1+3+1)/2 = 2.5 vs (1+1+1)/1 = 3
    ([(0, 1, 1, 2.0), (1, 1, 0, 1.0)], 0),         # 3/2 = 1.5 vs 2/1 = 2
    ([(0, 1, 4, 2.0), (1, 1, 0, 1.0)], 1),         # 6/2 = 3 vs 2/1 = 2
    ([(0, 0, 0, 1.0), (1, 0, 0, 3.0)], 1),         # both idle: the faster one
    ([(0, 0, 0, 3.0), (1, 1, 0, 1.0)], 0),
])
def test_weights_decide_between_unequal_gpus(loads, expected):
    snapshot = [WorkerLoad(g, True, r, p, weight=w) for g, r, p, w in loads]
    assert choose_least_loaded(snapshot) == expected


def test_among_idle_gpus_without_the_models_the_one_with_most_free_memory_is_chosen():
    snapshot = [WorkerLoad(0, True, 0, 0, free_memory=3 * GIB), WorkerLoad(1, True, 0, 0, free_memory=20 * GIB),
                WorkerLoad(2, True, 0, 0, ("ckpt_name:a",), free_memory=1 * GIB)]
    assert choose_least_loaded(snapshot, frozenset({"ckpt_name:b"})) == 1
    assert choose_least_loaded(snapshot, frozenset({"ckpt_name:a"})) == 2      # having it beats free memory
    # differences under 1 GiB are noise: the faster, then the lower index wins
    close = [WorkerLoad(0, True, 0, 0, free_memory=int(5.2 * GIB)), WorkerLoad(1, True, 0, 0, free_memory=int(5.9 * GIB))]
    assert choose_least_loaded(close, frozenset({"ckpt_name:b"})) == 0


def test_eligible_gpus_limit_the_choice():
    snapshot = [WorkerLoad(0, True, 0, 0), WorkerLoad(1, True, 5, 5), WorkerLoad(2, True, 2, 0)]
    assert choose_least_loaded(snapshot, eligible=frozenset({1, 2})) == 2
    assert choose_least_loaded(snapshot, eligible=frozenset({1})) == 1
    assert choose_least_loaded([WorkerLoad(0, True, 0, 0), WorkerLoad(1, False, 0, 0)], eligible=frozenset({1})) is None


def test_the_next_prompt_respects_pools_and_priority_bands():
    high, normal, low = queue_number(7, "high"), queue_number(3, "normal"), queue_number(1, "low")
    waiting = [Waiting("n", normal, 0), Waiting("l", low, 0), Waiting("h-fast", high, 1, eligible=frozenset({0, 1}))]
    assert choose_next(2, (), waiting).prompt_id == "n"          # GPU 2 is not in h's pool
    assert choose_next(1, (), waiting).prompt_id == "h-fast"     # high first
    assert choose_next(2, (), [Waiting("l", low, 0)]).prompt_id == "l"
    assert choose_next(2, (), [Waiting("h-fast", high, 1, eligible=frozenset({0, 1}))]) is None
    # a high prompt overtakes nothing: lower bands do not count as overtaken
    assert overtaken_by(1, waiting[2], waiting) == []
    assert overtaken_by(1, waiting[0], waiting) == []


@pytest.mark.parametrize("number, priority, rank", [
    (5, None, 1), (-5, None, 0), (5, "high", 0), (0, "high", 0), (5, "low", 2), (-5, "normal", 1),
    (-5, "low", 2), (5.5, "normal", 1),
])
def test_priority_bands(number, priority, rank):
    assert priority_rank(queue_number(number, priority)) == rank


def test_within_a_band_earlier_prompts_go_first():
    for band in ("high", "normal", "low"):
        assert queue_number(3, band) < queue_number(4, band)
    assert queue_number(10**6, "high") < queue_number(0, "normal") < queue_number(10**6, "normal") \
        < queue_number(0, "low")
    assert PRIORITY_SPAN > 10**6


def test_a_pinned_prompt_is_never_overtaken_for_affinity():
    """Only its GPU can run it, while the auto prompt can run anywhere."""
    waiting = [Waiting("pinned-c", 3, 5, frozenset({"ckpt_name:c"}), pinned=True),
               Waiting("auto-a", 1, 5, frozenset({"ckpt_name:a"})), Waiting("auto-c", 2, 0, frozenset({"ckpt_name:c"}))]
    assert choose_next(5, ("ckpt_name:a",), waiting, max_overtakes=8).prompt_id == "pinned-c"
    assert choose_next(5, ("ckpt_name:a",), waiting, max_overtakes=0).prompt_id == "auto-a"   # FIFO


@pytest.mark.parametrize("base, priority", [(0, None), (7, None), (3, "high"), (0, "high"), (12, "low"),
                                            (5, "normal"), (999, "high")])
def test_base_number_inverts_queue_number(base, priority):
    from comfy_multigpu.policy.placement import base_number, queue_number
    assert base_number(queue_number(base, priority)) == base
    assert base_number(-base) == base                        # stock "front": the counter negated
