"""The web page in headless Chromium: upload the bundled demo image, segment "the red shape",
wait for the outline, check the drawn polygons against /v1/segment's and save a screenshot
(target/web-page.png)."""

import json
import os
import shutil
import urllib.request

import pytest
from conftest import DEMO, ROOT, start_server

webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def chromium():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,900",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")
def test_page_draws_the_segment_result(server):
    base, _ = server
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium()
    try:
        browser.get(base + "/")
        browser.find_element(By.ID, "file").send_keys(str(DEMO))
        WebDriverWait(browser, 30).until(lambda b: not b.find_element(By.ID, "go").get_property("disabled"))
        query = browser.find_element(By.ID, "query")
        query.clear()
        query.send_keys("the red shape")
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 120).until(lambda b: b.execute_script("return window.simpleseg.done"))
        drawn = browser.execute_script("return window.simpleseg.polygons()")
        shown = browser.execute_script("return window.simpleseg.result()")
        out = ROOT / "target/web-page.png"
        out.parent.mkdir(exist_ok=True)
        browser.save_screenshot(str(out))
    finally:
        browser.quit()
    # The same request straight to the API (the page asks greedily, with the polygon grammar).
    import base64
    body = {"image": "data:image/png;base64," + base64.b64encode(DEMO.read_bytes()).decode(),
            "query": "the red shape", "temperature": 0, "constrain": "polygon"}
    request = urllib.request.Request(base + "/v1/segment", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as r:
        api = json.loads(r.read())
    assert drawn == api["polygons"]
    assert shown["rle"] == api["rle"]
    assert len(drawn) >= 1 and len(drawn[0]) >= 3
    assert os.path.getsize(ROOT / "target/web-page.png") > 10_000


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")
def test_a_photo_turned_by_its_exif_is_segmented_as_shown(server):
    """A JPEG stored 12 x 8 with EXIF orientation 6: the browser shows it 8 x 12. The page sends
    it as shown, so the mask comes back 8 wide and 12 high, in the frame the outline is drawn
    in (the server itself reads pictures as stored, as Pillow does)."""
    base, _ = server
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = ROOT / "fixtures/images/exif6.jpg"
    browser = chromium()
    try:
        browser.get(base + "/")
        browser.find_element(By.ID, "file").send_keys(str(photo))
        WebDriverWait(browser, 30).until(lambda b: not b.find_element(By.ID, "go").get_property("disabled"))
        assert browser.execute_script("return window.simpleseg.turned") is True
        size = browser.execute_script("const c = document.getElementById('canvas'); return [c.width, c.height]")
        assert size == [8, 12]
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 120).until(lambda b: b.execute_script("return window.simpleseg.done"))
        shown = browser.execute_script("return window.simpleseg.result()")
    finally:
        browser.quit()
    assert shown["rle"]["size"] == [12, 8]


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")
def test_with_an_api_key_the_page_asks_for_it_before_any_request():
    """The page learns from /health that a key is needed: no request goes out without it (no
    401 in the console), the model's name appears once the key is typed, and segmenting works."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    proc, base = start_server("--api-key", "s3cret")
    browser = chromium()
    try:
        browser.get(base + "/")
        model = lambda b: b.find_element(By.ID, "model").text
        WebDriverWait(browser, 30).until(lambda b: "enter the API key" in model(b))
        browser.find_element(By.ID, "key").send_keys("s3cret", Keys.TAB)
        WebDriverWait(browser, 30).until(lambda b: model(b).startswith("model: ") and "key" not in model(b))
        name = model(browser)
        browser.find_element(By.ID, "file").send_keys(str(DEMO))
        WebDriverWait(browser, 30).until(lambda b: not b.find_element(By.ID, "go").get_property("disabled"))
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 120).until(lambda b: b.execute_script("return window.simpleseg.done"))
        console = browser.get_log("browser")
    finally:
        browser.quit()
        proc.terminate()
        proc.wait(timeout=60)
    assert name != "model: unknown"
    # Nothing was refused, the browser's own /favicon.ico request included.
    assert not [e for e in console if "401" in e["message"]], console
