"""Checkpoints as safetensors + JSON: nothing is unpickled when a run resumes.

A checkpoint directory holds the model weights, the optimiser state (tensors flattened into
one safetensors file, hyper-parameters in JSON), the torch RNG state and the loop state. It is
written into a temporary directory and renamed into place, so a kill at any moment leaves
either the previous checkpoint or the new one, never a mixture.

Every file carries a checksum taken when it was written: the safetensors files the sha256 of
their tensors (in their metadata), ``state.json`` the sha256 of its own content. The checkpoint
before the newest is kept (``checkpoint.prev``), so that a resume that finds the newest one
damaged (a full disk, a copy broken off, a hand edit) goes on from the one before, saying so
in one line; with no good one left it stops with one line naming the damaged file
(:class:`cellscale.runtime.io.DamagedFile`) and how to start over.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cellscale.runtime.io import DamagedFile, first_line, json_digest, read_json_checked, warn

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optim.safetensors"
STATE_FILE = "state.json"
CRASH_ENV = "CELLSCALE_CRASHPOINT"
DIGEST_KEY = "cellscale_sha256"  # safetensors metadata: sha256 of the tensors (tensor_digest)
# next to ``checkpoint``: the one a kill between the two renames of a save leaves (.old), the one
# before the newest (.prev), and one found damaged and set aside (.damaged)
OLD, PREV, DAMAGED = ".old", ".prev", ".damaged"


def start_over(run_dir: Path) -> str:
    """How to start a run over whose files cannot be used: ``train --overwrite``; a sweep's run
    (the sweep passes no --overwrite down) by removing its directory."""
    return f"start the run over with --overwrite, or by deleting {run_dir}"


def crashpoint(name: str) -> None:
    """Fault injection for the kill tests: SIGKILL this process at the named point when
    ``CELLSCALE_CRASHPOINT=name`` (SIGTERM, which a run answers by checkpointing and stopping, when
    ``=name:TERM``). Points: ``checkpoint-written`` (a complete temp checkpoint, before any rename),
    ``checkpoint-swap`` (the old checkpoint moved to ``.old``, the new one not yet in place),
    ``before-result`` (training and evaluation done, result.json not written), ``inside-branch``
    (after a cooldown branch's first step), ``after-branch`` (a branch recorded, its checkpoint not
    yet written)."""
    wanted = os.environ.get(CRASH_ENV)
    if wanted == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif wanted == f"{name}:TERM":
        os.kill(os.getpid(), signal.SIGTERM)


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.save_file`` with the tensors' checksum in the file's metadata."""
    save_file(tensors, str(path), metadata={DIGEST_KEY: tensor_digest(tensors)})


