"""timm's feature-index convention, shared by every model kind's ``forward_intermediates`` and
``prune_intermediate_layers`` (timm 1.0.31 ``timm.models._features.feature_take_indices``)."""

from __future__ import annotations

from typing import Optional, Union

from .errors import UsageError

__all__ = ["feature_take_indices"]


def feature_take_indices(num_features: int, indices: Optional[Union[int, list[int], tuple[int, ...]]] = None
                         ) -> tuple[list[int], int]:
    """timm's ``feature_take_indices``: None = all, int n = last n, list = those (negatives allowed).

    Returns:
        ``(take_indices, max_index)`` with non-negative, sorted indices.

    Raises:
        UsageError (a ValueError): an index outside ``[-num_features, num_features)`` or ``n`` outside
            ``[1, num_features]`` (timm silently drops such indices; we refuse them).
    """
    if indices is None:
        take = list(range(num_features))
    elif isinstance(indices, int):
        if not 1 <= indices <= num_features:
            raise UsageError(f"indices={indices}: take the last n stages with 1 <= n <= {num_features}")
        take = list(range(num_features - indices, num_features))
    else:
        take = []
        for i in indices:
            if not -num_features <= i < num_features:
                raise UsageError(f"index {i} out of range for {num_features} stages; valid: "
                                 f"{-num_features}..{num_features - 1}")
            take.append(i % num_features)
        take = sorted(set(take))
    return take, max(take)
