"""HTML building blocks. Every value from the run's files is escaped as it enters the page; only
``Html`` passes as it is."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NUMBER = re.compile(r"[-+]?[\d.,]+%?|—")


class Html(str):
    """Markup that is safe as it is; every other value is escaped when it enters the page."""


def escape(value: Any) -> Html:
    """``value`` as page text: markup as it is, anything else displayed and escaped."""
    return value if isinstance(value, Html) else Html(html.escape(display(value)))


def display(value: Any) -> str:
    """How a value from the run's files reads on the page."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def percent(part: float, whole: float) -> str:
    """``part`` as a percentage of ``whole``; a dash where there is no whole to divide by."""
    return f"{100 * part / whole:.1f}%" if whole else "—"


def table(headers: Sequence[Any], rows: Sequence[Sequence[Any]], align_numbers: bool = True) -> Html:
    """An HTML table; cells that read as numbers are right-aligned, so that columns compare."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(value, align_numbers) for value in row) + "</tr>" for row in rows)
    return Html(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _cell(value: Any, align_numbers: bool) -> str:
    text = escape(value)
    return f'<td class="num">{text}</td>' if align_numbers and NUMBER.fullmatch(text) else f"<td>{text}</td>"


def key_values(mapping: Mapping[str, Any]) -> Html:
    """Settings of mixed types, all left-aligned: a column of them does not compare."""
    return table(["setting", "value"], [[key, value] for key, value in sorted(mapping.items())], align_numbers=False)


def card(title: str, *parts: Html) -> Html:
    return Html(f'<div class="card"><h3>{escape(title)}</h3>{"".join(parts)}</div>')


def grid(cards: Sequence[Html]) -> Html:
    return Html(f'<div class="grid">{"".join(cards)}</div>')


def note(text: str) -> Html:
    return Html(f'<p class="note">{escape(text)}</p>')


@dataclass(frozen=True)
class Section:
    """One ``<section>`` of the page; its anchor and title also make its link in the page's nav bar."""

    anchor: str
    title: str
    body: Html

    def render(self) -> str:
        return f'<section id="{self.anchor}"><h2>{escape(self.title)}</h2>{self.body}</section>'


def section(anchor: str, title: str, *parts: Html) -> Section:
    return Section(anchor, title, Html("".join(parts)))
