"""``MaskData``: columns of per-mask values (tensors, arrays or lists) filtered and joined together."""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
import torch

Column = Any  # torch.Tensor | np.ndarray | list


class MaskData:
    """A table of masks: every column has one entry per mask."""

    def __init__(self, **columns: Column) -> None:
        for k, v in columns.items():
            if not isinstance(v, (list, np.ndarray, torch.Tensor)):
                raise TypeError(f"MaskData column {k!r} must be a list, array or tensor, not {type(v)}.")
        self._columns: Dict[str, Column] = dict(columns)

    @classmethod
    def empty(cls, device: torch.device) -> "MaskData":
        """No masks, with the columns the generator fills (so joins and filters need no special case)."""
        f = dict(device=device)
        return cls(
            iou_preds=torch.zeros(0, **f),
            points=torch.zeros(0, 2, dtype=torch.float64, **f),
            stability_score=torch.zeros(0, **f),
            boxes=torch.zeros(0, 4, dtype=torch.long, **f),
            rles=[],
        )

    def __len__(self) -> int:
        return len(self._columns["rles"]) if "rles" in self._columns else len(next(iter(self._columns.values())))

    def __getitem__(self, key: str) -> Column:
        return self._columns[key]

    def __setitem__(self, key: str, value: Column) -> None:
        self._columns[key] = value

    def __delitem__(self, key: str) -> None:
        del self._columns[key]

    def __contains__(self, key: str) -> bool:
        return key in self._columns

    def items(self):
        return self._columns.items()

    def filter(self, keep: torch.Tensor) -> None:
        """Keep rows by boolean mask or index tensor (indices also set the order)."""
        keep = torch.as_tensor(keep)
        idx = keep.nonzero().flatten() if keep.dtype == torch.bool else keep
        idx_list = None  # on the host only if a column needs it (a sync when idx is on a GPU)
        for k, v in self._columns.items():
            if isinstance(v, torch.Tensor):
                self._columns[k] = v[idx.to(v.device)]
                continue
            idx_list = idx.tolist() if idx_list is None else idx_list
            if isinstance(v, np.ndarray):
                self._columns[k] = v[np.asarray(idx_list, dtype=np.int64)]
            else:
                self._columns[k] = [v[i] for i in idx_list]

    def cat(self, other: "MaskData") -> None:
        """Append ``other``'s rows."""
        for k, v in other.items():
            mine = self._columns.get(k)
            if mine is None or (isinstance(mine, torch.Tensor) and len(mine) == 0):
                self._columns[k] = v  # an empty column's placeholder shape does not constrain
            elif isinstance(v, torch.Tensor) and len(v) == 0:
                continue  # nor does an empty batch's (e.g. (0, 0, 0) logits after all candidates fell)
            elif isinstance(v, torch.Tensor):
                self._columns[k] = torch.cat([mine, v.to(mine.device)], dim=0)
            elif isinstance(v, np.ndarray):
                self._columns[k] = np.concatenate([mine, v], axis=0)
            else:
                self._columns[k] = mine + list(v)

    def to_numpy(self) -> None:
        for k, v in self._columns.items():
            if isinstance(v, torch.Tensor):
                self._columns[k] = v.cpu().numpy()
