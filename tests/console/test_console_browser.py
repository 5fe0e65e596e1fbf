"""Headless chromium: log in, upload a real hemorrhage slice, see the alert live, judge it."""

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from benchmarks.console_api import ConsoleApi
from client.classify import LocalClassifier
from client.decode import decode_file
from client.preprocess import preprocess
from client.registry import get_model
from tests.console.conftest import ConsoleServer

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def flagged_slice(shared_data) -> Path:
    """The first real hemorrhage slice (kaggle ids 0-19, label 1) the model flags."""
    import numpy as np

    spec = get_model("mobilenet_v2")
    candidates = [shared_data / "kaggle_head_ct" / "head_ct" / f"{i:03d}.png" for i in range(20)]
    batch = np.stack([preprocess(decode_file(p), spec) for p in candidates])
    probabilities = LocalClassifier(spec).predict(batch)
    for path, p in zip(candidates, probabilities, strict=True):
        if p >= spec.threshold:
            return path
    pytest.skip("the committed model flags none of kaggle hemorrhage slices 0-19")


@pytest.fixture
def browser(tmp_path):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install ...)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@contextmanager
def _explained_timeouts(browser, console_server) -> Iterator[None]:
    """Turn a bare selenium timeout into what the page, the browser and gunicorn showed."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By

    try:
        yield
    except TimeoutException as error:
        console = "\n".join(entry["message"] for entry in browser.get_log("browser"))
        page = browser.find_element(By.TAG_NAME, "body").text[:2000]
        raise AssertionError(
            f"timed out on {browser.current_url}\n--- page ---\n{page}\n"
            f"--- browser console ---\n{console}\n"
            f"--- gunicorn log ---\n{console_server.log.read_text()[-4000:]}"
        ) from error


def test_upload_raises_the_alert_on_every_open_screen_without_reload(
    console_server, browser, flagged_slice, tmp_path
):
    with _explained_timeouts(browser, console_server):
        _log_in_upload_see_alert_acknowledge(console_server, browser, flagged_slice, tmp_path)


def _text(driver, selector: str) -> str:
    """The visible text of the element ``selector`` now, read in the page in one step.

    The pages redraw parts of themselves on every live event. Reading an
    element's text through a handle can meet the node just replaced, which
    chromedriver reports as an unknown error rather than a stale element.
    """
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';", selector
    )


def _waiting(browser):
    """A 90 s wait that re-finds elements: the worklist redraws its rows on every event."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(
        browser, 90, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
    )


def _log_in_to_the_empty_worklist(console_server, browser) -> str:
    """Log in as the administrator; the console's base URL."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    wait = _waiting(browser)
    base = console_server.url.replace("127.0.0.1", "localhost")  # Secure cookies: localhost
    browser.get(base + "/")
    assert "/auth/login" in browser.current_url
    browser.find_element(By.ID, "username").send_keys("admin")
    browser.find_element(By.ID, "password").send_keys("correct horse battery")
    browser.find_element(By.ID, "login").click()
    wait.until(ec.presence_of_element_located((By.ID, "worklist-rows")))
    wait.until(lambda d: "No studies yet" in _text(d, "#worklist-rows"))
    return base


def _log_in_upload_see_alert_acknowledge(console_server, browser, flagged_slice, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    wait = _waiting(browser)
    base = _log_in_to_the_empty_worklist(console_server, browser)
    worklist_tab = browser.current_window_handle
    browser.execute_script("window.notReloaded = true;")

    browser.switch_to.new_window("tab")
    browser.get(base + "/upload")
    browser.find_element(By.ID, "file-input").send_keys(str(flagged_slice))
    browser.find_element(By.ID, "upload-button").click()
    wait.until(lambda d: "Accepted into" in _text(d, "#upload-result"))

    banner = wait.until(ec.visibility_of_element_located((By.ID, "alert-banner")))
    assert "Possible intracranial hemorrhage" in banner.text

    browser.switch_to.window(worklist_tab)
    banner = wait.until(ec.visibility_of_element_located((By.ID, "alert-banner")))
    wait.until(lambda d: "flagged" in _text(d, "tr.row-flagged").lower())
    assert browser.execute_script("return window.notReloaded === true;")
    screenshot = tmp_path / "worklist-alert.png"  # kept under pytest's tmp folder
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000

    browser.find_element(By.CSS_SELECTOR, "#alert-banner a.alert-link").click()
    wait.until(ec.presence_of_element_located((By.ID, "main-slice")))
    browser.find_element(By.ID, "acknowledge").click()
    wait.until(lambda d: "acknowledged" in _text(d, "#study-status").lower())
    assert not browser.find_element(By.ID, "alert-banner").is_displayed()

    # The reader's verdict on the flag, from the same page.
    browser.find_element(By.ID, "feedback-confirmed").click()
    wait.until(lambda d: "true positive" in _text(d, "#feedback-current"))


#: Counts the WebAudio oscillators the page starts: each alarm tone is three.
_COUNT_TONES = """
window.tones = 0;
const start = AudioContext.prototype.createOscillator;
AudioContext.prototype.createOscillator = function () {
  window.tones += 1;
  return start.apply(this, arguments);
};
"""


def test_a_screen_refused_a_stream_still_sounds_a_flag_and_takes_a_stream_once_one_frees(
    tmp_path, browser, flagged_slice
):
    """Every stream slot taken (or a proxy's 502 during a restart) must not leave a screen deaf."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    with ConsoleServer(tmp_path / "storage", MAX_STREAMS="1", SSE_KEEPALIVE_S="1") as server:
        api = ConsoleApi(server.url, server.token())
        wait = _waiting(browser)
        with _explained_timeouts(browser, server):
            with api.events() as other_screen:  # takes the only stream slot
                _log_in_to_the_empty_worklist(server, browser)
                wait.until(ec.visibility_of_element_located((By.ID, "connection")))
                browser.execute_script(_COUNT_TONES)
                browser.find_element(By.ID, "enable-alerts").click()  # sounds one test tone
                wait.until(lambda d: d.execute_script("return window.tones") == 3)
                study_id = api.upload([(flagged_slice.name, flagged_slice.read_bytes())], None)[
                    "study_id"
                ]
                # No stream here: the screen redraws as it retries, and sounds the new flag.
                wait.until(lambda d: "flagged" in _text(d, "tr.row-flagged").lower())
                wait.until(ec.visibility_of_element_located((By.ID, "alert-banner")))
                wait.until(lambda d: d.execute_script("return window.tones") == 6)
                assert browser.find_element(By.ID, "connection").is_displayed()
                while (event := other_screen.get(timeout_s=60)) is not None:
                    if event.data["id"] == study_id and event.data["alert"]:
                        break
                assert event is not None, "the screen holding the stream never heard the flag"
            # The other screen has gone: its slot frees within a keepalive, and this
            # screen's next try takes it.
            wait.until(ec.invisibility_of_element_located((By.ID, "connection")))
            assert browser.execute_script("return window.tones") == 6  # one alarm per flag
