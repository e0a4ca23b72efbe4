"""The official Pose2Seg reference fixture (``../shared/data/official_reference/``, see its
README) for the network tests: where it is, and the official state dict its rule builds."""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_REFERENCE = REPO_ROOT.parent / "shared" / "data" / "official_reference"

requires_official_reference = pytest.mark.skipif(
    not (OFFICIAL_REFERENCE / "make_official_weights.py").is_file(),
    reason=f"the official Pose2Seg reference fixture is absent ({OFFICIAL_REFERENCE})",
)


@cache
def _rule_module():
    path = OFFICIAL_REFERENCE / "make_official_weights.py"
    spec = importlib.util.spec_from_file_location("make_official_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cache
def _built_state_dict() -> dict[str, torch.Tensor]:
    with open(OFFICIAL_REFERENCE / "official_state_dict.json") as fh:
        spec = json.load(fh)
    return dict(_rule_module().build_state_dict(spec))


def official_state_dict() -> dict[str, torch.Tensor]:
    """The 588 tensors of the official model filled by the fixture's rule (weights_rule.md),
    in the official ``state_dict()`` order (built once per test session, about 10 s; a new
    dict each call, the tensors shared: do not modify them in place)."""
    return dict(_built_state_dict())
