"""The prompt journal (comfy_multigpu.runtime.journal) on a real SQLite file: what was accepted and not finished
comes back in order, finished prompts come back as history, deleted ones do not come back, secrets are
never written, and the file survives a reopen (as after kill -9)."""
import sqlite3

from comfy_multigpu.runtime.journal import Journal
from comfy_multigpu.runtime.prompt import QueuedPrompt


def item(prompt_id, number=1, secret=None):
    return (number, prompt_id, {"1": {"class_type": "X", "inputs": {}}}, {"client_id": "c"}, ["1"],
            {"api_key_comfy_org": secret} if secret else {})


def queued(stock, target, pool):
    return QueuedPrompt.from_stock(stock, target=target, pool=pool)


def test_unfinished_and_finished_prompts_come_back_after_a_reopen(tmp_path):
    path = str(tmp_path / "j" / "journal.sqlite3")
    j = Journal(path)
    j.accepted(queued(item("a", 1), None, None))
    j.accepted(queued(item("b", 2, secret="sk-123"), 1, "fast"))
    j.accepted(queued(item("c", 3), None, None))
    j.finished("a", 0, {"prompt": [1, "a"], "outputs": {"1": {"x": [1]}}, "status": {"status_str": "success"}})
    j.forget(["c"])
    del j                                    # no close: as if the process died
    again = Journal(path)
    assert [(pid, e["gpu_id"], e["outputs"]) for pid, e in again.history()] == [("a", 0, {"1": {"x": [1]}})]
    (b,) = again.unfinished()
    assert (b.prompt_id, b.number, b.target, b.pool, b.extra_data, b.outputs) == ("b", 2.0, 1, "fast",
                                                                                   {"client_id": "c"}, ["1"])
    raw = b"".join(open(p, "rb").read() for p in tmp_path.joinpath("j").iterdir())
    assert b"sk-123" not in raw                                  # sensitive extra data is never written
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_history_is_pruned_and_can_be_cleared(tmp_path):
    j = Journal(str(tmp_path / "journal.sqlite3"), keep_done=3)
    for i in range(600):
        j.accepted(queued(item(f"p{i}", i), None, None))
        j.finished(f"p{i}", 0, {"prompt": [i]})
    assert [pid for pid, _ in j.history()] == ["p597", "p598", "p599"]
    j.forget_history()
    assert j.history() == [] and j.unfinished() == []
