"""The chat page at `/`, driven in headless Chromium as a user would: type, send, watch the answer stream in,
read the tokens/s and tokens/step figures, go on with a second turn. Needs Debian's `chromium` and
`chromium-driver` packages and the `selenium` package."""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from medusa import MedusaModel
from serving import serve

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Chromium: apt-get install -y chromium chromium-driver")
SCREENSHOTS = os.environ.get("MEDUSA_SCREENSHOTS")  # a folder to keep the page's screenshots in


@pytest.fixture(scope="module")
def server():
    with serve(MedusaModel.from_pretrained(), model_name="SmolLM2-135M-Instruct", api_key="page-key") as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="medusa-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1100,800"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _send(driver, text: str) -> None:
    box = driver.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def _answers(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")


def _screenshot(driver, name: str) -> None:
    if SCREENSHOTS:
        os.makedirs(SCREENSHOTS, exist_ok=True)
        driver.save_screenshot(os.path.join(SCREENSHOTS, name))


def test_chat_page_streams_answers_with_figures_over_two_turns(server, browser):
    d, engine = browser, server.engine
    d.get(server.url + "/")
    assert "SmolLM2-135M-Instruct" in d.title
    max_tokens = d.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("40")

    _send(d, "What is the capital of France?")   # no API key yet: the server's 401 message is shown
    WebDriverWait(d, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
    assert "API key" in d.find_element(By.CSS_SELECTOR, ".msg.error").text
    d.find_element(By.ID, "api-key").send_keys("page-key")

    seen = set()                                  # the answer's text as it grows: it streams
    _send(d, "What is the capital of France?")
    stats = WebDriverWait(d, 120, poll_frequency=0.02).until(
        lambda d: (seen.add(_answers(d)[0].find_element(By.CLASS_NAME, "text").text) if _answers(d) else None)
        or d.find_elements(By.CSS_SELECTOR, ".msg.assistant .stats[data-tokens-per-s]"))
    first = _answers(d)[0].find_element(By.CLASS_NAME, "text").text
    assert "Paris" in first and len(seen - {"", first}) >= 1
    assert float(stats[0].get_attribute("data-tokens-per-s")) > 0
    assert float(stats[0].get_attribute("data-tokens-per-step")) >= 1
    assert "tokens/s" in stats[0].text and "tokens/step" in stats[0].text
    first_prompt = engine.reports[-1].prompt_tokens

    _send(d, "And of Germany?")                   # the second turn carries the first in its history
    WebDriverWait(d, 120).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".stats[data-tokens-per-s]")) == 2)
    _screenshot(d, "chat_page.png")
    assert len(_answers(d)) == 2 and _answers(d)[1].find_element(By.CLASS_NAME, "text").text
    assert engine.reports[-1].prompt_tokens > first_prompt + engine.reports[-2].new_tokens
    assert len(d.find_elements(By.CSS_SELECTOR, ".msg.user")) == 3

    d.find_element(By.ID, "reset").click()       # a new chat clears the page and the history
    assert not _answers(d) and not d.find_elements(By.CSS_SELECTOR, ".msg.user")


def test_stop_button_cancels_the_generation(server, browser):
    d, engine = browser, server.engine
    d.get(server.url + "/")
    d.find_element(By.ID, "api-key").send_keys("page-key")
    max_tokens = d.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("400")
    _send(d, "Write a long essay about the history of Rome.")
    WebDriverWait(d, 60, poll_frequency=0.02).until(
        lambda d: _answers(d) and len(_answers(d)[0].find_element(By.CLASS_NAME, "text").text) > 20)
    d.find_element(By.ID, "stop").click()
    WebDriverWait(d, 30).until(lambda d: "(stopped)" in _answers(d)[0].text)
    deadline = time.monotonic() + 30
    while engine.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    report = engine.reports[-1]
    assert report.cancelled and report.new_tokens < 400
    assert d.find_element(By.ID, "send").is_enabled()
