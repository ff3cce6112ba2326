"""Feature visualisation by activation maximisation (Olah et al., "Feature Visualization", Distill 2017).

Images are optimised in a batch, one objective per batch element, so many channels are visualised together.

- **Objectives** (batched: element ``i`` of the batch maximises its own target): :func:`neuron` (the centre unit of
  a channel), :func:`channel` (a channel's mean), :func:`deepdream` (a layer's mean squared activation),
  :func:`class_logit` (pre-softmax), :func:`class_probability` (post-softmax), :func:`diversity` (a penalty on the
  similarity of the batch's Gram matrices); objectives add and scale: ``channel(...) + 0.5 * deepdream(...)``.
- **Parameterisations**: ``"pixel"`` (raw pixels through a sigmoid) and ``"fft"`` (a Fourier spectrum scaled by
  1/frequency, with decorrelated colour, through a sigmoid); images live in [0, 1] and are mapped to the model's
  input space by ``(image - 0.5) / 0.25 * input_std + input_mean`` (per channel).
- **Transforms** before each step, from a private generator: padding, jitter, random scale, random rotation.
- **Regularisers**: L2 and total variation on the image; a periodic Gaussian blur of pixel parameters.
- For the first quarter of the steps, ``nn.ReLU`` modules pass "redirected" gradients (Lucid's trick), so a channel
  that is off everywhere on the starting noise still receives a gradient.

The model's parameters are frozen during the optimisation (never updated, never given a ``.grad``); only the image
parameters are optimised (Adam). The model's train/eval mode is the caller's business: use eval mode.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_viz._hooks import capture
from lightning_viz.functional._autograd import gradient_context, relu_backward_rule

PARAMETERISATIONS = ("pixel", "fft")
OBJECTIVES = ("neuron", "channel", "deepdream", "class_logit", "class_probability")

# Lucid's colour decorrelation: the square root of ImageNet's colour covariance, normalised.
_COLOUR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
_COLOUR_SQRT = _COLOUR_SQRT / _COLOUR_SQRT.norm(dim=0).max()


# ------------------------------------------------------------------------------------------------ objectives
@dataclass
class Objective:
    """A per-image score to maximise: ``fn(activations, logits) -> (N,)``, with the layers it reads."""

    fn: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]
    layers: tuple[str, ...] = field(default_factory=tuple)
    name: str = "objective"

    def __call__(self, acts: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        return self.fn(acts, logits)

    def __add__(self, other: Objective) -> Objective:
        return Objective(
            lambda a, lg: self(a, lg) + other(a, lg),
            tuple(dict.fromkeys(self.layers + other.layers)),
            f"{self.name} + {other.name}",
        )

    def __mul__(self, weight: float) -> Objective:
        return Objective(lambda a, lg: weight * self(a, lg), self.layers, f"{weight} * {self.name}")

    __rmul__ = __mul__


def _per_image(index: Sequence[int] | int, n: int, device: torch.device) -> torch.Tensor:
    idx = torch.as_tensor(index, device=device).long().flatten()
    return idx.expand(n) if idx.numel() == 1 else idx


def channel(layer: str, channels: Sequence[int] | int) -> Objective:
    """Mean activation of channel ``channels[i]`` for image ``i``."""

    def fn(acts, logits):
        a = acts[layer]
        c = _per_image(channels, len(a), a.device)
        return a[torch.arange(len(a), device=a.device), c].flatten(1).mean(1)

    return Objective(fn, (layer,), f"channel {layer}")


def neuron(layer: str, channels: Sequence[int] | int) -> Objective:
    """The centre unit of channel ``channels[i]`` for image ``i``."""

    def fn(acts, logits):
        a = acts[layer]
        c = _per_image(channels, len(a), a.device)
        rows = torch.arange(len(a), device=a.device)
        return a[rows, c, a.shape[2] // 2, a.shape[3] // 2] if a.ndim == 4 else a[rows, c]

    return Objective(fn, (layer,), f"neuron {layer}")


def deepdream(layer: str) -> Objective:
    """The layer's mean squared activation ("DeepDream")."""
    return Objective(lambda acts, logits: acts[layer].pow(2).flatten(1).mean(1), (layer,), f"deepdream {layer}")


def class_logit(classes: Sequence[int] | int) -> Objective:
    """The pre-softmax score of class ``classes[i]``."""

    def fn(acts, logits):
        return logits.gather(1, _per_image(classes, len(logits), logits.device).view(-1, 1)).squeeze(1)

    return Objective(fn, (), "class logit")


def class_probability(classes: Sequence[int] | int) -> Objective:
    """The softmax probability of class ``classes[i]`` (tends to look worse than the logit: it can rise by lowering
    the other classes)."""

    def fn(acts, logits):
        probs = logits.softmax(dim=1)
        return probs.gather(1, _per_image(classes, len(logits), logits.device).view(-1, 1)).squeeze(1)

    return Objective(fn, (), "class probability")


