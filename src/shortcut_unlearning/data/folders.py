"""Read and write image folders: the project's own layout and the official ISIC 2018 Task 1 one.

Project layout (written by write_project, read by read_project):

    DIR/dataset.json        format, version, ARTEFACTS order, spurious artefacts, source, extras
    DIR/labels.csv          id,label,split,<one 0/1 column per name in ARTEFACTS>
    DIR/images/<id>.png     RGB
    DIR/masks/<id>.png      fine mask: 0 background, 1 benign, 2 malignant
    DIR/artefacts/<id>.png  per-pixel artefact bit field (only when the set has one)

ISIC 2018 Task 1 layout (read by read_isic, masks written back by write_isic_masks):

    DIR/ISIC2018_Task1-2_<Split>_Input/ISIC_<7 digits>.jpg
    DIR/ISIC2018_Task1_<Split>_GroundTruth/ISIC_<7 digits>_segmentation.png  (0/255)
    DIR/*.csv               labels: see LABEL_FORMATS

Either layout may hold a clinician's own coarse masks (boxes or loose outlines drawn around each
lesion) instead of the masks derived from the ground truth:

    DIR/coarse/<id>.png or DIR/coarse/<id>_segmentation.png   (coarse_file, read_coarse)

one per image, at the image's own size, 0/255 (any pixel of 255 is lesion, of the image's
labelled class) or classes 0/1/2 (the lesion class must agree with the label). The napari reader
shows them as the coarse masks when the folder has them, and warns about any ground-truth lesion
pixel left outside them (a refinement can only erase).

Reading lists a folder first (list_folder: labels, ids and files checked, nothing decoded),
then decodes each image with its mask (decode_item) in a thread pool (in_order).
"""

from __future__ import annotations

import csv
import io
import os
import re
import unicodedata
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Annotated, Literal

import numpy as np
from PIL import Image
from pydantic import AfterValidator, BeforeValidator, Field, Strict

from shortcut_unlearning.data.lesion_set import ARTEFACTS, CLASS_NAMES, SPLITS, LesionSet
from shortcut_unlearning.files import (
    check_targets,
    make_folder,
    refuse_link,
    staged_folder,
    write_json,
    write_png,
    write_text,
)
from shortcut_unlearning.schemas import (
    Flag,
    InputError,
    Text,
    check_header,
    decode_text,
    read_json,
    validate,
)
from shortcut_unlearning.stack import resize

FORMAT, VERSION = "shortcut-unlearning", 1
ISIC_SPLITS = {"Training": "train", "Validation": "val", "Test": "test"}
# Seven digits, no more: ISIC_00000011 is not ISIC_0000001.
ISIC_ID = re.compile(r"(?<![A-Za-z0-9])ISIC_(\d{7})(?!\d)")
ISIC_IMAGE = re.compile(r"ISIC_(\d{7})\.jpg")
# Split names are stored wide enough for every split, so assigning "train" later never truncates.
SPLIT_DTYPE = f"U{max(map(len, SPLITS))}"
# Task 3 diagnoses counted as malignant: melanoma, basal cell carcinoma and actinic keratosis /
# Bowen's disease (AKIEC, premalignant or in-situ carcinoma). NV, BKL, DF and VASC are benign.
TASK3_CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
TASK3_MALIGNANT = ("MEL", "BCC", "AKIEC")
LABEL_FORMATS = (
    "Bissoto et al.'s artefact annotation (';' or ',' separated: image, the artefact columns, "
    "label), an 'image,label' CSV (label 0/1 or benign/malignant), or the ISIC Task 3 ground "
    "truth (image,MEL,NV,BCC,AKIEC,BKL,DF,VASC)"
)
# Images or masks with a side below this are refused rather than enlarged: at 16 px a lesion
# is a few pixels across (the working size is 128 px and ISIC images are hundreds of pixels).
MIN_SIDE = 16
# A labels CSV whose file name holds one of these words assigns that split to its images.
CSV_SPLIT = re.compile(r"(?<![a-z])(train|val|test)")
COARSE_FOLDER = "coarse"  # a clinician's own coarse masks, inside the dataset folder
# Artefact flags are 0 (absent) or 1 (present), nothing else: "no", "false", "nan" or an empty
# cell used to count as present. Spaces around the digit are allowed.
FLAG_VALUES = {"0": False, "1": True}


class FolderError(InputError):
    """A folder or file that cannot be read or written as asked; the message says what to do."""


# File names hold at most 255 bytes on common file systems; an id leaves room for the longest
# name made from it (<id>_segmentation.png, and .damaged-<n> beside an autosave).
MAX_ID_BYTES = 200


def check_id(image_id, where: str = "") -> str:
    """`image_id` if it is a plain file name, else FolderError.

    Ids name files inside a dataset folder and are never paths: no separators, no '.' or '..',
    no drive, no NUL or other control character (a newline), not empty, at most MAX_ID_BYTES
    in UTF-8. Every reader and writer checks ids with this before it touches a file, so a
    hostile labels CSV cannot reach outside its folder.
    """
    text = image_id if isinstance(image_id, str) else ""
    prefix = f"{where}: " if where else ""
    plain = (
        text not in ("", ".", "..")
        and not set(text) & set("/\\")
        and not any(unicodedata.category(c) == "Cc" for c in text)
        and not PureWindowsPath(text).drive
    )
    if not plain:
        raise FolderError(
            f"{prefix}id {image_id!r} is not a plain file name (ids may not hold folders, '..', "
            "absolute paths, NUL or other control characters such as a newline); rename it to a "
            "name like ISIC_0000001"
        )
    length = len(text.encode("utf-8", "surrogatepass"))
    if length > MAX_ID_BYTES:
        raise FolderError(
            f"{prefix}id {text[:20]!r}... is {length} bytes long, but ids are at most "
            f"{MAX_ID_BYTES} (file names made from them must fit the file system's 255); "
            "shorten it"
        )
    return text


