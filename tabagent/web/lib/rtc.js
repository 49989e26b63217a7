// The TabAgent WebRTC client: HTTP signaling, one "tabagent" data channel speaking the message
// envelope (tabagent/native_messaging/PROTOCOL.md), and a send-only video transceiver whose track
// can be swapped without renegotiating.
//
// Signaling: the page gathers its ICE candidates (at most ICE_GATHER_MS), POSTs the offer to
// /v1/webrtc/offer and gets an answer that already carries every server candidate (the server
// does not trickle). Candidates the page finds after the offer went out are POSTed to
// /v1/webrtc/sessions/{id}/candidates, then an empty one for "end of candidates".
//
// Envelope: requests {id, method, params}; replies {id, event, data | error}: any number of
// `delta`/`faces`/`progress` events, then exactly one `done` or `error`. Large messages travel as
// `chunk` pieces both ways (lib/chunks.js).
//
// This module touches no DOM, so it can be read and tested alone.

import { ChunkAssembler, splitMessage } from "./chunks.js";

/** How long the page waits for its own ICE gathering before sending the offer anyway. */
export const ICE_GATHER_MS = 1500;
/** How long the data channel gets to open once the answer is applied. */
export const OPEN_TIMEOUT_MS = 5000;
/** Stop sending while this much is queued on the channel ... */
export const HIGH_WATER = 1024 * 1024;
/** ... and go on once it drained below this. */
export const LOW_WATER = 256 * 1024;
/** SCTP max-message-size assumed when the browser does not report one (RFC 8841's default). */
export const DEFAULT_MAX_MESSAGE = 65536;

/** An error from the server (envelope or HTTP) or from this client, with the protocol's fields. */
export class TabAgentError extends Error {
  /**
   * @param {{code?: string, message?: string, type?: string, param?: string | null}} error
   * @param {{status?: number, cause?: unknown}} [extra] the HTTP status when there was one
   */
  constructor(error, { status, cause } = {}) {
    super(error?.message || error?.code || "unknown error", cause === undefined ? undefined : { cause });
    this.name = "TabAgentError";
    this.code = error?.code || "unknown_error";
    this.type = error?.type || null;
    this.param = error?.param ?? null;
    this.status = status ?? null;
  }
}

/**
 * Read a fetch response: its JSON body when the status is 2xx, else throw its `{error}` body as a
 * TabAgentError (or a generic one when the body is not the server's JSON).
 *
 * @param {Response} response
 * @returns {Promise<any>}
 */
export async function readJson(response) {
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    // not JSON: reported below with the status
  }
  if (response.ok && body !== null) return body;
  if (body && typeof body === "object" && body.error) {
    throw new TabAgentError(body.error, { status: response.status });
  }
  const message = `HTTP ${response.status} ${response.statusText}`.trim() + (text ? `: ${text.slice(0, 200)}` : "");
  throw new TabAgentError({ code: `http_${response.status}`, message }, { status: response.status });
}

/**
 * Resolve once `pc` finished gathering ICE candidates or `timeoutMs` passed.
 *
 * @param {RTCPeerConnection} pc
 * @param {number} timeoutMs
 * @returns {Promise<boolean>} whether gathering completed in time
 */
export function waitForIceGathering(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve(true);
  return new Promise((resolve) => {
    const finish = (complete) => {
      clearTimeout(timer);
      pc.removeEventListener("icegatheringstatechange", onChange);
      resolve(complete);
    };
    const onChange = () => {
      if (pc.iceGatheringState === "complete") finish(true);
    };
    const timer = setTimeout(() => finish(false), timeoutMs);
    pc.addEventListener("icegatheringstatechange", onChange);
  });
}

/**
 * Resolve once `channel` is open; reject when it closes first or `timeoutMs` passes.
 *
 * @param {RTCDataChannel} channel
 * @param {number} timeoutMs
 * @returns {Promise<void>}
 */
export function waitForOpen(channel, timeoutMs) {
  if (channel.readyState === "open") return Promise.resolve();
  return new Promise((resolve, reject) => {
    const finish = (error) => {
      clearTimeout(timer);
      channel.removeEventListener("open", onOpen);
      channel.removeEventListener("close", onClose);
      if (error) reject(error);
      else resolve();
    };
    const onOpen = () => finish(null);
    const onClose = () =>
      finish(new TabAgentError({ code: "channel_closed", message: "the data channel closed before it opened" }));
    const timer = setTimeout(
      () =>
        finish(
          new TabAgentError({
            code: "channel_timeout",
            message: `the data channel did not open within ${timeoutMs / 1000} s`,
          }),
        ),
      timeoutMs,
    );
    channel.addEventListener("open", onOpen);
    channel.addEventListener("close", onClose);
  });
}

