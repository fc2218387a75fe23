"""The stock ComfyUI web UI and the dashboard in a real browser: Debian's Chromium driven by
Playwright (executable_path, no browser download), against a real ComfyUI with 2 CPU workers."""
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
