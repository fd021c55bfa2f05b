"""Progress bars that are cheap to import and right for the place they run in."""
from __future__ import annotations

import sys


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar: the notebook widget inside Jupyter, the terminal bar elsewhere.

    ``tqdm.auto`` probes IPython/ipywidgets at import, which costs seconds in a plain
    shell; we only reach for it when IPython is already running.
    """
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
