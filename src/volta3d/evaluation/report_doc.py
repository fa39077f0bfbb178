"""The report as a list of sections of plain blocks (tables, figures, notes, alerts), the number
formats every table shares, and the two renderings: self-contained HTML (figures embedded as base64
PNGs, inline CSS, no script, no external URL) and Markdown (summary.md, the same tables).

Keeping the document model apart from the rendering is what lets summary.md mirror report.html
table for table: both are written from the same blocks.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRIC_LABELS = {
    "auroc": "AUROC", "balanced_accuracy": "bal. acc.", "sensitivity": "sens.", "specificity": "spec.",
    "balanced_accuracy_youden": "bal. acc. (Youden)", "sensitivity_youden": "sens. (Youden)",
    "specificity_youden": "spec. (Youden)", "mae": "MAE", "r2": "R²", "dice": "Dice", "hd95": "HD95 (mm)",
    "dice_mean": "Dice (per subject)", "hd95_mean": "HD95 (mm, per subject)", "pearson_r": "Pearson r",
    "gap_age_r": "r(gap, age)", "gap_age_r_corrected": "r(gap, age), corrected", "gap_mean": "mean gap",
}  # fmt: skip
FOLD_ROWS = 12  # a table longer than this is folded in a <details> block: the page stays scannable


@dataclass
class Table:
    """A table of already formatted cells; rendered as HTML (folded when long) and as Markdown."""

    columns: list[str]
    rows: list[list[str]]
    caption: str = ""
    anchor: str = ""  # an element id, for tables the page must let one find (the headline)

    @property
    def folded(self) -> bool:
        return len(self.rows) > FOLD_ROWS


@dataclass
class Figure:
    """A PNG with its caption; embedded as base64 in the HTML, a relative image link in the Markdown."""

    path: Path
    caption: str
    anchor: str = ""


@dataclass
class Note:
    """A one-line remark (an omitted part, a caveat), set apart from findings."""

    text: str


@dataclass
class Alert:
    """A warning the reader must not miss (e.g. a collapse alarm): boxed in its section and
    repeated at the top of the page."""

    text: str


@dataclass
class Heading:
    """A sub-heading inside a section (one per part of a task: metrics, ROC curves, ...)."""

    text: str


@dataclass
class Line:
    """A plain paragraph with a CSS class (e.g. the provenance line), neither a finding nor a note."""

    text: str
    css: str = ""
    anchor: str = ""


Block = Table | Figure | Note | Alert | Heading | Line | str


@dataclass
class Section:
    """One titled part of the report (the headline, one task, pretraining, run settings) and its
    blocks, in order; ``anchor`` is its element id, which the navigation bar at the top links to."""

    title: str
    anchor: str
    blocks: list[Block] = field(default_factory=list)


def fmt_num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.{digits}f}"


def fmt_signed(v: Any, digits: int = 3) -> str:
    """A difference, always with its sign (``+0.012``)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:+.{digits}f}"


def fmt_general(v: Any) -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:.4g}"


def fmt_p(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3g}"


