"""Long jobs show progress: a bar while they run (on a terminal, or LOWVRAM_PROGRESS=1) and a line when they end."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import nn

from lightning_lowvram import plan
from lightning_lowvram._progress import progress
from lightning_lowvram.cores.low_bit_base import quantize_frozen_base
from lightning_lowvram.demo import DigitsMLP


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.INFO)
    return lambda: [r.getMessage() for r in caplog.records]


def test_a_bar_is_drawn_when_asked_and_the_closing_line_says_how_much_and_how_long(monkeypatch, capsys, lines):
    monkeypatch.setenv("LOWVRAM_PROGRESS", "1")
    with progress("converting", total=3, unit="layer") as job:
        for name in ("a", "b", "c"):
            job.advance(name)
    err = capsys.readouterr().err
    assert "converting:" in err and "/3 [" in err  # tqdm's bar (total 3), on standard error
    assert re.fullmatch(r"converting: 3 layers in \d+\.\d s", lines()[-1])


def test_no_bar_off_a_terminal_unless_asked(monkeypatch, capsys, lines):
    monkeypatch.delenv("LOWVRAM_PROGRESS", raising=False)
    with progress("planning", unit="trace") as job:
        job.advance()
    assert "trace/s" not in capsys.readouterr().err  # no tqdm bar: pytest's captured stderr is not a terminal
    assert lines()[-1].startswith("planning: 1 trace in ")


def test_planning_reports_each_trace_and_ends_with_a_line(monkeypatch, capsys, lines):
    monkeypatch.setenv("LOWVRAM_PROGRESS", "1")
    batch = (torch.zeros(64, 64), torch.zeros(64, dtype=torch.long))
    plan(DigitsMLP(), batch, "rtx3060_12gb")
    (line,) = [m for m in lines() if m.startswith("plan for rtx3060_12gb: ")]
    traces = int(re.match(r"plan for rtx3060_12gb: (\d+) traces? in ", line).group(1))
    assert traces >= 2, line
    assert "32-true, micro-batch" in capsys.readouterr().err  # the setting being traced, beside the bar


def test_a_low_bit_base_conversion_counts_its_layers(lines):
    net = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 2))
    net.requires_grad_(False)
    quantize_frozen_base(net, bits=8)
    assert lines()[-1].startswith("frozen base to int8: 3 layers in ")
