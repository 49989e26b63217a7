// The plain-HTTP fallback: OpenAI-style routes, chat streamed as server-sent events.
// No DOM access.

import { TabAgentError, readJson } from "./rtc.js";

/**
 * GET /v1/models: the OpenAI list, each item with `kind` ("chat", "embedding", "vision").
 *
 * @param {{baseUrl?: string, signal?: AbortSignal}} [options]
 * @returns {Promise<{data: Array<{id: string, kind: string, loaded: boolean, description?: string}>}>}
 */
export async function listModels({ baseUrl = "", signal } = {}) {
  let response;
  try {
    response = await fetch(`${baseUrl}/v1/models`, { signal });
  } catch (err) {
    throw networkError(err);
  }
  return readJson(response);
}

/**
 * POST /v1/chat/completions with `stream: true` and read the event stream.
 *
 * `onDelta(text, model)` gets each piece of content. Resolves with `{finishReason, model, usage}`
 * (`usage` null when the server sent none) once `data: [DONE]` arrives. Rejects with a
 * TabAgentError for an HTTP error or an error event, or with the AbortError when `signal` fires.
 *
 * @param {object} body OpenAI chat fields (`stream` is forced on)
 * @param {{baseUrl?: string, signal?: AbortSignal, onDelta: (text: string, model: string | null) => void}} options
 * @returns {Promise<{finishReason: string | null, model: string | null, usage: any}>}
 */
export async function streamChat(body, { baseUrl = "", signal, onDelta }) {
  let response;
  try {
    response = await fetch(`${baseUrl}/v1/chat/completions`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
      signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw networkError(err);
  }
  if (!response.ok) await readJson(response); // throws the server's error
  const result = { finishReason: null, model: null, usage: null };
  let finished = false;
  for await (const data of sseData(response.body)) {
    // After [DONE] the server ends the body; read to its end rather than cancel the reader,
    // which would abort the request (a failed fetch in the browser's log).
    if (finished) continue;
    if (data === "[DONE]") {
      finished = true;
      continue;
    }
    const chunk = JSON.parse(data);
    if (chunk.error) throw new TabAgentError(chunk.error);
    result.model = chunk.model ?? result.model;
    if (chunk.usage) result.usage = chunk.usage;
    const choice = chunk.choices?.[0];
    if (choice?.delta?.content) onDelta(choice.delta.content, chunk.model ?? null);
    if (choice?.finish_reason) result.finishReason = choice.finish_reason;
  }
  if (finished) return result;
  throw new TabAgentError({ code: "stream_ended", message: "the answer stream ended before [DONE]" });
}

/**
 * The `data` of each server-sent event of a byte stream (multi-line data joined with "\n").
 *
 * @param {ReadableStream<Uint8Array>} stream
 * @returns {AsyncGenerator<string>}
 */
export async function* sseData(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  const boundary = /\r\n\r\n|\n\n|\r\r/;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let match;
      while ((match = boundary.exec(buffer))) {
        const block = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        const lines = block.split(/\r\n|\n|\r/).filter((line) => line.startsWith("data:"));
        if (lines.length) yield lines.map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      }
    }
  } finally {
    await reader.cancel().catch(() => {}); // stop reading (early return, abort); no-op once done
  }
}

function networkError(err) {
  return new TabAgentError({ code: "network_error", message: `cannot reach the server: ${err.message}` }, { cause: err });
}
