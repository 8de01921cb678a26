"""Checkpoints as safetensors + JSON: nothing is unpickled when a run resumes.

A checkpoint directory holds the model weights, the optimiser state (tensors flattened into
one safetensors file, hyper-parameters in JSON), the torch RNG state and the loop state. It is
written into a temporary directory and renamed into place, so a kill at any moment leaves
either the previous checkpoint or the new one, never a mixture.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cellscale.errors import RunError

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optim.safetensors"
STATE_FILE = "state.json"
CRASH_ENV = "CELLSCALE_CRASHPOINT"


def crashpoint(name: str) -> None:
    """Fault injection for the kill tests: SIGKILL this process at the named point when
    ``CELLSCALE_CRASHPOINT=name``. Points: ``checkpoint-written`` (a complete temp checkpoint,
    before any rename), ``checkpoint-swap`` (the old checkpoint moved to ``.old``, the new one
    not yet in place), ``before-result`` (training and evaluation done, result.json not
    written)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    state = load_file(str(path), device="cpu")
    model.load_state_dict(state)


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


def save_checkpoint(
    ckpt_dir: Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loop_state: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint atomically. ``extra_tensors`` (names starting with ``__``) are stored
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
        save_file(tensors, str(tmp / OPTIM_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({"loop": loop_state, "optim": meta}))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        crashpoint("checkpoint-written")
        old = ckpt_dir.with_name(ckpt_dir.name + ".old")
        if ckpt_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(ckpt_dir, old)
        crashpoint("checkpoint-swap")
        os.replace(tmp, ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_stale(ckpt_dir: Path) -> None:
    """Remove temp dirs of checkpoint writes that a killed process never finished (never
    trusted: ``find_checkpoint`` does not look at them)."""
    ckpt_dir = Path(ckpt_dir)
    for tmp in ckpt_dir.parent.glob(f".{ckpt_dir.name}.*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def find_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint: the directory itself, or the ``.old`` one left by a kill
    between the two renames."""
    for cand in (Path(ckpt_dir), Path(ckpt_dir).with_name(Path(ckpt_dir).name + ".old")):
        if all((cand / f).is_file() for f in (MODEL_FILE, OPTIM_FILE, STATE_FILE)):
            return cand
    return None


def rng_key(rank: int, kind: str = "torch") -> str:
    """Checkpoint name of the RNG state of DDP rank ``rank`` (> 0; rank 0 is ``__torch_rng__``)."""
    return f"__{kind}_rng_rank{rank}__"


def load_checkpoint(
    ckpt_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0
) -> dict[str, Any]:
    """Restore model, optimiser and this process's RNG; return the loop state. Under DDP,
    rank ``r > 0`` restores its own RNG state when the checkpoint holds one."""
    try:
        payload = json.loads((ckpt_dir / STATE_FILE).read_text())
        load_weights(model, ckpt_dir / MODEL_FILE)
        tensors = load_file(str(ckpt_dir / OPTIM_FILE), device="cpu")
    except (OSError, ValueError, RuntimeError) as err:
        raise RunError(f"checkpoint {ckpt_dir} is unreadable ({err}); delete it to restart the run") from None
    extras = {k: tensors.pop(k) for k in list(tensors) if k.startswith("__")}
    cpu_rng, cuda_rng = extras.get("__torch_rng__"), extras.get("__cuda_rng__")
    if rank > 0:
        cpu_rng, cuda_rng = extras.get(rng_key(rank)), extras.get(rng_key(rank, "cuda"))
    if cpu_rng is not None:
        torch.set_rng_state(cpu_rng)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    optimizer.load_state_dict(_optim_from_flat(tensors, payload["optim"]))
    return payload["loop"]
