"""``MoEAutoencoder``: the scikit-learn estimator.

``transform`` gives atlas codes ``(chart, z)``; ``inverse_transform`` decodes them with the
chart they name (hard decoding), so ``inverse_transform(transform(X))`` is the honest
reconstruction of the representation.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import check_array
from sklearn.utils.validation import check_is_fitted, validate_data

from .atlas import MAX_CHARTS
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import (
    ModelConfig,
    TrainConfig,
    from_dict,
    isometric_overrides,
    recipe,
    to_dict,
    with_budget,
)
from .data import SCAN_ROWS, check_trainable
from .model import MoEAE
from .run import as_population, check_configs, decode, encode, switch_off_unused
from .tears import atlas_check, shortfall, untorn
from .training import Trainer, evaluate, resolve_device
from .working_set import release_pages

__all__ = ["MoEAutoencoder"]

SELECT_MAX = 10_000  # the best of n_init starts is judged on at most this many points
REFERENCE_MAX = 2000  # training codes kept for transition maps and sampling


class MoEAutoencoder(TransformerMixin, BaseEstimator):
    """Mixture-of-Experts autoencoder: an atlas of ``n_experts`` charts of ``latent_dim``.

    Parameters
    ----------
    n_experts : int or "auto", default=4
        Number of experts (charts). ``"auto"``: the fewest charts into which the data's
        neighbour graph cuts without strain (:func:`moeae.atlas.choose_charts`: every chart lies
        flat in ``latent_dim`` coordinates and holds no points close in space but far apart
        along the manifold); charts the router never picks after training are then switched
        off. Where a trained chart tears (neighbouring points whose reconstructions jump apart)
        or the charts underfit (hard FVU above 1e-4 for curves, 4e-4 for surfaces, with
        residuals that agree along the chart, :mod:`moeae.tears`; at the recipe's epochs
        only), the fit is repeated with
        one chart more, at most twice. Where the last fit still tears or underfits, a
        :class:`sklearn.exceptions.ConvergenceWarning` says so (``chart_choice_`` holds each
        fit's check).
    latent_dim : int, default=1
        Coordinates per chart; must be smaller than the number of features.
    recipe : {"best", "seed"}, default="best"
        Training recipe: ``"best"`` gives clean hard charts; ``"seed"`` is faithful to the
        original reference code (soft blending, dropout).
    epochs, batch_size, lr, width, depth, dropout : optional
        Override the recipe's value when not None.
    weight_decay, input_noise : float, optional
        Regularisation (AdamW decay; Gaussian noise on standardized training inputs).
    working_set : int, optional
        Points per epoch (default: the recipe's, 2000). Larger data trains each epoch on a
        fresh random sample of this many points, so the cost of a fit does not grow with the
        number of points; raise it for more of the data per epoch, at proportional cost.
    n_init : int or "auto", default="auto"
        Independent starts (seeds ``random_state``, +1, ...) trained together as one batched
        population; the one with the lowest hard reconstruction error on the training data is
        kept, as k-means keeps its best start. ``"auto"``: the recipe's (1: the starting atlas
        cuts charts away from self-crossings, so one start suffices; ``moeae train`` trains
        the same). Each start costs about one more fit of compute.
    isometric : bool or float, optional
        Charts that keep lengths. Curves (``latent_dim=1``): arc-length charts
        (:mod:`moeae.arclength`), each code the arc length in data units to the nearest point
        of the nearest chart's curve (smoothed along it); the ``best`` recipe codes curves so
        by default (None), and True or any weight > 0 asks for it under any recipe. False:
        the encoders' own codes (tanh, in [-1, 1]), which encode about six times faster than
        projection but reconstruct 2-7 times less closely.
        Surfaces: training terms (:mod:`moeae.geometry`) by which each decoder keeps lengths up
        to one scale per chart (``J^T J = s_e^2 I``), with a folding guard keeping its stretch
        within a band around that scale; True uses weight ``moeae.config.ISOMETRIC_WEIGHT``
        (1) for both terms, a float sets the weight; None and False: off (the ``best``
        recipe's surfaces train without them).
    device : {"auto", "cpu", "cuda"}, default="auto"
    random_state : int or None, default=None
        Seed of initialisation, shuffling and dropout. None draws one from numpy's global RNG.
    verbose : bool, default=False
        Show a progress bar while fitting.

    Attributes
    ----------
    model_ : MoEAE
        The trained network (a population of one).
    n_features_in_ : int
    model_config_, train_config_ : the dataclasses the model was trained with.
    codes_ : ndarray of shape (n_reference, 1 + latent_dim)
        Atlas codes of (up to 2000 of) the training points: where each chart's domain lies,
        for :meth:`transitions`, :meth:`orientable` and :meth:`sample`.
    history_ : list of float
        Mean training loss per epoch.
    n_charts_ : int
        Charts in use: those the router picks for some training point.
    chart_choice_ : list of dict
        With ``n_experts="auto"``: per chart count tried, its worst ``fold`` and ``flat``
        ratios (:func:`moeae.atlas.choose_charts`), then per fit its ``n_charts``, ``tear``
        ratio, ``fvu``, residual ``agreement`` and the ``reason`` it was refitted, or None
        (:func:`moeae.tears.atlas_check`; the last fit is the one kept); else empty.
    """

    def __init__(self, *, n_experts=4, latent_dim=1, recipe="best", epochs=None,
                 batch_size=None, lr=None, width=None, depth=None, dropout=None,
                 weight_decay=None, input_noise=None, working_set=None, n_init="auto",
                 isometric=None, device="auto",
                 random_state=None, verbose=False):
        self.n_experts = n_experts
        self.latent_dim = latent_dim
        self.recipe = recipe
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.width = width
        self.depth = depth
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.input_noise = input_noise
        self.working_set = working_set
        self.n_init = n_init
        self.isometric = isometric
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # -- fitting ----------------------------------------------------------------------------
    def _configs(self, n_features: int) -> tuple[ModelConfig, TrainConfig]:
        for name in ("n_experts", "latent_dim"):
            v = getattr(self, name)
            if name == "n_experts" and isinstance(v, str) and v == "auto":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must be an int" + (" or 'auto'" if name == "n_experts"
                                                          else "") + f", got {v!r}")
        if self.random_state is None:
            seed = int(np.random.randint(0, 2**31 - 1))
        elif isinstance(self.random_state, (int, np.integer)):
            seed = int(self.random_state)
        else:  # a RandomState instance, as scikit-learn allows
            seed = int(self.random_state.randint(0, 2**31 - 1))
        mc, tc = recipe(
            self.recipe, n_features=n_features,
            n_experts=1 if self.n_experts == "auto" else int(self.n_experts),
            latent_dim=int(self.latent_dim), epochs=self.epochs, batch_size=self.batch_size,
            lr=self.lr, width=self.width, depth=self.depth, dropout=self.dropout,
            weight_decay=self.weight_decay, input_noise=self.input_noise,
            working_set=self.working_set, device=self.device,
            seed=seed, **isometric_overrides(self.isometric, self.latent_dim))
        return mc, tc

    def fit(self, X, y=None):
        """Fit the atlas to X of shape (n_samples, n_features). ``y`` is ignored.

        X may also be the path of a ``.npy`` file or an ``np.memmap``: rows are then read from
        disk a working set at a time and the data never has to fit in memory. The training
        budget is ``epochs`` passes over a working set of at most ``working_set`` points
        (a fresh random sample each epoch for larger data), whatever the number of points.
        """
        X = self._input(X, reset=True)
        n, d = X.shape
        mc, tc = self._configs(d)
        tc = with_budget(mc, tc, n)
        check_configs(mc, tc, n, d)
        atlas_cache: dict = {}  # the neighbour graph, shared with the starting atlas
        self.chart_choice_ = []
        if isinstance(self.n_experts, str):
            from .atlas import auto_charts

            check_trainable(X, str(getattr(X, "filename", None) or "X"))  # before the choice
            mc.n_experts, self.chart_choice_ = auto_charts(X, mc.latent_dim, tc.seed,
                                                           tc.working_set, atlas_cache)
        if isinstance(self.n_init, str) and self.n_init == "auto":
            k = tc.n_init
        elif isinstance(self.n_init, bool) or not isinstance(self.n_init, (int, np.integer)) \
                or self.n_init < 1:
            raise ValueError(f"n_init must be an int >= 1 or 'auto', got {self.n_init!r}")
        else:
            k = tc.n_init = int(self.n_init)
        ref = np.arange(n) if n <= REFERENCE_MAX else np.sort(
            np.random.default_rng(tc.seed).choice(n, REFERENCE_MAX, replace=False))
        X_ref = np.asarray(X[ref], dtype=np.float64)
        if not isinstance(self.n_experts, str):
            self._fit_once(X, X_ref, mc, tc, k, atlas_cache, prune=False)
            return self

        def fit_with(c: int) -> tuple[None, dict]:
            self._fit_once(X, X_ref, dataclasses.replace(mc, n_experts=c),
                           dataclasses.replace(tc), k, atlas_cache, prune=True)
            return None, atlas_check(self.model_, X_ref)

        # a chart that tears or underfits in training: one chart more (moeae.tears)
        # underfitting counts at the recipe's budget, not where epochs were cut
        _, fits = untorn(fit_with, mc.n_experts, MAX_CHARTS, underfit=self.epochs is None)
        self.chart_choice_ = self.chart_choice_ + fits
        short = shortfall(fits, ": more epochs or a larger width may fit closer",
                          ": give n_experts")
        if short is not None:  # as scikit-learn's estimators say that they stopped short
            from sklearn.exceptions import ConvergenceWarning

            warnings.warn(short, ConvergenceWarning, stacklevel=2)
        return self

    def _fit_once(self, X, X_ref, mc: ModelConfig, tc: TrainConfig, k: int,
                  atlas_cache: dict, prune: bool) -> None:
        """Train ``k`` starts of ``mc.n_experts`` charts and keep the best (fitted
        attributes set); ``prune``: switch off the charts the router never picks."""
        # identical points, no variance in float32, fewer distinct points than charts
        check_trainable(X, str(getattr(X, "filename", None) or "X"), n_charts=mc.n_experts)
        # n_init starts (seeds seed, seed+1, ...) train as one population, as KMeans's n_init;
        # the one whose hard reconstruction of the training data is best is kept
        trainer = Trainer(MoEAE(mc, [mc.n_experts] * k), tc, [tc.seed + i for i in range(k)],
                          resolve_device(tc.device))
        data = trainer.data(X)  # one array, shared by the k starts
        trainer.atlas_cache = atlas_cache
        trainer.initialize(data)
        trainer.fit(data, tc.epochs, progress=bool(self.verbose))
        # judged on all points, or on a fixed sample of SELECT_MAX of them
        best = trainer.best_member(data, SELECT_MAX)
        # float64 inference: a point's code must not depend on the batch it is encoded in
        self.model_ = trainer.model.select(best).double().eval()
        self.random_state_ = tc.seed  # the drawn seed when random_state is None
        self.model_config_, self.train_config_ = mc, tc
        self.train_config_.seed = tc.seed + best  # the start that was kept
        self.history_ = [h[best] for h in trainer.state.history]
        if prune:
            switch_off_unused(self.model_, X)
        self.codes_ = encode(self.model_, X_ref)
        self.n_charts_ = int(self.model_.active[0].sum())

    def _input(self, X, reset: bool):
        """X checked: an array as scikit-learn validates it (float64), or a ``.npy`` path or
        ``np.memmap`` opened memory-mapped and checked in chunks (never loaded whole)."""
        if isinstance(X, (str, Path)) or isinstance(X, np.memmap):
            from .data import open_npy

            if isinstance(X, np.memmap):
                from .data import _check_layout, _check_values

                where = str(getattr(X, "filename", None) or "X")
                _check_layout(X, where, None, 2 if reset else 1)
                for i in range(0, len(X), SCAN_ROWS):
                    _check_values(np.asarray(X[i:i + SCAN_ROWS]), where, i, whole=X)
                    release_pages(X)
            else:
                X = open_npy(X, min_samples=2 if reset else 1)
            if reset:
                self.n_features_in_ = X.shape[1]
            elif X.shape[1] != self.n_features_in_:
                raise ValueError(f"X has {X.shape[1]} features, but {type(self).__name__} is "
                                 f"expecting {self.n_features_in_} features as input.")
            return X
        if reset:
            return validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        return validate_data(self, X, dtype=np.float64, reset=False)

    # -- using the atlas --------------------------------------------------------------------
    def transform(self, X):
        """Atlas codes: (n_samples, 1 + latent_dim); column 0 is the chart index.

        X: an array, or a ``.npy`` path / ``np.memmap`` (encoded in chunks)."""
        check_is_fitted(self)
        return encode(self.model_, self._input(X, reset=False))

    def inverse_transform(self, X):
        """Decode codes (n_samples, 1 + latent_dim) with the chart each names: (n, d)."""
        check_is_fitted(self)
        codes = check_array(X, dtype=np.float64)
        return decode(self.model_, codes)

    def predict(self, X):
        """Chart index of each point: (n_samples,) int."""
        return self.transform(X)[:, 0].astype(np.int64)

    def score(self, X, y=None):
        """Negative hard-decoding MSE (higher is better)."""
        X = validate_data(self, X, dtype=np.float64, reset=False)
        X_hat = decode(self.model_, encode(self.model_, X))
        return -float(((X - X_hat) ** 2).mean())

    def reconstruction_error(self, X, kind="hard"):
        """Fraction of variance unexplained by the ``"hard"`` or ``"soft"`` reconstruction."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        from .metrics import snapshot_metrics

        snap = {k: v[0] for k, v in
                evaluate(self.model_, as_population(X, torch.float64)).items()}
        return snapshot_metrics(snap, neighborhood=False)[f"fvu_{kind}"]

    # -- the atlas as a manifold --------------------------------------------------------------
    def transitions(self, tol=None):
        """Transition maps between overlapping charts (:mod:`moeae.transitions`), on the
        decoded training codes: a list of ``Transition`` (charts, points, sign of the
        Jacobian determinant, agreement of that sign, residual of the fitted map)."""
        check_is_fitted(self)
        from .transitions import transition_maps

        return transition_maps(self.model_, decode(self.model_, self.codes_), tol=tol)

    def orientable(self, tol=None):
        """True iff the charts can be oriented consistently: no cycle of the chart graph has
        an odd number of orientation-reversing transitions (their Jacobian signs)."""
        from .transitions import is_orientable

        return is_orientable(self.transitions(tol), self.model_.counts[0])

    def sample(self, n, random_state=None):
        """n points (n, n_features) on the learned manifold, uniform by its volume
        (:mod:`moeae.sampling`): charts by their volume, coordinates over each chart's
        domain (where its training codes lie), overlaps counted once (the router's chart)."""
        check_is_fitted(self)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        from .sampling import ChartDomains, sample

        rng = np.random.default_rng(random_state)
        codes = self.codes_
        if self.model_.arc:  # the decoders' own codes
            from .arclength import network_codes

            codes = network_codes(self.model_, codes)
        domains = ChartDomains(codes, self.model_.counts[0])
        return sample(self.model_, domains, int(n), rng)

    def __sklearn_is_fitted__(self):
        return hasattr(self, "model_")

    # -- persistence ------------------------------------------------------------------------
    def save(self, path) -> None:
        """Write the fitted model to one safetensors file (atomically)."""
        check_is_fitted(self)
        meta = {"params": self.get_params(), **to_dict(self.model_config_, self.train_config_),
                "history": self.history_, "chart_choice": self.chart_choice_}
        meta["params"]["random_state"] = self.random_state_
        weights = {k: (v.float() if v.is_floating_point() else v).cpu()
                   for k, v in self.model_.state_dict().items()}
        save_checkpoint(path, model=weights, meta=meta,
                        extra_tensors={"codes": torch.as_tensor(self.codes_)})

    @classmethod
    def load(cls, path) -> MoEAutoencoder:
        """Load a model written by :meth:`save`; executes no code from the file."""
        ck = load_checkpoint(path)
        try:
            mc, tc = from_dict(ck["meta"])
            est = cls(**ck["meta"]["params"])
            model = MoEAE(mc)
            model.load_state_dict(ck["model"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{Path(path)} is not a saved MoEAutoencoder ({exc})") from None
        est.model_ = model.double().eval()
        est.model_config_, est.train_config_ = mc, tc
        est.history_ = ck["meta"].get("history", [])
        if "codes" in ck["extra"]:
            est.codes_ = ck["extra"]["codes"].double().numpy()
        est.n_features_in_ = mc.n_features
        est.n_charts_ = int(model.active[0].sum())
        est.chart_choice_ = ck["meta"].get("chart_choice", [])
        est.random_state_ = est.random_state
        return est

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags

