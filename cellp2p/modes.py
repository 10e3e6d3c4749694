"""The two training modes: each builds its networks and optimisers and supplies one step.

``UNetMode``: the baseline, a U-Net with a supervised loss. ``Pix2PixMode``: U-Net generator +
PatchGAN, a D step then a G step with D frozen (Isola et al. 2017).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cellp2p.config import MODES, TrainConfig
from cellp2p.dataset import PairedData
from cellp2p.errors import CellP2PError
from cellp2p.losses import (
    GAN_MODES,
    discriminator_loss,
    generator_adv_loss,
    gradient_penalty,
    supervised_loss,
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

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The main network's output for a [0, 1] input, mapped to [0, 1] (:func:`to_unit`)."""
        return to_unit(self.main(to_model_range(x)), output_space(self.main), self.kind)

    @property
    def main(self) -> nn.Module:
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
        loss_name = cfg.loss or ("bcedice" if self.kind != "image" else "l1")
        self.loss = supervised_loss(
            loss_name, len(data.classes) if self.kind == "multiclass" else 2
        )
        lr = cfg.lr if cfg.lr is not None else 1e-3
        self.optims = {"unet": make_adam(net, device, lr=lr)}
        self.device, self.precision = device, precision

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        net, opt = self.train_nets["unet"], self.optims["unet"]
        opt.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            out = net(to_model_range(x))
            loss = self.loss(out.float(), center_crop(y, *out.shape[-2:]))
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}


class Pix2PixMode(Mode):
    """pix2pix: U-Net generator + PatchGAN, adversarial + λ·L1 (Isola et al. 2017)."""

    def __init__(self, cfg: TrainConfig, data: PairedData, device: torch.device, precision: str):
        if cfg.gan_mode not in GAN_MODES:
            raise CellP2PError(
                f"--gan-mode {cfg.gan_mode!r} unknown; use one of {', '.join(GAN_MODES)}"
            )
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
        lr = cfg.lr if cfg.lr is not None else 2e-4
        betas = (0.5, 0.999)
        self.use_gan = cfg.lambda_gan > 0
        self.optims = {"generator": make_adam(g, device, lr=lr, betas=betas)}
        if self.use_gan:  # the L1-only ablation never steps D
            self.optims["discriminator"] = make_adam(d, device, lr=lr, betas=betas)
        self.cfg, self.device, self.precision = cfg, device, precision
        self.kind = data.target_kind
        self.space = output_space(g)  # sigmoid generators (course) work in [0, 1], tanh in [-1, 1]

    def _d_input(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return (
            img
            if self.cfg.unconditional
            else torch.cat([center_crop(x, *img.shape[-2:]), img], dim=1)
        )

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        # Under DDP g and d are wrappers whose backward averages the gradients over ranks. G's
        # step calls the plain D (``d_plain``): D is frozen there, so no gradient of D's is due
        # and D's wrapper must not wait for one.
        g, d = self.train_nets["generator"], self.train_nets["discriminator"]
        d_plain = self.nets["discriminator"]
        og, od = self.optims["generator"], self.optims.get("discriminator")
        cfg = self.cfg
        x = to_model_range(x)
        y = target_in_space(y, self.space)
        logs: dict[str, torch.Tensor] = {}
        with autocast(self.device, self.precision):
            fake = g(x)
        y = center_crop(y, *fake.shape[-2:])
        if self.use_gan:
            # D first, on the detached fake; its objective halved as in the paper.
            d_plain.requires_grad_(True)
            od.zero_grad(set_to_none=True)
            with autocast(self.device, self.precision):
                real_pair, fake_pair = self._d_input(x, y), self._d_input(x, fake.detach())
                loss_d = 0.5 * discriminator_loss(
                    cfg.gan_mode, d(real_pair).float(), d(fake_pair).float()
                )
            if cfg.gan_mode == "wgangp":
                loss_d = loss_d + 10.0 * gradient_penalty(d, real_pair.float(), fake_pair.float())
            loss_d.backward()
            od.step()
            logs["loss_d"] = loss_d.detach()
            d_plain.requires_grad_(False)  # G's step must not move D
        og.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            total = torch.zeros((), device=x.device)
            if self.use_gan:
                adv = generator_adv_loss(cfg.gan_mode, d_plain(self._d_input(x, fake)).float())
                total = total + cfg.lambda_gan * adv
                logs["loss_g_gan"] = adv.detach()
            if cfg.lambda_l1 > 0:
                l1 = torch.nn.functional.l1_loss(fake.float(), y)
                total = total + cfg.lambda_l1 * l1
                logs["loss_g_l1"] = l1.detach()
        total.backward()
        og.step()
        logs["loss_g"] = total.detach()
        return logs


def make_mode(cfg: TrainConfig, data: PairedData, device: torch.device, precision: str) -> Mode:
    if cfg.mode == "unet":
        return UNetMode(cfg, data, device, precision)
    if cfg.mode == "pix2pix":
        return Pix2PixMode(cfg, data, device, precision)
    raise CellP2PError(f"--mode {cfg.mode!r} unknown; use one of {', '.join(MODES)}")
