"""File input and output: the only part of placer that touches files.

* :mod:`placer.io.atomic`: atomic writes (temp file, fsync, rename).
* :mod:`placer.io.traces`: routing inputs of every supported format -> :class:`RoutingInput`.
* :mod:`placer.io.native`: placer's own trace/stats npz and Parquet writers and readers.
* :mod:`placer.io.placements`: native placement JSON, serving-stack exporters and importers.

Nothing here imports torch at import time.
"""

from placer.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from placer.io.native import (
    read_stats_npz,
    write_stats_npz,
    write_trace_npz,
    write_trace_npz_chunks,
    write_trace_parquet,
)
from placer.io.placements import (
    FORMATS as PLACEMENT_FORMATS,
)
from placer.io.placements import (
    PlacementFile,
    export_placement,
    import_placement,
    read_placement_json,
    write_placement_json,
)
from placer.io.traces import FORMATS as INPUT_FORMATS
from placer.io.traces import RoutingInput, detect_format, read_input, read_trace

__all__ = [
    "INPUT_FORMATS", "PLACEMENT_FORMATS", "PlacementFile", "RoutingInput", "atomic_path",
    "atomic_write_bytes", "atomic_write_text", "detect_format", "export_placement",
    "import_placement", "read_input", "read_placement_json", "read_stats_npz", "read_trace",
    "write_placement_json", "write_stats_npz", "write_trace_npz", "write_trace_npz_chunks",
    "write_trace_parquet",
]
