"""Labelled image data for ``evaluate`` (and calibration): readers, batches, preprocessing.

DATA is one of two forms:

- an ``.npz`` file with ``images`` -- ``uint8`` N x H x W x C (pixels, HWC, RGB) or a
  float N x C x H x W array -- and ``labels`` (N integer class indices); an optional
  ``classes`` array names the classes;
- a folder with one subfolder of images per class, the layout torchvision's
  ``ImageFolder`` reads: classes are the subfolders in sorted order, their images any file
  Pillow reads with an image suffix (``.png``, ``.jpg``, ...), converted to RGB.

:class:`Preprocess` is the transform from those images to the model's input: resize the
shorter side, centre crop, scale integer pixels, subtract a per-channel mean and divide
by a per-channel std, then lay out as NCHW or NHWC. It has presets (``cifar10``,
``imagenet``, ``none``) and is stored in a package's manifest (``convert --preprocess``)
as :meth:`Preprocess.to_dict`, so ``evaluate`` and calibration use the same transform.

Bad data is one :class:`~structexport.errors.StructExportError` with its own exit code
(47-51): wrong image size, labels that are not class indices of the model, an unreadable
file or image, an empty data set, a class count the model's outputs do not have.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from structexport.errors import PathNotFoundError, StructExportError

# The suffixes torchvision's ImageFolder takes (IMG_EXTENSIONS).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataImageSizeError(StructExportError):
    """Images whose size or shape the model cannot take (after preprocessing)."""
    exit_code, kind = 47, "data-image-size"


class DataLabelError(StructExportError):
    """Labels that are not class indices of the model: out of range, not integers, or not
    one per image."""
    exit_code, kind = 48, "data-labels"


class DataUnreadableError(StructExportError):
    """A data file or image that cannot be read (not an .npz, no images/labels arrays, an
    image Pillow cannot decode)."""
    exit_code, kind = 49, "data-unreadable"


class DataEmptyError(StructExportError):
    """No images: an empty folder, a class folder without images, an .npz of 0 images."""
    exit_code, kind = 50, "data-empty"


class DataClassCountError(StructExportError):
    """The data's classes and the model's outputs do not match in number."""
    exit_code, kind = 51, "data-class-count"


DATA_ERRORS = [DataImageSizeError, DataLabelError, DataUnreadableError, DataEmptyError,
               DataClassCountError]


# --------------------------------------------------------------------------- preprocessing

LAYOUTS = ("NCHW", "NHWC")


@dataclass(frozen=True)
class Preprocess:
    """Images -> the model's input. In order: ``resize`` (the shorter side to this many
    pixels, bilinear, as torchvision's ``Resize(int)``), ``crop`` (a centred square of this
    size, as ``CenterCrop``), ``scale`` (multiplies integer pixels -- uint8 arrays and image
    files -- into the float range; float arrays are taken as scaled already), ``mean`` and
    ``std`` (per channel: ``(x - mean) / std``), ``layout`` of the model's input."""
    scale: float = 1 / 255
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "NCHW"
    resize: int | None = None
    crop: int | None = None
    name: str | None = None       # the preset it came from, unchanged (None: given by flags)

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}")
        for field_name in ("mean", "std"):
            value = getattr(self, field_name)
            if value is not None:
                object.__setattr__(self, field_name, tuple(float(v) for v in value))
        if self.std is not None and any(v == 0 for v in self.std):
            raise ValueError("std must not be 0")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values and std {len(self.std)}: give one "
                             "per channel to both")
        for field_name in ("resize", "crop"):
            value = getattr(self, field_name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{field_name} must be a positive size")

    # ------------------------------------------------------------ presets and the manifest
    def to_dict(self) -> dict:
        return {"name": self.name, "scale": self.scale, "mean": list(self.mean) if self.mean else None,
                "std": list(self.std) if self.std else None, "layout": self.layout,
                "resize": self.resize, "crop": self.crop}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k in ("mean", "std") and v is not None else v)
                       for k, v in d.items() if k in known})

    @classmethod
    def preset(cls, name: str) -> "Preprocess":
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown preprocessing preset {name!r} (presets: "
                             f"{', '.join(PRESETS)})") from None

    def replace(self, **changes) -> "Preprocess":
        """A copy with ``changes`` (None values ignored); no longer a preset when any differs."""
        changes = {k: v for k, v in changes.items() if v is not None}
        new = dataclasses.replace(self, **changes, name=None)
        return self if new == dataclasses.replace(self, name=None) else new

    def describe(self) -> str:
        parts = []
        if self.resize:
            parts.append(f"resize {self.resize}")
        if self.crop:
            parts.append(f"centre crop {self.crop}")
        if self.scale != 1:
            parts.append("scale 1/255" if abs(self.scale - 1 / 255) < 1e-12 else f"scale {self.scale:g}")
        if self.mean is not None:
            parts.append(f"mean ({', '.join(f'{v:g}' for v in self.mean)})")
        if self.std is not None:
            parts.append(f"std ({', '.join(f'{v:g}' for v in self.std)})")
        parts.append(self.layout)
        body = ", ".join(parts)
        return f"{self.name} ({body})" if self.name else body

    # ------------------------------------------------------------ the transform
    def spatial(self, height: int, width: int) -> tuple[int, int]:
        """The image size (H, W) after resize and crop, for an input of ``height`` x ``width``."""
        if self.resize:
            height, width = _resized(height, width, self.resize)
        if self.crop:
            height, width = min(self.crop, height), min(self.crop, width)
        return height, width

    def apply_uint8(self, images: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x C pixels -> float32 model input (N x C x H x W or N x H x W x C)."""
        if self.resize or self.crop:
            images = np.stack([self._resize_crop_pixels(img) for img in images])
        x = images.astype(np.float32) * np.float32(self.scale)
        return self._normalize(x, channel_axis=3, to_nchw=True)

    def apply_float(self, images: np.ndarray) -> np.ndarray:
        """float N x C x H x W (scaled already) -> float32 model input."""
        x = images.astype(np.float32, copy=False)
        if self.resize or self.crop:
            x = self._resize_crop_float(x)
        return self._normalize(x, channel_axis=1, to_nchw=False)

    def _normalize(self, x: np.ndarray, channel_axis: int, to_nchw: bool) -> np.ndarray:
        channels = x.shape[channel_axis]
        shape = [1, 1, 1, 1]
        shape[channel_axis] = channels
        for values, what in ((self.mean, "mean"), (self.std, "std")):
            if values is not None and len(values) != channels:
                raise DataImageSizeError(f"the images have {channels} channel(s) and the preprocessing's "
                                         f"{what} has {len(values)} values",
                                         "give one value per channel, or check the data")
        if self.mean is not None:
            x = x - np.asarray(self.mean, np.float32).reshape(shape)
        if self.std is not None:
            x = x / np.asarray(self.std, np.float32).reshape(shape)
        nchw = x.transpose(0, 3, 1, 2) if to_nchw else x       # now N x C x H x W
        out = nchw if self.layout == "NCHW" else nchw.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(out, dtype=np.float32)

    def _resize_crop_pixels(self, img: np.ndarray) -> np.ndarray:
        from PIL import Image
        pil = Image.fromarray(img if img.shape[2] != 1 else img[:, :, 0])
        pil = self._resize_crop_pil(pil)
        arr = np.asarray(pil)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def _resize_crop_pil(self, pil):
        from PIL import Image
        if self.resize:
            h, w = _resized(pil.height, pil.width, self.resize)
            if (h, w) != (pil.height, pil.width):
                pil = pil.resize((w, h), Image.BILINEAR)
        if self.crop:
            top, left = _crop_origin(pil.height, pil.width, self.crop)
            pil = pil.crop((left, top, left + min(self.crop, pil.width), top + min(self.crop, pil.height)))
        return pil

    def _resize_crop_float(self, x: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F
        t = torch.from_numpy(np.ascontiguousarray(x))
        if self.resize:
            h, w = _resized(t.shape[2], t.shape[3], self.resize)
            if (h, w) != tuple(t.shape[2:]):
                t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        if self.crop:
            top, left = _crop_origin(t.shape[2], t.shape[3], self.crop)
            t = t[:, :, top:top + self.crop, left:left + self.crop]
        return t.numpy()


def _resized(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(size): the shorter side becomes ``size``, the aspect ratio kept."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _crop_origin(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's CenterCrop: the top-left corner of a centred ``size`` square."""
    return int(round((height - size) / 2.0)) if height > size else 0, \
        int(round((width - size) / 2.0)) if width > size else 0


PRESETS: dict[str, Preprocess] = {
    # The CSG reference implementation's CIFAR-10 test transform (ToTensor + Normalize).
    "cifar10": Preprocess(scale=1 / 255, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010),
                          layout="NCHW", name="cifar10"),
    # torchvision's ImageNet evaluation transform.
    "imagenet": Preprocess(scale=1 / 255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                           layout="NCHW", resize=256, crop=224, name="imagenet"),
    # Float arrays that are the model's input already (integer pixels are only made float).
    "none": Preprocess(scale=1.0, layout="NCHW", name="none"),
}


