// TabAgent background service worker (ES module).
//
// Holds ONE native-messaging port to the TabAgent host ("com.tabagent.host") and multiplexes the
// requests of every open panel over it:
//
//   panel  --{type:"request", id, method, params}-->  background  --{id:"p7", method, params}-->  host
//   panel  <--{type:"event", message}---------------  background  <--{id:"p7", event, ...}-------  host
//
// Panel request ids are mapped to host ids unique on this connection ("p<counter>") so two panels
// never collide; replies are translated back and sent only to the panel that asked. Chunked host
// messages are reassembled first (lib/chunks.js). Every panel gets
// {type:"status", connected, error, hello} on connect and whenever the connection changes.

import { ChunkAssembler } from "./lib/chunks.js";

const HOST_NAME = "com.tabagent.host";
const PANEL_PORT_NAME = "tabagent-panel";
const BACKOFF_START_MS = 500;
const BACKOFF_MAX_MS = 30_000;
// With no panel open the host is let go after this long: it holds the models and the memory
// databases while it runs, and a TabAgent server started meanwhile needs those databases.
const IDLE_RELEASE_MS = 15_000;

/** @type {chrome.runtime.Port | null} */
let nativePort = null;
let connected = false; // true once the host answered (session.hello), false after a disconnect
let lastError = null; // string | null: why the host is not connected, or a host-level error
let hello = null; // data of the last session.hello reply
let backoffMs = BACKOFF_START_MS;
let reconnectTimer = null;
let idleTimer = null;
let hostCounter = 0;
const assembler = new ChunkAssembler();

/** @type {Set<chrome.runtime.Port>} */
const panels = new Set();
/**
 * In-flight host requests: host id -> {panel, panelId} for panel requests, or {onMessage} for the
 * background's own (session.hello, session.cancel).
 * @type {Map<string, {panel?: chrome.runtime.Port, panelId?: string, onMessage?: (m: any) => void}>}
 */
const inflight = new Map();
/** Per panel: panel request id -> host id (to translate cancels). */
const panelIds = new WeakMap();

chrome.sidePanel
  ?.setPanelBehavior({ openPanelOnActionClick: true })
  .catch((err) => console.warn("TabAgent: setPanelBehavior failed:", err?.message || err));

// ---------------------------------------------------------------------------------------------
// Native port

function connectHost() {
  if (nativePort) return;
  clearTimeout(reconnectTimer);
  reconnectTimer = null;
  let port;
  try {
    port = chrome.runtime.connectNative(HOST_NAME);
  } catch (err) {
    onHostGone(err?.message || String(err));
    return;
  }
  nativePort = port;
  port.onMessage.addListener((message) => {
    if (nativePort === port) onHostMessage(message);
  });
  port.onDisconnect.addListener(() => {
    const why = chrome.runtime.lastError?.message || "the native host disconnected";
    if (nativePort === port) {
      nativePort = null;
      onHostGone(why);
    }
  });
  sendOwn("session.hello", {}, (message) => {
    if (nativePort !== port) return;
    connected = true;
    backoffMs = BACKOFF_START_MS;
    if (message.event === "done") {
      hello = message.data ?? null;
      lastError = null;
    } else {
      // A host that does not know session.hello still answers: it is connected.
      hello = null;
      lastError = null;
      console.warn("TabAgent: session.hello failed:", message.error);
    }
    broadcastStatus();
  });
}

function onHostGone(why) {
  connected = false;
  hello = null;
  lastError = why;
  assembler.clear();
  const failed = [...inflight.entries()];
  inflight.clear();
  for (const [hostId, entry] of failed) {
    if (entry.panel) panelIds.get(entry.panel)?.delete(entry.panelId);
    deliver(entry, {
      id: hostId,
      event: "error",
      error: { code: "host_disconnected", message: why, type: "connection_error", param: null },
    });
  }
  broadcastStatus();
  scheduleReconnect();
}

function scheduleReconnect() {
  if (reconnectTimer || nativePort || panels.size === 0) return; // a panel reconnects on demand
  const delay = backoffMs;
  backoffMs = Math.min(backoffMs * 2, BACKOFF_MAX_MS);
  reconnectTimer = setTimeout(() => {
    reconnectTimer = null;
    connectHost();
  }, delay);
}

/** Send a message on the native port; false (and the port torn down) if that fails. */
function postToHost(message) {
  if (!nativePort) connectHost();
  if (!nativePort) return false;
  try {
    nativePort.postMessage(message);
    return true;
  } catch (err) {
    // The port died under us; onDisconnect may not fire for a port we can no longer use.
    const port = nativePort;
    nativePort = null;
    try {
      port.disconnect();
    } catch {
      /* already gone */
    }
    onHostGone(err?.message || String(err));
    return false;
  }
}

function nextHostId() {
  hostCounter += 1;
  return `p${hostCounter}`;
}

