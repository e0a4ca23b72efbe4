"""The typed config: dotted keys, YAML, overrides, validation that names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pose2seg.config import (
    PREPROCESS_KEYS,
    Config,
    ConfigError,
    load_config,
    parse_override,
)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_defaults_round_trip_through_flat_keys():
    cfg = Config()
    flat = cfg.to_flat()
    assert flat["model.roi_size"] == 48
    assert Config.from_flat(flat) == cfg
    assert all(key in flat for key in PREPROCESS_KEYS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, Config)


def test_default_yaml_equals_dataclass_defaults():
    default = [p for p in CONFIGS if p.name == "default.yaml"]
    assert default, "configs/default.yaml is missing"
    assert load_config(str(default[0])) == Config()


def test_override_types_are_coerced():
    cfg = load_config(
        None,
        [
            "train.lr=0.01",
            "train.use_gpu=true",
            "model.roi_size=32",
            "eval.occlusion_bins=[0, 0.5, 1]",
        ],
    )
    assert cfg.train.lr == 0.01 and cfg.train.use_gpu is True
    assert cfg.model.roi_size == 32
    assert cfg.eval.occlusion_bins == [0.0, 0.5, 1.0]


def test_string_override_stays_string():
    assert parse_override("registry.alias=2024") == ("registry.alias", "2024")


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"model\.roi_sise.*model\.roi_size"):
        load_config(None, ["model.roi_sise=32"])


def test_bad_values_name_their_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.roi_size"):
        load_config(None, ["model.roi_size=30"])
    with pytest.raises(ConfigError, match=r"model\.skeleton_features"):
        load_config(None, ["model.skeleton_features=limbs"])
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match=r"train\.use_gpu"):
        Config.from_flat({"train.use_gpu": "maybe"})
    with pytest.raises(ConfigError, match=r"train\.dice_weight"):
        load_config(None, ["train.dice_weight=-1"])
    with pytest.raises(ConfigError, match=r"train\.torch_threads"):
        load_config(None, ["train.torch_threads=-2"])
    with pytest.raises(ConfigError, match=r"data\.synthetic_val_overlap"):
        load_config(None, ["data.synthetic_val_overlap=1.5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle:\n  roi_size: 32\n")
    with pytest.raises(ConfigError, match="modle"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_tune_search_space_keys_are_checked():
    with pytest.raises(ConfigError, match=r"tune\.search_space\.model\.depth"):
        Config.from_flat({"tune.search_space": {"model.depth": [18, 34]}})
    cfg = Config.from_flat({"tune.search_space": {"model.roi_size": [32, 64]}})
    assert cfg.tune.search_space == {"model.roi_size": [32, 64]}


def test_preprocess_key_tracks_only_data_affecting_keys():
    base = Config()
    assert base.with_overrides({"train.lr": 0.1}).preprocess_key() == base.preprocess_key()
    assert (
        base.with_overrides({"model.skeleton_features": "none"}).preprocess_key()
        == base.preprocess_key()
    )
    assert base.with_overrides({"model.roi_size": 32}).preprocess_key() != base.preprocess_key()
    assert base.with_overrides({"model.alignment": "box"}).preprocess_key() != base.preprocess_key()
    # The val split's overlap changes the generated data, so the variant too.
    assert (
        base.with_overrides({"data.synthetic_val_overlap": 0.5}).preprocess_key()
        != base.preprocess_key()
    )
    assert base.with_overrides({"train.dice_weight": 0.0}).preprocess_key() == base.preprocess_key()


def test_worker_threads_follow_the_cpu_share_unless_set():
    from workflows.train_input import worker_threads

    assert worker_threads(Config()) == 1  # 0.5 CPU -> at least one thread
    assert worker_threads(Config().with_overrides({"train.cpus_per_worker": 4})) == 4
    assert (
        worker_threads(
            Config().with_overrides({"train.cpus_per_worker": 1, "train.torch_threads": 2})
        )
        == 2
    )


def test_readme_documents_every_config_key():
    reference = (Path(__file__).resolve().parents[2] / "docs" / "CONFIGURATION.md").read_text()
    missing = [key for key in Config().to_flat() if f"`{key}`" not in reference]
    assert not missing, f"docs/CONFIGURATION.md does not document {missing}"
