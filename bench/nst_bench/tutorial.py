"""The baseline of ``nst-benchmark``: the loop of the official PyTorch tutorial "Neural Transfer Using PyTorch"
(A. Jacq, W. Wang) as it is structured there, over copies of the replica's convolutions.

An ``nn.Sequential`` VGG with a normalisation module first, out-of-place ReLUs, ``ContentLoss``/``StyleLoss``
modules inserted after the chosen layers (targets computed by running the partial model while it is built), the
layers after the last loss cut off, ``optim.LBFGS([input_img])`` with its defaults (lr 1, 20 iterations per
step), the image in [0, 1] clamped at the start of each closure, the content image as the initial image, eager
fp32. Departures, so that it minimises the engine's function: the loss modules sit after our layers (relu1_1 …
relu5_1, relu4_2) and compute the seed's costs (:mod:`nst_server.costs`, with the settings' alpha, beta and
lambdas) instead of the tutorial's MSEs.

Source: https://pytorch.org/tutorials/advanced/neural_style_tutorial.html
"""

from __future__ import annotations

import contextlib
import time

import torch
from PIL import Image
from torch import nn

from nst_export.vgg import CONV_LAYERS
from nst_server import costs
from nst_server.images import resize_to_max_side, to_tensor
from nst_server.model import StyleModels

from nst_bench.measure import Trace, sync
from nst_server.settings import StyleTransferSettings


class _Done(Exception):
    """Raised from the tutorial's closure once it has evaluated its budget of iterations."""


class Normalization(nn.Module):
    """The tutorial's first module: subtract the weights' mean pixel (our weights fold the std into conv1_1)."""

    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image - self.mean


class ContentLoss(nn.Module):
    """The tutorial's transparent content-loss module, computing the seed's ``J_content`` times its weight."""

    def __init__(self, target: torch.Tensor, weight: float) -> None:
        super().__init__()
        self.target, self.weight, self.loss = target.detach(), weight, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.loss = self.weight * costs.content_cost(self.target, x).sum()
        return x


def tutorial_gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """The tutorial's ``gram_matrix`` without its division: ``features = x.view(a * b, c * d)``,
    ``torch.mm(features, features.t())``; ``(1, C, H, W)`` -> ``(1, C, C)``."""
    a, b, c, d = x.size()
    features = x.view(a * b, c * d)
    return torch.mm(features, features.t()).unsqueeze(0)


class StyleLoss(nn.Module):
    """The tutorial's transparent style-loss module, computing the seed's ``lambda_l J_style^[l]`` by plain
    autograd through the tutorial's Gram matrix (none of the engine's levers)."""

    def __init__(self, target_gram: torch.Tensor, weight: float) -> None:
        super().__init__()
        self.target, self.weight, self.loss = target_gram.detach(), weight, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_c, n_h, n_w = x.shape[1:]
        diff = tutorial_gram_matrix(x) - self.target
        self.loss = self.weight * diff.pow(2).sum() / (4.0 * n_c**2 * (n_h * n_w) ** 2)
        return x


def _layers_only(model: nn.Sequential, image: torch.Tensor) -> torch.Tensor:
    """The partial model's output without its loss modules (the style image may differ in size from the
    content, whose targets the content-loss modules hold; the tutorial resizes both to one square size)."""
    with torch.no_grad():
        for module in model:
            if not isinstance(module, ContentLoss | StyleLoss):
                image = module(image)
    return image


def tutorial_model(replica: nn.Module, content: torch.Tensor, style: torch.Tensor,
                   settings: StyleTransferSettings) -> tuple[nn.Sequential, list[StyleLoss], list[ContentLoss]]:
    """The tutorial's ``get_style_model_and_losses`` over copies of the replica's convolutions (same weights,
    plain NCHW layout whatever the engine's levers did to the replica).

    Args:
        content, style: ``(1, 3, H, W)`` / ``(1, 3, H_s, W_s)`` float32 RGB in [0, 1].
    Returns:
        The model (cut after its last loss module), the style and the content loss modules.
    """
    model = nn.Sequential(Normalization(replica.input_mean))
    style_losses, content_losses = [], []
    last_block = 1
    for name, _, _ in CONV_LAYERS:
        block = int(name[4])
        if block != last_block:
            model.add_module(f"pool{last_block}", nn.MaxPool2d(kernel_size=2, stride=2))
            last_block = block
        source = getattr(replica, name)
        conv = nn.Conv2d(source.in_channels, source.out_channels, kernel_size=3, padding=1).to(source.weight.device)
        with torch.no_grad():
            conv.weight.copy_(source.weight.contiguous())
            conv.bias.copy_(source.bias)
        model.add_module(name, conv.to(memory_format=torch.contiguous_format))
        relu = "relu" + name[4:]
        model.add_module(relu, nn.ReLU(inplace=False))
        if relu in settings.content_layers:
            target = _layers_only(model, content).detach()
            loss = ContentLoss(target, settings.content_layers[relu])
            model.add_module(f"content_loss_{relu}", loss)
            content_losses.append(loss)
        if relu in settings.style_layers:
            generated = _layers_only(model, content)
            features = _layers_only(model, style).detach()
            positions = features.shape[2] * features.shape[3]      # G_S * P_G / P_S, as costs.style_gram_target
            target = tutorial_gram_matrix(features) * (generated.shape[2] * generated.shape[3] / positions)
            loss = StyleLoss(target, settings.style_layers[relu])
            model.add_module(f"style_loss_{relu}", loss)
            style_losses.append(loss)
        if len(style_losses) == len(settings.style_layers) and len(content_losses) == len(settings.content_layers):
            break
    return model.eval().requires_grad_(False), style_losses, content_losses


def run_tutorial(models: StyleModels, content_image: Image.Image, style_image: Image.Image,
                 settings: StyleTransferSettings, iterations: int) -> Trace:
    """The tutorial's ``run_style_transfer`` for exactly ``iterations`` evaluations (one per iteration).

    Returns:
        The trace; ``totals`` are ``alpha J_content + beta J_style`` of each evaluated image (the seed's costs).
    """
    trace = Trace("tutorial")
    device = models.device
    started = time.perf_counter()
    content = to_tensor(resize_to_max_side(content_image, settings.max_side_px)).to(device)
    style = to_tensor(resize_to_max_side(style_image, settings.max_side_px)).to(device)
    model, style_losses, content_losses = tutorial_model(models.replica, content, style, settings)
    input_img = content.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([input_img])
    run = [0]

    def closure() -> torch.Tensor:
        if run[0] >= iterations:
            raise _Done
        with torch.no_grad():
            input_img.clamp_(0, 1)
        optimizer.zero_grad()
        model(input_img)
        style_score = settings.style_weight * sum(loss.loss for loss in style_losses)
        content_score = settings.content_weight * sum(loss.loss for loss in content_losses)
        loss = style_score + content_score
        loss.backward()
        run[0] += 1
        sync(device)
        trace.times_s.append(time.perf_counter() - started)
        trace.totals.append(loss.item())
        return loss

    with contextlib.suppress(_Done):
        while run[0] <= iterations:
            optimizer.step(closure)
    with torch.no_grad():
        input_img.clamp_(0, 1)
    trace.job_s = time.perf_counter() - started
    return trace
