"""The worker image (workers/Dockerfile) as it runs: its entrypoint, here without an engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import compose_workers  # noqa: E402


def test_the_entrypoint_gives_celery_broker_url_precedence(tmp_path):
    """The celery command prefers BROKER_URL (its --broker), which the image sets to its default;
    compose sets CELERY_BROKER_URL. The entrypoint makes the latter win, as in the healthcheck."""
    image = compose_workers.WorkerImage()
    bin_dir = image.install_commands(tmp_path / "bin")
    show = [*image.entrypoint, "sh", "-c", 'echo "$BROKER_URL"']
    env = image.environment(ROOT, bin_dir, {"CELERY_BROKER_URL": "amqp://compose//"})
    out = subprocess.run(show, env=env, capture_output=True, text=True, timeout=10).stdout
    assert out.strip() == "amqp://compose//"
    env = image.environment(ROOT, bin_dir, {"BROKER_URL": "amqp://given//"})
    out = subprocess.run(show, env=env, capture_output=True, text=True, timeout=10).stdout
    assert out.strip() == "amqp://given//"