def check_inside(root: Path, files: Sequence[Path]) -> None:
    """FolderError naming the first of `files` that resolves outside the dataset folder `root`.

    A link inside a dataset folder may lead anywhere; the reader reads only what lies inside
    the folder it is given. One lstat per file: each folder is resolved once.
    """
    real_root, real_parents = Path(root).resolve(), {}
    for file in files:
        if file.parent not in real_parents:
            real_parents[file.parent] = file.parent.resolve()
        real = file.resolve() if file.is_symlink() else real_parents[file.parent] / file.name
        if not real.is_relative_to(real_root):
            raise FolderError(
                f"{file} leads to {real}, outside the dataset folder {root}; the tool reads only "
                "files inside the folder it is given: copy the file into the folder or remove "
                "the link"
            )


# ---------------------------------------------------------------------------------------------
# Pixels


def _load(
    path: Path, mode: str, target: tuple[int, int] | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixels of one image file and its (height, width) on disk: "RGB" for images, "L" for label
    maps (their values as stored, from a PNG only). `target` (h, w), images only: the pixels come
    resized to it (bilinear), a JPEG decoded at a reduced scale first when the target is half its
    size or less.
    """

    def decode(image: Image.Image):
        size = (image.height, image.width)
        if mode == "L" and image.format != "PNG":  # a JPEG shifts labels at the lesion's edge
            raise FolderError(
                f"{path} is stored as {image.format or 'an unknown format'}, not PNG; masks must "
                "be stored losslessly (JPEG compression changes label values): save the "
                "original mask as PNG"
            )
        if mode == "RGB" and target and target[0] * 2 <= size[0] and target[1] * 2 <= size[1]:
            image.draft("RGB", (target[1], target[0]))  # JPEG only; others ignore it
        return _pixels(image, mode, path), size

    pixels, size = _opened(path, decode)
    if mode == "RGB" and target:
        pixels = resize(pixels, target, Image.Resampling.BILINEAR)
    return pixels, size


def image_size_on_disk(path: Path) -> tuple[int, int]:
    """(height, width) from a file's header, without decoding it; checked as _load checks."""
    return _opened(path, lambda image: (image.height, image.width))


def _opened(path: Path, read: Callable):
    """read(image) of the opened file. An undecodable file, a decompression bomb and an image
    too small to hold a lesion each raise FolderError naming the file."""
    try:
        with warnings.catch_warnings():
            # PIL warns above MAX_IMAGE_PIXELS and raises above twice that: both are refused.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if min(image.size) < MIN_SIDE:
                    raise FolderError(
                        f"{path} is {image.height}x{image.width} pixels; images and masks need "
                        f"at least {MIN_SIDE} pixels a side (smaller ones hold no lesion to "
                        "segment): replace it with the full image"
                    )
                return read(image)
    except FolderError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise FolderError(
            f"{path} is too large to open safely ({error}); shrink it or remove it"
        ) from error
    except (OSError, ValueError, SyntaxError) as error:  # what PIL raises for broken files
        raise FolderError(
            f"cannot decode {path} ({error}); replace it with an intact copy or delete it"
        ) from error


def _pixels(image: Image.Image, mode: str, path: Path) -> np.ndarray:
    """An opened image as uint8 `mode` pixels; 16-bit grey is scaled, label maps keep values:
    a palette PNG's stored indices (never its colours' brightness), a colour PNG's one value
    where its channels agree."""
    if mode == "L" and image.mode == "P":
        return np.asarray(image)  # the indices a label map stores; the palette only shows them
    if mode == "L" and image.mode in ("RGB", "RGBA"):
        colours = np.asarray(image)[..., :3]
        if (colours != colours[..., :1]).any():
            odd = colours[(colours != colours[..., :1]).any(axis=-1)][0].tolist()
            raise FolderError(
                f"{path} stores colours (such as {tuple(odd)}), not label values; save the mask "
                "as a single-channel PNG (greyscale or palette) holding the label of each pixel"
            )
        return np.ascontiguousarray(colours[..., 0])
    if image.mode.startswith("I;16"):
        values = np.asarray(image).astype(np.uint32)
        if mode == "L":  # label maps keep their values; the layout's check refuses wrong ones
            return values
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)  # 16 -> 8 bit, rounded
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode in ("I", "F"):
        raise FolderError(
            f"{path} holds 32-bit {'float' if image.mode == 'F' else 'integer'} pixels, which "
            "have no fixed range; save it as an 8- or 16-bit PNG or as a JPEG"
        )
    return np.asarray(image.convert(mode))


def _stack(arrays: list[np.ndarray], names: list[str], folder: Path) -> np.ndarray:
    """One array of same-sized images; differing sizes need an explicit working size."""
    for array, name in zip(arrays, names, strict=True):
        if array.shape[:2] != arrays[0].shape[:2]:
            raise FolderError(
                f"images in {folder} differ in size: {names[0]} is {_hw(arrays[0])} but {name} "
                f"is {_hw(array)} (height x width); pass image_size=N to resize all to N x N"
            )
    return np.stack(arrays)


def _hw(pixels: np.ndarray) -> str:
    return f"{pixels.shape[0]}x{pixels.shape[1]}"


def _check_image_size(image_size: int | None) -> None:
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")


# ---------------------------------------------------------------------------------------------
# Images before decoding, decoded one at a time, many at once


@dataclass
class Item:
    """One image of a dataset folder before decoding: its files, label, split and flags."""

    id: str
    label: int
    split: str
    image: Path
    mask: Path
    mask_kind: str  # "isic": 0/255 ground truth; "project": 0/1/2 classes
    flags: dict[str, bool] = field(default_factory=dict)
    artefacts: Path | None = None


