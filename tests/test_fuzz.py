"""Property-based tests: random, truncated and mutated input to every loader and parser.

Whatever the bytes, only zoo's own errors (``ZooError``) may come out. Counts of the
inputs tried go to ``$ZOO_RELIABILITY_COUNTS`` when set (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import tomllib
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoo.checkpoint import parse_checkpoint, restore_training_tree, save_checkpoint
from zoo.errors import ZooError
from zoo.features import FeatureSpec
from zoo.hub import HubRef
from zoo.meta import parse_recipe
from zoo.optimizer import LearnedOptimizer
from zoo.safe_io import dump_tree, parse_tree

from .conftest import make_nets

TRIED: Counter = Counter()
FAST = settings(
    max_examples=int(os.environ.get("ZOO_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


@pytest.fixture(scope="module", autouse=True)
def _write_counts():
    yield
    target = os.environ.get("ZOO_RELIABILITY_COUNTS")
    if target:
        path = Path(target)
        old = json.loads(path.read_text()) if path.is_file() else {}
        old.update({f"fuzz: {k}": v for k, v in TRIED.items()})
        path.write_text(json.dumps(old, indent=2, sort_keys=True))


def _only_zoo_errors(target: str, call) -> None:
    TRIED[target] += 1
    with contextlib.suppress(ZooError):  # anything else fails the test
        call()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "ck"
    save_checkpoint(path, make_nets(perturb=0.05), FeatureSpec("gh"), {"name": "g"}, "# g\n")
    return (path / "config.json").read_bytes(), (path / "model.safetensors").read_bytes()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@FAST
@given(data=st.data())
def test_checkpoint_loader_survives_truncated_and_mutated_bytes(good, data):
    config, payload = good
    which = data.draw(st.sampled_from(["config", "weights", "both"]))

    def mangle(blob):
        kind = data.draw(st.sampled_from(["truncate", "flip", "random", "header"]))
        if kind == "truncate":
            return blob[: data.draw(st.integers(0, len(blob)))]
        if kind == "flip":
            i = data.draw(st.integers(0, len(blob) - 1))
            return blob[:i] + bytes([blob[i] ^ data.draw(st.integers(1, 255))]) + blob[i + 1 :]
        if kind == "random":
            return data.draw(st.binary(max_size=300))
        header = json.dumps(data.draw(json_values)).encode()
        size = data.draw(st.sampled_from([len(header), len(header) + 7, 2**63, 0]))
        return size.to_bytes(8, "little") + header + data.draw(st.binary(max_size=64))

    if which in ("config", "both"):
        config = mangle(config)
    if which in ("weights", "both"):
        payload = mangle(payload)
    _only_zoo_errors("checkpoint loader (bytes)", lambda: parse_checkpoint(config, payload))


@FAST
@given(
    patch=st.dictionaries(
        st.sampled_from(
            ["schema_version", "features", "update_net", "layer_kinds", "name", "curvature"]
        ),
        json_values,
        min_size=1,
        max_size=3,
    )
)
def test_checkpoint_loader_survives_random_configs(good, patch):
    config = {**json.loads(good[0]), **patch}
    text = json.dumps(config).encode()
    _only_zoo_errors("checkpoint loader (configs)", lambda: parse_checkpoint(text, good[1]))


recipe_keys = {
    "task": ["network", "dataset", "batch_size", "widths", "init_scale", "subset"],
    "update_net": ["features", "hidden_size", "num_layers", "init_lr", "kinds", "per_layer"],
    "meta": ["iterations", "horizon", "unroll", "meta_lr", "clip", "meta_loss", "seed"],
}


@st.composite
def recipes(draw):
    raw = {"name": draw(st.text(max_size=5) | json_values)}
    for section, keys in recipe_keys.items():
        if draw(st.booleans()):
            raw[section] = draw(
                st.dictionaries(st.sampled_from([*keys, "bogus"]), json_values, max_size=3)
                | json_values
            )
    if draw(st.booleans()):
        raw["validation"] = draw(json_values)
    return raw


@FAST
@given(raw=recipes())
def test_recipe_parser_survives_random_configs(raw):
    _only_zoo_errors("recipe parser (configs)", lambda: parse_recipe(raw))


@FAST
@given(text=st.text(max_size=200))
def test_recipe_loader_survives_random_text(tmp_path, text):
    from zoo.meta import load_recipe

    path = tmp_path / "r.toml"
    try:
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
    except UnicodeEncodeError:
        return
    _only_zoo_errors("recipe loader (TOML text)", lambda: load_recipe(path))


@FAST
@given(
    blob=st.binary(max_size=64),
    dims=st.integers(0, 255),
    shape=st.lists(st.integers(0, 2**32 - 1), max_size=4),
)
def test_idx_reader_survives_random_headers(tmp_path, blob, dims, shape):
    from zoo.data import _read_idx

    header = bytes([0, 0, 8, dims]) + b"".join(s.to_bytes(4, "big") for s in shape)
    for data in (blob, header + blob):
        path = tmp_path / "x-idx3-ubyte"
        path.write_bytes(data)
        _only_zoo_errors("MNIST IDX reader", lambda path=path: _read_idx(path))


@FAST
@given(text=st.text(max_size=60))
def test_hub_ref_parser_survives_random_strings(text):
    _only_zoo_errors("hub refs parser", lambda: HubRef.parse(text))
    _only_zoo_errors("hub refs parser", lambda: HubRef.parse("hf://" + text))


@pytest.fixture(scope="module")
def optimizer_and_state():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    opt = LearnedOptimizer(model, make_nets("g"), FeatureSpec("g"))
    return model, opt, opt.state_dict()


tensors = st.builds(
    lambda shape, dtype: torch.zeros(shape, dtype=dtype),
    st.lists(st.integers(0, 3), max_size=2),
    st.sampled_from([torch.float32, torch.float64, torch.int64]),
)
state_values = st.recursive(
    json_values | tensors,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6) | st.integers(0, 3), inner, max_size=3)
    ),
    max_leaves=10,
)


@FAST
@given(data=st.data())
def test_optimizer_load_state_dict_survives_random_states(optimizer_and_state, data):
    _, opt, good_state = optimizer_and_state
    kind = data.draw(st.sampled_from(["random", "patched"]))
    if kind == "random":
        state = data.draw(state_values)
    else:
        state = {**good_state}
        key = data.draw(st.sampled_from(["format", "state", "baselines", "skipped_steps"]))
        state[key] = data.draw(state_values)
    _only_zoo_errors("optimizer load_state_dict", lambda: opt.load_state_dict(state))


@FAST
@given(data=st.data())
def test_state_files_survive_random_and_truncated_bytes(optimizer_and_state, data):
    model, opt, _ = optimizer_and_state
    tree = {
        "format": "zoo.training-state/1",
        "step": 1,
        "model": dict(model.state_dict()),
        "optimizer": opt.state_dict(),
        "rng": torch.get_rng_state(),
        "extra": {},
    }
    payload, text = dump_tree(tree)
    kind = data.draw(st.sampled_from(["truncate-json", "truncate-weights", "random", "tree"]))
    if kind == "truncate-json":
        text = text[: data.draw(st.integers(0, len(text)))]
    elif kind == "truncate-weights":
        payload = payload[: data.draw(st.integers(0, len(payload)))]
    elif kind == "random":
        text, payload = data.draw(st.binary(max_size=100)), data.draw(st.binary(max_size=100))
    else:
        text = json.dumps({"format": "zoo.tree/1", "tree": data.draw(json_values)}).encode()

    def load():
        parsed = parse_tree(payload, text, "fuzz")
        restore_training_tree(parsed, model, opt, "fuzz")

    _only_zoo_errors("training/meta state files", load)


def test_the_fuzzers_ran():
    # Sanity: the counters above are what docs/reliability.md reports.
    assert sum(TRIED.values()) > 0
    assert tomllib  # imported for the recipe-text target's error type
