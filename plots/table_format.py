"""A small table model rendered three ways: Markdown (to read), LaTeX (to paste), CSV (to compute).

The display rows hold formatted strings; the CSV rows hold raw numbers (scores in percent,
KL as floats, empty for "not applicable") so tools and tests never parse a rendered string.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path
from typing import Literal

RowKind = Literal["ours", "paper", "diff", "group"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Table:
    name: str
    """File stem under <out>/tables/."""
    title: str
    header: list[str]
    rows: list[list[str]]
    """Display strings, one list per row, len(header) each (a `group` row holds one string)."""
    kinds: list[RowKind]
    """Per row: our result, the paper's published row, the difference, or a group heading."""
    notes: list[str]
    csv_header: list[str]
    csv_rows: list[list[object]]

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.kinds):
            raise ValueError(f"table {self.name}: {len(self.rows)} rows but {len(self.kinds)} row kinds")
        for i, (row, kind) in enumerate(zip(self.rows, self.kinds)):
            want = 1 if kind == "group" else len(self.header)
            if len(row) != want:
                raise ValueError(f"table {self.name}: row {i} ({kind}) has {len(row)} cells, expected {want}")
        for i, row in enumerate(self.csv_rows):
            if len(row) != len(self.csv_header):
                raise ValueError(
                    f"table {self.name}: csv row {i} has {len(row)} values, expected {len(self.csv_header)}"
                )


def fmt_num(x: float | None, spec: str = ".2f") -> str:
    """Format a number, or "n/a" when missing / NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return format(x, spec)


def fmt_sci(x: float | None, digits: int = 3) -> str:
    """Paper-style scientific notation: 2.54e-4 (not 0.000254 or 2.54e-04); 0 stays "0"."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if x == 0:
        return "0"
    mantissa, exp = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(exp)}"


def to_markdown(t: Table) -> str:
    lines = [f"### {t.title}", "", "| " + " | ".join(t.header) + " |", "|" + "|".join("---" for _ in t.header) + "|"]
    for row, kind in zip(t.rows, t.kinds):
        if kind == "group":
            lines.append(f"| **{row[0]}** |" + " |" * (len(t.header) - 1))
        elif kind in ("paper", "diff"):
            lines.append("| " + " | ".join(f"*{c}*" if c else "" for c in row) + " |")
        else:
            lines.append("| " + " | ".join(row) + " |")
    if t.notes:
        lines.append("")
        lines += [f"- {n}" for n in t.notes]
    return "\n".join(lines) + "\n"


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",  # plain < > print as inverted marks in OT1 fonts
}


def tex_escape(s: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in s)


def to_latex(t: Table) -> str:
    """A `table` float with a booktabs `tabular` (needs \\usepackage{booktabs})."""
    cols = "l" + "r" * (len(t.header) - 1)
    out = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{tex_escape(t.title)}}}",
        rf"\label{{tab:{t.name}}}",
        rf"\begin{{tabular}}{{{cols}}}",
        r"\toprule",
        " & ".join(tex_escape(h) for h in t.header) + r" \\",
        r"\midrule",
    ]
    for i, (row, kind) in enumerate(zip(t.rows, t.kinds)):
        if kind == "group":
            if i > 0:
                out.append(r"\midrule")
            out.append(rf"\multicolumn{{{len(t.header)}}}{{l}}{{\textbf{{{tex_escape(row[0])}}}}} \\")
        elif kind in ("paper", "diff"):
            out.append(" & ".join(rf"\textit{{{tex_escape(c)}}}" if c else "" for c in row) + r" \\")
        else:
            out.append(" & ".join(tex_escape(c) for c in row) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    if t.notes:
        notes = " ".join(tex_escape(n) for n in t.notes)
        out.append(r"\par\vspace{2pt}\parbox{\linewidth}{\footnotesize " + notes + "}")
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def to_csv(t: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(t.csv_header)
    for row in t.csv_rows:
        w.writerow([_csv_value(v) for v in row])
    return buf.getvalue()


def _csv_value(v: object) -> object:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):  # 10 significant digits: drops float noise (55.00000000000001), keeps data
        return format(v, ".10g")
    return v


def write_table(t: Table, out_dir: Path) -> list[Path]:
    """Write <out_dir>/<name>.md, .tex and .csv; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, render in (("md", to_markdown), ("tex", to_latex), ("csv", to_csv)):
        p = out_dir / f"{t.name}.{ext}"
        p.write_text(render(t))
        paths.append(p)
    return paths
