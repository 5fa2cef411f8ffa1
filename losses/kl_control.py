"""KL-coefficient controllers for the KL-penalised RL reward (Ziegler et al. 2019, arXiv:1909.08593, section 2.2).

Plain Python (no tensors): the controller holds ``beta`` as a float; ``state_dict``/``load_state_dict`` let a
training loop checkpoint it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AdaptiveKLController", "FixedKLController"]


class FixedKLController:
    """Constant KL coefficient: ``beta_t = beta_0`` for all ``t``.

    Args:
        value: the coefficient ``beta``.
    """

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Do nothing (the coefficient is fixed).

        Args:
            current_kl: measured KL of the last batch (unused).
            n_steps: number of samples/steps in that batch (unused).
        """

    def state_dict(self) -> dict[str, Any]:
        """Return the controller state: ``{"value": beta}``."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by ``state_dict``.

        Args:
            state: the dict from ``state_dict``.
        """
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller that steers the measured KL towards a target.

    Formula (Ziegler et al. 2019, arXiv:1909.08593, section 2.2): ``e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)``,
    ``beta_{t+1} = beta_t (1 + K_beta e_t)`` with ``K_beta = n_steps / horizon``. Raises ``beta`` when the KL is above
    target and lowers it when below; one update changes ``beta`` by at most a factor ``1 +- 0.2 n_steps / horizon``.

    Args:
        init_kl_coef: initial ``beta``.
        target: target KL ``KL_target > 0`` (in the units of the measured KL, e.g. nats per sequence).
        horizon: ``horizon > 0``, number of steps over which the error is corrected.

    Raises:
        ValueError: if ``target`` or ``horizon`` is not positive.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Update ``beta`` from the KL measured on the last batch.

        Args:
            current_kl: measured KL ``KL_t`` (float or 0-dim tensor).
            n_steps: number of steps/samples the measurement covers.
        """
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)  # e_t
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """Return the controller state: ``{"value", "target", "horizon"}``."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by ``state_dict``.

        Args:
            state: the dict from ``state_dict``.
        """
        self.value = float(state["value"])
        self.target = float(state["target"])
        self.horizon = float(state["horizon"])
