// The playground page: the editor, the run's options, and one run at a time
// followed live through GET /runs/<id>/events. See docs/operations.md.
import { ApiError, askToken, getJson, postJson, request } from "./api.js";
import { code, createEditor, setCode, showDiagnostics } from "./editor.js";
import { InputFiles, formatBytes, releaseFiles, renderOutputFiles } from "./files.js";
import { follow } from "./sse.js";

const $ = (id) => document.getElementById(id);
const LIMITS = ["timeout_s", "memory_mb", "cpu_percent", "disk_mb"];
const TERMINAL = new Set(["succeeded", "failed", "timed_out", "oom_killed", "cancelled", "error"]);
const CONSOLE_MAX = 4 * 1024 * 1024; // characters shown; the whole output stays at GET /output/<id>
const EXAMPLE = `import sys


def main():
    # main() mode calls this and shows what it returns
    return {"squares": [n * n for n in range(5)]}


if __name__ == "__main__":
    print("hello from unitbox", sys.version.split()[0], sys.argv[1:])
    print(main())
`;

let current = null; // { id, controller, timer }
const editor = createEditor($("editor"), { doc: EXAMPLE, onRun: () => run() });
const inputs = new InputFiles($("input-files"));

// ---- messages and facts ---------------------------------------------------

function showError(error) {
  const box = $("alert");
  if (!error) { box.hidden = true; box.textContent = ""; return; }
  const details = error instanceof ApiError && error.details.length
    ? ": " + error.details.map((d) => `${d.field ?? ""} ${d.message ?? ""}`.trim()).join("; ") : "";
  box.textContent = `${error.message}${details}`;
  box.hidden = false;
}

function setState(state) {
  const badge = $("state");
  badge.textContent = state.replace("_", " ");
  badge.dataset.state = state;
}

function fact(list, name, value) {
  if (value == null || value === "") return;
  const term = document.createElement("dt");
  term.textContent = name;
  const detail = document.createElement("dd");
  detail.textContent = value;
  list.append(term, detail);
}

function showFacts(run) {
  const list = $("facts");
  list.replaceChildren();
  fact(list, "exit code", run.exit_code);
  fact(list, "signal", run.signal);
  fact(list, "duration", run.duration_ms != null ? `${(run.duration_ms / 1000).toFixed(2)} s` : null);
  fact(list, "CPU", run.cpu_ms != null ? `${(run.cpu_ms / 1000).toFixed(2)} s` : null);
  fact(list, "peak memory", run.memory_peak_bytes != null ? formatBytes(run.memory_peak_bytes) : null);
  fact(list, "runtime", run.runtime);
  fact(list, "limits", `${run.limits.timeout_s} s, ${run.limits.memory_mb} MiB, ${run.limits.cpu_percent} % CPU`);
  if (run.stdout_truncated || run.stderr_truncated) fact(list, "output", "cut at the output limit");
  fact(list, "error", run.error);
  list.hidden = false;
}

// ---- the console ----------------------------------------------------------

let shown = 0;

