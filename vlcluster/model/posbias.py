"""Relative position bias (BEiT, VLMo): a learned bias on each attention score,
looked up by where the query and the key sit relative to each other.

The rows follow VLMo's one table (image rows, then the two image<->text rows,
then the text rows), held as three parameters so a vision-only source (BEiT)
fills ``image`` and leaves the rest reported as fresh:

- ``position_bias.image`` [(2g-1)^2 + 3, C] for a g x g patch grid: the patch
  pair (query q, key k) reads row (y_q - y_k + g - 1) * (2g - 1) + (x_q - x_k + g - 1);
  then three rows: [CLS] -> patch, patch -> [CLS], [CLS] -> [CLS].
- ``position_bias.cross`` [2, C]: text -> image and image -> text (every pair
  alike); only the fused route's top layers attend across modalities.
- ``position_bias.text`` [2T, C] for T = max_text_len: the token pair (query i,
  key j, both past [CLS]) reads row j - i + T - 2 (note: key minus query, where
  the image uses query minus key, as VLMo does); then [CLS] -> token,
  token -> [CLS], [CLS] -> [CLS].

Columns: heads x layers, layer l reading columns l*heads .. (l+1)*heads - 1
(``per_layer``, VLMo and most BEiTs), or heads for all layers (``shared``).
The bias is shared by a layer's experts, like layer scale: merging copies it.
Tables start at zero (no positional preference), as BEiT's and VLMo's do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig

CLS_ROWS = 3  # [CLS] -> token, token -> [CLS], [CLS] -> [CLS]
PREFIX = "position_bias"


def image_rows(grid: int) -> int:
    return (2 * grid - 1) ** 2 + CLS_ROWS


def text_rows(max_text_len: int) -> int:
    return 2 * max_text_len


def _with_cls(inner: Tensor, first_cls_row: int) -> Tensor:
    """[n, n] distance rows for tokens 1.. -> [n+1, n+1] with the three [CLS] rows."""
    n = inner.shape[0] + 1
    index = torch.empty(n, n, dtype=torch.long)
    index[1:, 1:] = inner
    index[0, :] = first_cls_row  # [CLS] as the query
    index[:, 0] = first_cls_row + 1  # [CLS] as the key
    index[0, 0] = first_cls_row + 2
    return index


def image_index(grid: int) -> Tensor:
    """[g*g + 1, g*g + 1] rows of the image table (patches row-major, [CLS] first)."""
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    y, x = y.flatten(), x.flatten()
    dy = y[:, None] - y[None, :] + grid - 1
    dx = x[:, None] - x[None, :] + grid - 1
    return _with_cls(dy * (2 * grid - 1) + dx, (2 * grid - 1) ** 2)


def text_index(max_text_len: int, length: int) -> Tensor:
    """[length, length] rows of the text table ([CLS] first)."""
    positions = torch.arange(length - 1)
    distance = positions[None, :] - positions[:, None] + max_text_len - 2
    return _with_cls(distance, text_rows(max_text_len) - CLS_ROWS)


def fused_index(grid: int, max_text_len: int, text_length: int) -> Tensor:
    """Rows of the concatenated [image; cross; text] table for vlcluster's fused
    sequence [image tokens; text tokens]."""
    image = image_index(grid)
    cross = image_rows(grid)  # text -> image; image -> text is the next row
    text = text_index(max_text_len, text_length) + cross + 2
    top = torch.cat([image, image.new_full((image.shape[0], text_length), cross + 1)], dim=1)
    bottom = torch.cat([text.new_full((text_length, image.shape[0]), cross), text], dim=1)
    return torch.cat([top, bottom])


class RelativePositionBias(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.grid, self.max_text_len, self.heads = config.grid, config.max_text_len, config.heads
        self.per_layer = config.relative_bias == "per_layer"
        columns = config.heads * (config.depth if self.per_layer else 1)
        self.image = nn.Parameter(torch.empty(image_rows(self.grid), columns))
        self.cross = nn.Parameter(torch.empty(2, columns))
        self.text = nn.Parameter(torch.empty(text_rows(self.max_text_len), columns))
        self._index_cache: dict[tuple[str, int, str], Tensor] = {}

    def init_weights(self) -> None:
        for table in (self.image, self.cross, self.text):
            nn.init.zeros_(table)

    def _text_length(self, length: int) -> int:
        if not 0 < length <= self.max_text_len:
            raise ValueError(f"text of {length} tokens; the position bias covers 1 to max_text_len = {self.max_text_len}")
        return length

    def _index(self, modality: str, length: int, device: torch.device) -> Tensor:
        key = (modality, length, str(device))
        if key not in self._index_cache:
            image_length = self.grid * self.grid + 1
            if modality == "v":
                if length != image_length:
                    raise ValueError(f"image sequence of {length} tokens; the position bias is for {image_length}")
                index = image_index(self.grid)
            elif modality == "l":
                index = text_index(self.max_text_len, self._text_length(length)) + image_rows(self.grid) + 2
            else:
                index = fused_index(self.grid, self.max_text_len, self._text_length(length - image_length))
            self._index_cache[key] = index.to(device)
        return self._index_cache[key]

    def forward(self, modality: str, length: int, start: int, end: int) -> Tensor:
        """[C, length, length]: the bias of layers start..end-1 (their heads side by side;
        the shared heads once) for this route's sequence."""
        table = torch.cat([self.image, self.cross, self.text])
        if self.per_layer:  # gather only the columns of the layers this call runs
            table = table[:, start * self.heads : end * self.heads]
        return F.embedding(self._index(modality, length, table.device), table).permute(2, 0, 1).contiguous()

    def for_layer(self, bias: Tensor, offset: int) -> Tensor:
        """The heads of the ``offset``-th layer of a ``forward`` result."""
        return bias[offset * self.heads : (offset + 1) * self.heads] if self.per_layer else bias


def resize_image_table(table: Tensor, grid: int) -> Tensor:
    """The image table of another grid: the 2-D distance rows resized as a
    (2g-1) x (2g-1) image per column (bicubic), the [CLS] rows kept."""
    distances, cls = table[:-CLS_ROWS], table[-CLS_ROWS:]
    side = round(distances.shape[0] ** 0.5)
    if side * side != distances.shape[0] or side % 2 == 0:
        raise ValueError(f"relative position table of {table.shape[0]} rows is not (2g-1)^2 + 3 for a square grid")
    new_side = 2 * grid - 1
    if side == new_side:
        return table
    square = distances.T.reshape(1, -1, side, side).float()
    resized = F.interpolate(square, size=(new_side, new_side), mode="bicubic", align_corners=False)
    return torch.cat([resized.reshape(-1, new_side * new_side).T.to(table.dtype), cls])
