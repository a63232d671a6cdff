"""The HTML report: one self-contained page per certificate (plots embedded as PNG data: URIs, no
external references), failures shown HTML-escaped, older certificates without case records
rendered with a note, and a comparison page for several implementations."""

import base64
import random
import sys
from html.parser import HTMLParser

import pytest

pytest.importorskip("matplotlib")

from mla_verify.certify.report import ReportError, render_comparison_html, render_html, write_html  # noqa: E402

PLOTS = ("ratio-distribution", "ratio-vs-length", "ratio-vs-heads", "coverage-map")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HOSTILE_MESSAGE = "lse off by 3.8x its bound | <script>alert(1)</script> at −inf & beyond"
LENGTHS = (0, 1, 17, 64, 300, 1024, 2048, 4096, 9000, 20000)
FULL_CASE = {"dtype": "bfloat16", "batch": 1, "s_q": 1, "heads": 1, "d": 576, "head_dim_v": 512, "page_size": 64,
             "lengths": [0], "causal": False, "regime": "unit", "scale": "inverse_sqrt_d", "permute_pages": False,
             "strided_cache": False, "extra_blocks": 0, "seed": 0, "layout_seed": 0, "device": "cpu",
             "q_layout": "contiguous", "pooled_cache": False, "sliced_block_table": False}


