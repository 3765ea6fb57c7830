"""Resumable checkpoints, written atomically.

A checkpoint is a folder ``checkpoints/step-000123/`` with the trainable weights (safetensors), the
optimizer and scheduler state, RNG states and ``state.json`` (data position, history, best so far).
It is assembled in a ``.tmp`` sibling and renamed into place; ``state.json`` is written last, so a
folder without it, or whose files do not load, is never taken for whole. ``checkpoints/best`` (the
weights of the best evaluation) is written the same way and read with :func:`read_weights`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmtune._console import log
from lmtune._io import atomic_write_json, fsync_dir
from lmtune.errors import CheckpointError

KEEP_LAST = 2


def trainable_state(model: torch.nn.Module, *, copy: bool = False) -> dict[str, torch.Tensor]:
    """The trainable weights by name. Without ``copy`` the tensors share memory with the model (enough for
    writing a file; a full fine-tune's copy is another ~0.5 GB per 135M parameters at peak)."""
    state = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.clone() for n, t in state.items()} if copy else state


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise CheckpointError(
            f"{source}: does not match this model/method (missing {missing[:3]}, unexpected {unknown[:3]}); "
            "was it written by a run with another --model or --method?"
        )
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def _write_files(folder: Path, files: dict[str, Any]) -> None:
    for name, payload in files.items():
        path = folder / name
        if name.endswith(".safetensors"):
            save_file(payload, str(path))
        elif name.endswith(".pt"):
            torch.save(payload, path)
        else:
            path.write_text(json.dumps(payload, indent=1))
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def write_folder_atomically(target: Path, files: dict[str, Any], state: dict[str, Any]) -> None:
    """Write ``files`` then ``state.json`` into a temp sibling and rename it to ``target``.

    An existing ``target`` is first renamed to ``.old``: a crash between the two renames leaves no
    ``target`` but a complete ``.tmp``, which :func:`finish_interrupted_writes` puts in place."""
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _write_files(tmp, files)
    atomic_write_json(tmp / "state.json", state)
    fsync_dir(tmp)
    old = None
    if target.exists():
        old = target.with_name(target.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_root: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    state: dict[str, Any]) -> Path:
    """``trainable``: the trained weights by name at full precision (see :func:`trainable_state`)."""
    target = ckpt_root / f"step-{step:07d}"
    write_folder_atomically(
        target,
        {
            "trainable.safetensors": trainable,
            "optimizer.pt": optimizer.state_dict(),
            "scheduler.pt": scheduler.state_dict(),
            "rng.pt": rng_state(),
        },
        state,
    )
    for old in list_checkpoints(ckpt_root)[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def finish_interrupted_writes(ckpt_root: Path) -> None:
    """Complete what a crash left half-done in :func:`write_folder_atomically`.

    Without ``target``, a ``.tmp`` holding ``state.json`` is complete (that file is written last) and is
    the newer copy; failing that, a ``.old`` is the previous complete one. A ``.tmp`` next to its
    ``target`` is a write that never reached the renames, and is left for the next write to clear.
    """
    if not ckpt_root.is_dir():
        return
    for name in sorted({p.name.removesuffix(".tmp").removesuffix(".old") for p in ckpt_root.iterdir()
                        if p.name.endswith((".tmp", ".old"))}):
        target = ckpt_root / name
        tmp, old = ckpt_root / f"{name}.tmp", ckpt_root / f"{name}.old"
        try:
            if target.exists():
                continue
            if (tmp / "state.json").is_file():
                os.replace(tmp, target)
                log.debug(f"completed the interrupted write of {target}")
            elif old.is_dir():
                os.replace(old, target)
                log.debug(f"restored {target} from {old.name}")
        except OSError:  # another process of the same run did it first
            pass


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and not p.name.endswith((".tmp", ".old")))


def read_weights(folder: Path) -> dict[str, Any]:
    """``state.json`` and the trainable weights of a checkpoint (or of ``checkpoints/best``); raises
    CheckpointError naming the file that is missing or corrupt."""
    state_path = folder / "state.json"
    if not state_path.is_file():
        raise CheckpointError(f"{folder}: incomplete checkpoint (no state.json)")
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{state_path}: corrupt ({e})") from e
    return {"state": state, "path": folder, "trainable.safetensors": _load(folder / "trainable.safetensors")}


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """Load one checkpoint; raises CheckpointError naming the file that is missing or corrupt."""
    out = read_weights(folder)
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        out[name] = _load(folder / name)
    return out


def step_weights(ckpt_root: Path, step: int) -> dict[str, Any] | None:
    """The weights of the step checkpoint of ``step`` (see :func:`read_weights`); None if gone or corrupt."""
    folder = ckpt_root / f"step-{step:07d}"
    if not folder.is_dir():
        return None
    try:
        return read_weights(folder)
    except CheckpointError as e:
        log.debug(f"not usable: {e}")
        return None


def _load(path: Path) -> Any:
    try:
        if path.name.endswith(".safetensors"):
            return load_file(str(path))
        # weights_only: a checkpoint is data, never code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def latest_checkpoint(ckpt_root: Path) -> dict[str, Any] | None:
    """The newest checkpoint that loads whole; corrupt newer ones are reported and skipped."""
    finish_interrupted_writes(ckpt_root)
    for folder in reversed(list_checkpoints(ckpt_root)):
        try:
            return read_checkpoint(folder)
        except CheckpointError as e:
            log.warning(f"warning: skipping {e}")
    return None
