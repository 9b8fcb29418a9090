"""The qualification run: `bootc-unified-qualify` (cli), the scenario registry (scenarios) that
pytest selection, tmt's metadata and the report read, the pytest plugin that feeds the live
progress (plugin, events, progress), results.json (results) and report.html (report).

Imports harness.pytest_vm and harness.vm (artifact names, console banners); imported by nothing
in the harness but its own tests.
"""

from harness.qualify.scenarios import DEFAULT, SCENARIOS, Scenario, resolve

__all__ = ["DEFAULT", "SCENARIOS", "Scenario", "resolve"]
