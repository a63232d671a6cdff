"""Certification, shared by the decode half and the layer half: one runner, one certificate.

    registry        naming what to certify: registered names, 'module:attr', 'path/file.py:attr';
                    a decode kernel or a layer factory, told apart by its signature
    profiles        quick / default / thorough: example counts and case-size limits of both halves
    halves          what differs between the halves: properties, case strategy, coverage and case
                    record, judging one case (`DecodeHalf`, `LayerHalf`)
    runner          the search in rounds for every distinct failure, each case optionally in a
                    child process, and `certify`
    workers         several workers, one certificate: each property's search in parts (a seed
                    and a share of the examples each) on pytest-xdist workers, one GPU per worker,
                    and the merge of the parts into one certificate
    suite           the certification as pytest tests, which `certify --workers N` runs with -n N
    certificate     per-property reports and the certificate (JSON, Markdown), with provenance
    counterexample  a failure's artifact folder (case.json, inputs.pt, repro.py) and its replay
    progress        progress bars or lines while a run goes
    comparison      several implementations on the same drawn cases
    report          the certificate as one self-contained HTML page

`from mla_verify.certify import certify` certifies a decode `Implementation` or a
`LayerImplementation` (see `mla_verify.certify.registry.resolve_any`).
"""

from mla_verify.certify.certificate import SCHEMA, Certificate, PropertyReport, certificate_markdown, json_safe
from mla_verify.certify.halves import (ALL_DTYPES, CaseFault, CaseRefused, Coverage, DecodeHalf, Fault, Half,
                                       LayerCoverage, LayerHalf, LayerProperty, half_of, layer_case_from_dict,
                                       layer_properties, layer_property_named, not_covered)
from mla_verify.certify.registry import LayerImplementation, resolve, resolve_any, resolve_layer
from mla_verify.certify.runner import MAX_SEARCH_ROUNDS, IsolatedRunner, certify, run_property

__all__ = [
    # running
    "certify", "run_property", "IsolatedRunner", "MAX_SEARCH_ROUNDS",
    # the halves
    "Half", "DecodeHalf", "LayerHalf", "half_of", "Fault", "CaseFault", "CaseRefused", "Coverage", "LayerCoverage",
    "not_covered", "LayerProperty", "layer_properties", "layer_property_named", "layer_case_from_dict",
    "ALL_DTYPES",
    # naming what to certify
    "LayerImplementation", "resolve", "resolve_any", "resolve_layer",
    # the certificate
    "SCHEMA", "Certificate", "PropertyReport", "certificate_markdown", "json_safe",
]
