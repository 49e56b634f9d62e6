"""The review app in a real browser: Playwright for Python driving Debian's headless Chromium.

Screenshots go to $IMGCLF_TEST_ARTIFACTS (default: the test's tmp_path). CI installs the browser with
``.ci/install-browser``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import test_ui_api
from helpers import CHROMIUM, CHROMIUM_ARGS
from test_ui_api import Server, sha_map, wait_analysis

from imgclf.ui.app import create_app

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


@pytest.fixture
def page(browser: object, site: tuple[str, Path]) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    pg = context.new_page()
    pg.set_default_timeout(15_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(site[0] + "/")
    yield pg
    context.close()
    assert not errors, errors


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
    pg.locator("#undo-all").click()
    expect(queue).to_have_count(4)
    assert sha_map(data) == before


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
