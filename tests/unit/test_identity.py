"""identity.run_identity: who a run is, from the variables each CI system sets."""

from __future__ import annotations

import pytest

from pytest_celery_dispatch.identity import identity_line, run_identity

GITLAB = {
    "GITLAB_CI": "true",
    "CI_JOB_URL": "https://gitlab.example/lab/fw/-/jobs/99",
    "CI_PIPELINE_ID": "1234",
    "GITLAB_USER_LOGIN": "alice",
    "CI_COMMIT_REF_NAME": "main",
}
GITHUB = {
    "GITHUB_ACTIONS": "true",
    "GITHUB_SERVER_URL": "https://github.com",
    "GITHUB_REPOSITORY": "lab/fw",
    "GITHUB_RUN_ID": "77",
    "GITHUB_ACTOR": "octo",
    "GITHUB_REF_NAME": "feature/x",
}
BUILDKITE = {
    "BUILDKITE_BUILD_URL": "https://buildkite.com/lab/fw/builds/5",
    "BUILDKITE_BUILD_NUMBER": "5",
    "BUILDKITE_BUILD_CREATOR": "Bob",
    "BUILDKITE_BRANCH": "dev",
}
JENKINS = {
    "BUILD_URL": "https://jenkins.example/job/fw/8/",
    "BUILD_NUMBER": "8",
    "BRANCH_NAME": "release",
}


@pytest.mark.parametrize(
    ("env", "ci", "url", "label"),
    [
        (GITLAB, "gitlab", GITLAB["CI_JOB_URL"],
         "GitLab pipeline 1234 (main) by alice on runner-7"),
        (GITHUB, "github", "https://github.com/lab/fw/actions/runs/77",
         "GitHub Actions run 77 (feature/x) by octo on runner-7"),
        (BUILDKITE, "buildkite", BUILDKITE["BUILDKITE_BUILD_URL"],
         "Buildkite build 5 (dev) by Bob on runner-7"),
        (JENKINS, "jenkins", JENKINS["BUILD_URL"], "Jenkins build 8 (release) by me on runner-7"),
    ],
    ids=["gitlab", "github", "buildkite", "jenkins"],
)  # fmt: skip
def test_each_ci_system_names_its_job(env, ci, url, label):
    identity = run_identity(env, "me", "runner-7")
    assert identity["ci"] == ci
    assert identity["url"] == url
    assert identity["label"] == label
    assert identity["host"] == "runner-7"
    assert identity_line(identity) == f"{label}, {url}"


def test_outside_ci_it_is_user_at_host():
    identity = run_identity({"HOME": "/home/me"}, "me", "laptop")
    assert identity == {
        "ci": None,
        "url": None,
        "pipeline": None,
        "user": "me",
        "ref": None,
        "host": "laptop",
        "label": "me@laptop",
    }
    assert identity_line(identity) == "me@laptop"


def test_a_build_number_alone_is_not_jenkins():
    assert run_identity({"BUILD_NUMBER": "3"}, "me", "h")["ci"] is None


def test_empty_variables_do_not_count_and_the_local_user_fills_in():
    env = {**GITLAB, "GITLAB_USER_LOGIN": "", "CI_COMMIT_REF_NAME": " "}
    identity = run_identity(env, "runner", "h")
    assert identity["user"] == "runner"
    assert identity["ref"] is None
    assert identity["label"] == "GitLab pipeline 1234 by runner on h"
