"""Credentials a user might paste into a job file: under any key (``x-``
anchors included), in a URL (also with a leading space, or as a label), or
in a comment. Refused at load time, named by place, never echoed; and the
Kubernetes ConfigMap carries the validated spec, not the file's text."""

from __future__ import annotations

import pytest

from vlcluster.errors import SpecError
from vlcluster.jobspec.load import load_pipeline

FAKE = "fake-credential-value-7731"
DATA = "{kind: data, n_train: 100, n_val: 10, shard_size: 50}"


def refused(write_job, text: str) -> str:
    path = write_job(text)
    with pytest.raises(SpecError) as info:
        load_pipeline(path)
    message = str(info.value)
    assert message.startswith(str(path)) and FAKE not in message and "hunter2" not in message
    return message


@pytest.mark.parametrize("key", ["api_key", "apikey", "ApiKey", "SessionToken", "session_token", "passphrase", "pwd",
                                 "db_pwd", "bearer", "Authorization", "password", "AWS_SECRET_ACCESS_KEY", "cookie"])
def test_secret_looking_keys_under_anchor_keys(write_job, key):
    message = refused(write_job, f"name: t\nx-creds: {{{key}: {FAKE}}}\nstages:\n  data: {DATA}\n")
    assert f"x-creds.{key}: looks like a credential" in message


@pytest.mark.parametrize(
    "place",
    [
        "x-note: ' https://bob:hunter2@example.com/x'",
        "x-note: 'see s3://AKIA:hunter2@bucket/x for details'",
        "x-labels: {'https://bob:hunter2@example.com': 1}",
    ],
)
def test_urls_with_userinfo_anywhere(write_job, place):
    message = refused(write_job, f"name: t\n{place}\nstages:\n  data: {DATA}\n")
    assert "looks like a credential" in message


@pytest.mark.parametrize(
    "comment",
    [
        "# endpoint: https://bob:hunter2@minio.local:9000",
        f"#aws_secret_access_key: {FAKE}",
        f"    # API_KEY={FAKE}",
        f"stages:  # token: '{FAKE}'",
    ],
)
def test_credentials_in_comments(write_job, comment):
    text = f"name: t\n{comment}\nstages:\n  data: {DATA}\n" if not comment.startswith("stages") else f"name: t\n{comment}\n  data: {DATA}\n"
    message = refused(write_job, text)
    assert "line 2: a comment looks like it holds a credential" in message


def test_ordinary_comments_and_tokenizer_fields_are_fine(write_job):
    path = write_job(
        "# credentials come from the environment (AWS_SECRET_ACCESS_KEY), never from here\n"
        "name: t  # the run's name\n"
        "x-url: 'http://127.0.0.1:9000/#anchor'\n"
        "stages:\n"
        "  ev: {kind: eval, source: m, data: {val: 'a.tar', tokenizer: tok.json}}  # key: short\n"
        "  m: {kind: merge, source: p}\n"
        "  p: {kind: pretrain, data: {train: a.tar}, train: {steps: 1, batch_size: 8}}\n"
    )
    assert load_pipeline(path).stages["ev"].data.tokenizer == "tok.json"


def test_configmap_publishes_the_validated_spec(write_job, tmp_path):
    from vlcluster.backends.k8s.profile import load_profile
    from vlcluster.backends.k8s.render import render_manifests
    from vlcluster.graph import build_graph

    path = write_job(
        "# owner: team-a (comments stay home)\nname: t\nx-common: &steps {steps: 2, batch_size: 8}\n"
        f"stages:\n  data: {DATA}\n  seed: {{kind: pretrain, data: {{from: data}}, train: *steps}}\n"
    )
    graph = build_graph(load_pipeline(path), str(path))
    configmap = render_manifests(graph, str(path), [], None, load_profile(None))[0]
    published = configmap["data"]["job.yaml"]
    assert "team-a" not in published and "x-common" not in published
    (tmp_path / "again.yaml").write_text(published)
    assert load_pipeline(tmp_path / "again.yaml") == load_pipeline(path)
