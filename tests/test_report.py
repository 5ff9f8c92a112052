"""sim.report: self-contained HTML reports of run, sweep and comparison folders."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from sim import report
from sim.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
PRIVACY = ROOT / "results" / "experiments" / "privacy"
IMG = re.compile(r"<img\b[^>]*>")
DATA_SRC = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def make_run(
    folder: Path,
    *,
    hospitals: int = 3,
    rounds: int = 6,
    eval_every: int = 2,
    done: int | None = None,
    dp: bool = True,
    old: bool = False,
    vendors: list[str] | None = None,
    config_extra: dict | None = None,
    run_id: str = "synthetic-fedavg-h3-s0-0001",
) -> dict:
    """A run folder like the simulator writes; ``done`` < rounds leaves it in progress."""
    folder.mkdir(parents=True)
    config = {
        "dataset": "phantom",
        "hospitals": hospitals,
        "rounds": rounds,
        "algorithm": "fedavg",
        "seed": 0,
        "eval_every": eval_every,
        **({"target_epsilon": 3.0, "dp_clip": 1.0, "dp_record_level": True} if dp else {}),
        **(config_extra or {}),
    }
    (folder / "config.json").write_text(json.dumps(config))
    lines = []
    per = []
    for r in range(1, (done or rounds) + 1):
        rec = {
            "round": r,
            "train_loss": 0.7 - 0.02 * r,
            "cohort": list(range(hospitals)),
            "bytes_up": 1000,
            "bytes_down": 1000,
            "seconds": 0.1,
        }
        if not old:  # runs before the privacy work had no epsilon / delta
            rec["epsilon"], rec["delta"] = (0.5 * r, 1e-5) if dp else (None, None)
        if r % eval_every == 0 or r == rounds:
            per = [min(1.0, 0.55 + 0.08 * h + 0.02 * r) for h in range(hospitals)]
            rec["global"] = {
                "auc": float(np.mean(per)),
                "loss": 0.6 - 0.01 * r,
                "accuracy": 0.7,
                "pooled": {"auc": float(np.mean(per)) + 0.01, "loss": 0.6, "accuracy": 0.7},
            }
            rec["per_hospital"] = {"auc": per, "loss": [0.6 - 0.01 * h for h in range(hospitals)]}
        lines.append(json.dumps(rec))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if done is not None and done < rounds:
        with (folder / "metrics.jsonl").open("a") as fh:
            fh.write('{"round": 99, "train_lo')  # a line being written right now
        return config
    summary = {
        "metric": "auc",
        "run_id": run_id,
        "algorithm": "fedavg",
        "aggregator": "mean",
        "rounds": rounds,
        "hospitals": [
            {"id": h, "vendor": (vendors or ["GE", "Siemens", "Philips"] * 9)[h], "train_size": 64}
            for h in range(hospitals)
        ],
        "federated": {"mean": float(np.mean(per)), "per_hospital": per, "pooled_test": 0.8},
        "bytes_total": 2000 * rounds,
        "timing": {"total_s": 0.1 * rounds},
    }
    if dp and not old:
        summary["privacy"] = {"mechanism": "record-level DP-SGD", "epsilon": 0.5 * rounds}
        summary["privacy"].update(delta=1e-5, target_epsilon=3.0)
    (folder / "summary.json").write_text(json.dumps(summary))
    return config


def images(html: str) -> list[np.ndarray]:
    """Assert the page loads nothing from outside; return its decoded embedded images."""
    assert 'src="http' not in html and 'href="http' not in html
    assert "<script" not in html.lower()
    tags = IMG.findall(html)
    assert tags, "no image in the report"
    decoded = []
    for tag in tags:
        match = DATA_SRC.search(tag)
        assert match, f"image without an embedded PNG: {tag[:120]}"
        png = base64.b64decode(match.group(1), validate=True)
        assert png.startswith(report.PNG_SIGNATURE)
        decoded.append(mpimg.imread(io.BytesIO(png), format="png"))
    return decoded


def hospital_rows(html: str) -> list[int]:
    """Hospital ids of the per-hospital table rows."""
    return [int(i) for i in re.findall(r'<tr class="hospital[^"]*" id="hospital-(\d+)"', html)]


def test_run_report_is_self_contained(tmp_path):
    run = tmp_path / "run"
    make_run(run, hospitals=4)
    out, imgs = tmp_path / "out" / "page.html", tmp_path / "img"
    command = "python -m sim --hospitals 4 --rounds 6 --target-epsilon 3"
    assert report.write_report(run, out=out, command=command, images_dir=imgs) == out
    html = out.read_text()
    pictures = images(html)
    assert len(pictures) == 5  # curves, per hospital, fairness, epsilon, bytes
    assert all(p.ndim == 3 and p.shape[0] > 100 and p.shape[1] > 100 for p in pictures)
    assert sorted(p.name for p in imgs.iterdir()) == [
        "bytes_auc.png",
        "epsilon_auc.png",
        "fairness.png",
        "learning_curves.png",
        "per_hospital.png",
    ]
    assert "synthetic-fedavg-h3-s0-0001" in html
    assert f'<pre id="command"><code>{command}</code></pre>' in html
    assert hospital_rows(html) == [0, 1, 2, 3]
    assert 'class="hospital worst" id="hospital-0"' in html  # the lowest AUC is marked
    assert "could not draw" not in html
    assert 'http-equiv="refresh"' not in html  # finished, live=False
    assert not (run / "report").exists() and not (run / "report.html").exists()


def test_run_report_default_paths_and_reconstructed_command(tmp_path):
    run = tmp_path / "my run"
    make_run(run)
    assert report.main([str(run)]) == 0
    html = (run / "report.html").read_text()
    assert (run / "report" / "learning_curves.png").is_file()
    assert f"python -m sim --config &#x27;{run}/config.json&#x27;" in html  # quoted: a space
    assert "<th>target_epsilon</th><td>3.0</td>" in html  # the config as a table


def test_run_in_progress_gets_refresh_tag(tmp_path):
    run = tmp_path / "running"
    config = make_run(run, rounds=10, eval_every=4, done=5)
    out = tmp_path / "live.html"
    assert report.main([str(run), "--out", str(out), "--images-dir", str(tmp_path / "i")]) == 0
    html = out.read_text()
    assert '<meta http-equiv="refresh" content="30">' in html
    assert "in progress: round 5 of 10" in html
    assert RunConfig.from_dict(config).run_id() in html  # derived while summary.json is absent
    assert hospital_rows(html) == [0, 1, 2]
    assert "could not draw" not in html
    images(html)
    report.write_report(run, out=out, live=False, images_dir=tmp_path / "i")
    assert "http-equiv" not in out.read_text()
    report.write_report(run, out=out, live=True, refresh_s=7, images_dir=tmp_path / "i")
    assert '<meta http-equiv="refresh" content="7">' in out.read_text()


def test_run_before_any_evaluation(tmp_path):
    run = tmp_path / "early"
    make_run(run, rounds=10, eval_every=5, done=3, dp=False)
    out = report.write_report(run, out=tmp_path / "r.html", images_dir=tmp_path / "i", live=True)
    html = out.read_text()
    assert "could not draw" not in html
    assert sorted(p.name for p in (tmp_path / "i").iterdir()) == ["learning_curves.png"]
    assert len(images(html)) == 1
    assert hospital_rows(html) == [0, 1, 2]  # from config.json's hospitals, values unknown


def test_older_run_without_epsilon_has_no_epsilon_plot(tmp_path):
    for name, old in (("old", True), ("new", False)):
        make_run(tmp_path / name, old=old)
        report.write_report(
            tmp_path / name, out=tmp_path / f"{name}.html", images_dir=tmp_path / f"{name}-img"
        )
    old_html, new_html = (tmp_path / "old.html").read_text(), (tmp_path / "new.html").read_text()
    assert not (tmp_path / "old-img" / "epsilon_auc.png").exists()
    assert 'id="fig-epsilon_auc"' not in old_html and "no DP" in old_html
    assert "could not draw" not in old_html
    assert len(images(old_html)) == 4
    assert (tmp_path / "new-img" / "epsilon_auc.png").is_file()
    assert 'id="fig-epsilon_auc"' in new_html


def test_html_from_files_is_escaped(tmp_path):
    evil = "<script>alert('x')</script>"
    run = tmp_path / "run"
    make_run(run, config_extra={"data_dir": evil}, vendors=['<img src=x onerror="alert(1)">'] * 3)
    out = report.write_report(run, out=tmp_path / "r.html", images_dir=tmp_path / "i", command=evil)
    html = out.read_text()
    assert evil not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    images(html)


def test_not_a_results_folder_exits_2(tmp_path, capsys):
    empty = tmp_path / "nothing here"
    empty.mkdir()
    assert report.main([str(empty)]) == 2
    assert str(empty) in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    with pytest.raises(report.ReportError, match="not a results folder"):
        report.write_report(empty)


def test_sweep_folder_one_row_per_run(tmp_path):
    sweep = tmp_path / "sweep"
    rows = []
    for k, alpha in enumerate((0.1, 1.0)):
        name = f"alpha-{alpha}"
        make_run(sweep / name, config_extra={"alpha": alpha}, run_id=f"rid-{k}", dp=False)
        rows.append({"run": name, "alpha": alpha, "status": "done", "run_id": f"rid-{k}"})
    rows.append({"run": "alpha-9", "alpha": 9, "status": "failed", "error": "RayTaskError: boom"})
    index = {"name": "toy", "command": "python -m sim.sweep toy.yaml", "runs": rows}
    (sweep / "sweep.json").write_text(json.dumps(index))
    out = report.write_report(sweep, out=tmp_path / "s.html", images_dir=tmp_path / "i")
    html = out.read_text()
    assert html.count('<tr class="run') == 3
    assert '<tr class="run failed">' in html and "RayTaskError: boom" in html
    assert "python -m sim.sweep toy.yaml" in html
    assert "alpha=0.1" in html and "alpha=1.0" in html and "rid-1" in html
    for slug in ("learning_curves", "final_auc", "fairness", "bytes_auc"):
        assert f'id="fig-{slug}"' in html
    assert 'id="fig-epsilon_auc"' not in html  # no run used DP
    assert "could not draw" not in html
    images(html)
    (sweep / "sweep.json").unlink()  # the sweep still running: a folder of runs, live
    html = report.write_report(sweep, out=tmp_path / "s.html", images_dir=tmp_path / "i", live=True)
    assert html.read_text().count('<tr class="run') == 2


def test_privacy_comparison_report(tmp_path):
    if not (PRIVACY / "comparison.json").is_file():
        pytest.skip(f"{PRIVACY} is not in this checkout")
    before = {p: p.stat().st_mtime_ns for p in PRIVACY.rglob("*") if "checkpoints" not in p.parts}
    out, imgs = tmp_path / "privacy.html", tmp_path / "img"
    assert report.main([str(PRIVACY), "--out", str(out), "--images-dir", str(imgs)]) == 0
    html = out.read_text()
    names = list(json.loads((PRIVACY / "comparison.json").read_text())["runs"])
    assert html.count('<tr class="run') == len(names) == 8
    assert all(f"<b>{n}</b>" in html for n in names)
    assert 'id="fig-epsilon_auc"' in html and (imgs / "epsilon_auc.png").is_file()
    assert "python -m sim.compare experiments/privacy.yaml" in html
    assert html.count(">PASS<") == 4
    assert "http-equiv" not in html and "could not draw" not in html
    assert len(images(html)) == 5
    after = {p: p.stat().st_mtime_ns for p in PRIVACY.rglob("*") if "checkpoints" not in p.parts}
    assert after == before  # read-only


def test_fairness_series_and_cumulative_bytes(tmp_path):
    make_run(tmp_path / "r", hospitals=3, rounds=4, eval_every=2)
    run = report.load_run(tmp_path / "r")
    f = report.fairness_series(run)
    assert f["round"].tolist() == [2, 4]
    np.testing.assert_allclose(f["min"], [0.59, 0.63])
    np.testing.assert_allclose(f["max"], [0.75, 0.79])
    np.testing.assert_allclose(f["gap"], [0.16, 0.16])
    np.testing.assert_allclose(f["mean"], [0.67, 0.71])
    assert report.cumulative_bytes(run) == {1: 2000, 2: 4000, 3: 6000, 4: 8000}
    assert run.worst == (0, pytest.approx(0.63))


def _browser() -> str | None:
    """A Chromium-family browser, or None."""
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    names = ("chromium", "chromium-browser", "google-chrome")
    return next((shutil.which(n) for n in names if shutil.which(n)), None)


def test_chromium_renders_report(tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip(
            "no /usr/bin/chromium and no chromium, chromium-browser or google-chrome on PATH"
        )
    run = tmp_path / "run"
    make_run(run, hospitals=5)
    page = report.write_report(run, out=tmp_path / "page.html", images_dir=tmp_path / "i")
    shot = tmp_path / "shot.png"
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,1600",
        page.resolve().as_uri(),
    ]
    try:
        subprocess.run(cmd, capture_output=True, timeout=90, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{browser} did not finish the screenshot in 90 s")
    assert shot.is_file(), f"{browser} wrote no screenshot"
    rgb = (mpimg.imread(shot)[..., :3] * 255).astype(np.uint8)
    assert rgb.shape[:2] == (1600, 1200)
    colors = np.unique(rgb.reshape(-1, 3), axis=0)
    assert len(colors) > 50  # text, tables and plots, not a blank page
    assert (rgb.min(axis=-1) < 200).mean() > 0.01  # not all white