/** A request the background makes for itself; onMessage gets its final (done/error) message. */
function sendOwn(method, params, onMessage = () => {}) {
  const hostId = nextHostId();
  inflight.set(hostId, { onMessage });
  if (!postToHost({ id: hostId, method, params })) inflight.delete(hostId);
  return hostId;
}

function onHostMessage(raw) {
  const message = assembler.push(raw);
  if (message == null) return; // more pieces to come
  if (message.id == null) {
    if (message.event === "error") {
      lastError = message.error?.message || message.error?.code || "host error";
      console.warn("TabAgent: host error:", message.error);
      broadcastStatus();
    }
    return;
  }
  const hostId = String(message.id);
  const entry = inflight.get(hostId);
  if (!entry) return; // a reply for a request whose panel went away, or a late one
  const final = message.event === "done" || message.event === "error";
  if (final) {
    inflight.delete(hostId);
    if (entry.panel) panelIds.get(entry.panel)?.delete(entry.panelId);
  }
  if (entry.onMessage) {
    if (final) entry.onMessage(message);
    return;
  }
  deliver(entry, message);
}

/** Give a host message (id translated back) to the panel that asked for it. */
function deliver(entry, message) {
  if (entry.onMessage) {
    entry.onMessage(message);
    return;
  }
  if (!entry.panel || !panels.has(entry.panel)) return;
  try {
    entry.panel.postMessage({ type: "event", message: { ...message, id: entry.panelId } });
  } catch {
    forgetPanel(entry.panel);
  }
}

// ---------------------------------------------------------------------------------------------
// Panels

function statusMessage() {
  return { type: "status", connected, error: lastError, hello };
}

function sendStatus(panel) {
  try {
    panel.postMessage(statusMessage());
  } catch {
    forgetPanel(panel);
  }
}

function broadcastStatus() {
  for (const panel of [...panels]) sendStatus(panel);
}

/** No panel is open: after IDLE_RELEASE_MS, disconnect the host (it exits on EOF). */
function scheduleIdleRelease() {
  clearTimeout(idleTimer);
  idleTimer = setTimeout(() => {
    idleTimer = null;
    if (panels.size > 0 || !nativePort) return;
    const port = nativePort;
    nativePort = null;
    connected = false;
    hello = null;
    lastError = null;
    clearTimeout(reconnectTimer);
    reconnectTimer = null;
    inflight.clear();
    assembler.clear();
    try {
      port.disconnect();
    } catch {
      /* already gone */
    }
  }, IDLE_RELEASE_MS);
}

function forgetPanel(panel) {
  if (!panels.delete(panel)) return;
  if (panels.size === 0) scheduleIdleRelease();
  const ids = panelIds.get(panel);
  if (!ids) return;
  // Nobody will read these answers any more: cancel the work on the host.
  for (const hostId of ids.values()) {
    inflight.delete(hostId);
    if (nativePort) sendOwn("session.cancel", { id: hostId });
  }
  ids.clear();
}

function onPanelMessage(panel, msg) {
  if (!msg || typeof msg !== "object") return;
  const ids = panelIds.get(panel);
  if (msg.type === "request") {
    const panelId = String(msg.id);
    const fail = (code, message) =>
      panel.postMessage({
        type: "event",
        message: { id: panelId, event: "error", error: { code, message, type: "client_error", param: null } },
      });
    if (typeof msg.method !== "string" || !msg.method) {
      fail("bad_request", "method must be a non-empty string");
      return;
    }
    if (ids.has(panelId)) {
      fail("duplicate_id", `request id ${panelId} is already in flight`);
      return;
    }
    const hostId = nextHostId();
    inflight.set(hostId, { panel, panelId });
    ids.set(panelId, hostId);
    if (!postToHost({ id: hostId, method: msg.method, params: msg.params ?? {} })) {
      // postToHost already failed every in-flight request (this one included) if the port died;
      // if there was never a port, fail this one here.
      if (inflight.delete(hostId)) {
        ids.delete(panelId);
        fail("host_disconnected", lastError || "the native host is not connected");
      }
    }
  } else if (msg.type === "cancel") {
    const hostId = ids.get(String(msg.id));
    if (hostId && nativePort) {
      assembler.drop(hostId);
      sendOwn("session.cancel", { id: hostId });
    }
  } else if (msg.type === "status") {
    sendStatus(panel);
  }
}

chrome.runtime.onConnect.addListener((panel) => {
  if (panel.name !== PANEL_PORT_NAME) return;
  // Only pages of this extension may drive the host.
  if (panel.sender?.id && panel.sender.id !== chrome.runtime.id) {
    panel.disconnect();
    return;
  }
  clearTimeout(idleTimer);
  idleTimer = null;
  panels.add(panel);
  panelIds.set(panel, new Map());
  panel.onMessage.addListener((msg) => onPanelMessage(panel, msg));
  panel.onDisconnect.addListener(() => forgetPanel(panel));
  if (!nativePort) {
    backoffMs = BACKOFF_START_MS;
    connectHost();
  }
  sendStatus(panel);
});
// The host is started when a panel connects (above), not when the service worker starts.
