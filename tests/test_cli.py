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
    ],
)
def test_bad_flags_rejected_clearly(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


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
