"""The reports of real small runs, opened in headless Chromium (Debian's ``chromium``, driven
by Playwright; no browser download): the page loads without console errors, and what a
reader looks for first is there and visible: the summary, the clinical section of a medical
run (threshold, figures with intervals, operating point), Grad-CAM overlays large enough to
read, the most confidently wrong images of array data."""

import shutil
import textwrap

import numpy as np
import pytest

from restransfer.cli import runs

from conftest import scans_npz, write_pairs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")


def run(tmp_path, name, body):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(textwrap.dedent(body).format(out=tmp_path / "runs"))
    return runs.train(recipe, [f"name={name}"], verbose=0)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield chromium
        chromium.close()


def open_report(browser, path):
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(path.as_uri(), wait_until="load")
    return page, problems


def visible(page, selector):
    box = page.locator(selector).first.bounding_box()
    return box is not None and box["width"] > 0 and box["height"] > 0


def test_a_medical_run_report_reads_in_a_browser(tmp_path, browser):
    source = tmp_path / "scans.npz"
    scans_npz(source, counts=(("train", 64), ("val", 40), ("test", 40)), positives=0.4)
    run_dir = run(tmp_path, "scans", f"""\
        task: medical
        backbone: {{{{name: resnet18, weights: null}}}}
        input: {{{{image_size: 32, channels: 1}}}}
        data: {{{{source: {source}, batch_size: 16}}}}
        fine_tune: [{{{{trainable: all, epochs: 2, lr: 0.002}}}}]
        medical: {{{{positive_class: "1", gradcam_images: 2, temperature_scaling: true}}}}
        export: {{{{enabled: false}}}}
        output_dir: {{out}}
        """)
    page, problems = open_report(browser, run_dir / "report.html")
    assert not problems, problems
    # the summary comes first and names the rule and where the headline figures come from
    assert page.locator("section").first.get_attribute("id") == "summary" and visible(page, "#summary")
    summary = page.locator("#summary").inner_text()
    assert "'1' when its probability >=" in summary, "the decision rule"
    assert "AUC" in summary and "(test)" in summary, "headline figures name their split"
    clinical = page.locator("#clinical")
    assert clinical.is_visible()
    text = clinical.inner_text()
    for phrase in ("sensitivity", "specificity", "PPV", "NPV", "Threshold chosen on", "val", "decided positive"):
        assert phrase in text, phrase
    assert visible(page, "#clinical img[alt='ROC with the operating point']")
    assert visible(page, "#clinical img[alt='Calibration']")
    overlays = page.locator(".gradcam img")
    assert overlays.count() == 2
    for index in range(2):
        assert overlays.nth(index).bounding_box()["width"] >= 400, "Grad-CAM shown large enough to read"
    wrong = page.locator("section", has=page.locator("h2", has_text="Most confidently wrong"))
    assert wrong.count() == 1, "the grid's section is there for array data"
    assert wrong.locator("img").count() == 1 or "none" in wrong.inner_text()
    page.screenshot(path=str(run_dir / "report.png"), full_page=True)


def test_a_classification_run_report_reads_in_a_browser(tmp_path, browser):
    # array data (an .npz) of noise: plenty of confidently wrong images for the grid
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "noise.npz", **{f"{split}_{kind}": value for split, count in (("train", 32), ("val", 24))
                                       for kind, value in (("images", rng.integers(0, 255, (count, 32, 32, 3), dtype=np.uint8)),
                                                           ("labels", rng.integers(0, 3, count)))})
    run_dir = run(tmp_path, "noise", f"""\
        backbone: {{{{name: resnet18, weights: null}}}}
        input: {{{{image_size: 32}}}}
        data: {{{{source: {tmp_path / 'noise.npz'}, batch_size: 8}}}}
        fine_tune: [{{{{trainable: all, epochs: 1, lr: 0.001}}}}]
        export: {{{{enabled: false}}}}
        output_dir: {{out}}
        """)
    page, problems = open_report(browser, run_dir / "report.html")
    assert not problems, problems
    assert visible(page, "#summary") and page.locator("#clinical").count() == 0
    summary = page.locator("#summary").inner_text()
    assert "the most probable class" in summary and "accuracy" in summary and "validation split" in summary
    assert visible(page, "img[alt^='Most confidently wrong']"), "array data get the grid too"
    images = page.locator("img")
    assert images.count() >= 4
    for index in range(images.count()):
        box = images.nth(index).bounding_box()
        assert box and box["width"] > 50 and box["height"] > 50
    page.screenshot(path=str(run_dir / "report.png"), full_page=True)


def test_a_segmentation_run_report_reads_in_a_browser(tmp_path, browser):
    """A task: segmentation recipe file run here: the summary names the rule and the Dice,
    the per-class table, the per-image Dice histogram, and image | truth | prediction of the
    worst, median and best images, each at least 256 px wide, with a legend."""
    folder = write_pairs(tmp_path / "pairs", 8, 3, 2, seed=4)
    run_dir = run(tmp_path, "polyps", f"""\
        task: segmentation
        backbone: {{{{name: resnet18, weights: null}}}}
        input: {{{{image_size: 32}}}}
        data: {{{{source: {folder}, batch_size: 8}}}}
        fine_tune: [{{{{trainable: all, epochs: 1, lr: 0.01}}}}]
        segmentation: {{{{classes: [background, polyp], decoder_widths: [16, 16, 8, 8, 8]}}}}
        export: {{{{enabled: false}}}}
        output_dir: {{out}}
        """)
    page, problems = open_report(browser, run_dir / "report.html")
    assert not problems, problems
    summary = page.locator("#summary").inner_text()
    assert "'polyp' where its probability >= 0.5" in summary and "Dice (per image)" in summary
    assert "validation split" in summary
    table = page.locator("table", has=page.locator("th", has_text="Dice (dataset)"))
    assert table.is_visible() and "polyp" in table.inner_text()
    assert visible(page, "img[alt^='Per-image Dice']")
    examples = page.locator("#examples .example")
    assert examples.count() == 3 and "worst" in examples.nth(0).inner_text() and "best" in examples.nth(2).inner_text()
    for index in range(9):
        box = page.locator("#examples img").nth(index).bounding_box()
        assert box and min(box["width"], box["height"]) >= 256, "overlays large enough to read"
    assert "polyp" in page.locator("#examples .legend").inner_text()
    metrics = __import__("json").loads((run_dir / "metrics.json").read_text())
    assert "both empty" in metrics["val_figures"]["empty_rule"] and 0 <= metrics["val_dice"] <= 1
    page.screenshot(path=str(run_dir / "report.png"), full_page=True)
