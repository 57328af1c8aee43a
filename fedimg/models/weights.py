"""Loading weights: torchvision's ImageNet checkpoints and saved task models.

torchvision reads its checkpoints from the torch hub cache
(``torch.hub.get_dir()/checkpoints/<file>``, i.e. ``$TORCH_HOME/hub/checkpoints``)
and downloads them when a network exists. On an offline machine the download must
fail fast, with a message that names the file to place and the bundled
alternative, instead of hanging or printing a raw ``URLError``.
"""

from __future__ import annotations

import logging
import pickle
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from fedimg.errors import ModelError

logger = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 10.0
WEIGHTS_CHOICES = "'pretrained' (ImageNet), 'none' (random init) or a path to a .pth state dict"


@contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Temporarily set the default socket timeout (torch.hub's urlopen has none)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def hub_checkpoint_path(url: str) -> Path:
    """Where torch.hub caches (and looks for) the checkpoint behind ``url``."""
    filename = Path(urlparse(url).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def torchvision_pretrained(name: str) -> nn.Module:
    """torchvision model ``name`` with its DEFAULT ImageNet weights, loaded by torchvision.

    Raises ModelError when the checkpoint is neither cached nor downloadable, or
    when the cached file cannot be read.
    """
    weights = torchvision.models.get_model_weights(name).DEFAULT
    cached = hub_checkpoint_path(weights.url)
    try:
        with socket_timeout(DOWNLOAD_TIMEOUT_S):
            model = torchvision.models.get_model(name, weights=weights, progress=False)
    except OSError as exc:  # URLError, timeouts, DNS failures, unwritable cache
        raise ModelError(
            f"model={name} weights=pretrained: the ImageNet checkpoint is not cached at "
            f"{cached} and could not be downloaded ({exc}); fix: download {weights.url} "
            f"and place it at {cached} (or set TORCH_HOME), or use the bundled offline "
            f"model=efficientnet_lite0, or weights=none to train from scratch"
        ) from exc
    except (RuntimeError, pickle.UnpicklingError, EOFError) as exc:
        raise ModelError(
            f"model={name} weights=pretrained: the cached checkpoint {cached} is "
            f"corrupt or does not match {name} ({_first_line(exc)}); fix: delete it "
            f"and download {weights.url} again, or use weights=none"
        ) from exc
    logger.info("loaded %s ImageNet weights (%s) from %s", name, weights, cached)
    return model


def weights_file(path: str) -> Path:
    """The existing file that ``weights=path`` names, or ModelError."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelError(
            f"weights='{path}' is neither a keyword nor an existing file; valid: "
            f"{WEIGHTS_CHOICES}; fix: check the path (relative paths start at "
            f"{Path.cwd()})"
        )
    return file


def load_state_dict_file(model: nn.Module, path: str, *, model_name: str) -> None:
    """Load a full-model state dict saved by ``torch.save(model.state_dict())``, strictly."""
    file = weights_file(path)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as exc:
        raise ModelError(
            f"weights='{path}' cannot be read as a PyTorch state dict "
            f"({_first_line(exc)}); fix: save it with torch.save(model.state_dict(), path)"
        ) from exc
    origin = ""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        meta = state.get("meta") or {}  # a fedimg checkpoint: {"state_dict", "meta"}
        if meta.get("model") and meta.get("classes") is not None:
            origin = (f" (it is a fedimg checkpoint of model={meta['model']} with "
                      f"{len(meta['classes'])} classes {list(meta['classes'])[:5]})")
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(
            f"weights='{path}' holds a {type(state).__name__}, not a state dict; "
            f"fix: save it with torch.save(model.state_dict(), path)"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"weights='{path}' does not fit model={model_name} with this head{origin}: "
            f"{_mismatch_summary(model, state)}; fix: use the model name and "
            f"num_classes the file was saved with"
        ) from exc
    logger.info("loaded %s weights from %s", model_name, file)


def _mismatch_summary(model: nn.Module, state: dict) -> str:
    """Counts and first examples of missing, unexpected and mis-shaped keys."""
    expected = {k: v for k, v in model.state_dict().items()
                if not k.endswith("num_batches_tracked")}
    given = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in given and hasattr(given[k], "shape") and given[k].shape != v.shape]
    parts = [f"{len(items)} {what} (e.g. {', '.join(items[:3])})"
             for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("shape mismatches, file vs model", shapes)) if items]
    if unexpected and all(k.startswith("_module.") for k in unexpected):
        parts.append("the file comes from an Opacus wrapper: strip the '_module.' prefix")
    return "; ".join(parts) or "incompatible tensors"


def _first_line(exc: object, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
