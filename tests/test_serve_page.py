"""The page of ``python -m gpt.serve`` in a real headless browser (Debian's chromium driven by
Selenium through chromedriver): upload a checkpoint, see its config, generate and watch the
text stream in, stop it, upload a bad file and see the error. Skips where chromium, chromedriver
or Selenium is missing (apt-get install chromium chromium-driver; pip install selenium)."""
from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

from bench.serve_load import Server, get_json
from test_checkpoint import training_checkpoint

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("starlette") is None or importlib.util.find_spec("uvicorn") is None,
                       reason='the serve extra is not installed (pip install -e ".[serve]")'),
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="no chromium/chromedriver (Debian: apt-get install chromium chromium-driver)"),
    pytest.mark.skipif(importlib.util.find_spec("selenium") is None, reason="selenium is not installed"),
]
WAIT_S = 60  # bound on waiting for the page; never a timing check


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,760"):
        options.add_argument(arg)
    # the driver from the same Debian package: Selenium Manager never downloads one
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def wait_for(driver, condition, what):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(lambda d: condition(), message=what)


def text_of(driver, element_id):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, element_id).text


def test_upload_generate_stream_stop_and_a_bad_file(browser, tmp_path):
    from selenium.webdriver.common.by import By

    good = training_checkpoint(tmp_path / "ckpt.safetensors")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(good.read_bytes()[:-100])
    find = lambda element_id: browser.find_element(By.ID, element_id)  # noqa: E731
    with Server("--max-tokens", 1_000_000) as server:
        browser.get(server.url + "/")
        wait_for(browser, lambda: "No model loaded" in text_of(browser, "model-status"), "the page says no model")

        find("file").send_keys(str(good))  # choose the file: the page uploads it
        wait_for(browser, lambda: text_of(browser, "model-status") == "Loaded ckpt.safetensors", "the upload")
        info, config = text_of(browser, "model-info"), text_of(browser, "model-config")
        assert "parameters 1,208" in info and "char, 24 tokens" in info, info
        assert "n_embd 8" in config and "block_size 16" in config, config

        prompt = find("prompt")
        prompt.clear()
        prompt.send_keys("the king")
        find("max-tokens").clear()
        find("max-tokens").send_keys("1000000")
        find("generate").click()
        # text appears while the request is still generating (Stop enabled): it streams
        wait_for(browser, lambda: len(text_of(browser, "completion")) >= 20, "streamed text")
        assert find("stop").is_enabled() and text_of(browser, "gen-status") == "Generating…"
        find("stop").click()
        wait_for(browser, lambda: text_of(browser, "gen-status") == "Stopped.", "the stop")
        wait_for(browser, lambda: get_json(server.url, "/health")[1]["active"] == 0, "the server to stop generating")

        find("max-tokens").clear()
        find("max-tokens").send_keys("25")
        find("seed").send_keys("5")
        find("generate").click()
        wait_for(browser, lambda: text_of(browser, "gen-status").startswith("Done"), "a whole completion")
        assert len(find("completion").get_property("textContent")) == 25
        assert text_of(browser, "output").startswith("the king")
        if os.environ.get("GPT_SERVE_SCREENSHOT"):  # the README's picture (see README: the inference portal)
            browser.save_screenshot(os.environ["GPT_SERVE_SCREENSHOT"])

        prompt.clear()
        prompt.send_keys("Zebra")  # not in the char vocabulary: the server's message shows
        find("generate").click()
        wait_for(browser, lambda: "not in this char tokenizer" in text_of(browser, "gen-status"), "the prompt error")
        assert "error" in find("gen-status").get_attribute("class")

        find("file").send_keys(str(bad))
        wait_for(browser, lambda: "not a valid tinytensor checkpoint" in text_of(browser, "model-status"),
                 "the bad file's message")
        assert "error" in find("model-status").get_attribute("class")
        assert get_json(server.url, "/v1/models")[1]["data"][0]["id"] == "ckpt.safetensors"  # still serving
