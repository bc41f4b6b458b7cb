"""The web page in a real browser: Playwright drives Debian's Chromium (headless) against a real
`captrt serve` on loopback with the demo-sized model. Two servers: one open, one with an API key."""

from __future__ import annotations

import base64
import io
import math

import httpx
import numpy as np
import pytest
from PIL import Image

from captrt.bench.browser import CHROMIUM, launch_chromium
from captrt.runtime import Captioner
from tests.serve.conftest import API_KEY
from tests.serve.server_process import ServerProcess

BEAM = 3
HYPOTHESES = 3  # the n-best list the first test asks for (<= BEAM)
# The attention canvas: how many pixels are drawn (alpha > 0), and the RGBA at each (x, y) fraction.
READ_CANVAS = """(canvas, points) => {
  const {width, height, data} = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  let drawn = 0, maxAlpha = 0;
  for (let i = 3; i < data.length; i += 4) { if (data[i] > 0) drawn++; maxAlpha = Math.max(maxAlpha, data[i]); }
  const at = ([fx, fy]) => { const i = 4 * (Math.floor(fy * height) * width + Math.floor(fx * width));
                              return Array.from(data.slice(i, i + 4)); };
  return {width, height, drawn, maxAlpha, samples: points.map(at)};
}"""
# Before the page's script: records the text fields of every FormData the page sends (window.sentFields).
RECORD_FIELDS = """(() => {
  const fetch = window.fetch;
  window.sentFields = [];
  window.fetch = (url, init) => {
    if (init?.body instanceof FormData) window.sentFields.push([...init.body].filter(([, v]) => typeof v === "string"));
    return fetch(url, init);
  };
})();"""
# Files dropped on the drop zone or pasted into the page: [kind, [[name, base64], ...]].
GIVE_FILES = """([kind, files]) => {
  const data = new DataTransfer();
  for (const [name, b64] of files) data.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name));
  const event = kind === "drop" ? new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true})
                                : new ClipboardEvent("paste", {clipboardData: data, bubbles: true, cancelable: true});
  document.querySelector(".drop").dispatchEvent(event);
}"""


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium "
                    "(apt-get install chromium; `make install` does it when run as root)")
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: it is in the dev extra (`make install`)")
    with sync_playwright() as pw:
        try:
            chromium = launch_chromium(pw)
        except Error as exc:
            pytest.fail(f"cannot start {CHROMIUM}: {exc}")
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh tab; `page.seen` lists every URL it requested, `page.problems` its console errors about the
    CSP and its uncaught exceptions."""
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    tab.seen, tab.problems = [], []

    def console(message) -> None:
        if "Content Security Policy" in message.text:
            tab.problems.append(message.text)

    tab.on("request", lambda request: tab.seen.append(request.url))
    tab.on("console", console)
    tab.on("pageerror", lambda error: tab.problems.append(str(error)))
    yield tab
    context.close()


@pytest.fixture(scope="module")
def ui_server(serve_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("ui") / "server.log"
    with ServerProcess(serve_model_dir, "--max-body-mb", "1", log=log) as srv:
        yield srv


def _api_caption(url: str, name: str, data: bytes, headers: dict[str, str] | None = None,
                 **params: str) -> httpx.Response:
    return httpx.post(url + "/v1/captions", files=[("image", (name, data, "application/octet-stream"))],
                      params={"beam_size": str(BEAM), "attention": "true", **params}, headers=headers, timeout=60)


def test_caption_attention_and_controls(ui_server, page, jpegs, serve_model_dir, tmp_path):
    """Beam size and the n-best list from the form, each word's confidence, the attention maps, the
    keyboard, the layout; then a suppressed word the model does not know: the API's 422 on the card."""
    from playwright.sync_api import expect

    files = [tmp_path / "scene0.jpg", tmp_path / "scene1.jpg", tmp_path / "scene2.jpg"]
    for path, data in zip(files, jpegs):
        path.write_bytes(data)
    with Captioner.load(serve_model_dir) as cap:
        library = cap.caption(jpegs[:2], beam_size=BEAM, num_hypotheses=HYPOTHESES, return_scores=True)
        assert [c.text for c in library] == [c.text for c in cap.caption(jpegs[:2], beam_size=BEAM)]
    expected = [c.text for c in library]
    info = httpx.get(ui_server.url + "/v1/model").json()
    page.add_init_script(RECORD_FIELDS)

    page.goto(ui_server.url + "/")
    model = page.get_by_test_id("model")
    for text in (info["id"], "ort", "fp32", "yes"):
        expect(model).to_contain_text(text)
    beam = page.get_by_label("Beam size")
    expect(beam).to_have_attribute("max", str(info["max_beam"]))
    beam.fill(str(BEAM))
    alternatives = page.get_by_label("Number of alternatives")
    expect(alternatives).to_have_value("1")
    expect(page.get_by_label("Min length")).to_have_value("0")
    alternatives.fill(str(HYPOTHESES))
    page.get_by_test_id("file").set_input_files(files[:2])
    for i, text in enumerate(expected):
        expect(page.get_by_test_id("caption").nth(i)).to_have_text(text)
        expect(page.locator("img").nth(i)).to_have_attribute("alt", text)
    # Only what differs from the API's defaults is sent, and return_scores always (for the confidences).
    sent = page.evaluate("() => window.sentFields")
    assert sent == [[["beam_size", str(BEAM)], ["num_hypotheses", str(HYPOTHESES)], ["attention", "true"],
                     ["return_scores", "true"]]] * 2, sent

    # The n-best list: the library's hypotheses in order, each with its score; each word's confidence is
    # its probability, exp(token score), to 2 decimals, in words too; below 0.5 it is flagged.
    for i, result in enumerate(library):
        card = page.locator(".result").nth(i)
        items = card.get_by_test_id("hypothesis")
        expect(items).to_have_count(HYPOTHESES)
        assert [items.nth(k).locator(".hyp-caption").text_content() for k in range(HYPOTHESES)] == \
            [h.text for h in result.hypotheses]
        assert [items.nth(k).locator(".hyp-score").text_content() for k in range(HYPOTHESES)] == \
            [f"{h.score:.2f}" for h in result.hypotheses]
        buttons = card.get_by_test_id("word")
        marks = buttons.evaluate_all("bs => bs.map(b => [b.dataset.confidence, b.getAttribute('aria-label'),"
                                     " b.classList.contains('unsure')])")
        assert len(marks) == len(result.tokens) and len(result.token_scores) == len(result.tokens) + 1
        for word, logp, (value, label, unsure) in zip(result.text.split(), result.token_scores, marks):
            p = round(math.exp(logp), 2)
            assert float(value) == p, (word, logp, value)
            assert label.startswith(f"{word}, confidence {value}") and unsure == (p < 0.5), (word, label)

    # Focusing a word draws that word's map (from the API, upsampled) over the image.
    words = page.get_by_test_id("caption").nth(0).get_by_test_id("word")
    assert words.count() == len(expected[0].split()) >= 2
    canvas = page.get_by_test_id("attention").nth(0)
    assert canvas.evaluate(READ_CANVAS, [])["drawn"] == 0
    maps = np.array(_api_caption(ui_server.url, "scene0.jpg", jpegs[0]).json()["captions"][0]["attention"])
    grid = maps.shape[-1]
    centres = [[(c + 0.5) / grid, (r + 0.5) / grid] for r in range(grid) for c in range(grid)]
    for i in (0, 1):
        words.nth(i).focus()
        drawn = canvas.evaluate(READ_CANVAS, centres)
        assert drawn["drawn"] == drawn["width"] * drawn["height"] > 0
        assert abs(drawn["maxAlpha"] - 0.6 * 255) <= 2  # the default opacity, 60%
        greys = np.array([s[0] for s in drawn["samples"]], float)
        m = maps[i].ravel()
        # word i's own map, min-max scaled to grey, smoothly upsampled (which blurs the cell centres a little;
        # another word's map of this image is off by about 18 levels)
        assert np.abs(greys - 255 * (m - m.min()) / (m.max() - m.min())).mean() < 10, i

    opacity = page.get_by_label("Attention opacity")
    opacity.press("End")
    assert canvas.evaluate(READ_CANVAS, [])["maxAlpha"] == 255
    for _ in range(8):
        opacity.press("ArrowLeft")  # back to 60%, by keyboard

    # Keyboard only: the words and the play control are reachable by Tab.
    play = page.get_by_role("button", name="Play").nth(0)
    play.focus()
    page.keyboard.press("Shift+Tab")
    expect(words.last).to_be_focused()
    expect(words.last).to_have_attribute("aria-pressed", "true")
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    expect(words.nth(0)).to_have_attribute("aria-pressed", "true")
    expect(words.nth(1)).to_have_attribute("aria-pressed", "true")  # the play control steps on
    page.keyboard.press("Enter")
    expect(play).to_have_text("Play")

    unlabelled = page.evaluate("() => [...document.querySelectorAll('input')].filter(i => !i.labels.length).length")
    assert unlabelled == 0
    words.nth(1).hover()
    page.screenshot(path=str(tmp_path / "serve-ui.png"), full_page=True)
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: one column, nothing wider than the screen
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")
    page.screenshot(path=str(tmp_path / "serve-ui-phone.png"), full_page=True)

    # A suppressed word the model does not know: the API's 422, which names the field, on that image's card.
    refusal = _api_caption(ui_server.url, "scene2.jpg", jpegs[2], num_hypotheses=str(HYPOTHESES), suppress="zebra",
                           return_scores="true")
    assert refusal.status_code == 422 and "suppress" in refusal.json()["detail"], refusal.text
    page.get_by_label("Suppressed words").fill("zebra")
    page.get_by_test_id("file").set_input_files(files[2])
    expect(page.get_by_test_id("error").nth(2)).to_have_text(refusal.json()["detail"])
    expect(page.locator(".result").nth(2).get_by_test_id("word")).to_have_count(0)
    assert page.problems == []
    assert all(u.startswith((ui_server.url + "/", "blob:", "data:")) for u in page.seen), page.seen


