"""The review page in a real browser (Debian's Chromium through Selenium and /usr/bin/chromedriver) over a
night that `painter generate` wrote, served by real Ray Serve: log in, page, decide, markup as text, the
packaged CJK font, and the screenshot docs/review.md shows."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from painter.io.reviews import ReviewTable
from serve_helpers import DATE, TOKEN, XSS, serving, wait_until

pytestmark = pytest.mark.slow
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "review.png")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1000")


def _chromium() -> None:
    """Debian's chromium and chromium-driver, installed with apt-get when missing."""
    if os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium is missing and cannot be installed here (needs root and apt-get)")
    subprocess.run(["apt-get", "update"], check=True, capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "chromium", "chromium-driver"], check=True, capture_output=True,
                   timeout=1200)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def served(ray_session, tiny_model_dir, tmp_path_factory):
    yield from serving(tiny_model_dir, tmp_path_factory)


def _cards(driver) -> dict:
    from selenium.webdriver.common.by import By

    return {c.get_attribute("data-idx"): c for c in driver.find_elements(By.CSS_SELECTOR, "#grid .card")}


def _page_info(driver) -> str:
    return driver.find_element("id", "pageinfo").text


def test_review_a_night_in_the_browser(served, browser):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    url, table = served
    browser.get(url + "/review/")
    browser.find_element("id", "token").send_keys(TOKEN)
    browser.find_element("id", "login").click()
    wait_until(lambda: "page 1 / 2 (30 pictures)" in _page_info(browser), 60, "the first page")
    assert len(_cards(browser)) == 24
    loaded = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "document.fonts.load('16px PainterCJK', '宽松').then(() => done({check: document.fonts.check("
        "'16px PainterCJK', '宽松'), faces: [...document.fonts].filter(f => f.family.includes('PainterCJK'))"
        ".map(f => f.status)}), e => done({error: String(e)}));")
    assert loaded == {"check": True, "faces": ["loaded"]}, loaded

    browser.find_element("id", "next").click()
    wait_until(lambda: "page 2 / 2" in _page_info(browser) and "xss" in _cards(browser), 60, "the second page")
    cards = _cards(browser)
    assert sorted(cards) == ["p23", "p24", "p25", "p26", "p27", "xss"]
    assert cards["xss"].find_element(By.CLASS_NAME, "caption").text == XSS  # shown as text, not run
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    assert cards["p25"].find_element(By.CLASS_NAME, "caption").text == "宽松T恤 第25款"

    cards["p23"].send_keys("a")  # keyboard: approve the focused picture
    wait_until(lambda: "approve" in _cards(browser)["p23"].get_attribute("class"), 60, "p23 approved")
    browser.find_element("id", "reason").send_keys("颜色不对 wrong colour")
    _cards(browser)["p24"].find_element(By.CLASS_NAME, "reject").click()
    wait_until(lambda: "reject" in _cards(browser)["p24"].get_attribute("class"), 60, "p24 rejected")

    decided = {r["idx"]: r for r in ReviewTable(table).latest(DATE).to_pylist()}
    assert {i: decided[i]["decision"] for i in decided} == {"p23": "approve", "p24": "reject"}
    assert decided["p24"]["reason"] == "颜色不对 wrong colour" and decided["p23"]["reason"] is None

    _cards(browser)["p26"].find_element(By.TAG_NAME, "img").click()  # the larger view
    wait_until(lambda: browser.find_element("id", "viewer").is_displayed(), 30, "the larger view")
    assert "p26" in browser.find_element("id", "viewer-caption").text
    browser.find_element("id", "viewer").click()
    wait_until(lambda: not browser.find_element("id", "viewer").is_displayed(), 30, "the larger view closed")
    os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
    assert browser.save_screenshot(SCREENSHOT) and os.path.getsize(SCREENSHOT) > 10_000