/**
 * @typedef {object} Reply one envelope message from the server
 * @property {string | number | null} id
 * @property {string} event "delta", "faces", "progress", "done", "error", …
 * @property {any} [data]
 * @property {{code: string, message: string, type: string, param: string | null}} [error]
 */

/**
 * @typedef {object} PendingRequest
 * @property {string} id the request id
 * @property {Promise<any>} done resolves with the `done` data, rejects with a TabAgentError
 */

/**
 * One WebRTC session with the server: `connect()`, then `request()`/`call()`/`cancel()` over the
 * envelope, `setVideoTrack()` for the camera, `close()` at the end. A lost connection rejects the
 * requests in flight (code `disconnected`) and calls `onClose`; a client is not reused afterwards.
 */
export class RtcClient {
  #fetch;
  #PeerConnection;
  #iceGatherMs;
  #openTimeoutMs;
  #onClose;
  #assembler = new ChunkAssembler();
  /** @type {Map<string, {resolve: Function, reject: Function, onEvent?: (reply: Reply) => void}>} */
  #pending = new Map();
  #nextId = 1;
  #sendQueue = Promise.resolve();
  /** Candidates found after the offer went out; null while they are still part of the offer. */
  #laterCandidates = null;
  #candidatePosts = Promise.resolve();
  #closed = false;

  /**
   * @param {object} [options]
   * @param {string} [options.baseUrl] origin of the server ("" for the page's own)
   * @param {typeof fetch} [options.fetch]
   * @param {typeof RTCPeerConnection} [options.RTCPeerConnection]
   * @param {number} [options.iceGatherMs]
   * @param {number} [options.openTimeoutMs]
   * @param {(reason: string) => void} [options.onClose] called once when an open connection is
   *   lost (peer failed or closed, channel closed); not called after {@link RtcClient#close}
   */
  constructor({
    baseUrl = "",
    fetch = globalThis.fetch?.bind(globalThis),
    RTCPeerConnection = globalThis.RTCPeerConnection,
    iceGatherMs = ICE_GATHER_MS,
    openTimeoutMs = OPEN_TIMEOUT_MS,
    onClose = () => {},
  } = {}) {
    this.baseUrl = baseUrl;
    this.#fetch = fetch;
    this.#PeerConnection = RTCPeerConnection;
    this.#iceGatherMs = iceGatherMs;
    this.#openTimeoutMs = openTimeoutMs;
    this.#onClose = onClose;
    /** @type {RTCPeerConnection | null} */
    this.pc = null;
    /** @type {RTCDataChannel | null} */
    this.channel = null;
    /** @type {RTCRtpTransceiver | null} the send-only video transceiver */
    this.transceiver = null;
    /** @type {string | null} */
    this.sessionId = null;
    /** @type {number | null} milliseconds from creating the offer to the open channel */
    this.connectMs = null;
    /** @type {any} the `session.hello` answer */
    this.hello = null;
  }

  /** Whether the channel is open and the client was not closed. */
  get connected() {
    return !this.#closed && this.channel?.readyState === "open";
  }

  /** Largest message the remote peer accepts, in bytes. */
  get maxMessageSize() {
    const size = this.pc?.sctp?.maxMessageSize;
    return Number.isFinite(size) && size > 0 ? size : DEFAULT_MAX_MESSAGE;
  }

  /**
   * Negotiate the peer connection, open the channel and say hello.
   *
   * Rejects with a TabAgentError: code `webrtc_unavailable` (no RTCPeerConnection here), the
   * server's code when the offer is refused (`status` 404 or code `webrtc_disabled` when the server
   * does not serve WebRTC, `too_many_sessions`, …), `network_error`, `channel_timeout` or
   * `channel_closed`. Everything created is closed again on failure.
   *
   * @returns {Promise<{sessionId: string, connectMs: number, hello: any}>}
   */
  async connect() {
    if (typeof this.#PeerConnection !== "function") {
      throw new TabAgentError({ code: "webrtc_unavailable", message: "this browser has no WebRTC (RTCPeerConnection)" });
    }
    if (this.pc) throw new Error("connect() was already called on this client");
    try {
      return await this.#negotiate();
    } catch (err) {
      this.close();
      throw err;
    }
  }

