// TabAgent side panel: a chat UI over the background's native-messaging connection.
//
// DOM contract (the end-to-end tests rely on it): #status (+ body[data-connection]), #model,
// #conversations, #new-chat, #delete-chat, #messages (.message.user / .message.assistant with
// data-state streaming|done|cancelled|error), #prompt, #send, #stop, #use-page (+ #page-chip and
// body[data-page]). Model output is only ever written with textContent / Text nodes.

import { TabAgentClient } from "./lib/client.js";

const MAX_TOKENS = 512;
const PAGE_CONTEXT_LIMIT = 12_000; // characters of page context sent with a message
const PAGE_CONTEXT_PREFIX = "Context from the page ";
const PAGE_CONTEXT_SEPARATOR = "\n\n---\n\n";
const MODEL_KEY = "tabagent.model";
const MAX_TOKENS_KEY = "tabagent.maxTokens";
const TITLE_CHARS = 60;
const HEALTH_EVERY_MS = 15_000;
const CANCEL_GRACE_MS = 8_000;

const $ = (id) => document.getElementById(id);
const els = {
  status: $("status"),
  model: $("model"),
  conversations: $("conversations"),
  newChat: $("new-chat"),
  deleteChat: $("delete-chat"),
  messages: $("messages"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  usePage: $("use-page"),
  chip: $("page-chip"),
  chipText: $("page-chip-text"),
  chipRemove: $("page-chip-remove"),
};

const client = new TabAgentClient();
globalThis.tabagent = client;

const state = {
  connected: false,
  hello: null,
  health: null,
  hostError: null, // from the background's status
  opError: null, // the last failed operation, shown until the next user action succeeds
  conversationId: "",
  loadToken: 0,
  sending: false, // between pressing send and the stream starting
  streaming: null, // {handle, element, finish(stateName, meta)}
  usePage: false,
  page: null, // {title, url, text} once captured
  pagePromise: null,
  deleteArmed: null, // timer while the delete button waits for its confirming second click
};

// ---------------------------------------------------------------------------------------------
// Status line

function renderStatus() {
  let text;
  let level;
  if (!state.connected) {
    text = `Disconnected${state.hostError ? `: ${state.hostError}` : ""} — reconnecting…`;
    level = "error";
  } else {
    const parts = ["Connected"];
    const version = state.health?.version || state.hello?.server_version;
    if (version) parts.push(`TabAgent ${version}`);
    if (state.hello?.mode) parts.push(state.hello.mode);
    level = "ok";
    if (state.health) {
      const bad = Object.entries(state.health.components || {})
        .filter(([, c]) => c && !["ok", "off"].includes(c.state))
        .map(([name, c]) => `${name}: ${c.state}`);
      parts.push(state.health.status + (bad.length ? ` (${bad.join(", ")})` : ""));
      if (state.health.status !== "ok") level = "warn";
    }
    if (state.hostError) {
      parts.push(state.hostError);
      level = "warn";
    }
    text = parts.join(" · ");
  }
  if (state.opError) {
    text += ` — ${state.opError}`;
    level = "error";
  }
  els.status.textContent = text;
  els.status.title = text;
  els.status.dataset.level = level;
  document.body.dataset.connection = state.connected ? "connected" : "disconnected";
}

function errorText(err) {
  if (!err) return "unknown error";
  const message = err.message || String(err);
  return err.code && !message.includes(err.code) ? `${message} (${err.code})` : message;
}

function showError(err, what = "") {
  state.opError = (what ? `${what}: ` : "") + errorText(err);
  console.warn("TabAgent:", state.opError);
  renderStatus();
}

function clearError() {
  if (state.opError) {
    state.opError = null;
    renderStatus();
  }
}

client.onStatus((status) => {
  const was = state.connected;
  state.connected = status.connected;
  state.hello = status.hello;
  state.hostError = status.error;
  if (!status.connected) state.health = null;
  if (status.connected && !was) state.opError = null; // a fresh connection: old failures are stale
  renderStatus();
  if (status.connected && !was) refreshAll();
});

async function refreshAll() {
  const results = await Promise.allSettled([loadHealth(), loadModels(), loadConversations()]);
  const failed = results.find((r) => r.status === "rejected");
  if (failed && state.connected) showError(failed.reason, "Loading");
}

async function loadHealth() {
  state.health = await client.request("system.health", {});
  renderStatus();
}

setInterval(() => {
  if (state.connected) loadHealth().catch(() => {});
}, HEALTH_EVERY_MS);

// ---------------------------------------------------------------------------------------------
// Models

async function storageGet(key) {
  try {
    const got = await chrome.storage.local.get(key);
    return got?.[key];
  } catch {
    return undefined;
  }
}

async function loadModels() {
  const result = await client.request("models.list", {});
  const chat = (result?.data || []).filter((m) => m && m.kind === "chat");
  const saved = await storageGet(MODEL_KEY);
  const current = els.model.value;
  const options = chat.map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = m.id + (m.loaded ? " ●" : "");
    option.title = [m.description, m.loaded ? "loaded" : "not loaded"].filter(Boolean).join(" — ");
    return option;
  });
  if (!options.length) {
    const option = document.createElement("option");
    option.value = "";
    option.textContent = "Server default";
    options.push(option);
  }
  els.model.replaceChildren(...options);
  const ids = chat.map((m) => m.id);
  els.model.value = [current, saved].find((id) => id && ids.includes(id)) ?? ids[0] ?? "";
  els.model.disabled = false;
}