def diversity(layer: str) -> Objective:
    """Minus the mean cosine similarity of each image's Gram matrix to the others' (Olah et al.'s diversity term):
    maximising it pushes the images of a batch apart. Add it, weighted, to an objective that all images share."""

    def fn(acts, logits):
        a = acts[layer]
        flat = a.flatten(2)
        gram = F.normalize((flat @ flat.transpose(1, 2)).flatten(1), dim=1)
        sim = gram @ gram.T
        n = len(a)
        if n < 2:
            return torch.zeros(n, device=a.device)
        return -(sim.sum(1) - sim.diagonal()) / (n - 1)

    return Objective(fn, (layer,), f"diversity {layer}")


# ------------------------------------------------------------------------------------------ parameterisations
class _Image(nn.Module):
    """Image parameters; ``forward()`` returns images in [0, 1], (N, C, H, W)."""

    def __init__(
        self, n: int, channels: int, size: tuple[int, int], kind: str, generator: torch.Generator, decay: float = 1.0
    ):
        super().__init__()
        if kind not in PARAMETERISATIONS:
            raise ValueError(f"`param` must be one of {list(PARAMETERISATIONS)}, got {kind!r}.")
        (h, w), side = size, max(size)
        self.kind, self.size, self.channels = kind, (h, w), channels
        if kind == "pixel":
            self.param = nn.Parameter(0.01 * torch.randn(n, channels, h, w, generator=generator))
        else:
            fy = torch.fft.fftfreq(h).view(-1, 1)
            fx = torch.fft.rfftfreq(w).view(1, -1)
            freqs = (fy**2 + fx**2).sqrt()
            self.register_buffer("scale", 1.0 / freqs.clamp_min(1.0 / side) ** decay * side**0.5 / side)
            self.param = nn.Parameter(0.01 * torch.randn(n, channels, h, w // 2 + 1, 2, generator=generator))

    def forward(self) -> torch.Tensor:
        if self.kind == "pixel":
            return torch.sigmoid(self.param)
        spectrum = torch.view_as_complex(self.param) * self.scale
        image = torch.fft.irfft2(spectrum, s=self.size, norm="ortho") * 4.0
        if self.channels == 3:  # decorrelated colour: independent components mixed into correlated RGB
            image = torch.einsum("nchw,dc->ndhw", image, _COLOUR_SQRT.to(image.device))
        return torch.sigmoid(image)


# ------------------------------------------------------------------------------------------------- transforms
@dataclass
class Transforms:
    """Random transforms applied before each step (Olah et al.'s "transformation robustness").

    With ``crop`` the padded, jittered, scaled and rotated image is cropped back to the size it had (its centre), as
    Lucid does for models with a fixed input size: the model always sees images of the size being optimised (a ViT
    with fixed position embeddings, a ``Flatten`` head). :class:`~lightning_viz.FeatureVisMonitor` always crops.
    """

    pad: int = 4
    jitter: int = 4
    scales: tuple[float, ...] = (0.95, 1.0, 1.05)
    angles: tuple[float, ...] = (-5.0, 0.0, 5.0)
    crop: bool = False

    def min_size(self) -> int:
        """The smallest image side the transforms leave something of."""
        return 2 * self.jitter + 8 if self.crop else 2 * (self.pad + self.jitter) + 8

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        def pick(options):
            return options[int(torch.randint(len(options), (1,), generator=generator))]

        x = F.pad(images, [self.pad] * 4, mode="constant", value=0.5) if self.pad else images
        if self.jitter:
            dy, dx = (int(v) for v in torch.randint(-self.jitter, self.jitter + 1, (2,), generator=generator))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        scale, angle = pick(self.scales), pick(self.angles)
        if scale != 1.0 or angle != 0.0:
            theta = math.radians(angle)
            matrix = torch.tensor(
                [
                    [math.cos(theta) / scale, -math.sin(theta) / scale, 0.0],
                    [math.sin(theta) / scale, math.cos(theta) / scale, 0.0],
                ],
                dtype=x.dtype,
                device=x.device,
            ).expand(len(x), 2, 3)
            grid = F.affine_grid(matrix, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
        if self.crop and self.pad:
            h, w = images.shape[-2:]
            x = x[..., self.pad : self.pad + h, self.pad : self.pad + w]
        return x


def _blur(param: torch.Tensor) -> None:
    """In-place 3x3 Gaussian blur of pixel parameters (the "periodic blur" regulariser)."""
    kernel = torch.tensor([1.0, 2.0, 1.0], device=param.device)
    kernel = (kernel[:, None] * kernel[None]) / 16
    c = param.shape[1]
    weight = kernel.expand(c, 1, 3, 3)
    with torch.no_grad():
        param.copy_(F.conv2d(F.pad(param, [1] * 4, mode="replicate"), weight, groups=c))


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels, per image. (N, C, H, W) -> (N,)."""
    dy = (images[:, :, 1:] - images[:, :, :-1]).abs().flatten(1).mean(1)
    dx = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().flatten(1).mean(1)
    return dy + dx


# --------------------------------------------------------------------------------------------- optimisation
@dataclass
class VisResult:
    images: torch.Tensor  #: (N, C, H, W) in [0, 1]
    objective: torch.Tensor  #: (N,) final objective values (without transforms or regularisers)
    initial_objective: torch.Tensor  #: (N,) objective values of the starting images


def visualize(
    model: nn.Module,
    objective: Objective,
    *,
    n: int,
    size: int | tuple[int, int] = 64,
    channels: int = 3,
    param: str = "fft",
    steps: int = 128,
    lr: float = 0.05,
    transforms: Transforms | None = None,
    l2: float = 0.0,
    tv: float = 0.0,
    blur_every: int = 0,
    generator: torch.Generator | None = None,
    input_mean: torch.Tensor | float = 0.0,
    input_std: torch.Tensor | float = 1.0,
    modules: dict[str, nn.Module] | None = None,
    views: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> VisResult:
    """Optimise ``n`` images to maximise ``objective`` (each image its own target).

    Args:
        model: the network (in eval mode); its parameters are frozen for the duration.
        objective: what to maximise, see the objective constructors above.
        n: batch size (one image per target).
        size, channels: image geometry: a side, or (height, width) (a model's fixed input size).
        param: ``"fft"`` (decorrelated, the default) or ``"pixel"``.
        steps, lr: Adam steps and learning rate.
        transforms: random transforms per step (default :class:`Transforms`; ``Transforms(0, 0, (1.0,), (0.0,))`` for
            none).
        l2, tv: weights of the L2 and total-variation penalties; blur_every: blur pixel parameters every k steps.
        generator: source of the starting noise and the transforms (same seed, same weights -> same images).
        input_mean, input_std: per-channel statistics of the model's input (images in [0, 1] are mapped to them).
        modules: name -> module for the layers the objective reads (default: looked up in ``model``).
        views: name -> a function that turns that layer's output into channels-first maps before the objective
            reads it, e.g. a ViT's tokens laid out on the patch grid (:func:`~lightning_viz._layers.spatial_view`).
    """
    transforms = transforms if transforms is not None else Transforms()
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if min(size) < transforms.min_size():
        raise ValueError(
            f"`size`={size[0] if size[0] == size[1] else size} is too small for the transforms "
            f"(pad {transforms.pad}, jitter {transforms.jitter}); "
            f"use at least {transforms.min_size()}."
        )
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    device = next(model.parameters(), torch.zeros(())).device
    named = dict(model.named_modules())
    modules = modules or {}
    layer_modules = []
    for name in objective.layers:
        module = modules.get(name, named.get(name))
        if module is None:
            raise ValueError(f"the objective reads layer {name!r}, which the model does not have.")
        layer_modules.append(module)
    mean = torch.as_tensor(input_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.as_tensor(input_std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    image = _Image(n, channels, size, param, generator).to(device)
    optimizer = torch.optim.Adam(image.parameters(), lr=lr)

    def evaluate(x: torch.Tensor) -> torch.Tensor:
        with capture(layer_modules, keep="last") as captured:
            logits = model((x - 0.5) / 0.25 * std + mean)
        acts = {name: outs[-1] for name, outs in zip(objective.layers, captured)}
        acts = {name: views[name](a) if views and name in views else a for name, a in acts.items()}
        return objective(acts, logits)

    with gradient_context(model):
        with torch.no_grad():
            initial = evaluate(image()).detach()
        for step in range(steps):
            # The first quarter of the steps redirects ReLU gradients, so channels that start switched off can start.
            redirect = relu_backward_rule(model, "redirected") if step < steps // 4 else contextlib.nullcontext()
            x = image()
            with redirect:
                score = evaluate(transforms(x, generator))
            loss = -score.sum()
            if l2:
                loss = loss + l2 * (x - 0.5).pow(2).flatten(1).mean(1).sum()
            if tv:
                loss = loss + tv * total_variation(x).sum()
            grads = torch.autograd.grad(loss, list(image.parameters()))
            for p, g in zip(image.parameters(), grads):
                p.grad = g
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if blur_every and param == "pixel" and (step + 1) % blur_every == 0:
                _blur(image.param)
        with torch.no_grad():
            final_images = image().detach()
            final = evaluate(final_images).detach()
    return VisResult(final_images.cpu(), final.cpu(), initial.cpu())
