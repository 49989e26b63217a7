// TabAgentClient: the panel's side of the port to the background service worker.
//
//   const client = new TabAgentClient();
//   client.onStatus(({connected, error, hello}) => ...);
//   const models = await client.request("models.list", {});
//   const s = client.stream("chat.complete", {...}, (message) => ...);  // message = host message
//   s.cancel(); await s.done;
//
// If the service worker restarts, the port disconnects: in-flight requests fail with code
// "worker_disconnected", the client reconnects (status listeners stay subscribed and get the
// fresh status the background sends on connect).

export const PANEL_PORT_NAME = "tabagent-panel";

/** An error event from the host (or a local failure), with the host's code, type and param. */
export class TabAgentError extends Error {
  constructor({ code = "error", message = "", type = null, param = null } = {}) {
    super(message || code);
    this.name = "TabAgentError";
    this.code = code;
    this.type = type;
    this.param = param;
  }
}

export class TabAgentClient {
  /** @param {{runtime?: typeof chrome.runtime, name?: string}} [options] */
  constructor({ runtime = globalThis.chrome?.runtime, name = PANEL_PORT_NAME } = {}) {
    this.runtime = runtime;
    this.name = name;
    this.port = null;
    this.counter = 0;
    /** @type {Map<string, {onEvent: ((m: any) => void) | null, resolve: (d: any) => void, reject: (e: Error) => void}>} */
    this.pending = new Map();
    /** @type {Set<(status: any) => void>} */
    this.statusListeners = new Set();
    /** Last status from the background: {connected, error, hello}. */
    this.status = { connected: false, error: "connecting to the TabAgent service worker…", hello: null };
    this.reconnectDelay = 100;
    this.reconnectTimer = null;
    this.closed = false;
    this.#connect();
  }

  /**
   * Call a method and resolve with its result (the data of its "done" event).
   * Rejects with a TabAgentError carrying `.code` on an error event.
   */
  request(method, params = {}) {
    return this.stream(method, params, null).done;
  }

  /**
   * Call a (streaming) method. onEvent gets every host message for it (delta, progress, done,
   * error). Returns {id, done, cancel()}: done resolves with the data of "done".
   */
  stream(method, params = {}, onEvent = null) {
    this.counter += 1;
    const id = `r${this.counter}`;
    let resolve;
    let reject;
    const done = new Promise((res, rej) => {
      resolve = res;
      reject = rej;
    });
    this.pending.set(id, { onEvent, resolve, reject });
    if (!this.#post({ type: "request", id, method, params })) {
      this.#finish(id, {
        id,
        event: "error",
        error: { code: "worker_disconnected", message: "the TabAgent service worker is not reachable" },
      });
    }
    return {
      id,
      done,
      cancel: () => {
        if (this.pending.has(id)) this.#post({ type: "cancel", id });
      },
    };
  }

  /** Subscribe to connection status; called at once with the current one. Returns unsubscribe. */
  onStatus(cb) {
    this.statusListeners.add(cb);
    try {
      cb(this.status);
    } catch (err) {
      console.warn("TabAgent status listener failed:", err);
    }
    return () => this.statusListeners.delete(cb);
  }

  /** Disconnect for good (pending requests fail). */
  close() {
    this.closed = true;
    clearTimeout(this.reconnectTimer);
    const port = this.port;
    this.port = null;
    try {
      port?.disconnect();
    } catch {
      /* already gone */
    }
    this.#failAll("client_closed", "the client was closed");
  }

  #connect() {
    if (this.closed || this.port) return;
    let port;
    try {
      port = this.runtime.connect({ name: this.name });
    } catch (err) {
      this.#setStatus({ connected: false, error: err?.message || String(err), hello: null });
      this.#scheduleReconnect();
      return;
    }
    this.port = port;
    port.onMessage.addListener((msg) => this.#onMessage(msg));
    port.onDisconnect.addListener(() => {
      // Reading lastError keeps Chrome from logging "Unchecked runtime.lastError".
      const why = this.runtime.lastError?.message;
      if (this.port !== port) return;
      this.port = null;
      this.#failAll("worker_disconnected", why || "the TabAgent service worker restarted");
      this.#setStatus({ connected: false, error: "reconnecting to the TabAgent service worker…", hello: null });
      this.#scheduleReconnect();
    });
  }

  #scheduleReconnect() {
    if (this.closed || this.reconnectTimer) return;
    const delay = this.reconnectDelay;
    this.reconnectDelay = Math.min(this.reconnectDelay * 2, 5000);
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      this.#connect();
    }, delay);
  }

  #post(msg) {
    if (!this.port) this.#connect();
    if (!this.port) return false;
    try {
      this.port.postMessage(msg);
      return true;
    } catch {
      return false;
    }
  }

  #onMessage(msg) {
    if (!msg || typeof msg !== "object") return;
    if (msg.type === "status") {
      this.reconnectDelay = 100;
      this.#setStatus({ connected: !!msg.connected, error: msg.error ?? null, hello: msg.hello ?? null });
    } else if (msg.type === "event" && msg.message) {
      this.#finish(String(msg.message.id), msg.message);
    }
  }

  #finish(id, message) {
    const entry = this.pending.get(id);
    if (!entry) return;
    const final = message.event === "done" || message.event === "error";
    if (final) this.pending.delete(id);
    if (entry.onEvent) {
      try {
        entry.onEvent(message);
      } catch (err) {
        console.warn("TabAgent event listener failed:", err);
      }
    }
    if (message.event === "done") entry.resolve(message.data);
    else if (message.event === "error") entry.reject(new TabAgentError(message.error || {}));
  }

  #failAll(code, message) {
    for (const id of [...this.pending.keys()]) {
      this.#finish(id, { id, event: "error", error: { code, message, type: "connection_error", param: null } });
    }
  }

  #setStatus(status) {
    this.status = status;
    for (const cb of [...this.statusListeners]) {
      try {
        cb(status);
      } catch (err) {
        console.warn("TabAgent status listener failed:", err);
      }
    }
  }
}
