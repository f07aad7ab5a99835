"""What every API function reads: the inventory (a path or a loaded one), the default directories, and the image
preprocessing (a Preprocess, a YAML/JSON file, or the individual fields the CLI's flags give)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.convert.cache import DEFAULT_CACHE_DIR  # noqa: F401  (re-exported: the CLI's --cache-dir default)
from pipeline.distributed.queue import QUEUE_TIMEOUT_S  # noqa: F401  (re-exported: the CLI's --queue-timeout default)
from pipeline.inventory import Inventory, load_inventory

DEFAULT_OUT = Path(".edgepipe") / "artifacts"


def inventory_of(targets: str | Path | Inventory) -> Inventory:
    return targets if isinstance(targets, Inventory) else load_inventory(targets)


def preprocess_of(preprocess: Any) -> Any:
    """A Preprocess, or one read from a YAML/JSON file path."""
    if preprocess is None or not isinstance(preprocess, (str, Path)):
        return preprocess
    from pipeline.convert.data import Preprocess

    return Preprocess.from_file(preprocess)


def preprocess_options(file: str | Path | None = None, **fields: Any) -> Any:
    """The declared image preprocessing from a YAML/JSON file and individual fields (resize, crop, scale, mean, std,
    channels, layout, dtype, labels; fields win), or None when nothing is declared."""
    from pipeline.convert.data import preprocess_from

    return preprocess_from(file, **fields)