# --------------------------------------------------------------------------- data sets

@dataclass
class Batch:
    start: int               # index of the first image in the data set
    x: np.ndarray            # float32, preprocessed, the model's layout
    labels: np.ndarray       # int64


class Dataset:
    """Labelled images, read in batches. ``kind`` is "npz" or "folder"."""
    kind: str = ""
    path: Path
    classes: list[str] | None = None      # class names, where the data names them

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def labels(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(H, W) of the stored images when they all share one (None: they vary)."""
        raise NotImplementedError

    def batches(self, preprocess: Preprocess, batch_size: int, limit: int | None = None) -> Iterator[Batch]:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.path} ({len(self)} images{f', {len(self.classes)} classes' if self.classes else ''})"

    def subset(self, indices) -> "Dataset":
        """The images at ``indices``, in that order (calibration draws a shuffled sample:
        a folder lists its images class by class)."""
        raise NotImplementedError

    # ------------------------------------------------------------ checks against the model
    def check_for(self, preprocess: Preprocess, input_shape, num_classes: int | None,
                  limit: int | None = None) -> None:
        """Everything about the data that can be checked before a model runs: the image size
        after ``preprocess`` against the model's ``input_shape``, the labels and classes
        against its ``num_classes`` outputs."""
        labels = self.labels[:limit] if limit else self.labels
        if num_classes is not None:
            if self.classes is not None and len(self.classes) != num_classes:
                raise DataClassCountError(
                    f"{self.path} has {len(self.classes)} classes and the model has {num_classes} outputs",
                    "evaluate it on data of the classes it was trained on"
                    + (" (one subfolder per class)" if self.kind == "folder" else ""))
            bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
            if bad.size:
                i = int(bad[0])
                raise DataLabelError(
                    f"{self.path}: label {int(labels[i])} of image {i} is not a class of the model, "
                    f"which has {num_classes} outputs (classes 0-{num_classes - 1}); "
                    f"{bad.size} label(s) out of range", "check the labels, or the model")
        if len(input_shape) != 4:
            raise DataImageSizeError(f"the model takes an input of shape {list(input_shape)}, not an "
                                     "image batch", "evaluate image classifiers (N,C,H,W or N,H,W,C)")
        want_c, want_h, want_w = ((input_shape[1], input_shape[2], input_shape[3])
                                  if preprocess.layout == "NCHW"
                                  else (input_shape[3], input_shape[1], input_shape[2]))
        size = self.image_size
        channels = self.channels
        if channels is not None and channels != want_c:
            raise DataImageSizeError(f"{self.path}: the images have {channels} channel(s), the model "
                                     f"takes {want_c}", "check the data and --layout")
        if size is not None:
            got = preprocess.spatial(*size)
            if got != (want_h, want_w):
                how = (f" after preprocessing ({preprocess.describe()})"
                       if preprocess.resize or preprocess.crop else "")
                raise DataImageSizeError(
                    f"{self.path}: the images are {got[0]}x{got[1]}{how}, the model takes "
                    f"{want_h}x{want_w}", "resize them (--resize, --crop) or use data of the model's size")
        self._want = (want_h, want_w)

    @property
    def channels(self) -> int | None:
        return None


class NpzDataset(Dataset):
    kind = "npz"

    def __init__(self, path: Path):
        self.path = path
        try:
            with np.load(path, allow_pickle=False) as data:
                files = set(data.files)
                missing = [k for k in ("images", "labels") if k not in files]
                if missing:
                    raise DataUnreadableError(f"{path} has no {' and no '.join(repr(k) for k in missing)} "
                                              f"array (it holds: {', '.join(sorted(files)) or 'nothing'})",
                                              "write it with numpy.savez(path, images=..., labels=...)")
                images, labels = data["images"], data["labels"]
                classes = data["classes"] if "classes" in files else None
        except DataUnreadableError:
            raise
        except Exception as exc:
            raise DataUnreadableError(f"{path} is not a readable .npz file "
                                      f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})",
                                      "write it with numpy.savez(path, images=..., labels=...)") from None
        if images.ndim != 4:
            raise DataImageSizeError(f"{path}: 'images' has shape {list(images.shape)}; need N x H x W x C "
                                     "uint8 pixels or N x C x H x W floats",
                                     "add the channel axis (e.g. images[..., None] for grayscale)")
        if images.dtype == np.uint8:
            self.form = "uint8 NHWC"
        elif np.issubdtype(images.dtype, np.floating):
            self.form = "float NCHW"
        else:
            raise DataUnreadableError(f"{path}: 'images' is {images.dtype}; need uint8 pixels (N x H x W x C) "
                                      "or floats (N x C x H x W)", "convert the array")
        if len(images) == 0:
            raise DataEmptyError(f"{path} holds no images", "evaluate on a data set with images")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataLabelError(f"{path}: 'labels' has shape {list(labels.shape)} for {len(images)} images",
                                 "give one class index per image")
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataLabelError(f"{path}: 'labels' is {labels.dtype}; need integer class indices",
                                 "store them as integers (e.g. labels.astype(np.int64))")
        self.images = images
        self._labels = labels.astype(np.int64)
        self.classes = [str(c) for c in classes.tolist()] if classes is not None else None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.images.shape[1], self.images.shape[2]) if self.form == "uint8 NHWC" \
            else (self.images.shape[2], self.images.shape[3])

    @property
    def channels(self) -> int:
        return self.images.shape[3] if self.form == "uint8 NHWC" else self.images.shape[1]

    def batches(self, preprocess: Preprocess, batch_size: int, limit: int | None = None) -> Iterator[Batch]:
        n = min(len(self), limit) if limit else len(self)
        for start in range(0, n, batch_size):
            chunk = self.images[start:min(n, start + batch_size)]
            x = (preprocess.apply_uint8(chunk) if self.form == "uint8 NHWC"
                 else preprocess.apply_float(chunk))
            yield Batch(start, x, self._labels[start:start + len(chunk)])


    def subset(self, indices) -> "NpzDataset":
        out = copy.copy(self)
        indices = np.asarray(indices, dtype=np.int64)
        out.images, out._labels = self.images[indices], self._labels[indices]
        return out


class FolderDataset(Dataset):
    """torchvision's ImageFolder layout: ``root/<class>/<image>``, classes sorted by name."""
    kind = "folder"
    form = "image files"

    def __init__(self, path: Path):
        self.path = path
        classes = sorted(e.name for e in os.scandir(path) if e.is_dir())
        if not classes:
            files = [e.name for e in os.scandir(path) if e.is_file()]
            raise DataEmptyError(f"{path} has no class subfolders"
                                 + (f" (it holds {len(files)} file(s) directly)" if files else " (it is empty)"),
                                 "put each class's images in a subfolder of its own: DATA/<class>/<image>")
        samples: list[tuple[Path, int]] = []
        for index, name in enumerate(classes):
            found = sorted(p for p in (path / name).rglob("*")
                           if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise DataEmptyError(f"{path}/{name} holds no images ({', '.join(IMAGE_SUFFIXES)})",
                                     "remove the empty class folder or add its images")
            samples += [(p, index) for p in found]
        self.classes = classes
        self.samples = samples
        self._labels = np.array([label for _, label in samples], dtype=np.int64)
        self._first_size = None

    def __len__(self) -> int:
        return len(self.samples)

    def subset(self, indices) -> "FolderDataset":
        out = copy.copy(self)
        out.samples = [self.samples[int(i)] for i in indices]
        out._labels = self._labels[np.asarray(indices, dtype=np.int64)]
        return out

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def image_size(self) -> tuple[int, int] | None:
        if self._first_size is None:
            img = self._read(self.samples[0][0])
            self._first_size = img.shape[:2]
        return self._first_size

    @property
    def channels(self) -> int:
        return 3        # images are converted to RGB

    def _read(self, path: Path, preprocess: Preprocess | None = None) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(path) as img:
                pil = img.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise DataUnreadableError(f"{path} is not an image Pillow can read "
                                      f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:100]})",
                                      "remove or replace the file") from None
        if preprocess is not None and (preprocess.resize or preprocess.crop):
            pil = preprocess._resize_crop_pil(pil)
        return np.asarray(pil, dtype=np.uint8)

    def batches(self, preprocess: Preprocess, batch_size: int, limit: int | None = None) -> Iterator[Batch]:
        n = min(len(self), limit) if limit else len(self)
        want = getattr(self, "_want", None)
        for start in range(0, n, batch_size):
            pixels = []
            for path, _ in self.samples[start:min(n, start + batch_size)]:
                img = self._read(path, preprocess)
                if want is not None and img.shape[:2] != tuple(want):
                    raise DataImageSizeError(
                        f"{path} is {img.shape[0]}x{img.shape[1]}"
                        f"{' after resize and crop' if preprocess.resize or preprocess.crop else ''}, "
                        f"the model takes {want[0]}x{want[1]}",
                        "resize the images (--resize, --crop) or remove the file")
                pixels.append(img)
            plain = dataclasses.replace(preprocess, resize=None, crop=None)   # done per image above
            x = plain.apply_uint8(np.stack(pixels))
            yield Batch(start, x, self._labels[start:start + len(pixels)])


def open_dataset(path: str | os.PathLike) -> Dataset:
    """DATA -> a :class:`Dataset`: an ``.npz`` file or an ImageFolder-style folder."""
    path = Path(path)
    if not path.exists():
        raise PathNotFoundError(f"{path} does not exist",
                                "pass an .npz with images and labels, or a folder of class subfolders")
    if path.is_dir():
        return FolderDataset(path)
    if path.stat().st_size == 0:
        raise DataEmptyError(f"{path} is an empty file", "pass an .npz with images and labels")
    return NpzDataset(path)