  async #negotiate() {
    const pc = new this.#PeerConnection({ iceServers: [] });
    this.pc = pc;
    const channel = pc.createDataChannel("tabagent", { ordered: true });
    channel.bufferedAmountLowThreshold = LOW_WATER;
    this.channel = channel;
    this.transceiver = pc.addTransceiver("video", { direction: "sendonly" });
    pc.addEventListener("icecandidate", (event) => this.#onLocalCandidate(event.candidate));

    const started = performance.now();
    await pc.setLocalDescription(await pc.createOffer());
    const gathered = await waitForIceGathering(pc, this.#iceGatherMs);
    const sdp = pc.localDescription.sdp;
    if (!gathered) this.#laterCandidates = []; // from now on candidates are not in the offer

    const answer = await this.#post("/v1/webrtc/offer", { sdp, type: "offer" });
    this.sessionId = answer.session_id;
    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    this.#flushCandidates();

    channel.addEventListener("message", (event) => this.#onMessage(event.data));
    await waitForOpen(channel, this.#openTimeoutMs);
    this.connectMs = performance.now() - started;
    this.#watch(pc, channel);
    this.hello = await this.call("session.hello", {}, { timeoutMs: this.#openTimeoutMs });
    return { sessionId: this.sessionId, connectMs: this.connectMs, hello: this.hello };
  }

  #watch(pc, channel) {
    pc.addEventListener("connectionstatechange", () => {
      if (pc.connectionState === "failed" || pc.connectionState === "closed") {
        this.#lost(`peer connection ${pc.connectionState}`);
      }
    });
    channel.addEventListener("close", () => this.#lost("data channel closed"));
  }

  /** @param {RTCIceCandidate | null} candidate */
  #onLocalCandidate(candidate) {
    if (this.#laterCandidates === null) return; // still gathering into the offer
    const body = candidate?.candidate
      ? { candidate: candidate.candidate, sdpMid: candidate.sdpMid, sdpMLineIndex: candidate.sdpMLineIndex }
      : { candidate: "" };
    this.#laterCandidates.push(body);
    if (this.sessionId) this.#flushCandidates();
  }

  #flushCandidates() {
    if (!this.#laterCandidates?.length || !this.sessionId) return;
    const batch = this.#laterCandidates.splice(0);
    const path = `/v1/webrtc/sessions/${encodeURIComponent(this.sessionId)}/candidates`;
    // one after the other, so "end of candidates" goes last
    this.#candidatePosts = this.#candidatePosts.then(async () => {
      for (const body of batch) {
        if (this.#closed) return;
        try {
          await this.#post(path, body);
        } catch (err) {
          console.error("TabAgent: could not send an ICE candidate", body, err);
        }
      }
    });
  }

  /**
   * POST JSON to the server; the parsed answer, or a TabAgentError.
   *
   * @param {string} path
   * @param {object} body
   */
  async #post(path, body) {
    let response;
    try {
      response = await this.#fetch(this.baseUrl + path, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
    } catch (err) {
      throw new TabAgentError({ code: "network_error", message: `cannot reach the server: ${err.message}` }, { cause: err });
    }
    return readJson(response);
  }

  /**
   * Send a request. `onEvent` gets every reply that is not the final one (`delta`, `faces`,
   * `progress`, …); `done` resolves with the final data; it rejects with a TabAgentError on an
   * `error` reply (code `cancelled` after {@link RtcClient#cancel}) or when the connection is lost
   * (code `disconnected`).
   *
   * @param {string} method e.g. "chat.complete"
   * @param {object} [params]
   * @param {(reply: Reply) => void} [onEvent]
   * @returns {PendingRequest}
   */
  request(method, params = {}, onEvent = undefined) {
    const id = `p${this.#nextId++}`;
    const done = new Promise((resolve, reject) => {
      if (!this.connected) {
        reject(new TabAgentError({ code: "disconnected", message: "not connected over WebRTC" }));
        return;
      }
      this.#pending.set(id, { resolve, reject, onEvent });
      this.#send({ id, method, params }).catch((err) => {
        this.#pending.delete(id);
        reject(err);
      });
    });
    return { id, done };
  }

  /**
   * A unary request: its `done` data.
   *
   * @param {string} method
   * @param {object} [params]
   * @param {{timeoutMs?: number}} [options] reject with code `timeout` (and cancel) after this long
   * @returns {Promise<any>}
   */
  call(method, params = {}, { timeoutMs } = {}) {
    const { id, done } = this.request(method, params);
    if (!timeoutMs) return done;
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => {
        reject(new TabAgentError({ code: "timeout", message: `${method} got no answer within ${timeoutMs / 1000} s` }));
        this.cancel(id).catch(() => {}); // best effort; the request may be gone already
      }, timeoutMs);
    });
    return Promise.race([done, timeout]).finally(() => clearTimeout(timer));
  }

  /**
   * Ask the server to cancel a request; that request then ends with an error of code `cancelled`.
   *
   * @param {string} id
   * @returns {Promise<{cancelled: boolean}>}
   */
  cancel(id) {
    return this.request("session.cancel", { id }).done;
  }

  /**
   * Put a track on the video transceiver (null: send nothing). No renegotiation happens.
   *
   * @param {MediaStreamTrack | null} track
   * @returns {Promise<void>}
   */
  async setVideoTrack(track) {
    if (!this.transceiver) throw new TabAgentError({ code: "disconnected", message: "not connected over WebRTC" });
    await this.transceiver.sender.replaceTrack(track);
  }

  /**
   * Close the connection and ask the server to drop the session. Safe to call more than once.
   * `keepalive` lets the DELETE outlive the page (for `pagehide`).
   *
   * @param {{keepalive?: boolean}} [options]
   */
  close({ keepalive = false } = {}) {
    if (this.#closed) return;
    this.#closed = true;
    this.#failPending("the connection was closed by the page");
    if (!this.sessionId) {
      this.#closePeer();
      return;
    }
    // The DELETE goes first: closing the peer first lets the server drop the session on its own,
    // and the DELETE would then meet a 404.
    const url = `${this.baseUrl}/v1/webrtc/sessions/${encodeURIComponent(this.sessionId)}`;
    this.#fetch(url, { method: "DELETE", keepalive })
      .catch((err) => console.warn("TabAgent: could not close the WebRTC session on the server", err))
      .finally(() => this.#closePeer());
  }

  /** The peer or channel went away by itself (the server notices too; no DELETE needed). */
  #lost(reason) {
    if (this.#closed) return;
    this.#closed = true;
    this.#failPending(reason);
    this.#closePeer();
    this.#onClose(reason);
  }

  #failPending(reason) {
    const error = new TabAgentError({ code: "disconnected", message: reason });
    for (const { reject } of this.#pending.values()) reject(error);
    this.#pending.clear();
    this.#assembler.clear();
  }

  #closePeer() {
    try {
      this.channel?.close();
      this.pc?.close();
    } catch (err) {
      console.warn("TabAgent: error while closing the peer connection", err);
    }
  }

  /** Queue one message: split to the remote maximum, sent in order, pausing under backpressure. */
  #send(message) {
    const parts = splitMessage(JSON.stringify(message), message.id, this.maxMessageSize);
    const run = this.#sendQueue.then(() => this.#sendParts(parts));
    this.#sendQueue = run.catch(() => {}); // a failed send must not block the ones after it
    return run;
  }

  async #sendParts(parts) {
    const channel = this.channel;
    for (const part of parts) {
      while (channel.readyState === "open" && channel.bufferedAmount > HIGH_WATER) {
        await this.#drained(channel);
      }
      if (channel.readyState !== "open" || this.#closed) {
        throw new TabAgentError({ code: "disconnected", message: "the data channel is not open" });
      }
      channel.send(part);
    }
  }

  /** Resolve on `bufferedamountlow` (or when the channel closes). */
  #drained(channel) {
    return new Promise((resolve) => {
      const done = () => {
        channel.removeEventListener("bufferedamountlow", done);
        channel.removeEventListener("close", done);
        resolve();
      };
      channel.addEventListener("bufferedamountlow", done);
      channel.addEventListener("close", done);
    });
  }

  /** @param {unknown} raw */
  #onMessage(raw) {
    if (typeof raw !== "string") {
      console.error("TabAgent: ignoring a binary message on the data channel");
      return;
    }
    let message;
    try {
      message = JSON.parse(raw);
    } catch (err) {
      console.error("TabAgent: ignoring a data channel message that is not JSON", err, raw.slice(0, 200));
      return;
    }
    const reply = this.#assembler.push(message);
    if (reply) this.#dispatch(reply);
  }

  /** @param {Reply} reply */
  #dispatch(reply) {
    if (reply.id == null) {
      console.error("TabAgent: the server reported an error about no request in particular", reply.error ?? reply);
      return;
    }
    const pending = this.#pending.get(reply.id);
    if (!pending) return; // a reply for a request already finished (e.g. after a local timeout)
    if (reply.event === "done") {
      this.#pending.delete(reply.id);
      pending.resolve(reply.data);
    } else if (reply.event === "error") {
      this.#pending.delete(reply.id);
      pending.reject(new TabAgentError(reply.error));
    } else if (pending.onEvent) {
      try {
        pending.onEvent(reply);
      } catch (err) {
        console.error(`TabAgent: handling a ${reply.event} event of ${reply.id} failed`, err);
      }
    }
  }
}
