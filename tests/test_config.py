"""Every shipped profile loads and validates; overrides and bad input give clear errors."""

import pytest

from samclip.config import available_profiles, dump_config, load_config


def test_profiles_are_shipped():
    assert "smoke" in available_profiles()
    assert "paper-vit-b" in available_profiles()


@pytest.mark.parametrize("name", available_profiles())
def test_profile_loads(name):
    config = load_config(name)
    assert config.profile == name
    assert dump_config(config)


def test_paper_profile_values():
    config = load_config("paper-vit-b")
    assert config.train.stage1.epochs == 20
    assert config.train.stage1.lr == 8e-4
    assert config.train.stage2.lr == 4e-5
    assert config.train.stage2.lr_ratio == 0.1
    assert config.train.stage2.sam_loss_weight == 10.0
    assert config.train.stage3.epochs == 3
    assert config.train.workers * config.train.stage1.clip_batch_size == 2048
    assert config.student.arch == "vit_b"


def test_override_applies():
    config = load_config("smoke", ["train.stage1.epochs=5", "sweep.num_samples=2"])
    assert config.train.stage1.epochs == 5
    assert config.sweep.num_samples == 2


def test_unknown_field_rejected():
    with pytest.raises(ValueError, match="stage1"):
        load_config("smoke", ["train.stage1.epoch=5"])


def test_unknown_profile_names_choices():
    with pytest.raises(ValueError, match="smoke"):
        load_config("no-such-profile")


def test_invalid_override_syntax():
    with pytest.raises(ValueError, match="key.path=value"):
        load_config("smoke", ["train.stage1.epochs"])