@dataclass
class Listing:
    """A dataset folder's images before decoding, and what the folder says about them."""

    folder: Path
    items: list[Item]
    source: str
    spurious: tuple[str, ...] = ()
    flag_names: list[str] = field(default_factory=list)
    with_artefacts: bool = False

    @property
    def ids(self) -> list[str]:
        return [item.id for item in self.items]


@dataclass
class Decoded:
    """One image and its fine mask (and artefact map) at the size asked for."""

    image: np.ndarray  # (h, w, 3) uint8
    mask: np.ndarray  # (h, w) uint8: 0 background, 1 benign, 2 malignant
    artefacts: np.ndarray | None
    original_size: tuple[int, int]  # (height, width) on disk


def decode_item(
    item: Item, target: tuple[int, int] | None = None, artefacts: bool = False
) -> Decoded:
    """Decode one image with its fine mask (checked) at `target` (h, w), default its own size;
    bilinear for the image, nearest for the masks."""
    image, size = _load(item.image, "RGB", target)
    truth, mask_size = _load(item.mask, "L")
    if mask_size != size:
        raise FolderError(_size_mismatch(item, item.mask, mask_size, size))
    if item.mask_kind == "isic":
        fine = (_isic_mask(truth, item.mask) * (1 + item.label)).astype(np.uint8)
    else:
        fine = _project_mask(truth, item.mask, item.id, item.label)
    bits = None
    if artefacts and item.artefacts is not None:
        bits, bits_size = _load(item.artefacts, "L")
        if bits_size != size:
            raise FolderError(_size_mismatch(item, item.artefacts, bits_size, size))
        bits = resize(bits, target or size, Image.Resampling.NEAREST)
    return Decoded(image, resize(fine, target or size, Image.Resampling.NEAREST), bits, size)


def _size_mismatch(item: Item, file: Path, size, image_size) -> str:
    sizes = "x".join(map(str, size)), "x".join(map(str, image_size))
    if item.mask_kind == "isic":
        return (
            f"mask {file} is {sizes[0]} but its image {item.image} is {sizes[1]} (height x "
            "width); replace the mask with one of the image's size"
        )
    return (
        f"{file} is {sizes[0]} but its image is {sizes[1]} (height x width); rewrite the "
        "folder with write_project"
    )


def default_workers() -> int:
    """Decoding threads: one per core this process may use (PIL decodes without the GIL)."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return max(1, len(cores) if cores else (os.cpu_count() or 1))


def in_order(function: Callable, items: Sequence, workers: int | None = None) -> Iterator:
    """function(item) for every item, computed in a thread pool and yielded in item order.

    The first failure in item order is raised and the work not yet started is dropped, so a
    broken file early in a big folder fails at once.
    """
    workers = workers or default_workers()
    if workers == 1 or len(items) < 2:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(function, item) for item in items]
        try:
            for index, future in enumerate(futures):
                yield future.result()
                futures[index] = None  # let the result go once the caller has it
        finally:
            for future in futures:
                if future is not None:
                    future.cancel()


def _read(listing: Listing, image_size: int | None, workers: int | None) -> LesionSet:
    """A LesionSet of every image in `listing`, decoded in parallel."""
    target = None if image_size is None else (image_size, image_size)
    decoded = list(
        in_order(
            lambda item: decode_item(item, target, listing.with_artefacts), listing.items, workers
        )
    )
    ids, items = listing.ids, listing.items
    return LesionSet(
        ids=ids,
        images=_stack([d.image for d in decoded], ids, listing.folder),
        masks=_stack([d.mask for d in decoded], ids, listing.folder),
        labels=np.array([item.label for item in items], np.int64),
        splits=np.array([item.split for item in items], SPLIT_DTYPE),
        flags={
            name: np.array([item.flags.get(name, False) for item in items], bool)
            for name in listing.flag_names
        },
        artefacts=np.stack([d.artefacts for d in decoded]) if listing.with_artefacts else None,
        original_sizes=[d.original_size for d in decoded],
        source=listing.source,
        spurious=listing.spurious,
    )


# ---------------------------------------------------------------------------------------------
# Project layout


def write_project(
    data: LesionSet,
    out: Path | str,
    metadata: dict | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write `data` in the project layout under `out` and return `out`.

    `metadata` adds keys to dataset.json (the format keys always win). Flags missing from
    data.flags are written as 0. The set is written into a staging folder beside `out` and
    moved into place once complete (files.staged_folder), so a killed write never mixes old
    and new files. `out` must be empty or missing; overwrite=True replaces an earlier dataset
    this tool wrote (its marker), as a whole, and nothing else.
    """
    out = Path(out)
    unknown = sorted(set(data.flags) - set(ARTEFACTS))
    if unknown:
        raise FolderError(
            f"flags {unknown} are not artefacts of ARTEFACTS {ARTEFACTS}, so labels.csv in {out} "
            "cannot hold them; rename or drop them before writing"
        )
    for image_id in data.ids:
        check_id(image_id, f"cannot write {out}")
    if len(set(data.ids)) != len(data.ids):
        raise FolderError(f"cannot write {out}: ids must be unique; rename the repeated ids")
    # PNG never takes much more than the raw pixels: the free space is checked against them.
    pixels = data.images.nbytes + data.masks.nbytes
    pixels += 0 if data.artefacts is None else data.artefacts.nbytes
    with staged_folder(out, overwrite, pixels, kind="dataset") as stage:
        _write_project_files(data, stage, metadata)
    return out


