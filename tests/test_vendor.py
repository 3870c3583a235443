"""The vendored browser libraries in web/static/vendor/ are exactly what web/vendor/vendor.mjs
wrote from the pinned npm packages: no network or npm needed, just the committed files."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENDOR_SRC = ROOT / "web" / "vendor"
VENDOR_OUT = ROOT / "web" / "static" / "vendor"
MANIFEST = VENDOR_OUT / "manifest.json"

# The files the web UI imports by these stable names.
EXPECTED_FILES = {
    "marked.js",
    "purify.js",
    "highlight.js",
    "highlight-light.css",
    "highlight-dark.css",
    "licenses/marked.txt",
    "licenses/dompurify.txt",
    "licenses/highlight.js.txt",
}
LICENCES = {
    "marked": "licenses/marked.txt",
    "dompurify": "licenses/dompurify.txt",
    "@highlightjs/cdn-assets": "licenses/highlight.js.txt",
}
EXACT_VERSION = re.compile(r"\d+\.\d+\.\d+")
EXPORT_AS = re.compile(r"\bas\s+([\w$]+)")
RELATIVE_IMPORT = re.compile(r"""\b(?:from|import)\s*["'](?:\.{1,2}/|/)""")


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def manifest_entries() -> list[dict[str, str]]:
    entries: list[dict[str, str]] = load_json(MANIFEST)["files"]
    return entries


def present_files() -> set[str]:
    return {p.relative_to(VENDOR_OUT).as_posix() for p in VENDOR_OUT.rglob("*") if p.is_file()}


def test_manifest_lists_exactly_the_expected_files() -> None:
    files = [entry["file"] for entry in manifest_entries()]
    assert files == sorted(files)
    assert set(files) == EXPECTED_FILES
    assert len(files) == len(set(files))


def test_every_listed_file_exists_with_its_sha256() -> None:
    for entry in manifest_entries():
        path = VENDOR_OUT / entry["file"]
        assert path.is_file(), f"missing {entry['file']}"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"], f"{entry['file']} was modified"


def test_no_unlisted_files() -> None:
    listed = {entry["file"] for entry in manifest_entries()}
    assert present_files() - listed == {"manifest.json"}


def test_manifest_is_in_canonical_form() -> None:
    # What vendor.mjs writes: sorted keys, two-space indent, trailing newline.
    text = MANIFEST.read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_each_package_has_a_licence() -> None:
    entries = {entry["file"]: entry for entry in manifest_entries()}
    for package, file in LICENCES.items():
        assert entries[file]["package"] == package
        assert (VENDOR_OUT / file).read_text(encoding="utf-8").strip(), f"empty licence for {package}"
    assert {entry["package"] for entry in entries.values()} == set(LICENCES)


def test_versions_match_package_json_and_lockfile() -> None:
    dependencies: dict[str, str] = load_json(VENDOR_SRC / "package.json")["dependencies"]
    lock = load_json(VENDOR_SRC / "package-lock.json")
    assert lock["lockfileVersion"] == 3
    assert lock["packages"][""]["dependencies"] == dependencies
    for version in dependencies.values():
        assert EXACT_VERSION.fullmatch(version), f"not an exact version: {version}"
    for package, entry in lock["packages"].items():
        if package:
            assert entry["integrity"].startswith("sha512-"), f"{package} has no sha512 integrity"
    for entry in manifest_entries():
        locked = lock["packages"][f"node_modules/{entry['package']}"]
        assert entry["version"] == dependencies[entry["package"]] == locked["version"], entry["file"]
        assert entry["integrity"] == locked["integrity"], entry["file"]


def test_no_vendored_file_references_a_source_map() -> None:
    # vendor.mjs strips the trailing `//# sourceMappingURL=` line: no map is shipped, so a browser would 404 on it.
    checked = {name for name in present_files() if name.endswith((".js", ".mjs", ".css"))}
    assert checked >= {"marked.js", "purify.js", "highlight.js", "highlight-light.css", "highlight-dark.css"}
    for name in checked:
        assert "sourceMappingURL" not in (VENDOR_OUT / name).read_text(encoding="utf-8"), name


@pytest.mark.parametrize(
    ("name", "exports"),
    [("marked.js", {"marked", "Marked"}), ("purify.js", {"default"}), ("highlight.js", {"default"})],
)
def test_es_module_shape(name: str, exports: set[str]) -> None:
    # A static check of what vendor.mjs verified by importing each module in Node.
    source = (VENDOR_OUT / name).read_text(encoding="utf-8")
    exported = {m.group(1) for block in re.findall(r"export\s*\{([^}]*)\}", source) for m in EXPORT_AS.finditer(block)}
    assert exports <= exported
    assert not RELATIVE_IMPORT.search(source), f"{name} imports another file; it must be self-contained"
