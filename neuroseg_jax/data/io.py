"""Reading microscopy images and masks from disk, and intensity normalisation.

Supported: PNG, JPEG, BMP (OpenCV) and TIFF (tifffile, single- and multi-page), 8/16-bit
integer or float, gray, RGB or RGBA. Images come out as float32 (H, W, C) in [0, 1]; masks as
int32 (H, W) in {0, 1}.

Mask rule (documented, checked on every read):
  * bool, or integer values within {0, 1}: binary.
  * integer values within {0, dtype max} (e.g. {0, 255} uint8, {0, 65535} uint16): binary.
  * other non-negative integers: instance labels, foreground = label > 0 ... unless the dtype
    maximum (255 / 65535) occurs together with other non-zero values (e.g. {0, 128, 255}):
    that is a binary mask damaged by lossy compression or anti-aliasing, or a grey "ignore"
    class, and is rejected.
  * negative values, floats other than exactly {0.0, 1.0}, multi-channel masks whose channels
    differ: rejected.

Pixel size (`read_pixel_size`): from ImageJ TIFF metadata (the `unit` entry of the description
and the XResolution / YResolution tags, pixels per unit) or OME-XML (PhysicalSizeX/Y with their
units), converted to micrometres. Plain TIFF resolution tags (inch / centimetre) are not read:
most software writes a screen or print resolution (72 dpi) there, not the microscope's.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import cv2
import numpy as np
import tifffile

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
CHANNEL_REDUCTIONS = ("max", "mean", "luminance", "red", "green", "blue")
NORMALIZATIONS = ("percentile", "minmax", "dtype", "none")
# ITU-R BT.601 luma weights, R, G, B.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# np.percentile of a 2 Mpx image costs ~40 ms; a regular sub-grid of ~250k pixels gives the
# same percentiles to within a grey level and keeps the result deterministic.
_PERCENTILE_MAX_PIXELS = 1 << 18


class ImageReadError(ValueError):
    """A file could not be decoded or its content breaks the documented rules."""


# Micrometres per unit, keyed by the lower-case spellings ImageJ, OME and users write.
_MICROMETRES_PER_UNIT = {
    "um": 1.0, "µm": 1.0, "μm": 1.0, "\\u00b5m": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0,
    "micrometre": 1.0, "micrometers": 1.0, "micrometres": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3, "nanometers": 1e-3, "nanometres": 1e-3,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3, "millimeters": 1e3, "millimetres": 1e3,
    "cm": 1e4, "m": 1e6, "inch": 25400.0,
}
# What ImageJ writes for an uncalibrated image.
_UNCALIBRATED_UNITS = ("", "pixel", "pixels", "px")


def to_micrometres(size: float, unit: str, *, source: str) -> float:
    """``size`` in ``unit`` as micrometres; an unknown unit or a size <= 0 raises a ValueError
    naming ``source`` (the file, flag or config key it came from)."""
    factor = _MICROMETRES_PER_UNIT.get(str(unit).strip().lower())
    if factor is None:
        raise ValueError(f"{source}: pixel size unit {unit!r} is not supported; expected a length unit such as "
                         f"'um', 'µm', 'micron', 'nm' or 'mm'")
    if not float(size) > 0:
        raise ValueError(f"{source}: pixel size must be > 0, got {size!r} {unit}")
    return float(size) * factor


def _ome_pixel_size(ome_xml: str, source: str) -> tuple[float, float] | None:
    """(y, x) micrometres of the first OME image's Pixels element, or None without PhysicalSize."""
    pixels = next((element for element in ElementTree.fromstring(ome_xml).iter()
                   if element.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    size_x = to_micrometres(float(pixels.get("PhysicalSizeX")), pixels.get("PhysicalSizeXUnit", "µm"), source=source)
    if "PhysicalSizeY" not in pixels.attrib:
        return size_x, size_x
    size_y = to_micrometres(float(pixels.get("PhysicalSizeY")), pixels.get("PhysicalSizeYUnit", "µm"), source=source)
    return size_y, size_x


def read_pixel_size(path: str | os.PathLike) -> tuple[float, float, str] | None:
    """(size_y, size_x, 'um') of a TIFF's pixels from its OME-XML or ImageJ metadata, or None
    when the file does not say (uncalibrated TIFFs, PNG, JPEG, BMP).

    Raises ImageReadError naming the file and the unit for a unit that is not a known length
    (e.g. 'sec'), and for an unreadable TIFF.
    """
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_ome and tif.ome_metadata:
                size = _ome_pixel_size(tif.ome_metadata, str(path))
                return None if size is None else (*size, "um")
            imagej = tif.imagej_metadata or {}
            page = tif.pages.first
            resolution = page.resolution if "XResolution" in page.tags else None
    except ValueError as error:
        raise ImageReadError(str(error)) from error
    except Exception as error:  # tifffile raises many exception types for broken files
        raise ImageReadError(f"{path}: cannot read TIFF metadata ({error})") from error
    unit = str(imagej.get("unit", "")).strip()
    if unit.lower() in _UNCALIBRATED_UNITS or resolution is None:
        return None
    pixels_per_unit_x, pixels_per_unit_y = (float(value) for value in resolution)
    if not (pixels_per_unit_x > 0 and pixels_per_unit_y > 0):
        raise ImageReadError(f"{path}: TIFF resolution {resolution} is not positive")
    try:
        return (to_micrometres(1.0 / pixels_per_unit_y, unit, source=str(path)),
                to_micrometres(1.0 / pixels_per_unit_x, unit, source=str(path)), "um")
    except ValueError as error:
        raise ImageReadError(str(error)) from error


def _read_tiff(path: Path, page: int | str) -> np.ndarray:
    """Read a TIFF as (H, W) or (H, W, C); extra axes (Z, T, pages) are reduced by `page`."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        array = series.asarray()
        axes = series.axes
    if array.ndim == 2:
        return array
    channel_axes = [i for i, a in enumerate(axes) if a in "SC"]
    spatial = [axes.index("Y"), axes.index("X")] if "Y" in axes and "X" in axes else None
    if spatial is None:
        raise ImageReadError(f"{path}: TIFF axes {axes!r} have no Y and X")
    other = [i for i in range(array.ndim) if i not in spatial and i not in channel_axes[:1]]
    order = other + spatial + channel_axes[:1]
    array = np.transpose(array, order)
    stack_shape = array.shape[: len(other)]
    array = array.reshape((-1,) + array.shape[len(other) :])
    if array.shape[0] > 1:
        if page == "max":
            array = array.max(axis=0, keepdims=True)
        elif isinstance(page, int) and 0 <= page < array.shape[0]:
            array = array[page : page + 1]
        else:
            raise ImageReadError(f"{path}: tiff_page={page!r} invalid for {array.shape[0]} pages {stack_shape}")
    array = array[0]
    samples = bool(channel_axes) and axes[channel_axes[0]] == "S"
    if samples and array.shape[-1] in (2, 4):  # gray+alpha or RGBA samples: drop alpha
        array = array[..., : array.shape[-1] - 1]
    return array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array


def load_array(path: str | os.PathLike, *, tiff_page: int | str = "max") -> np.ndarray:
    """Decode an image file to its native dtype, (H, W) or (H, W, C) with RGB(A) channel order.

    Raises FileNotFoundError for a missing file and ImageReadError (a ValueError) naming the
    file when it cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if isinstance(tiff_page, str) and tiff_page.isdigit():  # "0" from a command-line override
        tiff_page = int(tiff_page)
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            array = _read_tiff(path, tiff_page)
        except ImageReadError:
            raise
        except Exception as error:  # tifffile raises many exception types for broken files
            raise ImageReadError(f"{path}: cannot decode TIFF ({error})") from error
        return np.asarray(array)
    # np.fromfile + imdecode works for non-ASCII paths, unlike cv2.imread.
    array = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ImageReadError(f"{path}: cannot decode image (corrupt or unsupported format)")
    # Alpha carries no signal in microscopy files: gray+alpha -> gray, BGRA -> RGB.
    if array.ndim == 3 and array.shape[2] == 2:
        array = array[..., 0]
    elif array.ndim == 3 and array.shape[2] == 4:
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGB)
    elif array.ndim == 3 and array.shape[2] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    return array


def resolve_channel_reduce(reduce: str, layout: str) -> str:
    """'auto' -> 'max' for the FNC layout (signal in red and green), 'mean' otherwise; checked."""
    if reduce == "auto":
        reduce = "max" if layout == "fnc" else "mean"
    if reduce not in CHANNEL_REDUCTIONS:
        raise ValueError(f"channel_reduce={reduce!r}: expected 'auto' or one of {CHANNEL_REDUCTIONS}")
    return reduce


def reduce_channels(image: np.ndarray, channels: int, reduce: str) -> np.ndarray:
    """(H, W) or (H, W, C) -> float32 (H, W, channels).

    One channel from several: 'max' (FNC: red and green both carry the yellow signal), 'mean',
    'luminance' (BT.601, RGB only), or one channel 'red' | 'green' | 'blue' (= index 0 | 1 | 2,
    also for multi-channel TIFFs). Three channels from one: the gray channel repeated.
    """
    image = image.astype(np.float32, copy=False)
    if image.ndim == 2:
        image = image[..., None]
    depth = image.shape[-1]
    if channels == depth:
        return image
    if channels == 3 and depth == 1:
        return np.repeat(image, 3, axis=-1)
    if channels != 1:
        raise ValueError(f"cannot map {depth} input channels to channels={channels}")
    if reduce == "max":
        return image.max(axis=-1, keepdims=True)
    if reduce == "mean":
        return image.mean(axis=-1, keepdims=True)
    if reduce == "luminance" and depth == 3:
        return (image @ _LUMA)[..., None]
    if reduce in ("red", "green", "blue") and ("red", "green", "blue").index(reduce) < depth:
        index = ("red", "green", "blue").index(reduce)
        return image[..., index : index + 1]
    raise ValueError(f"channel_reduce={reduce!r} does not apply to {depth} channels (choose from {CHANNEL_REDUCTIONS})")


def normalize_intensity(
    image: np.ndarray,
    *,
    mode: str = "percentile",
    percentiles: tuple[float, float] = (0.5, 99.8),
    dtype_max: float | None = None,
) -> np.ndarray:
    """Scale an image to float32 in [0, 1]; the one function used for every split.

    'percentile': (x - P_low) / (P_high - P_low) over all pixels and channels of this image,
      clipped; works the same for 8-, 12- and 16-bit data because nothing depends on the dtype.
      A flat image (P_high == P_low) falls back to 'minmax', then to zeros.
    'minmax': (x - min) / (max - min).
    'dtype': x / dtype_max (255, 65535, or 1 for floats).
    'none': clip to [0, 1] (input already scaled).
    """
    image = np.asarray(image, np.float32)
    if mode == "none":
        return np.clip(image, 0.0, 1.0)
    if mode == "dtype":
        if dtype_max is None:
            raise ValueError("normalize='dtype' needs dtype_max")
        return np.clip(image / np.float32(dtype_max), 0.0, 1.0)
    if mode == "percentile":
        flat = image.reshape(-1)
        step = max(1, flat.size // _PERCENTILE_MAX_PIXELS)
        low, high = np.percentile(flat[::step], percentiles)
        if high <= low:
            low, high = flat.min(), flat.max()
    elif mode == "minmax":
        low, high = image.min(), image.max()
    else:
        raise ValueError(f"normalize={mode!r}: expected one of {NORMALIZATIONS}")
    if high <= low:
        return np.zeros_like(image)
    return np.clip((image - np.float32(low)) / np.float32(high - low), 0.0, 1.0)


def _dtype_max(array: np.ndarray) -> float:
    if np.issubdtype(array.dtype, np.integer):
        return float(np.iinfo(array.dtype).max)
    return 1.0


def read_image(
    path: str | os.PathLike,
    *,
    channels: int = 1,
    channel_reduce: str = "mean",
    normalize: str = "percentile",
    percentiles: tuple[float, float] = (0.5, 99.8),
    tiff_page: int | str = "max",
) -> np.ndarray:
    """Read an image file -> float32 (H, W, channels) in [0, 1] (see normalize_intensity)."""
    raw = load_array(path, tiff_page=tiff_page)
    if raw.ndim not in (2, 3):
        raise ImageReadError(f"{path}: image has shape {raw.shape}, expected (H, W) or (H, W, C)")
    if raw.dtype == bool:
        raw = raw.astype(np.uint8)
    try:
        image = reduce_channels(raw, channels, channel_reduce)
    except ValueError as error:
        raise ImageReadError(f"{path}: {error}") from error
    return normalize_intensity(image, mode=normalize, percentiles=percentiles, dtype_max=_dtype_max(raw))


def mask_to_binary(array: np.ndarray, name: str = "mask") -> np.ndarray:
    """Apply the module's mask rule to a decoded mask array -> int32 (H, W) in {0, 1}."""
    if array.ndim == 3:
        if array.shape[2] in (2, 4):  # drop alpha
            array = array[..., : array.shape[2] - 1]
        if not all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, array.shape[2])):
            raise ImageReadError(f"{name}: multi-channel mask whose channels differ; save one channel")
        array = array[..., 0]
    if array.ndim != 2:
        raise ImageReadError(f"{name}: mask has shape {array.shape}, expected (H, W)")
    if array.dtype == bool:
        return array.astype(np.int32)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isin(array, (0.0, 1.0)).all():
            raise ImageReadError(f"{name}: float mask with values other than 0.0 and 1.0; save integer labels")
        return (array > 0).astype(np.int32)
    if not np.issubdtype(array.dtype, np.integer):
        raise ImageReadError(f"{name}: unsupported mask dtype {array.dtype}")
    if array.min() < 0:
        raise ImageReadError(f"{name}: mask has negative values")
    top = np.iinfo(array.dtype).max
    if array.max() == top and top > 1:
        nonzero = np.unique(array[array > 0])
        if nonzero.size > 1:
            shown = ", ".join(str(v) for v in nonzero[:6])
            raise ImageReadError(
                f"{name}: mask mixes {top} with other non-zero values ({shown}...): a binary mask must be "
                f"{{0,1}} or {{0,{top}}} (lossy JPEG or anti-aliased masks are not accepted), labels must stay < {top}"
            )
    return (array > 0).astype(np.int32)


def read_mask(path: str | os.PathLike, *, tiff_page: int | str = 0) -> np.ndarray:
    """Read a mask file -> int32 (H, W) in {0, 1} (rule in the module docstring)."""
    return mask_to_binary(load_array(path, tiff_page=tiff_page), str(path))


def read_labels(path: str | os.PathLike, *, tiff_page: int | str = 0) -> np.ndarray:
    """Read an instance-label mask -> int32 (H, W), 0 = background.

    Label images keep their ids; binary masks ({0,1} or {0,dtype max}) give {0, 1}: split them
    into objects with a connected-component labelling if instances are needed.
    """
    array = load_array(path, tiff_page=tiff_page)
    binary = mask_to_binary(array, str(path))
    labels = array[..., 0] if array.ndim == 3 else array
    if labels.dtype == bool or np.issubdtype(labels.dtype, np.floating) or labels.max() == _dtype_max(labels):
        return binary
    return labels.astype(np.int32)
