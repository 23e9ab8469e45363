"""The loopback Hub speaks the genuine huggingface_hub client's protocol (over real HTTP on 127.0.0.1)."""

import os

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


def test_endpoint_is_the_loopback_server(hub_server):
    from huggingface_hub import constants

    assert constants.ENDPOINT == hub_server.endpoint == f"http://127.0.0.1:{os.environ['HUB_TEST_PORT']}"


def test_repo_commit_history_and_downloads(hub_server, tmp_path):
    api = HfApi()
    repo_id = "proto/history"
    url = api.create_repo(repo_id)
    assert url.repo_id == repo_id and api.repo_exists(repo_id) and not api.repo_exists("proto/absent")
    api.create_repo(repo_id, exist_ok=True)
    with pytest.raises(HfHubHTTPError, match="409"):
        api.create_repo(repo_id)

    weights = os.urandom(3000)
    first = api.create_commit(
        repo_id,
        operations=[
            CommitOperationAdd("notes.txt", b"version 1"),
            CommitOperationAdd("sub/w.safetensors", weights),  # LFS: preupload -> batch -> PUT -> verify
        ],
        commit_message="first",
    )
    second = api.create_commit(
        repo_id,
        operations=[CommitOperationAdd("notes.txt", b"version 2"), CommitOperationDelete("sub/w.safetensors")],
        commit_message="second",
    )
    assert [c.title for c in api.list_repo_commits(repo_id)] == ["second", "first", "initial commit"]
    assert api.model_info(repo_id).sha == second.oid
    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", "notes.txt"]

    # by branch, by commit sha, by tag; older revisions keep their files
    assert open(hf_hub_download(repo_id, "notes.txt")).read() == "version 2"
    assert open(hf_hub_download(repo_id, "notes.txt", revision=first.oid)).read() == "version 1"
    with open(hf_hub_download(repo_id, "sub/w.safetensors", revision=first.oid), "rb") as f:
        assert f.read() == weights
    api.create_tag(repo_id, tag="v1", revision=first.oid)
    api.create_branch(repo_id, branch="dev", revision=first.oid)
    refs = api.list_repo_refs(repo_id)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": second.oid, "dev": first.oid}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", first.oid)]
    folder = snapshot_download(repo_id, revision="v1", cache_dir=tmp_path)
    assert sorted(os.listdir(folder)) == [".gitattributes", "notes.txt", "sub"]

    # resolve headers for HEAD: commit, etag (git sha1 / sha256 for LFS), size
    meta = get_hf_file_metadata(hf_hub_url(repo_id, "sub/w.safetensors", revision="dev"))
    assert meta.commit_hash == first.oid and meta.size == 3000 and len(meta.etag) == 64
    meta = get_hf_file_metadata(hf_hub_url(repo_id, "notes.txt"))
    assert meta.commit_hash == second.oid and meta.size == 9 and len(meta.etag) == 40

    # tree and paths-info
    tree = {e.path: type(e).__name__ for e in api.list_repo_tree(repo_id, revision="v1", recursive=True)}
    assert tree == {".gitattributes": "RepoFile", "notes.txt": "RepoFile", "sub": "RepoFolder",
                    "sub/w.safetensors": "RepoFile"}  # fmt: skip
    infos = api.get_paths_info(repo_id, ["sub", "sub/w.safetensors", "missing"], revision="dev")
    assert [(i.path, type(i).__name__) for i in infos] == [("sub", "RepoFolder"), ("sub/w.safetensors", "RepoFile")]
    assert infos[1].lfs.size == 3000

    # deletes
    api.delete_branch(repo_id, branch="dev")
    api.delete_tag(repo_id, tag="v1")
    assert [b.name for b in api.list_repo_refs(repo_id).branches] == ["main"]
    api.delete_repo(repo_id)
    assert not api.repo_exists(repo_id)


def test_errors_map_to_client_exceptions(hub_server):
    api = HfApi()
    api.create_repo("proto/errors")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("proto/nothing-here")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("proto/errors", revision="no-such-branch")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("proto/errors", "missing.json")
    with pytest.raises(RevisionNotFoundError):
        api.create_commit("proto/errors", [CommitOperationAdd("a.txt", b"a")], commit_message="x", revision="nope")
    # the body of each refused request was read: the same keep-alive connection still works
    assert api.model_info("proto/errors").id == "proto/errors"


def test_model_card_validation(hub_server):
    api = HfApi()
    api.create_repo("proto/cards")
    bad = "---\nlibrary_name: diffusers\npipeline_tag: not-a-task\n---\n# card\n"
    with pytest.raises(ValueError, match="pipeline_tag"):
        api.upload_file(path_or_fileobj=bad.encode(), path_in_repo="README.md", repo_id="proto/cards")
    good = "---\nlibrary_name: diffusers\npipeline_tag: unconditional-image-generation\ntags:\n- diffusers\n---\n"
    api.upload_file(path_or_fileobj=good.encode(), path_in_repo="README.md", repo_id="proto/cards")
    info = api.model_info("proto/cards")
    assert info.library_name == "diffusers" and info.pipeline_tag == "unconditional-image-generation"
    assert info.card_data.tags == ["diffusers"]


def test_private_repos_need_a_token(hub_server):
    api = HfApi()
    api.create_repo("proto/private", private=True)
    assert api.model_info("proto/private").private
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("proto/private", token=False)
    with pytest.raises(HfHubHTTPError, match="401"):
        HfApi(token="hf_wrong").create_repo("proto/other")


def test_failed_commit_changes_nothing(hub_server):
    api = HfApi()
    api.create_repo("proto/fail")
    kept = api.upload_file(path_or_fileobj=b"kept", path_in_repo="a.txt", repo_id="proto/fail")
    hub_server.fail_commits = 1
    with pytest.raises(HfHubHTTPError, match="500"):
        api.create_commit(
            "proto/fail", [CommitOperationAdd("b.txt", b"lost"), CommitOperationDelete("a.txt")], commit_message="x"
        )
    assert hub_server.fail_commits == 0
    assert api.model_info("proto/fail").sha == kept.oid
    assert open(hf_hub_download("proto/fail", "a.txt")).read() == "kept"
    # a commit made against an outdated parent is refused (what one-commit pushes rely on)
    newer = api.upload_file(path_or_fileobj=b"newer", path_in_repo="a.txt", repo_id="proto/fail")
    with pytest.raises(HfHubHTTPError, match="412"):
        api.create_commit(
            "proto/fail", [CommitOperationAdd("c.txt", b"c")], commit_message="x", parent_commit=kept.oid
        )
    assert api.model_info("proto/fail").sha == newer.oid
