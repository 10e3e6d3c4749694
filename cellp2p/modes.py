"""The two training modes, each its networks, optimisers and one step; and the LR schedule.

``UNetMode``: the baseline, a U-Net with a supervised loss. ``Pix2PixMode``: U-Net generator +
PatchGAN, a D step then a G step with D frozen (Isola et al. 2017), split as the reference code
splits it: ``forward``, then ``optimize_d`` (``backward_d``), then ``optimize_g``
(``backward_g``). A step returns a dict of detached loss tensors; the loop
(:mod:`cellp2p.train`) owns seeding, data, schedules and logging.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cellp2p.config import MODES, TrainConfig
from cellp2p.dataset import PairedData
from cellp2p.errors import CellP2PError
from cellp2p.losses import (
    discriminator_loss,
    generator_adv_loss,
    gradient_penalty,
    supervised_loss,
    weighted_loss,
)
from cellp2p.models import build_model
from cellp2p.models.blocks import center_crop
from cellp2p.outputs import output_space, target_in_space, to_model_range, to_unit
from cellp2p.runtime import autocast


class Mode:
    """A training mode: its networks, optimizers and one step.

    ``nets`` are the plain networks (checkpointed, validated); ``train_nets`` are what the step
    calls: the same objects in one process, DistributedDataParallel wrappers under torchrun.
    """

    nets: dict[str, nn.Module]
    train_nets: dict[str, nn.Module]
    optims: dict[str, torch.optim.Optimizer]
    kind: str  # the target kind: binary | multiclass | image
    precision: str  # fp32 | bf16 (autocast)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch of [0, 1] inputs and targets; the detached losses."""
        raise NotImplementedError

    def predict(self, x: torch.Tensor, net: nn.Module | None = None) -> torch.Tensor:
        """The main network's (or ``net``'s) output for a [0, 1] input, mapped to [0, 1]
        (:func:`to_unit`)."""
        net = self.main if net is None else net
        return to_unit(net(to_model_range(x)), output_space(net), self.kind)

    @property
    def main(self) -> nn.Module:
        """The network that predicts (the U-Net, or pix2pix's generator)."""
        return next(iter(self.nets.values()))


def make_adam(net: nn.Module, device: torch.device, **kwargs: Any) -> torch.optim.Adam:
    """Adam with the fused kernel on CPU and CUDA: one kernel over all parameters instead of a
    Python loop (4.3x faster for the paper G + D on the CPU, see benchmarks/RESULTS.md)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(net.parameters(), fused=fused, **kwargs)


def model_overrides(cfg: TrainConfig) -> dict[str, Any]:
    """The preset's changes for the U-Net / generator: ``--upsample``, then ``model_overrides``."""
    overrides: dict[str, Any] = {} if cfg.upsample is None else {"up": cfg.upsample}
    return {**overrides, **cfg.model_overrides}


