// Every request to the daemon: same origin, the token (if any) as a bearer
// header — never in a URL — and one retry after asking for a token on a 401.
const TOKEN_KEY = "unitbox-token";

export class ApiError extends Error {
  constructor(status, body) {
    const error = body?.error ?? {};
    super(error.message ?? `HTTP ${status}`);
    this.status = status;
    this.code = error.code;
    this.details = error.details ?? [];
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

let asking = null; // one dialog at a time, whatever number of requests got a 401

/** Shows the token dialog; resolves true when a token was given. */
export function askToken(reason) {
  if (asking) return asking;
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  document.getElementById("token-why").textContent = reason;
  input.value = token() ?? "";
  asking = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      asking = null;
      if (dialog.returnValue === "save" && input.value.trim()) {
        sessionStorage.setItem(TOKEN_KEY, input.value.trim());
        resolve(true);
      } else {
        if (dialog.returnValue === "forget") sessionStorage.removeItem(TOKEN_KEY);
        resolve(false);
      }
    }, { once: true });
  });
  dialog.returnValue = "";
  dialog.showModal();
  input.focus();
  return asking;
}

/** fetch() with the token; a 401 asks for one and tries again. Errors become ApiError. */
export async function request(path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers ?? {});
    const bearer = token();
    if (bearer) headers.set("Authorization", `Bearer ${bearer}`);
    const response = await fetch(path, { ...options, headers });
    if (response.status === 401) {
      const why = bearer ? "The server did not accept this token. Give another one."
        : "This server needs a token. It is kept in this tab only (session storage).";
      if (await askToken(why)) continue;
    }
    if (!response.ok) {
      let body = null;
      try { body = await response.json(); } catch { /* not JSON: the status says it */ }
      throw new ApiError(response.status, body);
    }
    return response;
  }
}

export async function getJson(path, options) {
  return (await request(path, options)).json();
}

export async function postJson(path, payload) {
  const response = await request(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload),
  });
  return response.json();
}