def fmt_hms(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "—"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def digits_for(metric: str) -> int:
    return 2 if metric.startswith("hd95") else 3


def mean_sd(agg: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``0.812 ± 0.031`` (SD over folds); just the mean when there is one fold."""
    if not agg or not agg.get("n"):
        return "—"
    sd = agg.get("sd")
    if sd is None or not math.isfinite(sd):
        return fmt_num(agg["mean"], digits)
    return f"{fmt_num(agg['mean'], digits)} ± {fmt_num(sd, digits)}"


def metric_label(metric: str) -> str:
    m = re.fullmatch(r"(dice|hd95)_label(\d+)", metric)
    if m:
        return f"{METRIC_LABELS[m.group(1)]} label {m.group(2)}"
    return METRIC_LABELS.get(metric, metric)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "x"


def omitted(section: Section, why: str) -> Section:
    section.blocks.append(Note(f"Omitted: {why}."))
    return section


def alerts(sections: list[Section]) -> list[Alert]:
    return [b for s in sections for b in s.blocks if isinstance(b, Alert)]


# ----------------------------------------------------------------------------- HTML

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1d2330;background:#f6f7f9;margin:0}
main{max-width:1320px;margin:0 auto;padding:14px 28px 48px;background:#fff;min-height:100vh;box-sizing:border-box}
h1{font-size:1.5em;margin:0 0 2px} h2{font-size:1.25em;border-bottom:2px solid #e3e6ec;padding-bottom:3px;margin-top:36px}
h3{font-size:1.05em;margin:22px 0 4px;color:#333a47}
section.headline h2{margin-top:10px;margin-bottom:6px}
.meta{color:#5b6474;font-size:.82em;margin-bottom:4px} nav{font-size:.86em;margin:2px 0 4px}
nav a{margin-right:14px;color:#0a58a8;text-decoration:none} p{line-height:1.45;margin:6px 0}
p.finding{background:#f1f6fd;border-left:4px solid #0a58a8;padding:6px 12px;margin:6px 0}
p.provenance{font-size:.9em;color:#333a47;margin:4px 0 6px}
p.caption{font-weight:600;font-size:.88em;color:#333a47;margin:14px 0 4px}
section.headline p.caption{margin-top:4px} #headline-table th,#headline-table td{padding:3px 6px}
.table-wrap{overflow-x:auto;margin:0 0 12px}
table{border-collapse:collapse;font-size:.86em;min-width:40%}
th,td{border:1px solid #d9dde4;padding:3px 8px;text-align:left;white-space:nowrap}
th{background:#eef1f5} tr:nth-child(even) td{background:#fafbfc}
details{margin:10px 0 14px} summary{cursor:pointer;font-weight:600;font-size:.88em;color:#0a58a8}
figure{margin:10px 0 20px} figure img{max-width:100%;height:auto;border:1px solid #e3e6ec}
figcaption{font-size:.84em;color:#4a5262;margin-top:3px} p.note{color:#5b6474;font-style:italic;font-size:.88em}
div.alert{background:#fdecea;border:2px solid #b3261e;border-left-width:8px;color:#6b130e;padding:8px 14px;
margin:8px 0;font-weight:600;line-height:1.4}
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _id(anchor: str) -> str:
    return f' id="{html.escape(anchor)}"' if anchor else ""


def _html_table(b: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in b.columns)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b.rows)
    table = f'<div class="table-wrap"><table{_id(b.anchor)}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    if b.folded:
        return f"<details><summary>{e(b.caption)} ({len(b.rows)} rows)</summary>{table}</details>"
    return f'<p class="caption">{e(b.caption)}</p>{table}'


def _html_block(b: Block) -> str:
    e = html.escape
    if isinstance(b, Table):
        return _html_table(b)
    if isinstance(b, Figure):
        return (
            f'<figure{_id(b.anchor)}><img src="{_data_uri(b.path)}" alt="{e(b.caption)}">'
            f"<figcaption>{e(b.caption)}</figcaption></figure>"
        )
    if isinstance(b, Note):
        return f'<p class="note">{e(b.text)}</p>'
    if isinstance(b, Alert):
        return f'<div class="alert" role="alert">{e(b.text)}</div>'
    if isinstance(b, Heading):
        return f"<h3>{e(b.text)}</h3>"
    if isinstance(b, Line):
        return f'<p class="{e(b.css)}"{_id(b.anchor)}>{e(b.text)}</p>'
    return f'<p class="finding">{e(b)}</p>'


def render_html(title: str, sections: list[Section], generated: str) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{e(title)}</h1>",
        f'<div class="meta">{e(generated)}</div>',
        *(f'<div class="alert" role="alert">{e(a.text)}</div>' for a in alerts(sections)),
        "<nav>" + "".join(f'<a href="#{s.anchor}">{e(s.title)}</a>' for s in sections) + "</nav>",
    ]
    for s in sections:
        parts.append(f'<section id="{s.anchor}" class="{s.anchor}"><h2>{e(s.title)}</h2>')
        parts += [_html_block(b) for b in s.blocks]
        parts.append("</section>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- Markdown


def _md(text: str) -> str:
    """User-supplied strings (titles, labels, subject ids, model names) as inert Markdown: HTML is
    escaped, so a renderer shows ``<script>`` instead of running it; ``](`` is broken up, so no link
    or image can be formed; a ``|`` cannot end a table cell; one line. (Emphasis characters are left
    alone: they can change how text looks, not what it does, and CIs keep their brackets.)"""
    text = html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")
    return text.replace("](", "]\\(")


def _md_block(b: Block, out_dir: Path) -> list[str]:
    if isinstance(b, Table):
        return [
            f"**{_md(b.caption)}**",
            "",
            "| " + " | ".join(map(_md, b.columns)) + " |",
            "|" + "---|" * len(b.columns),
            *("| " + " | ".join(map(_md, row)) + " |" for row in b.rows),
        ]
    if isinstance(b, Figure):
        return [f"![{_md(b.caption)}]({b.path.relative_to(out_dir).as_posix()})"]
    if isinstance(b, Note):
        return [f"*{_md(b.text)}*"]
    if isinstance(b, Alert):
        return [f"> **Warning.** {_md(b.text)}"]
    if isinstance(b, Heading):
        return [f"### {_md(b.text)}"]
    if isinstance(b, Line):
        return [_md(b.text)]
    return [_md(b)]


def render_markdown(title: str, sections: list[Section], generated: str, out_dir: Path) -> str:
    lines = [f"# {_md(title)}", "", _md(generated), ""]
    lines += [line for a in alerts(sections) for line in (f"> **Warning.** {_md(a.text)}", "")]
    for s in sections:
        lines += [f"## {_md(s.title)}", ""]
        for b in s.blocks:
            lines += [*_md_block(b, out_dir), ""]
    return "\n".join(lines)
