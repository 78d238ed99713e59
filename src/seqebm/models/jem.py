"""Joint energy-based models (JEM): a classifier read as an EBM over observations and labels.

Notation: B batch rows, K class labels, ``event`` the shape of one observation x (e.g. (64,)
flattened 8x8 digits, (1, 8, 8) images or (D,) vectors), Ψ_θ(x) ∈ R^K the classifier's logits.

Monograph "Energy-based models for speech and language", §5.2 ("Upgrading EBMs to Joint EBMs
(JEMs) for Fixed-dimensional Data"). Any classifier Ψ_θ defines the joint density (Eq. 5.1)

    p_θ(x, y) = exp[U_θ(x, y)] / Z(θ),   U_θ(x, y) = onehot(y)ᵀ Ψ_θ(x) = logit_y(x),

whose conditional is the classifier itself, p_θ(y|x) = softmax(Ψ_θ(x))_y (Eq. 5.2; Z(θ)
cancels), and whose marginal is again an EBM (Eq. 5.3)

    p_θ(x) = exp[U_θ(x)] / Z(θ),   U_θ(x) = log Σ_y' exp U_θ(x, y').

The monograph writes potentials U (higher = more likely); the rest of ``seqebm`` writes energies
E = −U (lower = more likely). :class:`JointEnergyClassifier` offers both: ``forward(x)`` is the
energy E_θ(x) = −U_θ(x) of shape (B,), the house protocol of energy models (so a JEM plugs into
the samplers of :mod:`seqebm.sampling` and the energy objectives), and ``logits`` /
``log_prob_y`` give the classifier view. Training (Eq. 5.4) lives in :mod:`seqebm.objectives.jem`.

Architecture note: JEM trains the classifier's input gradient ∇_x U_θ(x) through Langevin
dynamics, so the classifier should be smooth in x: use smooth activations (SiLU/Swish, softplus,
ELU rather than ReLU, whose piecewise-constant gradients make SGLD chains stall) and no batch
normalisation (its batch statistics mix data and sampler rows and make U(x) depend on the rest
of the batch; Grathwohl et al. 2020 remove it). :func:`digits_classifier` follows both rules.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DIGITS_PIXELS", "DigitsClassifier", "JointEnergyClassifier", "check_labels", "digits_classifier",
    "digits_to_inputs",
]

#: Pixels of one 8x8 digit (the event of :func:`digits_to_inputs` is (64,)).
DIGITS_PIXELS: int = 64
_DIGITS_MAX_LEVEL = 16


def _check_x(name: str, x: object) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a floating-point Tensor (B, *event), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape (B, *event) with B >= 1, got {tuple(x.shape)}")
    return x


class JointEnergyClassifier(nn.Module):
    """A classifier Ψ_θ: x -> logits (B, K) read as the JEM p_θ(x, y) ∝ exp logit_y(x) (§5.2, Eq. 5.1).

    Args:
        classifier: any ``nn.Module`` mapping a floating-point batch (B, *event) to logits (B, K).
            Its parameters are this module's parameters (``self.classifier``).

    Raises:
        TypeError: classifier is not an ``nn.Module``.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be an nn.Module mapping (B, *event) to logits (B, K), "
                            f"got {type(classifier).__name__}")
        self.classifier = classifier

    def logits(self, x: Tensor) -> Tensor:
        """Ψ_θ(x), shape (B, K): U_θ(x, y) for every label y at once.

        Raises:
            TypeError: x is not a floating-point Tensor.
            ValueError: x has no batch dimension, or the classifier does not return (B, K) logits.
        """
        x = _check_x("x", x)
        out = self.classifier(x)
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0] or out.shape[1] < 1:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the classifier must return logits of shape ({x.shape[0]}, K) for input "
                             f"{tuple(x.shape)}, got {got}")
        return out

    def log_joint(self, x: Tensor, y: Tensor | int) -> Tensor:
        """U_θ(x, y) = onehot(y)ᵀ Ψ_θ(x) = logit_y(x), shape (B,) (Eq. 5.1; log p_θ(x, y) + log Z(θ)).

        Args:
            x: Tensor (B, *event).
            y: an int label (the same for every row) or a LongTensor (B,) of labels in [0, K).

        Raises:
            ValueError: a label outside [0, K) or a label tensor of the wrong shape or dtype.
        """
        logits = self.logits(x)
        labels = check_labels("y", y, logits.shape[0], logits.shape[1], device=logits.device)
        return logits.gather(1, labels[:, None]).squeeze(1)

    def log_marginal(self, x: Tensor) -> Tensor:
        """U_θ(x) = log Σ_y exp U_θ(x, y), shape (B,) (Eq. 5.3; log p_θ(x) + log Z(θ))."""
        return torch.logsumexp(self.logits(x), dim=1)

    def energy(self, x: Tensor) -> Tensor:
        """E_θ(x) = −U_θ(x), shape (B,): the marginal EBM in the house sign convention."""
        return -self.log_marginal(x)

    def forward(self, x: Tensor) -> Tensor:
        """The energy E_θ(x) = −U_θ(x) (B,), so that ``model(x)`` follows the energy-model protocol."""
        return self.energy(x)

    def log_prob_y(self, x: Tensor) -> Tensor:
        """log p_θ(y|x) = log_softmax(Ψ_θ(x)), shape (B, K) (Eq. 5.2; Z(θ) cancels)."""
        return F.log_softmax(self.logits(x), dim=1)

    def conditional_energy(self, y: Tensor | int) -> Callable[[Tensor], Tensor]:
        """``x -> −U_θ(x, y)`` (B,): the energy of p_θ(x|y) ∝ exp U_θ(x, y), for class-conditional sampling."""
        return lambda x: -self.log_joint(x, y)


