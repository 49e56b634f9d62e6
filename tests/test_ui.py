"""The review app in a real browser: Playwright for Python driving Debian's headless Chromium.

Screenshots go to $IMGCLF_TEST_ARTIFACTS (default: the test's tmp_path). CI installs the browser with
``.ci/install-browser``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import test_ui_api
from helpers import CHROMIUM, CHROMIUM_ARGS, draw_image, make_folder
from test_ui_api import Server, sha_map, wait_analysis

from imgclf.config import Config
from imgclf.ui.app import create_app
from imgclf.ui.labels import RelabelJournal

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing (install it with .ci/install-browser)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (run .ci/install-browser)")


review_data = test_ui_api.review_data  # the session fixture: data and tiny run shared with the API tests


@pytest.fixture(scope="module")
def site(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path]]:
    data, run, cfg = request.getfixturevalue("review_data")
    with Server(create_app(data, run, cfg)) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        wait_analysis(client)  # scores of a fixed file set: the tests move files
        yield server.url, data


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(autouse=True)
def no_move_left(review_data: tuple[Path, Path, Config]) -> Iterator[None]:
    """Each test undoes its moves; one that fails half-way leaves none to the next either."""
    yield
    RelabelJournal(review_data[0]).undo(everything=True)


@contextlib.contextmanager
def open_page(
    browser: object, url: str, width: int = 1280, height: int = 900, script: str | None = None
) -> Iterator[object]:
    """The app's page at ``url`` (``script`` run first); no script error, nor a request for /favicon.ico (a 404
    in the console)."""
    context = browser.new_context(viewport={"width": width, "height": height})  # type: ignore[attr-defined]
    if script:
        context.add_init_script(script)
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.location.get("url", "").endswith("/favicon.ico") else None)
    pg.goto(url + "/")
    yield pg
    context.close()
    assert not errors, errors


@pytest.fixture
def page(browser: object, site: tuple[str, Path]) -> Iterator[object]:
    with open_page(browser, site[0]) as pg:
        yield pg


def moves(url: str) -> list[tuple[str, str]]:
    """The moves not undone, oldest first (from, to)."""
    return [(m["from"], m["to"]) for m in reversed(httpx.get(url + "/api/journal").json()["items"])]


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    out = Path(os.environ.get("IMGCLF_TEST_ARTIFACTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_browse_zoom_relabel_undo(page: object, site: tuple[str, Path], artifacts: Path) -> None:
    pg, (_, data) = page, site
    expect = sync_api.expect
    before = sha_map(data)
    cards = pg.locator("#browse-grid .card")
    expect(cards).to_have_count(12)
    expect(pg.locator('#class-list button[data-label="circles"]')).to_have_text("circles (12)")
    pg.wait_for_function(
        "[...document.querySelectorAll('#browse-grid img')].slice(0, 6).every(i => i.naturalWidth > 0)"
    )
    pg.screenshot(path=str(artifacts / "ui-browse.png"), full_page=False)

    pg.locator('.card[data-path="circles/circles_01.jpg"] img').click()
    expect(pg.locator("#zoom")).to_be_visible()
    pg.wait_for_function("document.querySelector('#zoom-img').naturalWidth > 0")
    pg.keyboard.press("Escape")
    expect(pg.locator("#zoom")).to_be_hidden()

    pg.locator('.card[data-path="circles/circles_01.jpg"] button[data-label="stripes"]').click()
    expect(pg.locator("#toast")).to_contain_text("circles/circles_01.jpg → stripes/circles_01.jpg")
    expect(cards).to_have_count(11)
    assert (data / "stripes" / "circles_01.jpg").is_file()
    pg.locator("#undo-last").click()
    expect(pg.locator("#toast")).to_contain_text("undone")
    expect(cards).to_have_count(12)
    assert sha_map(data) == before


def wait_shown(pg: object, selector: str, width: int) -> None:
    """Wait until the image ``selector`` picks has loaded a picture ``width`` pixels wide."""
    pg.wait_for_function(  # type: ignore[attr-defined]
        "([sel, w]) => { const i = document.querySelector(sel); return !!i && i.complete && i.naturalWidth === w; }",
        arg=[selector, width],
    )


def test_a_replaced_image_shows_its_new_picture(page: object, site: tuple[str, Path]) -> None:
    """The thumbnail and the zoom of a path whose file was replaced since they were shown (a file swapped by
    hand, a relabel and undo) show the new picture, not the one the browser holds for the old URL."""
    pg, (_, data) = page, site
    path = "circles/circles_02.jpg"
    card_img, f = f'.card[data-path="{path}"] img', data / path
    wait_shown(pg, card_img, 96)
    pg.locator(card_img).click()
    wait_shown(pg, "#zoom-img", 96)
    pg.keyboard.press("Escape")
    original = f.read_bytes()
    try:
        draw_image("squares", np.random.default_rng(5), size=48).resize((48, 24)).save(f)
        pg.locator('#class-list button[data-label="circles"]').click()  # lists the class anew
        wait_shown(pg, card_img, 48)
        pg.locator(card_img).click()
        wait_shown(pg, "#zoom-img", 48)
    finally:
        f.write_bytes(original)


def test_a_double_click_on_undo_last_undoes_one_move(page: object, site: tuple[str, Path]) -> None:
    pg, url, expect = page, site[0], sync_api.expect
    expect(pg.locator("#browse-grid .card")).to_have_count(12)
    for i in (6, 7):
        httpx.post(url + "/api/relabel", json={"path": f"circles/circles_{i:02d}.jpg", "label": "squares"})
    pg.locator("#undo-last").dblclick()
    expect(pg.locator("#toast")).to_contain_text("undone: squares/circles_07.jpg → circles/circles_07.jpg")
    expect(pg.locator("#undo-last")).to_be_enabled()
    pg.wait_for_timeout(500)  # a second undo, had one been sent, has come back by now
    assert moves(url) == [("circles/circles_06.jpg", "squares/circles_06.jpg")]


def test_a_move_that_fails_shows_why_and_refreshes_the_page(page: object, site: tuple[str, Path]) -> None:
    """An image moved since the page was drawn (another tab, another request): the error is shown and the page
    shows where the images are now, not its stale cards and counts."""
    pg, url, expect = page, site[0], sync_api.expect
    cards = pg.locator("#browse-grid .card")
    expect(cards).to_have_count(12)
    httpx.post(url + "/api/relabel", json={"path": "circles/circles_04.jpg", "label": "squares"})
    pg.locator('.card[data-path="circles/circles_04.jpg"] button[data-label="stripes"]').click()
    expect(cards).to_have_count(11)
    expect(pg.locator('#class-list button[data-label="squares"]')).to_have_text("squares (13)")
    expect(pg.locator("#toast")).to_have_class("show error")
    expect(pg.locator("#toast")).to_contain_text("circles/circles_04.jpg")
    expect(pg.locator("#toast")).to_contain_text("the page is refreshed")
    assert moves(url) == [("circles/circles_04.jpg", "squares/circles_04.jpg")]


def test_results_filter_and_confusion_cell(page: object, artifacts: Path) -> None:
    pg, expect = page, sync_api.expect
    pg.locator('#tabs button[data-tab="results"]').click()
    cells = pg.locator("#confusion td")
    expect(cells).to_have_count(9)
    grid = pg.locator("#results-grid .card")
    total = sum(int(t) for t in cells.all_inner_texts())
    expect(grid).to_have_count(total)
    pg.select_option("#res-outcome", "wrong")
    n_wrong = sum(int(cells.nth(i).inner_text()) for i in range(9) if i % 4)  # off-diagonal cells
    expect(grid).to_have_count(n_wrong)
    expect(pg.locator("#results-grid .card.right")).to_have_count(0)
    pg.select_option("#res-outcome", "right")
    expect(grid).to_have_count(total - n_wrong)
    expect(pg.locator("#results-grid .card.wrong")).to_have_count(0)

    cell = pg.locator('#confusion td[data-true="squares"][data-pred="squares"]')
    n = int(cell.inner_text())
    cell.click()
    expect(grid).to_have_count(n)
    expect(pg.locator("#res-true")).to_have_value("squares")
    expect(pg.locator("#res-outcome")).to_have_value("all")
    expect(pg.locator("#results-grid .bars").first).to_be_visible()
    pg.screenshot(path=str(artifacts / "ui-results.png"), full_page=False)


def test_a_tab_clicked_before_the_classes_came_waits_for_them(browser: object, site: tuple[str, Path]) -> None:
    late_info = """const realFetch = window.fetch;
      window.fetch = async (url, ...rest) => {
        if (String(url).startsWith("/api/info")) await new Promise((done) => setTimeout(done, 800));
        return realFetch(url, ...rest);
      };"""
    with open_page(browser, site[0], script=late_info) as pg:
        pg.locator('#tabs button[data-tab="results"]').click()
        sync_api.expect(pg.locator("#confusion td")).to_have_count(9)


def test_a_tab_clicked_lists_the_classes_anew(page: object, site: tuple[str, Path]) -> None:
    """A class folder made or removed outside the app: clicking a tab (or coming back to the page) showed the
    classes of the page's start (no button for the new one; the removed one's answered "unknown class")."""
    pg, (_, data), expect = page, site, sync_api.expect
    chip, card_buttons = '#class-list button[data-label="dots"]', '#browse-grid button[data-label="dots"]'
    expect(pg.locator("#browse-grid .card")).to_have_count(12)
    try:
        (data / "dots").mkdir()
        pg.locator('#tabs button[data-tab="browse"]').click()
        expect(pg.locator(chip)).to_have_text("dots (0)")
        expect(pg.locator(card_buttons)).to_have_count(12)
        (data / "dots").rmdir()
        pg.locator('#tabs button[data-tab="browse"]').click()
        expect(pg.locator(chip)).to_have_count(0)
        expect(pg.locator(card_buttons)).to_have_count(0)
        (data / "dots").mkdir()
        pg.evaluate("document.dispatchEvent(new Event('visibilitychange'))")  # back from another window
        expect(pg.locator(chip)).to_have_text("dots (0)")
        expect(pg.locator(card_buttons)).to_have_count(12)
    finally:
        with contextlib.suppress(FileNotFoundError):
            (data / "dots").rmdir()


def test_label_errors_and_keyboard_labelling(page: object, site: tuple[str, Path], artifacts: Path) -> None:
    pg, (_, data), expect = page, site, sync_api.expect
    before = sha_map(data)
    pg.locator('#tabs button[data-tab="suspects"]').click()
    expect(pg.locator("#suspects-grid .card")).to_have_count(36)
    expect(pg.locator("#suspects-grid .card .labels").first).to_contain_text("#1 labelled")
    pg.screenshot(path=str(artifacts / "ui-suspects.png"), full_page=False)

    pg.locator('#tabs button[data-tab="unlabeled"]').click()
    queue = pg.locator("#unlabeled-grid .card")
    expect(queue).to_have_count(4)
    first = queue.first.get_attribute("data-path")
    expect(queue.first).to_have_class("card current")
    pg.keyboard.press("2")  # 2 = squares
    expect(queue).to_have_count(3)
    assert (data / "squares" / Path(first).name).is_file()
    pg.once("dialog", lambda d: d.accept())
    pg.locator("#undo-all").click()
    expect(queue).to_have_count(4)
    assert sha_map(data) == before


def test_undo_all_asks_first_and_sums_up(page: object, site: tuple[str, Path]) -> None:
    """Undo all names how many moves it reverts and waits for a yes; its toast is a count and a few names."""
    pg, (url, data), expect = page, site, sync_api.expect
    before = sha_map(data)
    expect(pg.locator("#browse-grid .card")).to_have_count(12)
    for i in range(5):
        httpx.post(url + "/api/relabel", json={"path": f"circles/circles_{i:02d}.jpg", "label": "squares"})
    pg.once("dialog", lambda d: d.dismiss())  # answered at once: the click waits while a dialog is open
    with pg.expect_event("dialog", timeout=5_000) as asked:
        pg.locator("#undo-all").click()
    assert "5 moves" in asked.value.message
    pg.wait_for_timeout(300)
    assert len(moves(url)) == 5  # "no": nothing moved back
    pg.once("dialog", lambda d: d.accept())
    pg.locator("#undo-all").click()
    toast = pg.locator("#toast")
    expect(toast).to_contain_text("undone 5 moves")
    expect(toast).to_contain_text("and 2 more")
    assert len(toast.inner_text()) < 150
    assert moves(url) == [] and sha_map(data) == before


def test_results_fit_a_narrow_screen(browser: object, site: tuple[str, Path]) -> None:
    with open_page(browser, site[0], 375, 740) as pg:
        pg.locator('#tabs button[data-tab="results"]').click()
        sync_api.expect(pg.locator("#results-grid .card").first).to_be_visible()
        assert pg.evaluate("document.documentElement.scrollWidth") <= 375


def test_arrow_keys_scroll_the_highlight_into_view(browser: object, site: tuple[str, Path]) -> None:
    with open_page(browser, site[0], 420, 600) as pg:  # one card a row: the last ones are below the fold
        pg.locator('#tabs button[data-tab="unlabeled"]').click()
        queue = pg.locator("#unlabeled-grid .card")
        sync_api.expect(queue).to_have_count(4)
        sync_api.expect(queue.last).not_to_be_in_viewport()
        for _ in range(3):
            pg.keyboard.press("ArrowRight")
        sync_api.expect(queue.last).to_have_class("card current")
        sync_api.expect(queue.last).to_be_in_viewport()


def test_a_digit_moves_the_zoomed_image_and_closes_the_zoom(page: object, site: tuple[str, Path]) -> None:
    pg, (url, data), expect = page, site, sync_api.expect
    before = sha_map(data)
    pg.locator('#tabs button[data-tab="unlabeled"]').click()
    card = pg.locator("#unlabeled-grid .card").nth(1)
    path = card.get_attribute("data-path")
    card.locator("img").click()
    expect(pg.locator("#zoom")).to_be_visible()
    pg.keyboard.press("1")  # 1 = circles
    expect(pg.locator("#zoom")).to_be_hidden()
    assert moves(url) == [(path, f"circles/{Path(path).name}")]
    httpx.post(url + "/api/undo", json={})
    assert sha_map(data) == before


def test_quick_digit_keys_label_one_image_each(page: object, site: tuple[str, Path]) -> None:
    """Keys pressed before the previous move has refreshed the queue act on the images shown in turn."""
    pg, (url, data), expect = page, site, sync_api.expect
    before = sha_map(data)
    pg.locator('#tabs button[data-tab="unlabeled"]').click()
    queue = pg.locator("#unlabeled-grid .card")
    expect(queue).to_have_count(4)
    order = [c.get_attribute("data-path") for c in queue.all()]
    for key in "123":
        pg.keyboard.press(key)
    expect(queue).to_have_count(1, timeout=5_000)
    classes = ("circles", "squares", "stripes")
    assert moves(url) == [(p, f"{c}/{Path(p).name}") for p, c in zip(order[:3], classes, strict=True)]
    httpx.post(url + "/api/undo", json={"all": True})
    assert sha_map(data) == before


def test_without_analysis_the_tabs_say_so_and_keys_still_label(
    browser: object, review_data: tuple[Path, Path, Config]
) -> None:
    """`imgclf ui --no-analysis`: no endless "computing"; the unlabeled images are listed by name, keys label them."""
    data, run, cfg = review_data
    expect, before = sync_api.expect, sha_map(data)
    with Server(create_app(data, run, cfg, analyse_on_start=False)) as server, open_page(browser, server.url) as pg:
        expect(pg.locator("#status")).to_contain_text("off (--no-analysis)")
        pg.locator('#tabs button[data-tab="suspects"]').click()
        expect(pg.locator("#tab-suspects")).to_contain_text("started with --no-analysis")
        expect(pg.locator("#tab-suspects button", has_text="Compute scores")).to_be_visible()
        pg.locator('#tabs button[data-tab="unlabeled"]').click()
        expect(pg.locator("#tab-unlabeled")).to_contain_text("listed by name")
        queue = pg.locator("#unlabeled-grid .card")
        expect(queue).to_have_count(4)
        first = queue.first.get_attribute("data-path")
        assert first == "unlabeled/new_0.jpg"
        expect(queue.first).to_have_class("card current")
        pg.keyboard.press("2")  # 2 = squares
        expect(queue).to_have_count(3)
        assert moves(server.url) == [(first, "squares/new_0.jpg")]
        httpx.post(server.url + "/api/undo", json={})
        pg.locator('#tabs button[data-tab="suspects"]').click()
        pg.locator("#tab-suspects button", has_text="Compute scores").focus()
        pg.keyboard.press("Enter")  # the note and its button are drawn anew: the focus goes to the tab shown
        expect(pg.locator("#status")).to_contain_text("scores ready")
        wait_focus(pg, "Label errors")
    assert sha_map(data) == before


def test_unreadable_images_are_named_with_why(
    browser: object, review_data: tuple[Path, Path, Config], tmp_path: Path
) -> None:
    """A truncated JPEG: the status line counts it as skipped and says why; its thumbnail and zoom say why."""
    cfg = review_data[2]  # its cache folder holds the converted backbone: the analysis takes a second
    root = make_folder(tmp_path / "d", n=4)
    (root / "unlabeled").mkdir()
    draw_image("circles", np.random.default_rng(3)).save(root / "unlabeled" / "fine.jpg")
    (root / "unlabeled" / "broken.jpg").write_bytes((root / "unlabeled" / "fine.jpg").read_bytes()[:300])
    expect = sync_api.expect
    with Server(create_app(root, cfg=cfg)) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert wait_analysis(client)["n_skipped"] == 1
        with open_page(browser, server.url) as pg:
            status = pg.locator("#status")
            expect(status).to_contain_text("1 image skipped: cannot be read")
            expect(status).to_contain_text("unlabeled/broken.jpg: truncated or corrupt image data")
            pg.locator('#class-list button[data-label="unlabeled"]').click()
            broken = pg.locator('.card[data-path="unlabeled/broken.jpg"]')
            expect(broken.locator(".unshown")).to_contain_text(
                "cannot show unlabeled/broken.jpg: truncated or corrupt image data"
            )
            broken.locator(".unshown").click()
            expect(pg.locator("#zoom-error")).to_contain_text(
                "cannot show unlabeled/broken.jpg: truncated or corrupt image data"
            )
            expect(pg.locator("#zoom-img")).to_be_hidden()


def test_api_docs_render_offline(browser: object, site: tuple[str, Path]) -> None:
    """The OpenAPI page draws its operations with every request off this server refused."""
    base, expect = site[0], sync_api.expect
    context = browser.new_context()  # type: ignore[attr-defined]
    outside: list[str] = []

    def only_local(route: object) -> None:
        url = route.request.url  # type: ignore[attr-defined]
        if url.startswith(base):
            route.continue_()  # type: ignore[attr-defined]
        else:
            outside.append(url)
            route.abort()  # type: ignore[attr-defined]

    context.route("**/*", only_local)
    pg = context.new_page()
    pg.goto(base + "/api/docs")
    expect(pg.locator(".swagger-ui .info .title")).to_contain_text("imgclf review", timeout=15_000)
    expect(pg.locator(".opblock").first).to_be_visible()
    context.close()
    assert not outside, outside


def test_the_link_with_its_token_opens_the_app_in_a_browser(browser: object, tmp_path: Path) -> None:
    """`imgclf ui` prints a link with a token: the browser keeps it in a cookie, and the page, its thumbnails
    and its moves work; the address without it shows only how to get in."""
    root = make_folder(tmp_path / "d", classes=("a", "b"), n=2)
    expect = sync_api.expect
    with Server(create_app(root, analyse_on_start=False, token="tok-123")) as server:
        context = browser.new_context()  # type: ignore[attr-defined]
        pg = context.new_page()
        pg.set_default_timeout(15_000)
        pg.goto(server.url + "/")
        expect(pg.locator("body")).to_contain_text("printed when it started")
        pg.goto(server.url + "/?token=tok-123")
        assert pg.url == server.url + "/"  # the token left the address bar (and the history)
        expect(pg.locator('#class-list button[data-label="a"]')).to_have_text("a (2)")
        thumb = pg.locator("#browse-grid .card img").first
        expect(thumb).to_be_visible()
        pg.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle())
        context.close()
        context = browser.new_context()  # type: ignore[attr-defined]
        link = f'<a href="{server.url}/?token=tok-123">review</a>'  # on another site's page (a notebook, a chat)
        context.route("http://links.test/", lambda route: route.fulfill(body=link, content_type="text/html"))
        pg = context.new_page()
        pg.set_default_timeout(15_000)
        pg.goto("http://links.test/")
        pg.click("a")  # a SameSite=Strict cookie was not sent after it: 401
        expect(pg.locator('#class-list button[data-label="a"]')).to_have_text("a (2)")
        context.close()


FOCUSED = """(() => {
  const a = document.activeElement;
  if (a === document.body) return "BODY";
  return a.id || a.getAttribute('aria-label') || a.textContent.trim() || a.tagName;
})()"""


def focused(pg: object) -> str:
    """What has the keyboard focus: its id, else its accessible name (label or text), else its tag."""
    return pg.evaluate(FOCUSED)  # type: ignore[attr-defined]


def wait_focus(pg: object, name: str) -> None:
    """Wait until the element named ``name`` (as :func:`focused` names it) has the focus."""
    try:
        pg.wait_for_function(f"n => {FOCUSED} === n", arg=name, timeout=5_000)  # type: ignore[attr-defined]
    except sync_api.TimeoutError:
        raise AssertionError(f"the focus is on {focused(pg)!r}, not on {name!r}") from None


def test_the_zoom_is_a_dialog_for_the_keyboard(page: object, site: tuple[str, Path]) -> None:
    """A thumbnail opens the zoom by keyboard; the focus moves into it and stays there (Tab cannot reach the
    buttons behind it), its buttons move the zoomed image, and closing it gives the focus back."""
    pg, (url, data), expect = page, site, sync_api.expect
    before = sha_map(data)
    opener = pg.locator('.card[data-path="circles/circles_01.jpg"] button.thumb')
    opener.focus()
    pg.keyboard.press("Enter")
    expect(pg.locator("#zoom")).to_be_visible()
    wait_focus(pg, "zoom-close")
    names = []
    for _ in range(4):  # two move buttons and Close, round again
        pg.keyboard.press("Tab")
        names.append(focused(pg))
        assert pg.evaluate("document.querySelector('#zoom').contains(document.activeElement)"), names
    pg.keyboard.press("Escape")
    expect(pg.locator("#zoom")).to_be_hidden()
    wait_focus(pg, "Zoom circles/circles_01.jpg")

    pg.keyboard.press("Enter")
    pg.locator('#zoom-labels button[data-label="squares"]').focus()
    pg.keyboard.press("Enter")
    expect(pg.locator("#zoom")).to_be_hidden()
    expect(pg.locator("#browse-grid .card")).to_have_count(11)
    assert moves(url) == [("circles/circles_01.jpg", "squares/circles_01.jpg")]
    wait_focus(pg, "Zoom circles/circles_02.jpg")  # the card now in its place
    httpx.post(url + "/api/undo", json={})
    assert sha_map(data) == before


def test_the_focus_stays_in_place_when_lists_are_drawn_anew(page: object, site: tuple[str, Path]) -> None:
    """After a move, a class chosen or a confusion-matrix cell opened by keyboard, the focus is on the
    equivalent button of the new page, not lost to the page's body."""
    pg, (url, data), expect = page, site, sync_api.expect
    before = sha_map(data)
    pg.locator('.card[data-path="circles/circles_03.jpg"] button[data-label="stripes"]').focus()
    pg.keyboard.press("Enter")
    expect(pg.locator("#browse-grid .card")).to_have_count(11)
    wait_focus(pg, "3 stripes: move circles/circles_04.jpg to stripes")
    pg.locator('#class-list button[data-label="squares"]').focus()
    pg.keyboard.press("Enter")
    expect(pg.locator('#class-list button[data-label="squares"]')).to_have_attribute("aria-pressed", "true")
    wait_focus(pg, "squares (12)")

    pg.locator('#tabs button[data-tab="results"]').click()
    cell = pg.locator('#confusion button[data-true="squares"][data-pred="squares"]')
    n = int(cell.inner_text())
    cell.focus()
    pg.keyboard.press("Enter")
    expect(pg.locator("#res-true")).to_have_value("squares")
    expect(cell).to_have_attribute("aria-pressed", "true")
    wait_focus(pg, f"{n} images of squares predicted squares")
    expect(pg.locator("#results-grid .card .labels").first).to_contain_text("✓ right: squares → squares")
    httpx.post(url + "/api/undo", json={})
    assert sha_map(data) == before


