"""Image encoders for ``lgmrec extract``: torchvision-layout ResNet backbones and ImageNet pre-processing.

torchvision cannot be imported beside the CPU torch build this project pins, so the ResNet family is
defined here in plain torch with torchvision's module layout and ``state_dict`` key names: a
``resnet50-*.pth`` saved by torchvision (or ``model.state_dict()`` of a fine-tuned torchvision ResNet)
loads unchanged. The classifier (``fc``) is dropped: the features are the global-average-pooled
output of ``layer4`` (the penultimate layer: 512-d for resnet18/34, 2048-d for resnet50 and up).
Pre-processing is torchvision's ImageNet recipe: ``Resize(256)`` (bilinear, shorter side), ``CenterCrop(224)``,
scale to [0, 1], normalise with the ImageNet mean and std. Decoding uses Pillow (extra ``[image]``). Weights
come from a file the user names; nothing is downloaded.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from lgmrec_dist.dataset import DatasetError

RESIZE = 256
CROP = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _torch():
    import torch
    return torch


def _conv3x3(nn, inp, out, stride=1, groups=1, dilation=1):
    return nn.Conv2d(inp, out, 3, stride=stride, padding=dilation, groups=groups, bias=False, dilation=dilation)


def _conv1x1(nn, inp, out, stride=1):
    return nn.Conv2d(inp, out, 1, stride=stride, bias=False)


def _make_blocks():
    torch = _torch()
    nn = torch.nn

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
            super().__init__()
            self.conv1 = _conv3x3(nn, inplanes, planes, stride)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = _conv3x3(nn, planes, planes)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample = downsample
            self.stride = stride

        def forward(self, x):
            identity = x
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            if self.downsample is not None:
                identity = self.downsample(x)
            return self.relu(out + identity)

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64):
            super().__init__()
            width = int(planes * (base_width / 64.0)) * groups
            self.conv1 = _conv1x1(nn, inplanes, width)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = _conv3x3(nn, width, width, stride, groups)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = _conv1x1(nn, width, planes * self.expansion)
            self.bn3 = nn.BatchNorm2d(planes * self.expansion)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = downsample
            self.stride = stride

        def forward(self, x):
            identity = x
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            if self.downsample is not None:
                identity = self.downsample(x)
            return self.relu(out + identity)

    class ResNet(nn.Module):
        """torchvision.models.ResNet (v1.5: stride on the 3x3 conv), same attribute names, ``fc`` kept
        so that a full torchvision state_dict loads; :meth:`features` stops before ``fc``."""

        def __init__(self, block, layers, num_classes=1000, groups=1, width_per_group=64):
            super().__init__()
            self.inplanes = 64
            self.groups = groups
            self.base_width = width_per_group
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.layer1 = self._make_layer(block, 64, layers[0])
            self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
            self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
            self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * block.expansion, num_classes)
            self.feature_dim = 512 * block.expansion
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

        def _make_layer(self, block, planes, blocks, stride=1):
            downsample = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                downsample = nn.Sequential(_conv1x1(nn, self.inplanes, planes * block.expansion, stride),
                                           nn.BatchNorm2d(planes * block.expansion))
            layers = [block(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
            self.inplanes = planes * block.expansion
            for _ in range(1, blocks):
                layers.append(block(self.inplanes, planes, groups=self.groups, base_width=self.base_width))
            return nn.Sequential(*layers)

        def features(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return torch.flatten(self.avgpool(x), 1)

        def forward(self, x):
            return self.fc(self.features(x))

    return BasicBlock, Bottleneck, ResNet


# name -> (block, layers, groups, width_per_group), as in torchvision.models
RESNET_ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2), 1, 64),
    "resnet34": ("basic", (3, 4, 6, 3), 1, 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 1, 64),
    "resnet101": ("bottleneck", (3, 4, 23, 3), 1, 64),
    "resnet152": ("bottleneck", (3, 8, 36, 3), 1, 64),
    "resnext50_32x4d": ("bottleneck", (3, 4, 6, 3), 32, 4),
    "resnext101_32x8d": ("bottleneck", (3, 4, 23, 3), 32, 8),
    "resnext101_64x4d": ("bottleneck", (3, 4, 23, 3), 64, 4),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 1, 128),
    "wide_resnet101_2": ("bottleneck", (3, 4, 23, 3), 1, 128),
}


def build_resnet(arch: str, num_classes: int = 1000, device=None):
    """A torchvision-compatible ResNet (random init). ``device='meta'`` builds it without memory."""
    if arch not in RESNET_ARCHS:
        raise DatasetError(f"unknown image architecture {arch!r}; known: {', '.join(RESNET_ARCHS)}")
    torch = _torch()
    basic, bottleneck, resnet = _make_blocks()
    kind, layers, groups, wpg = RESNET_ARCHS[arch]
    with torch.device(device or "cpu"):
        return resnet(basic if kind == "basic" else bottleneck, list(layers), num_classes=num_classes,
                      groups=groups, width_per_group=wpg)


def _backbone_shapes(arch: str) -> dict[str, tuple]:
    model = build_resnet(arch, device="meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("fc.")}


def read_state_dict(path: str | Path) -> dict:
    """A ResNet state_dict from a ``.pth``/``.pt`` file (plain, or under ``state_dict``/``model``; a DDP
    ``module.`` prefix is stripped). Only tensors are loaded (``weights_only``): no code runs."""
    torch = _torch()
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"image model weights {str(path)!r} do not exist (give a local .pth file; "
                           "nothing is downloaded)")
    if not path.is_file():
        raise DatasetError(f"image model weights {str(path)!r} is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DatasetError(f"cannot read image model weights {str(path)!r} as a torch state_dict: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DatasetError(f"image model weights {str(path)!r} do not hold a state_dict (a dict of tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def match_arch(state: dict, arch: str) -> list[str]:
    """Problems that keep ``state`` from loading into ``arch`` (empty when it fits); ``fc`` is ignored."""
    want = _backbone_shapes(arch)
    have = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("fc.")}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {have[k]} vs {arch} {want[k]})")
    return problems


def detect_arch(state: dict, path: str | Path, arch: str | None = None) -> str:
    """The ResNet variant whose state_dict ``state`` is; with ``arch`` given, check that one only."""
    if arch is not None:
        if arch not in RESNET_ARCHS:
            raise DatasetError(f"unknown image architecture {arch!r}; known: {', '.join(RESNET_ARCHS)}")
        problems = match_arch(state, arch)
        if problems:
            raise DatasetError(f"image model weights {str(path)!r} do not fit the {arch} architecture: "
                               + "; ".join(problems))
        return arch
    # cheap pre-filter on the block type and depth, then an exact check of every shape
    bottleneck = "layer1.0.conv3.weight" in state
    depth = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    for name, (kind, layers, _, _) in RESNET_ARCHS.items():
        if (kind == "bottleneck") == bottleneck and tuple(layers) == depth and not match_arch(state, name):
            return name
    raise DatasetError(f"image model weights {str(path)!r} hold no torchvision ResNet state_dict this tool "
                       f"knows ({', '.join(RESNET_ARCHS)}); sample keys: {', '.join(list(state)[:4])}")


class ImageEncoder:
    """Penultimate-layer (pooled ``layer4``) features of a torchvision-compatible ResNet."""

    def __init__(self, weights: str | Path, arch: str | None = None, device: str = "cpu"):
        torch = _torch()
        state = read_state_dict(weights)
        self.arch = detect_arch(state, weights, arch)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        model = build_resnet(self.arch)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("fc.")]:  # match_arch said it fits
            raise DatasetError(f"image model weights {str(weights)!r} do not load into {self.arch}")
        model.fc = torch.nn.Identity()
        self.model = model.eval().to(device)
        self.device = device
        self.dim = int(model.feature_dim)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """``pixels``: uint8 (n, CROP, CROP, 3) from :func:`preprocess_image`."""
        torch = _torch()
        if len(pixels) == 0:
            return np.zeros((0, self.dim), np.float32)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            x = (x - self.mean) / self.std
            out = self.model.features(x)
        return np.ascontiguousarray(out.float().cpu().numpy(), dtype=np.float32)


def preprocess_image(data: bytes) -> np.ndarray:
    """torchvision's ``Resize(256)`` + ``CenterCrop(224)`` on a decoded RGB image -> uint8 (224, 224, 3).

    Raises on anything Pillow cannot decode.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ValueError("empty image")
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = RESIZE, int(RESIZE * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.BILINEAR)
        top = round((new_h - CROP) / 2.0)  # as torchvision's center_crop
        left = round((new_w - CROP) / 2.0)
        img = img.crop((left, top, left + CROP, top + CROP))
        arr = np.asarray(img, dtype=np.uint8)
    if arr.shape != (CROP, CROP, 3):
        raise ValueError(f"unexpected decoded shape {arr.shape}")
    return arr


def load_image_bytes(value, image_root: str | None) -> bytes:
    """Bytes of one image cell: bytes as they are, a string as a file path (relative to ``image_root``)."""
    if value is None:
        raise ValueError("null")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    path = Path(str(value)).expanduser()
    if not path.is_absolute() and image_root:
        path = Path(image_root) / path
    return path.read_bytes()
