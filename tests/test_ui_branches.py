"""Branches of a stored conversation in real Chromium: editing an earlier question and
regenerating an earlier answer keep the old versions, `‹ 2 / 3 ›` switches between them
(and tells the server, which sends the active branch to the model), and tree.js's pure
helpers checked in the browser itself."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from playwright.async_api import Page, expect

from .browser import ask, reload, wait_answer_ended
from .conftest import OpenPage, Rill, StartRill
from .fakes import Reply, answer
from .history_ui import (
    ANSWER_BODIES,
    TITLES,
    USER_BODIES,
    conversation,
    conversations,
    export_document,
    import_document,
    message,
    settled_conversation,
    stored_conversation,
    stored_rill,
)

TREE_CHECKS = """
async () => {
  const tree = await import("/static/js/tree.js");
  const branches = await import("/static/js/branches.js");
  const m = (id, parent, created) => ({ id, parent, created, role: "user", content: id });
  // q1 -> a1 -> q2 -> a2, the edit q1b (a sibling of q1) -> a1b, and a regenerated a1c.
  const all = () => [
    m("q1", null, 1), m("a1", "q1", 2), m("q2", "a1", 3), m("a2", "q2", 4),
    m("q1b", null, 5), m("a1b", "q1b", 6), m("a1c", "q1", 7),
  ];
  const ids = (list) => list.map((x) => x?.id ?? null);
  const messages = all();
  // The page's shape: the branch shown in messages, the rest in branches.
  const conversation = { messages: all(), branches: [] };
  tree.showBranch(conversation, "a2");
  const shown = ids(conversation.messages);
  const hidden = ids(conversation.branches).sort();
  const a1 = conversation.messages[1];
  const position = branches.branchPosition(conversation, a1);
  const next = branches.versionAt(conversation, a1, 1)?.id;
  const previous = branches.versionAt(conversation, a1, -1);
  tree.showBranch(conversation, tree.newestLeaf(tree.allMessages(conversation), "q1b"));
  const afterSwitch = ids(conversation.messages);
  const q1b = conversation.messages[0];
  const cyclic = [m("c1", "c2", 1), m("c2", "c1", 2)];
  // x's older version went on later (xa -> xa2 at 10) than its newer one (xb at 2) was written.
  const wentOn = [m("x", null, 0), m("xa", "x", 1), m("xb", "x", 2), m("xa2", "xa", 10)];
  return {
    roots: ids(tree.childrenOf(messages, null)),
    childrenQ1: ids(tree.childrenOf(messages, "q1")),
    pathA2: ids(tree.pathTo(messages, "a2")),
    pathUnknown: ids(tree.pathTo(messages, "nope")),
    newestUnderQ1: tree.newestLeaf(messages, "q1"),
    newestUnderA1: tree.newestLeaf(messages, "a1"),
    newestUnderA2: tree.newestLeaf(messages, "a2"),
    newestUnderUnknown: tree.newestLeaf(messages, "nope"),
    newestWentOn: tree.newestLeaf(wentOn, "x"),
    newestInCycle: tree.newestLeaf(cyclic, "c1"),
    defaultLeaf: tree.defaultLeaf(messages),
    shown,
    hidden,
    position,
    next,
    previous,
    afterSwitch,
    q1bPosition: branches.branchPosition(conversation, q1b),
    storedPath: ids(branches.shownPath({ messages, active: "a1" })),
    storedDefault: ids(branches.shownPath({ messages, active: null })),
    browserOnly: branches.branchPosition({ messages: [{ id: "x" }, { id: "y" }] }, { id: "x" }),
    cyclicPath: ids(tree.pathTo(cyclic, "c1")),
    empty: ids(branches.shownPath({ messages: [] })),
  };
}
"""


async def test_tree_helpers(start_rill: StartRill, tmp_path: Path, open_ui: OpenPage) -> None:
    rill = await stored_rill(start_rill, tmp_path)
    ui = await open_ui(rill)
    result = await ui.page.evaluate(TREE_CHECKS)
    assert result == {
        "roots": ["q1", "q1b"],
        "childrenQ1": ["a1", "a1c"],
        "pathA2": ["q1", "a1", "q2", "a2"],
        "pathUnknown": [],
        "newestUnderQ1": "a1c",
        "newestUnderA1": "a2",
        "newestUnderA2": "a2",  # a leaf: itself
        "newestUnderUnknown": "nope",
        # The leaf written last under it, not the newest child's: the branch used most recently.
        "newestWentOn": "xa2",
        "newestInCycle": "c1",
        "defaultLeaf": "a1c",
        "shown": ["q1", "a1", "q2", "a2"],
        "hidden": ["a1b", "a1c", "q1b"],
        "position": {"index": 1, "count": 2},
        "next": "a1c",
        "previous": None,
        "afterSwitch": ["q1b", "a1b"],
        "q1bPosition": {"index": 2, "count": 2},
        "storedPath": ["q1", "a1", "q2", "a2"],  # active not a leaf: down to the newest one under it
        "storedDefault": ["q1", "a1c"],
        "browserOnly": {"index": 0, "count": 0},  # no parent links: no versions to switch
        # A cycle (never stored: the server refuses one) ends the walk instead of hanging.
        "cyclicPath": ["c2", "c1"],
        "empty": [],
    }
    await ui.assert_clean()


def user_texts(seen: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in seen["messages"] if m["role"] != "system"]


async def nav_text(page: Page, selector: str) -> str:
    return await page.locator(f"{selector} .branch-count").inner_text()


async def test_edit_and_regenerate_keep_old_versions_and_switching_follows_the_server(
    start_rill: StartRill, tmp_path: Path, open_ui: OpenPage
) -> None:
    rill = await stored_rill(start_rill, tmp_path)
    rill.fake.script(
        Reply(chunks=answer(["A1"])),
        Reply(chunks=answer(["A2"])),
        Reply(chunks=answer(["A1 edited"])),
        Reply(chunks=answer(["A1 again"])),
    )
    ui = await open_ui(rill)
    page = ui.page
    await ask(page, "Q1")
    await ask(page, "Q2")
    await expect(page.locator(".branch-nav:visible")).to_have_count(0)
    [summary] = await conversations(rill)
    cid = summary["id"]

    # Edit the first question: a new version beside the old one, answered from it alone.
    first_question = page.locator(".message.user").first
    await first_question.hover()
    await first_question.locator('[data-action="edit"]').click()
    await first_question.locator(".edit-box textarea").fill("Q1 edited")
    await first_question.locator('[data-action="save-edit"]').click()
    await expect(page.locator(USER_BODIES)).to_have_text(["Q1 edited"])
    await wait_answer_ended(page)
    await expect(page.locator(ANSWER_BODIES)).to_have_text(["A1 edited"])
    assert user_texts(rill.fake.requests[2].body) == [("user", "Q1 edited")]
    nav = page.locator(".message.user").first.locator(".branch-nav")
    await expect(nav).to_be_visible()
    await expect(nav.locator(".branch-count")).to_have_text("2 / 2")
    await expect(nav).to_have_attribute("aria-label", "Version 2 of 2")
    await expect(nav.locator('[data-action="branch-next"]')).to_be_disabled()
    stored = await settled_conversation(rill, cid)
    assert len(stored["messages"]) == 6
    by_content = {m["content"]: m for m in stored["messages"]}
    assert stored["active"] == by_content["A1 edited"]["id"]
    assert by_content["Q1 edited"]["parent"] is None
    assert by_content["Q1"]["parent"] is None

    # ‹ goes back to the first version and the newest answer under it; the server follows.
    await nav.locator('[data-action="branch-prev"]').click()
    await expect(page.locator(USER_BODIES)).to_have_text(["Q1", "Q2"])
    await expect(page.locator(ANSWER_BODIES)).to_have_text(["A1", "A2"])
    await expect(nav.locator(".branch-count")).to_have_text("1 / 2")
    # The keyboard stays on the control (‹ is now disabled: on ›).
    await expect(nav.locator('[data-action="branch-next"]')).to_be_focused()
    await wait_for_active(rill, cid, by_content["A2"]["id"])

    # Regenerate the first answer (not the last one): a sibling answer, from Q1 alone.
    first_answer = page.locator(".message.assistant").first
    await first_answer.hover()
    await first_answer.locator('[data-action="regenerate"]').click()
    await wait_answer_ended(page)
    await expect(page.locator(USER_BODIES)).to_have_text(["Q1"])
    await expect(page.locator(ANSWER_BODIES)).to_have_text(["A1 again"])
    assert user_texts(rill.fake.requests[3].body) == [("user", "Q1")]
    answer_nav = page.locator(".message.assistant").first.locator(".branch-nav")
    await expect(answer_nav.locator(".branch-count")).to_have_text("2 / 2")
    stored = await settled_conversation(rill, cid)
    again = next(m for m in stored["messages"] if m["content"] == "A1 again")
    assert again["parent"] == by_content["Q1"]["id"]
    assert stored["active"] == again["id"]
    assert len(stored["messages"]) == 7

    # The branch shown survives a reload, and shows on another device.
    await reload(page)
    await expect(page.locator(ANSWER_BODIES)).to_have_text(["A1 again"])
    other = await open_ui(rill)
    await other.page.locator(TITLES).first.click()
    await expect(other.page.locator(USER_BODIES)).to_have_text(["Q1"])
    await expect(other.page.locator(ANSWER_BODIES)).to_have_text(["A1 again"])
    await other.page.locator(".message.assistant").first.locator('[data-action="branch-prev"]').click()
    await expect(other.page.locator(ANSWER_BODIES)).to_have_text(["A1", "A2"])
    await wait_for_active(rill, cid, by_content["A2"]["id"])
    assert len(rill.fake.requests) == 4  # switching never asks the model
    await ui.assert_clean()
    await other.assert_clean()


async def wait_for_active(rill: Rill, cid: str, leaf: str) -> None:
    """Until the server's conversation shows the branch ending at leaf (the PATCH is sent in the background)."""
    async with asyncio.timeout(5):
        while (await conversation(rill, cid))["active"] != leaf:
            await asyncio.sleep(0.05)


