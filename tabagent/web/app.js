// TabAgent's page: chat with a local model over a WebRTC data channel (HTTP server-sent events as
// the fallback), latency figures, and camera face detection over the same peer connection.
//
// Test hooks: globalThis.tabagentPage (at the end of this file).

import { RtcClient, TabAgentError } from "./lib/rtc.js";
import { listModels, streamChat } from "./lib/sse.js";

const SYSTEM_PROMPT = "You are a helpful assistant.";
const PING_MS = 5000;
const PING_TIMEOUT_MS = 10000;
const FIRST_RETRY_MS = 1000;
const MAX_RETRY_MS = 15000;
const RTC_FAILURES_BEFORE_FALLBACK = 3;
const MODELS_TIMEOUT_MS = 15000;
const MODELS_RETRY_MS = 5000;
const STOP_WAIT_MS = 2000;

const $ = (id) => document.getElementById(id);
const ui = {
  header: document.querySelector("header.top"),
  status: $("status"),
  transport: $("transport"),
  model: $("model"),
  maxTokens: $("max-tokens"),
  newChat: $("new-chat"),
  messages: $("messages"),
  composer: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  connectMs: $("connect-ms"),
  rttMs: $("rtt-ms"),
  ttftMs: $("ttft-ms"),
  tps: $("tps"),
  cameraStart: $("camera-start"),
  cameraStop: $("camera-stop"),
  fps: $("fps"),
  stage: $("stage"),
  video: $("video"),
  overlay: $("overlay"),
  facesStats: $("faces-stats"),
  cameraStatus: $("camera-status"),
};

const forcedSse = new URLSearchParams(location.search).get("transport") === "sse";

const state = {
  /** @type {"webrtc" | "sse" | null} */
  transport: null,
  /** @type {RtcClient | null} */
  client: null,
  /** @type {string | null} why WebRTC can never work here (no API, server without it) */
  webrtcBlocked: null,
  everConnectedRtc: false,
  connecting: false,
  /** counts connections made, so work tied to an old one can tell it is stale */
  generation: 0,
  ready: deferred(),
  pingTimer: 0,
  pingInFlight: false,
  /** @type {{role: string, content: string}[]} user and assistant turns (no system message) */
  history: [],
  chatEpoch: 0,
  busy: false,
  /** @type {{stop: () => void} | null} the answer being generated */
  current: null,
  lastRun: null,
  faces: { events: 0, last: null },
};

const camera = {
  /** @type {MediaStream | null} */
  stream: null,
  /** @type {MediaStreamTrack | null} */
  track: null,
  starting: false,
  /** bumped whenever the faces request changes, so late replies of an old one are ignored */
  token: 0,
  /** @type {{id: string, client: RtcClient, settled: Promise<void>} | null} */
  request: null,
};

// ---------------------------------------------------------------------------------------------
// small helpers