function appendOutput(stream, text) {
  const box = $("console");
  if (shown >= CONSOLE_MAX) return;
  const piece = text.slice(0, CONSOLE_MAX - shown);
  shown += piece.length;
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const span = document.createElement("span");
  span.className = stream;
  span.textContent = shown >= CONSOLE_MAX ? `${piece}\n[… more output: GET /output/<id>]` : piece;
  box.append(span);
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function resetOutput() {
  shown = 0;
  $("console").replaceChildren();
  $("facts").hidden = true;
  $("result-box").hidden = true;
  $("diagnostics-box").hidden = true;
  $("files-box").hidden = true;
  $("elapsed").textContent = "";
  releaseFiles();
  showError(null);
}

// ---- a run, followed ------------------------------------------------------

function startClock(since) {
  stopClock();
  const tick = () => { $("elapsed").textContent = `${((Date.now() - since) / 1000).toFixed(1)} s`; };
  tick();
  current.timer = setInterval(tick, 100);
}

function stopClock() {
  if (current?.timer) clearInterval(current.timer);
  if (current) current.timer = null;
}

function setRunning(running) {
  $("run").disabled = running;
  $("stop").disabled = !running;
}

async function watch(id, { fresh }) {
  current?.controller.abort();
  stopClock();
  const controller = new AbortController();
  current = { id, controller, timer: null };
  resetOutput();
  setState("starting");
  setRunning(true);
  const share = $("share");
  share.href = `#run=${id}`;
  share.hidden = false;
  share.textContent = `link to run ${id}`;
  const mine = current;
  try {
    const final = await follow(id, (type, data) => {
      if (current !== mine) return;
      if (type === "state") {
        setState(data.state);
        if (data.state === "running" && !mine.timer && !TERMINAL.has(data.state)) {
          startClock(fresh || !data.started_at ? Date.now() : Date.parse(data.started_at));
        }
      } else if (type === "stdout" || type === "stderr") {
        appendOutput(type, data.text);
      }
    }, controller.signal);
    if (final && current === mine) finish(await settled(final));
  } catch (error) {
    if (current === mine) { showError(error); setRunning(false); stopClock(); }
  }
}

/**
 * The final Run with what it left (result, diagnostics, files). The daemon can
 * send `end` a moment before it has read those from the run's directory (the
 * record turns final first): GET /status then, until a main() run that
 * succeeded has its result and a linted run its findings (2 s at most).
 */
async function settled(run) {
  let latest = run;
  for (let attempt = 0; attempt < 10; attempt++) {
    if (attempt > 0 || latest.files == null) {
      try { latest = await getJson(`/status/${encodeURIComponent(run.id)}`); } catch { return latest; }
    }
    const waitingResult = latest.entrypoint && latest.state === "succeeded" && latest.result_bytes == null;
    const waitingLint = latest.lint !== "off" && latest.lint_findings == null && latest.state !== "error";
    if (!waitingResult && !waitingLint) return latest;
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  return latest;
}

function finish(run) {
  stopClock();
  setRunning(false);
  setState(run.state);
  $("elapsed").textContent = run.duration_ms != null ? `${(run.duration_ms / 1000).toFixed(2)} s` : "";
  showFacts(run);
  if (run.result != null || run.entrypoint) {
    $("result").textContent = run.result_bytes == null ? "(no result)" : JSON.stringify(run.result, null, 2);
    $("result-box").hidden = false;
  }
  const diagnostics = run.diagnostics ?? [];
  showDiagnostics(editor, diagnostics);
  if (run.lint !== "off") {
    $("diagnostics").replaceChildren(...(diagnostics.length ? diagnostics : [null]).map((d) => {
      const item = document.createElement("li");
      if (!d) { item.textContent = "no findings"; return item; }
      item.className = d.severity;
      item.textContent = `line ${d.line}, column ${d.column}: ${d.code ?? ""} ${d.message} (${d.severity})`;
      return item;
    }));
    $("diagnostics-box").hidden = false;
  }
  if (run.files?.length) {
    renderOutputFiles($("files"), run.files, showError);
    $("files-box").hidden = false;
  }
  loadRecent();
}

async function run() {
  if ($("run").disabled) return; // one run at a time
  const limits = {};
  for (const name of LIMITS) {
    const value = $(`limit-${name}`).value.trim();
    if (value) limits[name] = Number(value);
  }
  const args = $("args").value.split("\n").filter((line) => line !== "");
  const payload = { code: code(editor), runtime: $("runtime").value || "default", stdin: $("stdin").value, args, limits };
  if ($("entrypoint").checked) payload.entrypoint = "main";
  if ($("lint").checked) payload.lint = true;
  setRunning(true);
  showError(null);
  showDiagnostics(editor, []);
  try {
    payload.files = await inputs.payload();
    const submitted = await postJson("/run-json", payload);
    history.replaceState(null, "", `#run=${submitted.id}`);
    await watch(submitted.id, { fresh: true });
  } catch (error) {
    showError(error);
    setRunning(false);
  }
}

async function stop() {
  if (!current) return;
  $("stop").disabled = true;
  try {
    await request(`/runs/${encodeURIComponent(current.id)}/cancel`, { method: "POST" });
  } catch (error) {
    showError(error);
  }
}

/** A past (or running) run: its code in the editor, its options, its output and files. */
async function openRun(id) {
  try {
    const [run, source] = await Promise.all([
      getJson(`/status/${encodeURIComponent(id)}`),
      request(`/runs/${encodeURIComponent(id)}/code`).then((r) => r.text()),
    ]);
    setCode(editor, source);
    if ([...$("runtime").options].some((o) => o.value === run.runtime)) $("runtime").value = run.runtime;
    $("entrypoint").checked = run.entrypoint === "main";
    $("lint").checked = run.lint !== "off";
    await watch(id, { fresh: false });
  } catch (error) {
    showError(error);
  }
}

// ---- what the server offers -----------------------------------------------

async function loadRuntimes() {
  const { runtimes } = await getJson("/runtimes");
  const select = $("runtime");
  select.replaceChildren(...runtimes.map((r) => {
    const option = document.createElement("option");
    option.value = r.name;
    option.textContent = `${r.name} (Python ${r.python})`;
    option.title = packagesText(r) || "no extra packages";
    return option;
  }));
  const describe = () => {
    const chosen = runtimes.find((r) => r.name === select.value);
    const text = chosen ? packagesText(chosen) : "";
    select.title = text || "no extra packages";
    $("runtime-packages").textContent = text ? `Packages: ${text}` : "";
  };
  select.addEventListener("change", describe);
  describe();
}

function packagesText(runtime) {
  return Object.entries(runtime.packages).map(([name, version]) => `${name} ${version}`).join(", ");
}

async function loadLimits() {
  const { defaults, maxima } = await getJson("/limits");
  for (const name of LIMITS) {
    const input = $(`limit-${name}`);
    input.max = maxima[name];
    input.placeholder = `${defaults[name]}`;
    const hint = document.createElement("small");
    hint.id = `limit-${name}-hint`;
    hint.textContent = `default ${defaults[name]}, max ${maxima[name]}`;
    input.after(hint);
    input.setAttribute("aria-describedby", hint.id);
  }
}

async function loadRecent() {
  if ($("recent").hidden) return;
  try {
    const { runs } = await getJson("/runs?limit=25");
    $("recent-list").replaceChildren(...runs.map((r) => {
      const item = document.createElement("li");
      const link = document.createElement("a");
      link.href = `#run=${r.id}`;
      link.textContent = `${r.id}`;
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.dataset.state = r.state;
      meta.textContent = ` ${r.state.replace("_", " ")} · ${r.runtime} · ${new Date(r.created_at).toLocaleString()}`;
      item.append(link, meta);
      return item;
    }));
  } catch (error) {
    showError(error);
  }
}

// ---- wiring ---------------------------------------------------------------

function runFromHash() {
  const match = /^#run=([0-9a-f]{1,64})$/.exec(location.hash);
  if (match && match[1] !== current?.id) openRun(match[1]);
}

$("run").addEventListener("click", () => run());
$("stop").addEventListener("click", () => stop());
$("token-button").addEventListener("click", async () => {
  if (await askToken("A bearer token for this server, kept in this tab only (session storage).")) {
    loadRuntimes().catch(showError);
    loadRecent();
  }
});
$("recent-toggle").addEventListener("click", () => {
  const aside = $("recent");
  aside.hidden = !aside.hidden;
  $("recent-toggle").setAttribute("aria-expanded", String(!aside.hidden));
  loadRecent();
});
$("file-input").addEventListener("change", (event) => { inputs.add(event.target.files); event.target.value = ""; });
document.addEventListener("keydown", (event) => {
  // The editor handles its own Ctrl+Enter (and prevents the default): this is for the rest of the page.
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !event.defaultPrevented && !$("token-dialog").open) {
    event.preventDefault();
    run();
  }
});
document.addEventListener("dragover", (event) => { event.preventDefault(); $("dropzone").classList.add("dragging"); });
document.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) $("dropzone").classList.remove("dragging");
});
document.addEventListener("drop", (event) => {
  event.preventDefault();
  $("dropzone").classList.remove("dragging");
  if (event.dataTransfer?.files.length) inputs.add(event.dataTransfer.files);
});
window.addEventListener("hashchange", runFromHash);

// Runtimes first: a 401 asks for the token once, and the rest then has it.
loadRuntimes().catch(showError).then(() => loadLimits().catch(showError)).then(runFromHash);
