"""Fine-tuning from pretrained encoder weights: ``hfactory train SPEC --init-from RUN_DIR``.

Its own module because both tasks meet here: :mod:`.pretrain` writes ``encoder/`` into its run
directory and :mod:`.classify` reads it, and neither task should import the other.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..errors import UsageError
from ..io import WEIGHTS_NAME
from .checkpoint import DCP_DIR, MODEL_DIR, find_checkpoint, is_sharded, read_sharded_weights

__all__ = ["ENCODER_DIR", "load_pretrained_encoder"]

#: The pretrained encoder alone, in a pretraining run directory (a save_pretrained directory).
ENCODER_DIR = "encoder"


def load_pretrained_encoder(model: nn.Module, source: str | os.PathLike) -> dict:
    """Load pretrained encoder weights from ``source`` into ``model`` (a
    :class:`~hfactory.encoder.HierarchicalEncoder`), for fine-tuning (``hfactory train --init-from``).

    ``source`` is a pretraining run directory (its ``encoder/``, else its ``model/`` or checkpoint,
    also an FSDP run's sharded one: the autoencoder's ``encoder.*`` weights), a ``save_pretrained``
    directory (encoder or autoencoder), or a ``model.safetensors`` file. Everything but the classifier (``head.*``) must fit; position
    embeddings are resized to the model's resolution. The classifier keeps its initialisation.

    Returns:
        ``{"source": path, "loaded": n tensors, "skipped": [keys not loaded]}``.

    Raises:
        FileNotFoundError: no weights at ``source``.
        UsageError (a ValueError): the weights do not fit the model's spec (names the keys and shapes).
    """
    from safetensors.torch import load_file

    from ..convert.core import mismatch_report
    from ..convert.resize import resize_to_model

    source = Path(source)
    if source.is_file():
        path = source
    else:
        candidates = [source / ENCODER_DIR / WEIGHTS_NAME, source / WEIGHTS_NAME, source / MODEL_DIR / WEIGHTS_NAME]
        checkpoint = find_checkpoint(source) if source.is_dir() else None
        if checkpoint is not None:
            candidates.append(checkpoint / WEIGHTS_NAME)
        path = next((c for c in candidates if c.is_file()), None)
        if path is None and checkpoint is not None and is_sharded(checkpoint):
            path = checkpoint / DCP_DIR  # an unfinished FSDP run: DCP shards instead of model.safetensors
        if path is None:
            raise FileNotFoundError(f"--init-from {source}: no weights found; expected a pretraining run directory "
                                    f"(with {ENCODER_DIR}/ or a checkpoint) or a save_pretrained directory")
    state = read_sharded_weights(path) if path.name == DCP_DIR else load_file(str(path))
    if any(k.startswith("encoder.") for k in state):  # a whole autoencoder: keep its encoder
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    target = model.state_dict()
    skipped = sorted(k for k in state if k.startswith("head."))
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    state = resize_to_model(state, target, model)
    expected = {k: v for k, v in target.items() if not k.startswith("head.")}
    report = mismatch_report(expected, state)
    if report:
        raise UsageError(f"--init-from {path}: the weights do not fit this spec ({getattr(model.spec, 'name', '')}); "
                         f"{report}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or not all(k.startswith("head.") for k in missing):
        # mismatch_report compares the same keys, so this is a bug of ours, not the user's weights
        raise RuntimeError(f"--init-from {path}: unexpected keys {unexpected[:5]}, missing non-head keys "
                           f"{[k for k in missing if not k.startswith('head.')][:5]} after mismatch_report passed")
    return {"source": str(path), "loaded": len(state), "skipped": skipped}
