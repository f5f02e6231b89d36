"""Optimizers with torch.optim's update rules, and gradient clipping.

When the parameters are exactly a model's (they share one FlatStore), an optimizer
updates the flat buffers in one launch; any other subset is updated per parameter
with the same op.  State buffers match the buffers they update in shape.

Nothing in a step reads the device: the step count, the learning rate and Adam's bias
corrections live in a small float64 device array per optimizer (``step_scalars``, layout
backends.base.STEP_SCALARS) that each step's update launch advances on the device;
``step_count`` is the host's own count of the same steps.  Setting ``lr`` writes the array
(between steps), so a schedule reaches a captured graph too.  ``clip_grad_norm`` computes the
norm and applies the scale on the device and returns the norm as a 0-d array.

Clipping inside the update: ``optimizer.step(max_norm=m)`` is ``clip_grad_norm(optimizer.params,
m)`` followed by ``optimizer.step()``, bit for bit (the gradients after it are the clipped ones
too), with the scale g ← g·c applied by the update launch itself instead of a launch of its own;
it returns the norm.  ``compile_step(..., max_norm=m)`` and ``fit(..., max_norm=m)`` use it.

A model placed with precision="bf16" keeps a bf16 copy of its parameters (parameters.py); the
update launch writes it as it writes θ, so the bf16 GEMMs never convert the weights themselves.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .arrays import shape_of, to_host
from .backends.base import STEP_LR, STEP_SCALARS, STEP_T
from .checks import check_number
from .parameters import Parameter


class Optimizer:
    """Base class.  Subclasses list their state buffers in ``buffer_names``."""

    buffer_names: tuple[str, ...] = ()

    def __init__(self, params, **hyperparams):
        self.params: list[Parameter] = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        for i, p in enumerate(self.params):
            if not isinstance(p, Parameter):
                raise TypeError(
                    f"params[{i}] is {type(p).__name__}, expected a gpubackprop Parameter"
                )
        self.hyperparams = hyperparams
        self._segments_made: tuple | None = None  # (the parameters' stores, their segments)
        self.step_count = 0
        self._store = None
        self._state: dict[str, list] = {}
        self._scalars = None  # the step scalars, made on the first step

    def __getattr__(self, name: str):
        hyper = self.__dict__.get("hyperparams", {})
        if name in hyper:
            return hyper[name]
        raise AttributeError(name)

    @property
    def lr(self) -> float:
        return self.hyperparams["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        self.hyperparams["lr"] = check_number("lr", value)
        if self._scalars is not None:
            self._scalars[STEP_LR] = self.hyperparams["lr"]  # in place: graphs hold this array

    @property
    def step_scalars(self):
        """The float64 device array [t, lr, 1 − β₁ᵗ, √(1 − β₂ᵗ), 0] the updates read and
        advance (made once, then only written in place, so that a captured graph keeps seeing
        it; the last slot is the update launch's count of finished blocks, 0 between steps)."""
        if self._scalars is None:
            host = np.zeros(len(STEP_SCALARS), dtype=np.float64)
            host[STEP_T] = self.step_count
            host[STEP_LR] = self.hyperparams["lr"]
            self._scalars = self.backend.asarray(host, np.float64)
        return self._scalars

    def _sync_scalars(self) -> None:
        """Write the host's step count and lr into the step scalars (after a state load)."""
        if self._scalars is not None:
            host = np.zeros(len(STEP_SCALARS), dtype=np.float64)
            host[STEP_T] = self.step_count
            host[STEP_LR] = self.hyperparams["lr"]
            self._scalars[...] = self.backend.asarray(host, np.float64)

    @property
    def backend(self):
        return self.params[0].store.backend

    def _flat(self) -> bool:
        store = self.params[0].store
        return store.covers(self.params)

    def _segments(self) -> list[tuple[Any, Any, Any]]:
        """(data, grad, bf16 copy or None) to update: the flat buffers, or each parameter;
        worked out again only when a parameter's store changed (model.to())."""
        stores = tuple(p.store for p in self.params)
        cached = self._segments_made
        if cached is not None and cached[0] == stores:
            return cached[1]
        segments = self._make_segments()
        self._segments_made = (stores, segments)
        return segments

    def _make_segments(self) -> list[tuple[Any, Any, Any]]:
        for p in self.params:
            if p.store is None:
                raise RuntimeError(
                    f"parameter {p.name!r} is not placed on a backend; call "
                    "model.to() before building the optimizer"
                )
        store = self.params[0].store
        if self._state and store is not self._store:
            raise RuntimeError(
                "the parameters moved (model.to() was called) after this optimizer took its "
                "first step; create the optimizer after model.to()"
            )
        self._store = store
        if self._flat():
            return [(store.data, store.grad, store.bf16)]
        return [(p.data, p.grad, p.bf16) for p in self.params]

    def _buffers(self, segments) -> list[dict[str, Any]]:
        if not self._state:
            for name in self.buffer_names:
                self._state[name] = [
                    self.backend.zeros(tuple(data.shape), data.dtype) for data, *_ in segments
                ]
        return [
            {name: self._state[name][i] for name in self.buffer_names} for i in range(len(segments))
        ]

    def step(self, max_norm: float | None = None) -> Any:
        """Apply one update to every parameter from its current ``grad``: one update launch
        per segment (one for a model's flat buffers), each taking step t = (steps taken) + 1
        from the step scalars; the last launch also counts the step there (its last block
        stores t and the bias corrections), so a step of the flat buffers is one launch.

        With ``max_norm``, first clip as ``clip_grad_norm(self.params, max_norm)`` does, the
        norm and c = max_norm / (‖g‖ + 1e−6) computed on the device and g ← g·c (where c < 1)
        applied inside the update launch, the clipped g written back to the gradients: the
        same bits as the two calls, one launch fewer.  Returns ‖g‖ (before clipping) as a
        0-d device array then, else None."""
        segments = self._segments()
        norm = clip = None
        if max_norm is not None:
            max_norm = check_number("max_norm", max_norm)
            norm, clip = self.backend.clip_coefficient([g for _, g, _ in segments], max_norm)
        scalars = self.step_scalars
        self.step_count += 1
        last = len(segments) - 1
        for i, ((data, grad, bf16), buffers) in enumerate(zip(segments, self._buffers(segments))):
            self._update(data, grad, buffers, scalars, clip, bf16, advance=i == last)
        return norm

    def _update(self, data, grad, buffers, scalars, clip, bf16, advance) -> None:
        """One update launch over ``data`` (clip: the device clip coefficient or None; bf16:
        the bf16 copy of ``data`` to write, or None; advance: count the step in ``scalars``,
        which the segment updated last does, after the others have read the step number)."""
        raise NotImplementedError

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """{"type", "hyperparams", "step", "buffers": {"<buffer>.<param name>": np.ndarray}}."""
        buffers = {}
        if self._state:
            self._segments()  # raises if the parameters moved since the state was made
            for name in self.buffer_names:
                for p, host in zip(self.params, self._per_parameter(name)):
                    buffers[f"{name}.{p.name}"] = host
        return {
            "type": type(self).__name__,
            "hyperparams": dict(self.hyperparams),
            "step": self.step_count,
            "buffers": buffers,
        }

    def _per_parameter(self, name: str) -> list[np.ndarray]:
        arrays = [self.backend.to_numpy(a) for a in self._state[name]]
        if self._flat():
            offsets = self.params[0].store.offsets
            return [
                arrays[0][o : o + p.size].reshape(p.shape).copy()
                for p, o in zip(self.params, offsets)
            ]
        return [np.array(a) for a in arrays]

    def load_state_dict(self, state: dict) -> None:
        """Restore from state_dict(); validates type, names and shapes before changing anything."""
        if state.get("type") != type(self).__name__:
            raise ValueError(
                f"optimizer state is for {state.get('type')!r}, not {type(self).__name__}"
            )
        step = state.get("step", 0)
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"optimizer state step={step!r} is not a non-negative integer")
        buffers = state.get("buffers", {})
        expected = (
            {f"{n}.{p.name}": p for n in self.buffer_names for p in self.params} if step else {}
        )
        if set(buffers) != set(expected):
            missing, extra = (
                sorted(set(expected) - set(buffers)),
                sorted(set(buffers) - set(expected)),
            )
            raise ValueError(
                f"optimizer state buffers mismatch: missing {missing}, unexpected {extra}"
            )
        for key, p in expected.items():
            if shape_of(buffers[key]) != p.shape:
                raise ValueError(
                    f"optimizer buffer {key!r} has shape {shape_of(buffers[key])}; "
                    f"expected {p.shape}"
                )
        new_hyper = dict(self.hyperparams)
        new_hyper.update(state.get("hyperparams", {}))
        segments = self._segments()
        self._state = {}
        if step:
            self._buffers(segments)
            for name in self.buffer_names:
                self._fill(name, {p.name: buffers[f"{name}.{p.name}"] for p in self.params})
        self.hyperparams = new_hyper
        self.step_count = step
        self._sync_scalars()

    def _fill(self, name: str, per_param: dict[str, np.ndarray]) -> None:
        store = self.params[0].store
        if self._flat():
            flat = np.zeros(store.size, dtype=store.dtype)
            for p, o in zip(self.params, store.offsets):
                flat[o : o + p.size] = to_host(per_param[p.name]).ravel()
            self._state[name][0] = self.backend.asarray(flat, store.dtype)
        else:
            for i, p in enumerate(self.params):
                self._state[name][i] = self.backend.asarray(per_param[p.name], p.data.dtype)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        return f"{type(self).__name__}({args})"


