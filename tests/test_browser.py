"""A real browser (Debian's Chromium driven by Playwright) against `covidct serve`.

Screenshots of the worklist, a study and the uploads page land in var/screenshots/ so that a
person can look at what the product shows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from covidct.synthetic import SeriesSpec, make_study
from tests.conftest import need, need_tool
from tests.test_e2e import ROOT, base_env, cli, serve, wait

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SHOTS = ROOT / "var" / "screenshots"
ALL_LOADED = (
    "() => [...document.querySelectorAll('%s')].every(i => i.complete && i.naturalWidth > 0)"
)


def send(env: dict[str, str], datasets: list) -> None:  # type: ignore[type-arg]
    from pynetdicom import AE

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
    assoc = ae.associate("127.0.0.1", int(env["COVIDCT_DICOM_PORT"]), ae_title="COVIDCT")
    assert assoc.is_established
    assert all(assoc.send_c_store(ds).Status == 0 for ds in datasets)
    assoc.release()


def check_viewer(page, expect) -> None:  # type: ignore[no-untyped-def]
    """The slice viewer: the wheel and the keys move through the series, the chart's cursor
    follows, the overlay toggles, a key slice is one click away."""
    viewer = page.locator("#viewer")
    page.wait_for_function("() => document.getElementById('viewer').dataset.ready === '1'")
    page.wait_for_function(ALL_LOADED % "#viewer-image")
    count = int(page.get_attribute("#viewer-slider", "max")) + 1
    assert count >= 20  # the whole analysed series, not the key slices only
    viewer.focus()
    page.keyboard.press("Home")
    assert viewer.get_attribute("data-index") == "0"
    cursor_x = page.get_attribute("#chart-cursor", "x1")
    viewer.hover()
    page.mouse.wheel(0, 120)
    page.wait_for_function("() => document.getElementById('viewer').dataset.index === '1'")
    assert page.get_attribute("#chart-cursor", "x1") != cursor_x  # the cursor follows
    viewer.focus()
    page.keyboard.press("ArrowDown")
    assert viewer.get_attribute("data-index") == "2"
    expect(page.locator("#viewer-info")).to_contain_text(f"slice 3 of {count}")
    expect(page.locator("#marker-left")).to_have_text("R")
    plain = page.get_attribute("#viewer-image", "src")
    page.check("#viewer-overlay")
    with_overlay = page.get_attribute("#viewer-image", "src")
    assert "overlay=1" in with_overlay and with_overlay != plain
    page.wait_for_function(ALL_LOADED % "#viewer-image")
    page.screenshot(path=str(SHOTS / "viewer-overlay.png"))
    key = page.locator("#viewer-keys button").first
    key_id = key.get_attribute("data-slice")
    key.click()
    assert viewer.get_attribute("data-slice") == key_id
    page.wait_for_function(ALL_LOADED % "#viewer-image")
    natural = page.evaluate(
        "() => [document.getElementById('viewer-image').naturalWidth,"
        " document.getElementById('viewer-image').naturalHeight]"
    )
    assert natural[0] == natural[1]  # a square field of view of square pixels
    viewer.screenshot(path=str(SHOTS / "viewer.png"))


def check_review(page, expect) -> None:  # type: ignore[no-untyped-def]
    """A reader records their read on the study page, then sees it counted on the
    performance page."""
    page.select_option("form.review select[name=call]", "covid")
    page.check("form.review input[name=agree][value=false]")
    page.fill("form.review textarea[name=comment]", "bilateral GGO")
    page.click("text=Record your read")
    expect(page.locator(".flashes")).to_contain_text("Review saved.")
    expect(page.locator("table.reviews")).to_contain_text("bilateral GGO")
    page.click("text=Performance")
    expect(page.locator("h1")).to_contain_text("The AI against its readers")
    expect(page.locator("dd.agreement")).to_contain_text("(0 of 1")
    page.screenshot(path=str(SHOTS / "performance.png"), full_page=True)


def check_operations(page, expect) -> None:  # type: ignore[no-untyped-def]
    """The admin's operations page: health, the node, the audit log of what happened in this
    run (the study's association, the upload), filtered by action."""
    page.click("text=Operations")
    expect(page.locator("h1")).to_contain_text("Operations")
    expect(page.locator("table.health")).to_contain_text("database")
    expect(page.locator("table.audit")).to_contain_text("association.accept")
    page.fill("input[name=action]", "login")
    page.click("text=Filter")
    expect(page.locator("table.audit")).to_contain_text("radiologist")
    expect(page.locator("table.audit")).not_to_contain_text("association.accept")
    page.screenshot(path=str(SHOTS / "operations.png"), full_page=True)


def test_dashboard_in_chromium(tmp_path: Path) -> None:
    chromium = need_tool("chromium")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        need(False, "the playwright package")
        raise
    env = base_env(tmp_path)
    SHOTS.mkdir(parents=True, exist_ok=True)
    with serve(env, tmp_path / "serve.log"):
        cli(
            env,
            "create-user",
            "radiologist",
            "--admin",
            "--password-stdin",
            stdin="a good password\n",
        )
        study = make_study(
            [SeriesSpec(slices=30, ground_glass=True), SeriesSpec(kind="localizer")],
            patient_name="<b>Browser</b>^Test",
            patient_id="BRW001",
        )
        send(env, study)
        base = f"http://127.0.0.1:{env['COVIDCT_WEB_PORT']}"
        png = tmp_path / "slice.png"
        img = Image.new("L", (256, 256), 40)
        img.paste(200, (60, 60, 190, 190))
        img.save(png)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=chromium,
                headless=True,
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--no-first-run",
                ],
            )
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{base}/")
            assert "/login" in page.url
            page.fill("input[name=username]", "radiologist")
            page.fill("input[name=password]", "a good password")
            page.click("button[type=submit]")
            expect(page.locator("h1")).to_contain_text("Worklist")
            expect(page.locator("p.notice")).to_contain_text("not a diagnosis")
            # the page refreshes itself until the study is done
            row = page.locator("table.worklist tbody tr").first
            wait(
                lambda: (page.reload() or True) and "done" in row.inner_text(),
                120,
                "the study to be done in the worklist",
            )
            assert "<b>Browser</b> Test" in row.inner_text()  # HTML shown as text
            page.screenshot(path=str(SHOTS / "worklist.png"), full_page=True)
            row.locator("a").first.click()
            expect(page.locator("section.verdict h2")).to_contain_text("COVID-19:")
            expect(page.locator("svg.chart polyline")).to_have_count(1)
            expect(page.locator(".slices figure")).to_have_count(4)
            page.wait_for_function(ALL_LOADED % ".slices img")
            page.screenshot(path=str(SHOTS / "study.png"), full_page=True)
            check_viewer(page, expect)
            check_review(page, expect)
            page.click("text=Uploads")
            page.click("text=Upload and classify")  # nothing chosen: the page says so
            assert "Choose one or more PNG or JPEG files." in page.inner_text("ul.flashes")
            page.set_input_files("input[type=file]", str(png))
            page.click("text=Upload and classify")
            expect(page.locator(".flashes")).to_contain_text("1 image(s) queued")
            upload_row = page.locator("table.uploads tbody tr").first
            wait(
                lambda: (page.reload() or True) and "done" in upload_row.inner_text(),
                120,
                "the upload to be classified",
            )
            text = upload_row.inner_text()
            assert "slice.png" in text and ("Present" in text or "Absent" in text)
            assert "(threshold 0." in text and "+00:00" not in text
            page.wait_for_function(ALL_LOADED % "table.uploads img")
            page.screenshot(path=str(SHOTS / "uploads.png"), full_page=True)
            check_operations(page, expect)
            browser.close()
    assert (SHOTS / "worklist.png").stat().st_size > 10_000
