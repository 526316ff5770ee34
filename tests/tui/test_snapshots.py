"""SVG snapshots of the dashboard with seeded fake data at a fixed terminal size.

Update after an intended change with: pytest tests/tui/test_snapshots.py --snapshot-update
and look at the report before committing.
"""

from __future__ import annotations

import time

import pytest

from console.tui.app import ClusterApp
from tests.tui.fake import FakeMonitor

SIZE = (120, 40)


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.delenv("TZ")
    time.tzset()


def app() -> ClusterApp:
    return ClusterApp(FakeMonitor(), start_monitor=False)


def test_main_screen(snap_compare):
    assert snap_compare(app(), terminal_size=SIZE)


def test_load_modal(snap_compare):
    assert snap_compare(app(), terminal_size=SIZE, press=["l"])


def test_narrow_terminal_keeps_the_essentials(snap_compare):
    assert snap_compare(app(), terminal_size=(80, 24))


def test_tensor_parallel_plan_splits_every_layer(snap_compare):
    tensor = ClusterApp(FakeMonitor(tensor=True), start_monitor=False)
    assert snap_compare(tensor, terminal_size=SIZE)


def test_takeover_shows_the_new_coordinator_and_the_recovery(snap_compare):
    """local-0 coordinated and died: local-1 is starred and the event log says who
    noticed, who took over, the new plan and how many requests resumed."""
    after = ClusterApp(FakeMonitor(takeover=True), start_monitor=False)
    assert snap_compare(after, terminal_size=SIZE)


def test_help_screen(snap_compare):
    assert snap_compare(app(), terminal_size=SIZE, press=["question_mark"])

