"""The Hugging Face Hub as a place for saved models: ``hf-hub:org/name`` sources (download) and
uploads of a ``save_pretrained`` folder.

A model repository hfactory writes holds what :func:`hfactory.io.save_model_dir` writes
(``spec.yaml``, ``model.safetensors``) and a model card ``README.md``
(:func:`hfactory.pretrained.save_for_hub`). Reading goes through ``huggingface_hub``'s own
download and cache (``hf_hub_download``): the cache is ``HF_HUB_CACHE`` (default
``$HF_HOME/hub``), and with ``HF_HUB_OFFLINE=1`` only files already in the cache are used, nothing
is requested from the network.

Transport only: this module knows file names, not models, so that
:func:`hfactory.encoder.from_pretrained` can read ``hf-hub:`` sources without importing the
model-level code of :mod:`hfactory.pretrained` (which builds on the encoder).

Needs ``huggingface_hub`` (``pip install 'hfactory[hub]'``). Sources: huggingface_hub 2.x
``hf_hub_download``, ``HfApi.create_repo`` / ``upload_folder``; timm 1.0.31 ``_hub.py`` (the
same ``hf-hub:`` prefix and ``@revision`` suffix).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from .errors import UsageError
from .io import SPEC_NAME, WEIGHTS_NAME

__all__ = ["HUB_PREFIX", "is_hub_source", "parse_hub_source", "download_files", "download_model_dir",
           "upload_folder"]

#: Prefix of a Hub source, as in timm (``timm.create_model("hf-hub:timm/...")``).
HUB_PREFIX = "hf-hub:"


def is_hub_source(source) -> bool:
    """Whether ``source`` is a string ``hf-hub:org/name[@revision]``."""
    return isinstance(source, str) and source.startswith(HUB_PREFIX)


def parse_hub_source(source: str, revision: Optional[str] = None) -> tuple[str, Optional[str]]:
    """``"hf-hub:org/name@rev"`` -> ``("org/name", "rev")``; ``revision`` (when given) must agree
    with a ``@rev`` in the source.

    Raises:
        UsageError (a ValueError): no ``hf-hub:`` prefix, not ``org/name``, or two revisions.
    """
    if not is_hub_source(source):
        raise UsageError(f"{source!r} is not a Hub source; write hf-hub:ORG/NAME (optionally @REVISION)")
    repo, _, rev = source[len(HUB_PREFIX):].partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts):
        raise UsageError(f"{source!r}: expected hf-hub:ORG/NAME[@REVISION], e.g. hf-hub:my-org/my-encoder")
    if rev and revision and rev != revision:
        raise UsageError(f"{source!r} names revision {rev!r} but revision={revision!r} was given; give one")
    return repo, (rev or revision or None)


def _version() -> str:
    """hfactory's installed version, for the Hub's user agent (read from the package metadata, not
    from ``hfactory.__init__``, which imports every model module: an import cycle)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hfactory")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def _hub():
    try:
        import huggingface_hub
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise UsageError("hf-hub: sources need huggingface_hub: pip install 'hfactory[hub]' "
                         "(or pip install huggingface_hub)") from err
    return huggingface_hub


def _offline_note() -> str:
    from huggingface_hub import constants

    where = f"cache {constants.HF_HUB_CACHE}"
    return f"{where}, offline mode (HF_HUB_OFFLINE)" if constants.is_offline_mode() else where


def download_files(source: str, filenames: tuple[str, ...], *, revision: Optional[str] = None,
                   cache_dir: Optional[Union[str, os.PathLike]] = None) -> list[Path]:
    """Local paths of ``filenames`` of the Hub repository ``source`` (``hf-hub:org/name[@rev]``),
    downloaded into (or found in) the Hugging Face cache by ``huggingface_hub.hf_hub_download``.

    Raises:
        UsageError: a malformed source.
        FileNotFoundError: the repository, revision or a file does not exist, or (offline, or without
            network) is not in the cache; the message names the repository, the file and the cache.
    """
    hub = _hub()
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo, rev = parse_hub_source(source, revision)
    paths = []
    for name in filenames:
        try:
            paths.append(Path(hub.hf_hub_download(repo, name, revision=rev, cache_dir=cache_dir,
                                                  library_name="hfactory", library_version=_version())))
        except (RepositoryNotFoundError, RevisionNotFoundError) as err:
            raise FileNotFoundError(f"{source}: no such repository or revision on the Hub ({type(err).__name__})"
                                    ) from None
        except (EntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as err:
            raise FileNotFoundError(f"{source}: {name} could not be read: not in the repository, or not in the "
                                    f"Hugging Face {_offline_note()} and no download possible "
                                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                                    ) from None
    return paths


def download_model_dir(source: str, *, revision: Optional[str] = None,
                       cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The local snapshot folder of an hfactory model repository ``source``
    (``hf-hub:org/name[@rev]``) holding its ``spec.yaml`` and ``model.safetensors``.

    Raises:
        UsageError / FileNotFoundError: as :func:`download_files` (a repository without
            ``spec.yaml`` is not an hfactory save; :func:`hfactory.pretrained.load_weights` reads the
            weights of such repositories, e.g. timm's, into a built model).
    """
    spec_path, weights_path = download_files(source, (SPEC_NAME, WEIGHTS_NAME), revision=revision,
                                             cache_dir=cache_dir)
    if spec_path.parent != weights_path.parent:  # a commit landed between the two downloads
        raise FileNotFoundError(f"{source}: {SPEC_NAME} and {WEIGHTS_NAME} resolved to different revisions "
                                f"({spec_path.parent.name} vs {weights_path.parent.name}); pin one with @REVISION")
    return spec_path.parent


def upload_folder(folder: Union[str, os.PathLike], repo_id: str, *, commit_message: str = "Upload hfactory model",
                  private: Optional[bool] = None, token: Optional[str] = None, revision: Optional[str] = None,
                  create_pr: bool = False) -> str:
    """Create the model repository ``repo_id`` (``org/name``; kept if it exists) and upload
    every file of ``folder`` in one commit. Returns the commit's URL.

    Raises:
        UsageError: ``repo_id`` is not ``org/name``.
        huggingface_hub errors (HfHubHTTPError ...): the Hub refused (authentication, permissions).
    """
    hub = _hub()
    if repo_id.startswith(HUB_PREFIX):
        repo_id = repo_id[len(HUB_PREFIX):]
    if len(repo_id.split("/")) != 2 or not all(repo_id.split("/")):
        raise UsageError(f"repo_id {repo_id!r}: expected ORG/NAME (a user or organisation, then the model name)")
    api = hub.HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                             commit_message=commit_message, revision=revision, create_pr=create_pr)
    return str(getattr(info, "commit_url", info))