def test_refused_files_show_the_api_error(ui_server, page):
    """An unreadable file and one over --max-body-mb (dropped), one of a format off the allow-list
    (pasted): each card shows the API's own message."""
    from playwright.sync_api import expect

    gif = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(gif, format="GIF")
    bad = {"notes.txt": b"not an image at all", "huge.jpg": b"\xff\xd8" + bytes(1_200_000), "red.gif": gif.getvalue()}
    encoded = [[name, base64.b64encode(data).decode()] for name, data in bad.items()]
    messages = []
    for name, data in bad.items():
        r = _api_caption(ui_server.url, name, data)
        assert r.status_code in (400, 413, 415), r.text
        messages.append(r.json()["detail"])
    assert len(set(messages)) == 3

    page.goto(ui_server.url + "/")
    page.evaluate(GIVE_FILES, ["drop", encoded[:2]])
    page.evaluate(GIVE_FILES, ["paste", encoded[2:]])
    for i, message in enumerate(messages):
        expect(page.get_by_test_id("error").nth(i)).to_have_text(message)
    assert page.get_by_test_id("word").count() == 0
    assert page.problems == []


def test_api_key_is_asked_for_and_kept_in_the_tab(serve_model_dir, page, jpegs, tmp_path):
    from playwright.sync_api import expect

    image = tmp_path / "scene.jpg"
    image.write_bytes(jpegs[2])
    with ServerProcess(serve_model_dir, "--api-key-env", "CAPTRT_UI_KEY", env={"CAPTRT_UI_KEY": API_KEY},
                       log=tmp_path / "server.log") as srv:
        refusal = httpx.get(srv.url + "/v1/model").json()["detail"]
        expected = _api_caption(srv.url, "scene.jpg", jpegs[2], {"X-API-Key": API_KEY}).json()["captions"][0]
        headers = []  # the Authorization header of each API request, in order
        page.on("request", lambda r: headers.append(r.headers.get("authorization")) if "/v1/" in r.url else None)
        page.goto(srv.url + "/")
        key_form = page.get_by_test_id("key-form")
        expect(key_form).to_be_visible()
        expect(key_form).to_contain_text(refusal)
        expect(page.get_by_test_id("model")).to_contain_text("not available")
        page.get_by_test_id("file").set_input_files(image)  # without the key: the API's 401, in words
        expect(page.get_by_test_id("error")).to_have_text(refusal)

        page.get_by_label("API key").fill("wrong-key")
        page.get_by_role("button", name="Use this key").click()
        expect(key_form).to_be_visible()  # the 401 asks again
        assert page.evaluate("() => sessionStorage.getItem('captrt.apiKey')") is None

        page.get_by_label("API key").fill(API_KEY)
        page.get_by_role("button", name="Use this key").click()
        expect(page.get_by_test_id("model")).to_contain_text("fp32")
        expect(key_form).to_be_hidden()
        page.get_by_label("Beam size").fill(str(BEAM))
        page.get_by_test_id("file").set_input_files(image)
        expect(page.get_by_test_id("caption").nth(1)).to_have_text(expected["caption"])
        assert page.evaluate("() => sessionStorage.getItem('captrt.apiKey')") == API_KEY
        assert page.context.cookies() == [] and API_KEY not in page.url
        assert headers[-1] == f"Bearer {API_KEY}" and headers[0] is None
        assert all(API_KEY not in u for u in page.seen)
        assert page.problems == []
