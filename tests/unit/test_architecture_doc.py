"""docs/architecture.md is the map of the code: every module on it, and no module that is not."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pytest_celery_dispatch"
DOC = ROOT / "docs" / "architecture.md"


def test_every_module_is_on_the_map_and_the_map_names_no_other() -> None:
    text = DOC.read_text(encoding="utf-8")
    named = set(re.findall(r"`([a-z_.]+\.(?:py|json))`", text))
    modules = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    modules |= {p.name for p in PACKAGE.glob("*.json")}
    assert modules - named == set(), "modules missing from docs/architecture.md"
    assert named - modules == set(), "docs/architecture.md names modules that do not exist"


def test_the_worker_side_never_imports_the_controller_side() -> None:
    controller = {"session", "events", "scheduling", "replay", "terminal", "jsonreport", "plugin",
                  "fixtures", "timeline", "timeline_model", "collection", "forwarding", "retry",
                  "planning", "localworkers", "transport"}  # fmt: skip
    worker_side = ["worker", "workerinfo", "demo_tasks", "driver", "launcher", "runner", "zygote",
                   "prewarm", "spares", "spare_boot", "runnerspec", "jsonlines",
                   "procutil"]  # fmt: skip
    for name in worker_side:
        source = (PACKAGE / f"{name}.py").read_text(encoding="utf-8")
        imported = set(re.findall(r"from \.(\w+) import|from \. import (\w+)", source))
        flat = {n for pair in imported for n in pair if n}
        assert flat & controller == set(), f"{name}.py imports the controller side"
