"""`qwen-vl web`: the Gradio demo in a real headless Chromium, driven by Playwright."""

import io
import os
import shutil

import pytest
from PIL import Image

from tests.serving_repo import QUESTION, build_repo, cli_server, scene

BOX_COLOR = (230, 25, 75)  # draw_grounding's first colour
# How long each expectation waits: a loaded CI machine can take more than Playwright's 5 s default to answer.
WAIT_MS = 60_000


def chromium() -> str:
    """The browser: $QWEN_VL_CHROMIUM or Debian's `chromium`. Missing, the test fails (it is never skipped)."""
    path = os.environ.get("QWEN_VL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "No Chromium browser found: the web demo is tested in a real browser. Install it (`apt-get install -y "
            "chromium` on Debian, as .ci/run does) or point QWEN_VL_CHROMIUM at a Chromium executable."
        )
    return path


@pytest.fixture(scope="module")
def web_url(tmp_path_factory, tiny_vocab_file):
    repo = build_repo(tmp_path_factory.mktemp("web") / "repo", tiny_vocab_file)
    with cli_server("web", repo, "--max-new-tokens", "48") as url:
        yield url + "/"


def test_web_demo_in_headless_chromium(web_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    image_path = tmp_path / "scene.png"
    scene((240, 160)).save(image_path)
    answer_text = "<ref>the red square</ref><box>(250,250),(750,750)</box>"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 1000})
            page.set_default_timeout(WAIT_MS)
            page.goto(web_url)
            chatbot = page.locator("#chatbot")
            page.locator("input[type=file]").set_input_files(str(image_path))
            # The uploaded image is shown in the chat.
            expect(chatbot.locator("img[src*='/file=']")).to_have_count(1, timeout=WAIT_MS)

            page.locator("#query textarea").fill(QUESTION)
            page.locator("#submit").click()
            expect(chatbot).to_contain_text(answer_text, timeout=WAIT_MS)
            images = chatbot.locator("img[src*='/file=']")
            expect(images).to_have_count(2, timeout=WAIT_MS)  # the upload and the drawn grounding image
            drawn_src = images.nth(1).get_attribute("src")
            drawn = Image.open(io.BytesIO(page.request.get(drawn_src).body())).convert("RGB")
            assert drawn.size == (240, 160)
            assert drawn.getpixel((60, 80)) == BOX_COLOR and drawn.getpixel((180, 100)) == BOX_COLOR  # the box edges
            page.screenshot(path=str(tmp_path / "web_demo.png"), full_page=True)
            if os.environ.get("QWEN_VL_WEB_SCREENSHOT"):
                page.screenshot(path=os.environ["QWEN_VL_WEB_SCREENSHOT"], full_page=True)

            page.locator("#regenerate").click()  # the same greedy answer again, still once
            expect(chatbot.locator("img[src*='/file=']")).to_have_count(2, timeout=WAIT_MS)
            expect(chatbot).to_contain_text(answer_text, timeout=WAIT_MS)
            page.locator("#query textarea").fill("hello world")  # a second turn
            page.locator("#submit").click()
            expect(chatbot).to_contain_text("hello world", timeout=WAIT_MS)
            page.locator("#clear").click()
            expect(chatbot.locator("img[src*='/file=']")).to_have_count(0, timeout=WAIT_MS)
            expect(chatbot).not_to_contain_text("the red square", timeout=WAIT_MS)
        finally:
            browser.close()
    assert (tmp_path / "web_demo.png").stat().st_size > 10_000
