"""The layer mutant zoo: every bug-injected layer in tests/layer_zoo must be caught by the layer
checks, in float32 and in bfloat16, with one of the failure kinds it declares, on drawn cases.

Each mutant is searched with Hypothesis (derandomised, no example database, no shrinking: the
search stops at the first failing case) over drawn layer cases of one dtype; a mutant whose bug
needs a feature of the config (YaRN's temperature, d_r ≥ 4, d_n ≠ d_v, h ≥ 2) is searched over the
drawn configs that have it, and must pass on drawn configs without it. The correct example layer
(its three factories: naive prefill with absorbed decode, naive throughout, absorbed throughout)
and the zoo's template must pass the same search in both dtypes: a zoo without a passing control
proves nothing. A catch table (mutant × dtype → kind, examples to the first failure, seconds) is
printed at the end of the module.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from mla_verify.layer_contract import LayerCase, LayerFailure, check_layer
from mla_verify.strategies import mla_configs

import layer_zoo

DTYPES = ("float32", "bfloat16")
SEARCH_EXAMPLES = 25  # cases drawn per mutant and dtype before giving up
CONTROL_EXAMPLES = 15  # cases each control must pass per dtype
BENIGN_EXAMPLES = 5  # cases without the needed feature on which a mutant must pass

try:  # the stage checks, failure kinds and low-precision bounds of the layer package
    from mla_verify.layer import LAYER_FAILURE_KINDS, LAYER_PROPERTIES
except ImportError:
    LAYER_FAILURE_KINDS, LAYER_PROPERTIES = None, None


def _check(factory, case: LayerCase) -> None:
    """The layer's check against the float64 reference (raises LayerFailure)."""
    if LAYER_PROPERTIES is not None:
        LAYER_PROPERTIES["matches_reference"](factory, case, "cpu")
    else:
        check_layer(factory, case)


def _kind(error: BaseException) -> str:
    if isinstance(error, LayerFailure):
        return getattr(error, "kind", None) or "end to end"
    return "exception"


@st.composite
def _cases(draw: st.DrawFn, dtype: str) -> LayerCase:
    """Tiny drawn configs (q-LoRA on/off, both RoPE layouts, YaRN on/off, up to 3 heads, widths up to
    8), a prefill of 1–6 tokens and one to three decode steps of 1–3 tokens, on 1–2 sequences."""
    return LayerCase(config=draw(mla_configs(max_heads=3, max_width=8), label="config"),
                     batch=draw(st.integers(1, 2), label="batch"), prefill=draw(st.integers(1, 6), label="prefill"),
                     decode=tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3), label="decode")),
                     seed=draw(st.integers(0, 2**31 - 1), label="seed"), dtype=dtype)


@dataclasses.dataclass
class Search:
    error: BaseException | None  # the first failure (None: every drawn case passed)
    examples: int  # cases checked, the failing one included
    case: LayerCase | None
    seconds: float

    @property
    def kind(self) -> str | None:
        return None if self.error is None else _kind(self.error)


def search(factory, dtype: str, max_examples: int, needs=None, with_feature: bool = True) -> Search:
    """Check drawn cases of `dtype` until one fails (no shrinking); with `needs`, only configs that
    have (with_feature) or lack the feature."""
    checked, first = [0], []

    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(case=_cases(dtype))
    def probe(case: LayerCase) -> None:
        if needs is not None:
            assume(needs(case.config) == with_feature)
        if first:  # Hypothesis replays the failing case once more: do not check it again
            raise first[0][0]
        checked[0] += 1
        try:
            _check(factory, case)
        except Exception as error:
            first.append((error, case))
            raise

    started = time.perf_counter()
    try:
        probe()
    except Exception:
        if not first:
            raise
    error, case = first[0] if first else (None, None)
    return Search(error, checked[0], case, time.perf_counter() - started)


