"""Top-level conftest: pytester for the plugin's own end-to-end tests."""

pytest_plugins = ["pytester"]

collect_ignore_glob = ["bench/work*", ".venv*"]
