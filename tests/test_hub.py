"""zoo.hub and the pull/publish/list/info commands, driving the real huggingface_hub client.

The client talks to a stand-in Hub (tests/hub_server.py) on 127.0.0.1 through HF_ENDPOINT;
the client's import-time endpoint is pointed at a closed port, so anything that did not go
through HF_ENDPOINT fails instead of reaching the real Hub.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import constants

import zoo
from cli import main
from zoo.checkpoint import save_checkpoint
from zoo.errors import CheckpointError, ConfigError, HubError
from zoo.features import FeatureSpec
from zoo.hub import HubRef, cached_checkpoints, card_metadata, list_hub, publish, pull
from zoo.update_net import UpdateNet

from .hub_server import StandInHub

REPO = "alice/lstm-tiny"
TOKEN = "hf_alice_write"
TOKENS = {
    TOKEN: {"name": "alice", "role": "write", "orgs": ["zoo-org"]},
    "hf_bob_read": {"name": "bob", "role": "read"},
}
ROOT = Path(__file__).resolve().parent.parent

# What the real client must use for a publish and a pull; a protocol change fails here.
PUBLISH_ROUTES = {
    "GET /api/whoami-v2",
    "POST /api/repos/create",
    "POST /api/validate-yaml",
    "POST /api/models/{repo}/preupload/{revision}",
    "POST /api/models/{repo}/commit/{revision}",
}
LFS_ROUTES = {
    "POST /{repo}.git/info/lfs/objects/batch",
    "PUT /lfs/upload/{oid}",
    "POST /lfs/verify/{oid}",
}
PULL_ROUTES = {
    "GET /api/models/{repo}/revision/{revision}",
    "GET /api/models/{repo}/tree/{revision}",
    "HEAD /{repo}/resolve/{revision}/{path}",
    "GET /{repo}/resolve/{revision}/{path}",
}


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """Hermetic client settings: cache and token file in tmp_path, no real endpoint."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # Port 9 (discard) on loopback: closed. A request that ignored HF_ENDPOINT fails here.
    closed = "http://127.0.0.1:9"
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        closed + "/{repo_id}/resolve/{revision}/{filename}",
    )
    return tmp_path


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    """Any name lookup other than the loopback address fails the test: no real Hub traffic."""
    real = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"test tried to resolve {host!r}; only 127.0.0.1 is allowed")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)


def _start(monkeypatch, upload_mode="lfs"):
    hub = StandInHub(tokens=TOKENS, upload_mode=upload_mode, max_requests=300).start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    # The LFS exchange is the protocol when Xet is off; the regular mode never needs Xet.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", upload_mode == "lfs")
    return hub


