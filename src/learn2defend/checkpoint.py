"""Checkpoints that cannot run code, written so a crash never destroys the last good one.

A checkpoint is one safetensors file. Tensors (weights, optimizer buffers, random
generator states) are stored as tensors; everything else (epochs, learning rates,
counters) goes into the file's JSON metadata through a tiny codec that keeps ints,
tuples and int dict keys intact, so `optimizer.load_state_dict` gets back exactly
what `state_dict()` gave. Nothing is ever unpickled.

Every file the program writes goes through `atomic_write` (here, the lowest layer that
writes). Writes go to a temporary file in the same folder, are flushed and fsynced, then
renamed over the old file: a reader sees the old checkpoint or the new one, never
half of one. A process killed mid-write leaves only a hidden `.NAME.tmp-PID` file
behind, which `is_temp_file` recognizes and `remove_temp_files` clears.

Test hook: with the environment variable LEARN2DEFEND_TEST_SLOW_WRITE=SECONDS set,
every write sleeps that long between fsync and rename, so a test can kill a run
while a checkpoint is being written (tests/test_reliability.py). Unset, it costs one
dictionary lookup per write.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import UserError

FORMAT = "learn2defend-checkpoint-1"


def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        # clone: safetensors refuses tensors that share storage (tied or sliced weights)
        tensors[path] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a checkpoint")


def _key(k: Any) -> Any:
    if isinstance(k, (int, str)):
        return k
    raise TypeError(f"checkpoint dict keys must be int or str, got {type(k).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


SLOW_WRITE_ENV = "LEARN2DEFEND_TEST_SLOW_WRITE"
_TEMP_NAME = re.compile(r"\..+\.tmp-\d+")


def is_temp_file(name: str) -> bool:
    """True for the `.NAME.tmp-PID` files `atomic_write_bytes` writes before renaming."""
    return _TEMP_NAME.fullmatch(name) is not None


def remove_temp_files(folder: Path) -> int:
    """Delete temp files a killed writer left in `folder`; return how many there were."""
    removed = 0
    for child in Path(folder).iterdir():
        if is_temp_file(child.name) and child.is_file():
            child.unlink(missing_ok=True)
            removed += 1
    return removed


class WriteFailed(UserError):
    """A file could not be written (disk full, no permission, ...): one line, exit code 2.
    `existed` says whether the target held an earlier version, which is then intact."""

    def __init__(self, message: str, existed: bool) -> None:
        super().__init__(message)
        self.existed = existed


Content = bytes | str | Callable[[Path], None]


def _fill(tmp: Path, content: Content) -> None:
    """Write `content` into the new file `tmp` and fsync it. The one place the program's
    output reaches the disk (a test that simulates a full disk replaces it)."""
    if callable(content):
        content(tmp)  # e.g. matplotlib's savefig or torch.save, writing the file itself
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        return
    with open(tmp, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | Path, content: Content, what: str = "") -> None:
    """Write `path` so that it holds either its old content or all of `content`: bytes, text
    (UTF-8), or a function that writes a file at the path it is given (savefig, torch.save,
    a CSV writer). Every file the program writes goes through here: checkpoints, config and
    metrics, JSON, CSV, PNG, progress files. An OSError, or torch's RuntimeError for a
    failed write, becomes `WriteFailed` (a UserError: one line, exit 2), and no partial file
    is left behind. `what` names the file in that line (default: its path)."""
    path = Path(path)
    existed = path.is_file()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        try:
            _fill(tmp, content)
            slow = os.environ.get(SLOW_WRITE_ENV)
            if slow:  # test hook, see the module docstring
                time.sleep(float(slow))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise WriteFailed(f"cannot write {what or path}: {e.strerror or e}", existed) from None
    except RuntimeError as e:  # torch.save's writer: "[enforce fail at inline_container.cc] ... "
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WriteFailed(f"cannot write {what or path}: {detail}", existed) from None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` holds either the old or the new content."""
    atomic_write(path, data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


def check_writable(path: str | Path, flag: str = "--out", folder: bool = False) -> None:
    """Before any work: UserError unless `path` (a file, or with `folder` a folder) can be
    created or replaced: its nearest existing ancestor is a writable folder, and a file is
    not given as an existing folder (nor a folder as an existing file)."""
    path = Path(path)
    if not folder and path.is_dir():
        raise UserError(f"{flag} '{path}' is a folder; give a file name")
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{flag} '{path}' exists and is not a folder")
    start = path if folder else path.parent
    parent = next(p for p in (start, *start.absolute().parents) if p.exists())
    if not parent.is_dir():
        raise UserError(f"cannot write {flag} '{path}': '{parent}' is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {flag} '{path}': '{parent}' is not writable")


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Store a nested dict of tensors and plain values as one safetensors file, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors, "s")
    data = save(tensors, metadata={"format": FORMAT, "tree": json.dumps(tree)})
    atomic_write(Path(path), data)


def load_state(path: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a file written by `save_state`; a missing, truncated or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint file {path} does not exist")
    try:
        tensors = load_file(str(path), device=str(device))
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            metadata = json.loads(f.read(header_len)).get("__metadata__", {})
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} is corrupt or not a safetensors file ({e})") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} is not a learn2defend checkpoint")
    try:
        state = _decode(json.loads(metadata["tree"]), tensors)
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as e:  # tampered
        raise UserError(f"checkpoint {path} is damaged: its metadata does not match its tensors ({e!r})") from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {path} is damaged: it holds no state dictionary")
    return state


def rng_state() -> dict[str, Any]:
    """Every random generator the training step draws from."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
