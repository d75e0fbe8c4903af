"""Configuration as data: the model, the training loop, the named recipes, and settings files.

A run folder stores these dataclasses as JSON (``config.json``), so a result can be rerun from
its folder alone. ``moeae train --config FILE.toml`` reads the same fields from a TOML file
(:func:`read_config_file`), and the command line overrides it (:func:`merge_settings`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ModelConfig", "TrainConfig", "RECIPES", "recipe", "to_dict", "from_dict",
           "ConfigError", "RUN_KEYS", "read_config_file", "merge_settings",
           "ISOMETRIC_WEIGHT", "isometric_overrides", "with_budget"]

ISOMETRIC_WEIGHT = 1.0  #: weight of the isometry and folding terms when isometric is True


@dataclass
class ModelConfig:
    """The network: sizes of the router and of every expert's encoder and decoder."""

    n_features: int = 2  #: d: width of the data
    latent_dim: int = 1  #: k: coordinates per chart
    n_experts: int = 4  #: E: experts (charts) per model
    width: int = 100  #: hidden units of every MLP (router, encoders, decoders)
    depth: int = 4  #: hidden layers of every MLP
    activation: str = "relu"  #: hidden activation: relu | silu | tanh | softplus
    chart_activation: str | None = None  #: the experts' hidden activation (None: activation;
    #:                                      "auto": relu for curves, silu for surfaces)
    dropout: float = 0.1  #: dropout after each hidden layer
    output_dropout: bool = True  #: seed quirk: dropout also on latents, outputs and router logits


@dataclass
class TrainConfig:
    """The training loop: optimiser, schedule, routing and the chart start."""

    epochs: int = 5  #: passes over the training set
    min_steps: int = 0  #: at least ``min_steps x latent_dim^2`` steps: data smaller than the
    #:                     working set trains more epochs (0: off; a given ``epochs`` turns it
    #:                     off)
    batch_size: int = 32  #: points per step
    lr: float = 1e-3  #: Adam learning rate (peak, if a schedule is set)
    weight_decay: float = 0.0  #: decoupled weight decay (AdamW) when > 0
    schedule: str = "constant"  #: "constant" | "cosine" (per step, after warmup)
    warmup_epochs: float = 0.0  #: linear warmup of the learning rate
    grad_clip: float | None = None  #: clip the global gradient norm of each model to this
    router_loss_weight: float = 1.0  #: seed's loss: MSE(batch-mean router logits, 0)
    routing: str = "soft"  #: "soft": the seed's blend | "responsibility": see training.py
    tau_start: float = 1.0  #: responsibility temperature at the start (relative to mean error)
    tau_end: float = 0.01  #: ... and at the end, annealed geometrically
    expert_weight: str = "router"  #: experts learn each point weighted by "router" or "target"
    balance_weight: float = 0.0  #: Switch-style load-balancing loss weight
    chart_init: bool = False  #: start charts from a geodesic atlas of the data (moeae.atlas)
    warm_start_epochs: int = 0  #: epochs of training towards the initial charts
    init_overlap: float = 0.0  #: soft initial charts near boundaries (0: hard)
    latent_init: float = 0.0  #: warm-start pull of each chart's z towards geodesic coordinates
    place_units: bool = False  #: curves, with latent_init: each decoder's first-layer units
    #:                            start with their kinks at quantiles of its chart's starting
    #:                            codes (MoEAE.place_units)
    hold_units: bool = False  #: with place_units: those placed units are not trained, so
    #:                           their kinks stay among the codes (Adam's steps move them off;
    #:                           20 seeds, figure-8 and spiral hard FVU 0.73x and 0.71x)
    relabel_neighbors: int = 0  #: > 0: per-epoch targets averaged over this many neighbours
    relabel_hard: bool = False  #: per-epoch targets one-hot (the argmax of the average)
    expert_overlap: int = 0  #: > 0: each expert also learns the points near its chart: weight
    #:                          the share of a point's this many neighbours that are its
    learn_routed: bool = False  #: with expert_overlap: near self-crossings each expert also
    #:                             learns the points its router sends it (once per epoch), so
    #:                             a point routed to the other branch's chart is reconstructed
    fallback_gate: float = 0.0  #: > 0: after training, a point whose router-chosen chart
    #:                              reconstructs it worse than this many times the 99th
    #:                              percentile of the training points' error goes to an
    #:                              expert that does 10x better (MoEAE.charts); 0: off
    standardize: bool = False  #: centre inputs and divide by one overall scale
    input_noise: float = 0.0  #: Gaussian noise on (standardized) training inputs
    isometry: float = 0.0  #: weight of the isometry term: decoders keep lengths up to one scale
    #:                        per chart (J^T J = s_e^2 I; moeae.geometry)
    fold_guard: float = 0.0  #: weight of the folding guard: stretches within fold_band of s_e
    fold_band: float = 2.0  #: c: singular values of each decoder Jacobian kept in [s/c, c s]
    chart_inverse: float = 0.0  #: weight of E'(D(z)) D'(z) v = v (encoders invert decoders)
    isometry_points: int = 16  #: per step, the terms at each expert's this many batch points
    #:                          of most weight (its own points under hard targets)
    refit_outputs: bool = False  #: after training, each decoder's output layer is solved in
    #:                               closed form on its chart's training points, where that
    #:                               explains enough of the error to not be noise
    #:                               (moeae.readout)
    arc_length: bool = False  #: curves: after training, codes are arc length along each
    #:                           chart, points coded by projection (moeae.arclength)
    working_set: int = 2000  #: points per epoch; larger data: a fresh random sample each epoch
    n_init: int = 1  #: independent starts (seeds seed, seed + 1, ...), trained as one
    #:                population; the one that reconstructs the training data best is kept
    seed: int = 0  #: initialisation, shuffling, dropout
    device: str = "auto"  #: "auto" | "cpu" | "cuda"


def _seed_recipe() -> tuple[ModelConfig, TrainConfig]:
    return ModelConfig(), TrainConfig()


def _best_recipe() -> tuple[ModelConfig, TrainConfig]:
    # ReLU charts for curves, SiLU for surfaces (chart_activation "auto", see moeae.model)
    model = ModelConfig(width=100, depth=4, dropout=0.0, output_dropout=False,
                        chart_activation="auto")
    train = TrainConfig(
        epochs=50, min_steps=400, batch_size=64, lr=3e-3, schedule="cosine", warmup_epochs=1,
        router_loss_weight=0.0, routing="responsibility", tau_start=0.1, tau_end=1e-3,
        chart_init=True, warm_start_epochs=20, init_overlap=0.3, latent_init=1.0, place_units=True,
        hold_units=True,
        relabel_neighbors=10, relabel_hard=True, expert_overlap=30, learn_routed=True,
        fallback_gate=10.0, standardize=True, refit_outputs=True, arc_length=True,
    )
    return model, train


RECIPES = {"seed": _seed_recipe, "best": _best_recipe}


def recipe(name: str, **overrides: Any) -> tuple[ModelConfig, TrainConfig]:
    """The named recipe's configs, with fields overridden by keyword (model or train fields)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    model, train = RECIPES[name]()
    if overrides.get("epochs") is not None:  # epochs as asked, not raised to min_steps
        train.min_steps = 0
    mfields = {f.name for f in dataclasses.fields(ModelConfig)}
    tfields = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in mfields:
            setattr(model, key, value)
        elif key in tfields:
            setattr(train, key, value)
        else:
            raise TypeError(f"unknown setting {key!r}")
    return model, train


def with_budget(model: ModelConfig, train: TrainConfig, n_samples: int) -> TrainConfig:
    """``train`` with ``epochs`` raised until a fit on ``n_samples`` points makes at least
    ``min_steps x latent_dim^2`` steps (each epoch: ``ceil(min(n, working_set) / batch_size)``).

    A chart of k coordinates needs a resolution in each of them. With solved output layers
    (:mod:`moeae.readout`), measured in session 13: a 1000-point curve's 50 epochs (800
    steps) reach hard FVU <= 1e-4 on 20 of 20 seeds of the circle, figure-8 and spiral; a
    surface's 1600 steps (``min_steps`` 400 of the ``best`` recipe) put the sphere's mean
    reconstruction distance at 1.3e-4 to 4.9e-4 of its radius (4 charts, 1000 or 2000 points).
    """
    if train.min_steps <= 0:
        return train
    per_epoch = math.ceil(min(n_samples, train.working_set) / train.batch_size)
    steps = train.min_steps * model.latent_dim**2
    need = math.ceil(steps / max(1, per_epoch))
    return dataclasses.replace(train, epochs=max(train.epochs, need))


def isometric_overrides(isometric, latent_dim: int) -> dict:
    """``isometric`` (None, a bool or a weight >= 0) as recipe overrides; empty for None (the
    recipe's own).

    Surfaces (``latent_dim`` >= 2): the isometry and folding-guard weights. Curves: arc-length
    charts (``arc_length``, :mod:`moeae.arclength`) for any weight > 0, exact after training,
    so the terms are off (they cost 1.3-2x the fit time and did not reach what the
    reparametrisation does, docs/recipes.md); the ``best`` recipe's curves have them already.
    False: the encoders' own codes (``arc_length`` off)."""
    if isometric is None:
        return {}
    if isinstance(isometric, bool) or type(isometric).__name__ == "bool_":
        w = ISOMETRIC_WEIGHT if isometric else 0.0
    elif isinstance(isometric, (int, float)) or hasattr(isometric, "__float__"):
        w = float(isometric)
        if not (w >= 0 and w < float("inf")):
            raise ValueError(f"isometric must be None, a bool or a finite weight >= 0, "
                             f"got {isometric!r}")
    else:
        raise ValueError(f"isometric must be None, a bool or a finite weight >= 0, "
                         f"got {isometric!r}")
    if latent_dim == 1:
        return {"isometry": 0.0, "fold_guard": 0.0, "arc_length": w > 0}
    return {"isometry": w, "fold_guard": w, "arc_length": False}


def to_dict(model: ModelConfig, train: TrainConfig, **extra: Any) -> dict:
    """The configs as plain dicts under ``"model"`` and ``"train"`` (what ``config.json``
    holds), with ``extra`` keys beside them."""
    return {"model": dataclasses.asdict(model), "train": dataclasses.asdict(train), **extra}


def from_dict(d: dict) -> tuple[ModelConfig, TrainConfig]:
    """Inverse of :func:`to_dict`; unknown keys are an error (a newer or corrupt config)."""
    try:
        return ModelConfig(**d["model"]), TrainConfig(**d["train"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"config is incomplete or has unknown fields: {exc}") from None



# -- settings files (``moeae train --config FILE.toml``) ------------------------------------------
#: The top-level keys of a settings file (the data and the run) and the type of each value.
RUN_KEYS: dict[str, type] = {
    "data": str,  # a dataset name or a .npy/.csv file
    "out": str,  # the run folder to create
    "recipe": str,  # "best" | "seed": the defaults the [model] and [train] tables override
    "seed": int,  # seeds the generated data and the training (as --seed)
    "n_samples": int,  # points to generate for a named dataset
    "noise": float,  # Gaussian noise sd for a named dataset
}
# Set elsewhere: the data's width, and the one top-level seed for data and training alike.
_NOT_SETTINGS = {"model.n_features": "it is the width of the data",
                 "train.seed": "set the top-level seed, which seeds the data and the training"}


class ConfigError(ValueError):
    """A settings file that cannot be read, with a message naming the file and the key."""


def _field_types(cls) -> dict[str, type]:
    """Field name -> the type a settings file must give (``float | None`` -> ``float``)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        out[f.name] = hint
    return out


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check_value(path: Path, key: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # `lr = 1` means 1.0
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{path}: {key} must be {_TYPE_NAMES[kind]}, got {value!r}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read and check a TOML settings file for ``moeae train --config``.

    The top level holds :data:`RUN_KEYS` (``data``, ``out``, ``recipe``, ``seed``,
    ``n_samples``, ``noise``); the tables ``[model]`` and ``[train]`` hold fields of
    :class:`ModelConfig` and :class:`TrainConfig`, which override the recipe's values.

    Parameters
    ----------
    path : str or Path
        The ``.toml`` file.

    Returns
    -------
    dict
        The top-level keys that the file sets, plus ``"model"`` and ``"train"``: dicts of the
        fields it sets (possibly empty).

    Raises
    ------
    ConfigError
        When the file is missing or not TOML, or a key is unknown or has a value of the wrong
        type; the message names the file and the key.
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - the same parser, before it joined the standard library
        import tomli as tomllib

    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    tables = {"model": _field_types(ModelConfig), "train": _field_types(TrainConfig)}
    settings: dict[str, Any] = {"model": {}, "train": {}}
    for key, value in raw.items():
        if key in tables:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {key} must be a table ([{key}]), got {value!r}")
            for name, v in value.items():
                full = f"{key}.{name}"
                if full in _NOT_SETTINGS:
                    raise ConfigError(f"{path}: {full} cannot be set: {_NOT_SETTINGS[full]}")
                if name not in tables[key]:
                    valid = [k for k in tables[key] if f"{key}.{k}" not in _NOT_SETTINGS]
                    raise ConfigError(f"{path}: unknown key {full!r}; valid keys in [{key}]: "
                                      f"{', '.join(valid)}")
                settings[key][name] = _check_value(path, full, v, tables[key][name])
        elif key in RUN_KEYS:
            settings[key] = _check_value(path, key, value, RUN_KEYS[key])
            if key == "recipe" and value not in RECIPES:
                raise ConfigError(f"{path}: unknown recipe {value!r}; valid recipes: "
                                  f"{', '.join(RECIPES)}")
        else:
            raise ConfigError(f"{path}: unknown key {key!r}; valid top-level keys: "
                              f"{', '.join(RUN_KEYS)}, and the tables [model] and [train]")
    return settings


def merge_settings(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` (from :func:`read_config_file`) with every value of ``overrides`` that is not
    None put over it, table by table: what the command line gives wins over the file."""
    merged = {**base, "model": dict(base.get("model", {})), "train": dict(base.get("train", {}))}
    for key, value in overrides.items():
        if key in ("model", "train"):
            merged[key].update({k: v for k, v in value.items() if v is not None})
        elif value is not None:
            merged[key] = value
    return merged
