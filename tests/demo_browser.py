"""Drive the demo in headless Debian Chromium with Selenium (nothing downloads a browser or a driver).

``python -m tests.demo_browser RUN_DIR docs/demo.png [--video FILE] [--query TEXT]`` serves the demo
on a free loopback port and saves the screenshot the browser test takes (the picture in
docs/using_a_model.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1250",
)


def browser_available() -> bool:
    return shutil.which("chromium") is not None and shutil.which("chromedriver") is not None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def chromium(profile: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a fresh profile that logs every request it makes."""
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        yield driver
    finally:
        driver.quit()


@dataclass(frozen=True)
class Drawn:
    """What the page shows after a query: every bar of the timeline, the status text, the requests."""

    segments: dict[str, tuple[float, float]]
    status: str
    frames: int  # pictures of the video at the answer's boundaries
    clip: bool  # the moment as a playable video
    features: bool  # the features-over-time picture (videos without pixels)
    requested: list[str]
    suggested: str = ""  # the query the page filled in for the video chosen


def requested_urls(driver: webdriver.Chrome) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def ask(
    driver: webdriver.Chrome,
    url: str,
    query: str,
    video: str | None = None,
    upload: Path | None = None,
    keyboard: bool = False,
    timeout: float = 90,
) -> Drawn:
    """Open the demo, upload a file and/or then choose ``video`` (a dropdown label, clicked or typed
    with ``keyboard``; the choice clears the upload), type ``query``, press Ground, and read the answer."""
    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    box = wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "#query textarea")))
    if upload is not None:
        driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(upload))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload video"))
    if video is not None:
        choose(driver, wait, video, keyboard)
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#upload video"))
    suggested = box.get_attribute("value") or ""
    box.clear()
    box.send_keys(query)
    driver.find_element(By.ID, "ground").click()
    wait.until(lambda d: answered(d) or error_shown(d))
    segments = {
        bar.get_attribute("data-row"): (
            float(bar.get_attribute("data-start")),
            float(bar.get_attribute("data-end")),
        )
        for bar in driver.find_elements(By.CSS_SELECTOR, "#timeline g.segment")
    }
    return Drawn(
        segments,
        driver.find_element(By.ID, "status").text,
        len(driver.find_elements(By.CSS_SELECTOR, "#boundaries img")),
        bool(driver.find_elements(By.CSS_SELECTOR, "#clip video")),
        bool(driver.find_elements(By.CSS_SELECTOR, "#features img")),
        requested_urls(driver),
        suggested,
    )


def answered(driver: webdriver.Chrome) -> bool:
    """The timeline has its answer bar and the pictures are in (boundary frames or features)."""
    final = driver.find_elements(By.CSS_SELECTOR, '#timeline g.segment[data-row="final"]')
    pictures = driver.find_elements(By.CSS_SELECTOR, "#boundaries img, #features img")
    return bool(final and pictures)


def error_shown(driver: webdriver.Chrome) -> bool:
    return "error:" in driver.find_element(By.ID, "status").text


def choose(driver: webdriver.Chrome, wait: WebDriverWait, label: str, keyboard: bool = False) -> None:
    """Pick ``label`` in the video dropdown: its option clicked, or typed and confirmed with Enter."""
    field = driver.find_element(By.CSS_SELECTOR, "#video-choice input")
    field.click()
    if keyboard:
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(label, Keys.ENTER)
    else:
        option = wait.until(
            expected_conditions.element_to_be_clickable(
                (By.XPATH, f'//*[@role="option"][contains(., "{label}")]')
            )
        )
        option.click()
    wait.until(
        lambda d: d.find_element(By.CSS_SELECTOR, "#video-choice input").get_attribute("value") == label
    )


def main() -> None:
    from timerefine.demo.app import build_app, demo_examples, launch
    from timerefine.inference.grounder import Grounder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("screenshot", type=Path)
    parser.add_argument("--video", type=Path, action="append", default=[])
    parser.add_argument("--choose", help="the dropdown label to pick (default: the first)")
    parser.add_argument("--query")
    args = parser.parse_args()
    grounder = Grounder.load(args.run)
    examples = demo_examples(grounder, args.video)
    app, port = build_app(grounder, examples, args.run.name), free_port()
    launch(app, port, block=False)
    try:
        with tempfile.TemporaryDirectory() as profile, chromium(Path(profile)) as driver:
            query = args.query or next(
                e.query for e in examples if e.label == (args.choose or examples[0].label)
            )
            drawn = ask(driver, f"http://127.0.0.1:{port}", query, args.choose)
            driver.save_screenshot(str(args.screenshot))
            print(drawn.status)
    finally:
        app.close()


if __name__ == "__main__":
    main()
