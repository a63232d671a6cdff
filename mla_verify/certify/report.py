"""Render certificates as one self-contained HTML page each, for people rather than for tools.

The JSON certificate is the record; this page is how a reader takes it in: the verdict and every
distinct failure first (with the command that replays it), then the per-property numbers, then
plots of the per-case error/bound ratios (how close the kernel sits to its tolerance, where in
length / head count / dtype × regime it gets close, and what was never drawn), then provenance.

The page has no external references at all (no CSS, scripts, fonts or images from elsewhere):
plots are PNGs embedded as data: URIs, so the file can be attached to a bug report or archived as
it is. Plotting uses matplotlib `Figure` objects directly, never pyplot, so rendering a report
changes no global matplotlib state for the program that imports this module. matplotlib is an
optional extra and is imported only when a page is rendered.

Certificates are read defensively: older schemas lack fields (the per-case records arrived with
"mla-verify-certificate/3"), and non-finite floats may be written as the strings "inf" / "nan".
"""

from __future__ import annotations

import base64
import html
import io
import math
import shlex
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Iterable

from mla_verify.decode.case import DecodeCase

__all__ = ["ReportError", "render_comparison_html", "render_html", "write_html"]

MISSING_MATPLOTLIB = "the HTML report needs matplotlib: pip install 'mla-verify[report]'"
FIGURE_DPI = 90  # sharp enough on screen while keeping each embedded PNG small
TIERS = ("sound", "sharp")
TIER_MARKERS = {"sound": "o", "sharp": "^"}
# Context-length bands of the coverage map: empty rows, within a typical page, short prompts,
# below the 4096 "serving" threshold, long contexts, and very long ones.
LENGTH_BANDS = ((0, 0, "0"), (1, 64, "1–64"), (65, 1024, "65–1024"), (1025, 4095, "1025–4095"),
                (4096, 16383, "4096–16383"), (16384, math.inf, "≥16384"))
RATIO_LEGEND = ("error/bound is the observed error divided by the tolerance the case allows; ≤ 1 passes. "
                "Sound tier: a worst-case rounding bound per element; sharp tier: a probabilistic rounding "
                "model per row and lse.")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0; } th, td { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f3f3f3; text-align: left; } td.number { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f5f5f5; padding: 0 .2em; word-break: break-all; }
