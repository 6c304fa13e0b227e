// The code editor: CodeMirror 6 with Python, line numbers, indentation, and
// a lint gutter that shows the run's ruff diagnostics (from the daemon: the
// page itself never runs a linter).
import { basicSetup } from "codemirror";
import { EditorView, keymap } from "@codemirror/view";
import { EditorState, Prec } from "@codemirror/state";
import { indentWithTab } from "@codemirror/commands";
import { python } from "@codemirror/lang-python";
import { lintGutter, setDiagnostics } from "@codemirror/lint";

export function createEditor(parent, { doc, onRun }) {
  const runKeys = Prec.highest(keymap.of([
    { key: "Mod-Enter", run: () => { onRun(); return true; } },
  ]));
  return new EditorView({
    parent,
    state: EditorState.create({
      doc,
      extensions: [
        runKeys,
        basicSetup,
        keymap.of([indentWithTab]),
        python(),
        lintGutter(),
        EditorView.contentAttributes.of({ "aria-label": "Python code" }),
      ],
    }),
  });
}

export function code(view) {
  return view.state.doc.toString();
}

export function setCode(view, text) {
  view.dispatch({ changes: { from: 0, to: view.state.doc.length, insert: text } });
  showDiagnostics(view, []);
}

/** The daemon's diagnostics ({line, column, code, message, severity}, 1-based) as editor markers. */
export function showDiagnostics(view, diagnostics) {
  const doc = view.state.doc;
  const marks = [];
  for (const d of diagnostics) {
    if (!d.line || d.line > doc.lines) continue;
    const line = doc.line(d.line);
    const from = Math.min(line.from + Math.max((d.column ?? 1) - 1, 0), line.to);
    const to = from < line.to ? line.to : from;
    marks.push({
      from, to, severity: d.severity === "error" ? "error" : "warning",
      message: d.code ? `${d.code} ${d.message}` : d.message, source: "ruff",
    });
  }
  view.dispatch(setDiagnostics(view.state, marks));
}
