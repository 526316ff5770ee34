"""Dependency direction: node never imports console; one-shot commands never load Textual
(only console/tui/ may, and only the dashboard command imports it)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

CHECK = """
import json, sys
import node.cli, node.service, node.pipeline, node.engine, node.models, node.plan
import node.advertise, node.auth, node.faults, node.histogram, node.metrics, node.reference
import node.ring, node.ring_worker, node.coordinator, node.api
node_only = sorted(m for m in sys.modules if m == "console" or m.startswith("console."))
import console.cli, console.local, console.client, console.discovery, console.monitor
import console.ops, console.parser, console.bench, console.gateway, console.report
print(json.dumps({"node_imports_console": node_only,
                  "ui": sorted(m for m in ("textual", "plotext") if m in sys.modules)}))
"""


def test_node_does_not_import_console_and_cli_loads_no_ui():
    res = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=ROOT,
                         check=True)
    found = json.loads(res.stdout)
    assert found == {"node_imports_console": [], "ui": []}
