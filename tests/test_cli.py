"""Bad flags and bad config files end with a clear one-line message (argparse exit 2)."""

import subprocess
import sys

import pytest

from sim.cli import parse
from sim.config import RunConfig


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--hospitals", "0"], "--hospitals: must be >= 1"),
        (["--hospitals", "many"], "expected a whole number"),
        (["--client-fraction", "1.5"], "client_fraction must be in (0, 1]"),
        (["--alpha", "-1"], "alpha must be > 0"),
        (["--lr", "fast"], "expected a number"),
        (["--client-parallelism", "pmap"], "invalid choice"),
        (["--hopsitals", "3"], "unrecognized arguments"),
        (["--image-size", "30"], "image_size must be a multiple of 8"),
        (["--algorithm", "fedsgd"], "invalid choice"),
        (["--aggregator", "mode"], "invalid choice"),
        (["--attack", "backdoor"], "invalid choice"),
        (["--algorithm", "fedadam", "--server-optimizer", "sgd"], "server_optimizer is fixed"),
        (["--trim-beta", "0.5"], "trim_beta must be in [0, 0.5)"),
        (["--hospitals", "5", "--byzantine", "6"], "byzantine must be in [0, hospitals]"),
        (["--dropout", "1"], "dropout must be a probability"),
        (["--rounds", "5", "--join-round", "5"], "join_round must be in [0, rounds)"),
        (["--attack-scale", "inf"], "attack_scale must be a finite number >= 0"),
        (["--address", "auto"], "--address: only with --ray"),
        (["--ray", "--cpus-per-actor", "-1"], "--cpus-per-actor must be >= 0"),
        (["--ray", "--ray-actors", "0"], "--ray-actors"),
    ],
)
def test_bad_flags_rejected_clearly(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


def test_algorithm_flags_reach_the_config():
    cfg, _ = parse(
        [
            "--algorithm",
            "scaffold",
            "--aggregator",
            "trimmed_mean",
            "--trim-beta",
            "0.1",
            "--byzantine",
            "2",
            "--attack",
            "label_flip",
            "--stragglers",
            "0.25",
            "--dropout",
            "0.1",
            "--late-join",
            "3",
            "--join-round",
            "4",
            "--noisy-hospitals",
            "1",
            "--label-noise",
            "0.3",
            "--contribution",
            "--clip-norm",
            "5",
            "--devices",
            "2",
        ]
    )
    assert (cfg.algorithm, cfg.aggregator, cfg.trim_beta, cfg.byzantine) == (
        "scaffold",
        "trimmed_mean",
        0.1,
        2,
    )
    assert (cfg.attack, cfg.stragglers, cfg.dropout, cfg.late_join, cfg.join_round) == (
        "label_flip",
        0.25,
        0.1,
        3,
        4,
    )
    assert cfg.contribution and cfg.clip_norm == 5.0 and cfg.label_noise == 0.3
    assert cfg.devices == 2


def test_config_file_and_flag_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("hospitals: 7\nnon_iid: true\nlr: 0.1\n")
    cfg, _ = parse(["--config", str(f), "--lr", "0.2"])
    assert cfg == RunConfig(hospitals=7, non_iid=True, lr=0.2)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("hosptals: 3\n", "unknown key 'hosptals'"),
        ("hospitals: three\n", "hospitals must be int"),
        ("[1, 2]\n", "must hold a mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_config_file_rejected(tmp_path, capsys, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(SystemExit):
        parse(["--config", str(f)])
    assert needle in capsys.readouterr().err


def test_cli_subprocess_has_no_traceback():
    p = subprocess.run(
        [sys.executable, "-m", "sim", "--rounds", "-3"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 2
    assert "--rounds: must be >= 1" in p.stderr and "Traceback" not in p.stderr
