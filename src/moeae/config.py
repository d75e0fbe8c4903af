"""Configuration as data: the model, the training loop, and the named recipes.

A run folder stores these dataclasses as JSON (``config.json``), so a result can be rerun from
its folder alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelConfig", "TrainConfig", "RECIPES", "recipe", "to_dict", "from_dict",
           "ISOMETRIC_WEIGHT", "isometric_overrides"]

ISOMETRIC_WEIGHT = 1.0  # weight of the isometry and folding terms when isometric is True


@dataclass
class ModelConfig:
    n_features: int = 2  # d: width of the data
    latent_dim: int = 1  # k: coordinates per chart
    n_experts: int = 4  # E: experts (charts) per model
    width: int = 100  # hidden units of every MLP (router, encoders, decoders)
    depth: int = 4  # hidden layers of every MLP
    activation: str = "relu"  # hidden activation: relu | silu | tanh | softplus
    dropout: float = 0.1  # dropout after each hidden layer
    output_dropout: bool = True  # seed quirk: dropout also on latents, outputs and router logits


@dataclass
class TrainConfig:
    epochs: int = 5  # passes over the training set
    batch_size: int = 32  # points per step
    lr: float = 1e-3  # Adam learning rate (peak, if a schedule is set)
    weight_decay: float = 0.0  # decoupled weight decay (AdamW) when > 0
    schedule: str = "constant"  # "constant" | "cosine" (per step, after warmup)
    warmup_epochs: float = 0.0  # linear warmup of the learning rate
    grad_clip: float | None = None  # clip the global gradient norm of each model to this
    router_loss_weight: float = 1.0  # seed's loss: MSE(batch-mean router logits, 0)
    routing: str = "soft"  # "soft": the seed's blend | "responsibility": see training.py
    tau_start: float = 1.0  # responsibility temperature at the start (relative to mean error)
    tau_end: float = 0.01  # ... and at the end, annealed geometrically
    expert_weight: str = "router"  # experts learn each point weighted by "router" or "target"
    balance_weight: float = 0.0  # Switch-style load-balancing loss weight
    chart_init: bool = False  # start charts from a geodesic atlas of the data (moeae.atlas)
    warm_start_epochs: int = 0  # epochs of training towards the initial charts
    init_overlap: float = 0.0  # soft initial charts near boundaries (0: hard)
    latent_init: float = 0.0  # > 0: warm start also pulls each chart's z towards the geodesic
    #                           coordinates of that chart's points, with this weight
    relabel_neighbors: int = 0  # > 0: per-epoch targets averaged over this many neighbours
    relabel_hard: bool = False  # per-epoch targets one-hot (the argmax of the average)
    standardize: bool = False  # centre inputs and divide by one overall scale
    input_noise: float = 0.0  # Gaussian noise on (standardized) training inputs
    isometry: float = 0.0  # weight of the isometry term: each decoder keeps lengths up to one
    #                        scale per chart (J^T J = s_e^2 I; moeae.geometry)
    fold_guard: float = 0.0  # weight of the folding guard: stretches within fold_band of s_e
    fold_band: float = 2.0  # c: singular values of each decoder Jacobian kept in [s/c, c s]
    chart_inverse: float = 0.0  # weight of E'(D(z)) D'(z) v = v: each encoder inverts its
    #                             decoder along the chart (codes of data at constant speed)
    isometry_points: int = 16  # per step, both terms at each expert's this many batch points
    #                            of most weight (its own points under hard targets)
    working_set: int = 2000  # points per epoch: larger data trains on a fresh random sample
    #                          of this many each epoch (moeae.working_set), so the budget is
    #                          epochs x ceil(working_set / batch_size) steps whatever n
    seed: int = 0  # initialisation, shuffling, dropout
    device: str = "auto"  # "auto" | "cpu" | "cuda"


def _seed_recipe() -> tuple[ModelConfig, TrainConfig]:
    return ModelConfig(), TrainConfig()


def _best_recipe() -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(width=100, depth=4, dropout=0.0, output_dropout=False)
    train = TrainConfig(
        epochs=100, batch_size=64, lr=3e-3, schedule="cosine", warmup_epochs=1,
        router_loss_weight=0.0, routing="responsibility", tau_start=0.1, tau_end=1e-3,
        chart_init=True, warm_start_epochs=20, init_overlap=0.3, latent_init=1.0,
        relabel_neighbors=10,
        relabel_hard=True, standardize=True,
    )
    return model, train


RECIPES = {"seed": _seed_recipe, "best": _best_recipe}


def recipe(name: str, **overrides: Any) -> tuple[ModelConfig, TrainConfig]:
    """The named recipe's configs, with fields overridden by keyword (model or train fields)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(RECIPES)}")
    model, train = RECIPES[name]()
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


def isometric_overrides(isometric) -> dict:
    """``isometric`` (None, a bool or a weight >= 0) as recipe overrides of the isometry and
    folding-guard weights; empty for None (the recipe's own)."""
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
    return {"isometry": w, "fold_guard": w}


def to_dict(model: ModelConfig, train: TrainConfig, **extra: Any) -> dict:
    return {"model": dataclasses.asdict(model), "train": dataclasses.asdict(train), **extra}


def from_dict(d: dict) -> tuple[ModelConfig, TrainConfig]:
    """Inverse of :func:`to_dict`; unknown keys are an error (a newer or corrupt config)."""
    try:
        return ModelConfig(**d["model"]), TrainConfig(**d["train"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"config is incomplete or has unknown fields: {exc}") from None