def read_tensors(path: Path, *, fix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, on the CPU: DamagedFile when the file does not parse
    (cut short, say) or its tensors differ from the checksum it was written with (a file
    without one, from an older cellscale, is only parsed). FileNotFoundError when missing.
    ``fix`` (default: :func:`start_over` of the run dir holding the file) ends the message."""
    path = Path(path)
    fix = fix if fix is not None else start_over(_run_dir_of(path))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except FileNotFoundError:
        raise
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise DamagedFile(path, f"not a readable safetensors file: {first_line(err)}", fix) from None
    want = meta.get(DIGEST_KEY)
    if want is not None and tensor_digest(tensors) != want:
        raise DamagedFile(path, "its tensors differ from the checksum recorded when it was written", fix)
    return tensors


def _run_dir_of(path: Path) -> Path:
    """The run dir of a weights file: RUN_DIR/best.safetensors, RUN_DIR/checkpoint*/x.safetensors."""
    parent = path.parent
    in_checkpoint = parent.name in {"checkpoint", *(f"checkpoint{x}" for x in (OLD, PREV, DAMAGED))}
    return parent.parent if in_checkpoint or parent.name.startswith(".checkpoint.") else parent


def save_weights(model: torch.nn.Module, path: Path) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_tensors(tensors, path)


def load_weights(model: torch.nn.Module, path: Path, *, fix: str | None = None) -> None:
    """Load weights written by :func:`save_weights`; DamagedFile (with ``fix``) when the file is
    damaged or its tensors do not fit ``model``."""
    path = Path(path)
    fix = fix if fix is not None else start_over(_run_dir_of(path))
    state = read_tensors(path, fix=fix)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise DamagedFile(path, f"its tensors do not fit this model: {first_line(err)}", fix) from None


def _optim_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optim_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, extra in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def _sibling(ckpt_dir: Path, suffix: str) -> Path:
    return ckpt_dir.with_name(ckpt_dir.name + suffix)


def _trash(ckpt_dir: Path) -> Path:
    """A hidden name to move a directory to before removing it: a kill during the removal leaves
    a dir that ``clean_stale`` removes, never a half-deleted checkpoint under a trusted name."""
    return ckpt_dir.with_name(f".{ckpt_dir.name}.trash-{os.getpid()}-{secrets.token_hex(4)}")


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, replacing a ``dst`` that exists (os.replace cannot replace a
    non-empty directory)."""
    trash = None
    if dst.exists():
        trash = _trash(dst)
        os.replace(dst, trash)
    os.replace(src, dst)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _retire_old(ckpt_dir: Path) -> None:
    """``checkpoint.old`` (the checkpoint the newest replaced) becomes ``checkpoint.prev``."""
    old = _sibling(ckpt_dir, OLD)
    if old.is_dir():
        _replace_dir(old, _sibling(ckpt_dir, PREV))


def _write_state(path: Path, loop_state: dict[str, Any], meta: dict[str, Any]) -> None:
    payload = {"loop": loop_state, "optim": meta}
    # the digest of the payload as it will read back (JSON turns tuples into lists, keys into strings)
    payload["sha256"] = json_digest(json.loads(json.dumps(payload)))
    path.write_text(json.dumps(payload))


def save_checkpoint(
    ckpt_dir: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loop_state: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint atomically; the one it replaces is kept as ``checkpoint.prev`` (and
    the one before that removed). ``extra_tensors`` (names starting with ``__``) are stored
    next to the optimiser state, e.g. the RNG states of the other ranks of a DDP run."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ckpt_dir.name}.", dir=ckpt_dir.parent))
    try:
        save_weights(model, tmp / MODEL_FILE)
        tensors, meta = _optim_to_flat(optimizer)
        tensors["__torch_rng__"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["__cuda_rng__"] = torch.cuda.get_rng_state()
        for name, value in (extra_tensors or {}).items():
            if not name.startswith("__"):
                raise ValueError(f"extra checkpoint tensor names start with '__': {name}")
            tensors[name] = value.detach().to("cpu").contiguous()
        save_tensors(tensors, tmp / OPTIM_FILE)
        _write_state(tmp / STATE_FILE, loop_state, meta)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        crashpoint("checkpoint-written")
        old = _sibling(ckpt_dir, OLD)
        if ckpt_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            # an incomplete one (a copy broken off) is no checkpoint to keep as the one before
            os.replace(ckpt_dir, old if _complete(ckpt_dir) else _trash(ckpt_dir))
        crashpoint("checkpoint-swap")
        os.replace(tmp, ckpt_dir)
        _retire_old(ckpt_dir)
        _clean_trash(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _clean_trash(ckpt_dir: Path) -> None:
    """Remove what this process moved aside during a save."""
    for trash in ckpt_dir.parent.glob(f".{ckpt_dir.name}.trash-{os.getpid()}-*"):
        shutil.rmtree(trash, ignore_errors=True)


def _complete(cand: Path) -> bool:
    return all((cand / f).is_file() for f in (MODEL_FILE, OPTIM_FILE, STATE_FILE))


def clean_stale(ckpt_dir: Path) -> None:
    """Remove temp dirs of checkpoint writes (and removals) that a killed process never
    finished (never trusted: ``find_checkpoint`` does not look at them), and finish a rotation
    a kill interrupted (``checkpoint.old`` beside a complete ``checkpoint``)."""
    ckpt_dir = Path(ckpt_dir)
    for tmp in ckpt_dir.parent.glob(f".{ckpt_dir.name}.*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
    if _complete(ckpt_dir):
        _retire_old(ckpt_dir)


def _candidates(ckpt_dir: Path) -> list[Path]:
    """The complete checkpoints, newest first: the directory itself, the ``.old`` one left by a
    kill between the two renames of a save, the ``.prev`` one kept from the save before."""
    return [c for c in (ckpt_dir, _sibling(ckpt_dir, OLD), _sibling(ckpt_dir, PREV)) if _complete(c)]


def find_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (see :func:`_candidates`); its files are checked when it
    is loaded."""
    found = _candidates(Path(ckpt_dir))
    return found[0] if found else None


def _base_dir(cand: Path) -> Path:
    """``checkpoint`` for any of ``checkpoint``, ``checkpoint.old``, ``checkpoint.prev``."""
    for suffix in (OLD, PREV):
        if cand.name.endswith(suffix):
            return cand.with_name(cand.name[: -len(suffix)])
    return cand


@dataclass
class _Read:
    """A checkpoint read and verified, not yet applied."""

    path: Path
    payload: dict[str, Any]
    model: dict[str, torch.Tensor]
    optim: dict[str, torch.Tensor]


def _read_state(path: Path) -> dict[str, Any]:
    payload = read_json_checked(path, keys=("loop", "optim"))
    want = payload.pop("sha256", None)
    if want is not None and json_digest(payload) != want:
        raise DamagedFile(path, "its content differs from the checksum recorded in it")
    return payload


def _read(cand: Path) -> _Read:
    """Every file of checkpoint ``cand`` read and checked (DamagedFile or FileNotFoundError)."""
    return _Read(cand, _read_state(cand / STATE_FILE), read_tensors(cand / MODEL_FILE),
                 read_tensors(cand / OPTIM_FILE))


def _as_damage(err: Exception, cand: Path) -> DamagedFile:
    if isinstance(err, DamagedFile):
        return err
    return DamagedFile(getattr(err, "filename", None) or cand, "missing")


def _set_aside(cand: Path) -> None:
    """Move a damaged checkpoint out of the rotation, so that the next save keeps the good one
    as ``.prev``; kept (one, as ``<name>.damaged``) for a look at what went wrong."""
    try:
        _replace_dir(cand, _sibling(cand, DAMAGED))
    except OSError:  # another rank moved it first, or a read-only run dir: nothing to keep apart
        pass


def _read_newest(cands: list[Path]) -> tuple[_Read | None, list[tuple[Path, DamagedFile]]]:
    """The newest of ``cands`` whose files all check (None when none does), and the damaged
    ones before it."""
    damaged: list[tuple[Path, DamagedFile]] = []
    for cand in cands:
        try:
            return _read(cand), damaged
        except (DamagedFile, FileNotFoundError) as err:
            damaged.append((cand, _as_damage(err, cand)))
    return None, damaged


def _first_good(found: Path, rank: int) -> _Read:
    """The newest checkpoint from ``found`` on whose files all check; the damaged ones before it
    are named in one line (rank 0 moves them aside). DamagedFile when none is good."""
    cands = _candidates(_base_dir(found))
    # ``found`` may be gone already: under DDP rank 0 sets a damaged one aside while others look
    read, damaged = _read_newest(cands[cands.index(found):] if found in cands else [found, *cands])
    if read is None:
        raise damaged[0][1].with_fix(f"no earlier checkpoint is readable; {start_over(found.parent)}")
    if damaged and rank == 0:
        first = damaged[0][1]
        warn(f"{first.path} is damaged ({first.problem}); resuming from the checkpoint before it "
             f"({read.path.name}, step {read.payload['loop'].get('step')})")
        for cand, _ in damaged:
            _set_aside(cand)
    return read


def checkpoint_damage(ckpt_dir: Path) -> DamagedFile | None:
    """Why the run with ``ckpt_dir`` cannot resume: every checkpoint it has is damaged (the
    newest one's damage). None when one of them reads, or there is none."""
    cands = _candidates(Path(ckpt_dir))
    read, damaged = _read_newest(cands)
    return damaged[0][1] if cands and read is None else None


def rng_key(rank: int, kind: str = "torch") -> str:
    """Checkpoint name of the RNG state of DDP rank ``rank`` (> 0; rank 0 is ``__torch_rng__``)."""
    return f"__{kind}_rng_rank{rank}__"


def load_checkpoint(
    ckpt_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0,
    extras_out: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Restore model, optimiser and this process's RNG; return the loop state (``extras_out``, when
    given, receives the checkpoint's extra tensors). A checkpoint
    whose files are damaged gives way to the one before it (one line says so); DamagedFile
    when none is good. Under DDP, rank ``r > 0`` restores its own RNG state when the
    checkpoint holds one."""
    read = _first_good(Path(ckpt_dir), rank)
    try:
        model.load_state_dict(read.model)
        tensors = dict(read.optim)
        extras = {k: tensors.pop(k) for k in list(tensors) if k.startswith("__")}
        optimizer.load_state_dict(_optim_from_flat(tensors, read.payload["optim"]))
        if extras_out is not None:
            extras_out.update(extras)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:  # right checksums, wrong run
        raise DamagedFile(read.path, f"it does not fit this run: {first_line(err)}",
                          start_over(read.path.parent)) from None
    cpu_rng, cuda_rng = extras.get("__torch_rng__"), extras.get("__cuda_rng__")
    if rank > 0:
        cpu_rng, cuda_rng = extras.get(rng_key(rank)), extras.get(rng_key(rank, "cuda"))
    if cpu_rng is not None:
        torch.set_rng_state(cpu_rng)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    return read.payload["loop"]
