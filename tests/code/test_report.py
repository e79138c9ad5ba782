"""report.html beside every card: self-contained, complete, and rendered by a real browser."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pneumo import plots, registry, report, storage
from pneumo.model import TinyNet
from pneumo.shift import shift_metrics

SHOT_DIR = Path(os.environ.get("PNEUMO_REPORT_SHOTS", tempfile.gettempdir()))


def _evaluated(seed: int = 0):
    """Predictions, metrics with CIs and a shift suite of a made-up val and test split."""
    from pneumo.evaluate import metrics_with_ci

    rng = np.random.default_rng(seed)
    predictions, metrics = {}, {}
    shift = {}
    for split, n in (("val", 120), ("test", 140)):
        y = (np.arange(n) % 3 != 0).astype(int)
        p = np.clip(0.3 * y + rng.uniform(0, 0.7, n), 0, 1)
        predictions[split] = (y, p)
        metrics[split] = metrics_with_ci(y, p, np.arange(n) // 2, 0.5, n_boot=200)
        shifted = {"clean": p, "zoom 1.12": np.clip(p - 0.1, 0, 1), "letterbox": np.clip(p + 0.05, 0, 1)}
        shift[split] = shift_metrics(y, shifted, 0.5)
    metrics["shift"] = shift
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_auc": 0.8 + e / 100} for e in range(1, 6)]
    pictures = plots.render_all(predictions, 0.5, history, best_epoch=4, shift=shift)
    return metrics, history, pictures


def _card(metrics, history) -> dict:
    model = TinyNet(n_features=140)
    return registry.build_card(
        state_dict=model.state_dict(),
        metrics=metrics,
        training={"best_epoch": 4, "epochs_run": 5, "stopped_early": False, "n_train": 999, "seconds": 1.5, "history": history},
        config={"recipe": "robust", "train": {"threshold": 0.5, "epochs": 5}, "transform": {"grid": [10, 14]}},
        manifest_digest="a1" * 32,
        shards_digest="b2" * 32,
        counts={"val": {"NORMAL": 40, "PNEUMONIA": 80}},
        champion_comparison={
            "metric": "roc_auc", "split": "val", "challenger_value": 0.91234, "champion_version": "v0007",
            "champion_value": 0.95, "basis": "re-scored on this run's val split", "promoted": False,
            "reason": "val roc_auc 0.9123 does not beat 0.9500 <script>alert(1)</script>", "notes": [],
        },
        threshold=0.5,
        plots=[],
    )


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A version registered with its pictures and report, as release.train_and_register does."""
    metrics, history, pictures = _evaluated()
    root = str(tmp_path_factory.mktemp("reg"))
    version = registry.register(
        root, "tinynet", TinyNet(n_features=140).state_dict(), _card(metrics, history), extra_files=pictures,
        render_files=lambda card: {report.REPORT_NAME: report.render(card, pictures).encode()},
    )
    return root, version, pictures


@pytest.mark.slow  # a version trained and registered on real films
def test_the_report_is_registered_beside_the_card_with_its_sha256(registered):
    root, version, pictures = registered
    card = registry.load_card(root, "tinynet", version)
    data = storage.read_bytes(storage.join(root, "tinynet", version, report.REPORT_NAME))
    assert card.files[report.REPORT_NAME].model_dump() == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    html = data.decode()
    # the version number, known only once register claimed it, and the sha256 of model.pt
    assert f"tinynet {version}" in html and card.files["model.pt"].sha256 in html


@pytest.mark.slow  # a version trained and registered on real films
def test_the_report_holds_numbers_pictures_and_decisions_and_nothing_to_fetch(registered):
    root, version, pictures = registered
    card = registry.load_card(root, "tinynet", version)
    html = storage.read_bytes(storage.join(root, "tinynet", version, report.REPORT_NAME)).decode()
    val = card.metrics["val"]
    low, high = val["ci95"]["roc_auc"]
    assert f"{val['roc_auc']:.3f}" in html and f"[{low:.3f}, {high:.3f}]" in html
    (tn, fp), (fn, tp) = card.metrics["test"]["confusion_matrix"]
    assert re.search(rf"<td>PNEUMONIA</td><td class=\"num\">{fn}</td><td class=\"num\">{tp}</td>", html)
    worst = card.metrics["shift"]["val"]["worst"]["specificity"]
    assert f"{worst[0]:.3f} ({worst[1]})" in html
    assert "a1" * 32 in html and "b2" * 32 in html and card.code_version in html
    assert "not promoted" in html and "v0007" in html and "0.9500" in html
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # escaped, never run
    assert "config.train.threshold" in html
    for name, data in pictures.items():
        assert f"data:image/png;base64,{base64.b64encode(data).decode()}" in html, name
    # self-contained: nothing is fetched from a server or another file
    assert not re.search(r"(src|href)=\"(?!data:)", html) and "<link" not in html and "<script" not in html


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert found, "headless Chromium is needed: apt-get install -y chromium (.ci/run installs it)"
    return found


def _chromium_args(profile: str) -> list[str]:
    return [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--virtual-time-budget=5000",
    ]


@pytest.mark.slow
def test_chromium_opens_the_report_from_disk_and_decodes_every_picture(registered, tmp_path):
    root, version, pictures = registered
    page = Path(root, "tinynet", version, report.REPORT_NAME)
    # A copy with a probe that writes each picture's decoded size into the DOM once the page
    # has loaded; the report itself carries no script.
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace(
        "</body>",
        "<script>window.addEventListener('load', () => { for (const img of document.images) "
        "img.setAttribute('data-natural', img.naturalWidth + 'x' + img.naturalHeight); });</script></body>",
    ))
    dom = subprocess.run(
        [*_chromium_args(str(tmp_path / "profile")), "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    sizes = dict(re.findall(r'data-name="([^"]+)" data-natural="(\d+x\d+)"', dom)) or dict(
        (name, size) for size, name in re.findall(r'data-natural="(\d+x\d+)"[^>]*data-name="([^"]+)"', dom)
    )
    assert set(sizes) == set(pictures), dom[:2000]
    for name, size in sizes.items():
        width, height = map(int, size.split("x"))
        assert width > 100 and height > 100, f"{name} decoded as {size}"
    card = registry.load_card(root, "tinynet", version)
    assert f"{card.metrics['test']['accuracy']:.3f}" in dom
    # A screenshot of the real report, opened from disk as a user would.
    shot = SHOT_DIR / "pneumo-report.png"
    subprocess.run(
        [*_chromium_args(str(tmp_path / "profile2")), "--window-size=1200,2600", f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert shot.stat().st_size > 50_000  # a rendered page with pictures, not a blank one
    print(f"screenshot: {shot}")


@pytest.mark.slow  # a version trained and registered on real films
def test_models_show_prints_cis_the_worst_shift_the_threshold_and_the_report(registered):
    from tests.helpers import invoke

    root, version, _ = registered
    card = registry.load_card(root, "tinynet", version)
    shown = invoke("models", "show", version, "--registry", root)
    assert shown.exit_code == 0, shown.output
    low, high = card.metrics["test"]["ci95"]["roc_auc"]
    assert f"roc_auc {card.metrics['test']['roc_auc']:.3f} [{low:.3f}, {high:.3f}]" in shown.output
    value, name = card.metrics["shift"]["val"]["worst"]["specificity"]
    assert "worst shift val: " in shown.output and f"specificity {value:.3f} ({name})" in shown.output
    assert "threshold   0.5" in shown.output
    assert f"report      {storage.join(root, 'tinynet', version, 'report.html')}" in shown.output
    assert Path(storage.join(root, "tinynet", version, "report.html")).is_file()
