"""CROHME handwritten mathematics, split by the university that collected it.

Files: ``labels.csv`` (the index: institution, InkML and PNG paths), ``inkml/<origin>/*.inkml``
(pen strokes and the LaTeX truth, ``<annotation type="truth">``) and ``png/<origin>/*.png``
(offline renderings, black ink on white, 128 px high). Natural groups: the five origins
``HAMEX``, ``KAIST``, ``MathBrush``, ``MfrDB``, ``expressmatch`` (names ``crohme_KAIST`` ...).

Modality ``image``: ``[N, 1, H, W]`` float, ink = 1, paper = 0. Each PNG is scaled to fit
``image_size = [H, W]`` (default ``[32, 96]``) keeping its aspect ratio (area
averaging), placed at the left, centred vertically, zero padded. H and W must be
multiples of the image encoder's ``patch_size``; its ``image_size`` must be >= max(H, W).

Task ``symbols``: multi-label presence of the ``top_k`` (default 16) most frequent LaTeX
symbols, parsed from each InkML truth (the ``multi_label`` task, ``num_labels = top_k``).
Symbols are the LaTeX tokens after dropping layout-only ones (``{ } ^ _ \\left \\right
\\mbox \\limits``); the vocabulary counts each expression once per symbol (document
frequency) over all five institutions, ties by name; or pass ``symbols = [...]``.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .common import DataFileError, Pool, RealSource, Table, count

INKML_NS = "{http://www.w3.org/2003/InkML}"
LAYOUT = {"{", "}", "^", "_", "\\left", "\\right", "\\mbox", "\\limits", "\\displaystyle", "$"}
ALIASES = {"\\lt": "<", "\\gt": ">", "\\ldots": "\\dots", "\\cdots": "\\dots", "\\lbrace": "\\{", "\\rbrace": "\\}"}
_TOKEN = re.compile(r"\\[a-zA-Z]+|\\.|\S")


def latex_symbols(latex: str) -> list[str]:
    """The symbols an expression shows: ``"\\frac {\\sqrt x} 2"`` -> ``[\\frac, \\sqrt, x, 2]``."""
    out = []
    for tok in _TOKEN.findall(latex):
        tok = ALIASES.get(tok, tok)
        if tok not in LAYOUT:
            out.append(tok)
    return out


def inkml_truth(path: Path, row: int) -> str:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise DataFileError(path, f"cannot read InkML (listed in labels.csv row {row}): {exc}") from exc
    for ann in root.iter(f"{INKML_NS}annotation"):
        if ann.get("type") == "truth" and ann.text and ann.text.strip():
            return ann.text.strip().strip("$").strip()
    raise DataFileError(path, f"no <annotation type=\"truth\"> (listed in labels.csv row {row})")


def load_png(path: Path, size: tuple[int, int], row: int) -> torch.Tensor:
    """``[H, W]`` float, ink = 1, the image scaled to fit and zero padded."""
    from PIL import Image, UnidentifiedImageError  # with matplotlib; imported only when used

    h, w = size
    try:
        with Image.open(path) as img:
            img = img.convert("L")
            scale = min(h / img.height, w / img.width)
            new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(new, Image.Resampling.BOX)
            pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(new[1], new[0])
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataFileError(path, f"cannot read PNG (listed in labels.csv row {row}): {exc}") from exc
    canvas = torch.zeros(h, w)
    top = (h - new[1]) // 2
    canvas[top : top + new[1], : new[0]] = 1 - pixels.float() / 255
    return canvas


class CROHME(RealSource):
    name = "crohme"
    default_prefix = "crohme_"
    natural_modalities = ("image",)
    natural_tasks = ("symbols",)
    example_groups = ("KAIST",)

    def __init__(self, folder: str = "crohme_by_institution", image_size: Sequence[int] = (32, 96), top_k: int = 16, symbols: Sequence[str] | None = None, **options: Any):
        super().__init__(**options)
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"data source 'crohme': image_size must be [H, W], got {image_size}")
        if top_k < 1:
            raise ValueError(f"data source 'crohme': top_k must be >= 1, got {top_k}")
        self.folder, self.image_size, self.top_k = folder, (int(image_size[0]), int(image_size[1])), top_k
        self.symbols = list(symbols) if symbols else None

    def read(self, root: Path | None) -> Pool:
        folder = self.data_dir(root, self.folder)
        t = Table(folder / "labels.csv", ["institution_id", "inkml_path", "png_path"])
        report: dict[str, Any] = {}
        images, truths, groups = [], [], []
        for row, cells in t:
            count(report, "labels.csv", "rows_read")
            for col in ("institution_id", "inkml_path", "png_path"):
                if not cells[t.col[col]].strip():
                    raise DataFileError(t.path, "blank cell", row, col)
            truths.append(latex_symbols(inkml_truth(folder / cells[t.col["inkml_path"]], row)))
            images.append(load_png(folder / cells[t.col["png_path"]], self.image_size, row))
            groups.append(cells[t.col["institution_id"]].strip())
        if not images:
            raise DataFileError(t.path, "has no data rows")
        symbols = self.symbols or self.vocabulary(truths)
        targets = torch.tensor([[float(s in set(tr)) for s in symbols] for tr in truths])
        report["symbols"] = symbols
        report["expressions_without_any_symbol"] = int((targets.sum(1) == 0).sum())
        return Pool(inputs={"image": torch.stack(images).unsqueeze(1)}, targets={"symbols": targets}, groups=groups, report=report)

    def vocabulary(self, truths: list[list[str]]) -> list[str]:
        df = Counter(s for tr in truths for s in set(tr))
        return [s for s, _ in sorted(df.items(), key=lambda kv: (-kv[1], kv[0]))[: self.top_k]]
