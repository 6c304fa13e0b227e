// A run's Server-Sent Events read with fetch() rather than EventSource, which
// cannot send an Authorization header: the token stays out of URLs. Resumes
// after a dropped connection from the last event id, as EventSource would.
import { request } from "./api.js";

async function* parse(response, signal) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  signal.addEventListener("abort", () => reader.cancel().catch(() => {}), { once: true });
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { type: "message", data: [], id: null };
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue; // a comment: keepalive
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event.type = text;
        else if (field === "data") event.data.push(text);
        else if (field === "id") event.id = text;
      }
      if (event.data.length) yield { ...event, data: JSON.parse(event.data.join("\n")) };
    }
  }
}

/**
 * Follows run `id` until its `end` event: `on(type, data)` for each event.
 * Returns the final Run, or null when aborted.
 */
export async function follow(id, on, signal) {
  let lastId = "";
  for (let attempt = 0; !signal.aborted; attempt++) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const response = await request(`/runs/${encodeURIComponent(id)}/events`, { headers, signal });
      for await (const event of parse(response, signal)) {
        if (event.id) lastId = event.id;
        on(event.type, event.data);
        if (event.type === "end") return event.data;
        attempt = 0;
      }
    } catch (error) {
      if (signal.aborted) return null;
      if (error.status && error.status !== 503) throw error; // 404, 422: no point in trying again
      if (attempt >= 5) throw error;
    }
    await new Promise((resolve) => setTimeout(resolve, 500 * (attempt + 1)));
  }
  return null;
}