const maxTokensSelect = $("max-tokens");
storageGet(MAX_TOKENS_KEY).then((saved) => {
  if (saved && [...maxTokensSelect.options].some((o) => o.value === String(saved))) {
    maxTokensSelect.value = String(saved);
  }
});
maxTokensSelect.addEventListener("change", () => {
  chrome.storage.local
    .set({ [MAX_TOKENS_KEY]: maxTokensSelect.value })
    .catch((err) => showError(err, "Saving the answer length"));
});

els.model.addEventListener("change", () => {
  const value = els.model.value;
  chrome.storage.local.set({ [MODEL_KEY]: value }).catch((err) => showError(err, "Saving the model"));
});

// ---------------------------------------------------------------------------------------------
// Conversations

async function loadConversations(selectId = state.conversationId) {
  const result = await client.request("conversations.list", { limit: 50 });
  const list = result?.data || [];
  const options = [new Option("New conversation", "")];
  for (const conv of list) {
    const option = new Option(conversationLabel(conv), conv.id);
    if (conv.updated_at) option.title = new Date(conv.updated_at * 1000).toLocaleString();
    options.push(option);
  }
  if (selectId && !list.some((c) => c.id === selectId)) options.push(new Option("Current conversation", selectId));
  els.conversations.replaceChildren(...options);
  els.conversations.value = selectId || "";
}

function conversationLabel(conv) {
  const title = (conv.title || "").trim() || "Untitled";
  return title.length > 80 ? `${title.slice(0, 79)}…` : title;
}

els.conversations.addEventListener("change", () => {
  clearError();
  openConversation(els.conversations.value);
});

async function openConversation(id) {
  disarmDelete();
  state.conversationId = id;
  const token = ++state.loadToken;
  clearMessages();
  updateControls();
  if (!id) return;
  els.messages.setAttribute("aria-busy", "true");
  try {
    const result = await client.request("conversations.messages", { id });
    if (token !== state.loadToken) return;
    els.messages.replaceChildren();
    for (const message of result?.data || []) {
      const role = ["user", "assistant"].includes(message.role) ? message.role : "system";
      addMessage(role, message.content || "", { state: "done" });
    }
    if (!els.messages.children.length) showEmpty("No messages yet.");
    scrollToEnd(true);
  } catch (err) {
    if (token === state.loadToken) showError(err, "Loading the conversation");
  } finally {
    if (token === state.loadToken) els.messages.removeAttribute("aria-busy");
  }
}

function newChat() {
  clearError();
  disarmDelete();
  state.loadToken += 1;
  state.conversationId = "";
  els.conversations.value = "";
  clearMessages();
  updateControls();
  els.prompt.focus();
}

els.newChat.addEventListener("click", newChat);

function disarmDelete() {
  clearTimeout(state.deleteArmed);
  state.deleteArmed = null;
  els.deleteChat.classList.remove("confirm");
  els.deleteChat.textContent = "Delete";
  els.deleteChat.title = "Delete this conversation";
}

els.deleteChat.addEventListener("click", async () => {
  const id = state.conversationId;
  if (!id) return;
  if (!state.deleteArmed) {
    // First click arms, a second click within 4 s deletes.
    els.deleteChat.classList.add("confirm");
    els.deleteChat.textContent = "Confirm";
    els.deleteChat.title = "Click again to delete this conversation";
    state.deleteArmed = setTimeout(disarmDelete, 4000);
    return;
  }
  disarmDelete();
  try {
    await client.request("conversations.delete", { id });
    clearError();
    if (state.conversationId === id) newChat();
    await loadConversations();
  } catch (err) {
    showError(err, "Deleting the conversation");
  }
});

