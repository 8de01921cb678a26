"""``python -m cellscale.kernels``: build (or find) the fused CPU attention kernel and say so."""

from __future__ import annotations

import sys
import time

from cellscale import kernels


def main() -> int:
    t = time.perf_counter()
    if kernels.available():
        print(f"cellscale kernels: fused CPU attention ready ({time.perf_counter() - t:.0f} s) in {kernels.cache_dir()}")
        return 0
    print(f"cellscale kernels: fused CPU attention unavailable ({kernels.unavailable_reason()}); "
          "CPU training with attention dropout will use SDPA's slower math path", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
