"""The chat page as served: security headers, no inline script or style, every file it
references exists, and the ES modules arrive with a JavaScript content type."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

from server.http.security import CONTENT_SECURITY_POLICY

from .conftest import Rill

STATIC = Path(__file__).resolve().parent.parent / "web" / "static"


class PageScan(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline_scripts = 0
        self.attributes: list[str] = []
        self.links: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.attributes.extend(name for name, _ in attrs)
        values = dict(attrs)
        if tag == "script":
            self.scripts.append(values)
            self._in_script = True
        if tag == "link" and values.get("href"):
            self.links.append(str(values["href"]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1


async def test_every_response_has_the_security_headers(rill: Rill) -> None:
    for path in ("", "api/models", "static/app.css", "no/such/page"):
        async with rill.session.get(rill.url / path) as response:
            headers = response.headers
            assert headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY, path
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert headers["Referrer-Policy"] == "no-referrer"
            assert headers["X-Frame-Options"] == "DENY"
    directives = dict(d.split(" ", 1) for d in CONTENT_SECURITY_POLICY.split("; "))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval'
    assert directives["frame-ancestors"] == "'none'"
    assert directives["require-trusted-types-for"] == "'script'"


async def test_the_page_has_no_inline_script_or_style_and_its_files_exist(rill: Rill) -> None:
    async with rill.session.get(rill.url / "") as response:
        assert response.status == 200
        html = await response.text()
    scan = PageScan()
    scan.feed(html)
    assert scan.inline_scripts == 0
    assert all(script.get("src") for script in scan.scripts)
    assert not [a for a in scan.attributes if a.startswith("on") or a == "style"]
    assert "<style" not in html
    for url in [str(s["src"]) for s in scan.scripts] + scan.links:
        async with rill.session.get(rill.url.with_path(url.split("?")[0])) as response:
            assert response.status == 200, url


async def test_modules_are_served_as_javascript_and_revalidated(rill: Rill) -> None:
    modules = sorted(p.relative_to(STATIC).as_posix() for p in (STATIC / "js").glob("*.js"))
    assert "js/app.js" in modules
    for module in modules:
        async with rill.session.get(rill.url / "static" / module) as response:
            assert response.status == 200
            assert response.content_type in {"text/javascript", "application/javascript"}, module
            assert response.headers["Cache-Control"] == "no-cache"


def test_every_module_import_resolves_to_a_file() -> None:
    imports = re.compile(r"""^import .* from "([^"]+)";$""", re.MULTILINE)
    for module in (STATIC / "js").glob("*.js"):
        for target in imports.findall(module.read_text()):
            path = STATIC / target.removeprefix("/static/") if target.startswith("/") else module.parent / target
            assert path.resolve().is_file(), f"{module.name} imports {target}"


def test_no_script_writes_html_from_strings() -> None:
    # Trusted Types enforce it at run time; this keeps the source honest too.
    sinks = re.compile(r"\.(innerHTML|outerHTML|insertAdjacentHTML)\b|document\.write|\beval\(|new Function\(")
    for module in (STATIC / "js").glob("*.js"):
        assert not sinks.search(module.read_text()), module.name
