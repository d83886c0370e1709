"""Scratch: dump what the MLflow UI shows (buttons, text) for a URL, to find the controls to drive."""

import sys

from playwright.sync_api import sync_playwright

url = sys.argv[1]
out = sys.argv[2]
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    page.goto(url)
    page.wait_for_timeout(6000)
    page.screenshot(path=out)
    for el in page.query_selector_all("button, [role=tab], [role=switch], [role=radio], [aria-label]")[:150]:
        label = (el.get_attribute("aria-label") or "").strip()
        text = (el.inner_text() or "").strip().replace("\n", " ")[:60]
        print(el.evaluate("e => e.tagName"), repr(label), repr(text), el.get_attribute("data-testid"))
    browser.close()
