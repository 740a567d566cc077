"""The latency data shipped in the package is found where lookups look for it.

Tables and fits are looked up by file name (`costs.latency_table.find_table_file`,
`costs.latency_fit.find_fit_file`): a file shipped under a name that disagrees with what it holds is
either never used or, worse, used on the wrong CPU or target. Every shipped file is checked against
the name its own contents give.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lapp_edge.costs.latency_fit import fit_file_name, load_fit
from lapp_edge.costs.latency_table import load_table, table_file_name
from lapp_edge.deploy.targets import load_target
from lapp_edge.resources import LATENCY_DIR

TABLES = sorted(LATENCY_DIR.glob("layer-table-*.json"))
FITS = sorted(LATENCY_DIR.glob("latency-fit-*.json"))


def test_the_package_ships_tables_and_fits() -> None:
    assert len(TABLES) >= 10 and len(FITS) >= 7


@pytest.mark.parametrize("path", TABLES, ids=lambda p: p.name)
def test_shipped_table_is_named_for_what_it_holds(path: Path) -> None:
    table = load_table(path)
    assert path.name == table_file_name(table.target, table.model, table.input_shape, table.machine)
    profile = load_target(table.target)
    assert profile.precision == table.precision
    for batch in table.batches.values():
        assert batch.validation, f"{path.name} batch {batch.batch} records no held-out check"
    # ResNet-20's dense reference ships beside its tables (bench measures against it); MobileNetV2's
    # (8.8 MB) does not, as docs/ARCHITECTURE.md says
    if table.model == "resnet20":
        assert (LATENCY_DIR / table.dense_reference).is_file()


@pytest.mark.parametrize("path", FITS, ids=lambda p: p.name)
def test_shipped_fit_is_named_for_what_it_holds(path: Path) -> None:
    fit = load_fit(path)
    machine = str(fit.load.get("machine") or "")
    # fits from before fits were keyed by machine keep the unkeyed name; every later one carries its machine
    assert path.name in (fit_file_name(fit.target, fit.model, machine), fit_file_name(fit.target, fit.model))
    if path.name != fit_file_name(fit.target, fit.model):
        assert machine, f"{path.name} is keyed by machine but records none"
    assert path.with_suffix(".png").is_file(), f"{path.name} ships without its plot"
    load_target(fit.target)
