// The gateway's API as the dashboard calls it: every request carries the token in the
// Authorization header (never in a URL, which would end up in logs and history).

const KEY = "nbcluster.token";

export function savedToken() {
  return sessionStorage.getItem(KEY);
}

export function saveToken(token) {
  if (token) sessionStorage.setItem(KEY, token);
  else sessionStorage.removeItem(KEY);
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export async function call(method, path, body) {
  const headers = { Authorization: `token ${savedToken()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).message || message;
    } catch { /* not JSON */ }
    throw new ApiError(response.status, message);
  }
  return response.status === 204 ? null : response.json();
}

// Reads the event stream (server-sent events over fetch, so that the token goes in a header)
// and calls onFrame(event, data) for each frame; reconnects with the last notice's seq.
export function follow(onFrame, onState, since = 0, overviewSeconds = 1) {
  let stopped = false;
  let controller = null;
  async function once() {
    controller = new AbortController();
    const url = `/api/cluster/events/stream?overview=${overviewSeconds}&since=${since}`;
    const response = await fetch(url, {
      headers: { Authorization: `token ${savedToken()}`, Accept: "text/event-stream" },
      signal: controller.signal,
    });
    if (!response.ok) throw new ApiError(response.status, `stream: ${response.status}`);
    onState("live");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        const data = [];
        for (const line of frame.split("\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data.push(line.slice(6));
          else if (line.startsWith("id: ")) since = Number(line.slice(4));
        }
        if (event === "dropped") {
          since = Number(data.join("")) || since;
          return; // reconnect from there
        }
        if (data.length) onFrame(event, JSON.parse(data.join("\n")));
      }
    }
  }
  (async () => {
    let delay = 500;
    while (!stopped) {
      try {
        await once();
        delay = 500;
      } catch (error) {
        if (stopped) return;
        if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
          onState("refused", error);
          return;
        }
      }
      if (stopped) return;
      onState("down");
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 10000);
    }
  })();
  return () => {
    stopped = true;
    if (controller) controller.abort();
  };
}
