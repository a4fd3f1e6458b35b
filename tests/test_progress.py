"""compactify.progress: in a kept run (papermill, nbval, a log) a long step writes plain lines,
not one saved output per redraw of a bar; a bad style is refused by name."""
from __future__ import annotations

import os

import pytest

from compactify import progress as P


def test_log_style_writes_one_plain_line_at_the_end_of_a_short_step(monkeypatch, capsys):
    monkeypatch.setenv("COMPACTIFY_PROGRESS", "log")
    assert P.style() == "log"
    total = 0
    for i in P.progress(range(5), desc="tasks"):
        total += i
    out, err = capsys.readouterr()
    assert total == 10 and err == ""
    lines = out.splitlines()
    assert len(lines) == 1 and "\r" not in out, out
    assert lines[0].startswith("tasks: 5/5 [") and "|" not in lines[0]  # no bar drawn in a log


def test_log_style_prints_at_most_once_per_interval(monkeypatch, capsys):
    monkeypatch.setenv("COMPACTIFY_PROGRESS", "log")
    clock = iter(range(0, 10_000, 30))  # every update 30 s after the last
    bar = P.LogBar(total=10, desc="heal", interval=60)
    bar._time = lambda: next(clock)
    bar.start_t = bar.last_print_t = 0
    for _ in range(10):
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert 3 <= len(lines) <= 7, lines  # ~one per 60 s of a 300 s step, plus the last
    assert lines[-1].startswith("heal: 10/10")


def test_a_disabled_bar_writes_nothing(monkeypatch, capsys):
    monkeypatch.setenv("COMPACTIFY_PROGRESS", "log")
    list(P.progress(range(3), desc="x", disable=True))
    assert capsys.readouterr().out == ""


def test_an_unknown_style_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("COMPACTIFY_PROGRESS", "widgets")
    with pytest.raises(ValueError, match="bar, log"):
        P.progress(range(3))


def test_log_style_switches_off_datasets_bars(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("COMPACTIFY_PROGRESS", "log")
    datasets.enable_progress_bars()
    P.quiet_third_party()
    assert not datasets.is_progress_bar_enabled()
    datasets.enable_progress_bars()


def test_log_style_has_no_monitor_thread_to_print_extra_lines(monkeypatch):
    monkeypatch.setenv("COMPACTIFY_PROGRESS", "log")
    from tqdm.std import tqdm

    other = tqdm(total=1, file=open(os.devnull, "w"))  # a live bar elsewhere: tqdm starts its monitor thread
    bar = P.progress(total=3, desc="x")
    try:
        assert other.monitor is not None and bar.monitor is None
        assert bar not in tqdm._instances  # so the monitor never refreshes it on its own
    finally:
        bar.close()
        other.close()
