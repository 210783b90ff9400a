"""Omniglot for few-shot learning: zips or an extracted folder -> 28x28 uint8 classes split by alphabet.

Accepted layouts of ``data_dir`` (checked in this order):

* zip files ``*.zip`` whose members follow ``<set>/<Alphabet>/<characterNN>/<id>_<drawer>.png`` (the official
  ``images_background*.zip`` / ``images_evaluation*.zip``);
* extracted set folders ``data_dir/<set>/<Alphabet>/<characterNN>/*.png``;
* one extracted set ``data_dir/<Alphabet>/<characterNN>/*.png``.

Characters present in several sources (Greek and Latin are in both small background sets) count once.
Images are 105x105 binary PNGs with white background; they are inverted (strokes = 255) and resized to 28x28
with PIL's box filter (area averaging).

**Split (documented, seeded).**  Classes are split *by alphabet*, never by image: the alphabets are sorted by
name and permuted with ``numpy.random.default_rng(seed)``; alphabets are then assigned to *test* until it holds
at least ``test_fraction`` of the characters, then to *validation* until it holds ``val_fraction``, the rest to
*train*.  With the project's two small background sets (8 distinct alphabets, 242 characters) and seed 0 this
gives the split printed by ``tfbitmeta`` and recorded in ``run.json``.  Only the training classes are augmented
with 90/180/270 degree rotations, each rotation a new class (docs/fewshot.md), so train has 4x its characters.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import re
import zipfile
from pathlib import Path

import numpy as np

from tfbitmeta.errors import TfbitmetaError

IMAGE_SIZE = 28
CHAR_DIR = re.compile(r"^character\d+$")
LAYOUT_HELP = ("expected Omniglot zips (images_background*.zip) or folders <set>/<Alphabet>/<characterNN>/*.png "
               "(e.g. images_background/Greek/character01/0394_01.png)")


@dataclasses.dataclass
class OmniglotSplit:
    """Images of one split: ``images[c]`` are the drawings of class ``c`` (uint8, (drawers, 28, 28, 1))."""
    name: str
    images: np.ndarray  # (classes, drawers, 28, 28, 1) uint8, strokes = 255
    class_names: list[str]  # "Alphabet/characterNN" (+ "@rot90" etc. for rotated training classes)
    alphabets: list[str]

    @property
    def num_classes(self) -> int:
        return int(self.images.shape[0])


@dataclasses.dataclass
class Omniglot:
    train: OmniglotSplit
    val: OmniglotSplit
    test: OmniglotSplit
    seed: int
    source: str

    def describe(self) -> dict:
        out = {"name": "omniglot", "source": self.source, "seed": self.seed, "image_size": IMAGE_SIZE}
        for s in (self.train, self.val, self.test):
            out[s.name] = {"alphabets": s.alphabets, "classes": s.num_classes,
                           "drawers": int(s.images.shape[1])}
        out["train"]["rotations"] = [0, 90, 180, 270]
        return out


def _decode(data: bytes, size: int | None = IMAGE_SIZE) -> np.ndarray:
    """PNG bytes -> uint8 strokes bright on 0, box-resized to ``size`` x ``size`` (``None``: native resolution)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("L")
    img = Image.fromarray(255 - np.asarray(img, np.uint8))  # strokes bright, background 0
    if size is None:
        return np.asarray(img, np.uint8)
    return np.asarray(img.resize((size, size), Image.BOX), np.uint8)


def _parse_member(parts: list[str]):
    """(alphabet, character, drawer) from the last three path components + file name, or None."""
    if len(parts) < 3 or not parts[-1].lower().endswith(".png") or not CHAR_DIR.match(parts[-2]):
        return None
    stem = parts[-1][:-4]
    try:
        drawer = int(stem.split("_")[-1])
    except ValueError:
        return None
    return parts[-3], parts[-2], drawer


def _read_sources(root: Path, size: int | None = IMAGE_SIZE) -> tuple[dict, str]:
    chars: dict[tuple[str, str], dict[int, np.ndarray]] = {}

    def add(key, drawer, data):
        if drawer not in chars.setdefault(key, {}):
            chars[key][drawer] = _decode(data, size)

    zips = sorted(root.glob("*.zip"))
    if zips:
        for zp in zips:
            try:
                with zipfile.ZipFile(zp) as zf:
                    for name in zf.namelist():
                        parsed = _parse_member(name.split("/"))
                        if parsed:
                            add(parsed[:2], parsed[2], zf.read(name))
            except zipfile.BadZipFile:
                raise TfbitmetaError(f"{zp} is not a valid zip file") from None
        return chars, "zips: " + ", ".join(z.name for z in zips)
    for png in sorted(root.rglob("*.png")):
        rel = png.relative_to(root).parts
        if len(rel) not in (3, 4):
            continue
        parsed = _parse_member(list(rel))
        if parsed:
            add(parsed[:2], parsed[2], png.read_bytes())
    return chars, f"folder: {root}"


