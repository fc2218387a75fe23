"""The stock ComfyUI web UI and the dashboard in a real browser: Debian's Chromium driven by
Playwright (executable_path, no browser download), against a real ComfyUI with 2 CPU workers: the GPU
picker and queue tab, the dashboard's live cards, its charts and strips (filled by prompts on both
GPUs, drawn as /multigpu/state says) at desktop and phone width."""
import time

import pytest
from playwright import sync_api as playwright_sync

from helpers import workflows as wf
from helpers.browser import chromium_binary, non_blank

TOOLTIP = "comfy-multigpu: where the next prompts run"
APP_READY = "() => window.app && window.app.graph && window.app.extensionManager"


@pytest.fixture(scope="module")
def ui2(servers):
    server = servers.start("ui2", workers=2)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=chromium_binary(), headless=True,
                                      args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    out = tmp_path_factory.mktemp("screenshots")
    print(f"screenshots in {out}")
    return out


def open_ui(browser, server, shots=None):
    # a returning user: no first-run template browser over the canvas
    server.post("/settings/Comfy.TutorialCompleted", True)
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(server.url, wait_until="domcontentloaded")
    page.wait_for_function(APP_READY, timeout=120_000)
    dismiss_dialogs(page)
    return context, page


def dismiss_dialogs(page):
    """Close whatever dialog the frontend opened on start (what a user would do: Escape)."""
    overlay = page.locator('[data-testid="dialog-overlay"]')
    for _ in range(10):
        page.wait_for_timeout(500)
        if overlay.count() == 0:
            return
        page.keyboard.press("Escape")
    raise AssertionError("a dialog stays open over the UI")


def default_workflow_with_the_tiny_checkpoint(page):
    """ComfyUI's classic default graph (checkpoint loader, two prompts, empty latent, KSampler, VAE
    decode, save) on the tiny checkpoint at 64x64 and 4 steps, opened in the UI the way a user opens
    an API-format workflow file (app.loadApiJson). The frontend's own current default is a Z-Image
    graph whose models a test cannot ship."""
    page.evaluate("(workflow) => window.app.loadApiJson(workflow, 'default-sd15.json')",
                  wf.txt2img(42, prefix="ui", steps=4, size=64))
    page.wait_for_function("window.app.graph.nodes.some(n => n.type === 'CheckpointLoaderSimple')", timeout=30_000)