async def test_branch_controls_are_labelled_in_chinese_and_work_from_the_keyboard(
    start_rill: StartRill, tmp_path: Path, open_ui: OpenPage
) -> None:
    rill = await stored_rill(start_rill, tmp_path)
    messages = [
        message("q1", None, "user", "第一个问题", 1_000),
        message("a1", "q1", "assistant", "第一个回答", 2_000),
        message("a2", "q1", "assistant", "第二个回答", 3_000),
        message("a3", "q1", "assistant", "第三个回答", 4_000),
    ]
    await import_document(rill, export_document(stored_conversation("c1", "分支", messages, active="a2")))
    ui = await open_ui(rill, locale="zh-CN")
    page = ui.page
    await page.locator(TITLES, has_text="分支").click()
    await expect(page.locator(ANSWER_BODIES)).to_have_text(["第二个回答"])
    nav = page.locator(".message.assistant .branch-nav")
    await expect(nav.locator(".branch-count")).to_have_text("2 / 3")
    await expect(nav).to_have_attribute("aria-label", "第 2 个版本，共 3 个")
    await expect(nav.locator('[data-action="branch-prev"]')).to_have_attribute("aria-label", "上一个版本")
    await expect(nav.locator('[data-action="branch-next"]')).to_have_attribute("aria-label", "下一个版本")

    await nav.locator('[data-action="branch-next"]').focus()
    await page.keyboard.press("Enter")
    await expect(page.locator(ANSWER_BODIES)).to_have_text(["第三个回答"])
    await expect(nav.locator(".branch-count")).to_have_text("3 / 3")
    await expect(nav.locator('[data-action="branch-prev"]')).to_be_focused()
    await page.keyboard.press("Enter")
    await page.keyboard.press("Enter")
    await expect(page.locator(ANSWER_BODIES)).to_have_text(["第一个回答"])
    await expect(nav.locator(".branch-count")).to_have_text("1 / 3")
    await wait_for_active(rill, "c1", "a1")
    await ui.assert_clean()
