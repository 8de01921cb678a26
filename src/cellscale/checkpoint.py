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
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cellscale.errors import RunError

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optim.safetensors"
STATE_FILE = "state.json"


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
) -> None:
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ckpt_dir.name}.", dir=ckpt_dir.parent))
    try:
        save_weights(model, tmp / MODEL_FILE)
        tensors, meta = _optim_to_flat(optimizer)
        tensors["__torch_rng__"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["__cuda_rng__"] = torch.cuda.get_rng_state()
        save_file(tensors, str(tmp / OPTIM_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({"loop": loop_state, "optim": meta}))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = ckpt_dir.with_name(ckpt_dir.name + ".old")
        if ckpt_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(ckpt_dir, old)
        os.replace(tmp, ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def find_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint: the directory itself, or the ``.old`` one left by a kill
    between the two renames."""
    for cand in (Path(ckpt_dir), Path(ckpt_dir).with_name(Path(ckpt_dir).name + ".old")):
        if all((cand / f).is_file() for f in (MODEL_FILE, OPTIM_FILE, STATE_FILE)):
            return cand
    return None


def load_checkpoint(
    ckpt_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    try:
        payload = json.loads((ckpt_dir / STATE_FILE).read_text())
        load_weights(model, ckpt_dir / MODEL_FILE)
        tensors = load_file(str(ckpt_dir / OPTIM_FILE), device="cpu")
    except (OSError, ValueError, RuntimeError) as err:
        raise RunError(f"checkpoint {ckpt_dir} is unreadable ({err}); delete it to restart the run") from None
    torch.set_rng_state(tensors.pop("__torch_rng__"))
    cuda_rng = tensors.pop("__cuda_rng__", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    optimizer.load_state_dict(_optim_from_flat(tensors, payload["optim"]))
    return payload["loop"]
