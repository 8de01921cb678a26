"""Keep BLAS single-threaded while fitting.

The fits are thousands of tiny optimisations (5 parameters, a few hundred rows). On a
machine whose cores are busy, a multi-threaded OpenBLAS spins up and waits for its
threads on every small LAPACK call inside L-BFGS-B, and a 30 ms fit takes seconds.
Parallelism belongs at the level of bootstrap resamples (processes), not inside them.
threadpoolctl (shipped with scikit-learn) does the limiting when installed; without it
the environment variables below still keep worker processes single-threaded.
"""

from __future__ import annotations

import contextlib
import os

from cellscale.runtime.cpus import THREAD_VARS


@contextlib.contextmanager
def blas_single_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@contextlib.contextmanager
def single_thread_env():
    """Environment for worker processes started inside: BLAS reads it when it loads."""
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update({k: "1" for k in THREAD_VARS})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