class PageParser(HTMLParser):
    """Collects the tags with their attributes and the text, as a browser would see them."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    return parser


def text_of(parser: PageParser) -> str:
    return "".join(parser.text)


def plot_images(parser: PageParser) -> dict[str, list[dict]]:
    images: dict[str, list[dict]] = {}
    for tag, attrs in parser.tags:
        if tag == "img" and "data-plot" in attrs:
            images.setdefault(attrs["data-plot"], []).append(attrs)
    return images


def case_records(rng: random.Random, count: int, exact: bool, scale: float = 1.0) -> list[dict]:
    records = []
    for index in range(count):
        sound, sharp = (0.0, 0.0) if exact else (rng.uniform(1e-4, 0.5) * scale, rng.uniform(1e-3, 0.9) * scale)
        records.append({"outcome": "pass", "sound": sound, "sharp": sharp,
                        "dtype": ("bfloat16", "float16", "float32")[index % 3], "heads": (1, 16, 17, 128)[index % 4],
                        "batch": 1 + index % 4, "s_q": 1, "max_length": LENGTHS[index % len(LENGTHS)],
                        "page_size": 64, "regime": ("unit", "tiny", "large", "constant_keys")[index % 4],
                        "causal": index % 2 == 0})
    return records


def certificate(name: str = "torch", scale: float = 1.0, elapsed_s: float = 30.0) -> dict:
    """A failing schema-3 certificate: matches_reference with two failures (one with ratio "inf",
    one with null ratios) and a declined case, and an exact property that passes."""
    rng = random.Random(name)
    reference_cases = case_records(rng, 196, exact=False, scale=scale)
    reference_cases += [
        {"outcome": "fail", "sound": "inf", "sharp": "inf", "dtype": "bfloat16", "heads": 1, "batch": 1, "s_q": 1,
         "max_length": 0, "page_size": 64, "regime": "unit", "causal": False},
        {"outcome": "fail", "sound": None, "sharp": None, "dtype": "float16", "heads": 17, "batch": 2, "s_q": 1,
         "max_length": 20000, "page_size": 64, "regime": "large", "causal": True},
        {"outcome": "fail", "sound": 7.5, "sharp": 12.0, "dtype": "float32", "heads": 16, "batch": 1, "s_q": 1,
         "max_length": 300, "page_size": 64, "regime": "tiny", "causal": False},
        {"outcome": "declined", "sound": None, "sharp": None, "dtype": "float16", "heads": 16, "batch": 1, "s_q": 1,
         "max_length": 64, "page_size": 64, "regime": "unit", "causal": False},
    ]
    return {
        "schema": "mla-verify-certificate/3",
        "implementation": {"name": name, "spec": f"example.{name}:decode", "capabilities": {"dtypes": ["bfloat16"]}},
        "versions": {"mla_verify": "0.1.0", "torch": "2.13.0", "python": "3.12.3"},
        "device": {"type": "cpu", "name": "x86_64"},
        "provenance": {"created": "2026-12-02T01:00:00+00:00", "command": f"mla-verify certify {name} --seed 1",
                       "revision": None, "kernel_source": {"path": "kernels/decode.py", "sha256": "ab12cd34"}},
        "settings": {"profile": "default", "max_examples": 100, "seed": 1, "isolated": False, "strict": False},
        "verdict": "fail",
        "headline": "FAIL: 2 distinct failures",
        "distinct_failures": 2,
        "properties": [
            {"name": "matches_reference", "verdict": "fail", "examples": 200, "passed": 196, "failed": 3,
             "declined": 1, "declined_reasons": {"page size 7 <unsupported>": 1},
             "max_ratio": 0.41 * scale, "max_sharp_ratio": "inf",
             "worst": {"sound": "out at [b, s_q, h, c] = [1, 0, 7, 33]: error 0.0012, tolerance 0.0029",
                       "sharp": ""},
             "worst_case": FULL_CASE, "worst_sharp_case": None,
             "failures": [
                 {"signature": "wrong lse (one head)", "kind": "wrong lse", "message": HOSTILE_MESSAGE,
                  "case": FULL_CASE, "description": "bfloat16 b=1 s_q=1 h=1 described by certify",
                  "counterexample": "counterexamples/xyz", "flaky": False},
                 {"signature": "output mismatch <rows>", "kind": "output mismatch", "message": "rows differ",
                  "case": FULL_CASE, "counterexample": None, "flaky": True}],
             "cases": reference_cases},
            {"name": "deterministic", "verdict": "pass", "examples": 100, "passed": 100, "failed": 0, "declined": 0,
             "max_ratio": 0.0, "max_sharp_ratio": 0.0, "failures": [],
             "cases": case_records(rng, 100, exact=True)},
        ],
        "not_covered": ["dtype float64 (not declared)", "lengths above 32768"],
        "elapsed_s": elapsed_s,
    }


def old_certificate() -> dict:
    """Schema 2: no case records, no headline."""
    return {"schema": "mla-verify-certificate/2", "implementation": {"name": "legacy", "spec": "old:decode"},
            "verdict": "pass with declined cases",
            "properties": [{"name": "matches_reference", "verdict": "pass with declined cases", "examples": 150,
                            "passed": 147, "failed": 0, "declined": 3, "max_ratio": 0.3, "max_sharp_ratio": 0.6,
                            "failures": []},
                           {"name": "deterministic", "verdict": "pass", "examples": 50, "passed": 50, "failed": 0,
                            "declined": 0, "max_ratio": 0.0}]}


@pytest.fixture(scope="module")
def page() -> str:
    return render_html(certificate())


@pytest.fixture(scope="module")
def comparison_page() -> str:
    return render_comparison_html([certificate("torch", elapsed_s=30.0),
                                   certificate("triton", scale=0.6, elapsed_s=6.0)])


def assert_four_embedded_plots(parser: PageParser) -> None:
    images = plot_images(parser)
    assert sorted(images) == sorted(PLOTS)
    for name in PLOTS:
        assert len(images[name]) == 1, name
        attrs = images[name][0]
        assert attrs["alt"]
        prefix = "data:image/png;base64,"
        assert attrs["src"].startswith(prefix), name
        png = base64.b64decode(attrs["src"][len(prefix):], validate=True)
        assert png.startswith(PNG_SIGNATURE), name
        assert len(png) > 5000, name


def assert_self_contained(parser: PageParser) -> None:
    for tag, attrs in parser.tags:
        assert tag not in ("script", "link", "iframe"), tag
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            assert not value.startswith(("http://", "https://", "//")), (tag, value)


def test_the_page_embeds_the_four_plots_as_png(page):
    parser = parse(page)
    assert_four_embedded_plots(parser)
    figures = [tag for tag, _ in parser.tags if tag == "figure"]
    captions = [tag for tag, _ in parser.tags if tag == "figcaption"]
    assert len(figures) == len(captions) == 4


def test_the_page_has_no_external_references(page):
    assert_self_contained(parse(page))
    assert "http://" not in page and "https://" not in page


def test_the_headline_and_each_failure_are_shown(page):
    text = text_of(parse(page))
    assert "MLA decode certificate: torch — FAIL: 2 distinct failures" in text
    assert 'class="verdict-fail"' in page
    assert "wrong lse (one head)" in text
    assert "output mismatch <rows>" in text
    assert "(flaky)" in text
    assert "bfloat16 b=1 s_q=1 h=1 described by certify" in text
    # no description recorded: described through DecodeCase
    assert "bfloat16 b=1 s_q=1 h=1 d=576/512 page=64 lengths=[0]" in text
    assert "mla-verify replay counterexamples/xyz" in text


def test_failure_messages_are_html_escaped(page):
    parser = parse(page)
    assert HOSTILE_MESSAGE in text_of(parser)  # the reader sees the message as written...
    assert "<script>" not in page  # ...and the browser never sees a tag in it
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "output mismatch &lt;rows&gt;" in page
    assert not any(tag == "script" for tag, _ in parser.tags)


def test_the_summary_table_reads_non_finite_strings(page):
    parser = parse(page)
    text = text_of(parser)
    header = ["property", "verdict", "cases", "passed", "failed", "declined", "max error/bound (sound)",
              "max error/tolerance (sharp)"]
    assert "".join(header) in text
    assert "matches_referencefail200196310.41∞" in text
    assert "deterministicpass100100000" in text
    assert "error/bound is the observed error divided by the tolerance the case allows; ≤ 1 passes." in text
    assert "page size 7 <unsupported>" in text
    assert "out at [b, s_q, h, c] = [1, 0, 7, 33]: error 0.0012, tolerance 0.0029" in text


def test_the_plot_captions_count_what_the_log_axis_leaves_out(page):
    text = text_of(parse(page))
    # 100 exact cases, 2 failures without a finite ratio ("inf" and null)
    assert "Left out: 100 passing cases with ratio 0" in text
    assert "2 failing cases without a finite ratio" in text


def test_provenance_settings_and_not_covered(page):
    text = text_of(parse(page))
    for expected in ("version: torch2.13.0", "devicecpu (x86_64)", "setting: profiledefault", "setting: seed1",
                     "provenance: commandmla-verify certify torch --seed 1", "path=kernels/decode.py, sha256=ab12cd34",
                     "dtype float64 (not declared)", "lengths above 32768"):
        assert expected in text, expected
    assert "provenance: revision" not in text  # null fields are left out


def test_an_old_certificate_gets_a_note_instead_of_plots():
    page = render_html(old_certificate())
    parser = parse(page)
    text = text_of(parser)
    assert plot_images(parser) == {}
    assert not any(tag == "img" for tag, _ in parser.tags)
    assert "No per-case records" in text and "there are no plots" in text
    assert "PASS with declined cases (3 of 200 cases declined)" in text  # rebuilt: schema 2 has no headline
    assert 'class="verdict-declined"' in page
    assert "matches_reference" in text
    assert_self_contained(parser)


def test_the_comparison_page_tables_and_overlays_both_implementations(comparison_page):
    parser = parse(comparison_page)
    text = text_of(parser)
    assert "MLA decode certificates compared: torch, triton" in text
    header = ["implementation", "verdict", "distinct failures", "largest error/bound (sound)",
              "largest error/tolerance (sharp)", "time per case"]
    assert "".join(header) in text
    # 300 cases each: 30 s and 6 s
    assert "torchFAIL: 2 distinct failures20.41∞100 ms" in text
    assert "tritonFAIL: 2 distinct failures20.246∞20 ms" in text
    assert_four_embedded_plots(parser)
    assert_self_contained(parser)
    assert "ratio-distribution" in comparison_page and "(torch, triton)" in text


def test_the_comparison_notes_an_implementation_without_records():
    page = render_comparison_html([certificate("torch"), old_certificate()])
    parser = parse(page)
    text = text_of(parser)
    assert "legacy (schema mla-verify-certificate/2)" in text and "its cases are not plotted" in text
    assert sorted(plot_images(parser)) == sorted(PLOTS)


def test_write_html_writes_utf8(tmp_path):
    path = tmp_path / "report.html"
    write_html("≤ 1 − ∞", path)
    assert path.read_bytes() == "≤ 1 − ∞".encode("utf-8")


def test_missing_matplotlib_is_a_report_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(ReportError, match=r"pip install 'mla-verify\[report\]'"):
        render_html(old_certificate())
