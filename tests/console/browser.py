"""Drives /console in headless Chromium (selenium + Debian's chromedriver).

Argument: JSON with base, admin and app keys, worker id, dead-letter id,
batch id and the directory for screenshots. Prints "console ok" when every
step held; any failure raises with what the page showed.
"""

import json
import os
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

arg = json.loads(sys.argv[1])
base, shots = arg["base"], arg["shots"]
os.makedirs(shots, exist_ok=True)

opts = webdriver.ChromeOptions()
for flag in [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1280,800", "--hide-scrollbars",
]:
    opts.add_argument(flag)
opts.add_argument("--user-data-dir=" + arg["profile"])
opts.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
driver = webdriver.Chrome(service=Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")), options=opts)


def wait(what, check, timeout=30):
    end = time.time() + timeout
    last = None
    while time.time() < end:
        try:
            v = check()
            if v:
                return v
        except Exception as e:  # the element may not be there yet
            last = e
        time.sleep(0.2)
    shot("failed")
    body = driver.find_element(By.TAG_NAME, "body").text
    raise AssertionError(f"timed out waiting for {what} (last error: {last}); page:\n{body}")


def text(css):
    return driver.find_element(By.CSS_SELECTOR, css).text


def shot(name):
    driver.save_screenshot(os.path.join(shots, f"console-{name}.png"))


def go(tab):
    driver.execute_script(f"location.hash = '#{tab}'")
    wait(f"page {tab}", lambda: driver.find_element(By.ID, tab).is_displayed())


def sign_in(key):
    field = driver.find_element(By.ID, "key")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()


try:
    driver.get(base + "/console")
    # with authentication on, the page asks for a key, and one without the
    # admin role is refused by the API the page calls
    wait("the key form", lambda: driver.find_element(By.ID, "login").is_displayed())
    loaded = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not loaded, f"console errors on load: {loaded}"
    sign_in(arg["app_key"])
    wait("the refusal of a non-admin key", lambda: "admin" in text("#login-error").lower())
    assert text("#tile-rps") == "–", "a refused key showed figures"
    # the refused key's 403 is the one error the page may log
    driver.get_log("browser")
    sign_in(arg["admin_key"])
    wait("the live feed", lambda: text("#link") == "live")
    assert not driver.find_element(By.ID, "login").is_displayed()

    # overview: the running worker and a non-zero throughput under load
    wait("a non-zero throughput", lambda: float(text("#tile-rps")) > 0)
    wait("a live worker", lambda: text("#tile-workers").startswith("1 /"))
    wait("chart lines", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#chart-rps polyline")) > 0)
    wait("a latency percentile", lambda: text("#tile-p95") != "–")
    wait("three points on the charts", lambda: driver.execute_script("return state.points.length") >= 3)
    shot("overview")

    go("queues")
    wait("the queues", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#queue-list .queue")) == 3)
    wait("a scaling report", lambda: "echo" in text("#models-table tbody"))
    shot("queues")

    # a dead letter: found, inspected, replayed
    go("dlq")
    letter = arg["letter"]
    wait("the dead letter", lambda: letter in text("#dlq-table tbody"))
    cells = driver.find_elements(By.CSS_SELECTOR, "#dlq-table tbody tr")
    mine = [r for r in cells if letter in r.text][0]
    mine.find_elements(By.TAG_NAME, "td")[0].click()
    wait("the letter's payload", lambda: letter in text("#letter-body") and "backend_error" in text("#letter-title"))
    shot("dead-letters")
    mine.find_element(By.CSS_SELECTOR, "button[data-action='replay']").click()
    wait("the replay", lambda: "replayed 1" in text("#notice"))

    go("batches")
    wait("the batch", lambda: arg["batch"] in text("#batches-table tbody"))
    wait("the batch completed", lambda: "completed" in text(f"#batches-table tr[data-id='{arg['batch']}']"), timeout=20)
    shot("batches")

    # a drain from the page
    go("workers")
    row = f"#workers-table tr[data-id='{arg['worker']}']"
    wait("the worker's row", lambda: "serving" in text(row))
    driver.find_element(By.CSS_SELECTOR, row + " button[data-action='drain']").click()
    wait("the worker draining", lambda: "draining" in text(row), timeout=15)
    shot("workers")

    # a phone
    driver.set_window_size(390, 844)
    go("overview")
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    width = driver.execute_script("return document.documentElement.scrollWidth")
    assert width <= 400, f"the overview is {width} px wide on a 390 px phone"
    shot("phone")

    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"console errors: {errors}"
    print("console ok")
finally:
    driver.quit()
