"""The Keras 3 ``GuidedDropout`` layer and its schedule callback (private; use adapters.keras)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gd_core.errors import ArgumentError, ArgumentTypeError
from gd_core.schedules import Schedule
from gd_core.validate import PROBABILITY, Shown, check_fraction, check_probability, check_rates

from .._lazy import require

keras = require("keras")
ops = keras.ops


def _invalid(argument: str, expected: str, received: str, fix: str) -> ArgumentError:
    """Keras' wording ("Invalid value received for argument ...") plus this library's fix."""
    return ArgumentError(
        f"Invalid value received for argument `{argument}`. Expected {expected}. "
        f"Received: {received}. Fix: {fix}"
    )


def _keras_wording(name: str, expected: str, value: Any) -> str:
    """``keras.layers.Dropout``'s message for a bad rate, for :mod:`gd_core.validate`."""
    if isinstance(value, Shown):
        shown = str(value)
    elif isinstance(value, bool) or not isinstance(value, (int, float, np.number, list, tuple)):
        shown = f"{name}={value!r} (type {type(value).__name__})"
    else:
        shown = f"{name}={value!r}"
    if expected == PROBABILITY:
        expected = "a float value between 0 and 1, in [0, 1) (1 would drop every unit)"
    return f"Invalid value received for argument `{name}`. Expected {expected}. Received: {shown}"


def _check_probability(name: str, value: Any) -> float:
    return check_probability(
        value, name, f"pass the fraction of units to drop, e.g. {name}=0.1", wording=_keras_wording
    )


def _check_rates(rates: Any) -> tuple[float, ...]:
    arr = check_rates(
        rates,
        "rates",
        "pass e.g. rates=[0.0, 0.05, 0.1], one per feature of the last axis",
        wording=_keras_wording,
    )
    return tuple(float(r) for r in arr)


def _check_noise_shape(noise_shape: Any) -> tuple[int | None, ...] | None:
    if noise_shape is None:
        return None
    if isinstance(noise_shape, str):
        raise _invalid(
            "noise_shape",
            "a tuple or list of integers (or None)",
            f"noise_shape={noise_shape!r}",
            "pass e.g. noise_shape=(None, 1, None)",
        )
    try:
        dims = tuple(noise_shape)
    except TypeError:
        raise _invalid(
            "noise_shape",
            "an iterable of integers (e.g. a tuple or list)",
            f"noise_shape={noise_shape!r}",
            "pass e.g. noise_shape=(None, 1, None)",
        ) from None
    out: list[int | None] = []
    for i, dim in enumerate(dims):
        if dim is None:
            out.append(None)
            continue
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise _invalid(
                "noise_shape",
                "all elements to be integers or None",
                f"element at index {i}: {dim!r} (type: {type(dim).__name__})",
                "use None for an axis whose size is taken from the inputs",
            )
        if dim <= 0:
            raise _invalid(
                "noise_shape",
                "all dimensions to be positive integers or None",
                f"non-positive value at index {i}: {dim}",
                "use 1 to share the mask along an axis, or None",
            )
        out.append(int(dim))
    return tuple(out)


def _read(variable: Any) -> Any:
    """A variable's value as numpy, without NumPy 2 copy warnings on either backend."""
    value = variable.value
    if keras.backend.backend() == "tensorflow":
        return value.numpy()
    return ops.convert_to_numpy(value)


def _schedule_of(schedule: Any) -> Schedule | None:
    if schedule is None:
        return None
    return Schedule.from_config(schedule)


@keras.saving.register_keras_serializable(package="guided_dropout")
class GuidedDropout(keras.layers.Layer):
    """Inverted dropout with a per-site (or per-unit) probability: a drop-in ``Dropout``.

    Args:
        rate: fraction of the input units to drop, a float in ``[0, 1)``. With ``rates`` it may
            be omitted (it is then ``mean(rates)``); if both are given it must equal that mean.
        noise_shape: shape of the binary mask multiplied with the inputs (``None`` entries take the
            input's size), as in ``keras.layers.Dropout``.
        seed: Python int seeding the layer's ``keras.random.SeedGenerator`` (deterministic masks).
        rates: optional per-unit probabilities along the last axis (one per feature).
        site: canonical site name (defaults to the layer's ``name``).
        schedule: optional :class:`gd_core.Schedule` (or its config dict). The layer holds a
            non-trainable ``step`` counter and a ``multiplier`` variable; the effective
            probabilities are ``rates * multiplier``. Call :meth:`step` once per optimiser step
            (the :class:`GuidedDropoutScheduler` callback does this in ``model.fit``), or set the
            multiplier directly with :meth:`set_multiplier`. Without a schedule the multiplier is 1.

    Identity when ``training`` is false; masks pass through (``supports_masking``).

    Example:
        >>> import numpy as np
        >>> layer = GuidedDropout(rates=[0.0, 0.5], seed=1)
        >>> layer.rate
        0.25
        >>> out = np.asarray(layer(np.ones((4, 2), "float32"), training=True))
        >>> bool(np.all(out[:, 0] == 1.0)), set(np.unique(out[:, 1])) <= {0.0, 2.0}
        (True, True)
    """

    def __init__(
        self,
        rate: float | None = None,
        noise_shape: Sequence[int | None] | None = None,
        seed: int | None = None,
        rates: Sequence[float] | None = None,
        site: str | None = None,
        schedule: Schedule | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if rates is not None:
            rates_t: tuple[float, ...] | None = _check_rates(rates)
            mean = float(np.mean(rates_t))
            if rate is None:
                rate = mean
            else:
                rate = _check_probability("rate", rate)
                if not math.isclose(rate, mean, rel_tol=1e-6, abs_tol=1e-9):
                    raise _invalid(
                        "rate",
                        f"the mean of `rates` ({mean:.6g}) when both are given",
                        f"rate={rate}",
                        "omit `rate` (it is derived from `rates`) or pass rate=mean(rates)",
                    )
        else:
            rates_t = None
            if rate is None:  # keras.layers.Dropout requires `rate`; here `rates` may stand in
                raise ArgumentTypeError(
                    "Invalid value received for argument `rate`. Expected a float value in "
                    "[0, 1) (or per-unit `rates`). Received: rate=None. Fix: pass e.g. "
                    "GuidedDropout(0.1) or GuidedDropout(rates=[...])"
                )
        self._rate = _check_probability("rate", rate)
        self._rates = rates_t
        self.seed = seed
        self.noise_shape = _check_noise_shape(noise_shape)
        if rates_t is not None and self.noise_shape is not None and len(self.noise_shape) > 0:
            last = self.noise_shape[-1]
            if last is not None and last != len(rates_t):
                raise _invalid(
                    "noise_shape",
                    f"a last dimension of None or {len(rates_t)} (one mask entry per unit rate)",
                    f"noise_shape={self.noise_shape}",
                    "use None as the last entry of noise_shape",
                )
        if site is not None and (not isinstance(site, str) or not site):
            raise _invalid("site", "a non-empty string", f"site={site!r}", "omit it or name it")
        self._site = site
        self.schedule = _schedule_of(schedule)
        self.supports_masking = True
        self.seed_generator = keras.random.SeedGenerator(seed)
        # only a scheduled layer has state: without a schedule it creates no variables, so a
        # model with GuidedDropout in place of Dropout has exactly the original's weights
        # (``set_weights``, ``.weights.h5`` and ``.keras`` files of either load into the other)
        self._steps = 0
        self.step_count: Any = None
        self.multiplier: Any = None
        if self.schedule is not None:
            self.step_count = self.add_weight(
                shape=(), dtype="int64", initializer="zeros", trainable=False, name="step"
            )
            self.multiplier = self.add_weight(
                shape=(),
                dtype="float32",
                initializer=keras.initializers.Constant(self.schedule.multiplier(0)),
                trainable=False,
                name="multiplier",
            )
        self._build_at_init()

    # -- read-only configuration --------------------------------------------------------------
    @property
    def rate(self) -> float:
        """The configured site probability (``mean(rates)`` with per-unit rates)."""
        return self._rate

    @property
    def rates(self) -> tuple[float, ...] | None:
        """Per-unit probabilities along the last axis, or ``None`` for one probability."""
        return self._rates

    @property
    def site(self) -> str:
        """The canonical site name (the layer's name unless given)."""
        return self._site or self.name

    @property
    def current_step(self) -> int:
        """How many times :meth:`step` has been called (saved with the model)."""
        return self._steps if self.step_count is None else int(_read(self.step_count))

    # -- schedule -----------------------------------------------------------------------------
    def set_multiplier(self, multiplier: float) -> None:
        """Scale every probability of this (scheduled) layer by ``multiplier`` in ``[0, 1]``.

        Only a layer with a schedule holds a multiplier (a variable saved with the model); a
        layer without one always uses its probabilities as configured.

        Example:
            >>> layer = GuidedDropout(0.1, schedule={"kind": "constant", "steps": 0})
            >>> layer.set_multiplier(0.5)
            >>> float(layer.multiplier.numpy())
            0.5
        """
        value = check_fraction(multiplier, "multiplier", "pass e.g. 0.5")
        if self.multiplier is None:
            raise _invalid(
                "multiplier",
                "a GuidedDropout with a schedule (only those hold a multiplier variable)",
                f"layer {self.name!r} without one",
                "create it with schedule={'kind': 'constant', 'steps': 0} to scale it by hand",
            )
        self.multiplier.assign(value)

    def step(self, n: int = 1) -> float:
        """Advance the step counter by ``n`` and set the multiplier from the schedule.

        Without a schedule only the counter moves. Returns the multiplier now in effect. Call it
        eagerly (between training steps), not inside a compiled function.

        Example:
            >>> layer = GuidedDropout(0.1, schedule={"kind": "early", "steps": 2})
            >>> [layer.step() for _ in range(3)]
            [1.0, 0.0, 0.0]
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise _invalid("n", "an int >= 0", f"n={n!r}", "pass the number of optimiser steps")
        new = self.current_step + int(n)
        if self.schedule is None or self.step_count is None:
            self._steps = new
            return 1.0
        self.step_count.assign(new)
        self.multiplier.assign(self.schedule.multiplier(new))
        return float(_read(self.multiplier))

    # -- computation --------------------------------------------------------------------------
    def _check_units(self, input_shape: Sequence[int | None]) -> None:
        if self._rates is None:
            return
        units = input_shape[-1] if len(input_shape) else None
        if units is not None and int(units) != len(self._rates):
            raise _invalid(
                "rates",
                f"one probability per feature of the inputs' last axis ({int(units)})",
                f"{len(self._rates)} rates",
                f"pass {int(units)} rates, or rate=... for one probability for every unit",
            )

    def _mask_shape(self, inputs: Any) -> list[Any]:
        shape = ops.shape(inputs)
        if self.noise_shape is None:
            return list(shape)
        if len(self.noise_shape) != len(shape):
            raise _invalid(
                "noise_shape",
                f"{len(shape)} entries (the rank of the inputs)",
                f"noise_shape={self.noise_shape}",
                "give one entry per input axis",
            )
        return [shape[i] if d is None else d for i, d in enumerate(self.noise_shape)]

    def call(self, inputs: Any, training: bool | None = False) -> Any:
        if not training or (self._rates is None and self._rate == 0.0):
            return inputs
        if self._rates is not None and max(self._rates) == 0.0:
            return inputs
        self._check_units(tuple(inputs.shape))
        mult = 1.0 if self.multiplier is None else ops.cast(self.multiplier, "float32")
        if self._rates is not None:
            p = ops.convert_to_tensor(np.asarray(self._rates, np.float32)) * mult
        else:
            p = ops.cast(self._rate, "float32") * mult
        u = keras.random.uniform(self._mask_shape(inputs), seed=self.seed_generator)
        keep = ops.greater_equal(u, p)
        scale = ops.where(keep, 1.0 / (1.0 - p), ops.zeros_like(u))
        return inputs * ops.cast(scale, inputs.dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        self._check_units(tuple(input_shape))
        return input_shape

    # -- serialisation ------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "rate": self._rate,
                "seed": self.seed,
                "noise_shape": self.noise_shape,
                "rates": None if self._rates is None else list(self._rates),
                "site": self._site,
                "schedule": None if self.schedule is None else self.schedule.get_config(),
            }
        )
        return config

    def __repr__(self) -> str:
        per_unit = "" if self._rates is None else f", units={len(self._rates)}"
        return (
            f"<GuidedDropout name={self.name!r} site={self.site!r} rate={self._rate:g}{per_unit}>"
        )


class GuidedDropoutScheduler(keras.callbacks.Callback):
    """Calls :meth:`GuidedDropout.step` on every ``GuidedDropout`` layer after each train batch.

    Example:
        >>> cb = GuidedDropoutScheduler()
        >>> isinstance(cb, keras.callbacks.Callback)
        True
    """

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        for layer in _all_layers(self.model):
            if isinstance(layer, GuidedDropout) and layer.schedule is not None:
                layer.step()


def _all_layers(root: Any) -> list[Any]:
    """Every layer under ``root`` (itself included), depth first, each once."""
    out: list[Any] = []
    seen: set[int] = set()

    def visit(layer: Any) -> None:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        out.append(layer)
        for child in _children(layer):
            visit(child)

    visit(root)
    return out


#: the attribute under which a layer holds a site inserted on its output (not tracked by
#: Keras; see :mod:`adapters.keras.inserted`)
HOOK = "gd_dropout"


def _children(layer: Any) -> list[Any]:
    """Direct sublayers of ``layer`` in their natural order (graph order for models), and last
    the site inserted on its output, if any."""
    if isinstance(layer, keras.Model):
        try:
            kids = list(layer.layers)
        except Exception:  # noqa: BLE001 - some subclassed models raise before being built
            kids = []
        extra = [c for c in getattr(layer, "_layers", []) if all(c is not k for k in kids)]
        kids = [k for k in kids + extra if isinstance(k, keras.layers.Layer)]
    else:
        kids = [c for c in getattr(layer, "_layers", []) if isinstance(c, keras.layers.Layer)]
    hook = vars(layer).get(HOOK) if hasattr(layer, "__dict__") else None
    if isinstance(hook, keras.layers.Layer) and all(hook is not k for k in kids):
        kids.append(hook)
    return kids