def _write_project_files(data: LesionSet, out: Path, metadata: dict | None) -> None:
    """The files of write_project, in the new folder `out`."""
    folders = {"images": data.images, "masks": data.masks}
    if data.artefacts is not None:
        folders["artefacts"] = data.artefacts
    for name, stack in folders.items():
        make_folder(out / name)
        for image_id, pixels in zip(data.ids, stack, strict=True):
            write_png(out / name / f"{image_id}.png", np.asarray(pixels, np.uint8))

    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["id", "label", "split", *ARTEFACTS])
    for i, image_id in enumerate(data.ids):
        flags = [int(bool(data.flags[n][i])) if n in data.flags else 0 for n in ARTEFACTS]
        writer.writerow([image_id, int(data.labels[i]), str(data.splits[i]), *flags])
    write_text(out / "labels.csv", table.getvalue())

    info = {
        "format": FORMAT,
        "version": VERSION,
        "artefacts": list(ARTEFACTS),
        "spurious": list(data.spurious),
        "source": data.source,
        # Recorded so an overwrite without artefacts is not read with a stale artefacts folder.
        "artefact_masks": data.artefacts is not None,
    }
    info.update({k: v for k, v in (metadata or {}).items() if k not in info})
    write_json(out / "dataset.json", info, default=_json_value)


def _json_value(value):
    """numpy values and paths that callers put in metadata, in a form json can write."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"metadata value {value!r} of type {type(value).__name__} is not JSON")


def read_project(
    path: Path | str, image_size: int | None = None, workers: int | None = None
) -> LesionSet:
    """Read a folder written by write_project, resized to image_size x image_size if given;
    `workers` threads decode (default: one per core)."""
    _check_image_size(image_size)
    return _read(list_project(path), image_size, workers)


def list_project(path: Path | str) -> Listing:
    """The images of a project folder, checked (labels, ids, files present) but not decoded."""
    path = Path(path)
    check_inside(path, [path / "dataset.json", path / "labels.csv"])
    info = _read_info(path / "dataset.json")
    labels_path = path / "labels.csv"
    if not labels_path.is_file():
        raise FolderError(f"{labels_path} is missing; rewrite the folder with write_project")
    header, lines = read_csv(labels_path, "rewrite the folder with write_project", ",")
    if not lines:
        raise FolderError(f"{labels_path} lists no images; rewrite the folder with write_project")
    for column in ("id", "label", "split"):
        if column not in header:
            raise FolderError(f"{labels_path} has no {column!r} column; it needs id,label,split")
    unlisted = [name for name in info.spurious if name not in header]
    if unlisted:
        raise FolderError(
            f"{labels_path} has no column for {', '.join(map(repr, unlisted))}, which "
            f"{path / 'dataset.json'} names as spurious; add the column (0 or 1 per image) or "
            "remove the name from its spurious list"
        )
    present = [n for n in ARTEFACTS if n in header]
    rows = []
    for line, values in lines:
        cells = _cells(header, values)
        flags = {name: cells.get(name) for name in present}
        row = {"id": cells["id"], "label": cells["label"], "split": cells["split"], "flags": flags}
        where = f"{labels_path} line {line}"
        rows.append((line, validate(ProjectRow, row, where, PROJECT_FIX, True, FolderError)))
    first_line = {}
    for line, row in rows:
        if row.id in first_line:
            raise FolderError(
                f"{labels_path} lists {row.id!r} twice (lines {first_line[row.id]} and "
                f"{line}); remove one of the rows"
            )
        first_line[row.id] = line
    ids = [row.id for _, row in rows]
    with_artefacts = (
        info.artefact_masks if info.artefact_masks is not None else (path / "artefacts").is_dir()
    )
    folders = ["images", "masks", *(["artefacts"] if with_artefacts else [])]
    for name in folders:  # every file is there, inside the folder, before any is decoded
        files = [path / name / f"{image_id}.png" for image_id in ids]
        for image_id, file in zip(ids, files, strict=True):
            if not file.is_file():
                raise FolderError(
                    f"{file} is missing but {labels_path} lists {image_id!r}; restore the file "
                    "or remove its row"
                )
        check_inside(path, files)
    items = [
        Item(
            id=row.id,
            label=int(row.label),
            split=row.split,
            image=path / "images" / f"{row.id}.png",
            mask=path / "masks" / f"{row.id}.png",
            mask_kind="project",
            flags={name: cell == "1" for name, cell in row.flags.items()},
            artefacts=path / "artefacts" / f"{row.id}.png" if with_artefacts else None,
        )
        for _, row in rows
    ]
    return Listing(
        folder=path,
        items=items,
        source=info.source or "project",
        spurious=tuple(info.spurious),
        flag_names=present,
        with_artefacts=bool(with_artefacts),
    )


# ---------------------------------------------------------------------------------------------
# Schemas of the files a folder holds (schemas.py): dataset.json, labels CSVs, their rows


def _stripped(value):
    return value.strip() if isinstance(value, str) else value


def _stripped_lower(value):
    return value.strip().lower() if isinstance(value, str) else value


# A 0/1 cell: artefact flags are 0 (absent) or 1 (present), nothing else ("no", "false", "nan"
# or an empty cell used to count as present); spaces around the digit are allowed.
Bit = Annotated[Literal["0", "1"], BeforeValidator(_stripped)]
Id = Annotated[str, Strict(), AfterValidator(check_id)]
PROJECT_FIX = "correct that row: labels.csv holds id,label (0 or 1),split and a 0/1 per artefact"


@dataclass(frozen=True)
class ProjectRow:
    """One row of a project folder's labels.csv."""

    id: Id
    label: Bit
    split: Literal[SPLITS]
    flags: dict[str, Bit]  # one per artefact column present


def _spurious_names(names: list[str]) -> list[str]:
    unknown = [name for name in names if name not in ARTEFACTS]
    if unknown:
        raise ValueError(f"spurious names {unknown}, which are not among {list(ARTEFACTS)}")
    return names


def _bit_order(names: list[str]) -> list[str]:
    if names != list(ARTEFACTS):
        raise ValueError(
            f"artefacts orders the artefact bits as {names}, not {list(ARTEFACTS)}: regenerate "
            "the folder with this version"
        )
    return names


