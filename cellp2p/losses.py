"""Training objectives: segmentation/translation losses and the four GAN objectives."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from cellp2p.errors import CellP2PError

SEG_LOSSES = ("bce", "dice", "bcedice")
IMAGE_LOSSES = ("l1", "l2")
GAN_MODES = ("vanilla", "lsgan", "hinge", "wgangp")

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def supervised_loss(name: str, num_classes: int = 2) -> Loss:
    """U-Net loss on logits: BCE / Dice / BCE+Dice (binary or multi-class CE), or L1 / L2."""
    from monai.losses import DiceCELoss, DiceLoss  # heavy import: only when training

    multiclass = num_classes > 2
    if name == "l1":
        return F.l1_loss
    if name == "l2":
        return F.mse_loss
    if name == "bce":
        if multiclass:
            return lambda logits, y: F.cross_entropy(logits, y[:, 0].long())
        return F.binary_cross_entropy_with_logits
    if name == "dice":
        if multiclass:
            return DiceLoss(softmax=True, to_onehot_y=True)
        return DiceLoss(sigmoid=True)
    if name == "bcedice":
        if multiclass:
            return DiceCELoss(softmax=True, to_onehot_y=True)
        return DiceCELoss(sigmoid=True)
    raise CellP2PError(f"loss {name!r} unknown; use one of {', '.join(SEG_LOSSES + IMAGE_LOSSES)}")


def weighted_loss(name: str, num_classes: int = 2) -> Callable[..., torch.Tensor]:
    """``loss(logits, y, w)``: per-pixel weighted (B)CE, sum(w·ce) / sum(w) as the U-Net paper's
    energy, plus the unweighted Dice term of ``bcedice`` / ``dice``."""
    from monai.losses import DiceLoss

    multiclass = num_classes > 2
    dice = None
    if name in ("dice", "bcedice"):
        dice = DiceLoss(softmax=True, to_onehot_y=True) if multiclass else DiceLoss(sigmoid=True)

    def loss(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The weighted loss of one batch."""
        if multiclass:
            ce = F.cross_entropy(logits, y[:, 0].long(), reduction="none")[:, None]
        else:
            ce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        total = (w * ce).sum() / w.sum().clamp_min(1e-8)
        return total if dice is None else total + dice(logits, y)

    return loss


def discriminator_loss(mode: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """D's objective on logit maps for real and fake pairs (not yet halved)."""
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(
            real, torch.ones_like(real)
        ) + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    if mode == "lsgan":
        return F.mse_loss(real, torch.ones_like(real)) + F.mse_loss(fake, torch.zeros_like(fake))
    if mode == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if mode == "wgangp":
        return fake.mean() - real.mean()
    raise CellP2PError(f"--gan-mode {mode!r} unknown; use one of {', '.join(GAN_MODES)}")


def generator_adv_loss(mode: str, fake: torch.Tensor) -> torch.Tensor:
    """G's adversarial term: make D call the fake pair real."""
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    if mode == "lsgan":
        return F.mse_loss(fake, torch.ones_like(fake))
    if mode in ("hinge", "wgangp"):
        return -fake.mean()
    raise CellP2PError(f"--gan-mode {mode!r} unknown; use one of {', '.join(GAN_MODES)}")


def gradient_penalty(
    discriminator: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor
) -> torch.Tensor:
    """WGAN-GP penalty (Gulrajani et al. 2017): (‖∇D(x̂)‖ − 1)² on random interpolates."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    out = discriminator(mixed)
    (grad,) = torch.autograd.grad(out.sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
