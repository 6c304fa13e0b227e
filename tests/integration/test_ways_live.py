"""The ways people run code (issue 14) on a real systemd: main() results,
lint, input files, output files and inline output, each through the API on
the test host. (pandas reading an input CSV and a matplotlib PNG served as
image/png need the `scientific` runtime: tests/integration/test_runtimes.py.)"""

from __future__ import annotations

import base64
import hashlib

from tests.support.daemon import Client, multipart


def test_main_returning_a_dict_is_the_result_apart_from_stdout(client: Client) -> None:
    run = client.run("print('working')\n\ndef main():\n    return {'answer': 42, 'items': [1, 2.5, None]}\n",
                     entrypoint="main")
    assert run["state"] == "succeeded", run
    assert run["result"] == {"answer": 42, "items": [1, 2.5, None]}
    assert run["stdout"] == "working\n"  # a waited run carries its output inline
    assert run["entrypoint"] == "main" and run["result_bytes"] > 0
    assert client.status(run["id"])["result"] == run["result"]


def test_the_module_is_imported_not_run_as_main(client: Client) -> None:
    run = client.run("def main():\n    return __name__\n\nif __name__ == '__main__':\n    print('ran as a script')\n",
                     entrypoint="main")
    assert run["result"] == "main" and run["stdout"] == ""


def test_no_main_fails_naming_it(client: Client) -> None:
    run = client.run("x = 1\n", entrypoint="main")
    assert run["state"] == "failed" and run["exit_code"] == 1
    assert run["error"] == "the script must define main()"
    assert run["result"] is None


def test_main_returning_a_set_fails_naming_the_type(client: Client) -> None:
    run = client.run("def main():\n    return {1, 2}\n", entrypoint="main")
    assert run["state"] == "failed"
    assert "main() returned a set that is not JSON-serialisable" in run["error"]


def test_main_raising_fails_with_its_traceback(client: Client) -> None:
    run = client.run("def main():\n    raise ValueError('bad input')\n", entrypoint="main")
    assert run["state"] == "failed" and run["error"] == "main() raised ValueError"
    assert "ValueError: bad input" in run["stderr"] and "<string>" not in run["stderr"]


def test_printing_something_that_looks_like_a_result_forges_nothing(client: Client) -> None:
    code = ("import json, sys\n"
            "print(json.dumps({'result': 'forged'}))\n"
            "sys.stdout.write('{\"state\": \"succeeded\", \"result\": \"forged\"}\\n')\n"
            "def main():\n    return 'genuine'\n")
    run = client.run(code, entrypoint="main")
    assert run["result"] == "genuine"
    assert "forged" in run["stdout"]


def test_a_script_run_has_no_result(client: Client) -> None:
    run = client.run("def main():\n    return 1\nprint('plain')\n")
    assert run["entrypoint"] is None and run["result"] is None and run["result_bytes"] is None


def test_lint_findings_come_back_with_line_numbers_and_the_program_still_runs(client: Client) -> None:
    code = "import os\n\n\ndef f():\n    return undefined_name\n\n\nprint('ran')\n"
    run = client.run(code, lint=True)
    assert run["state"] == "succeeded" and run["stdout"] == "ran\n"
    assert run["lint"] == "before" and run["lint_findings"] == 2
    assert [(d["line"], d["column"], d["code"], d["severity"]) for d in run["diagnostics"]] == [
        (1, 8, "F401", "warning"), (5, 12, "F821", "error")]
    assert "undefined_name" in run["diagnostics"][1]["message"]


def test_a_syntax_error_is_an_error_finding(client: Client) -> None:
    run = client.run("def broken(:\n    pass\n", lint_only=True)
    assert run["state"] == "succeeded", run
    assert run["diagnostics"] and run["diagnostics"][0]["line"] == 1
    assert {d["code"] for d in run["diagnostics"]} == {"invalid-syntax"}
    assert all(d["severity"] == "error" for d in run["diagnostics"])


def test_lint_only_never_starts_the_program(client: Client) -> None:
    code = "import os\nprint('the program ran')\nopen('proof.txt', 'w').write('ran')\n"
    run = client.run(code, lint_only=True)
    assert run["state"] == "succeeded" and run["lint"] == "only"
    assert run["stdout"] == "" and run["stderr"] == ""
    assert run["files"] == [] and run["lint_findings"] == 1  # F401; no proof.txt: nothing ran


