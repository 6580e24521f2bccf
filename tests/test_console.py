"""newsray.console: what reaches the terminal and what goes to the log file, in a real child process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import logging, os, subprocess, sys, warnings
    from newsray import console

    path = console.capture_logs(sys.argv[1], "demo")
    console.out.print("RESULT line for the person")
    print("a bare print from a library")
    print("a stderr line from a library", file=sys.stderr)
    logging.getLogger("ray").warning("a Ray log record")
    warnings.warn("a library warning")
    os.write(2, b"a C library writing to fd 2\\n")
    subprocess.run(["echo", "a child process"], check=True)
    console.warn("newsray's own warning")
    logging.getLogger("newsray.test").warning("a newsray logger warning")
    with console.progress("work", 3, "items") as advance:
        advance(3)
    console.release_logs()
    print("after release")
""")


def test_capture_sends_the_libraries_to_the_log_file_and_keeps_the_console(tmp_path: Path):
    r = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (log,) = (tmp_path / "runs" / "logs").glob("demo-*.log")
    text = log.read_text()
    for line in ("a bare print from a library", "a stderr line from a library", "a Ray log record", "a library warning",
                 "a C library writing to fd 2", "a child process"):
        assert line in text and line not in r.stdout + r.stderr, line
    assert r.stdout.splitlines() == ["RESULT line for the person", "after release"]  # no bar off a terminal
    assert "warning: newsray's own warning" in r.stderr and "warning: a newsray logger warning" in r.stderr
    assert "RESULT line" not in text


BOOM = textwrap.dedent("""
    import sys
    import newsray.evaluate.report as report

    def compare(*args, **kwargs):
        raise RuntimeError("boom inside a library\\nsecond line")

    report.compare = compare  # the stage fails with something that is not a NewsrayError
    sys.argv = ["newsray", "compare", "a", "b", "--set", f"tracking.run_dir={sys.argv[1]}"]
    from newsray.cli import main
    main()
""")


def test_an_unexpected_error_is_one_line_naming_the_log_that_holds_its_traceback(tmp_path: Path):
    r = subprocess.run([sys.executable, "-c", BOOM, str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    (log,) = (tmp_path / "runs" / "logs").glob("compare-*.log")
    assert r.returncode == 1, r.stderr
    assert r.stderr.replace("\n", "") == f"error: RuntimeError: boom inside a library (the traceback and the logs are in {log})"
    assert r.stdout.replace("\n", "").startswith(f"logs: {log}")
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "second line" in text


def test_the_pipeline_says_what_a_demo_answer_shows():
    from types import SimpleNamespace

    from newsray.config import load_config
    from newsray.pipeline import answer_caption

    demo = load_config(None, ["pipeline.train_max_steps=20"])
    r = SimpleNamespace(registered="models:/newsray-news/3", answer={"summary": "s", "key_insights": ["VMware", "VMware VM", "VMware VM"]})
    caption = answer_caption(demo, r)
    assert caption.startswith("models:/newsray-news/3, trained 20 steps on the pipeline's demo budget; its key_insights repeat items")
    assert "docs/RESULTS.md" in caption
    r.answer["key_insights"] = ["VMware", "patents"]
    assert answer_caption(demo, r) == "models:/newsray-news/3, trained 20 steps on the pipeline's demo budget"
    full = load_config(None, ["pipeline.train_max_steps=null"])
    assert answer_caption(full, r) == "models:/newsray-news/3, trained on the config's full budget"
