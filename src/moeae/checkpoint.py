"""Checkpoints that execute nothing when loaded, written atomically.

A checkpoint is one safetensors file: tensors for the model (weights and input scaling), the
optimizer state and the random-number generators, and a JSON header (``__metadata__``) with the
configs and the training position. safetensors parses a length-prefixed JSON header and raw
buffers, so a planted pickle is simply an invalid file: nothing in it runs.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .atomic import _new_file_mode, atomic_write_bytes  # noqa: F401  (moved; old imports work)

__all__ = ["CheckpointError", "atomic_write_bytes", "save_checkpoint", "load_checkpoint",
           "save_npz", "load_npz", "write_json", "member_state"]

FORMAT = "moeae-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint or run file is missing, truncated, corrupt or of another format."""


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode())


def save_checkpoint(path, *, model: dict[str, torch.Tensor], optimizer: dict | None = None,
                    rng: dict[str, torch.Tensor] | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None,
                    meta: dict | None = None) -> None:
    """Save tensors under prefixes ``model.``, ``optim.``, ``rng.``, ``extra.`` and ``meta``
    (JSON-serialisable) in the header."""
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.items():
        tensors[f"model.{k}"] = v
    header: dict[str, Any] = {"format": FORMAT, "meta": meta or {}}
    if optimizer is not None:
        # Adam's state: per parameter index, tensors (step, exp_avg, exp_avg_sq).
        for idx, st in optimizer["state"].items():
            for key, val in st.items():
                tensors[f"optim.{idx}.{key}"] = torch.as_tensor(val)
        header["param_groups"] = optimizer["param_groups"]
    for k, v in (rng or {}).items():
        tensors[f"rng.{k}"] = v
    for k, v in (extra_tensors or {}).items():
        tensors[f"extra.{k}"] = v
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    data = st_save(tensors, metadata={"moeae": json.dumps(header)})
    atomic_write_bytes(path, data)


def load_checkpoint(path) -> dict[str, Any]:
    """Inverse of :func:`save_checkpoint`: a dict with ``model``, ``optimizer`` (or None),
    ``rng``, ``extra`` and ``meta``. Raises :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        info = json.loads(header["__metadata__"]["moeae"])
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            fmt = info.get("format") if isinstance(info, dict) else None
            raise CheckpointError(f"checkpoint {path} has unknown format {fmt!r}")
        out: dict[str, Any] = {"model": {}, "rng": {}, "extra": {}, "meta": info["meta"],
                               "optimizer": None}
        ostate: dict[int, dict] = {}
        for name, t in tensors.items():
            prefix, _, rest = name.partition(".")
            if prefix == "optim":
                idx, _, key = rest.partition(".")
                ostate.setdefault(int(idx), {})[key] = t
            elif prefix in ("model", "rng", "extra"):
                out[prefix][rest] = t
        if "param_groups" in info:
            out["optimizer"] = {"state": ostate, "param_groups": info["param_groups"]}
    except CheckpointError:
        raise
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError,
            UnicodeDecodeError) as exc:  # a crafted header, not only a damaged file
        raise CheckpointError(f"checkpoint {path} is corrupt, truncated or not a moeae "
                              f"checkpoint ({type(exc).__name__}: {exc})") from None
    return out


def save_npz(path, arrays: dict[str, np.ndarray]) -> None:
    """Atomic ``np.savez_compressed`` (plain arrays only, loadable without pickle)."""
    import io

    buf = io.BytesIO()
    plain: dict[str, Any] = {k: np.asarray(v) for k, v in arrays.items()}
    np.savez_compressed(buf, **plain)
    atomic_write_bytes(path, buf.getvalue())


def load_npz(path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def member_state(trainer, m: int) -> dict:
    """Model ``m`` of a trainer's population alone, in the layout of
    :meth:`moeae.training.Trainer.state_dict`: its weights, its slice of the Adam state, its
    shuffling and dropout streams, its routing targets and its loss history, so a
    :class:`~moeae.training.Trainer` of that one model continues it."""
    model = trainer.model
    one = model.select(m)
    E = model.counts[m]
    g0 = sum(model.counts[:m])
    names = [name for name, _ in model.named_parameters()]
    shapes = {name: p.shape for name, p in one.named_parameters()}
    osd = trainer.optimizer.state_dict()
    state = {}
    for i, name in enumerate(names):  # FusedAdam keeps model.parameters()' order
        def part(t, name=name):
            if name.startswith("router."):  # one group per model, outputs padded to max E
                return t[m:m + 1][..., :shapes[name][-1]].clone()
            return t[g0:g0 + E].clone()  # encoder, decoder: one group per expert
        st = osd["state"][i]
        state[i] = {"step": st["step"].clone(), "exp_avg": part(st["exp_avg"]),
                    "exp_avg_sq": part(st["exp_avg_sq"])}
    full = trainer.state_dict()
    extra = {}
    for key, t in full["extra"].items():
        t = t[m:m + 1]
        extra[key] = t[:, :, :E].clone() if key in ("labels", "coords") else t.clone()
    st = full["state"]
    return {"model": one.state_dict(),
            "optimizer": {"state": state, "param_groups": osd["param_groups"]},
            "rng": {"shuffle.0": full["rng"][f"shuffle.{m}"],
                    "dropout.0": full["rng"][f"dropout.{m}"]},
            "extra": extra,
            "state": {"epoch": st["epoch"], "step": st["step"],
                      "history": [[h[m]] for h in st["history"]], "seeds": [st["seeds"][m]]}}
