"""The static viewer page in a real headless Chromium: rendering, marks, filters, paging, 10,000 rows."""

from __future__ import annotations

import json

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from hscr_client.viewer import Filters, ViewerDataset, write_static_file

LARGE_ROWS = 10_000  # what the large_dataset fixture builds


# For each level of each card: every mark's text, data, and the number of words before it in the
# level's text (the deleted originals shown beside marks do not count).
MARKS_JS = """
return [...document.querySelectorAll('article.item')].map((card) => ({
  id: card.dataset.id,
  levels: [...card.querySelectorAll('li.level')].map((li) => {
    const p = li.querySelector('p');
    const marks = [];
    let before = '';
    const walk = (node) => {
      for (const child of node.childNodes) {
        if (child.nodeType === Node.TEXT_NODE) before += child.textContent;
        else if (child.matches('del.orig')) continue;
        else if (child.matches('mark.rep')) {
          marks.push({text: child.textContent, original: child.dataset.original, reward: Number(child.dataset.reward),
                      position: Number(child.dataset.position), how: child.dataset.how,
                      wordsBefore: before.split(/\\s+/).filter(Boolean).length});
          before += child.textContent;
        } else walk(child);
      }
    };
    walk(p);
    return {level: Number(li.dataset.level), text: before, marks};
  }),
  coupled: [...card.querySelectorAll('.cpl')].map((s) => ({text: s.textContent, token: s.dataset.token,
                                                           shift: Number(s.dataset.shift)})),
}));
"""


def wait_ready(driver, after: int | None = None) -> None:
    """Wait until the page has rendered (a render newer than ``after``, when given)."""
    def ready(d):
        body = d.find_element(By.TAG_NAME, "body")
        rendered = int(body.get_attribute("data-render") or 0)
        return body.get_attribute("data-state") in ("ready", "error") and (after is None or rendered > after)
    WebDriverWait(driver, 30).until(ready)


def render_count(driver) -> int:
    return int(driver.find_element(By.TAG_NAME, "body").get_attribute("data-render") or 0)


def act(driver, action) -> None:
    """Do something that re-renders the page and wait for that render."""
    before = render_count(driver)
    action()
    wait_ready(driver, before)


def shown_total(driver) -> int:
    return int(driver.find_element(By.ID, "results").get_attribute("data-total"))


def card_ids(driver) -> list[str]:
    cards = driver.find_elements(By.CSS_SELECTOR, "article.item, article.error-item")
    return [e.get_attribute("data-id") for e in cards]


def open_page(driver, path, fragment: str = "") -> None:
    driver.get("about:blank")  # a fresh document, not a same-document jump to a new fragment
    driver.get(path.as_uri() + fragment)
    wait_ready(driver)
    assert driver.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready"


