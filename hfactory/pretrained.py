"""Pretrained weights for hfactory encoders: timm's weights of a preset's twin, local files, the
Hugging Face Hub; and model repositories on the Hub (``save_for_hub`` / ``push_to_hub``).

Weight sources (``source`` below):

- ``"timm:<model>[.<tag>]"``: the pretrained weights timm publishes for a timm model
  (``timm:caformer_s18``, ``timm:hiera_tiny_224.mae``), read through timm's own download and cache:
  the model's pretrained config (``timm.models.get_pretrained_cfg``) gives the Hub repository
  (``hf_hub_id``), fetched by ``timm.models.load_state_dict_from_hf`` (``huggingface_hub``'s
  cache, ``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` reads only the cache), else its ``url``
  (``torch.hub.load_state_dict_from_url``, torch's cache) or ``file`` (timm 1.0.31
  ``_builder.py`` ``load_pretrained`` / ``_resolve_pretrained_source``, ``_hub.py``). Needs timm.
  ``hfactory.create_model(name, pretrained=True)`` uses the preset's entry of
  :func:`hfactory.presets.timm_weights`.
- ``"hf-hub:<org>/<name>[@<revision>]"``: an hfactory repository (``spec.yaml`` +
  ``model.safetensors``, see :func:`save_for_hub`), or a repository of weights alone (timm's:
  ``model.safetensors`` or ``pytorch_model.bin``).
- a local path: a timm-format state dict (``.safetensors``, ``.pth``, ``.bin``; a ``state_dict``
  or ``model`` wrapper is unwrapped), an official ``hiera`` package checkpoint (the
  ``{"model_state": ...}`` wrapper, classifier or MAE), a SAM2 checkpoint (its image encoder's
  trunk, ``image_encoder.trunk.*``, into a ``sam2_hiera_*`` spec), an hfactory
  ``save_pretrained`` directory or its ``model.safetensors``, or a directory holding one of these.

Whatever the source, the weights are converted to the model's keys (:mod:`hfactory.convert`:
the timm families and the official Hiera package; hfactory's own keys pass as they are),
position embeddings and relative-position tables are resized to the model's image size, and
everything is checked before anything is copied (:func:`hfactory.io.load_checked`): weights of
another architecture are refused with the missing, unexpected and shape-mismatched keys named,
and the model is left as it was.

The classifier: weights with another class count than the model's (ImageNet-1k weights into a
10-class model) load everything but the classifier layer, which keeps its new initialisation
(timm's rule: ``pretrained_cfg["classifier"]`` is dropped when ``num_classes`` differs, the rest
of an MLP head loads), and a warning says so. :func:`create_pretrained` without an explicit
``num_classes`` takes the weights' class count instead, as ``timm.create_model`` takes the
pretrained config's.

Not covered: in_chans other than the weights' (the stem's shape mismatch is reported; timm
adapts the first conv).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from .errors import UsageError
from .hub import download_files, download_model_dir, is_hub_source, upload_folder
from .io import SPEC_NAME, WEIGHTS_NAME, load_checked, save_model_dir

__all__ = ["TIMM_PREFIX", "Weights", "read_weights", "load_weights", "create_pretrained", "timm_preprocessing",
           "save_for_hub", "push_to_hub", "model_card"]

_logger = logging.getLogger(__name__)

#: Prefix of a timm weight source: ``timm:caformer_s18`` (default tag) or ``timm:caformer_s18.sail_in22k``.
TIMM_PREFIX = "timm:"

#: Files looked for in a directory without ``spec.yaml``, in this order (timm 1.0.31
#: ``_hub._PREFERRED_FILES``, hfactory's ``model.safetensors`` first).
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
#: Keys of the official package's ``MaskedAutoencoderHiera`` that an encoder has no use for.
_MAE_ONLY = ("mask_token", "decoder_", "multi_scale_fusion_heads.")
#: Preprocessing fields of a timm pretrained config that describe the weights' training data.
_PREPROCESS = ("mean", "std", "crop_pct", "crop_mode", "interpolation")


@dataclass
class Weights:
    """A state dict read from a source, before conversion.

    ``fmt`` is what the source says about its keys: ``"hfactory"`` (a save_pretrained file or
    directory: the model's own keys), ``"hiera"`` (an official ``hiera`` package checkpoint) or
    ``"auto"`` (decide by the keys: timm's families, or hfactory's own). ``cfg`` is the timm
    pretrained config of a ``timm:`` source (its ``num_classes`` and preprocessing), else None.
    """

    state: dict
    origin: str
    fmt: str = "auto"
    cfg: Optional[dict] = None


# -- reading ------------------------------------------------------------------------------------
def _timm():
    try:
        import timm.models  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise UsageError("timm weights need timm: pip install 'hfactory[hub]' (or pip install 'timm>=1.0')") from err
    return timm.models


def _timm_cfg(name: str) -> dict:
    """The pretrained config (a dict) of timm model ``name`` (``arch`` or ``arch.tag``).

    Raises:
        UsageError: timm has no such model or tag (the tags it has are named).
    """
    tm = _timm()
    try:
        cfg = tm.get_pretrained_cfg(name)
    except RuntimeError:  # timm 1.0.31 _registry.get_pretrained_cfg: a tag the architecture does not have
        cfg = None
    if cfg is None:
        arch = name.split(".", 1)[0]
        tags = tm.list_pretrained(f"{arch}.*")
        raise UsageError(f"timm has no pretrained weights {name!r}; "
                         + (f"it has: {', '.join(tags)}" if tags else f"{arch!r} is not a timm model with weights"))
    return cfg.to_dict()


def _read_timm(name: str, cache_dir) -> Weights:
    """timm's weights ``name`` through timm's own download and cache (see the module docstring)."""
    tm = _timm()
    cfg = _timm_cfg(name)
    label = f"timm weights {cfg.get('architecture')}.{cfg.get('tag')}" if cfg.get("tag") else f"timm weights {name}"
    if cfg.get("custom_load"):
        raise UsageError(f"{label}: a custom-format checkpoint (custom_load), which hfactory does not read")
    try:
        if cfg.get("hf_hub_id"):
            where = f"{label} (Hugging Face Hub {cfg['hf_hub_id']})"
            args = (cfg["hf_hub_id"], cfg["hf_hub_filename"]) if cfg.get("hf_hub_filename") else (cfg["hf_hub_id"],)
            state = tm.load_state_dict_from_hf(*args, cache_dir=cache_dir)
        elif cfg.get("url"):
            where = f"{label} ({cfg['url']})"
            state = torch.hub.load_state_dict_from_url(cfg["url"], map_location="cpu", weights_only=True,
                                                       model_dir=cache_dir)
        elif cfg.get("file"):
            where = f"{label} ({cfg['file']})"
            state = tm.load_state_dict(cfg["file"])
        else:
            raise UsageError(f"{label}: timm's config names no file, url or Hub repository")
    except (OSError, RuntimeError) as err:  # huggingface_hub's errors are OSErrors; no network, not cached
        from huggingface_hub import constants

        offline = " (HF_HUB_OFFLINE is set)" if constants.is_offline_mode() else ""
        raise FileNotFoundError(f"{label}: the weights are not in the cache ({cache_dir or constants.HF_HUB_CACHE})"
                                f"{offline} and could not be downloaded: {type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}") from None
    return Weights(dict(state), where, "auto", cfg)


def _unwrap(obj: Any, path: Path) -> tuple[dict, str]:
    """A state dict from a loaded checkpoint object, and its format (``hiera`` for the official
    package's ``{"model_state": ...}``, else ``auto``)."""
    if isinstance(obj, Mapping) and "model_state" in obj and isinstance(obj["model_state"], Mapping):
        return dict(obj["model_state"]), "hiera"
    for key in ("state_dict", "model"):  # timm / DeiT / Swin training checkpoints
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            return dict(obj[key]), "auto"
    if isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), "auto"
    raise UsageError(f"{path}: not a state dict (a mapping of names to tensors, or one wrapped under "
                     f"'model_state', 'state_dict' or 'model'); found {type(obj).__name__}"
                     + (f" with keys {', '.join(list(map(str, obj))[:5])}" if isinstance(obj, Mapping) else ""))


def _read_file(path: Path) -> Weights:
    """A weights file: ``.safetensors`` (hfactory's, recognised by its metadata, or another
    tool's), else a torch pickle read with ``weights_only=True``."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise UsageError(f"{path}: not a readable safetensors file ({err})") from None
        fmt = "hfactory" if "spec_hash" in meta or "hfactory_kind" in meta else "auto"
        return Weights(state, str(path), fmt)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip / weights_only refusals come in many types
        raise UsageError(f"{path}: not a readable weights file: torch.load(weights_only=True) failed "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); give a "
                         ".safetensors, .pth or .bin state dict") from None
    state, fmt = _unwrap(obj, path)
    return Weights(state, str(path), fmt)


def _read_dir(path: Path) -> Weights:
    if (path / SPEC_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
        w = _read_file(path / WEIGHTS_NAME)
        return Weights(w.state, str(path), "hfactory")
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            return _read_file(path / name)
    raise FileNotFoundError(f"{path}: no weights found; looked for an hfactory save ({SPEC_NAME} + {WEIGHTS_NAME}) "
                            f"and for {', '.join(_WEIGHT_FILES)}")


def _read_hub(source: str, revision, cache_dir) -> Weights:
    """An hfactory repository (``spec.yaml`` + ``model.safetensors``), else a weights-only one."""
    tried = []
    try:
        return Weights(_read_file(download_model_dir(source, revision=revision, cache_dir=cache_dir)
                                  / WEIGHTS_NAME).state, source, "hfactory")
    except FileNotFoundError as err:
        tried.append(str(err))
    for name in ("model.safetensors", "pytorch_model.bin"):
        try:
            path = download_files(source, (name,), revision=revision, cache_dir=cache_dir)[0]
        except FileNotFoundError as err:
            tried.append(str(err))
            continue
        w = _read_file(path)
        return Weights(w.state, f"{source} ({name})", w.fmt)
    raise FileNotFoundError(f"{source}: no weights; tried an hfactory repository ({SPEC_NAME} + {WEIGHTS_NAME}) and "
                            f"weights alone (model.safetensors, pytorch_model.bin): " + "; ".join(tried[-1:]))


def read_weights(source: Union[str, os.PathLike], *, revision: Optional[str] = None,
                 cache_dir: Optional[Union[str, os.PathLike]] = None) -> Weights:
    """Read the state dict of ``source`` (see the module docstring) without converting it.

    Raises:
        FileNotFoundError: no such file, directory, repository, or weights not in the cache when
            they cannot be downloaded.
        UsageError: a file that is not a state dict, an unknown timm model or tag, an ill-formed source.
    """
    if isinstance(source, str) and source.startswith(TIMM_PREFIX):
        return _read_timm(source[len(TIMM_PREFIX):], cache_dir)
    if is_hub_source(source):
        return _read_hub(source, revision, cache_dir)
    path = Path(source)
    if path.is_dir():
        return _read_dir(path)
    if path.is_file():
        return _read_file(path)
    raise FileNotFoundError(f"pretrained weights {str(source)!r} not found: give a weights file or directory, "
                            f"{TIMM_PREFIX}<model>[.<tag>] or hf-hub:<org>/<name>")


# -- converting ---------------------------------------------------------------------------------
def _classifier_layer(model: nn.Module) -> str:
    """Path of the layer that produces the logits for ``model``'s spec (``head.fc``, or
    ``head.fc.fc2`` for an MLP head), whatever its current class count: found on a meta-device
    build of its classifier with one class (timm's ``pretrained_cfg["classifier"]``)."""
    from .builder import build_component
    from .layers.head import make_classifier

    plan = model.plan
    with torch.device("meta"):
        norm = build_component("norm", plan.head["norm"]) if plan.head.get("norm") is not None else None
        fc = make_classifier(plan.num_features, 1, plan.head, plan.drop_rate, norm)
    last = [name for name, module in fc.named_modules() if isinstance(module, nn.Linear)][-1]
    return "head.fc" + (f".{last}" if last else "")


def _classifier_state(model: nn.Module, num_classes: int) -> dict:
    """The state dict (meta tensors, ``head.fc.``-prefixed) of ``model``'s classifier rebuilt for
    ``num_classes``: what a ``reset_classifier(num_classes)`` would hold."""
    from .builder import build_component
    from .layers.head import make_classifier

    plan = model.plan
    with torch.device("meta"):
        norm = build_component("norm", plan.head["norm"]) if plan.head.get("norm") is not None else None
        fc = make_classifier(plan.num_features, num_classes, plan.head, plan.drop_rate, norm)
    return {f"head.fc.{k}": v for k, v in fc.state_dict().items()}


def _sam2_trunk(state: Mapping, expected: Mapping) -> Optional[dict]:
    """The trunk of a SAM2 checkpoint (keys under ``image_encoder.trunk.``) in timm's HieraDet keys,
    as :func:`hfactory.convert.sam2.from_sam2_state_dict` reads it (``mlp.layers.0/1`` ->
    ``mlp.fc1/fc2``; SAM2's trunk has no final norm: the identity affine); None for other keys."""
    from .convert.sam2 import SAM2_TRUNK_PREFIX

    if not any(k.startswith(SAM2_TRUNK_PREFIX) for k in state):
        return None
    trunk = {k[len(SAM2_TRUNK_PREFIX):].replace(".mlp.layers.0.", ".mlp.fc1.").replace(".mlp.layers.1.", ".mlp.fc2."): v
             for k, v in state.items() if k.startswith(SAM2_TRUNK_PREFIX)}
    if "head.norm.weight" not in trunk and "norm.weight" in expected:
        trunk["head.norm.weight"] = torch.ones_like(expected["norm.weight"])
        trunk["head.norm.bias"] = torch.zeros_like(expected["norm.bias"])
    return trunk


def _is_hiera_mae(state: Mapping) -> bool:
    return any(k.startswith("decoder_blocks.") for k in state) and any(k.startswith("blocks.") for k in state)


def _converted(weights: Weights, model: nn.Module) -> tuple[dict, str]:
    """``weights`` in ``model``'s keys (resized; everything but the classifier ``head.fc.*``
    checked against ``model``) and a description of the conversion. Tries, in order: hfactory's
    own keys (a save; an autoencoder's ``encoder.*``), then by the keys: a SAM2 checkpoint's trunk,
    the official Hiera package, the timm families of :mod:`hfactory.convert`.

    Raises:
        UsageError: no interpretation fits; the message says what was tried and the mismatch.
    """
    from .convert.core import FAMILIES, _strip_prefixes, mismatch_report
    from .convert.resize import resize_to_model

    state = weights.state
    expected = model.state_dict()
    body = {k: v for k, v in expected.items() if not k.startswith("head.fc.")}

    def fits(candidate: dict) -> str:  # the mismatch report of everything but the classifier ('' = fits)
        return mismatch_report(body, {k: v for k, v in candidate.items() if not k.startswith("head.fc.")})

    tried = []
    own = dict(state)
    if any(k.startswith("encoder.") for k in own) and not any(k.startswith("encoder.") for k in expected):
        own = {k[len("encoder."):]: v for k, v in own.items() if k.startswith("encoder.")}  # an MAE save
    own = resize_to_model(own, expected, model)
    own_report = fits(own)
    if not own_report:
        return own, "hfactory"

    foreign = _strip_prefixes(state)
    sam2 = _sam2_trunk(foreign, expected)
    if weights.fmt == "hfactory":  # an hfactory save of another spec: its keys are hfactory's, nothing to convert
        families = []
    elif sam2 is not None:  # a SAM2 checkpoint (facebookresearch/sam2): its image encoder's trunk
        foreign, families = sam2, [f for f in FAMILIES if f.name == "sam2"]
    elif weights.fmt == "hiera" or _is_hiera_mae(foreign):
        foreign = {k: v for k, v in foreign.items() if not k.startswith(_MAE_ONLY)}
        families = [f for f in FAMILIES if f.name == "hiera"]
    else:
        families = [f for f in FAMILIES if f.detect(foreign)]
    for family in families:
        mapped = resize_to_model(family.map(foreign, model), expected, model)
        report = fits(mapped)
        if not report:
            return mapped, ("official hiera package " if weights.fmt == "hiera" else
                            "SAM2 checkpoint, " if sam2 is not None else "timm ") + family.name
        tried.append(f"as {family.name} weights (the keys are that family's): {report}")
    if not families:  # neither a converter's format nor the model's own keys: show the latter's mismatch
        if weights.fmt != "hfactory":
            tried.append(f"as timm / official Hiera weights: no converter recognises the keys (known families: "
                         f"{', '.join(f.name for f in FAMILIES)}; first keys: {', '.join(list(foreign)[:5])})")
        tried.append(f"as hfactory keys: {own_report}")
    name = getattr(getattr(model, "spec", None), "name", None) or type(model).__name__
    raise UsageError(f"{weights.origin} does not fit this model ({name}); nothing was loaded. Tried "
                     + "; ".join(tried))


def load_weights(model: nn.Module, source: Union[str, os.PathLike, Weights], *, adopt_num_classes: bool = False,
                 revision: Optional[str] = None, cache_dir: Optional[Union[str, os.PathLike]] = None,
                 log: bool = True) -> dict:
    """Load the weights of ``source`` into ``model`` (a
    :class:`~hfactory.encoder.HierarchicalEncoder`), converting and checking them (module docstring).

    Args:
        model: the encoder; its spec decides the architecture the weights must have.
        source: a weight source (module docstring), or :class:`Weights` already read.
        adopt_num_classes: when the weights' class count differs from the model's, give the model
            the weights' classifier (``reset_classifier(n)``, then load it) instead of keeping the
            model's classifier with its new initialisation.
        revision: the branch, tag or commit of a Hub source.
        cache_dir: the download cache of a Hub or timm source.
        log: say so (``logging``, logger ``hfactory.pretrained``) when the classifier is not loaded
            (a warning) or adopted (info).

    Returns:
        ``{"source", "format", "loaded": tensors copied, "num_classes": the weights' class count,
        "classifier": None, or the message saying why the classifier was reset or adopted}``.

    Raises:
        UsageError (a ValueError): the weights do not fit the model (another architecture, width,
            depth or in_chans); the message names the keys and shapes, and the model is unchanged.
        FileNotFoundError / UsageError: see :func:`read_weights`.
    """
    weights = source if isinstance(source, Weights) else read_weights(source, revision=revision, cache_dir=cache_dir)
    if getattr(type(model), "model_kind", None) != "encoder":
        raise UsageError(f"pretrained weights load into encoders (HierarchicalEncoder); got {type(model).__name__} "
                         "(a masked autoencoder takes official Hiera MAE weights with "
                         "hfactory.convert.from_hiera_mae_state_dict)")
    state, fmt = _converted(weights, model)
    head = {k: v for k, v in state.items() if k.startswith("head.fc.")}
    layer = _classifier_layer(model)
    ckpt_classes = int(head[f"{layer}.weight"].shape[0]) if f"{layer}.weight" in head else 0
    message, level = None, logging.WARNING
    if ckpt_classes != model.num_classes and adopt_num_classes:
        from .convert.core import mismatch_report

        report = mismatch_report(_classifier_state(model, ckpt_classes), head)
        if report:
            raise UsageError(f"{weights.origin}: its classifier does not fit this model's head; nothing was loaded; "
                             f"{report}")
        message = (f"num_classes {model.num_classes} -> {ckpt_classes}: the model takes the classifier of "
                   f"{weights.origin}")
        level = logging.INFO  # what the caller asked for: no warning
        model.reset_classifier(ckpt_classes)  # the rest was checked by _converted, the head just now
    elif ckpt_classes != model.num_classes:
        current = model.state_dict()
        model_head = [k for k in current if k.startswith("head.fc.")]
        keep = {f"{layer}.weight", f"{layer}.bias"} if ckpt_classes else set(model_head)
        state = {k: v for k, v in state.items() if not k.startswith("head.fc.")}
        state.update({k: head[k] for k in model_head if k not in keep and k in head})
        state.update({k: current[k] for k in model_head if k in keep})
        what = ("the rest of the head is loaded" if len(keep) < len(model_head) else "the rest is loaded")
        message = (f"classifier {layer} reset: {weights.origin} has {ckpt_classes} classes, the model "
                   f"{model.num_classes}; it keeps its new initialisation ({what})") if model.num_classes else (
                   f"classifier of {weights.origin} ({ckpt_classes} classes) not loaded: the model has "
                   "num_classes 0 (pooled features)")
    load_checked(model, state, source=weights.origin)  # strict; nothing is copied unless everything fits
    if message and log:
        _logger.log(level, message)
    return {"source": weights.origin, "format": fmt, "loaded": len(state), "num_classes": ckpt_classes,
            "classifier": message}


def timm_preprocessing(name: str) -> Optional[dict]:
    """The preprocessing of timm weights ``name`` (``arch`` or ``arch.tag``): ``mean``, ``std``,
    ``crop_pct``, ``crop_mode``, ``interpolation`` of its pretrained config; None when timm is not
    installed or has no such weights."""
    try:
        cfg = _timm_cfg(name)
    except UsageError:
        return None
    return {k: cfg[k] for k in _PREPROCESS if cfg.get(k) is not None}


def create_pretrained(spec, source: Union[str, os.PathLike], *, preprocess: Optional[dict] = None,
                      revision: Optional[str] = None, cache_dir: Optional[Union[str, os.PathLike]] = None,
                      **overrides):
    """Build ``spec`` (with top-level ``overrides``) and load the weights of ``source``.

    Without ``num_classes`` in ``overrides`` the model takes the weights' class count (timm's
    ``create_model(pretrained=True)`` does the same with its pretrained config); with it, a
    different count resets the classifier (a warning says so) and loads the rest.

    The model gets a timm-style ``pretrained_cfg`` dict: ``input_size`` of the spec,
    ``num_classes``, the source, and the preprocessing (``mean``, ``std``, ``crop_pct``,
    ``crop_mode``, ``interpolation``) of a ``timm:`` source, else ``preprocess`` when given
    (``timm.data.resolve_data_config(model=model)`` reads it).

    Raises:
        see :func:`load_weights`, and the spec's validation / plan errors for bad overrides.
    """
    from .encoder import build_encoder

    weights = read_weights(source, revision=revision, cache_dir=cache_dir)
    model = build_encoder(spec, **overrides)
    report = load_weights(model, weights, adopt_num_classes="num_classes" not in overrides)
    cfg = {k: weights.cfg[k] for k in _PREPROCESS if weights.cfg.get(k) is not None} if weights.cfg else \
        dict(preprocess or {})
    model.pretrained_cfg = {"input_size": (model.spec.in_chans, *model.plan.img_size), "num_classes": model.num_classes,
                            "source": report["source"], **cfg}
    return model


# -- the Hub ------------------------------------------------------------------------------------
def model_card(model: nn.Module, repo_id: Optional[str] = None) -> str:
    """A model card (``README.md``) for ``model``: front matter (``library_name: hfactory``, tags),
    how to load it, and the summary table of :func:`hfactory.summary.format_summary` (parameters,
    GMACs and activation memory per stage, measured on the meta device)."""
    from .models import format_spec_summary, summarize_spec

    spec = model.spec
    name = getattr(spec, "name", None) or "hfactory model"
    kind = getattr(type(model), "model_kind", None) or "encoder"
    summary = format_spec_summary(spec, summarize_spec(spec, kind=kind), kind=kind)
    source = f"hf-hub:{repo_id}" if repo_id else "DIRECTORY"
    load = (f"model = hfactory.from_pretrained({source!r})" if kind == "encoder" else
            f"model = hfactory.load(...)  # a {kind} model: download the repository, then load the folder")
    return "\n".join([
        "---", "library_name: hfactory", "tags:", "- hfactory", "- image-classification", "- vision-transformer",
        "---", "", f"# {name}", "",
        f"A hierarchical vision model ({kind}) built by [hfactory](https://pypi.org/project/hfactory/) from "
        f"`{SPEC_NAME}` (in this repository); `{WEIGHTS_NAME}` holds its weights.", "",
        "## Use", "", "```python", "import hfactory", "", load, "```", "",
        "## Summary", "", "```", summary.rstrip(), "```", ""])


def save_for_hub(model: nn.Module, folder: Union[str, os.PathLike], repo_id: Optional[str] = None) -> Path:
    """Write the files of a model repository into ``folder``: ``spec.yaml`` and
    ``model.safetensors`` (:func:`hfactory.io.save_model_dir`) and ``README.md``
    (:func:`model_card`). Returns the folder."""
    folder = save_model_dir(model, folder)
    (folder / "README.md").write_text(model_card(model, repo_id), encoding="utf-8")
    return folder


def push_to_hub(model: nn.Module, repo_id: str, *, commit_message: str = "Upload hfactory model",
                private: Optional[bool] = None, token: Optional[str] = None, revision: Optional[str] = None,
                create_pr: bool = False) -> str:
    """Upload ``model`` to the Hub repository ``repo_id`` (``org/name``, created if missing): the
    folder :func:`save_for_hub` writes, in one commit. ``hfactory.from_pretrained("hf-hub:org/name")``
    loads it back. Returns the commit URL.

    Raises:
        UsageError: a ``repo_id`` that is not ``org/name``.
        huggingface_hub errors: the Hub refused (not logged in: ``hf auth login`` or ``token=``).
    """
    with tempfile.TemporaryDirectory(prefix="hfactory-hub-") as tmp:
        save_for_hub(model, tmp, repo_id)
        return upload_folder(tmp, repo_id, commit_message=commit_message, private=private, token=token,
                             revision=revision, create_pr=create_pr)
