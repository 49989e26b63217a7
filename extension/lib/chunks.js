// Reassembly of host messages that the TabAgent native host split into pieces.
//
// Chrome refuses a message from a native host that is larger than 1 MB, so the host sends a big
// message as several "chunk" messages:
//   {"id": "r1", "event": "chunk", "chunk": {"index": 0, "count": 3}, "data": "<JSON text piece>"}
// with index 0..count-1 in order. Concatenating the `data` strings of all pieces gives the JSON
// text of the real message. Pieces of different ids may interleave, so buffers are kept per id.
//
// This module has no dependency on the chrome.* APIs so it can be read and tested alone.

/** Largest reassembled message accepted, in UTF-16 code units (a runaway guard, not a protocol limit). */
export const DEFAULT_MAX_CHARS = 512 * 1024 * 1024;

export class ChunkAssembler {
  /** @param {{maxChars?: number}} [options] */
  constructor({ maxChars = DEFAULT_MAX_CHARS } = {}) {
    this.maxChars = maxChars;
    /** @type {Map<string, {count: number, parts: string[], size: number}>} */
    this.buffers = new Map();
  }

  /**
   * Feed one message from the host.
   *
   * Returns the message to handle: the message itself when it is not a chunk, the reassembled
   * message when this was the last piece, or null while pieces are still missing. A malformed or
   * out-of-order piece drops that id's buffer and returns a local error message for the id
   * (`{id, event: "error", error: {code: "bad_chunk", ...}}`), so callers handle it like any other
   * error. An error message from the host for an id drops any partial buffer of that id.
   *
   * @param {any} message
   * @returns {any | null}
   */
  push(message) {
    if (!message || typeof message !== "object" || message.event !== "chunk") {
      if (message && message.event === "error" && message.id != null) this.drop(message.id);
      return message;
    }
    const id = message.id;
    const chunk = message.chunk || {};
    const { index, count } = chunk;
    const data = message.data;
    if (id == null) return this.#fail(id, "chunk without an id");
    if (!Number.isInteger(index) || !Number.isInteger(count) || count < 1 || index < 0 || index >= count) {
      return this.#fail(id, `bad chunk header ${JSON.stringify(chunk)}`);
    }
    if (typeof data !== "string") return this.#fail(id, `chunk ${index} of ${count} carries no string data`);

    let buffer = this.buffers.get(id);
    if (index === 0) {
      // A new message for this id starts; a stale partial one (should never happen) is replaced.
      buffer = { count, parts: [], size: 0 };
      this.buffers.set(id, buffer);
    } else if (!buffer) {
      return this.#fail(id, `chunk ${index} of ${count} arrived without chunk 0`);
    }
    if (buffer.count !== count || buffer.parts.length !== index) {
      return this.#fail(
        id,
        `chunk ${index} of ${count} out of order (expected ${buffer.parts.length} of ${buffer.count})`,
      );
    }
    buffer.parts.push(data);
    buffer.size += data.length;
    if (buffer.size > this.maxChars) return this.#fail(id, `chunked message exceeds ${this.maxChars} characters`);
    if (buffer.parts.length < count) return null;

    this.buffers.delete(id);
    let whole;
    try {
      whole = JSON.parse(buffer.parts.join(""));
    } catch (err) {
      return this.#fail(id, `reassembled message is not valid JSON: ${err.message}`);
    }
    if (!whole || typeof whole !== "object") return this.#fail(id, "reassembled message is not an object");
    if (whole.id == null) whole.id = id;
    return whole;
  }

  /** Forget the partial message of one id (e.g. on an error or a cancel for it). */
  drop(id) {
    this.buffers.delete(id);
  }

  /** Forget everything (e.g. when the native port disconnects). */
  clear() {
    this.buffers.clear();
  }

  /** Ids with a partial message pending. */
  get pendingIds() {
    return [...this.buffers.keys()];
  }

  #fail(id, message) {
    if (id != null) this.buffers.delete(id);
    return {
      id: id ?? null,
      event: "error",
      error: { code: "bad_chunk", message, type: "protocol_error", param: null },
    };
  }
}