@pytest.fixture(scope="module")
def fixture_page(fixture_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("viewer-page") / "view.html"
    write_static_file(str(fixture_dataset), out, title="Fixture dataset")
    return out


@pytest.fixture(scope="module")
def dataset(fixture_dataset) -> ViewerDataset:
    return ViewerDataset.open(str(fixture_dataset))


def test_page_renders_the_rows_and_marks_sit_on_the_right_tokens(browser, fixture_page, dataset, ranked_rows,
                                                                 shots_dir):
    open_page(browser, fixture_page)
    by_id = {r["custom_id"]: r for r in ranked_rows}
    cards = browser.execute_script(MARKS_JS)
    assert [c["id"] for c in cards] == [r["id"] for r in dataset.rows[:25]]
    checked = 0
    for card in cards:
        row = by_id[card["id"]]
        levels = sorted(row["levels"], key=lambda lv: lv["level"])
        assert [lv["level"] for lv in card["levels"]] == [lv["level"] for lv in levels]
        for shown, level in zip(card["levels"], levels, strict=True):
            assert shown["text"] == level["text"]  # the page shows the level's text, marks included, unchanged
            placed = [r for r in level["replacements"] if r["position"] < len(level["text"].split())
                      and level["text"].split()[r["position"]] == r["replacement"]]
            marks_at = {m["position"]: m for m in shown["marks"]}
            for replacement in placed:
                mark = marks_at[replacement["position"]]
                assert mark["text"] == replacement["replacement"]
                assert mark["original"] == replacement["original"]
                assert mark["reward"] == pytest.approx(replacement["reward"], rel=1e-3)  # 4 significant digits
                assert mark["how"] == "position" and mark["wordsBefore"] == replacement["position"]
                checked += 1
        assert sorted(c["token"] for c in card["coupled"]) == sorted(
            c["token"] for c in row["coupled"] if c["position"] < len(row["corrupted"].split())
            and row["corrupted"].split()[c["position"]] == c["token"])
        assert all(c["text"] == c["token"] for c in card["coupled"])
    assert checked > 0
    # Every card shows the question and the answers, and an image.
    first = browser.find_element(By.CSS_SELECTOR, "article.item")
    row = ranked_rows[0]
    assert first.find_element(By.CSS_SELECTOR, ".question p").text == row["question"]
    assert first.find_element(By.CSS_SELECTOR, ".chosen p").text == row["chosen"]
    assert first.find_element(By.CSS_SELECTOR, ".own p").text == row["own_answer"]
    assert browser.execute_script("return [...document.querySelectorAll('article.item .thumb img')]"
                                  ".every((i) => i.complete && i.naturalWidth > 0)")
    # Hover shows the original and the reward.
    mark = browser.find_element(By.CSS_SELECTOR, "article.item mark.rep")
    tip = browser.find_element(By.ID, "hscr-tip")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", mark)
    ActionChains(browser).move_to_element(mark).perform()
    WebDriverWait(browser, 5).until(lambda d: tip.is_displayed())
    assert mark.get_attribute("data-original") in tip.text and "reward" in tip.text
    assert f"{float(mark.get_attribute('data-reward')):.3f}" in tip.text
    ActionChains(browser).move_to_element(browser.find_element(By.ID, "title")).perform()
    WebDriverWait(browser, 5).until(lambda d: not tip.is_displayed())
    browser.execute_script("arguments[0].focus()", mark)  # the keyboard gets the same tip
    WebDriverWait(browser, 5).until(lambda d: tip.is_displayed())
    assert mark.get_attribute("aria-describedby") == "hscr-tip"
    ActionChains(browser).move_to_element(mark).perform()
    browser.save_screenshot(str(shots_dir / "viewer-fixture.png"))
    print(f"screenshot: {shots_dir / 'viewer-fixture.png'}")
    assert (shots_dir / "viewer-fixture.png").stat().st_size > 10_000


def test_filters_match_the_python_selection(browser, fixture_page, dataset, fixture_dataset):
    open_page(browser, fixture_page, "#size=100")
    level = Select(browser.find_element(By.ID, "level"))
    for value in (2, 3):
        act(browser, lambda v=value: level.select_by_value(str(v)))
        expected = [r["id"] for r in dataset.select(Filters(level=value))]
        assert card_ids(browser) == expected and shown_total(browser) == len(expected)
        shown_levels = browser.execute_script(
            "return [...document.querySelectorAll('li.level')].map((li) => Number(li.dataset.level))")
        assert shown_levels and set(shown_levels) == {value}
    act(browser, lambda: level.select_by_value(""))

    word = dataset.rows[1]["levels"][0]["marks"][0]["replacement"]
    search = browser.find_element(By.ID, "q")
    act(browser, lambda: search.send_keys(word + "\n"))
    expected = [r["id"] for r in dataset.select(Filters(q=word))]
    assert card_ids(browser) == expected and 0 < len(expected) < len(dataset.rows) + 1

    act(browser, lambda: (search.clear(), search.send_keys("\n")))
    assert shown_total(browser) == len(dataset.rows)

    status = Select(browser.find_element(By.ID, "status"))
    act(browser, lambda: status.select_by_value("errors"))
    errors = [json.loads(line)["custom_id"] for line in (fixture_dataset / "errors.jsonl").read_text().splitlines()]
    assert card_ids(browser) == errors[:100] and shown_total(browser) == len(errors)
    assert browser.find_elements(By.CSS_SELECTOR, "article.item") == []
    assert browser.find_element(By.CSS_SELECTOR, "article.error-item p").text  # the reason is shown

    act(browser, lambda: status.select_by_value("warnings"))
    assert card_ids(browser) == [r["id"] for r in dataset.select(Filters(status="warnings"))]
    act(browser, lambda: status.select_by_value("ranked"))

    for name, count in dataset.summary()["modalities"].items():
        chip = browser.find_element(By.CSS_SELECTOR, f'.chip[data-modality="{name}"]')
        act(browser, chip.click)
        assert chip.get_attribute("aria-pressed") == "true"
        assert card_ids(browser) == [r["id"] for r in dataset.select(Filters(modality=name))]
        assert shown_total(browser) == count


def test_paging_walks_every_row_once(browser, fixture_page, dataset):
    open_page(browser, fixture_page, "#size=10")
    prev, next_ = browser.find_element(By.ID, "prev"), browser.find_element(By.ID, "next")
    pages = (len(dataset.rows) + 9) // 10
    assert browser.find_element(By.ID, "page-info").text == f"Page 1 of {pages}"
    assert not prev.is_enabled() and next_.is_enabled()
    seen = card_ids(browser)
    for page in range(2, pages + 1):
        act(browser, next_.click)
        assert browser.find_element(By.ID, "page-info").text == f"Page {page} of {pages}"
        seen += card_ids(browser)
    assert seen == [r["id"] for r in dataset.rows]
    assert not next_.is_enabled() and prev.is_enabled()
    act(browser, prev.click)
    assert card_ids(browser) == [r["id"] for r in dataset.rows[(pages - 2) * 10:(pages - 1) * 10]]


def test_ten_thousand_rows_load_lazily_and_page(browser, large_dataset, tmp_path, shots_dir):
    out = tmp_path / "large.html"
    stats = write_static_file(str(large_dataset), out)
    size = out.stat().st_size
    print(f"static page for {LARGE_ROWS} rows: {size / 1e6:.1f} MB in {stats.chunks} chunks")
    assert stats.rows == LARGE_ROWS and stats.chunks == LARGE_ROWS // 100 and stats.bytes == size
    assert size < 100e6  # about 6 KB a row with a 64x64 PNG thumbnail and three levels

    open_page(browser, out)
    body = browser.find_element(By.TAG_NAME, "body")
    # The first page parsed one chunk of rows and one chunk of thumbnails, not all 100.
    assert body.get_attribute("data-row-chunks-parsed") == "1"
    assert body.get_attribute("data-image-chunks-parsed") == "1"
    assert len(browser.find_elements(By.CSS_SELECTOR, "article.item")) == 25
    assert len(browser.find_elements(By.CSS_SELECTOR, "article.item .thumb img")) == 25
    assert browser.find_element(By.ID, "page-info").text == f"Page 1 of {LARGE_ROWS // 25}"

    open_page(browser, out, f"#page={LARGE_ROWS // 25}")
    assert card_ids(browser) == [f"big-{k:05d}" for k in range(LARGE_ROWS - 25, LARGE_ROWS)]
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-row-chunks-parsed") == "1"

    # A search reads every chunk's text (not its images) and finds the one row.
    search = browser.find_element(By.ID, "q")
    act(browser, lambda: search.send_keys("big-04321\n"))
    assert card_ids(browser) == ["big-04321"]
    body = browser.find_element(By.TAG_NAME, "body")
    assert body.get_attribute("data-row-chunks-parsed") == "100"
    assert int(body.get_attribute("data-image-chunks-parsed")) <= 3
    browser.save_screenshot(str(shots_dir / "viewer-10k.png"))