function deferred() {
  let resolve;
  const promise = new Promise((r) => (resolve = r));
  return { promise, resolve, settled: false };
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** A readable sentence for any error. */
function describeError(err) {
  if (err instanceof TabAgentError) {
    return err.message.includes(err.code) ? err.message : `${err.message} (${err.code})`;
  }
  return err?.message || String(err);
}

function formatMs(ms) {
  return ms == null || !Number.isFinite(ms) ? "–" : String(Math.round(ms));
}

function formatRate(value) {
  return value == null || !Number.isFinite(value) ? "–" : value.toFixed(1);
}

// ---------------------------------------------------------------------------------------------
// connection

/**
 * @param {string} text
 * @param {"webrtc" | "sse" | ""} transport
 * @param {"connecting" | "connected" | "fallback" | "disconnected"} kind
 */
function setStatus(text, transport, kind) {
  ui.status.textContent = text;
  ui.transport.textContent = transport;
  ui.header.dataset.state = kind;
}

/** Failures that retrying cannot fix: no WebRTC in the browser, or a server that does not serve it
 * (404; 405 too, since the web UI's catch-all GET route owns the path in http-only mode). */
function isPermanentRtcFailure(err) {
  return (
    err?.code === "webrtc_unavailable" || err?.code === "webrtc_disabled" || err?.status === 404 || err?.status === 405
  );
}

/**
 * Connect (WebRTC first unless told or known otherwise, then HTTP), list the models, resolve
 * `ready`. Retries with backoff until it succeeds.
 *
 * @param {number} firstDelay ms to wait before the first attempt (0 on page load)
 * @param {string} [lostReason] why the previous connection ended
 */
async function connectAndLoad(firstDelay, lostReason = "") {
  if (state.connecting) return;
  state.connecting = true;
  let models;
  try {
    models = await connectLoop(firstDelay, lostReason);
  } finally {
    state.connecting = false;
  }
  const client = state.client;
  await loadModels(models);
  if (state.client !== client || !state.transport) return; // lost meanwhile; a new attempt runs
  await resumeCamera();
  updateControls();
  state.ready.settled = true;
  state.ready.resolve();
}

/** @returns {Promise<any>} the model list when the connection produced one already */
async function connectLoop(firstDelay, lostReason) {
  let delay = firstDelay;
  let reason = lostReason;
  let rtcFailures = 0;
  for (;;) {
    if (delay) {
      setStatus(`disconnected: ${reason} (retrying in ${delay / 1000} s)`, "", "disconnected");
      await sleep(delay);
    }
    setStatus("connecting…", "", "connecting");
    let fallback = forcedSse ? "requested with ?transport=sse" : state.webrtcBlocked;
    if (!fallback) {
      try {
        await connectWebrtc();
        return null;
      } catch (err) {
        console.error("TabAgent: WebRTC connection failed", err);
        rtcFailures += 1;
        reason = describeError(err);
        if (isPermanentRtcFailure(err)) {
          state.webrtcBlocked = err.status === 404 || err.status === 405 ? `this server does not offer WebRTC (HTTP ${err.status})` : reason;
        }
        if (state.webrtcBlocked || !state.everConnectedRtc) fallback = state.webrtcBlocked ?? reason;
        else if (rtcFailures >= RTC_FAILURES_BEFORE_FALLBACK) {
          fallback = `WebRTC failed ${rtcFailures} times (${reason})`;
        }
      }
    }
    if (fallback) {
      try {
        return await connectSse(fallback);
      } catch (err) {
        console.error("TabAgent: HTTP connection failed", err);
        reason = describeError(err);
      }
    }
    delay = delay ? Math.min(delay * 2, MAX_RETRY_MS) : FIRST_RETRY_MS;
  }
}

async function connectWebrtc() {
  const client = new RtcClient({ onClose: (reason) => onRtcLost(client, reason) });
  const { connectMs } = await client.connect();
  state.client = client;
  state.transport = "webrtc";
  state.generation += 1;
  state.everConnectedRtc = true;
  ui.connectMs.textContent = formatMs(connectMs);
  setStatus("connected over WebRTC", "webrtc", "connected");
  startPing(client);
  updateControls();
}

/**
 * Fetching the model list is the connection check: any answer from the server (even an error
 * such as `ml_disabled`) means it is reachable.
 *
 * @returns {Promise<any>} the model list, or the server's error about it
 */
async function connectSse(reason) {
  let models;
  try {
    models = await listModels();
  } catch (err) {
    if (!(err instanceof TabAgentError) || err.status === null) throw err; // unreachable
    models = err;
  }
  state.client = null;
  state.transport = "sse";
  state.generation += 1;
  ui.connectMs.textContent = "–";
  ui.rttMs.textContent = "–";
  setStatus(`connected over HTTP (SSE fallback): ${reason}`, "sse", "fallback");
  updateControls();
  return models;
}

/** The peer connection or channel of the live client went away: show it and reconnect. */
function onRtcLost(client, reason) {
  if (state.client !== client) return;
  console.error(`TabAgent: WebRTC connection lost: ${reason}`);
  state.client = null;
  state.transport = null;
  stopPing();
  ui.rttMs.textContent = "–";
  if (state.ready.settled) state.ready = deferred();
  setStatus(`disconnected: ${reason}`, "", "disconnected");
  updateControls();
  connectAndLoad(FIRST_RETRY_MS, reason);
}

function startPing(client) {
  stopPing();
  const ping = async () => {
    if (state.pingInFlight || state.client !== client) return;
    state.pingInFlight = true;
    const started = performance.now();
    try {
      await client.call("system.health", {}, { timeoutMs: PING_TIMEOUT_MS });
      if (state.client === client) ui.rttMs.textContent = formatMs(performance.now() - started);
    } catch (err) {
      if (state.client === client) {
        console.error("TabAgent: ping failed", err);
        ui.rttMs.textContent = "–";
      }
    } finally {
      state.pingInFlight = false;
    }
  };
  ping();
  state.pingTimer = setInterval(ping, PING_MS);
}

function stopPing() {
  clearInterval(state.pingTimer);
  state.pingTimer = 0;
}

// ---------------------------------------------------------------------------------------------
// models

/**
 * Show the chat models (`models` when the connection fetched them already). On failure the
 * select says why, and the list is fetched again every few seconds while the connection lasts.
 *
 * @param {any} [models] a model list, or an Error the server answered
 * @returns {Promise<boolean>} whether the models are shown
 */
async function loadModels(models) {
  const generation = state.generation;
  try {
    models ??= await fetchModels();
    if (models instanceof Error) throw models;
    applyModels(models);
    return true;
  } catch (err) {
    console.error("TabAgent: listing the models failed", err);
    showModelError(`models unavailable: ${describeError(err)}`);
    setTimeout(() => {
      if (state.generation === generation && state.transport) loadModels();
    }, MODELS_RETRY_MS);
    return false;
  }
}

async function fetchModels() {
  if (state.transport === "webrtc" && state.client) {
    return state.client.call("models.list", {}, { timeoutMs: MODELS_TIMEOUT_MS });
  }
  return listModels();
}

/** Fill #model with the chat models; keep the current choice, else the first loaded, else the first. */
function applyModels(list) {
  const chat = (list?.data ?? []).filter((model) => model.kind === "chat");
  const previous = ui.model.value;
  if (!chat.length) {
    showModelError("no chat models");
    return;
  }
  const options = chat.map((model) => {
    const option = new Option(model.id, model.id);
    option.title = [model.description, model.loaded ? "loaded" : "not loaded yet"].filter(Boolean).join(" · ");
    return option;
  });
  ui.model.replaceChildren(...options);
  const pick = chat.find((m) => m.id === previous) ?? chat.find((m) => m.loaded) ?? chat[0];
  ui.model.value = pick.id;
  ui.model.disabled = false;
}

function showModelError(text) {
  ui.model.replaceChildren(new Option(text, ""));
  ui.model.disabled = true;
}

// ---------------------------------------------------------------------------------------------
// chat view

function isNearBottom() {
  const el = ui.messages;
  return el.scrollHeight - el.scrollTop - el.clientHeight < 40;
}

function scrollToEnd(force) {
  if (force || isNearBottom()) ui.messages.scrollTop = ui.messages.scrollHeight;
}

function addUserBubble(text) {
  const bubble = document.createElement("div");
  bubble.className = "msg user";
  bubble.textContent = text;
  ui.messages.append(bubble);
  scrollToEnd(true);
}

/** An assistant bubble whose text grows with the deltas. */
function addAssistantBubble() {
  const bubble = document.createElement("div");
  bubble.className = "msg assistant streaming";
  const textEl = document.createElement("span");
  textEl.className = "text";
  const textNode = document.createTextNode("");
  textEl.append(textNode);
  bubble.append(textEl);
  ui.messages.append(bubble);
  scrollToEnd(true);
  return {
    append(text) {
      const follow = isNearBottom();
      textNode.appendData(text);
      if (follow) scrollToEnd(true);
    },
    finish({ note, noteIsError, meta }) {
      bubble.classList.remove("streaming");
      if (note) {
        const noteEl = document.createElement("span");
        noteEl.className = noteIsError ? "note error" : "note";
        noteEl.textContent = (textNode.length ? " " : "") + note;
        bubble.append(noteEl);
      }
      if (meta) {
        const metaEl = document.createElement("span");
        metaEl.className = "meta";
        metaEl.textContent = meta;
        bubble.append(metaEl);
      }
      scrollToEnd(false);
    },
  };
}

function updateControls() {
  const connected = state.transport !== null;
  ui.send.disabled = state.busy || !connected;
  ui.stop.disabled = !state.busy;
  updateCameraControls();
}

function readMaxTokens() {
  const value = Number.parseInt(ui.maxTokens.value, 10);
  if (!Number.isInteger(value) || value < 1) {
    ui.maxTokens.value = "256";
    return 256;
  }
  return value;
}

// ---------------------------------------------------------------------------------------------
// chat runs

/**
 * Send one user message and stream the answer; the same as typing it and pressing Send.
 * Resolves with `lastRun` once the answer finished (also when it was stopped or failed).
 *
 * @param {string} text
 * @returns {Promise<{text: string, ttftMs: number | null, tokensPerSecond: number | null,
 *   finishReason: string | null, stopped: boolean, error: string | null, model: string | null}>}
 */
async function send(text) {
  const prompt = String(text ?? "").trim();
  if (!prompt) throw new Error("nothing to send: the message is empty");
  if (state.busy) throw new Error("an answer is still being generated; stop it first");
  if (!state.transport) throw new Error("not connected to the server yet");

  const epoch = state.chatEpoch;
  state.history.push({ role: "user", content: prompt });
  addUserBubble(prompt);
  const view = addAssistantBubble();
  const params = {
    messages: [{ role: "system", content: SYSTEM_PROMPT }, ...state.history],
    max_tokens: readMaxTokens(),
  };
  if (ui.model.value) params.model = ui.model.value;

  const run = { text: "", started: performance.now(), first: null, last: null, deltas: 0, model: null };
  const onDelta = (piece, model) => {
    if (!piece) return;
    const now = performance.now();
    if (run.first === null) {
      run.first = now;
      ui.ttftMs.textContent = formatMs(now - run.started);
    }
    run.last = now;
    run.deltas += 1;
    run.text += piece;
    if (model) run.model = model;
    view.append(piece);
  };
  const current = { stop: () => {} };
  state.current = current;
  state.busy = true;
  updateControls();

  let outcome;
  try {
    outcome = state.transport === "webrtc" ? await runRtc(params, onDelta, current) : await runSse(params, onDelta, current);
  } catch (err) {
    console.error("TabAgent: the answer failed", err);
    outcome = { error: err };
  }
  finishRun(run, outcome, view, epoch);
  state.current = null;
  state.busy = false;
  updateControls();
  return state.lastRun;
}

async function runRtc(params, onDelta, current) {
  const client = state.client;
  const { id, done } = client.request("chat.complete", params, (reply) => {
    if (reply.event === "delta") onDelta(reply.data?.text, reply.data?.model);
  });
  current.stop = () => {
    client.cancel(id).catch((err) => {
      console.error("TabAgent: cancel failed", err);
      showTransientStatus(`could not stop the answer: ${describeError(err)}`);
    });
  };
  try {
    const data = await done;
    return {
      finishReason: data?.finish_reason ?? null,
      usage: data?.usage ?? null,
      tokensPerSecond: data?.tokens_per_second ?? null,
      model: data?.model ?? null,
    };
  } catch (err) {
    if (err.code === "cancelled") return { stopped: true };
    throw err;
  }
}

async function runSse(params, onDelta, current) {
  const controller = new AbortController();
  current.stop = () => controller.abort();
  try {
    const result = await streamChat(params, { signal: controller.signal, onDelta });
    return { finishReason: result.finishReason, usage: result.usage, tokensPerSecond: null, model: result.model };
  } catch (err) {
    if (err?.name === "AbortError") return { stopped: true };
    throw err;
  }
}

/** Tokens per second: the server's figure, else completion tokens (or deltas) over the stream time. */
function tokensPerSecond(run, outcome) {
  if (outcome.tokensPerSecond > 0) return outcome.tokensPerSecond;
  const tokens = outcome.usage?.completion_tokens ?? run.deltas;
  if (run.first === null || tokens < 2 || run.last <= run.first) return null;
  return ((tokens - 1) * 1000) / (run.last - run.first);
}

function finishRun(run, outcome, view, epoch) {
  const stopped = Boolean(outcome.stopped);
  const error = outcome.error ? describeError(outcome.error) : null;
  const ttftMs = run.first === null ? null : run.first - run.started;
  const tps = error ? null : tokensPerSecond(run, outcome);
  state.lastRun = {
    text: run.text,
    ttftMs,
    tokensPerSecond: tps,
    finishReason: error ? "error" : stopped ? "stopped" : outcome.finishReason ?? null,
    stopped,
    error,
    model: outcome.model ?? run.model,
  };
  ui.ttftMs.textContent = formatMs(ttftMs);
  ui.tps.textContent = formatRate(tps);

  const tokens = outcome.usage?.completion_tokens;
  const meta = [
    tokens != null ? `${tokens} tokens` : null,
    tps != null ? `${formatRate(tps)} tok/s` : null,
    ttftMs != null ? `TTFT ${formatMs(ttftMs)} ms` : null,
    outcome.finishReason === "length" ? "cut at max tokens" : null,
  ].filter(Boolean);
  view.finish({
    note: error ? `error: ${error}` : stopped ? "(stopped)" : run.text ? "" : "(empty answer)",
    noteIsError: Boolean(error),
    meta: meta.join(" · "),
  });

  if (epoch !== state.chatEpoch) return; // "New chat" was pressed meanwhile
  if (run.text) state.history.push({ role: "assistant", content: run.text });
  else state.history.pop(); // nothing answered: drop the question from the history too
}

function stopGenerating() {
  state.current?.stop();
}

function newChat() {
  stopGenerating();
  state.chatEpoch += 1;
  state.history = [];
  ui.messages.replaceChildren();
  ui.prompt.focus();
}

function submitPrompt() {
  const text = ui.prompt.value;
  if (!text.trim() || state.busy || !state.transport) return;
  ui.prompt.value = "";
  send(text).catch((err) => {
    console.error("TabAgent: cannot send", err);
    ui.prompt.value = text;
    showTransientStatus(`cannot send: ${describeError(err)}`);
  });
}

/** A short message in the status line that the next status change replaces. */
function showTransientStatus(text) {
  ui.status.textContent = `${ui.status.textContent.split(" · ")[0]} · ${text}`;
}

// ---------------------------------------------------------------------------------------------
// camera and faces

function setCameraStatus(text, isError = false) {
  ui.cameraStatus.textContent = text;
  ui.cameraStatus.classList.toggle("error", isError);
}

function updateCameraControls() {
  const rtc = state.transport === "webrtc" && state.client !== null;
  ui.cameraStart.disabled = !rtc || camera.track !== null || camera.starting;
  ui.cameraStop.disabled = camera.track === null;
  if (state.transport === "sse" && camera.track === null) {
    setCameraStatus("The camera needs a WebRTC connection; this page is using HTTP (SSE) now.");
  } else if (rtc && ui.cameraStatus.textContent.startsWith("The camera needs")) {
    setCameraStatus("");
  }
}

function setFps(fps) {
  const value = String(fps);
  if (![...ui.fps.options].some((option) => option.value === value)) {
    ui.fps.append(new Option(value, value));
  }
  ui.fps.value = value;
}

function cameraErrorText(err) {
  switch (err?.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "camera permission denied";
    case "NotFoundError":
    case "OverconstrainedError":
      return "no camera found";
    case "NotReadableError":
      return "the camera is in use by another application";
    default:
      return `the camera could not start: ${describeError(err)}`;
  }
}

/**
 * Start the camera, send it over the peer connection and ask for face detection.
 *
 * @param {number} [fps] frames per second to analyse (the #fps choice when left out)
 * @returns {Promise<void>} resolves once the `video.faces` request is sent
 */
async function startCamera(fps) {
  const changed = fps != null && String(fps) !== ui.fps.value;
  if (fps != null) setFps(fps);
  if (camera.track) {
    if (changed) await restartFaces();
    return;
  }
  if (camera.starting) throw new Error("the camera is already starting");
  if (state.transport !== "webrtc" || !state.client) {
    const text = "The camera needs a WebRTC connection.";
    setCameraStatus(text, true);
    throw new Error(text);
  }
  camera.starting = true;
  updateCameraControls();
  setCameraStatus("starting the camera…");
  try {
    await openCamera();
    await state.client.setVideoTrack(camera.track);
    startFaces(state.client);
  } catch (err) {
    console.error("TabAgent: starting the camera failed", err);
    const text = err instanceof DOMException ? cameraErrorText(err) : `the camera could not start: ${describeError(err)}`;
    await releaseCamera();
    setCameraStatus(text, true);
    throw new Error(text);
  } finally {
    camera.starting = false;
    updateCameraControls();
  }
}

async function openCamera() {
  if (!navigator.mediaDevices?.getUserMedia) {
    throw new Error("this browser gives no camera access here (it needs localhost or https)");
  }
  const stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
  const track = stream.getVideoTracks()[0];
  camera.stream = stream;
  camera.track = track;
  track.addEventListener("ended", () => {
    if (camera.track !== track) return;
    stopCamera().then(
      () => setCameraStatus("the camera stopped (unplugged or taken away)", true),
      (err) => console.error("TabAgent: stopping the camera failed", err),
    );
  });
  ui.video.srcObject = stream;
  ui.stage.dataset.state = "on";
  ui.video.play().catch((err) => console.error("TabAgent: the video preview does not play", err));
}

/** Send a `video.faces` request at the chosen fps on `client`. */
function startFaces(client) {
  const token = ++camera.token;
  const fps = Number(ui.fps.value);
  const { id, done } = client.request("video.faces", { fps }, (reply) => {
    if (reply.event === "faces" && token === camera.token) onFaces(reply.data);
  });
  camera.request = { id, client, settled: done.then(() => {}, () => {}) };
  setCameraStatus(`detecting faces at ${fps} fps`);
  done.then(
    (data) => {
      if (token !== camera.token) return;
      camera.request = null;
      setCameraStatus(`face detection ended: ${data?.analyzed ?? 0} frames analysed, ${data?.dropped ?? 0} dropped`);
    },
    (err) => onFacesError(token, err),
  );
}

function onFacesError(token, err) {
  if (token !== camera.token) return;
  camera.request = null;
  if (err.code === "cancelled") return;
  if (err.code === "disconnected") {
    setCameraStatus("connection lost; face detection resumes once reconnected", true);
    return;
  }
  console.error("TabAgent: face detection failed", err);
  const text = err.code === "no_video_track" ? "the server received no video track" : describeError(err);
  stopCamera().then(
    () => setCameraStatus(`face detection failed: ${text}`, true),
    (stopErr) => console.error("TabAgent: stopping the camera failed", stopErr),
  );
}

/** Cancel the running `video.faces` request and wait (briefly) for it to end. */
async function stopFaces() {
  const request = camera.request;
  camera.token += 1;
  camera.request = null;
  if (!request) return;
  if (request.client.connected) {
    try {
      await request.client.cancel(request.id);
    } catch (err) {
      console.error("TabAgent: cancelling face detection failed", err);
    }
  }
  await Promise.race([request.settled, sleep(STOP_WAIT_MS)]);
}

async function restartFaces() {
  await stopFaces();
  if (camera.track && state.transport === "webrtc" && state.client) startFaces(state.client);
}

/**
 * Stop face detection and the camera, and clear the overlay.
 *
 * @returns {Promise<void>}
 */
async function stopCamera() {
  await stopFaces();
  await releaseCamera();
  setCameraStatus("camera stopped");
  updateCameraControls();
}

async function releaseCamera() {
  const stream = camera.stream;
  camera.stream = null;
  camera.track = null;
  if (state.client?.connected) {
    try {
      await state.client.setVideoTrack(null);
    } catch (err) {
      console.error("TabAgent: detaching the camera failed", err);
    }
  }
  stream?.getTracks().forEach((track) => track.stop());
  ui.video.srcObject = null;
  ui.stage.dataset.state = "off";
  clearOverlay();
}

/** After a reconnect: put the running camera on the new connection, or stop it without WebRTC. */
async function resumeCamera() {
  if (!camera.track) return;
  if (state.transport !== "webrtc" || !state.client) {
    await stopCamera();
    setCameraStatus("The camera needs a WebRTC connection; this page is using HTTP (SSE) now.", true);
    return;
  }
  try {
    await state.client.setVideoTrack(camera.track);
    startFaces(state.client);
  } catch (err) {
    console.error("TabAgent: resuming the camera failed", err);
    setCameraStatus(`the camera could not resume: ${describeError(err)}`, true);
  }
}

function onFaces(data) {
  state.faces.events += 1;
  state.faces.last = data;
  drawFaces(data);
  const count = data?.faces?.length ?? 0;
  ui.facesStats.textContent =
    [
      `${count} face${count === 1 ? "" : "s"}`,
      `analysed ${data?.analyzed ?? "–"}`,
      `dropped ${data?.dropped ?? "–"}`,
      `inference ${formatMs(data?.inference_ms)} ms`,
      `latency ${formatMs(data?.latency_ms)} ms`,
    ]
      .map((part) => part.replaceAll(" ", "\u00a0")) // wrap between the figures, not inside one
      .join(" · ");
}

/** Size the canvas to its box; return its 2D context and the video's drawn area inside it. */
function prepareOverlay(frameWidth, frameHeight) {
  const canvas = ui.overlay;
  const dpr = window.devicePixelRatio || 1;
  const width = Math.max(1, Math.round(canvas.clientWidth * dpr));
  const height = Math.max(1, Math.round(canvas.clientHeight * dpr));
  if (canvas.width !== width) canvas.width = width;
  if (canvas.height !== height) canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  // the video is letterboxed (object-fit: contain): find where the frame lands
  const scale = frameWidth && frameHeight ? Math.min(width / frameWidth, height / frameHeight) : 0;
  const w = scale ? frameWidth * scale : width;
  const h = scale ? frameHeight * scale : height;
  return { ctx, dpr, x: (width - w) / 2, y: (height - h) / 2, w, h };
}

function drawFaces(data) {
  const frameWidth = ui.video.videoWidth || data?.width;
  const frameHeight = ui.video.videoHeight || data?.height;
  const { ctx, dpr, x, y, w, h } = prepareOverlay(frameWidth, frameHeight);
  ctx.lineWidth = 2 * dpr;
  ctx.strokeStyle = "#22c55e";
  ctx.shadowColor = "rgba(0, 0, 0, 0.7)"; // keeps green visible on light or green pictures
  ctx.shadowBlur = 3 * dpr;
  ctx.fillStyle = "#22c55e";
  ctx.font = `${12 * dpr}px system-ui, sans-serif`;
  ctx.textBaseline = "bottom";
  for (const face of data?.faces ?? []) {
    const [bx, by, bw, bh] = face.box ?? [0, 0, 0, 0];
    const left = x + bx * w;
    const top = y + by * h;
    ctx.strokeRect(left, top, bw * w, bh * h);
    if (typeof face.score === "number") {
      ctx.fillText(`${Math.round(face.score * 100)}%`, left + 2 * dpr, Math.max(top - 2 * dpr, 12 * dpr));
    }
    for (const point of face.keypoints ?? []) {
      ctx.beginPath();
      ctx.arc(x + point.x * w, y + point.y * h, 2.5 * dpr, 0, 2 * Math.PI);
      ctx.fill();
    }
  }
}

function clearOverlay() {
  const canvas = ui.overlay;
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

// ---------------------------------------------------------------------------------------------
// wiring

function wireEvents() {
  ui.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    submitPrompt();
  });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submitPrompt();
    }
  });
  ui.stop.addEventListener("click", stopGenerating);
  ui.newChat.addEventListener("click", newChat);
  ui.cameraStart.addEventListener("click", () => startCamera().catch(() => {})); // shown in #camera-status
  ui.cameraStop.addEventListener("click", () =>
    stopCamera().catch((err) => {
      console.error("TabAgent: stopping the camera failed", err);
      setCameraStatus(`stopping the camera failed: ${describeError(err)}`, true);
    }),
  );
  ui.fps.addEventListener("change", () => {
    if (camera.track) restartFaces().catch((err) => console.error("TabAgent: changing fps failed", err));
  });
  window.addEventListener("pagehide", () => {
    const client = state.client;
    state.client = null;
    state.transport = null;
    stopPing();
    camera.stream?.getTracks().forEach((track) => track.stop());
    client?.close({ keepalive: true });
  });
  window.addEventListener("pageshow", (event) => {
    if (!event.persisted) return; // back from the back/forward cache: the connection is gone
    camera.stream = null;
    camera.track = null;
    state.ready = deferred();
    connectAndLoad(0);
  });
}

globalThis.tabagentPage = {
  /** @returns {"webrtc" | "sse" | null} */
  get transport() {
    return state.transport;
  },
  /** Resolves once connected and the models are listed (a new promise after a disconnect). */
  get ready() {
    return state.ready.promise;
  },
  get sessionId() {
    return state.transport === "webrtc" ? state.client?.sessionId ?? null : null;
  },
  get lastRun() {
    return state.lastRun;
  },
  get busy() {
    return state.busy;
  },
  get faces() {
    return state.faces;
  },
  get connectMs() {
    return state.client?.connectMs ?? null;
  },
  get history() {
    return state.history.map((turn) => ({ ...turn }));
  },
  send,
  stop: stopGenerating,
  newChat,
  startCamera,
  stopCamera,
};

wireEvents();
updateControls();
connectAndLoad(0);
