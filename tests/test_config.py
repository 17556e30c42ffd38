"""Config: dataclasses drive the CLI and YAML; the CLI wins; bad input is a one-line error."""

import pytest

from clm.config import DataConfig, UsageError, parse_config


def test_yaml_then_cli(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("block_size: 128\nstreaming: false\ntrain_files: [a.txt, b.txt]\n")
    (cfg,) = parse_config([DataConfig], ["--config", str(cfg_file), "--block_size", "64"])
    assert cfg.block_size == 64 and cfg.streaming is False and cfg.train_files == ["a.txt", "b.txt"]
    (cfg,) = parse_config([DataConfig], ["--config", str(cfg_file), "--streaming", "true"])
    assert cfg.block_size == 128 and cfg.streaming is True


def test_unknown_yaml_key_and_missing_file(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("block_sise: 128\n")
    with pytest.raises(UsageError, match=r"unknown option\(s\) \['block_sise'\]"):
        parse_config([DataConfig], ["--config", str(cfg_file)])
    with pytest.raises(UsageError, match="does not exist"):
        parse_config([DataConfig], ["--config", str(tmp_path / "nope.yaml")])


def test_unknown_cli_option_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config([DataConfig], ["--blok_size", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unrecognized arguments: --blok_size")