_searches: dict[tuple[str, str], Search] = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread(request):
    """One torch thread: on two cores, intra-op threads make these tiny cases slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    _print_table(request.config)


def _needs_bounds(dtype: str) -> None:
    if dtype != "float32" and LAYER_FAILURE_KINDS is None:
        pytest.skip("the uniform-precision layer bound is too loose below float32; the stage bounds of "
                    "mla_verify.layer judge it")


def test_zoo_is_documented():
    assert len(layer_zoo.ZOO) >= 13
    assert len({mutant.name for mutant in layer_zoo.ZOO}) == len(layer_zoo.ZOO)
    for mutant in layer_zoo.ZOO:
        assert mutant.factory.__doc__ and len(mutant.factory.__doc__.split()) > 15, f"{mutant.name}: no docstring"
        assert mutant.kinds
        if LAYER_FAILURE_KINDS is not None:
            assert mutant.kinds <= set(LAYER_FAILURE_KINDS), f"{mutant.name}: {sorted(mutant.kinds)}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mutant", layer_zoo.ZOO, ids=lambda mutant: mutant.name)
def test_mutant_is_caught(mutant, dtype):
    _needs_bounds(dtype)
    found = search(mutant.factory, dtype, SEARCH_EXAMPLES, mutant.needs)
    _searches[(mutant.name, dtype)] = found
    assert found.error is not None, f"{mutant.name} was NOT caught in {found.examples} drawn {dtype} cases"
    message = str(found.error).splitlines()[0]
    if LAYER_FAILURE_KINDS is not None:
        assert found.kind in mutant.kinds, (
            f"{mutant.name} caught as {found.kind!r}, expected one of {sorted(mutant.kinds)}: {message}")
    else:  # until the layer checks name failure kinds: a layer failure, or the layer's own exception
        assert "exception" in mutant.kinds or isinstance(found.error, LayerFailure), message


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mutant", [m for m in layer_zoo.ZOO if m.needs is not None], ids=lambda mutant: mutant.name)
def test_mutant_passes_where_its_bug_does_not_reach(mutant, dtype):
    """On drawn configs without the feature its bug needs, the mutant computes the right layer: the
    catch above is the bug, found on cases that have the feature."""
    _needs_bounds(dtype)
    found = search(mutant.factory, dtype, BENIGN_EXAMPLES, mutant.needs, with_feature=False)
    assert found.error is None, f"{mutant.name} fails without {mutant.needs.__name__}: {found.error}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_wrong_split_is_silently_wrong_when_nope_is_wider_than_v(dtype):
    """The W_UK/W_UV split at d_v raises when d_n < d_v (the slice is short), but with d_n > d_v it
    computes a layer of the right shape with part of W_UK used as W_UV: that must be caught by the
    numbers, not by an exception."""
    _needs_bounds(dtype)
    mutant = next(m for m in layer_zoo.ZOO if m.factory.__name__ == "SplitAtVHeadDim")
    found = search(mutant.factory, dtype, SEARCH_EXAMPLES, lambda c: c.qk_nope_head_dim > c.v_head_dim)
    _searches[(f"{mutant.name} (d_n > d_v)", dtype)] = found
    assert found.error is not None, f"not caught in {found.examples} drawn {dtype} cases with d_n > d_v"
    assert isinstance(found.error, LayerFailure) and found.kind != "exception", found.error


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("control", sorted(layer_zoo.CONTROLS))
def test_control_passes(control, dtype):
    _needs_bounds(dtype)
    found = search(layer_zoo.CONTROLS[control], dtype, CONTROL_EXAMPLES)
    _searches[(control, dtype)] = found
    assert found.error is None, f"control {control} fails on {found.case.describe()}: {found.error}"
    assert found.examples >= CONTROL_EXAMPLES


def _print_table(config) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not _searches:
        return
    lines = ["", f"layer mutant zoo: up to {SEARCH_EXAMPLES} drawn cases per mutant and dtype (controls: "
             f"{CONTROL_EXAMPLES}), derandomised",
             f"{'layer':52} {'dtype':9} {'caught as':18} {'examples':>8} {'seconds':>7}  case"]
    for (name, dtype), found in _searches.items():
        kind = found.kind or "passed"
        case = found.case.describe() if found.case is not None else ""
        lines.append(f"{name[:52]:52} {dtype:9} {kind:18} {found.examples:>8} {found.seconds:7.2f}  {case}")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            for line in lines:
                reporter.write_line(line)
    else:
        for line in lines:
            reporter.write_line(line)