def test_the_highlight_follows_the_keyboard_focus(page: object, site: tuple[str, Path]) -> None:
    """In the Unlabeled tab a digit labels the image whose button has the focus (the highlighted one), and the
    arrow keys move the focus with the highlight."""
    pg, (url, data), expect = page, site, sync_api.expect
    before = sha_map(data)
    pg.locator('#tabs button[data-tab="unlabeled"]').click()
    queue = pg.locator("#unlabeled-grid .card")
    expect(queue).to_have_count(4)
    third = queue.nth(2)
    path = third.get_attribute("data-path")
    third.locator("button.thumb").focus()
    expect(third).to_have_attribute("aria-current", "true")
    pg.keyboard.press("1")  # 1 = circles
    expect(queue).to_have_count(3)
    assert moves(url) == [(path, f"circles/{Path(path).name}")]
    pg.keyboard.press("ArrowLeft")
    wait_focus(pg, f"Zoom {queue.nth(1).get_attribute('data-path')}")
    expect(queue.nth(1)).to_have_attribute("aria-current", "true")
    httpx.post(url + "/api/undo", json={})
    assert sha_map(data) == before


def test_a_stopped_server_is_named_and_errors_stay_until_closed(
    browser: object, review_data: tuple[Path, Path, Config]
) -> None:
    data, run, cfg = review_data
    expect = sync_api.expect
    with Server(create_app(data, run, cfg, analyse_on_start=False)) as server, open_page(browser, server.url) as pg:
        expect(pg.locator("#browse-grid .card")).to_have_count(12)
        server.__exit__()
        pg.locator('.card[data-path="circles/circles_05.jpg"] button[data-label="squares"]').click()
        expect(pg.locator("#offline")).to_contain_text("the review server does not answer (stopped?)")
        toast = pg.locator("#toast")
        expect(toast).to_have_class("show error")
        pg.wait_for_timeout(4_000)  # longer than news stays
        expect(toast).to_have_class("show error")
        toast.locator("button.close").click()
        expect(toast).not_to_have_class("show error")
    assert (data / "circles" / "circles_05.jpg").is_file()


