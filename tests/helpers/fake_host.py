"""Test doubles at the edge of the runtime: the ComfyServices methods without ComfyUI, an executor
that sleeps or waits for a gate (honouring interrupts as ComfyUI's nodes do), and a PromptServer
stand-in. Used by the in-process tests of the scheduler, the pool and the HTTP layer."""
import threading
import time

from comfy_multigpu.runtime.context import current_worker


class LoopDeath(BaseException):
    """Not caught by the worker's per-prompt handling: its loop dies."""


class FakeExecutor:
    """Runs a prompt {"seconds": s, "gate": name, "fail": bool}: sleeps s (or waits for the gate),
    honouring interrupts as ComfyUI's nodes do; records where and when it ran."""

    def __init__(self, host):
        self.host = host
        self.history_result = {}
        self.success, self.status_messages = True, []

    def execute(self, prompt, prompt_id, extra_data, outputs):
        worker = current_worker.get()
        worker.take_interrupt()                      # stock execute() starts with interrupt_processing(False)
        start = time.monotonic()
        self.success, self.status_messages = True, [("execution_start", {"prompt_id": prompt_id})]
        if prompt.get("die"):
            raise LoopDeath("a fault outside any prompt's handling")
        gate = self.host.gates.get(prompt.get("gate"))
        deadline = start + prompt.get("seconds", 0.0)
        while (gate is not None and not gate.is_set()) or (gate is None and time.monotonic() < deadline):
            if worker.take_interrupt():
                self.success = False
                self.status_messages.append(("execution_interrupted", {"prompt_id": prompt_id}))
                break
            time.sleep(0.002)
        with self.host.lock:
            self.host.ran.append((prompt_id, worker.gpu_id, start, time.monotonic()))
        self.history_result = {"outputs": {"1": {"ran_on": [worker.gpu_id]}}, "meta": {}}

    def reset(self):
        pass


class FakeHost:
    """The ComfyServices methods the runtime calls, without ComfyUI."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ran = []
        self.gates: dict[str, threading.Event] = {}
        self.unloaded: list[float] = []           # when /free unloaded models (monotonic)

    def new_executor(self, server):
        return FakeExecutor(self)

    def prompt_started(self):
        pass

    def prompt_finished(self, history_result, prompt_id):
        pass

    def collect(self):
        pass

    def after_collect(self, idle):
        pass

    def unload_models(self):
        self.unloaded.append(time.monotonic())

    def free_memory(self, device):
        return 0


class FakeServer:
    client_id = None
    last_prompt_id = None

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass
