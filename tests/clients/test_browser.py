"""The web page in headless Chromium: upload the bundled demo image, segment "the red shape",
wait for the outline, check the drawn polygons against /v1/segment's and save a screenshot
(target/web-page.png)."""

import json
import os
import shutil
import urllib.request

import pytest
from conftest import DEMO, ROOT

webdriver = pytest.importorskip("selenium.webdriver")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")
def test_page_draws_the_segment_result(server):
    base, _ = server
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1300,900"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(DRIVER), options=options)
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
