"""whq storage: the warehouse folder, its atomic run commits, DuckDB catalog and Polars access.

    import warehouse
    wh = warehouse.open("wh")
    wh.sql("SELECT * FROM firing_rate('run', 'mlp.act', 3)").pl()

This package never imports torch or transformers.
"""

from .core import Warehouse, init, open, open_or_init
from .errors import (
    BadInput,
    BadSpec,
    CorruptPart,
    NotAWarehouse,
    QueryError,
    RunExists,
    UnknownRun,
    WarehouseError,
)

__all__ = [
    "Warehouse",
    "init",
    "open",
    "open_or_init",
    "WarehouseError",
    "BadInput",
    "BadSpec",
    "CorruptPart",
    "NotAWarehouse",
    "QueryError",
    "RunExists",
    "UnknownRun",
]
