"""Several implementations (decode kernels, or layers) certified on the same drawn cases, side by
side (`mla-verify compare`).

Each implementation is certified with the same seed and profile. Hypothesis draws from each one's
declared capabilities, so two implementations that declare the same capabilities meet the same
cases; where the declarations differ, the cases differ where they must.
"""

from __future__ import annotations

__all__ = ["comparison_rows", "comparison_table", "comparison_markdown"]

COLUMNS = ("implementation", "verdict", "distinct failures", "cases", "max error/bound (sound)",
           "max error/tolerance (sharp)", "time per case", "elapsed")


def _finite(value: object) -> float | None:
    return value if isinstance(value, (int, float)) else None


def comparison_rows(certificates: list[dict]) -> list[dict]:
    """One row per certificate: what the table shows, as values."""
    rows = []
    for data in certificates:
        examples = sum(p["examples"] for p in data["properties"])
        sound = max((_finite(p["max_ratio"]) or 0.0 for p in data["properties"]), default=0.0)
        sharp = max((_finite(p["max_sharp_ratio"]) or 0.0 for p in data["properties"]), default=0.0)
        rows.append({"implementation": data["implementation"]["name"], "verdict": data["headline"],
                     "distinct failures": data["distinct_failures"], "cases": examples,
                     "max error/bound (sound)": sound, "max error/tolerance (sharp)": sharp,
                     "time per case": data["elapsed_s"] / examples if examples else None,
                     "elapsed": data["elapsed_s"]})
    return rows


def _cells(row: dict) -> list[str]:
    per_case = row["time per case"]
    return [row["implementation"], row["verdict"], str(row["distinct failures"]), str(row["cases"]),
            f"{row['max error/bound (sound)']:.3g}", f"{row['max error/tolerance (sharp)']:.3g}",
            "-" if per_case is None else f"{per_case * 1e3:.1f} ms", f"{row['elapsed']:.1f} s"]


def _settings_line(certificates: list[dict]) -> str:
    first = certificates[0]
    s = first["settings"]
    return (f"profile {s['profile']}, seed {s['seed']}, {s['max_examples']} examples per property, "
            f"device {first['device']['type']} ({first['device']['name']})")


def comparison_table(certificates: list[dict]) -> str:
    """A plain-text table for the terminal."""
    rows = [list(COLUMNS)] + [_cells(row) for row in comparison_rows(certificates)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join([f"compared on the same drawn cases: {_settings_line(certificates)}", *lines])


def comparison_markdown(certificates: list[dict]) -> str:
    kind = "layer" if all((c.get("implementation") or {}).get("kind") == "layer" for c in certificates) else "decode"
    lines = [f"# MLA {kind} comparison", "", f"Same drawn cases: {_settings_line(certificates)}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in comparison_rows(certificates):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in _cells(row)) + " |")
    lines += ["", "error/bound is the observed error divided by the tolerance the case allows; ≤ 1 passes "
              "(largest over each implementation's passing cases). Time per case includes building the "
              "case and the float64 reference."]
    for data in certificates:
        failures = [(p["name"], f) for p in data["properties"] for f in p["failures"]]
        if failures:
            lines += ["", f"## {data['implementation']['name']}: {data['headline']}", ""]
            lines += [f"- {name}: {f['signature']}: {f['message']}".replace("|", "\\|") for name, f in failures]
    return "\n".join(lines) + "\n"
