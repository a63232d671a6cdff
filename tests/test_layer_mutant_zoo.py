"""The layer mutant zoo: every bug-injected layer in tests/layer_zoo must be caught by the layer
property matches_reference (stage checks and end to end), in float32 and in bfloat16, with one of
the failure kinds it declares, on drawn cases.

Each mutant is searched with Hypothesis (derandomised, no example database, no shrinking: the
search stops at the first failing case) over drawn layer cases of one dtype
(`mla_verify.layer.layer_cases`: drawn configs and shrunk presets, page-edge prefills, decode
steps, weight and activation scales); a mutant whose bug needs a feature of the config (YaRN's
temperature, d_r ≥ 4, d_n ≠ d_v, h ≥ 2) is searched over the drawn configs that have it, and must
pass on drawn configs without it. The correct example layer (its three factories: naive prefill
with absorbed decode, naive throughout, absorbed throughout), the zoo's template and the fast layer
must pass every layer property on the same search in both dtypes: a zoo without a passing control
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

from mla_verify.impls.fast_layer import fast_layer_torch_decode
from mla_verify.layer import LAYER_FAILURE_KINDS, LAYER_PROPERTIES, LayerCase, LayerFailure, layer_cases

import layer_zoo

DTYPES = ("float32", "bfloat16")
SEARCH_EXAMPLES = 25  # cases drawn per mutant and dtype before giving up
CONTROL_EXAMPLES = 15  # cases each control must pass per dtype
BENIGN_EXAMPLES = 5  # cases without the needed feature on which a mutant must pass
CONTROLS = {**layer_zoo.CONTROLS, "fast layer (torch decode, 16-token pages)": fast_layer_torch_decode}


def _cases(dtype: str) -> st.SearchStrategy[LayerCase]:
    """Tiny layers (up to 3 heads, widths up to 8), prefills up to 20 tokens (page edges 15, 16, 17
    drawn often), up to three decode calls of 1–3 tokens."""
    return layer_cases(dtypes=(dtype,), max_heads=3, max_width=8, max_length=20, max_decode_steps=3)


@dataclasses.dataclass
class Search:
    error: BaseException | None  # the first failure (None: every drawn case passed)
    examples: int  # cases checked, the failing one included
    case: LayerCase | None
    seconds: float

    @property
    def kind(self) -> str | None:
        if self.error is None:
            return None
        return self.error.kind if isinstance(self.error, LayerFailure) else f"raised {type(self.error).__name__}"

    @property
    def stage(self) -> str | None:
        return getattr(self.error, "stage", None)

    @property
    def ratio(self) -> str:
        """error/bound of the failing check ("" for an exception or a pass)."""
        ratio = getattr(self.error, "ratio", None)
        return "" if ratio is None else f"{ratio:.3g}"


def search(factory, dtype: str, max_examples: int, needs=None, with_feature: bool = True,
           properties: tuple[str, ...] = ("matches_reference",)) -> Search:
    """Check drawn cases of `dtype` by `properties` until one fails (no shrinking); with `needs`,
    only configs that have (with_feature) or lack the feature."""
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
            for name in properties:
                LAYER_PROPERTIES[name](factory, case, "cpu")
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


def test_zoo_is_documented():
    assert len(layer_zoo.ZOO) >= 13
    assert len({mutant.name for mutant in layer_zoo.ZOO}) == len(layer_zoo.ZOO)
    for mutant in layer_zoo.ZOO:
        assert mutant.factory.__doc__ and len(mutant.factory.__doc__.split()) > 15, f"{mutant.name}: no docstring"
        assert mutant.kinds and mutant.kinds <= set(LAYER_FAILURE_KINDS), f"{mutant.name}: {sorted(mutant.kinds)}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mutant", layer_zoo.ZOO, ids=lambda mutant: mutant.name)
def test_mutant_is_caught(mutant, dtype):
    found = search(mutant.factory, dtype, SEARCH_EXAMPLES, mutant.needs)
    _searches[(mutant.name, dtype)] = found
    assert found.error is not None, f"{mutant.name} was NOT caught in {found.examples} drawn {dtype} cases"
    message = str(found.error).splitlines()[0]
    assert found.kind in mutant.kinds, (
        f"{mutant.name} caught as {found.kind!r}, expected one of {sorted(mutant.kinds)}: {message}")
    if mutant.stage is not None:
        assert mutant.stage in (found.stage or ""), f"{mutant.name}: stage {found.stage!r} lacks {mutant.stage!r}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mutant", [m for m in layer_zoo.ZOO if m.needs is not None], ids=lambda mutant: mutant.name)
def test_mutant_passes_where_its_bug_does_not_reach(mutant, dtype):
    """On drawn configs without the feature its bug needs, the mutant computes the right layer: the
    catch above is the bug, found on cases that have the feature."""
    found = search(mutant.factory, dtype, BENIGN_EXAMPLES, mutant.needs, with_feature=False)
    assert found.error is None, f"{mutant.name} fails without {mutant.needs.__name__}: {found.error}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_wrong_split_is_silently_wrong_when_nope_is_wider_than_v(dtype):
    """The W_UK/W_UV split at d_v raises when d_n < d_v (the slice is short), but with d_n > d_v it
    computes a layer of the right shape with part of W_UK used as W_UV: that must be caught by the
    numbers, not by an exception."""
    mutant = next(m for m in layer_zoo.ZOO if m.factory.__name__ == "SplitAtVHeadDim")
    found = search(mutant.factory, dtype, SEARCH_EXAMPLES, lambda c: c.qk_nope_head_dim > c.v_head_dim)
    _searches[(f"{mutant.name} (d_n > d_v)", dtype)] = found
    assert found.error is not None, f"not caught in {found.examples} drawn {dtype} cases with d_n > d_v"
    assert found.kind == "attention", found.error


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("control", sorted(CONTROLS))
def test_control_passes(control, dtype):
    found = search(CONTROLS[control], dtype, CONTROL_EXAMPLES, properties=tuple(LAYER_PROPERTIES))
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
             f"{'layer':46} {'dtype':9} {'caught as (stage)':36} {'ratio':>8} {'examples':>8} {'seconds':>7}  case"]
    for (name, dtype), found in _searches.items():
        kind = (found.kind or "passed") + (f" ({found.stage})" if found.stage and found.stage != found.kind else "")
        case = found.case.describe() if found.case is not None else ""
        lines.append(f"{name[:46]:46} {dtype:9} {kind:36} {found.ratio:>8} {found.examples:>8} {found.seconds:7.2f}  "
                     f"{case}")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            for line in lines:
                reporter.write_line(line)
    else:
        for line in lines:
            reporter.write_line(line)
