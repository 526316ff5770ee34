"""Command palette: every dashboard action by name."""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

ACTIONS = [
    ("Load a model", "load", "plan a model over the nodes, preview, then load it"),
    ("Generate", "generate", "stream tokens for a prompt"),
    ("Unload", "unload", "drop the model from every node"),
    ("Node details", "detail", "capabilities, shard and metrics of the selected node"),
    ("Switch discovery source", "source", "zeroconf or a list of host:port"),
    ("Run a short benchmark", "bench", "requests at concurrency 3 on the loaded plan"),
    ("Inject a fault", "fault", "into the selected node (kill, hang, latency, ...)"),
    ("Heal", "heal", "remove the selected node's faults"),
    ("Help", "help", "keys and what the panels show"),
    ("Quit", "quit", "leave the dashboard (the nodes keep running)"),
]


class ClusterCommands(Provider):
    async def discover(self) -> Hits:
        for name, action, help_text in ACTIONS:
            yield DiscoveryHit(name, partial(self.app.run_action, action), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, action, help_text in ACTIONS:
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), partial(self.app.run_action, action),
                          help=help_text)
