"""The report as data: sections of blocks (paragraphs, callouts, lists, tables, figures), written
once in ``sections`` and rendered by the two backends in ``render``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Code:
    """An inline code span inside a paragraph."""

    text: str


@dataclass(frozen=True)
class Para:
    """A paragraph: text, or a sequence of text and ``Code`` spans; ``box`` sets it apart."""

    content: str | Sequence[str | Code]
    box: bool = False


@dataclass(frozen=True)
class Callout:
    """A highlighted statement: ``label`` in bold, then ``text``; ``quote``: a blockquote in Markdown."""

    label: str
    text: str
    quote: bool = True


@dataclass(frozen=True)
class Bullets:
    items: Sequence[str]


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    row_classes: Sequence[str] | None = None  # HTML: a class per row (the run's status)
    numeric: frozenset[str] = frozenset()  # HTML: columns aligned as numbers


@dataclass(frozen=True)
class Fig:
    """A figure by key: drawn when the report has it, left out when it does not."""

    key: str


Block = Para | Callout | Bullets | Table | Fig


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    caption: str
    png: bytes


@dataclass
class Section:
    """A heading (None: blocks that continue the previous section) and its blocks. ``joined``
    puts the heading and its first block on one line of the HTML."""

    heading: str | None
    blocks: list[Block] = field(default_factory=list)
    level: int = 2
    joined: bool = False


@dataclass
class Document:
    title: str
    meta: list[str]
    sections: list[Section]
    figures: dict[str, Figure]
