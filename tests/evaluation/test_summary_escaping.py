"""summary.md treats user-supplied strings (titles, labels, subject ids) as text, as report.html does."""

from __future__ import annotations

from volta3d.evaluation.report_doc import Note, Section, Table, render_markdown


def test_user_strings_cannot_inject_html_links_or_cells(tmp_path):
    evil = "<script>alert(1)</script> [click](javascript:alert(1)) a|b\nnext"
    section = Section("Results <b>", "results", [Table(["label", "value"], [[evil, "0.9 [0.8, 1.0]"]], caption=evil),
                                                 Note(evil)])  # fmt: skip
    text = render_markdown(f"title {evil}", [section], "generated", tmp_path)
    assert "<script>" not in text and "<b>" not in text and "&lt;script&gt;" in text
    assert "](javascript" not in text and "]\\(javascript" in text  # no link can form
    table_row = next(line for line in text.splitlines() if line.startswith("| &lt;script"))
    assert table_row.count(" | ") == 1 and "a\\|b" in table_row  # the cell's | does not split the row
    assert "0.9 [0.8, 1.0]" in text  # ordinary brackets (CIs) are kept
    assert text.splitlines()[0].startswith("# title") and text.splitlines()[0].endswith("next")  # one line