@dataclass(frozen=True)
class DatasetInfo:
    """A project folder's dataset.json (write_project writes it); keys beyond these, such as
    the generator's settings, are the writer's metadata and are not read."""

    format: Literal[FORMAT]
    version: Literal[VERSION]
    artefacts: Annotated[list[Text], AfterValidator(_bit_order)] = field(
        default_factory=lambda: list(ARTEFACTS)
    )
    spurious: Annotated[list[Text], AfterValidator(_spurious_names)] = field(default_factory=list)
    source: Text = "project"
    # Recorded so an overwrite without artefacts is not read with a stale artefacts folder;
    # None in folders of versions that did not record it: the folder decides.
    artefact_masks: Flag | None = None


def _isic_number(image: str) -> str:
    match = ISIC_ID.search(image)
    if not match:
        raise ValueError(f"image {image!r} has no ISIC_<7 digits> id")
    return match.group(1)


IsicNumber = Annotated[Id, AfterValidator(_isic_number)]  # the 7 digits of an ISIC id
# A Task 3 diagnosis score: a probability (the ground truth holds 0.0 or 1.0), from its text.
Score = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


@dataclass(frozen=True)
class IsicRow:
    """One row of an ISIC labels CSV: Bissoto's annotation or 'image,label'."""

    image: IsicNumber
    label: Annotated[Literal["0", "1", "benign", "malignant"], BeforeValidator(_stripped_lower)]
    flags: dict[str, Bit]  # one per artefact column present

    @property
    def malignant(self) -> int:
        return int(self.label in ("1", "malignant"))


@dataclass(frozen=True)
class Task3Row:
    """One row of the ISIC Task 3 ground truth: image and a score per diagnosis."""

    image: IsicNumber
    scores: dict[str, Score]  # TASK3_CLASSES

    @property
    def malignant(self) -> int:
        return int(any(self.scores[name] >= 0.5 for name in TASK3_MALIGNANT))


# ---------------------------------------------------------------------------------------------
# CSV files

# A labels CSV of 100,000 images is about 10 MiB; a larger one is not a labels CSV.
MAX_CSV_BYTES = 64 * 2**20


def read_csv(
    path: Path, hint: str, delimiter: str | None = None
) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header (names stripped) and the non-blank rows, each with its line number, of a CSV
    file of UTF-8 text (a byte-order mark dropped). Without `delimiter` the first line's most
    frequent of , ; and tab is used. FolderError names the file for another encoding, a file
    too large, a line the csv module cannot parse and a column named twice."""
    size = path.stat().st_size
    if size > MAX_CSV_BYTES:
        raise FolderError(
            f"{path} is {size / 2**20:.0f} MiB, but a labels CSV is at most "
            f"{MAX_CSV_BYTES // 2**20} MiB; {hint}"
        )
    text = decode_text(path.read_bytes(), path, hint, FolderError)
    if delimiter is None:
        first_line = text.split("\n", 1)[0]
        delimiter = max(",;\t", key=first_line.count)  # Bissoto's annotation uses ';'
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [name.strip() for name in next(reader, [])]
        rows = [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as error:
        raise FolderError(f"{path} line {reader.line_num}: {error}; {hint}") from error
    named = [name for name in header if name]
    twice = sorted({name for name in named if named.count(name) > 1})
    if twice:
        raise FolderError(f"{path} names the column {twice[0]!r} twice; keep one of them")
    return header, rows


def _cells(header: list[str], values: list[str]) -> dict[str, str | None]:
    """A row's cells by column name; None for the cells a short row lacks."""
    return {name: values[i] if i < len(values) else None for i, name in enumerate(header) if name}


def _project_mask(mask: np.ndarray, file: Path, image_id: str, label: int) -> np.ndarray:
    """A project mask as uint8 once it holds 0/1/2 and its lesion class agrees with the label."""
    values = _values(mask)
    if set(values.tolist()) <= {0, 255} and 255 in values:
        raise FolderError(
            f"{file} holds 0/255 like an ISIC ground-truth mask, but project masks hold 0 "
            "background, 1 benign, 2 malignant; write the set with write_project (or use the ISIC "
            "2018 layout for 0/255 masks)"
        )
    if not set(values.tolist()) <= {0, 1, 2}:
        raise FolderError(
            f"{file} holds the values {values.tolist()}, but project masks hold only 0 "
            "(background), 1 (benign) and 2 (malignant); correct the mask"
        )
    lesion = values[values != 0].tolist()
    if lesion and lesion != [label + 1]:
        raise FolderError(
            f"the mask of {image_id!r} ({file}) holds lesion class {lesion} but labels.csv "
            f"labels it {label} ({CLASS_NAMES[label + 1]}, class {label + 1}); correct the "
            "label or the mask"
        )
    return mask.astype(np.uint8)


def _values(mask: np.ndarray) -> np.ndarray:
    """The distinct values of a label map, sorted (a histogram for 8 bits: no sort of pixels)."""
    if mask.dtype == np.uint8:
        return np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    return np.unique(mask)


def _isic_mask(mask: np.ndarray, file: Path) -> np.ndarray:
    """An ISIC ground-truth mask as a bool lesion map once it holds only 0 and 255."""
    values = _values(mask).tolist()
    if not set(values) <= {0, 255}:
        hint = (
            "it looks like a 0/1 mask: multiply it by 255"
            if set(values) <= {0, 1}
            else "set lesion pixels to 255 and the rest to 0"
        )
        raise FolderError(
            f"{file} holds the values {values}, but ISIC ground truth is 0 (background) and 255 "
            f"(lesion); {hint}"
        )
    return mask == 255


