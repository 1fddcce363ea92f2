import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from minivlm.cli import COMMANDS, main

PY = [sys.executable, "-m", "minivlm.cli"]


def run(*args, **kw):
    return subprocess.run([*PY, *args], capture_output=True, text=True, timeout=300, **kw)


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_a_usage_error():
    r = run("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr and "Traceback" not in r.stderr


def test_every_registered_command_has_help():
    # a fresh process per command, as a shell runs it; two at a time (each spends its time importing)
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(COMMANDS, pool.map(lambda name: run(name, "--help"), COMMANDS)))
    for name, r in results.items():
        assert r.returncode == 0, (name, r.stderr[-2000:])
        assert f"minivlm {name}" in r.stdout


def test_cost_json_rows_have_the_documented_fields():
    r = run("cost", "--json", "--only", "fusion")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert {"model", "component", "params_m", "gflops", "paper_params_m", "paper_gflops"} <= set(rows[0])
    assert {row["model"] for row in rows} >= {"bert-base", "minilm", "tinybert4"}


def test_missing_input_file_is_a_clear_error_without_traceback(tmp_path):
    r = run("evaluate", "--task", "vqa", "--results", str(tmp_path / "missing.json"),
            "--references", str(tmp_path / "q.json"), "--annotations", str(tmp_path / "a.json"))
    assert r.returncode == 1
    assert "missing.json" in r.stderr or "q.json" in r.stderr
    assert "Traceback" not in r.stderr