def test_the_zoom_fits_a_small_screen_with_many_classes(browser: object, tmp_path: Path) -> None:
    """12 classes at 640 x 360 (200 % zoom on a laptop): the zoom's buttons and Close can be seen and used."""
    classes = tuple(f"class_{c}" for c in "abcdefghijkl")
    root = make_folder(tmp_path / "d", classes=classes, n=1)
    with Server(create_app(root, analyse_on_start=False)) as server, open_page(browser, server.url, 640, 360) as pg:
        pg.locator(".card img").first.click()
        close = pg.locator("#zoom-close")
        sync_api.expect(close).to_be_in_viewport(ratio=1)
        close.click()
        sync_api.expect(pg.locator("#zoom")).to_be_hidden()


def test_many_classes_keep_cards_small(browser: object, review_data: tuple[Path, Path, Config], tmp_path: Path) -> None:
    """14 classes: a card shows the 5 highest scores (with the suggested class) and what the others hold together,
    and moves its image with a list and a Move button, not a button a class (120 classes made cards 4,000 px
    tall, and long names left the bars 0 px wide)."""
    classes = (*(f"{kind}_{i}" for i in range(5) for kind in ("circles", "squares", "stripes")), "x" * 80)[-14:]
    root = make_folder(tmp_path / "d", classes=classes, n=2)
    make_folder(root, classes=("lonely",), n=1)  # cannot be cross-checked: named under the status line
    (root / "unlabeled").mkdir()
    draw_image("circles", np.random.default_rng(1)).save(root / "unlabeled" / "u.jpg")
    expect, cfg = sync_api.expect, review_data[2]
    with Server(create_app(root, cfg=cfg)) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            wait_analysis(client)
        with open_page(browser, server.url) as pg:
            expect(pg.locator("#status")).to_contain_text("1 image not ranked: the only image of their class")
            expect(pg.locator("#status")).to_contain_text("lonely/lonely_00.jpg: only image of its class")
            pg.locator('#tabs button[data-tab="unlabeled"]').click()
            card = pg.locator("#unlabeled-grid .card")
            expect(card).to_have_count(1)
            assert card.locator(".bars .bar").count() <= 6  # the 5 highest, and the suggested one wherever it ranks
            expect(card.locator(".bars .others")).to_contain_text("other classes")
            assert card.locator(".buttons button").count() == 2  # the suggested class and Move
            assert card.bounding_box()["height"] < 600
            assert pg.evaluate("document.documentElement.scrollWidth") <= 1280  # long names are cut, with a title
            card.locator("select.move-to").select_option(classes[-1])
            card.locator("button.move").click()
            expect(card).to_have_count(0)
    assert (root / classes[-1] / "u.jpg").is_file()