// ---------------------------------------------------------------------------------------------
// Messages

function showEmpty(text = "Ask anything. Your conversations are kept by your local TabAgent server.") {
  const p = document.createElement("p");
  p.className = "empty";
  p.textContent = text;
  els.messages.replaceChildren(p);
}

function clearMessages() {
  showEmpty();
}

function nearBottom() {
  const m = els.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 40;
}

function scrollToEnd(force = false) {
  if (force || nearBottom()) els.messages.scrollTop = els.messages.scrollHeight;
}

/** Split stored user content into its page context and the question, if it carries one. */
function splitPageContext(content) {
  if (!content.startsWith(PAGE_CONTEXT_PREFIX)) return { context: null, text: content };
  const at = content.indexOf(PAGE_CONTEXT_SEPARATOR);
  if (at < 0) return { context: content, text: "" };
  return { context: content.slice(0, at), text: content.slice(at + PAGE_CONTEXT_SEPARATOR.length) };
}

/**
 * Add a message element: div.message.<role> holding span.text (only the message text, so the
 * element's textContent is the message). User messages with page context get a collapsed
 * <details> before the text. Assistant messages carry data-state.
 */
function addMessage(role, content, { state: messageState, page = null } = {}) {
  els.messages.querySelector(":scope > .empty")?.remove();
  const element = document.createElement("div");
  element.className = `message ${role}`;
  let text = content;
  if (role === "user") {
    const split = splitPageContext(content);
    text = split.text;
    const context = page ? pageContext(page) : split.context;
    if (context) {
      const details = document.createElement("details");
      const summary = document.createElement("summary");
      const firstLine = context.split("\n", 1)[0];
      summary.textContent = page ? `Page: ${page.title || page.url}` : firstLine.replace(/:$/, "");
      const pre = document.createElement("pre");
      pre.textContent = context;
      details.append(summary, pre);
      element.append(details);
    }
  }
  const span = document.createElement("span");
  span.className = "text";
  const node = document.createTextNode(text);
  span.append(node);
  element.append(span);
  if (role === "assistant") element.dataset.state = messageState || "done";
  els.messages.append(element);
  scrollToEnd(true);
  return { element, node };
}

// ---------------------------------------------------------------------------------------------
// "Use page"

/** Runs in the page (chrome.scripting): its readable text, whitespace-collapsed. */
function readPage() {
  const root = document.querySelector("article") || document.querySelector("main") || document.body;
  const raw = root ? root.innerText || root.textContent || "" : "";
  return { title: document.title, url: location.href, text: raw.replace(/\s+/g, " ").trim() };
}

