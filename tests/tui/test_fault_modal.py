"""The fault modal offers every fault a node supports, partition included, with its
parameters (a widget test: no cluster)."""

from __future__ import annotations

from textual.app import App
from textual.widgets import Input, Select

from console.tui.screens import FaultScreen
from node.faults import KINDS


async def test_the_fault_modal_offers_every_kind_and_a_partition_with_its_peers():
    picked = []

    class Host(App):
        def on_mount(self) -> None:
            self.push_screen(FaultScreen("local-1"), picked.append)

    app = Host()
    async with app.run_test(size=(120, 30)) as pilot:
        kind = app.screen.query_one("#kind", Select)
        assert [value for _, value in kind._options if value != Select.BLANK] == list(KINDS)
        kind.value = "partition"
        app.screen.query_one("#params", Input).value = "peers=n1,127.0.0.1:4 direction=to"
        await pilot.click("#inject")
        await pilot.pause()
    spec = picked[0]
    assert (spec.kind, list(spec.peers), spec.direction) == (
        "partition", ["n1", "127.0.0.1:4"], "to")
