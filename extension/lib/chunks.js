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

/**
 * UTF-8 bytes that the code point starting at `text[i]` costs once written inside a JSON string
 * by `JSON.stringify`, and how many UTF-16 code units it spans (2 for a surrogate pair).
 *
 * @param {string} text
 * @param {number} i
 * @returns {[bytes: number, units: number]}
 */
function escapedCost(text, i) {
  const c = text.charCodeAt(i);
  if (c === 0x22 || c === 0x5c) return [2, 1]; // \" and \\
  if (c === 0x08 || c === 0x09 || c === 0x0a || c === 0x0c || c === 0x0d) return [2, 1]; // \b \t \n \f \r
  if (c < 0x20) return [6, 1]; // \u00XX
  if (c < 0x80) return [1, 1];
  if (c < 0x800) return [2, 1];
  if (c >= 0xd800 && c <= 0xdbff) {
    const next = text.charCodeAt(i + 1);
    if (next >= 0xdc00 && next <= 0xdfff) return [4, 2]; // a pair: one 4-byte code point
    return [6, 1]; // a lone high surrogate is written as \udXXX
  }
  if (c >= 0xdc00 && c <= 0xdfff) return [6, 1]; // a lone low surrogate, likewise
  return [3, 1];
}

/**
 * Consecutive pieces of `text`, each costing at most `budget` UTF-8 bytes inside a JSON string;
 * a surrogate pair is never cut.
 *
 * @param {string} text
 * @param {number} budget
 * @returns {string[]}
 */
function splitEscaped(text, budget) {
  const pieces = [];
  let start = 0;
  let size = 0;
  let i = 0;
  while (i < text.length) {
    const [bytes, units] = escapedCost(text, i);
    if (size + bytes > budget && i > start) {
      pieces.push(text.slice(start, i));
      start = i;
      size = 0;
    }
    size += bytes;
    i += units;
  }
  if (start < text.length) pieces.push(text.slice(start));
  return pieces;
}

/**
 * The messages to send for one outgoing message whose JSON text is `text`: `[text]` when it fits
 * `maxBytes` UTF-8 bytes, otherwise `chunk` messages
 * (`{id, event: "chunk", chunk: {index, count}, data: piece}`) whose pieces are consecutive slices
 * of `text` (a surrogate pair is never split) and each of which is at most `maxBytes` bytes once
 * encoded, JSON escaping of the piece included. The receiver joins the pieces and parses the result.
 *
 * @param {string} text the JSON text of the message
 * @param {string | number} id the message's id, repeated on every chunk
 * @param {number} maxBytes largest message the transport carries, in UTF-8 bytes
 * @returns {string[]}
 * @throws {RangeError} when `maxBytes` is too small to carry even one character per chunk
 */
export function splitMessage(text, id, maxBytes) {
  const encoder = new TextEncoder();
  if (encoder.encode(text).length <= maxBytes) return [text];
  // The header's size depends on how many digits index and count have; start with one digit and
  // add one until the number of pieces fits the digits assumed.
  for (let digits = 1; ; digits++) {
    const widest = 10 ** digits - 1;
    const header = JSON.stringify({ id, event: "chunk", chunk: { index: widest, count: widest }, data: "" });
    const budget = maxBytes - encoder.encode(header).length;
    if (budget < 6) throw new RangeError(`maxBytes ${maxBytes} is too small to split a message into chunks`);
    const pieces = splitEscaped(text, budget);
    if (pieces.length > widest) continue;
    return pieces.map((data, index) =>
      JSON.stringify({ id, event: "chunk", chunk: { index, count: pieces.length }, data }),
    );
  }
}
