"""Result objects shared by every analysis.

A result knows how to become a table (``to_frame``), a picture (``plot``), a
JSON document (``to_dict``/``to_json``) and shows itself in a notebook
(``_repr_html_``). ``save(out_dir)`` writes ``<name>.json``, ``<name>.csv`` and
``<name>.png``, which is what every CLI subcommand does.
"""
from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path


def _jsonable(obj):
    """Turn numpy/torch scalars and arrays into plain Python for json.dumps."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf
    return obj


class AnalysisResult:
    """Base class: subclasses set ``name`` and implement ``to_dict``, ``to_frame`` and ``plot``."""

    name = "result"

    def to_dict(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_frame(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def plot(self, ax=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def to_json(self, path=None, indent=2) -> str:
        text = json.dumps(_jsonable(self.to_dict()), indent=indent)
        if path is not None:
            Path(path).write_text(text)
        return text

    def figure_png(self, dpi=110) -> bytes:
        """Render ``plot()`` to PNG bytes (used by the notebook display and the HTML report)."""
        # no matplotlib.use() here: switching backends would silence plt.show() in notebooks
        import matplotlib.pyplot as plt

        out = self.plot()
        fig = out if hasattr(out, "savefig") else out.figure
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()

    def save(self, out_dir, dpi=130) -> list[Path]:
        """Write ``<name>.json``, ``<name>.csv`` and ``<name>.png`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{self.name}.json", out / f"{self.name}.csv", out / f"{self.name}.png"]
        self.to_json(paths[0])
        self.to_frame().to_csv(paths[1], index=False)
        paths[2].write_bytes(self.figure_png(dpi=dpi))
        return paths

    def _repr_html_(self) -> str:
        png = base64.b64encode(self.figure_png()).decode()
        table = self.to_frame().to_html(index=False, float_format=lambda v: f"{v:.3f}")
        return (f"<div><b>{type(self).__name__}</b>{table}"
                f"<img src='data:image/png;base64,{png}'/></div>")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(\n{self.to_frame().to_string(index=False)}\n)"