def new_history_entries(server, known: set, count: int, timeout: float = 180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = server.get("/history")
        fresh = {k: v for k, v in history.items() if k not in known and "status" in v and v["status"].get("completed") is not None}
        done = {k: v for k, v in fresh.items() if v["status"]["status_str"] in ("success", "error")}
        if len(done) >= count:
            return done
        time.sleep(0.3)
    raise TimeoutError(f"no {count} new prompt(s) in history")


def test_choosing_gpu_1_in_the_web_ui_runs_the_default_workflow_there(ui2, browser, shots):
    context, page = open_ui(browser, ui2)
    try:
        button = page.locator(f'button[aria-label="{TOOLTIP}"]')
        button.wait_for(timeout=60_000)
        button.click()
        page.locator('#comfy-multigpu-menu [data-value="gpu:1"]').click()
        assert page.evaluate("localStorage.getItem('comfy-multigpu.target')") == "gpu:1"
        page.reload(wait_until="domcontentloaded")           # the choice persists across reloads
        page.wait_for_function(APP_READY, timeout=120_000)
        dismiss_dialogs(page)
        page.wait_for_function("document.body.dataset.multigpuTarget === 'gpu:1'", timeout=60_000)
        assert "GPU 1" in page.locator(f'button[aria-label="{TOOLTIP}"]').inner_text()
        default_workflow_with_the_tiny_checkpoint(page)
        known = set(ui2.get("/history"))
        page.locator('button[data-testid="queue-button"]').click()
        entries = new_history_entries(ui2, known, 1)
        (entry,) = entries.values()
        assert entry["status"]["status_str"] == "success", entry["status"]
        assert entry["gpu_id"] == 1
        loaders = [n for n in entry["prompt"][2].values() if n["class_type"] == "CheckpointLoaderSimple"]
        assert [n["inputs"]["ckpt_name"] for n in loaders] == [wf.CHECKPOINT]
        png = page.screenshot(path=str(shots / "ui-gpu1.png"))
        assert non_blank(png)
        # the sidebar tab lists every GPU's queue
        page.locator('[aria-label="comfy-multigpu: every GPU\'s queue"], button:has(.pi-server)').first.click()
        panel = page.locator('[data-testid="comfy-multigpu-queues"]')
        panel.wait_for(timeout=30_000)
        assert "GPU 0" in panel.inner_text() and "GPU 1" in panel.inner_text()
        assert non_blank(page.screenshot(path=str(shots / "ui-queues-tab.png")))
        # back to Auto: the next prompt carries no header and the server places it
        page.locator(f'button[aria-label="{TOOLTIP}"]').click()
        page.locator('#comfy-multigpu-menu [data-value="auto"]').click()
        assert page.evaluate("localStorage.getItem('comfy-multigpu.target')") == "auto"
    finally:
        context.close()


def test_the_dashboard_updates_live_and_fits_a_phone(ui2, browser, shots):
    for viewport, name in (({"width": 1280, "height": 800}, "dashboard"), ({"width": 390, "height": 844}, "dashboard-phone")):
        context = browser.new_context(viewport=viewport)
        page = context.new_page()
        try:
            page.goto(f"{ui2.url}/multigpu/", wait_until="domcontentloaded")
            page.wait_for_selector('section.card[data-gpu="1"]', timeout=30_000)
            page.wait_for_function("document.getElementById('conn').textContent === 'live'", timeout=30_000)
            seen = int(page.evaluate("document.body.dataset.updates"))
            pid = ui2.submit(wf.sleep(3, 1), gpu=1)["prompt_id"]
            page.wait_for_selector('section.card[data-gpu="1"][data-state="busy"]', timeout=30_000)
            page.wait_for_selector('section.card[data-gpu="1"] progress', timeout=30_000)
            assert int(page.evaluate("document.body.dataset.updates")) > seen
            assert page.locator('section.card[data-gpu="0"]').get_attribute("data-state") == "idle"
            png = page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
            assert non_blank(png)
            boxes = [page.locator(f'section.card[data-gpu="{g}"]').bounding_box() for g in (0, 1)]
            if viewport["width"] < 480:        # one column, nothing cut off
                assert boxes[0]["x"] == boxes[1]["x"] and boxes[1]["y"] > boxes[0]["y"]
                assert boxes[0]["x"] + boxes[0]["width"] <= viewport["width"]
            else:
                assert boxes[0]["y"] == boxes[1]["y"]
            ui2.wait(pid)
            page.wait_for_selector('section.card[data-gpu="1"][data-state="idle"]', timeout=30_000)
        finally:
            context.close()


def drawn(page, series: str, gpu) -> dict:
    """{bucket start: value} of a chart as the page drew it (its data attributes)."""
    start, step, values = page.evaluate("""([series, gpu]) => {
        const svg = document.querySelector(`svg.spark[data-series="${series}"][data-gpu="${gpu}"]`);
        return [Number(svg.dataset.start), Number(svg.dataset.bucket), svg.dataset.values];
    }""", [series, str(gpu)])
    return {round(start + i * step, 3): float(v) for i, v in enumerate(values.split(",")) if v != ""}


def served(state: dict, series: str, gpu) -> dict:
    """{bucket start: value} of the same series in /multigpu/state."""
    window = state["series"]
    row = window["all"] if gpu == "all" else window["gpus"][gpu]
    return {round(window["start"] + i * window["bucket_s"], 3): v for i, v in enumerate(row[series]) if v is not None}


BUSY_SETTLED = """(gpus) => gpus.every(g => {
    const svg = document.querySelector(`svg.spark[data-series="busy"][data-gpu="${g}"]`);
    return svg && svg.dataset.values.split(",").slice(0, -1).some(v => Number(v) > 0);
})"""  # busy drawn in a bucket that is over (the last one is still filling)


def test_the_charts_and_strips_fill_in_and_draw_what_the_state_says(ui2, browser, shots):
    """Prompts on both GPUs: each card's strip gets their blocks live (running, then success), the busy
    charts fill in, a block tells its prompt on hover (desktop) and on a tap (phone), the screenshots
    are not blank, nothing is wider than a phone, and the busy share drawn is /multigpu/state's bucket
    for bucket (the bucket still filling aside: within one bucket)."""
    sent = []
    for viewport, name, touch in (({"width": 1280, "height": 900}, "dashboard-charts", False),
                                  ({"width": 390, "height": 844}, "dashboard-charts-phone", True)):
        context = browser.new_context(viewport=viewport, has_touch=touch, is_mobile=touch)
        page = context.new_page()
        try:
            page.goto(f"{ui2.url}/multigpu/", wait_until="domcontentloaded")
            page.wait_for_function("document.getElementById('conn').textContent === 'live'", timeout=30_000)
            page.wait_for_selector('section.card[data-gpu="1"] svg.strip', timeout=30_000)
            if not sent:                        # desktop: sent while the page watches (pushes fill it)
                sent = [ui2.submit(wf.standin("dash-model", 1.5, load_seconds=0.1), gpu=0)["prompt_id"],
                        ui2.submit(wf.sleep(2.0, 31), gpu=1)["prompt_id"],
                        ui2.submit(wf.sleep(0.5, 32), gpu=1)["prompt_id"]]
                page.wait_for_selector(f'section.card[data-gpu="1"] rect[data-prompt="{sent[1]}"]'
                                       '[data-outcome="running"]', timeout=30_000)
                ui2.wait(sent)
            for gpu, pid in ((0, sent[0]), (1, sent[1]), (1, sent[2])):
                page.wait_for_selector(f'section.card[data-gpu="{gpu}"] rect[data-prompt="{pid}"]'
                                       '[data-outcome="success"]', timeout=30_000)
            page.wait_for_function(BUSY_SETTLED, arg=["0", "1", "all"], timeout=30_000)
            block = page.locator(f'section.card[data-gpu="0"] rect[data-prompt="{sent[0]}"]')
            block.tap() if touch else block.hover()
            page.wait_for_function("(pid) => document.querySelector('section.card[data-gpu=\"0\"] .tip')"
                                   ".textContent.includes(pid)", arg=sent[0], timeout=10_000)
            tip = page.locator('section.card[data-gpu="0"] .tip').inner_text()
            assert "dash-model" in tip and " s" in tip and "success" in tip, tip
            assert non_blank(page.screenshot(path=str(shots / f"{name}.png"), full_page=True))
            assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
            for gpu in (0, 1, "all"):
                pictured = drawn(page, "busy", gpu)
                state = ui2.get("/multigpu/state")
                truth = served(state, "busy", gpu)
                settled = sorted(pictured)[:-1]             # the last bucket drawn was still filling
                assert any(pictured[t] > 0 for t in settled), (gpu, pictured)
                assert all(abs(pictured[t] - truth[t]) <= 1e-3 for t in settled if t in truth), (gpu, pictured, truth)
                common = [t for t in pictured if t in truth]   # the one still filling: within one bucket
                assert abs(sum(pictured[t] for t in common) - sum(truth[t] for t in common)) <= 1.0
        finally:
            context.close()


def test_a_lease_of_several_gpus_is_one_outlined_block_on_each_of_its_strips(ui2, browser):
    """No HTTP request asks for a gang lease yet: the page gets the server's own state with one such
    run added (runtime tests cover the timeline recording it) and draws it on both strips."""
    state = ui2.get("/multigpu/state")
    now = state["series"]["now"]
    state["runs"].append({"id": 10 ** 9, "prompt_id": "gang-prompt", "gpus": [1, 0], "start": now - 30,
                          "end": now - 20, "outcome": "success", "model": "ckpt_name:gang.safetensors"})
    context = browser.new_context(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
    page = context.new_page()
    try:
        page.route("**/multigpu/state", lambda route: route.fulfill(json=state))
        page.goto(f"{ui2.url}/multigpu/", wait_until="domcontentloaded")
        for gpu in (0, 1):
            page.wait_for_selector(f'section.card[data-gpu="{gpu}"] rect.gang[data-prompt="gang-prompt"]',
                                   timeout=30_000)
        page.locator('section.card[data-gpu="1"] rect[data-prompt="gang-prompt"]').tap()
        for gpu in (0, 1):
            tip = page.locator(f'section.card[data-gpu="{gpu}"] .tip').inner_text()
            assert "gang-prompt" in tip and "10.0 s" in tip and "gang.safetensors" in tip and "GPUs 1+0" in tip
    finally:
        context.close()


@pytest.fixture(scope="module")
def ui_stock(servers):
    """Stock ComfyUI of its own: the UI writes settings into its user directory, which the session's
    `stock` server must not get (test_compat compares its /userdata listing)."""
    server = servers.start("ui-stock", workers=None, env={"COMFY_MULTI_GPU_SCHED": "0"})
    yield server
    server.stop()


def test_with_the_extension_off_the_ui_gets_nothing(ui_stock, browser):
    context, page = open_ui(browser, ui_stock)
    try:
        page.wait_for_timeout(2000)
        assert page.locator(f'button[aria-label="{TOOLTIP}"]').count() == 0
        assert "multigpu" not in " ".join(page.evaluate("window.app.extensions.map(e => e.name)"))
    finally:
        context.close()