def _read_info(info_path: Path) -> DatasetInfo:
    """dataset.json, checked against DatasetInfo: ours, and in our artefact bit order."""
    if not info_path.is_file():
        raise FolderError(f"{info_path} is missing; write the folder with write_project")
    fix = "rewrite the folder with write_project"
    info = read_json(info_path, fix, FolderError)
    what = "a project folder's dataset.json"
    check_header(info, info_path, FORMAT, VERSION, what, fix, FolderError)
    return validate(DatasetInfo, info, info_path, "correct it or " + fix, error=FolderError)


# ---------------------------------------------------------------------------------------------
# ISIC 2018 Task 1 layout


def read_isic(
    path: Path | str,
    image_size: int | None = None,
    labels: Path | str | Sequence[Path | str] | None = None,
    workers: int | None = None,
) -> LesionSet:
    """Read the official ISIC 2018 Task 1 folders under `path` with labels from CSVs.

    `labels` names one or more labels CSVs; by default every *.csv in `path` is tried.
    Images with no label are left out with a warning. `workers` threads decode.
    """
    _check_image_size(image_size)
    return _read(list_isic(path, labels), image_size, workers)


def list_isic(path: Path | str, labels: Path | str | Sequence[Path | str] | None = None) -> Listing:
    """The labelled images of an ISIC 2018 folder, checked (labels, masks present), not decoded."""
    path = Path(path)
    found = _isic_images(path)
    table = _read_labels(path, labels)
    labelled = [item for item in found if item[0] in table]
    if not labelled:
        raise FolderError(
            f"none of the {len(found)} images in {path} has a label in the CSVs used; put a "
            f"labels CSV in {path} or pass labels=: {LABEL_FORMATS}"
        )
    if len(labelled) < len(found):
        warnings.warn(
            f"{len(found) - len(labelled)} of {len(found)} images in {path} have no label and "
            "are left out; add them to an 'image,label' CSV to use them",
            stacklevel=3,
        )
    items = []
    for number, split, image_path, mask_path in labelled:
        if not mask_path.is_file():
            raise FolderError(f"image {image_path} has no mask; expected {mask_path}")
        row = table[number]
        items.append(
            Item(
                id=f"ISIC_{number}",
                label=row["label"],
                split=row["split"] or split,
                image=image_path,
                mask=mask_path,
                mask_kind="isic",
                flags=row["flags"],
            )
        )
    check_inside(path, [file for item in items for file in (item.image, item.mask)])
    flag_names = [n for n in ARTEFACTS if any(n in row["flags"] for row in table.values())]
    return Listing(folder=path, items=items, source="isic2018", flag_names=flag_names)


def _isic_images(path: Path) -> list[tuple[str, str, Path, Path]]:
    """(7-digit id, split, image path, expected mask path) of every image in the split folders."""
    found, seen = [], {}
    for folder_split, split in ISIC_SPLITS.items():
        input_dir = path / f"ISIC2018_Task1-2_{folder_split}_Input"
        truth_dir = path / f"ISIC2018_Task1_{folder_split}_GroundTruth"
        if not input_dir.is_dir():
            continue
        for image_path in sorted(input_dir.iterdir()):
            match = ISIC_IMAGE.fullmatch(image_path.name)
            if not match:  # LICENSE.txt, ATTRIBUTION.txt, .DS_Store, ...
                continue
            number = match.group(1)
            if number in seen:
                raise FolderError(
                    f"ISIC_{number} is both {seen[number]} and {image_path}; keep one of them"
                )
            seen[number] = image_path
            mask_path = truth_dir / f"ISIC_{number}_segmentation.png"
            found.append((number, split, image_path, mask_path))
    if not found:
        raise FolderError(
            f"no ISIC_<7 digits>.jpg images in ISIC2018_Task1-2_<Training|Validation|Test>_Input "
            f"folders under {path}; unpack the official ISIC 2018 Task 1 archives there"
        )
    return found


def _read_labels(path: Path, labels) -> dict[str, dict]:
    """7-digit id -> {"label", "split" (or None), "flags"}, merged from all labels CSVs."""
    explicit = labels is not None
    if labels is None:  # the folder's own CSVs; files named with labels= may lie anywhere
        files = sorted(path.glob("*.csv"))
        check_inside(path, files)
    elif isinstance(labels, (str, Path)):
        files = [Path(labels)]
    else:
        files = [Path(file) for file in labels]
    table, used = {}, {}
    for file in files:
        if not file.is_file():
            raise FolderError(
                f"labels file {file} does not exist; check the path given to labels= (--labels, "
                "one file per flag)"
            )
        rows = _read_label_csv(file, explicit)
        for number, row in rows.items():
            old = table.get(number)
            if old and old["label"] != row["label"]:
                raise FolderError(
                    f"ISIC_{number} is labelled {old['label']} in {used[number]} but "
                    f"{row['label']} in {file}; correct one of the files"
                )
            if old and old["split"] and row["split"] and old["split"] != row["split"]:
                raise FolderError(
                    f"ISIC_{number} is in the {old['split']} split by {used[number]} but in the "
                    f"{row['split']} split by {file}; use the CSVs of one split (one trap set)"
                )
            if old:
                row = {
                    "label": row["label"],
                    "split": row["split"] or old["split"],
                    "flags": {**old["flags"], **row["flags"]},
                }
            table[number], used[number] = row, file
    if not table:
        raise FolderError(
            f"no usable labels CSV in {path}; put one there or pass labels=: {LABEL_FORMATS}"
        )
    return table


