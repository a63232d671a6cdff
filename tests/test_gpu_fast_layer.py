"""GPU certification of the fast layer (SDPA prefill, Triton absorbed decode) against the float64
reference layer, stage by stage and end to end, in float32, bf16 and fp16:
`python -m pytest -m gpu tests/test_gpu_fast_layer.py -s` on a CUDA machine. Each test prints the
largest ratio per tier and stage over its cases."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings

from mla_verify.layer import LayerCase, absorbed_matches_naive, check_layer, layer_cases

pytestmark = pytest.mark.gpu
FAST = "mla_verify.impls.fast_layer:fast_layer"
LARGEST: dict[str, dict[str, float]] = {}


def _record(key: str, ratios: dict[str, float]) -> None:
    largest = LARGEST.setdefault(key, {})
    for name, ratio in ratios.items():
        largest[name] = max(largest.get(name, 0.0), ratio)


@pytest.fixture(scope="module", autouse=True)
def _print_largest():
    yield
    for key, ratios in sorted(LARGEST.items()):
        print(f"\n{key}: " + "; ".join(f"{name} {ratio:.3g}" for name, ratio in sorted(ratios.items())))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_fast_layer_with_triton_decode_on_cuda(dtype):
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device")

    @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=layer_cases(dtypes=(dtype,), max_heads=16, max_width=64, max_length=150, max_batch=4,
                            max_decode_tokens=4))
    def run(case: LayerCase) -> None:
        report = check_layer(FAST, case, device="cuda")
        _record(f"matches_reference {dtype}", {"sound (end to end)": report.end_to_end, "sharp": report.sharp_ratio,
                                                **{f"stage {k}": v for k, v in report.stages.items()}})
        absorbed = absorbed_matches_naive(FAST, case, device="cuda")
        _record(f"absorbed_matches_naive {dtype}", {"sound (end to end)": absorbed.end_to_end,
                                                     "sharp": absorbed.sharp_ratio,
                                                     **{f"stage {k}": v for k, v in absorbed.stages.items()}})

    run()