@functools.lru_cache(maxsize=4)
def _load_characters(root: str, size: int | None = IMAGE_SIZE):
    path = Path(root)
    if not path.exists():
        raise TfbitmetaError(f"Omniglot folder {root} does not exist: point data_dir at it (the project's copy "
                             f"is ../shared/data/omniglot); {LAYOUT_HELP}", param="data_dir")
    if not path.is_dir():
        raise TfbitmetaError(f"Omniglot folder {root} is not a folder; {LAYOUT_HELP}", param="data_dir")
    chars, source = _read_sources(path, size)
    if not chars:
        raise TfbitmetaError(f"no Omniglot images found in {root}: {LAYOUT_HELP}")
    counts = {len(v) for v in chars.values()}
    drawers = min(counts)
    if drawers < 2:
        raise TfbitmetaError(f"Omniglot in {root} has characters with only {drawers} image(s); {LAYOUT_HELP}")
    keys = sorted(chars)
    images = np.stack([np.stack([chars[k][d] for d in sorted(chars[k])[:drawers]]) for k in keys])[..., None]
    return keys, images, source


def split_alphabets(alphabet_sizes: dict[str, int], seed: int, val_fraction: float, test_fraction: float):
    """The seeded alphabet split described in the module docstring: (train, val, test) lists of alphabets."""
    names = sorted(alphabet_sizes)
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    total = sum(alphabet_sizes.values())
    test, val, train = [], [], []
    for a in order:
        if sum(alphabet_sizes[t] for t in test) < test_fraction * total:
            test.append(a)
        elif sum(alphabet_sizes[v] for v in val) < val_fraction * total:
            val.append(a)
        else:
            train.append(a)
    if not train or not val or not test:
        raise TfbitmetaError(f"Omniglot has {len(names)} alphabet(s): need at least 3 to split train/val/test by "
                             f"alphabet")
    return sorted(train), sorted(val), sorted(test)