def _read_label_csv(file: Path, explicit: bool) -> dict[str, dict]:
    """Rows of one labels CSV by 7-digit id, each checked against its format's schema
    (IsicRow or Task3Row); unknown headers are skipped unless asked for."""
    header, lines = read_csv(file, f"it should hold {LABEL_FORMATS}")
    is_task3 = all(name in header for name in TASK3_CLASSES)
    if "image" not in header or not ("label" in header or is_task3):
        if explicit:
            raise FolderError(f"{file} has an unknown header {header}; use {LABEL_FORMATS}")
        warnings.warn(f"ignoring {file}: its header is not a labels CSV", stacklevel=3)
        return {}
    flag_names = [name for name in ARTEFACTS if name in header]
    split_match = CSV_SPLIT.search(file.stem.lower())
    split = split_match.group(1) if split_match else None
    rows, lines_of = {}, {}
    for line, values in lines:
        record = _label_row(_cells(header, values), is_task3, flag_names, f"{file} line {line}")
        flags = {name: cell == "1" for name, cell in getattr(record, "flags", {}).items()}
        number = record.image
        row = {"label": record.malignant, "split": split, "flags": flags}
        # A repeated row is harmless; a repeat that says something else is a contradiction.
        if number in rows and rows[number] != row:
            raise FolderError(
                f"{file} lists ISIC_{number} on lines {lines_of[number]} and {line} with "
                "different labels or artefact flags; keep the right row and remove the other"
            )
        rows[number], lines_of[number] = row, lines_of.get(number, line)
    return rows


def _label_row(cells: dict, is_task3: bool, flag_names: list[str], where: str):
    """One labels CSV row checked against its schema: a Task3Row or an IsicRow."""
    fix = f"fix or remove that row ({LABEL_FORMATS})"
    if is_task3:
        row = {"image": cells["image"], "scores": {n: cells[n] for n in TASK3_CLASSES}}
        return validate(Task3Row, row, where, fix, True, FolderError)
    flags = {name: cells[name] for name in flag_names}
    row = {"image": cells["image"], "label": cells["label"], "flags": flags}
    return validate(IsicRow, row, where, fix, True, FolderError)


