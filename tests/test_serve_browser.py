"""The web page of `minivlm serve`, driven end to end in headless Chromium (Debian's chromium and
chromium-driver, through Selenium): choose an image, see its caption and its boxes drawn, ask a question,
see the answers; drop a broken file and see the server's message.

Chromium missing is a failure, not a skip: `.ci/run` installs it (apt-get install chromium chromium-driver).

Run as a script, it takes the README's screenshot with a real model:

    .venv/bin/python tests/test_serve_browser.py MODEL IMAGE "a question" docs/serve_page.png
"""

from __future__ import annotations

import base64
import shutil
import sys
from pathlib import Path

import pytest

from test_serve import SIZES, call, make_env, ready, running

CHROMIUM_HELP = ("headless Chromium is needed: apt-get install -y chromium chromium-driver "
                 "(as root; .ci/run does this in CI)")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail(f"chromium or chromedriver not found. {CHROMIUM_HELP}")
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1180,860", "--hide-scrollbars"):
        options.add_argument(arg)  # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
    return webdriver.Chrome(service=Service(driver), options=options)


def wait(driver, condition, what: str, seconds: float = 120):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.05).until(lambda d: condition(d))
    except TimeoutException:
        error = driver.find_element("id", "error").text
        raise AssertionError(f"the page did not show {what}; its error box says: {error!r}") from None


def pixels_of(driver, rgb: tuple[int, int, int]) -> int:
    """How many canvas pixels are exactly this colour (the boxes' and labels' colour)."""
    return driver.execute_script("""
        const c = document.getElementById('canvas'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] === arguments[0] && d[i+1] === arguments[1] && d[i+2] === arguments[2]) n++;
        return n;""", *rgb)


def show(driver, port: int, image: Path, question: str) -> tuple[str, int, list[str]]:
    """Loads the page, chooses the image, asks the question; returns (caption, boxes drawn, answers)."""
    from selenium.webdriver.common.by import By

    driver.get(f"http://127.0.0.1:{port}/")
    driver.find_element(By.ID, "file").send_keys(str(Path(image).resolve()))
    caption = wait(driver, lambda d: d.find_element(By.ID, "caption").text, "a caption")
    boxes = int(wait(driver, lambda d: d.find_element(By.ID, "canvas").get_attribute("data-boxes") != "0"
                     and d.find_element(By.ID, "canvas").get_attribute("data-boxes"), "the boxes"))
    driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "ask").click()
    items = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#answers li"), "the answers")
    return caption, boxes, [li.find_element(By.CLASS_NAME, "answer").text for li in items]


def test_page_end_to_end_in_chromium(tmp_path):
    from selenium.webdriver.common.by import By

    from minivlm.serve.app import create_app

    env = make_env(tmp_path)
    m = env.model
    driver = browser()
    try:
        with running(create_app(env.folder)) as port:
            ready(port)
            question = "what color is the star?"
            caption, boxes, answers = show(driver, port, env.paths[0], question)
            assert caption == m.caption([env.pil[0]])[0]
            detections = call(port, "POST", "/v1/detect", {"image": env.urls[0], "max_regions": 10})[2]["detections"]
            assert boxes == len(detections) > 0
            listed = driver.find_elements(By.CSS_SELECTOR, "#detections li")
            assert [li.text.split(" (")[0] for li in listed] == [f"{d['attribute']} {d['category']}" for d in detections]
            assert pixels_of(driver, (0xE6, 0x19, 0x4B)) > 30, "the first box is drawn on the canvas"
            assert answers == [a for a, _ in m.answer_scores([env.pil[0]], [question], top_k=5)[0]]
            assert driver.find_element(By.ID, "error").is_displayed() is False
            shot = tmp_path / "page.png"
            assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

            # a dropped file goes the same way (a drop event carrying a File, as a real drag brings)
            drop = """
                const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], arguments[1], {type: 'image/png'}));
                document.getElementById('drop').dispatchEvent(
                    new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));"""
            driver.execute_script(drop, base64.b64encode(env.paths[2].read_bytes()).decode(), "dropped.png")
            want = m.caption([env.pil[2]])[0]
            wait(driver, lambda d: d.find_element(By.ID, "caption").text == want, "the dropped image's caption")
            assert f"{SIZES[2][0]}x{SIZES[2][1]} pixels" in driver.find_element(By.ID, "status").text

            # a broken file: the server's message, readable, and no stale caption
            driver.execute_script(drop, base64.b64encode(b"\x89PNG\r\n\x1a\n not really").decode(), "broken.png")
            error = wait(driver, lambda d: d.find_element(By.ID, "error").is_displayed()
                         and d.find_element(By.ID, "error").text, "the error")
            assert "not an image" in error and "HTTP 400" in error
            assert driver.find_element(By.ID, "caption").text == ""
            assert driver.find_element(By.ID, "question").get_attribute("disabled") is not None
    finally:
        driver.quit()


def main(argv: list[str]) -> int:
    """The README's screenshot: the page on a real model folder."""
    import argparse

    from minivlm.serve.app import create_app

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("image")
    parser.add_argument("question")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    driver = browser()
    try:
        with running(create_app(args.model)) as port:
            ready(port)
            caption, boxes, answers = show(driver, port, Path(args.image), args.question)
            driver.save_screenshot(args.out)
    finally:
        driver.quit()
    print(f"{args.out}: caption {caption!r}, {boxes} boxes, answers {answers}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
