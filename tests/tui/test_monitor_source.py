"""The dashboard's data source has one interface: console.monitor.MonitorSource.

ClusterMonitor (the real one) and FakeMonitor (the widget tests' stand-in) both implement
all of it with the same signatures, and the protocol lists exactly the names the dashboard
(console/tui/*.py) uses of a monitor, so a fake can no longer lag behind what the app calls.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from console.monitor import ClusterMonitor, MonitorSource
from tests.tui.fake import FakeMonitor

TUI = Path(__file__).resolve().parents[2] / "console" / "tui"


def protocol_methods() -> dict[str, object]:
    return {name: value for name, value in vars(MonitorSource).items()
            if inspect.isfunction(value) and not name.startswith("_")}


def protocol_attributes() -> set[str]:
    return set(MonitorSource.__annotations__)


def shape(function) -> tuple:
    """What a caller relies on: async or not, and each parameter's name, kind and default."""
    sig = inspect.signature(function)
    return (inspect.iscoroutinefunction(function),
            [(p.name, p.kind, p.default) for p in sig.parameters.values()])


@pytest.fixture(params=["ClusterMonitor", "FakeMonitor"])
def source(request):
    return ClusterMonitor(["127.0.0.1:1"]) if request.param == "ClusterMonitor" else FakeMonitor()


def test_the_protocol_is_not_empty():
    assert {"plan", "window", "switch_source"} <= set(protocol_methods())
    assert {"nodes", "events", "throughput"} <= protocol_attributes()


def test_both_sources_are_monitor_sources(source):
    assert isinstance(source, MonitorSource)


@pytest.mark.parametrize("name", sorted(protocol_methods()))
def test_methods_match_the_protocol(source, name):
    method = getattr(type(source), name, None)
    assert method is not None, f"{type(source).__name__} lacks {name}()"
    assert shape(method) == shape(protocol_methods()[name]), (
        f"{type(source).__name__}.{name}{inspect.signature(method)} differs from "
        f"MonitorSource.{name}{inspect.signature(protocol_methods()[name])}")


def test_attributes_are_present(source):
    missing = sorted(a for a in protocol_attributes() if not hasattr(source, a))
    assert not missing, f"{type(source).__name__} lacks {missing}"


def used_by_the_dashboard() -> dict[str, str]:
    """Every `monitor.X` / `self.monitor.X` in console/tui/*.py: name -> first file:line."""
    used: dict[str, str] = {}
    for path in sorted(TUI.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            value = node.value
            if ((isinstance(value, ast.Name) and value.id == "monitor")
                    or (isinstance(value, ast.Attribute) and value.attr == "monitor")):
                used.setdefault(node.attr, f"{path.name}:{node.lineno}")
    return used


def test_the_protocol_is_exactly_what_the_dashboard_uses():
    used = used_by_the_dashboard()
    members = set(protocol_methods()) | protocol_attributes()
    missing = {name: where for name, where in used.items() if name not in members}
    assert not missing, f"the dashboard uses monitor members MonitorSource lacks: {missing}"
    unused = sorted(members - set(used))
    assert not unused, f"MonitorSource lists members the dashboard never uses: {unused}"


async def test_the_fake_switches_source_as_the_app_asks():
    fake = FakeMonitor()
    await fake.switch_source(["10.0.0.1:50051", "10.0.0.2:50051"], False)
    assert (fake.mdns, fake.static) == (False, ["10.0.0.1:50051", "10.0.0.2:50051"])
    await fake.switch_source(None, True)
    assert (fake.mdns, fake.static) == (True, [])
    assert fake.events[-1].text.startswith("discovery source: zeroconf")