def write_isic_masks(
    masks: np.ndarray,
    ids: Sequence[str],
    original_sizes: Sequence[tuple[int, int]],
    out_dir: Path | str,
    split: str = "Training",
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Write masks as official ISIC 2018 Task 1 ground truth, back at each image's own size.

    Any lesion class becomes 255, background 0. `split` is Training, Validation or Test
    (or train, val, test). Existing files are refused unless overwrite=True.
    """
    folder_split = {v: k for k, v in ISIC_SPLITS.items()}.get(split, split)
    if folder_split not in ISIC_SPLITS:
        raise ValueError(f"split must be one of {list(ISIC_SPLITS)}, got {split!r}")
    sizes = _check_masks_to_write(masks, ids, original_sizes, f"cannot write to {out_dir}")
    folder = Path(out_dir) / f"ISIC2018_Task1_{folder_split}_GroundTruth"
    paths = []
    for image_id in ids:
        match = ISIC_ID.fullmatch(check_id(image_id, f"cannot write to {out_dir}"))
        if not match:
            raise ValueError(f"id {image_id!r} is not of the form ISIC_<7 digits>")
        paths.append(folder / f"ISIC_{match.group(1)}_segmentation.png")
    # Check every target before writing any, so a refusal leaves no half-written set.
    refuse_link(folder)
    check_targets(paths, overwrite, "write elsewhere or pass overwrite=True")
    make_folder(folder)
    for mask, (height, width), file in zip(masks, sizes, paths, strict=True):
        binary = Image.fromarray(np.where(np.asarray(mask) != 0, 255, 0).astype(np.uint8))
        resized = binary.resize((int(width), int(height)), Image.Resampling.NEAREST)
        write_png(file, resized, replace=overwrite)
    return paths


# ---------------------------------------------------------------------------------------------
# Dispatch


def detect_layout(path: Path | str) -> str:
    """'project' or 'isic2018': the layout of the folder at `path`."""
    path = Path(path)
    if not path.exists():
        raise FolderError(f"{path} does not exist; check the path")
    if not path.is_dir():
        raise FolderError(f"{path} is not a folder; pass the dataset's folder")
    if (path / "dataset.json").is_file():
        return "project"
    if any((path / f"ISIC2018_Task1-2_{s}_Input").is_dir() for s in ISIC_SPLITS):
        return "isic2018"
    raise FolderError(
        f"{path} has neither a dataset.json (project layout, see write_project) nor "
        "ISIC2018_Task1-2_<Training|Validation|Test>_Input folders (official ISIC 2018 Task 1 "
        "layout); point to the folder that holds one of them"
    )


def list_folder(
    path: Path | str, labels: Path | str | Sequence[Path | str] | None = None
) -> Listing:
    """The images of a project or ISIC 2018 folder, whichever `path` holds, not yet decoded."""
    if detect_layout(path) == "isic2018":
        return list_isic(path, labels)
    if labels is not None:
        raise FolderError(
            f"{path} is a project folder whose labels are in its labels.csv; drop labels= "
            "(--labels), which is for the ISIC 2018 layout"
        )
    return list_project(path)


def read_folder(
    path: Path | str,
    image_size: int | None = None,
    labels: Path | str | Sequence[Path | str] | None = None,
    workers: int | None = None,
) -> LesionSet:
    """Read a project or ISIC 2018 folder, whichever `path` holds; `workers` threads decode."""
    _check_image_size(image_size)
    return _read(list_folder(path, labels), image_size, workers)


def write_masks(
    masks,
    ids: Sequence[str],
    original_sizes: Sequence[tuple[int, int]],
    folder: Path | str,
    extents: Sequence[tuple[int, int]] | None = None,
) -> list[Path]:
    """Masks back at each image's original size, from a canvas where image i fills its
    top-left `extents[i]` (default: all of it): ISIC ground-truth naming (0/255) when every id
    is an ISIC id, else `<id>_segmentation.png` with the class labels. Existing files are
    refused, and so is anything that does not fit (see _check_masks_to_write), before anything
    is written."""
    where = f"cannot save masks to {folder}"
    masks = np.asarray(masks)
    masks = masks[None] if masks.ndim == 2 else masks
    if extents is not None:
        canvas = masks.shape[1:]
        boxes = _whole_pairs(extents, len(masks), "extents", where)
        if any(h > canvas[0] or w > canvas[1] for h, w in boxes):
            raise FolderError(f"{where}: an extent in {boxes} exceeds the {canvas} canvas")
        masks = [m[:h, :w] for m, (h, w) in zip(masks, boxes, strict=True)]
    if all(ISIC_ID.fullmatch(str(i)) for i in ids):
        return write_isic_masks(masks, ids, original_sizes, folder)
    folder = Path(folder)
    sizes = _check_masks_to_write(masks, ids, original_sizes, where)
    targets = [folder / f"{i}_segmentation.png" for i in ids]
    check_targets(targets, hint="save the masks to a new folder")
    make_folder(folder)
    for mask, (height, width), target in zip(masks, sizes, targets, strict=True):
        image = Image.fromarray(np.asarray(mask, np.uint8))
        write_png(target, image.resize((int(width), int(height)), Image.Resampling.NEAREST))
    return targets


def _check_masks_to_write(masks, ids, sizes, where: str) -> list[tuple[int, int]]:
    """The sizes as (height, width) ints once the masks can all be written: one plain, unique
    id and one size per mask, each mask a 2-D map of the classes 0, 1, 2. A FolderError
    otherwise, before any file is written (a value of 300 used to wrap to 44, and 256 to 0)."""
    if len(ids) != len(masks):
        raise FolderError(f"{where}: got {len(masks)} masks but {len(ids)} ids; pass one per mask")
    sizes = _whole_pairs(sizes, len(masks), "original sizes", where)
    first = {}
    for index, image_id in enumerate(ids):
        check_id(image_id, where)
        if image_id in first:
            raise FolderError(
                f"{where}: images {first[image_id]} and {index} both have the id {image_id!r}, "
                "so one mask would overwrite the other; give each image its own id"
            )
        first[image_id] = index
    for image_id, mask in zip(ids, masks, strict=True):
        mask = np.asarray(mask)
        if mask.ndim != 2 or not (mask.dtype == bool or np.issubdtype(mask.dtype, np.integer)):
            raise FolderError(
                f"{where}: the mask of {image_id!r} is {mask.dtype} {mask.shape}; masks are 2-D "
                "integer label maps"
            )
        values = _values(mask)
        if not set(values.tolist()) <= {0, 1, 2}:
            raise FolderError(
                f"{where}: the mask of {image_id!r} holds the values {values.tolist()[:8]}, but "
                "masks hold only the classes 0 (background), 1 (benign) and 2 (malignant); "
                "paint with those labels"
            )
    return sizes


def _whole_pairs(pairs, count: int, what: str, where: str) -> list[tuple[int, int]]:
    """`count` (height, width) pairs of positive whole numbers, else FolderError."""
    pairs = list(pairs)
    if len(pairs) != count:
        raise FolderError(f"{where}: got {count} masks but {len(pairs)} {what}; pass one per mask")
    checked = []
    for pair in pairs:
        numbers = list(pair) if isinstance(pair, Sequence | np.ndarray) else []
        whole = [
            int(n)
            for n in numbers
            if isinstance(n, int | np.integer) and not isinstance(n, bool) and n > 0
        ]
        if len(numbers) != 2 or len(whole) != 2:
            raise FolderError(
                f"{where}: {what} {pair!r} is not a (height, width) pair of positive whole numbers"
            )
        checked.append((whole[0], whole[1]))
    return checked


# ---------------------------------------------------------------------------------------------
# A clinician's own coarse masks


def coarse_file(folder: Path | str, image_id: str) -> Path | None:
    """The clinician's coarse mask of `image_id` in folder/coarse/, or None when it has none.

    Named <id>.png or <id>_segmentation.png (one of them: both is an error).
    """
    image_id = check_id(image_id, f"cannot look up coarse masks in {folder}")
    base = Path(folder) / COARSE_FOLDER
    found = [base / f"{image_id}{tail}.png" for tail in ("", "_segmentation")]
    found = [file for file in found if file.is_file()]
    check_inside(Path(folder), found)
    if len(found) > 1:
        raise FolderError(
            f"{found[0]} and {found[1]} are both coarse masks of {image_id!r}; keep one of them"
        )
    return found[0] if found else None


def read_coarse(file: Path, image_id: str, label: int, size: tuple[int, int]) -> np.ndarray:
    """A clinician's coarse mask as classes (0 background, label + 1 lesion) at its image's
    `size`, once its size and values are right: 0/255 (any lesion) or 0/1/2 (classes)."""
    mask, found = _load(file, "L")
    if found != tuple(size):
        raise FolderError(
            f"coarse mask {file} is {found[0]}x{found[1]} but its image is {size[0]}x{size[1]} "
            "(height x width); draw the coarse mask on the full image"
        )
    values = set(_values(mask).tolist())
    if values <= {0, 255}:
        return np.where(mask == 255, label + 1, 0).astype(np.uint8)
    if not values <= {0, 1, 2}:
        raise FolderError(
            f"coarse mask {file} holds the values {sorted(values)[:8]}, but coarse masks hold 0 "
            "(background) and 255 (lesion), or the classes 0, 1 (benign), 2 (malignant); save "
            "it without smoothed edges (no antialiasing) in one of these encodings"
        )
    lesion = sorted(values - {0})
    if lesion and lesion != [label + 1]:
        raise FolderError(
            f"coarse mask {file} holds lesion class {lesion} but {image_id!r} is labelled "
            f"{label} ({CLASS_NAMES[label + 1]}, class {label + 1}); correct the label or the "
            "mask, or save the mask as 0/255"
        )
    return mask.astype(np.uint8)