async function capturePage() {
  const tabs = await chrome.tabs.query({});
  const candidates = tabs
    .filter((t) => /^https?:\/\//i.test(t.url || ""))
    // lastAccessed exists from Chrome 121; before that, prefer the active tab of a window.
    .sort((a, b) => (b.lastAccessed ?? (b.active ? 1 : 0)) - (a.lastAccessed ?? (a.active ? 1 : 0)));
  if (!candidates.length) throw new Error("no web page (http or https tab) is open");
  const tab = candidates[0];
  const [injection] = await chrome.scripting.executeScript({ target: { tabId: tab.id }, func: readPage });
  const page = injection?.result;
  if (!page || typeof page.text !== "string") throw new Error(`could not read ${tab.url}`);
  return { title: page.title || tab.title || page.url, url: page.url || tab.url, text: page.text };
}

function pageContext(page) {
  const header = `${PAGE_CONTEXT_PREFIX}"${page.title}" (${page.url}):\n`;
  let body = page.text;
  const room = PAGE_CONTEXT_LIMIT - header.length;
  if (body.length > room) {
    const note = ` […page text trimmed: the first ${room - 80} of ${body.length} characters are included]`;
    body = body.slice(0, room - 80) + note;
  }
  return header + body;
}

function setUsePage(on) {
  state.usePage = on;
  els.usePage.setAttribute("aria-pressed", String(on));
  if (!on) {
    state.page = null;
    state.pagePromise = null;
    els.chip.hidden = true;
    els.chipText.textContent = "";
  }
}

function attachPage() {
  setUsePage(true);
  els.chip.hidden = false;
  els.chipText.textContent = "Page: reading…";
  const promise = capturePage();
  state.pagePromise = promise;
  promise.then(
    (page) => {
      if (state.pagePromise !== promise) return;
      state.page = page;
      els.chipText.textContent = `Page: ${page.title}`;
      els.chip.title = page.url;
      document.body.dataset.page = page.url;
    },
    (err) => {
      if (state.pagePromise !== promise) return;
      setUsePage(false);
      showError(err, "Use page");
    },
  );
  promise.catch(() => {}); // handled above; send() awaits it again
}

function detachPage() {
  setUsePage(false);
  delete document.body.dataset.page;
}

els.usePage.addEventListener("click", () => {
  clearError();
  if (state.usePage) detachPage();
  else attachPage();
});
els.chipRemove.addEventListener("click", detachPage);

// ---------------------------------------------------------------------------------------------
// Sending and streaming

function titleFrom(text) {
  const line = text.replace(/\s+/g, " ").trim();
  return line.length > TITLE_CHARS ? line.slice(0, TITLE_CHARS).trimEnd() : line;
}

function updateControls() {
  const busy = state.sending || !!state.streaming;
  els.send.disabled = busy;
  els.stop.disabled = !state.streaming;
  els.conversations.disabled = busy;
  els.newChat.disabled = busy;
  els.deleteChat.disabled = busy || !state.conversationId;
  if (els.deleteChat.disabled) disarmDelete();
}

async function send() {
  const text = els.prompt.value.trim();
  if (!text || state.sending || state.streaming) return;
  clearError();
  state.sending = true;
  updateControls();
  let conversationId = state.conversationId;
  let page = null;
  let step = "Use page";
  try {
    if (state.usePage) page = state.page || (await state.pagePromise) || null;
    step = "Creating the conversation";
    if (!conversationId) {
      const created = await client.request("conversations.create", { title: titleFrom(text) });
      conversationId = created.id;
      state.conversationId = conversationId;
      state.loadToken += 1;
      loadConversations(conversationId).catch((err) => showError(err, "Listing conversations"));
    }
  } catch (err) {
    state.sending = false;
    updateControls();
    showError(err, step);
    return;
  }

  const content = page ? `${pageContext(page)}${PAGE_CONTEXT_SEPARATOR}${text}` : text;
  els.prompt.value = "";
  if (page) setUsePage(false); // the page goes with this one message
  addMessage("user", text, { page });
  const { element, node } = addMessage("assistant", "", { state: "streaming" });

  const params = {
    conversation_id: conversationId,
    messages: [{ role: "user", content }],
    max_tokens: Number(maxTokensSelect.value) || MAX_TOKENS,
  };
  if (els.model.value) params.model = els.model.value;

  let finished = false;
  const handle = client.stream("chat.complete", params, (message) => {
    if (finished || message.event !== "delta") return;
    const piece = message.data?.text;
    if (typeof piece === "string" && piece) {
      const follow = nearBottom();
      node.appendData(piece);
      if (follow) scrollToEnd(true);
    }
  });
  let graceTimer = null;
  const finish = (stateName, meta) => {
    if (finished) return;
    finished = true;
    clearTimeout(graceTimer);
    element.dataset.state = stateName;
    if (meta) element.dataset.meta = meta;
    state.streaming = null;
    state.sending = false;
    updateControls();
    loadConversations(conversationId).catch(() => {});
    if (document.activeElement === document.body || document.activeElement === els.stop) els.prompt.focus();
  };
  state.streaming = {
    handle,
    element,
    cancel() {
      handle.cancel();
      // If the host never confirms the cancel, stop waiting for it after a grace period.
      graceTimer ??= setTimeout(() => finish("cancelled", "stopped"), CANCEL_GRACE_MS);
    },
  };
  state.sending = false;
  updateControls();

  try {
    const done = await handle.done;
    finish("done", doneMeta(done));
  } catch (err) {
    if (err?.code === "cancelled") {
      finish("cancelled", "stopped");
    } else {
      finish("error", errorText(err));
      showError(err, "Chat");
    }
  }
}

function doneMeta(done) {
  if (!done) return "";
  const parts = [];
  if (done.model) parts.push(done.model);
  if (done.usage?.completion_tokens != null) parts.push(`${done.usage.completion_tokens} tokens`);
  if (typeof done.tokens_per_second === "number") parts.push(`${done.tokens_per_second.toFixed(1)} tok/s`);
  if (done.finish_reason && done.finish_reason !== "stop") parts.push(`finish: ${done.finish_reason}`);
  const recalled = done.memory?.memories?.length;
  if (recalled) parts.push(`${recalled} ${recalled === 1 ? "memory" : "memories"} recalled`);
  return parts.join(" · ");
}

els.send.addEventListener("click", () => send());
els.stop.addEventListener("click", () => state.streaming?.cancel());
els.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});

renderStatus();
updateControls();
els.prompt.focus();
