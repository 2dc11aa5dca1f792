"""Who a run is: the CI job behind it (from the variables CI systems set), else user@host.

Pure: :func:`run_identity` reads a mapping of environment variables. The identity is shown in
the header, travels with every slot (workers log it) and is recorded in the JSON report
(``dispatch.identity``).
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Mapping
from typing import NamedTuple, TypedDict


class Identity(TypedDict):
    """A run's identity; ``None`` where the environment does not say."""

    ci: str | None  # "gitlab", "github", "jenkins", "buildkite"; None outside CI
    url: str | None  # the CI job (or build) page
    pipeline: str | None  # the pipeline / workflow run / build number
    user: str  # who started it (the CI user, else the local user)
    ref: str | None  # the branch or tag
    host: str  # the machine the controller runs on (a CI runner)
    label: str  # one line for people: "GitLab pipeline 1234 (main) by alice on ci-runner-7"


class _CI(NamedTuple):
    """Where one CI system keeps each part of the identity (the first set variable wins)."""

    ci: str
    name: str
    word: str  # what it calls a pipeline
    url: tuple[str, ...]
    pipeline: tuple[str, ...]
    user: tuple[str, ...]
    ref: tuple[str, ...]


_SYSTEMS = (
    _CI("gitlab", "GitLab", "pipeline", ("CI_JOB_URL",), ("CI_PIPELINE_ID",),
        ("GITLAB_USER_LOGIN",), ("CI_COMMIT_REF_NAME",)),
    _CI("github", "GitHub Actions", "run", (), ("GITHUB_RUN_ID",),
        ("GITHUB_TRIGGERING_ACTOR", "GITHUB_ACTOR"), ("GITHUB_REF_NAME",)),
    _CI("buildkite", "Buildkite", "build", ("BUILDKITE_BUILD_URL",), ("BUILDKITE_BUILD_NUMBER",),
        ("BUILDKITE_BUILD_CREATOR_EMAIL", "BUILDKITE_BUILD_CREATOR"), ("BUILDKITE_BRANCH",)),
    _CI("jenkins", "Jenkins", "build", ("BUILD_URL",), ("BUILD_NUMBER",),
        ("BUILD_USER_ID",), ("BRANCH_NAME", "GIT_BRANCH")),
)  # fmt: skip


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = (env.get(name) or "").strip()
        if value:
            return value
    return None


def _github_url(env: Mapping[str, str]) -> str | None:
    server, repo, run = (
        env.get(k) for k in ("GITHUB_SERVER_URL", "GITHUB_REPOSITORY", "GITHUB_RUN_ID")
    )
    if not (repo and run):
        return None
    return f"{(server or 'https://github.com').rstrip('/')}/{repo}/actions/runs/{run}"


def run_identity(env: Mapping[str, str], user: str, host: str) -> Identity:
    """The run's identity from ``env``: the first CI system whose variables are set, else
    ``user@host``."""
    for system in _SYSTEMS:
        url = _github_url(env) if system.ci == "github" else _first(env, system.url)
        pipeline = _first(env, system.pipeline)
        if not (url or pipeline) or (system.ci == "jenkins" and not url):
            continue  # BUILD_NUMBER alone is set by other tools too
        who = _first(env, system.user) or user
        ref = _first(env, system.ref)
        label = f"{system.name} {system.word} {pipeline}" if pipeline else system.name
        label += f" ({ref})" if ref else ""
        label += f" by {who} on {host}"
        return Identity(
            ci=system.ci, url=url, pipeline=pipeline, user=who, ref=ref, host=host, label=label
        )
    return Identity(
        ci=None, url=None, pipeline=None, user=user, ref=None, host=host, label=f"{user}@{host}"
    )


def identity_line(identity: Identity) -> str:
    """``GitLab pipeline 1234 (main) by alice on ci-runner-7, https://...``: for the header."""
    url = identity.get("url")
    return identity["label"] + (f", {url}" if url else "")


def current_identity() -> Identity:
    """This process's run identity (environment, login name, host name)."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name (a container with an unknown uid)
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return run_identity(os.environ, user, socket.gethostname())