def rotate_classes(images: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """Every class plus its 90/180/270 degree rotations as new classes (4x classes)."""
    rots = [np.rot90(images, k, axes=(2, 3)) for k in range(4)]
    out_names = [n if k == 0 else f"{n}@rot{90 * k}" for k in range(4) for n in names]
    return np.ascontiguousarray(np.concatenate(rots)), out_names


def load_omniglot(data_dir, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.25,
                  rotations: bool = True, image_size: int | None = IMAGE_SIZE) -> Omniglot:
    """The split of the module docstring; ``image_size=None`` keeps the native resolution (the Hausdorff
    baseline's input), with the same classes and drawers in the same order."""
    keys, images, source = _load_characters(str(Path(data_dir).resolve()), image_size)
    sizes: dict[str, int] = {}
    for alphabet, _ in keys:
        sizes[alphabet] = sizes.get(alphabet, 0) + 1
    train_a, val_a, test_a = split_alphabets(sizes, seed, val_fraction, test_fraction)

    def subset(name, alphabets, rotate=False):
        idx = [i for i, (a, _) in enumerate(keys) if a in alphabets]
        names = [f"{keys[i][0]}/{keys[i][1]}" for i in idx]
        x = images[idx]
        if rotate:
            x, names = rotate_classes(x, names)
        return OmniglotSplit(name, x, names, list(alphabets))

    return Omniglot(subset("train", train_a, rotate=rotations), subset("val", val_a), subset("test", test_a),
                    seed, source)


# -- a user's test data: new alphabets, or the fixed one-shot runs --------------------------------------------
def load_test_folder(data_dir, image_size: int | None = IMAGE_SIZE) -> OmniglotSplit:
    """Every character of ``data_dir`` (the official ``images_evaluation`` layout, zipped or extracted, or any
    layout of the module docstring) as one test split, no rotations; ``image_size=None``: native resolution."""
    keys, images, _ = _load_characters(str(Path(data_dir).resolve()), image_size)
    alphabets = sorted({a for a, _ in keys})
    return OmniglotSplit("test", images, [f"{a}/{c}" for a, c in keys], alphabets)


RUN_LABELS = "class_labels.txt"
RUNS_HELP = ("expected the one-shot layout: runNN/class_labels.txt with lines 'runNN/test/itemMM.png "
             "runNN/training/classKK.png', and the images in runNN/test/ and runNN/training/")


@dataclasses.dataclass
class OneShotRun:
    """One fixed episode: class ``c`` is training image ``c`` (sorted by name) with its test items."""
    name: str
    images: np.ndarray  # (N, 1 + Q, 28, 28, 1) uint8: the training drawing, then the Q test drawings of the class
    native: np.ndarray  # the same at native resolution (the Hausdorff baseline's input)
    class_files: list[str]


def _run_sources(root: Path) -> list[tuple[str, callable]]:
    """(run name, read(relative path) -> bytes) for every run folder or zip member folder with class labels."""
    found = []
    for d in [root, *sorted(root.glob("*")), *sorted(root.glob("*/*"))]:
        if d.is_dir() and (d / RUN_LABELS).is_file():
            found.append((d.name, lambda rel, d=d: (d / rel).read_bytes()))
    if found:
        return found
    for zp in sorted(root.glob("*.zip")):
        try:
            zf = zipfile.ZipFile(zp)
        except zipfile.BadZipFile:
            raise TfbitmetaError(f"{zp} is not a valid zip file") from None
        for member in sorted(n for n in zf.namelist() if n.endswith("/" + RUN_LABELS) or n == RUN_LABELS):
            prefix = member[: -len(RUN_LABELS)]
            found.append((Path(prefix).name or zp.stem, lambda rel, zf=zf, p=prefix: zf.read(p + rel)))
    return found


def find_oneshot_runs(root: Path) -> bool:
    return Path(root).is_dir() and bool(_run_sources(Path(root)))


def _run_relative(path: str) -> str:
    """'run01/test/item01.png' -> 'test/item01.png' (the label file's paths start with the run's folder)."""
    parts = path.replace("\\", "/").split("/")
    if len(parts) < 2:
        raise TfbitmetaError(f"bad path {path!r} in {RUN_LABELS}; {RUNS_HELP}")
    return "/".join(parts[-2:])


def load_oneshot_runs(root) -> list[OneShotRun]:
    """The runs of the ``all_runs`` one-shot layout under ``root`` (folders, or zips holding them)."""
    root = Path(root)
    if not root.is_dir():
        raise TfbitmetaError(f"test folder {root} does not exist; {RUNS_HELP}")
    runs = []
    for name, read in _run_sources(root):
        pairs = []
        for line in read(RUN_LABELS).decode("utf-8", "replace").splitlines():
            if line.strip():
                tokens = line.split()
                if len(tokens) != 2:
                    raise TfbitmetaError(f"{name}/{RUN_LABELS}: bad line {line!r}; {RUNS_HELP}")
                pairs.append((_run_relative(tokens[0]), _run_relative(tokens[1])))
        if not pairs:
            raise TfbitmetaError(f"{name}/{RUN_LABELS} is empty; {RUNS_HELP}")
        classes = sorted({c for _, c in pairs})
        items = {c: sorted(t for t, cc in pairs if cc == c) for c in classes}
        if len({len(v) for v in items.values()}) != 1:
            raise TfbitmetaError(f"{name}: classes have different numbers of test items; the runs need the same "
                                 f"number per class")
        try:
            raw = [[read(c)] + [read(t) for t in items[c]] for c in classes]
        except (KeyError, FileNotFoundError) as e:
            raise TfbitmetaError(f"{name}: image missing ({e}); {RUNS_HELP}") from None
        small = np.stack([np.stack([_decode(b) for b in row]) for row in raw])[..., None]
        try:
            native = np.stack([np.stack([_decode(b, None) for b in row]) for row in raw])[..., None]
        except ValueError:
            raise TfbitmetaError(f"{name}: images of different sizes") from None
        runs.append(OneShotRun(name, small, native, classes))
    if not runs:
        raise TfbitmetaError(f"no {RUN_LABELS} found in {root}; {RUNS_HELP}")
    if len({r.images.shape[:2] for r in runs}) != 1:
        raise TfbitmetaError(f"the runs in {root} differ in classes or test items per class")
    return runs