@pytest.fixture
def hub(hub_env, monkeypatch):
    server = _start(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield server
    server.stop()
    assert server.overflow == 0, "the client exceeded the stand-in Hub's request budget"
    assert not [r for _, r in server.hits if r.startswith("UNKNOWN")], server.hits


def make_checkpoint(directory: Path, *, seed: int = 0, hidden: int = 4, kinds=("conv", "fc")):
    torch.manual_seed(seed)
    spec = FeatureSpec("gh")
    nets = {k: UpdateNet(spec.num_features, hidden_size=hidden, num_layers=2) for k in kinds}
    with torch.no_grad():
        for net in nets.values():
            for p in net.parameters():
                p.add_(0.01 * torch.randn_like(p))
    config = {
        "name": directory.name,
        "description": "a tiny test optimizer",
        "source_network": {"name": "small", "dataset": "mnist", "input_shape": [1, 28, 28]},
        "curvature": {"mode": "diagonal"},
        "training": {"horizon": 50, "unroll": 10, "iterations": 3},
        "recipe": {"name": "tiny", "meta": {"iterations": 3}},
        "metrics": {"validation_score_best": 0.5 + seed},
    }
    card = f"---\nlicense: mit\n---\n\n# {directory.name}\n\nSeed {seed}.\n"
    return save_checkpoint(directory, nets, spec, config, card)


# ---------------------------------------------------------------------- references


def test_hub_ref_parses_owner_name_and_revision():
    assert HubRef.parse("hf://a/b") == HubRef("a/b", None)
    assert HubRef.parse("hf://a/b@v1") == HubRef("a/b", "v1")
    assert HubRef.parse("hf://a/b@" + "c" * 40).is_pinned
    assert str(HubRef("a/b", "main")) == "hf://a/b@main"


@pytest.mark.parametrize("bad", ["hf://just-a-name", "hf://a/b/c", "hf://a/b@", "hf://a--b/c"])
def test_hub_ref_rejects_malformed_references(bad):
    with pytest.raises(ConfigError, match="hf://owner/name"):
        HubRef.parse(bad)


def test_card_metadata_names_library_tags_datasets_recipe_and_results(tmp_path):
    config = zoo.load(make_checkpoint(tmp_path / "ck")).config
    meta = card_metadata(config)
    assert meta["library_name"] == "zoo"
    assert {"learned-optimizer", "layer-kind-conv", "layer-kind-fc"} <= set(meta["tags"])
    assert meta["datasets"] == ["mnist"]
    assert meta["zoo"]["recipe"]["name"] == "tiny"
    assert meta["zoo"]["metrics"] == {"validation_score_best": 0.5}


# ---------------------------------------------------------------------- the scenario


@pytest.mark.parametrize("upload_mode", ["lfs", "regular"])
def test_publish_pull_pin_and_offline_reload(hub_env, monkeypatch, upload_mode):
    """publish v1 → pull by branch → publish v2 → pull v1's sha → stop → reload offline."""
    server = _start(monkeypatch, upload_mode)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    v1_dir = make_checkpoint(hub_env / "v1" / "lstm-tiny", seed=1)
    v2_dir = make_checkpoint(hub_env / "v2" / "lstm-tiny", seed=2)
    try:
        first = publish(v1_dir, REPO)
        assert first.created_repo and len(first.sha) == 40
        assert first.commit_url == f"{server.url}/{REPO}/commit/{first.sha}"
        routes_after_publish = server.routes()

        by_branch = pull(f"hf://{REPO}")
        assert by_branch.sha == first.sha and by_branch.pinned == f"hf://{REPO}@{first.sha}"
        v1_bytes = (v1_dir / "model.safetensors").read_bytes()
        assert (by_branch.path / "model.safetensors").read_bytes() == v1_bytes
        assert by_branch.moved_from is None

        second = publish(v2_dir, REPO)
        assert second.sha != first.sha and not second.created_repo
        moved = pull(f"hf://{REPO}@main")
        assert moved.sha == second.sha and moved.moved_from == first.sha

        pinned = pull(f"hf://{REPO}@{first.sha}")
        assert (pinned.path / "model.safetensors").read_bytes() == v1_bytes
        assert pinned.optimizer.config["metrics"] == {"validation_score_best": 1.5}
        assert pinned.optimizer.source == f"hf://{REPO}@{first.sha}"
    finally:
        server.stop()

    assert routes_after_publish >= PUBLISH_ROUTES
    if upload_mode == "lfs":
        assert routes_after_publish >= LFS_ROUTES
    else:  # every file went inline, base64, in the commit payload
        assert not routes_after_publish & LFS_ROUTES
    assert server.routes() >= PULL_ROUTES
    assert server.overflow == 0

    # Server gone: a fresh process with HF_HUB_OFFLINE=1 loads both revisions from the cache.
    script = (
        "import zoo, sys\n"
        f"v1 = zoo.load('hf://{REPO}@{first.sha}')\n"
        f"v2 = zoo.load('hf://{REPO}')\n"
        "print(v1.config['metrics']['validation_score_best'], v2.config['metrics']['validation_score_best'], v2.source)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_ENDPOINT": server.url}
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1.5", "2.5", f"hf://{REPO}@{second.sha}"]


# ---------------------------------------------------------------------- pinning


def test_lock_file_keeps_the_locked_commit_and_says_when_the_branch_moved(hub, hub_env):
    lock = hub_env / "zoo.lock"
    publish(make_checkpoint(hub_env / "a" / "x", seed=1), REPO)
    first = pull(f"hf://{REPO}", lock=lock)
    entry = json.loads(lock.read_text())["pins"][f"hf://{REPO}@main"]
    assert entry["sha"] == first.sha

    second = publish(make_checkpoint(hub_env / "b" / "x", seed=2), REPO)
    again = pull(f"hf://{REPO}", lock=lock)
    assert again.locked and again.sha == first.sha
    assert again.moved_from == first.sha and again.remote_sha == second.sha

    updated = pull(f"hf://{REPO}", lock=lock, update_lock=True)
    assert updated.sha == second.sha
    assert json.loads(lock.read_text())["pins"][f"hf://{REPO}@main"]["sha"] == second.sha


def test_pinned_cached_load_makes_no_request(hub, hub_env):
    sha = publish(make_checkpoint(hub_env / "a" / "x"), REPO).sha
    pull(f"hf://{REPO}@{sha}")
    before = len(hub.hits)
    zoo.load(f"hf://{REPO}@{sha}")
    assert len(hub.hits) == before


def test_branch_and_local_dir(hub, hub_env):
    result = publish(make_checkpoint(hub_env / "a" / "x", seed=3), REPO, branch="exp")
    assert result.branch == "exp"
    assert "POST /api/models/{repo}/branch/{branch}" in hub.routes()
    target = hub_env / "here"
    pulled = pull(f"hf://{REPO}", revision="exp", local_dir=target)
    assert pulled.sha == result.sha and pulled.path == target.resolve()
    assert (target / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="give one of them"):
        pull(f"hf://{REPO}@main", revision="exp")


# ---------------------------------------------------------------------- bad input


def test_missing_token_is_said_plainly(hub, hub_env, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="no Hugging Face token found.*HF_TOKEN"):
        publish(make_checkpoint(hub_env / "x"), REPO)
    assert "POST /api/repos/create" not in hub.routes()


def test_read_only_token_and_foreign_namespace_are_refused(hub, hub_env, monkeypatch):
    folder = make_checkpoint(hub_env / "x")
    monkeypatch.setenv("HF_TOKEN", "hf_bob_read")
    with pytest.raises(HubError, match="read-only"):
        publish(folder, "bob/x")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(HubError, match="cannot write to namespace 'carol'"):
        publish(folder, "carol/x")
    monkeypatch.setenv("HF_TOKEN", "hf_unknown")
    with pytest.raises(HubError, match="rejected the token"):
        publish(folder, REPO)
    assert "POST /api/repos/create" not in hub.routes()


def test_dry_run_validates_and_uploads_nothing(hub, hub_env):
    result = publish(make_checkpoint(hub_env / "x"), REPO, dry_run=True)
    assert result.dry_run and result.sha is None and result.user == "alice"
    assert set(result.files) == {"model.safetensors", "config.json", "README.md"}
    assert "library_name: zoo" in result.card and "layer-kind-conv" in result.card
    assert hub.routes() == {"GET /api/whoami-v2"}


def test_nonexistent_repo_and_revision_name_the_cause(hub, hub_env):
    with pytest.raises(HubError, match="no model repo alice/nope"):
        pull("hf://alice/nope")
    publish(make_checkpoint(hub_env / "x"), REPO)
    with pytest.raises(HubError, match=r"no such revision \(branches and tags: main\)"):
        pull(f"hf://{REPO}@v9")


@pytest.mark.parametrize(
    ("weights", "cause"),
    [
        (
            b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 9\n",
            "Git-LFS pointer",
        ),
        (b"", "not a readable safetensors"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{", "not a readable safetensors"),
    ],
    ids=["lfs-pointer", "empty", "truncated"],
)
def test_broken_published_weights_are_reported_with_the_fix(hub, hub_env, weights, cause):
    publish(make_checkpoint(hub_env / "x"), REPO)
    hub.put_files(REPO, {"model.safetensors": weights})  # pushed by some other tool
    with pytest.raises(CheckpointError, match=cause) as info:
        pull(f"hf://{REPO}")
    assert "published checkpoint itself is broken" in str(info.value)


def test_config_disagreeing_with_tensors_is_reported(hub, hub_env):
    publish(make_checkpoint(hub_env / "x", hidden=4), REPO)
    config = json.loads((hub_env / "x" / "config.json").read_text())
    config["update_net"]["hidden_size"] = 8
    hub.put_files(REPO, {"config.json": json.dumps(config).encode()})
    with pytest.raises(CheckpointError, match="the config implies"):
        pull(f"hf://{REPO}")


def test_publish_refuses_an_invalid_folder(hub, hub_env):
    folder = make_checkpoint(hub_env / "x")
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="cannot publish .*not a readable safetensors"):
        publish(folder, REPO)
    folder = make_checkpoint(hub_env / "y")
    (folder / "README.md").write_text("---\nlibrary_name: timm\n---\n# y\n")
    with pytest.raises(CheckpointError, match="library_name is 'timm'"):
        publish(folder, REPO)
    assert hub.routes() == set()


def test_damaged_cache_file_is_refused_then_refetched_with_force(hub, hub_env):
    sha = publish(make_checkpoint(hub_env / "x"), REPO).sha
    good = pull(f"hf://{REPO}@{sha}")
    weights = good.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # still parses as safetensors: only the hash check can tell
    Path(os.path.realpath(weights)).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged; fetch it again with .*--force"):
        zoo.load(f"hf://{REPO}@{sha}")
    fixed = pull(f"hf://{REPO}@{sha}", force=True)
    assert (fixed.path / "model.safetensors").read_bytes() == (
        hub_env / "x" / "model.safetensors"
    ).read_bytes()


def test_offline_without_cache_says_how_to_fix(hub_env):
    with pytest.raises(HubError, match="not in the cache .* offline mode is on"):
        pull(f"hf://{REPO}", offline=True)


# ---------------------------------------------------------------------- listing and CLI


def test_list_shows_cached_and_hub_models(hub, hub_env):
    sha = publish(make_checkpoint(hub_env / "x"), REPO).sha
    pull(f"hf://{REPO}")
    cached = cached_checkpoints()
    assert [(c.repo_id, c.sha, c.refs) for c in cached] == [(REPO, sha, ("main",))]
    listed = list_hub()
    assert [m.repo_id for m in listed] == [REPO]
    assert listed[0].zoo["layer_kinds"] == ["conv", "fc"]
    assert "GET /api/models" in hub.routes()


def test_cli_publish_pull_list_info(hub, hub_env):
    folder = make_checkpoint(hub_env / "lstm-tiny")
    runner = CliRunner()
    dry = runner.invoke(main, ["publish", str(folder), "--repo", REPO, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "dry run" in dry.output
    out = runner.invoke(main, ["publish", str(folder), "--repo", REPO])
    assert out.exit_code == 0, out.output
    assert f"{hub.url}/{REPO}/commit/" in out.output
    pulled = runner.invoke(main, ["pull", f"hf://{REPO}"])
    assert pulled.exit_code == 0, pulled.output
    assert f"hf://{REPO}@" in pulled.output
    publish(make_checkpoint(hub_env / "v2" / "lstm-tiny", seed=2), REPO)
    moved = runner.invoke(main, ["pull", f"hf://{REPO}"])
    assert moved.exit_code == 0 and "main has moved on" in moved.output, moved.output
    before = len(hub.hits)
    offline = runner.invoke(main, ["pull", f"hf://{REPO}", "--offline"])
    assert offline.exit_code == 0 and "from the cache (offline)" in offline.output, offline.output
    assert len(hub.hits) == before, "an offline pull made a request"
    listed = runner.invoke(main, ["list", "--hub"])
    assert listed.exit_code == 0, listed.output
    assert f"hf://{REPO}@" in listed.output and "hub:" in listed.output
    info = runner.invoke(main, ["info", f"hf://{REPO}"])
    assert info.exit_code == 0, info.output
    for field in ("source network", "layer kinds", "features", "curvature", "horizon", "recipe"):
        assert field in info.output
    bad = runner.invoke(main, ["pull", "hf://alice/nope"])
    assert bad.exit_code == 1 and "no model repo alice/nope" in bad.output
    bad = runner.invoke(main, ["publish", str(folder), "--repo", "not-a-repo-id"])
    assert bad.exit_code == 2 and "owner/name" in bad.output


# ---------------------------------------------------------------------- the real Hub (opt-in)


@pytest.mark.skipif(
    not (os.environ.get("ZOO_TEST_REAL_HUB") and os.environ.get("HF_TOKEN")),
    reason="opt-in: set ZOO_TEST_REAL_HUB=owner/name-of-a-scratch-repo and HF_TOKEN",
)
def test_real_hub_scenario(tmp_path, monkeypatch):  # pragma: no cover - needs network
    """The same scenario against the real Hub, into a scratch repo you own."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    repo = os.environ["ZOO_TEST_REAL_HUB"]
    first = publish(make_checkpoint(tmp_path / "v1" / "ck", seed=1), repo, private=True)
    assert pull(f"hf://{repo}").sha == first.sha
    second = publish(make_checkpoint(tmp_path / "v2" / "ck", seed=2), repo)
    assert second.sha != first.sha
    pinned = pull(f"hf://{repo}@{first.sha}")
    assert (pinned.path / "model.safetensors").read_bytes() == (
        tmp_path / "v1" / "ck" / "model.safetensors"
    ).read_bytes()
    offline = pull(f"hf://{repo}@{first.sha}", offline=True)
    assert offline.sha == first.sha