class UNetMode(Mode):
    """The baseline: a U-Net trained with a supervised loss."""

    def __init__(self, cfg: TrainConfig, data: PairedData, device: torch.device, precision: str):
        self.kind = data.target_kind
        overrides = model_overrides(cfg)
        net = build_model("unet", cfg.preset, data.in_channels, data.out_channels, **overrides)
        self.nets = {"unet": net.to(device)}
        self.train_nets = self.nets
        n_classes = len(data.classes) if self.kind == "multiclass" else 2
        self.loss = supervised_loss(cfg.loss_name(), n_classes)
        # Issue 15: the border weight map rides as the target's last channel (training only).
        self.weighted = bool(getattr(data, "weighted", False))
        self.weighted_loss = weighted_loss(cfg.loss_name(), n_classes) if self.weighted else None
        self.optims = {"unet": make_adam(net, device, lr=cfg.learning_rate())}
        self.device, self.precision = device, precision

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The supervised loss on the target crop the U-Net output covers, one Adam step."""
        net, opt = self.train_nets["unet"], self.optims["unet"]
        opt.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            out = net(to_model_range(x))
            t = center_crop(y, *out.shape[-2:])
            if self.weighted_loss is not None:
                loss = self.weighted_loss(out.float(), t[:, :-1], t[:, -1:])
            else:
                loss = self.loss(out.float(), t)
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}


class Pix2PixMode(Mode):
    """pix2pix: U-Net generator + PatchGAN, adversarial + λ·L1 (Isola et al. 2017).

    Under DDP the ``train_nets`` are wrappers whose backward averages the gradients over ranks;
    G's step calls the plain D: D is frozen there, so no gradient of D's is due and D's wrapper
    must not wait for one.
    """

    def __init__(self, cfg: TrainConfig, data: PairedData, device: torch.device, precision: str):
        if data.target_kind == "multiclass":
            raise CellP2PError(
                "pix2pix learns the label map as an image: use --labels-mode binary/nonzero, "
                "or --task translate for multi-valued label maps"
            )
        overrides = model_overrides(cfg)
        g = build_model("generator", cfg.preset, data.in_channels, data.out_channels, **overrides)
        d_in = data.out_channels + (0 if cfg.unconditional else data.in_channels)
        d = build_model(
            "discriminator",
            cfg.preset,
            d_in,
            1,
            receptive_field=cfg.receptive_field,
            conditional=not cfg.unconditional,
        )
        self.nets = {"generator": g.to(device), "discriminator": d.to(device)}
        self.train_nets = self.nets
        lr = cfg.learning_rate()
        betas = (0.5, 0.999)
        self.use_gan = cfg.lambda_gan > 0
        self.optims = {"generator": make_adam(g, device, lr=lr, betas=betas)}
        if self.use_gan:  # the L1-only ablation never steps D
            self.optims["discriminator"] = make_adam(d, device, lr=lr, betas=betas)
        self.cfg, self.device, self.precision = cfg, device, precision
        self.kind = data.target_kind
        self.space = output_space(g)  # sigmoid generators (course) work in [0, 1], tanh in [-1, 1]

    def _d_input(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        """What D judges: the image, with the input beside it unless D is unconditional."""
        return (
            img
            if self.cfg.unconditional
            else torch.cat([center_crop(x, *img.shape[-2:]), img], dim=1)
        )

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """One pix2pix step: G's forward, then D's step on the detached fake, then G's step."""
        x, y, fake = self.forward(x, y)
        logs: dict[str, torch.Tensor] = {}
        if self.use_gan:
            logs["loss_d"] = self.optimize_d(x, y, fake)
        logs.update(self.optimize_g(x, y, fake))
        return logs

    def forward(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input and target in the networks' ranges, the target cropped to G's output, and G(x)."""
        x = to_model_range(x)
        y = target_in_space(y, self.space)
        with autocast(self.device, self.precision):
            fake = self.train_nets["generator"](x)
        return x, center_crop(y, *fake.shape[-2:]), fake

    def optimize_d(self, x: torch.Tensor, y: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """D's step on a real and the detached fake pair; D is trainable only here."""
        d_plain, od = self.nets["discriminator"], self.optims["discriminator"]
        d_plain.requires_grad_(True)
        od.zero_grad(set_to_none=True)
        loss_d = self.backward_d(x, y, fake)
        od.step()
        d_plain.requires_grad_(False)  # G's step must not move D
        return loss_d

    def backward_d(self, x: torch.Tensor, y: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """D's loss, halved as in the paper (+ the gradient penalty for WGAN-GP), backward."""
        d, gan_mode = self.train_nets["discriminator"], self.cfg.gan_mode
        with autocast(self.device, self.precision):
            real_pair, fake_pair = self._d_input(x, y), self._d_input(x, fake.detach())
            loss_d = 0.5 * discriminator_loss(gan_mode, d(real_pair).float(), d(fake_pair).float())
        if gan_mode == "wgangp":
            loss_d = loss_d + 10.0 * gradient_penalty(d, real_pair.float(), fake_pair.float())
        loss_d.backward()
        return loss_d.detach()

    def optimize_g(
        self, x: torch.Tensor, y: torch.Tensor, fake: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """G's step against the frozen D: its loss terms, backward, then Adam."""
        og = self.optims["generator"]
        og.zero_grad(set_to_none=True)
        logs = self.backward_g(x, y, fake)
        og.step()
        return logs

    def backward_g(
        self, x: torch.Tensor, y: torch.Tensor, fake: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """G's loss, λ_gan · adversarial + λ_L1 · L1, backward; returns its terms."""
        cfg, logs = self.cfg, dict[str, torch.Tensor]()
        with autocast(self.device, self.precision):
            total = torch.zeros((), device=x.device)
            if self.use_gan:
                d_plain = self.nets["discriminator"]
                adv = generator_adv_loss(cfg.gan_mode, d_plain(self._d_input(x, fake)).float())
                total = total + cfg.lambda_gan * adv
                logs["loss_g_gan"] = adv.detach()
            if cfg.lambda_l1 > 0:
                l1 = torch.nn.functional.l1_loss(fake.float(), y)
                total = total + cfg.lambda_l1 * l1
                logs["loss_g_l1"] = l1.detach()
        total.backward()
        logs["loss_g"] = total.detach()
        return logs


def make_mode(cfg: TrainConfig, data: PairedData, device: torch.device, precision: str) -> Mode:
    """The mode ``--mode`` names, its networks on ``device``."""
    if cfg.mode == "unet":
        return UNetMode(cfg, data, device, precision)
    if cfg.mode == "pix2pix":
        return Pix2PixMode(cfg, data, device, precision)
    raise CellP2PError(f"--mode {cfg.mode!r} unknown; use one of {', '.join(MODES)}")


# -- the learning-rate schedule ----------------------------------------------------------------


def lr_factor(step: int, total: int, decay_start: float) -> float:
    """Constant, then linear decay to 0 over the last ``1 - decay_start`` of the steps."""
    start = int(total * decay_start)
    if step < start or total <= start:
        return 1.0
    return max(0.0, 1.0 - (step - start) / (total - start))


def make_schedulers(
    optims: dict[str, torch.optim.Optimizer], total: int, decay_start: float, step: int = 0
) -> dict[str, torch.optim.lr_scheduler.LambdaLR]:
    """One :func:`lr_factor` schedule per optimizer, positioned after ``step`` steps.

    For ``step`` > 0 the optimizers must hold their restored state (torch reads the
    ``initial_lr`` it stored there); the rates are set for the schedule of ``total`` steps.
    """
    return {
        k: torch.optim.lr_scheduler.LambdaLR(
            o, lambda s: lr_factor(s, total, decay_start), last_epoch=step - 1
        )
        for k, o in optims.items()
    }