def check_labels(name: str, y: object, n: int, num_classes: int, *, device: torch.device | None = None) -> Tensor:
    """Labels as a LongTensor (n,) in [0, num_classes), from an int (broadcast) or a 1-D integer Tensor.

    Raises:
        TypeError: y is neither an int nor an integer Tensor.
        ValueError: a wrong shape or a label outside [0, num_classes).
    """
    if isinstance(y, bool):
        raise TypeError(f"{name} must be an int or a LongTensor ({n},), got bool")
    if isinstance(y, int):
        if not 0 <= y < num_classes:
            raise ValueError(f"{name}={y} is outside the label set [0, {num_classes})")
        return torch.full((n,), y, dtype=torch.long, device=device)
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be an int or a LongTensor ({n},), got {type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {y.dtype}")
    if tuple(y.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the batch, got {tuple(y.shape)}")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = sorted({int(v) for v in y[(y < 0) | (y >= num_classes)].tolist()})[:5]
        raise ValueError(f"{name} has labels {bad} outside the label set [0, {num_classes})")
    return y.to(device=device, dtype=torch.long)


# ---------------------------------------------------------------------------------- digits

def digits_to_inputs(images: Tensor) -> Tensor:
    """Digits pixels in 0..16 (LongTensor (N, 64), :mod:`seqebm.data.digits`) as float32 (N, 64) in [-1, 1].

    The map is v -> v / 8 − 1 (0 -> −1, 16 -> 1), the [-1, 1] range JEM's uniform-noise
    initialisation and clamping assume (:class:`seqebm.objectives.jem.JEMLoss` defaults).

    Raises:
        TypeError: images is not a Tensor.
        ValueError: values outside [0, 16].
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a Tensor of pixel levels in [0, 16], got {type(images).__name__}")
    if images.numel() and (float(images.min()) < 0 or float(images.max()) > _DIGITS_MAX_LEVEL):
        raise ValueError(f"images must hold pixel levels in [0, {_DIGITS_MAX_LEVEL}], got range "
                         f"[{float(images.min())}, {float(images.max())}]")
    return images.to(torch.float32) / (_DIGITS_MAX_LEVEL / 2) - 1.0


class DigitsClassifier(nn.Module):
    """A small SiLU classifier for 8x8 digits, without batch normalisation (JEM-friendly).

    Accepts x of shape (B, 64), (B, 8, 8) or (B, 1, 8, 8) and returns logits (B, K).

    * ``arch="mlp"``: 64 -> hidden -> ... -> hidden -> K, ``depth`` hidden layers with SiLU.
    * ``arch="cnn"``: conv3x3(1 -> c) -> conv3x3/2(c -> 2c) -> conv3x3/2(2c -> 2c), SiLU after each,
      then a linear layer 2c·2·2 -> K, with c = ``hidden`` // 4 (at least 4).

    Args:
        hidden: MLP width (or 4x the CNN's first channel count).
        arch: ``"mlp"`` or ``"cnn"``.
        num_classes: K.
        depth: MLP hidden layers (>= 1); ignored by the CNN.
    """

    def __init__(self, hidden: int = 128, *, arch: str = "mlp", num_classes: int = 10, depth: int = 2) -> None:
        super().__init__()
        for name, v, lo in (("hidden", hidden, 1), ("num_classes", num_classes, 1), ("depth", depth, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if arch not in ("mlp", "cnn"):
            raise ValueError(f"arch must be 'mlp' or 'cnn', got {arch!r}")
        self.arch, self.num_classes = arch, num_classes
        if arch == "mlp":
            layers: list[nn.Module] = []
            width = DIGITS_PIXELS
            for _ in range(depth):
                layers += [nn.Linear(width, hidden), nn.SiLU()]
                width = hidden
            layers.append(nn.Linear(width, num_classes))
            self.net = nn.Sequential(*layers)
        else:
            c = max(4, hidden // 4)
            self.net = nn.Sequential(
                nn.Conv2d(1, c, 3, padding=1), nn.SiLU(),                # (B, c, 8, 8)
                nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.SiLU(),  # (B, 2c, 4, 4)
                nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1), nn.SiLU(),  # (B, 2c, 2, 2)
                nn.Flatten(), nn.Linear(2 * c * 4, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x[0].numel() != DIGITS_PIXELS:
            raise ValueError(f"digits input must have shape (B, 64), (B, 8, 8) or (B, 1, 8, 8), got {tuple(x.shape)}")
        if self.arch == "mlp":
            return self.net(x.reshape(x.shape[0], DIGITS_PIXELS))
        return self.net(x.reshape(x.shape[0], 1, 8, 8))


def digits_classifier(hidden: int = 128, *, arch: str = "mlp", num_classes: int = 10,
                      depth: int = 2) -> DigitsClassifier:
    """The default JEM classifier for 8x8 digits (:class:`DigitsClassifier`): SiLU, no batch norm.

    Wrap it as ``JointEnergyClassifier(digits_classifier(64))`` and feed it
    :func:`digits_to_inputs` of the digits pixels. Smooth activations and the absence of batch
    normalisation matter for JEM (see the module docstring).
    """
    return DigitsClassifier(hidden, arch=arch, num_classes=num_classes, depth=depth)
