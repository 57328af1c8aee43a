"""The aggregation maths of the drift-correcting strategies, on plain NumPy arrays.

Pure functions over ``{name: array}`` maps of the *trained* parameters (buffers and
frozen arrays are averaged elsewhere); every sum is taken in float64 and cast back to
the dtype of the global model ``x``. The Flower strategies that use them live in
:mod:`fedimg.serverapp.drift_strategies`.

* FedNova, Wang et al. 2020, "Tackling the Objective Inconsistency Problem in
  Heterogeneous Federated Optimization" (NeurIPS): each client's update is divided by
  its own count of (momentum-weighted) local steps ``||a_i||_1`` before averaging,
  and the average is scaled back by ``tau_eff = sum_i p_i ||a_i||_1``.
* SCAFFOLD, Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
  Federated Learning" (ICML), Algorithm 1 with option II for the client control.
* FedDyn, Acar et al. 2021, "Federated Learning Based on Dynamic Regularization"
  (ICLR), Algorithm 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Arrays = dict[str, np.ndarray]


def step_norm(steps: int, momentum: float = 0.0) -> float:
    """``||a_i||_1``: how many plain SGD steps ``steps`` heavy-ball steps amount to.

    With momentum rho (PyTorch's SGD: ``buf = rho * buf + g``, fresh each round) the
    k-th of ``tau`` gradients moves the weights ``(1 - rho^(tau-k+1)) / (1 - rho)``
    times the learning rate in total, so (FedNova, Wang et al. 2020, Sec. 4)
    ``||a||_1 = [tau - rho (1 - rho^tau) / (1 - rho)] / (1 - rho)``; ``tau`` at rho = 0.
    """
    if steps < 1:
        raise ValueError(f"a client reported {steps} local steps; it needs at least 1")
    if momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * (1 - rho ** steps) / (1 - rho)) / (1 - rho)


def _like(values: Mapping[str, np.ndarray], x: Mapping[str, np.ndarray]) -> Arrays:
    return {k: np.asarray(v).astype(np.asarray(x[k]).dtype) for k, v in values.items()}


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def fednova(x: Mapping[str, np.ndarray], ys: Sequence[Mapping[str, np.ndarray]], *,
            weights: Sequence[float], norms: Sequence[float], server_lr: float = 1.0
            ) -> Arrays:
    """FedNova's new global model: ``x - server_lr * tau_eff * sum_i p_i (x - y_i) / a_i``.

    ``weights``: the clients' example counts (``p_i = n_i / sum n``); ``norms``: their
    ``||a_i||_1`` (:func:`step_norm`). With equal step counts and no momentum this is
    FedAvg's weighted mean.
    """
    p = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    tau_eff = float(np.dot(p, norms))
    out = {}
    for key in x:
        d = sum(p_i * (_f64(x[key]) - _f64(y[key])) / a_i for p_i, y, a_i in zip(p, ys, norms))
        out[key] = _f64(x[key]) - server_lr * tau_eff * d
    return _like(out, x)


def scaffold_client_control(c_i: Mapping[str, np.ndarray], c: Mapping[str, np.ndarray],
                            x: Mapping[str, np.ndarray], y: Mapping[str, np.ndarray], *,
                            norm: float, lr: float) -> Arrays:
    """SCAFFOLD option II: ``c_i+ = c_i - c + (x - y_i) / (K * lr)``.

    ``norm`` is the client's ``K`` (with momentum: ``||a_i||_1``, so that
    ``(x - y_i) / (norm * lr)`` is still the mean corrected gradient of its steps).
    """
    out = {k: _f64(c_i[k]) - _f64(c[k]) + (_f64(x[k]) - _f64(y[k])) / (norm * lr) for k in x}
    return _like(out, x)


def scaffold_server(x: Mapping[str, np.ndarray], ys: Sequence[Mapping[str, np.ndarray]],
                    c: Mapping[str, np.ndarray], delta_cs: Sequence[Mapping[str, np.ndarray]],
                    *, num_clients: int, server_lr: float = 1.0) -> tuple[Arrays, Arrays]:
    """SCAFFOLD's server step: ``x + lr_g * mean_S(y_i - x)`` and ``c + sum_S(dc_i) / N``.

    Clients count equally, as in the paper (not by examples); ``N`` is every client of
    the federation, so that ``c`` stays the mean of all the clients' controls.
    """
    s = len(ys)
    new_x = {k: _f64(x[k]) + server_lr * sum(_f64(y[k]) - _f64(x[k]) for y in ys) / s
             for k in x}
    new_c = {k: _f64(c[k]) + sum(_f64(dc[k]) for dc in delta_cs) / num_clients for k in c}
    return _like(new_x, x), _like(new_c, x)


def feddyn_client_gradient(g_k: Mapping[str, np.ndarray], x: Mapping[str, np.ndarray],
                           y: Mapping[str, np.ndarray], *, alpha: float) -> Arrays:
    """FedDyn's client state after a round: ``grad L_k(y_k) = g_k - alpha (y_k - x)``."""
    out = {k: _f64(g_k[k]) - alpha * (_f64(y[k]) - _f64(x[k])) for k in x}
    return _like(out, x)


def feddyn_server(x: Mapping[str, np.ndarray], ys: Sequence[Mapping[str, np.ndarray]],
                  h: Mapping[str, np.ndarray], *, alpha: float, num_clients: int
                  ) -> tuple[Arrays, Arrays]:
    """FedDyn's server step: ``h+ = h - alpha/m sum_P (y_k - x)``; ``x+ = mean_P y_k - h+/alpha``.

    ``m`` is every client of the federation, ``P`` the clients of this round (equal
    weights, as in the paper).
    """
    new_h = {k: _f64(h[k]) - alpha / num_clients * sum(_f64(y[k]) - _f64(x[k]) for y in ys)
             for k in x}
    new_x = {k: sum(_f64(y[k]) for y in ys) / len(ys) - new_h[k] / alpha for k in x}
    return _like(new_x, x), _like(new_h, x)


def zeros_like(x: Mapping[str, np.ndarray]) -> Arrays:
    """A control (or FedDyn state) of zeros for every array of ``x``."""
    return {k: np.zeros_like(np.asarray(v)) for k, v in x.items()}