class SGD(Optimizer):
    """torch.optim.SGD: g = ∇θ + λθ; b ← g (first step) or μb + (1 − τ)g;
    g ← g + μb (Nesterov) or b; θ ← θ − ηg."""

    buffer_names = ("momentum_buffer",)

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ):
        check_number("lr", lr)
        check_number("momentum", momentum)
        check_number("dampening", dampening)
        check_number("weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(
                "nesterov=True needs momentum > 0 and dampening = 0 "
                f"(got momentum={momentum}, dampening={dampening})"
            )
        super().__init__(
            params,
            lr=float(lr),
            momentum=float(momentum),
            dampening=float(dampening),
            nesterov=bool(nesterov),
            weight_decay=float(weight_decay),
        )
        if momentum == 0:
            self.buffer_names = ()

    def _update(self, data, grad, buffers, scalars, clip, bf16, advance) -> None:
        h = self.hyperparams
        self.backend.sgd_update(
            data,
            grad,
            buffers.get("momentum_buffer"),
            scalars,
            momentum=h["momentum"],
            dampening=h["dampening"],
            nesterov=h["nesterov"],
            weight_decay=h["weight_decay"],
            clip=clip,
            param_bf16=bf16,
            advance=advance,
        )


class Adam(Optimizer):
    """torch.optim.Adam (L2 penalty added to the gradient):
    m ← β₁m + (1 − β₁)g; v ← β₂v + (1 − β₂)g²; θ ← θ − η/(1 − β₁ᵗ) · m/(√v/√(1 − β₂ᵗ) + ε)."""

    buffer_names = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        check_number("lr", lr)
        check_number("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        check_number("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        check_number("eps", eps)
        check_number("weight_decay", weight_decay)
        super().__init__(
            params,
            lr=float(lr),
            betas=(float(betas[0]), float(betas[1])),
            eps=float(eps),
            weight_decay=float(weight_decay),
        )

    def _update(self, data, grad, buffers, scalars, clip, bf16, advance) -> None:
        h = self.hyperparams
        self.backend.adam_update(
            data,
            grad,
            buffers["exp_avg"],
            buffers["exp_avg_sq"],
            scalars,
            beta1=h["betas"][0],
            beta2=h["betas"][1],
            eps=h["eps"],
            weight_decay=h["weight_decay"],
            decoupled=self.decoupled,
            clip=clip,
            param_bf16=bf16,
            advance=advance,
        )


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay θ ← θ(1 − ηλ) before the step."""

    decoupled = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


OPTIMIZER_TYPES = {cls.__name__: cls for cls in (SGD, Adam, AdamW)}


def optimizer_from_state_dict(params, state: dict) -> Optimizer:
    """Build the optimizer that ``state`` (from Optimizer.state_dict()) describes, and load it."""
    kind = state.get("type")
    if kind not in OPTIMIZER_TYPES:
        raise ValueError(
            f"optimizer type {kind!r} is unknown; expected one of {sorted(OPTIMIZER_TYPES)}"
        )
    hyper = dict(state.get("hyperparams", {}))
    if "betas" in hyper:
        hyper["betas"] = tuple(hyper["betas"])
    optimizer = OPTIMIZER_TYPES[kind](params, **hyper)
    optimizer.load_state_dict({**state, "hyperparams": hyper})
    return optimizer


def clip_grad_norm(params, max_norm: float) -> Any:
    """Scale all gradients by min(1, max_norm / (‖g‖₂ + 1e-6)) where ‖g‖₂ is the norm of
    all gradients together (torch.nn.utils.clip_grad_norm_); returns ‖g‖₂ before clipping as
    a 0-d array on the parameters' backend (as torch returns a tensor): the norm and the scale
    are computed and applied on the device, so nothing waits for it; ``float(norm)`` reads it."""
    params = list(params)
    max_norm = check_number("max_norm", max_norm)
    if not params:
        return np.asarray(0.0)
    store = params[0].store
    if store is None:
        raise RuntimeError(
            f"parameter {params[0].name!r} is not placed on a backend; call model.to() first"
        )
    grads = [store.grad] if store.covers(params) else [p.grad for p in params]
    return store.backend.clip_grad_norm_(grads, max_norm)
