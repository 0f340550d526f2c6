"""The gate refit: after training, the gate of a gated model is fitted again on frozen features.

Why: the gate learnt jointly with the experts (through dropout, at a loss weight of 0.5, with
the experts' learning rate) under-fits its task.  Measured on the third session's shipped
model (val): its COVID-CT expert alone reaches AUC 0.825 on COVID-CT, but the gate sent only
68% of COVID-CT images to it (95% of real scans to theirs), so the mix scored 0.737; the
gate's own AUC for "which dataset is this" was 0.928.  A balanced logistic regression on the
same pooled trunk features, fitted on the training images only, tells the datasets apart at
AUC 0.984 on val (stored images; 0.983 for the shipped model's refit, which also saw the JPEG
re-encodings), and the mix of that model's unchanged experts then scores 0.903 on real
scans and 0.821 on COVID-CT (T = 0.5; over three seeds 0.918 / 0.812, README).

The fit is multinomial (one class per training dataset), balanced so that each dataset counts
the same, on standardised features, L2-regularised, by full-batch gradient descent
(deterministic).  Its weights are folded into the model's own ``gate`` layer, so the serving
graph is unchanged: ``softmax((x @ W + b) / T)``.  The sharpening ``T`` is chosen on val from
a short list, like the operating threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from classifier import metrics as M
from classifier.preprocess import rgb_batch

GATE_LAYER = "gate"
EXPERTS_LAYER = "experts"
SHARPENING = (1.0, 0.5, 0.25)  # gate temperatures tried on val; 1.0 is the plain fit
L2 = 1e-3
STEPS = 3000
STEP_SIZE = 0.2


@dataclass(frozen=True)
class SoftmaxFit:
    """``softmax(x @ kernel + bias)`` on raw (unstandardised) features."""

    kernel: np.ndarray  # (features, classes)
    bias: np.ndarray  # (classes,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.kernel + self.bias

    def probabilities(self, x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        return _softmax(self.logits(x) / temperature)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def fit_softmax(
    x: np.ndarray, classes: np.ndarray, n_classes: int, *, l2: float = L2, steps: int = STEPS
) -> SoftmaxFit:
    """Class-balanced multinomial logistic regression; weights returned for raw features."""
    x = np.asarray(x, np.float64)
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mu) / sd
    onehot = np.eye(n_classes)[classes]
    counts = np.maximum(onehot.sum(axis=0), 1)
    weight = (onehot / (n_classes * counts)).sum(axis=1)[:, None] * len(x)
    w = np.zeros((z.shape[1], n_classes))
    b = np.zeros(n_classes)
    for _ in range(steps):
        grad = (_softmax(z @ w + b) - onehot) * weight / len(z)
        w -= STEP_SIZE * (z.T @ grad + l2 * w)
        b -= STEP_SIZE * grad.sum(axis=0)
    kernel = w / sd[:, None]
    return SoftmaxFit(kernel, b - mu @ kernel)


def _heads(model: Any) -> Any:
    """A sub-model: image -> (expert probabilities, the features the gate reads)."""
    import keras

    return keras.Model(
        model.inputs, [model.get_layer(EXPERTS_LAYER).output, model.get_layer(GATE_LAYER).input]
    )


def refit_gate(
    model: Any,
    names: Sequence[str],
    train_images: Sequence[np.ndarray],
    val_images: Sequence[np.ndarray],
    val_labels: Sequence[np.ndarray],
) -> dict[str, Any]:
    """Refit ``model``'s gate in place; return what was measured, for the model card.

    ``names[i]``: dataset ``i``'s name; ``train_images[i]``: its gray (N, 200, 200) training
    images (stored and re-encoded versions alike, so that file format tells nothing);
    ``val_images[i]``, ``val_labels[i]``: that dataset's val split, used only to choose the
    sharpening and to report.
    """
    heads = _heads(model)
    feats = [heads.predict(rgb_batch(x), batch_size=64, verbose=0)[1] for x in train_images]
    domain = np.concatenate([np.full(len(f), i) for i, f in enumerate(feats)])
    features = np.concatenate(feats)
    fit = fit_softmax(features, domain, len(names))
    train_route = float(np.mean(fit.logits(features).argmax(axis=1) == domain))

    val = [heads.predict(rgb_batch(x), batch_size=64, verbose=0) for x in val_images]
    layer = model.get_layer(GATE_LAYER)
    old_kernel, old_bias = (np.asarray(v, np.float64) for v in layer.get_weights())
    old = SoftmaxFit(old_kernel, old_bias)

    def measure(gate: SoftmaxFit, temperature: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for i, ((experts, f), y) in enumerate(zip(val, val_labels, strict=True)):
            g = gate.probabilities(np.asarray(f, np.float64), temperature)
            mixed = (np.asarray(experts, np.float64) * g).sum(axis=1)
            out[names[i]] = {"auc": M.auc(y, mixed), "routed_own": float(np.mean(g.argmax(1) == i))}
        return out

    before = measure(old, 1.0)
    tried = {t: measure(fit, t) for t in SHARPENING}
    temperature = max(SHARPENING, key=lambda t: np.mean([d["auc"] for d in tried[t].values()]))
    layer.set_weights(
        [(fit.kernel / temperature).astype(np.float32), (fit.bias / temperature).astype(np.float32)]
    )
    return {
        "method": "balanced multinomial logistic regression on the frozen trunk's pooled "
        f"features of the training images (L2 {L2}), sharpened by 1/T with T chosen on val "
        f"from {list(SHARPENING)}",
        "temperature": temperature,
        "train_routed_own": train_route,
        "val_before": before,
        "val_tried": {str(t): v for t, v in tried.items()},
    }
