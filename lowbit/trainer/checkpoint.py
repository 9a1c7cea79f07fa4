"""Checkpoints: atomic, verified, pruned.

Layout: <run_dir>/checkpoints/step_00000100/ holding
  model.safetensors   the (unwrapped) model's weights, HF safetensors
  optimizer.pt        optimizer.state_dict() (or DeepSpeed's own files under deepspeed/)
  trainer.pt          step, RNG states, data position, W&B run id, config
  weight_pairs.pt     (fp8 weight pairs written by the optimizer step only) the amax of each pair
  manifest.json       written last: sha256 and size of every file above

A checkpoint is written into a temporary sibling directory and renamed into place only once every
file and the manifest are on disk, so a crash leaves either the old set or a new complete one,
never a half-written `step_*`. Loading re-checks every hash; a mismatch is an error that names the
file and deletes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_dir_for(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f".tmp-{step_dir_name(step)}-{os.getpid()}-{int(time.time() * 1000)}"


def finalize(tmp: Path, ckpt_root: Path, step: int) -> Path:
    """Hash every file in `tmp`, write the manifest, and rename `tmp` to its final name."""
    files = {}
    for f in sorted(tmp.rglob("*")):
        if f.is_file():
            rel = f.relative_to(tmp).as_posix()
            files[rel] = {"sha256": _sha256(f), "bytes": f.stat().st_size}
    manifest = {"step": step, "files": files, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with (tmp / MANIFEST).open("w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    final = ckpt_root / step_dir_name(step)
    if final.exists():
        # Re-saving the same step (e.g. a resumed run that stops where it started): replace the old
        # copy only after the new one is complete.
        old = ckpt_root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(ckpt_root)
    return final


def complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint (one with a manifest), oldest first."""
    if not ckpt_root.is_dir():
        return []
    out = []
    for d in ckpt_root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / MANIFEST).is_file():
            out.append((int(m.group(1)), d))
    return sorted(out)


def verify(path: Path) -> dict[str, Any]:
    """Check a checkpoint against its manifest; raise CheckpointError naming the first bad file."""
    mf = path / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it is incomplete or not a checkpoint")
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is corrupted ({e})") from e
    for rel, meta in files.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupted: {rel} is missing")
        if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            raise CheckpointError(
                f"checkpoint {path} is corrupted: {rel} does not match its recorded sha256/size. "
                "Nothing was deleted; resume from an earlier checkpoint with resume=<path> "
                "or remove this one."
            )
    return manifest


def prune(ckpt_root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints; return what was removed."""
    if keep_last <= 0:
        return []
    done = complete_checkpoints(ckpt_root)
    removed = []
    for _, path in done[:-keep_last]:
        shutil.rmtree(path)
        removed.append(path)
    return removed


def resolve_resume(resume: str, ckpt_root: Path) -> Path | None:
    """Map the `resume=` setting to a checkpoint directory (None = start fresh)."""
    if resume == "none":
        if complete_checkpoints(ckpt_root):
            raise CheckpointError(
                f"{ckpt_root} already holds checkpoints and resume=none would overwrite them; "
                "pass resume=auto to continue that run, or choose another run_name."
            )
        return None
    if resume == "auto":
        done = complete_checkpoints(ckpt_root)
        return done[-1][1] if done else None
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(
            f"resume={resume!r} is not a checkpoint directory (valid: none, auto, or a path)"
        )
    return path


def save_torch(obj: Any, path: Path) -> None:
    with path.open("wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def load_torch(path: Path) -> Any:
    # Our own file, checked against the manifest's sha256 before this is called.
    return torch.load(path, map_location="cpu", weights_only=False)


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """Write a module's weights as safetensors; tied parameters are stored once, with their aliases.

    Tensors are copied out first: under DeepSpeed/ZeRO parameters are views into flat buffers, which
    safetensors refuses to save as they are.
    """
    from safetensors.torch import save_file

    tensors, aliases, seen = {}, {}, {}
    for name, t in module.state_dict().items():
        key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().to("cpu", copy=True).contiguous()
    save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases), "format": "pt"})
    with path.open("rb+") as fh:
        os.fsync(fh.fileno())


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Load weights written by save_weights; a missing or extra tensor is a CheckpointError."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
    state = load_file(str(path))
    for name, source in aliases.items():
        state[name] = state[source]
    expected = set(module.state_dict())
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]} (was it written with another model= or quant= config?)"
        )
    module.load_state_dict(state, strict=True)
