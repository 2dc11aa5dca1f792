"""The timeline's links and hover box (pure): each test's artifacts, and the nodeid on hover.

* A test with artifacts (the JSON report's ``tests[].artifacts``) has its bar wrapped in a link
  to its row of the "Artifacts" table, which links each file (relative to the page, so the page
  and the artifact folder can be moved or served together).
* One small script (one listener for the whole chart, not one per bar) shows the hovered bar's
  text, nodeid first, in a box that follows the pointer; the SVG ``<title>`` stays as the
  fallback without script.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from .timeline_model import TABLE_LIMIT, _e, _map

#: The hover box's id and the attribute the table rows are found by.
TIP_ID = "tip"

_TIP_CSS = (
    "<style>\n"
    f"#{TIP_ID}{{position:absolute;display:none;max-width:560px;padding:6px 9px;"
    "background:#1d232a;color:#fff;font-size:12px;border-radius:5px;white-space:pre-wrap;"
    "pointer-events:none;z-index:10}\n"
    "a.art{margin-right:10px}\n"
    "</style>\n"
)

_TIP_SCRIPT = (
    "<script>\n"
    "(function(){\n"
    f"var tip=document.getElementById('{TIP_ID}');\n"
    "document.addEventListener('mouseover',function(e){\n"
    " var bar=e.target.closest&&e.target.closest('rect.b');\n"
    " if(!bar){tip.style.display='none';return;}\n"
    " var t=bar.querySelector('title');\n"
    " tip.textContent=(t?t.textContent:bar.getAttribute('data-nodeid'))"
    "+(bar.closest('a.artlink')?'\\nclick: its artifacts':'');\n"
    " tip.style.display='block';\n"
    " var x=e.pageX+14;\n"
    " if(x+tip.offsetWidth>window.scrollX+document.documentElement.clientWidth)"
    "{x=Math.max(0,e.pageX-14-tip.offsetWidth);}\n"
    " tip.style.left=x+'px';tip.style.top=(e.pageY+14)+'px';\n"
    "});\n"
    "})();\n"
    "</script>\n"
)


def hover_box() -> str:
    """The hover box, its style and its script (placed at the end of the body)."""
    return f'{_TIP_CSS}<div id="{TIP_ID}" role="tooltip"></div>\n{_TIP_SCRIPT}'


def artifact_rows(tests: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """nodeid -> its artifacts, for the tests that have any."""
    found: dict[str, list[Mapping[str, Any]]] = {}
    for test in tests:
        files = test.get("artifacts")
        if isinstance(files, list) and files:
            found[str(test.get("nodeid", ""))] = [_map(f) for f in files]
    return found


def anchors(rows: Mapping[str, object]) -> dict[str, str]:
    """nodeid -> the id of its row in the artifacts table."""
    return {nodeid: f"art-{i}" for i, nodeid in enumerate(rows)}


def href(path: str, link_base: str) -> str:
    """A file's link from the page: ``link_base`` (the report's folder, seen from the page)
    joined with its report-relative path, URL-quoted."""
    joined = posixpath.normpath(posixpath.join(link_base.replace("\\", "/") or ".", path))
    return quote(joined, safe="/._-~")


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def artifacts_table(rows: Mapping[str, list[Mapping[str, Any]]], link_base: str) -> str:
    """The "Artifacts" table: one row per test, a link per file (size, and what was cut)."""
    if not rows:
        return ""
    ids = anchors(rows)
    out = [
        f"<h2>Artifacts ({_plural(sum(len(v) for v in rows.values()), 'file')} of "
        f"{_plural(len(rows), 'test')}; click a bar to come here)</h2>\n"
        "<table>\n<tr><th>test</th><th>files</th></tr>\n"
    ]
    for nodeid, files in list(rows.items())[:TABLE_LIMIT]:
        links = []
        for entry in files:
            path = entry.get("path")
            note = f"{entry.get('bytes', 0)} bytes"
            if entry.get("cut"):
                note += f", cut from {entry.get('size', 0)}"
            if entry.get("error"):
                note += f", {entry.get('error')}"
            name = _e(entry.get("name") or path)
            if isinstance(path, str) and path:
                links.append(
                    f'<a class="art" href="{_e(href(path, link_base))}">{name}</a>'
                    f"<small>({_e(note)})</small>"
                )
            else:
                links.append(f"{name} <small>({_e(note)})</small>")
        out.append(f'<tr id="{ids[nodeid]}"><td>{_e(nodeid)}</td><td>{" ".join(links)}</td></tr>\n')
    if len(rows) > TABLE_LIMIT:
        out.append(
            f'<tr><td colspan="2">\u2026 and {len(rows) - TABLE_LIMIT} more tests '
            "(see the JSON report)</td></tr>\n"
        )
    out.append("</table>\n")
    return "".join(out)