.verdict-pass { color: #11772d; } .verdict-declined { color: #a86400; } .verdict-fail { color: #b00020; }
.verdict-unknown { color: #555; }
.failure { border-left: 4px solid #b00020; padding: .3em 1em; margin: 1em 0; background: #fff6f6; }
.note { color: #555; font-style: italic; }
figure { margin: 1.5em 0; } figcaption { color: #444; max-width: 60em; } img { max-width: 100%; }
"""


class ReportError(Exception):
    """The report cannot be rendered (matplotlib is missing)."""


def render_html(certificate: dict) -> str:
    """One certificate as a self-contained HTML page: verdict and failures, per-property summary,
    per-case plots (when the certificate has case records) and provenance."""
    _require_matplotlib()
    name = _implementation_name(certificate)
    headline = _headline(certificate)
    body = [f"<h1>MLA {_kind_title(certificate)} certificate: {_escape(name)} — "
            f"{_verdict_span(certificate, headline)}</h1>",
            _precision_block(certificate),
            _failures_section(certificate),
            _summary_section(certificate),
            _plots_section([certificate], multiple=False),
            "<h2>Provenance and settings</h2>",
            _provenance_block(certificate)]
    return _page(f"{name}: {headline}", body)


def render_comparison_html(certificates: list[dict]) -> str:
    """Several implementations certified on the same drawn cases, side by side: one table row per
    implementation, then the per-case plots with one series per implementation."""
    _require_matplotlib()
    names = [_implementation_name(c) for c in certificates]
    kind = _kind_title(certificates[0]) if certificates else "decode"
    body = [f"<h1>MLA {kind} certificates compared: {_escape(', '.join(names))}</h1>",
            _comparison_table(certificates),
            f'<p class="legend">{_escape(RATIO_LEGEND)}</p>',
            _plots_section(certificates, multiple=True),
            "<h2>Provenance and settings</h2>"]
    for certificate, name in zip(certificates, names):
        body.append(f"<h3>{_escape(name)}</h3>")
        body.append(_provenance_block(certificate))
    return _page(f"MLA {kind} certificates: " + ", ".join(names), body)


def write_html(text: str, path: str | Path) -> None:
    """Write a rendered page; UTF-8 explicitly, since the page contains ≤, −, ∞ and the like."""
    Path(path).write_text(text, encoding="utf-8")


# --- reading the certificate -------------------------------------------------------------------

def _number(value: object) -> float | None:
    """A float from a certificate value: JSON has no inf/nan, so they arrive as strings."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _is_layer(certificate: dict) -> bool:
    return (certificate.get("implementation") or {}).get("kind") == "layer"


def _kind_title(certificate: dict) -> str:
    return "layer" if _is_layer(certificate) else "decode"


def _precision_block(certificate: dict) -> str:
    """A layer's precision class and the dtypes certified (nothing for a decode kernel)."""
    if not _is_layer(certificate):
        return ""
    implementation = certificate.get("implementation") or {}
    rows = [[_escape(dtype), _escape(label), _escape((implementation.get("precision") or {}).get(dtype, "–"))]
            for dtype, label in (implementation.get("precision_classes") or {}).items()]
    lines = [f"<p>Precision class: <strong>{_escape(implementation.get('precision_class') or 'unknown')}</strong>; "
             f"dtypes certified: {_escape(', '.join(implementation.get('dtypes') or []) or 'none')}.</p>"]
    if rows:
        lines.append(_table(["dtype", "precision class", "declared step types"], rows))
    return "\n".join(lines)


def _implementation_name(certificate: dict) -> str:
    return str((certificate.get("implementation") or {}).get("name") or "unnamed implementation")


def _properties(certificate: dict) -> list[dict]:
    return [p for p in certificate.get("properties") or [] if isinstance(p, dict)]


def _failures(prop: dict) -> list[dict]:
    """The property's failures; schema 1 had at most one, as `failure` + `counterexample`."""
    if isinstance(prop.get("failures"), list):
        return [f for f in prop["failures"] if isinstance(f, dict)]
    if prop.get("failure"):
        return [{"signature": "failure", "message": str(prop["failure"]),
                 "counterexample": prop.get("counterexample")}]
    return []


def _distinct_failures(certificate: dict) -> int:
    count = _number(certificate.get("distinct_failures"))
    if count is not None:
        return int(count)
    return len({f.get("signature") for p in _properties(certificate) for f in _failures(p)})


def _total_examples(certificate: dict) -> int:
    return sum(int(_number(p.get("examples")) or 0) for p in _properties(certificate))


def _headline(certificate: dict) -> str:
    """The certificate's own headline, or the same sentence rebuilt for schemas that lack it."""
    if isinstance(certificate.get("headline"), str):
        return certificate["headline"]
    verdict = certificate.get("verdict")
    if verdict == "fail":
        n = _distinct_failures(certificate)
        return f"FAIL: {n} distinct failure{'s' if n != 1 else ''}"
    if verdict == "pass with declined cases":
        declined = sum(int(_number(p.get("declined")) or 0) for p in _properties(certificate))
        return f"PASS with declined cases ({declined} of {_total_examples(certificate)} cases declined)"
    if verdict == "pass":
        return "PASS"
    return f"verdict {verdict or 'missing'}"


def _verdict_class(verdict: object) -> str:
    return {"pass": "verdict-pass", "pass with declined cases": "verdict-declined",
            "fail": "verdict-fail"}.get(str(verdict), "verdict-unknown")


def _describe_case(case: dict | None, description: object = None) -> str:
    """A one-line case description: the certificate's own if written, else DecodeCase's or
    LayerCase's, else a compact key=value listing (for case dicts from another version)."""
    if description:
        return str(description)
    if not case:
        return "no case recorded"
    try:
        if isinstance(case, dict) and "config" in case:
            from mla_verify.layer import LayerCase

            return LayerCase.from_dict(case).describe()
        return DecodeCase.from_dict(case).describe()
    except Exception:  # noqa: BLE001 - any mismatch with this DecodeCase means: describe it generically
        return _compact(case)


def _compact(mapping: object) -> str:
    if isinstance(mapping, dict):
        return ", ".join(f"{key}={_compact(value)}" for key, value in mapping.items())
    if isinstance(mapping, (list, tuple)):
        return "[" + ", ".join(_compact(item) for item in mapping) + "]"
    return str(mapping)


# --- formatting --------------------------------------------------------------------------------

def _escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def _format_ratio(value: object) -> str:
    number = _number(value)
    if number is None:
        return "–"
    if math.isnan(number):
        return "nan"
    if math.isinf(number):
        return "∞" if number > 0 else "−∞"
    return f"{number:.3g}"


def _format_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    return f"{seconds:.3g} s"


def _verdict_span(certificate: dict, text: str) -> str:
    return f'<span class="{_verdict_class(certificate.get("verdict"))}">{_escape(text)}</span>'


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], numeric: Collection[int] = ()) -> str:
    """An HTML table from already-escaped cells; `numeric` columns are right-aligned."""
    lines = ["<table>", "<tr>" + "".join(f"<th>{_escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = (f'<td class="number">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
                 for i, cell in enumerate(row))
        lines.append("<tr>" + "".join(cells) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _page(title: str, body: list[str]) -> str:
    return "\n".join(["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                      f"<title>{_escape(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
                      *body, "</body>", "</html>", ""])


# --- sections ----------------------------------------------------------------------------------

def _failures_section(certificate: dict) -> str:
    blocks = []
    for prop in _properties(certificate):
        failures = _failures(prop)
        for number, failure in enumerate(failures, 1):
            blocks.append(_failure_block(prop.get("name", "?"), number, len(failures), failure))
    if not blocks:
        return ""
    return "<h2>Distinct failures</h2>\n" + "\n".join(blocks)


def _failure_block(property_name: str, number: int, total: int, failure: dict) -> str:
    lines = ['<div class="failure">',
             f"<h3>{_escape(property_name)}: failure {number} of {total} — "
             f"{_escape(failure.get('signature', 'unnamed failure'))}"
             + (" (flaky)" if failure.get("flaky") else "") + "</h3>",
             f"<p>{_escape(failure.get('message', ''))}</p>",
             f"<p>minimal case: <code>{_escape(_describe_case(failure.get('case'), failure.get('description')))}"
             "</code></p>"]
    path = failure.get("counterexample")
    if path:
        lines.append(f"<p>counterexample: <code>{_escape(path)}</code>; replay: "
                     f"<code>{_escape('mla-verify replay ' + shlex.quote(str(path)))}</code></p>")
    lines.append("</div>")
    return "\n".join(lines)


def _summary_section(certificate: dict) -> str:
    rows = []
    for prop in _properties(certificate):
        verdict = prop.get("verdict", "?")
        rows.append([_escape(prop.get("name", "?")),
                     f'<span class="{_verdict_class(verdict)}">{_escape(verdict)}</span>',
                     *(_escape("–" if prop.get(key) is None else prop[key])
                       for key in ("examples", "passed", "failed", "declined")),
                     _format_ratio(prop.get("max_ratio")), _format_ratio(prop.get("max_sharp_ratio"))])
    table = _table(["property", "verdict", "cases", "passed", "failed", "declined", "max error/bound (sound)",
                    "max error/tolerance (sharp)"], rows, numeric={2, 3, 4, 5, 6, 7})
    details = [detail for prop in _properties(certificate) for detail in _property_details(prop)]
    return "\n".join(["<h2>Summary</h2>", table, f'<p class="legend">{_escape(RATIO_LEGEND)}</p>',
                      *(["<ul>", *details, "</ul>"] if details else [])])


def _property_details(prop: dict) -> list[str]:
    """List items for where each tier's worst passing case sits and why cases were declined."""
    name = _escape(prop.get("name", "?"))
    items = []
    worst = prop.get("worst") or {}
    for tier, case_key in (("sound", "worst_case"), ("sharp", "worst_sharp_case")):
        where, case = worst.get(tier), prop.get(case_key)
        if not where and not case:
            continue
        parts = []
        if where:
            # the certifier writes "out at [b, s_q, h, c] = [...]: error …, tolerance …"
            parts.append(f"<code>{_escape(where)}</code>")
        if case:
            described = (prop.get("worst_description") or {}).get(tier)
            parts.append(f"case <code>{_escape(_describe_case(case, described))}</code>")
        items.append(f"<li>{name}, worst passing case ({tier}): {'; '.join(parts)}</li>")
    for reason, count in (prop.get("declined_reasons") or {}).items():
        items.append(f"<li>{name} declined {_escape(count)} × {_escape(reason)}</li>")
    return items


def _comparison_table(certificates: list[dict]) -> str:
    rows = []
    for certificate in certificates:
        props = _properties(certificate)
        elapsed, examples = _number(certificate.get("elapsed_s")), _total_examples(certificate)
        per_case = _format_seconds(elapsed / examples) if elapsed is not None and examples else "–"
        rows.append([_escape(_implementation_name(certificate)), _verdict_span(certificate, _headline(certificate)),
                     str(_distinct_failures(certificate)), _format_ratio(_largest(props, "max_ratio")),
                     _format_ratio(_largest(props, "max_sharp_ratio")), _escape(per_case)])
    return _table(["implementation", "verdict", "distinct failures", "largest error/bound (sound)",
                   "largest error/tolerance (sharp)", "time per case"], rows, numeric={2, 3, 4, 5})


def _largest(props: list[dict], key: str) -> float | None:
    values = [v for v in (_number(p.get(key)) for p in props) if v is not None]
    return max(values, default=None)


def _provenance_block(certificate: dict) -> str:
    implementation = certificate.get("implementation") or {}
    settings = certificate.get("settings") or {}
    rows: list[tuple[str, object]] = [("schema", certificate.get("schema")),
                                      ("implementation", implementation.get("spec")),
                                      ("capabilities", implementation.get("capabilities"))]
    rows += [(f"version: {package}", version) for package, version in (certificate.get("versions") or {}).items()]
    device = certificate.get("device") or {}
    if device:
        rows.append(("device", f"{device.get('type', '?')} ({device.get('name', '?')})"))
    rows += [(f"setting: {key}", settings.get(key)) for key in
             ("profile", "max_examples", "seed", "isolated", "strict", "properties", "limits")]
    rows += [(f"provenance: {key}", value) for key, value in (certificate.get("provenance") or {}).items()]
    elapsed = _number(certificate.get("elapsed_s"))
    rows.append(("elapsed", f"{elapsed:.1f} s" if elapsed is not None else None))
    table = _table(["field", "value"], ([_escape(key), _escape(_compact(value))]
                                         for key, value in rows if value not in (None, "", {}, [])))
    not_covered = certificate.get("not_covered") or []
    if not not_covered:
        return table + "\n<p>Not covered: nothing declared out.</p>"
    return (table + "\n<p>Not covered:</p>\n<ul>\n"
            + "\n".join(f"<li>{_escape(item)}</li>" for item in not_covered) + "\n</ul>")


# --- per-case records --------------------------------------------------------------------------

@dataclass(frozen=True)
class _CaseRecord:
    """One case of one property, with the implementation it belongs to (the comparison plots
    draw one series per implementation)."""

    implementation: str
    prop: str
    outcome: str
    sound: float | None
    sharp: float | None
    dtype: str
    regime: str
    heads: float | None
    max_length: float | None

    def ratio(self, tier: str) -> float | None:
        return self.sound if tier == "sound" else self.sharp

    @property
    def failed(self) -> bool:
        return self.outcome == "fail"


def _case_records(certificate: dict) -> list[_CaseRecord]:
    name = _implementation_name(certificate)
    return [_CaseRecord(implementation=name, prop=str(prop.get("name", "?")), outcome=str(case.get("outcome", "?")),
                        sound=_number(case.get("sound")), sharp=_number(case.get("sharp")),
                        dtype=str(case.get("dtype", "?")), regime=str(case.get("regime", "?")),
                        heads=_number(case.get("heads")), max_length=_number(case.get("max_length")))
            for prop in _properties(certificate) for case in prop.get("cases") or [] if isinstance(case, dict)]


def _is_plottable_ratio(value: float | None) -> bool:
    """Only finite positive ratios fit on a log axis; 0 (an exact property's pass) and ∞ / null
    (a failure with no finite error/bound) are counted instead."""
    return value is not None and math.isfinite(value) and value > 0


def _length_band(length: float | None) -> str | None:
    if length is None:
        return None
    return next((label for low, high, label in LENGTH_BANDS if low <= length <= high), None)


# --- plots -------------------------------------------------------------------------------------

def _require_matplotlib() -> None:
    try:
        import matplotlib.figure  # noqa: F401 - only checking that it is there
    except ImportError as error:
        raise ReportError(MISSING_MATPLOTLIB) from error


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=FIGURE_DPI, layout="constrained")


def _png_data_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure_html(name: str, figure, alt: str, caption: str) -> str:
    return (f'<figure>\n<img data-plot="{_escape(name)}" alt="{_escape(alt)}" src="{_png_data_uri(figure)}">\n'
            f"<figcaption>{_escape(caption)}</figcaption>\n</figure>")


def _plots_section(certificates: list[dict], multiple: bool) -> str:
    """The four plots over every certificate that has case records; a note instead for those
    without (schemas before 3)."""
    records_of = [(certificate, _case_records(certificate)) for certificate in certificates]
    with_records = [certificate for certificate, records in records_of if records]
    without = [certificate for certificate, records in records_of if not records]
    parts = ["<h2>Per-case plots</h2>"]
    if without:
        parts.append('<p class="note">No per-case records in the certificate of '
                     + _escape(", ".join(f"{_implementation_name(c)} (schema {c.get('schema', 'unknown')})"
                                         for c in without))
                     + "; those need schema mla-verify-certificate/3 or later, so "
                     + ("its cases are not plotted." if with_records else "there are no plots.") + "</p>")
    if not with_records:
        return "\n".join(parts)
    records = [record for _, certificate_records in records_of for record in certificate_records]
    implementations = list(dict.fromkeys(_implementation_name(c) for c in with_records))
    parts += [_ratio_distribution_plot(records, implementations, multiple),
              _ratio_scatter_plot(records, implementations, "ratio-vs-length", "context length (max_length)",
                                  lambda r: r.max_length, "symlog"),
              _ratio_scatter_plot(records, implementations, "ratio-vs-heads", "heads", lambda r: r.heads, "log"),
              _coverage_map_plot(records, implementations, multiple,
                                 "config" if all(_is_layer(c) for c in with_records) else "regime")]
    return "\n".join(parts)


def _ratio_distribution_plot(records: list[_CaseRecord], implementations: list[str], multiple: bool) -> str:
    """Histograms of error/bound, one panel per tier, one step line per property (per implementation
    and property on a comparison page)."""
    import numpy as np

    figure = _new_figure(10, 3.6)
    axes = figure.subplots(1, 2, sharey=True)
    exact = sum(1 for r in records if r.outcome == "pass" and not any(map(_is_plottable_ratio, (r.sound, r.sharp))))
    unplottable_failures = sum(1 for r in records if r.failed and not any(map(_is_plottable_ratio,
                                                                              (r.sound, r.sharp))))
    for ax, tier in zip(axes, TIERS):
        series = defaultdict(list)
        for record in records:
            if _is_plottable_ratio(record.ratio(tier)):
                label = f"{record.implementation}: {record.prop}" if multiple else record.prop
                series[label].append(record.ratio(tier))
        ax.set_title(f"{tier} tier")
        ax.set_xlabel("error / bound")
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="bound (ratio 1)")
        ax.set_xscale("log")
        if series:
            values = [v for vs in series.values() for v in vs]
            bins = np.geomspace(min(values) * 0.9, max(max(values), 1.0) * 1.1, 40)
            for index, (label, vs) in enumerate(series.items()):
                ax.hist(vs, bins=bins, histtype="step", linewidth=1.5, color=f"C{index % 10}", label=label)
        else:
            ax.text(0.5, 0.5, "no nonzero finite ratios", transform=ax.transAxes, ha="center", color="gray")
        ax.legend(fontsize="small")
    axes[0].set_ylabel("cases")
    caption = (f"Distribution of error/bound per property and tier ({', '.join(implementations)}). Left out: "
               f"{exact} passing cases with ratio 0 in both tiers (exact properties: no error at all) and "
               f"{unplottable_failures} failing cases without a finite ratio.")
    return _figure_html("ratio-distribution", figure, "histograms of error/bound per property and tier", caption)


def _ratio_scatter_plot(records: list[_CaseRecord], implementations: list[str], name: str, xlabel: str,
                        x_of: Callable[[_CaseRecord], float | None], xscale: str) -> str:
    """error/bound against one case dimension: one marker per tier, one colour pair per
    implementation, failures as red crosses (those with no finite ratio on a line above the rest)."""
    from matplotlib import colormaps

    palette = colormaps["tab20"]  # pairs of one hue: dark for sound, light for sharp
    figure = _new_figure(8, 4)
    ax = figure.subplots()
    passing = [r for r in records if not r.failed and x_of(r) is not None]
    failing = [r for r in records if r.failed and x_of(r) is not None]
    finite = [r.ratio(t) for r in records for t in TIERS if _is_plottable_ratio(r.ratio(t))]
    ceiling = max(finite + [1.0]) * 3  # where failures without a finite ratio are drawn
    for series_index, implementation in enumerate(implementations):
        for tier_index, tier in enumerate(TIERS):
            points = [(x_of(r), r.ratio(tier)) for r in passing
                      if r.implementation == implementation and _is_plottable_ratio(r.ratio(tier))]
            if points:
                xs, ys = zip(*points)
                label = tier if len(implementations) == 1 else f"{implementation} ({tier})"
                ax.scatter(xs, ys, s=14, marker=TIER_MARKERS[tier], alpha=0.6, label=label,
                           color=palette((2 * series_index + tier_index) % 20))
    if failing:
        ys = [max((r.ratio(t) for t in TIERS if _is_plottable_ratio(r.ratio(t))), default=ceiling) for r in failing]
        ax.scatter([x_of(r) for r in failing], ys, s=60, marker="X", color="crimson", edgecolor="black",
                   linewidth=0.5, label="failures", zorder=3)
        if ceiling in ys:
            ax.axhline(ceiling, color="crimson", linestyle=":", linewidth=1, label="failures without a finite ratio")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="bound (ratio 1)")
    if xscale == "symlog":
        # length 0 (empty rows) is a real case and must stay on the axis: linear below 1, and the
        # limits set by hand because autoscaling a symlog axis reaches far into negative lengths
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(-0.8, max([x_of(r) for r in passing + failing] + [1.0]) * 2)
    else:
        ax.set_xscale(xscale, base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("error / bound")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: the points fill the axes
    caption = (f"error/bound against {xlabel}, passing cases per tier; failures marked with a red cross "
               f"(cases with ratio 0, from exact properties, are not drawn on the log axis).")
    return _figure_html(name, figure, f"scatter of error/bound against {xlabel}", caption)


def _coverage_map_plot(records: list[_CaseRecord], implementations: list[str], multiple: bool,
                       column: str = "regime") -> str:
    """dtype × regime heatmaps (a layer's records name its config, preset or drawn, as the regime),
    one panel per length band: the count of cases in each cell, coloured by the worst sharp ratio
    there, so both untested corners and near-misses stand out."""
    import numpy as np
    from matplotlib import colormaps

    def row_of(record: _CaseRecord) -> tuple[int, str]:
        return implementations.index(record.implementation), record.dtype

    rows = sorted({row_of(r) for r in records})
    row_labels = [f"{implementations[i]} · {dtype}" if multiple else dtype for i, dtype in rows]
    regimes = sorted({r.regime for r in records})
    cells: dict[tuple[str, tuple[int, str], str], list[_CaseRecord]] = defaultdict(list)
    for record in records:
        band = _length_band(record.max_length)
        if band is not None:
            cells[band, row_of(record), record.regime].append(record)

    colormap = colormaps["viridis"].with_extremes(over="crimson", bad="#e8e8e8")
    figure = _new_figure(11, 3 * (1.2 + 0.35 * len(rows)))
    axes = figure.subplots(3, 2, sharex=True, sharey=True).flatten()
    image = None
    for ax, (_, _, band) in zip(axes, LENGTH_BANDS):
        worst = np.full((len(rows), len(regimes)), np.nan)
        in_band = 0
        for i, row in enumerate(rows):
            for j, regime in enumerate(regimes):
                cell = cells.get((band, row, regime), [])
                in_band += len(cell)
                worst[i, j] = _worst_sharp(cell)
                if cell:
                    failures = sum(r.failed for r in cell)
                    text = f"{len(cell)}" + (f"\n{failures} fail" if failures else "")
                    dark = not math.isnan(worst[i, j]) and worst[i, j] < 0.5
                    ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
        image = ax.imshow(np.ma.masked_invalid(worst), cmap=colormap, vmin=0, vmax=1, aspect="auto")
        ax.set_title(f"length {band} ({in_band} cases)", fontsize=9)
        ax.set_xticks(range(len(regimes)), regimes, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), row_labels, fontsize=7)
    figure.colorbar(image, ax=axes, extend="max", label="worst sharp error/tolerance")
    caption = (f"Cases per dtype × {column} in each context-length band (all properties together; the number is "
               "the count of cases). Colour: the worst sharp error/tolerance in the cell; red: the cell has a "
               "failure; grey: nothing drawn there, or only declined cases.")
    return _figure_html("coverage-map", figure, f"coverage map: dtype by {column} per context-length band", caption)


def _worst_sharp(cell: list[_CaseRecord]) -> float:
    """The colour value of a coverage cell: a failure shows as over-range whatever its ratio, since
    its ratio may be null or ∞; NaN (grey) when no case there has a sharp ratio."""
    if any(r.failed for r in cell):
        return 2.0
    ratios = [r.sharp for r in cell if r.sharp is not None and math.isfinite(r.sharp)]
    return max(ratios) if ratios else math.nan