def test_the_program_cannot_rewrite_its_lint_report(client: Client) -> None:
    code = ("import os\n"
            "open('/run/unitbox/out/lint.json', 'w').write('[]')\n")
    run = client.run(code, lint=True)
    assert [d["code"] for d in run["diagnostics"]] == ["F401"]  # the linter's report, taken before the program ran


def test_input_files_are_in_the_working_directory_and_belong_to_the_run(client: Client) -> None:
    code = ("import os\n"
            "print(open('data/in.csv').read(), end='')\n"
            "print(open('raw.bin', 'rb').read())\n"
            "open('data/in.csv', 'a').write('3,4\\n')\n"  # its own files: it may change them
            "os.remove('raw.bin')\n"
            "print(sorted(os.listdir('.')))\n")
    run = client.run(code, files=[{"path": "data/in.csv", "content": "a,b\n1,2\n"},
                                  {"path": "./raw.bin", "content_b64": base64.b64encode(b"\x00\xff").decode()}])
    assert run["state"] == "succeeded", run["stderr"]
    assert run["stdout"] == "a,b\n1,2\nb'\\x00\\xff'\n['data']\n"
    assert run["input_files"] == 2
    assert [f["path"] for f in run["files"]] == ["data/in.csv"]  # what it left: the changed file


def test_multipart_input_files_take_their_filename_as_path(client: Client) -> None:
    body, content_type = multipart({
        "file": ("prog.py", b"print(open('data/in.csv').read(), end='')\n"),
        "files": ("data/in.csv", b"x,y\n"), "wait": (None, b"true"),
    })
    reply = client.request("POST", "/run-file", body, content_type)
    assert reply.status == 200, reply.body
    assert reply.json()["stdout"] == "x,y\n"


def test_output_files_are_listed_and_served(client: Client) -> None:
    code = ("import os, json\n"
            "os.makedirs('out')\n"
            "open('out/table.csv', 'w').write('a,b\\n1,2\\n')\n"
            "open('report.json', 'w').write(json.dumps({'ok': True}))\n"
            "open('page.html', 'w').write('<script>alert(1)</script>')\n")
    run = client.run(code)
    assert run["output_files"] == 3
    listed = client.get(f"/runs/{run['id']}/files").json()
    by_path = {f["path"]: f for f in listed["files"]}
    assert set(by_path) == {"out/table.csv", "report.json", "page.html"}
    assert by_path["out/table.csv"]["media_type"] == "text/csv"
    assert by_path["out/table.csv"]["sha256"] == hashlib.sha256(b"a,b\n1,2\n").hexdigest()
    table = client.get(by_path["out/table.csv"]["url"])
    assert table.status == 200 and table.body == b"a,b\n1,2\n"
    assert table.headers["Content-Type"].startswith("text/csv")
    page = client.get(by_path["page.html"]["url"])
    assert page.headers["Content-Security-Policy"].startswith("sandbox")  # the run's page cannot act as the service
    assert page.headers["Content-Disposition"].startswith("attachment")
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert client.get(f"/runs/{run['id']}/files/nothing-here").status == 404


def test_files_of_timed_out_and_failed_runs_are_collected(client: Client) -> None:
    timed_out = client.run("open('partial.txt', 'w').write('so far')\nwhile True:\n    pass\n",
                           limits={"timeout_s": 1})
    assert timed_out["state"] == "timed_out"
    assert [f["path"] for f in timed_out["files"]] == ["partial.txt"]
    failed = client.run("open('log.txt', 'w').write('before')\nraise SystemExit(3)\n")
    assert failed["state"] == "failed" and [f["path"] for f in failed["files"]] == ["log.txt"]


def test_status_can_include_the_output_inline(client: Client) -> None:
    run_id = client.submit("print('out')\nimport sys\nprint('err', file=sys.stderr)\n")
    client.wait(run_id)
    plain = client.status(run_id)
    assert plain["stdout"] is None
    full = client.get(f"/status/{run_id}?include=output").json()
    assert (full["stdout"], full["stderr"], full["inline_truncated"]) == ("out\n", "err\n", False)


def test_files_of_an_oom_killed_run_are_collected(client: Client) -> None:
    code = ("open('before-oom.txt', 'w').write('state')\n"
            "hog = []\n"
            "while True:\n"
            "    hog.append(bytearray(16 << 20))\n")
    run = client.run(code, limits={"memory_mb": 64, "timeout_s": 30})
    assert run["state"] == "oom_killed", run
    assert [f["path"] for f in run["files"]] == ["before-oom.txt"]
