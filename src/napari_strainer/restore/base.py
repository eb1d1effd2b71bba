"""What every restoration path shares: the result type and the output-size limit."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import BadArgumentError
from ..io.scan import Scan

MAX_OUTPUT_VOXELS = 2**31 // 4
"""A float32 output above 2 GiB is refused."""


@dataclass
class Restoration:
    """The output of a restoration: the restored scan and the fitting history."""

    scan: Scan
    history: dict = field(default_factory=dict)


def check_output_size(shape: Sequence[int], what: str) -> None:
    """Refuse an output grid above :data:`MAX_OUTPUT_VOXELS` (``what`` names the option)."""
    n = math.prod(int(v) for v in shape)
    if n > MAX_OUTPUT_VOXELS:
        raise BadArgumentError(f"{what} would make a {tuple(int(v) for v in shape)} output "
                               f"needing {n * 4 / 2**30:.1f} GiB; the limit is "
                               f"{MAX_OUTPUT_VOXELS * 4 / 2**30:.0f} GiB")
