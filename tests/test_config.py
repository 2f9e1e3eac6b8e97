import pytest

from imagelm import config
from imagelm.cli import main


def test_recipes_load_and_defaults_are_the_papers():
    cfg = config.load("aim-tiny")
    assert cfg.method == "aim" and cfg.model.patch_size == 4
    paper = config.Config()
    assert (paper.model.dim, paper.model.depth, paper.train.lr, paper.train.betas) == (1536, 24, 1e-3, (0.9, 0.95))
    assert config.load("aim-600m").objective.head_depth == 12


def test_misspelt_key_names_it():
    with pytest.raises(config.ConfigError, match=r"train\.lrr.*did you mean 'train\.lr'"):
        config.load("aim-tiny", ["train.lrr=1"])
    with pytest.raises(config.ConfigError, match="aim.ordr"):
        config.load("aim-tiny", ["aim.ordr=spiral"])
    with pytest.raises(config.ConfigError, match="'trian'"):
        config.load("aim-tiny", ["trian.lr=1"])


def test_bad_values_name_the_allowed_ones():
    with pytest.raises(config.ConfigError, match="aim.order.*raster, spiral"):
        config.load("aim-tiny", ["aim.order=zigzag"])
    with pytest.raises(config.ConfigError, match="train.batch_size.*integer"):
        config.load("aim-tiny", ["train.batch_size=big"])
    with pytest.raises(config.ConfigError, match="unknown method 'aimm'.*'aim'"):
        config.load("aim-tiny", ["method=aimm"])


def test_overrides_are_typed():
    cfg = config.load("aim-tiny", ["train.lr=5e-4", "data.crop_scale=[0.5, 1]", "aim.prefix=false"])
    assert cfg.train.lr == 5e-4 and cfg.data.crop_scale == (0.5, 1.0) and cfg.objective.prefix is False


def test_cli_reports_bad_key_before_any_work(tmp_path, capsys):
    assert main(["pretrain", "aim-tiny", "train.lrr=1", "--out", str(tmp_path / "r")]) == 2
    assert "train.lrr" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert main(["pretrain", "aim-tinyy"]) == 2
    assert "did you mean 'aim-tiny'" in capsys.readouterr().err


def test_config_roundtrip():
    cfg = config.load("aim-tiny")
    assert config.from_dict(cfg.to_dict()) == cfg
    assert config.diff(cfg.to_dict(), config.load("aim-tiny", ["train.lr=1"]).to_dict()) == ["train.lr"]


def test_overrides_may_follow_options(tmp_path, capsys):
    from imagelm.cli import main
    assert main(["pretrain", "aim-tiny", "--out", str(tmp_path), "aim.typo=1"]) == 2
    assert "aim.typo" in capsys.readouterr().err


def test_runs_saved_by_older_versions_load_without_their_retired_keys(tmp_path):
    import yaml

    from imagelm.train import load_run_config

    d = config.load("aim-tiny").to_dict()
    d["eval"]["linear_epochs"] = 30          # saved before the linear probe's budget was eval.linear_iters
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(d))
    assert load_run_config(tmp_path) == config.load("aim-tiny")
    d["eval"]["linear_epoch"] = 30           # but a key no version had is still an error
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(config.ConfigError, match="eval.linear_epoch"):
        load_run_config(tmp_path)
