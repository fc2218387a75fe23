// comfy-multigpu in the stock ComfyUI web UI: a GPU selector in the action bar (Auto, GPU 0..N-1,
// pools) that sends the next prompts where chosen, and a "GPUs" sidebar tab with every GPU's queue.
// Served only when the extension is active (the custom node exports WEB_DIRECTORY then); if the
// server answers no /queue/all, nothing is added.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const STORAGE_KEY = "comfy-multigpu.target";   // "auto" | "gpu:N" | "pool:NAME"; survives reloads
const TOOLTIP = "comfy-multigpu: where the next prompts run";

let state = null;           // last /queue/all?counts=1
let choice = localStorage.getItem(STORAGE_KEY) || "auto";

function label(value) {
  if (value.startsWith("gpu:")) return "GPU " + value.slice(4);
  if (value.startsWith("pool:")) return "Pool " + value.slice(5);
  return "GPU: Auto";
}

function valid(value) {
  if (value === "auto" || !state) return true;
  if (value.startsWith("gpu:")) return state.queues.some((q) => String(q.gpu_id) === value.slice(4));
  if (value.startsWith("pool:")) return value.slice(5) in (state.pools || {});
  return false;
}

function choose(value) {
  choice = valid(value) ? value : "auto";
  localStorage.setItem(STORAGE_KEY, choice);
  const span = document.querySelector(`button[aria-label="${TOOLTIP}"] span`);
  if (span) span.textContent = label(choice);
  document.body.dataset.multigpuTarget = choice;
}

async function loadState() {
  const r = await api.fetchApi("/queue/all?counts=1");
  if (!r.ok) return null;
  state = await r.json();
  return state;
}

// Every POST /prompt the UI makes carries the choice as a header (the server's own routing).
const originalFetchApi = api.fetchApi.bind(api);
function installHeader() {
  api.fetchApi = (route, options = {}) => {
    const method = (options.method || "GET").toUpperCase();
    if (method === "POST" && route.split("?")[0] === "/prompt" && choice !== "auto") {
      const headers = new Headers(options.headers || {});
      if (choice.startsWith("gpu:")) headers.set("X-TARGET-GPU", choice.slice(4));
      else if (choice.startsWith("pool:")) headers.set("X-GPU-POOL", choice.slice(5));
      options = { ...options, headers };
    }
    return originalFetchApi(route, options);
  };
}

function closeMenu() {
  document.getElementById("comfy-multigpu-menu")?.remove();
}

async function openMenu(event) {
  if (document.getElementById("comfy-multigpu-menu")) return closeMenu();
  await loadState();
  const menu = document.createElement("div");
  menu.id = "comfy-multigpu-menu";
  menu.setAttribute("role", "menu");
  Object.assign(menu.style, {
    position: "fixed", zIndex: 10000, background: "var(--comfy-menu-bg, #222)", color: "var(--fg-color, #ddd)",
    border: "1px solid var(--border-color, #444)", borderRadius: "8px", padding: "4px", minWidth: "160px",
    boxShadow: "0 4px 16px rgba(0,0,0,.4)", font: "14px system-ui, sans-serif",
  });
  const options = [["auto", "Auto (best GPU)"]];
  for (const q of state?.queues || []) {
    const busy = q.running_count + q.pending_count;
    options.push([`gpu:${q.gpu_id}`, `GPU ${q.gpu_id} (${q.device}${q.up ? "" : ", down"}) - ${busy} queued`]);
  }
  for (const name of Object.keys(state?.pools || {})) {
    if (name !== "all") options.push([`pool:${name}`, `Pool ${name}: GPU ${state.pools[name].join(", ")}`]);
  }
  for (const [value, text] of options) {
    const item = document.createElement("div");
    item.setAttribute("role", "menuitemradio");
    item.setAttribute("aria-checked", String(value === choice));
    item.dataset.value = value;
    item.textContent = (value === choice ? "✓ " : "   ") + text;
    Object.assign(item.style, { padding: "6px 10px", cursor: "pointer", borderRadius: "6px", whiteSpace: "pre" });
    item.onmouseenter = () => (item.style.background = "rgba(127,127,127,.25)");
    item.onmouseleave = () => (item.style.background = "");
    item.onclick = () => { choose(value); closeMenu(); };
    menu.append(item);
  }
  const anchor = event?.currentTarget?.getBoundingClientRect?.() ||
                 document.querySelector(`button[aria-label="${TOOLTIP}"]`)?.getBoundingClientRect();
  menu.style.top = `${(anchor?.bottom ?? 48) + 4}px`;
  menu.style.left = `${Math.max(4, Math.min((anchor?.left ?? 8), window.innerWidth - 240))}px`;
  document.body.append(menu);
  setTimeout(() => document.addEventListener("click", closeMenu, { once: true }), 0);
}

function renderQueues(el) {
  el.replaceChildren();
  const wrap = document.createElement("div");
  wrap.style.padding = "8px";
  wrap.dataset.testid = "comfy-multigpu-queues";
  const title = document.createElement("h3");
  title.textContent = "GPU queues";
  title.style.margin = "4px 0 8px";
  wrap.append(title);
  for (const q of state?.queues || []) {
    const row = document.createElement("div");
    row.dataset.gpu = String(q.gpu_id);
    row.style.cssText = "display:flex;justify-content:space-between;padding:6px 4px;border-bottom:1px solid rgba(127,127,127,.3)";
    const state_ = !q.up ? "down" : q.running_count ? "busy" : "idle";
    row.textContent = `GPU ${q.gpu_id} (${q.device})`;
    const counts = document.createElement("span");
    counts.textContent = `${state_} · ${q.running_count} running · ${q.pending_count} waiting`;
    row.append(counts);
    wrap.append(row);
  }
  const link = document.createElement("a");
  link.href = "multigpu/";
  link.target = "_blank";
  link.textContent = "Open the dashboard";
  link.style.cssText = "display:block;margin-top:10px";
  wrap.append(link);
  el.append(wrap);
}

app.registerExtension({
  name: "comfy-multigpu",
  actionBarButtons: [{ icon: "pi pi-server", label: label(choice), tooltip: TOOLTIP, onClick: openMenu }],
  async setup() {
    if (!(await loadState())) return;          // the extension is off on this server: add nothing
    installHeader();
    choose(choice);                            // a stored GPU that no longer exists falls back to auto
    let panel = null;
    app.extensionManager?.registerSidebarTab?.({
      id: "comfy-multigpu",
      icon: "pi pi-server",
      title: "GPUs",
      tooltip: "comfy-multigpu: every GPU's queue",
      type: "custom",
      render: (el) => { panel = el; renderQueues(el); },
    });
    // The server already sends `status` on every queue change: refresh then, no polling.
    api.addEventListener("status", async () => { await loadState(); if (panel?.isConnected) renderQueues(panel); });
  },
});
