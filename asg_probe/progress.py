"""Progress bars that are cheap to import, right for the place they run in, and drawn once.

Examples
--------
>>> bar = progress_bar(range(3), disable=True)
>>> list(bar)
[0, 1, 2]
"""
from __future__ import annotations

import os
import sys


def _secondary_rank() -> bool:
    """True in every process but rank 0 of a torchrun / process-group job.

    Read from an initialised process group when there is one (``mp.spawn`` jobs set no
    environment), else from torchrun's ``RANK``. torch.distributed is only consulted if
    something already imported it: this module stays import-free.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank() != 0
    try:
        return int(os.environ.get("RANK", "0")) != 0
    except ValueError:
        return False


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar: the notebook widget inside Jupyter, the terminal bar elsewhere.

    Under torchrun only rank 0 draws (the other ranks' bars are disabled), so a job shows
    one bar, not one per process. ``tqdm.auto`` probes IPython/ipywidgets at import, which
    costs seconds in a plain shell; we only reach for it when IPython is already running.
    """
    if _secondary_rank():
        kwargs["disable"] = True
    if "IPython" in sys.modules:
        try:
            from IPython import get_ipython

            if get_ipython() is not None and "IPKernelApp" in get_ipython().config:
                from tqdm.notebook import tqdm

                return tqdm(iterable, **kwargs)
        except Exception:  # no widgets frontend: fall back to text
            pass
    from tqdm import tqdm

    return tqdm(iterable, **kwargs)
