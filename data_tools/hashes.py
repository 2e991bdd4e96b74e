"""Image hashes at data-set scale: hashing in parallel, a per-file cache, shard files, and grouping.

    python -m data_tools.hashes data/clean.jsonl --shard 3/64 --out hashes/h-3.npz   # one job of an array
    python -m data_tools dedup --task caption data/clean.jsonl --hashes 'hashes/h-*.npz' --out data/d.jsonl

A hash table holds, per image file: its path, size and modification time, the hash mode, the 64-bit
perceptual hash, the 16x16 colour grid, and the SHA-256 of its pixels (exact mode, or where computed) and of
its bytes (fast mode). The same file format serves as the cache (`.data_tools_hashes.npz` next to the
JSONL file by default) and as the shard files that `dedup`, `split` and `check-leakage` merge (`--hashes`).

Hash modes (`--exact-hash` picks the second):
- fast (default): JPEGs are decoded reduced in the DCT domain (`hashing.hash_image_fast`: libjpeg-turbo
  through simplejpeg, or Pillow's draft mode), other formats in full. Exact duplicates keep their meaning,
  identical decoded pixels: files with equal bytes are identical without decoding, and the pixel SHA-256 is
  computed (full decode) only for images whose fast hashes are near duplicates of another's, the only ones
  that can have the same pixels as another file.
- exact: `hashing.hash_image` for every image, the hashes of a full decode.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import multiprocessing
import os
import signal
import sys
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import DataError
from .files import atomic_write, check_outputs
from .hashing import (
    COLOUR_GRID,
    DEFAULT_NEAR_THRESHOLD,
    centre_groups,
    colours_match_pairs,
    content_hash,
    group_ids,
    hash_image,
    hash_image_fast,
    near_pairs,
)

MODES = ("fast", "exact")
FORMAT = "data_tools.image_hashes"
# 3: fast hashes of JPEGs whose sides are not multiples of the decode reduction changed (the picture's
# true extent is resampled); a cache or hash file of version 2 is hashed again, never reused.
VERSION = 3
CACHE_NAME = ".data_tools_hashes.npz"
NOT_IN_HASHES = "not_in_hashes"
COLOUR_BYTES = COLOUR_GRID * COLOUR_GRID * 3
# Below this many images a process pool costs more than it saves.
MIN_PARALLEL = 64
_ARRAYS = {  # name -> (dtype, shape after n)
    "mode": (np.uint8, ()),
    "size": (np.int64, ()),
    "mtime_ns": (np.int64, ()),
    "phash": (np.uint64, ()),
    "colours": (np.uint8, (COLOUR_BYTES,)),
    "file_sha256": (np.uint8, (32,)),
    "pixel_sha256": (np.uint8, (32,)),
    "has_pixels": (np.bool_, ()),
}


def default_workers() -> int:
    """All the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Descriptor:
    """Closes a file descriptor when no table refers to it any more."""

    def __init__(self, fd: int):
        self.fd = fd

    def __del__(self):
        os.close(self.fd)


class StoredRows:
    """A 2-D uint8 array kept in the uncompressed .npz files it was loaded from, of which rows are read on
    demand (`rows[index]`): a million 768-byte colour grids need not be in memory to check a few near pairs.

    The files stay open, so a file replaced meanwhile (the cache, saved again) is still read as it was.
    `np.asarray(rows)` reads it all.
    """

    def __init__(self, parts: list[tuple], width: int):
        self.parts = parts  # (file name, descriptor, offset of row 0, rows, _Descriptor closing it)
        self.width = width
        self.starts = np.cumsum([0] + [p[3] for p in parts])
        self.shape = (int(self.starts[-1]), width)
        self.dtype = np.dtype(np.uint8)

    @staticmethod
    def open(path: str | os.PathLike, member: str, n: int, width: int) -> StoredRows:
        """The array `member` (e.g. "colours") of an .npz file written by `np.savez`; ValueError if it is
        not an uncompressed (n, width) uint8 array there."""
        with zipfile.ZipFile(path) as z:
            info = z.getinfo(member + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"array {member!r} is compressed")
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)  # a zip local file header: name and extra field lengths at bytes 26-29
            if local[:4] != b"PK\x03\x04":
                raise ValueError(f"array {member!r}: bad zip entry")
            f.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                   + int.from_bytes(local[28:30], "little"))
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            if shape != (n, width) or dtype != np.uint8 or fortran:
                raise ValueError(f"array {member!r} is {dtype}{shape}, expected {(n, width)}")
            offset = f.tell()
            fd = os.dup(f.fileno())
        return StoredRows([(str(path), fd, offset, n, _Descriptor(fd))], width)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        """Rows at an integer array (or list) of indices, in that order, as an (len(index), width) array."""
        index = np.asarray(index, np.int64).ravel()
        wanted, where = np.unique(index, return_inverse=True)
        out = np.empty((len(wanted), self.width), np.uint8)
        if not len(wanted):
            return out
        if wanted[0] < 0 or wanted[-1] >= len(self):
            raise IndexError("row index out of range")
        # One read per run of consecutive rows, within one file.
        breaks = np.flatnonzero((np.diff(wanted) != 1)
                                | (np.searchsorted(self.starts, wanted[1:], "right")
                                   != np.searchsorted(self.starts, wanted[:-1], "right"))) + 1
        bounds = np.concatenate(([0], breaks, [len(wanted)])).tolist()
        for a, b in itertools.pairwise(bounds):
            part = int(np.searchsorted(self.starts, wanted[a], "right")) - 1
            name, fd, offset = self.parts[part][:3]
            first = int(wanted[a] - self.starts[part])
            size = (b - a) * self.width
            data = os.pread(fd, size, offset + first * self.width)
            if len(data) != size:
                raise ValueError(f"{name}: the file is shorter than its header says")
            out[a:b] = np.frombuffer(data, np.uint8).reshape(b - a, self.width)
        return out[where.ravel()]

    def __array__(self, dtype=None, copy=None):
        whole = self[np.arange(len(self))]
        return whole if dtype is None else whole.astype(dtype)

    @staticmethod
    def join(parts: list[StoredRows]) -> StoredRows:
        return StoredRows([p for rows in parts for p in rows.parts], parts[0].width)


@dataclass
class HashTable:
    """Hashes of n image files, as arrays (see the module docstring); `paths` are absolute."""

    paths: list[str] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(
        default_factory=lambda: {k: np.zeros((0, *s), t) for k, (t, s) in _ARRAYS.items()}
    )
    # Loaded under another root than the file was saved with: the paths under the saved root, where a
    # lookup that finds nothing under the new one looks next (`ImageHasher`); else None.
    saved_paths: list[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getattr__(self, name: str) -> np.ndarray:
        if name in _ARRAYS:
            return self.__dict__["arrays"][name]
        raise AttributeError(name)

    def take(self, index) -> HashTable:
        """The entries at `index`, in that order."""
        index = np.asarray(index, np.int64).tolist()
        saved = None if self.saved_paths is None else [self.saved_paths[i] for i in index]
        return HashTable([self.paths[i] for i in index], {k: v[index] for k, v in self.arrays.items()}, saved)

    @staticmethod
    def concat(tables: list[HashTable]) -> HashTable:
        """All entries of several tables, in order."""
        tables = [t for t in tables if len(t)] or [HashTable()]
        if len(tables) == 1:
            return tables[0]
        arrays = {}
        for k in _ARRAYS:
            parts = [t.arrays[k] for t in tables]
            stored = all(isinstance(a, StoredRows) for a in parts)
            arrays[k] = StoredRows.join(parts) if stored else np.concatenate([np.asarray(a) for a in parts])
        saved = None
        if any(t.saved_paths is not None for t in tables):
            saved = [p for t in tables for p in (t.paths if t.saved_paths is None else t.saved_paths)]
        return HashTable([p for t in tables for p in t.paths], arrays, saved)

    def save(self, path: str | os.PathLike, root: str | os.PathLike | None = None) -> None:
        """Write the table atomically: a unique temporary file in the same folder, fsync, then rename.

        Paths under `root` are stored relative to it (shard files move between machines with their data).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        root_text = str(Path(root).resolve()) if root is not None else ""
        stored = [_relative(p, root_text) for p in self.paths]
        meta = json.dumps({"format": FORMAT, "version": VERSION, "root": root_text, "n": len(self)})
        with atomic_write(path, "wb") as f:
            np.savez(
                f,
                meta=np.frombuffer(meta.encode(), np.uint8),
                paths=np.frombuffer("\0".join(stored).encode("utf-8", "surrogateescape"), np.uint8),
                **self.arrays,
            )

    @staticmethod
    def load(path: str | os.PathLike, root: str | os.PathLike | None = None) -> HashTable:
        """Read a table written by `save`; raises ValueError naming what is wrong with the file.

        Stored relative paths are joined with `root` when given (the image root wherever the data now is),
        else with the root they were saved under; with both, `saved_paths` keeps the latter.
        """
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                if meta.get("format") != FORMAT:
                    raise ValueError("not an image hash file")
                if meta.get("version") != VERSION:
                    raise ValueError(f"hash format version {meta.get('version')}, this data_tools reads "
                                     f"version {VERSION}: hash the images again")
                n = int(meta["n"])
                blob = z["paths"].tobytes().decode("utf-8", "surrogateescape")
                stored = blob.split("\0") if n else []
                arrays = {k: z[k] for k in _ARRAYS if k != "colours"}
            arrays["colours"] = StoredRows.open(path, "colours", n, COLOUR_BYTES)
        except (OSError, KeyError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: unreadable image hash file ({e})") from None
        for k, (dtype, shape) in _ARRAYS.items():
            if arrays[k].dtype != dtype or arrays[k].shape != (n, *shape):
                raise ValueError(
                    f"{path}: array {k!r} is {arrays[k].dtype}{arrays[k].shape}, expected {(n, *shape)}"
                )
        if len(stored) != n or not np.isin(arrays["mode"], (0, 1)).all():
            raise ValueError(f"{path}: {len(stored)} paths for {n} entries, or an unknown hash mode")
        saved_root = meta.get("root") or ""
        root = str(Path(root).resolve()) if root is not None else saved_root

        def under(base: str) -> list[str]:
            return [p if os.path.isabs(p) or not base else os.path.join(base, p) for p in stored]

        saved = under(saved_root) if saved_root and root != saved_root else None
        return HashTable(under(root), arrays, saved)


def _relative(path: str, root: str) -> str:
    if root and path.startswith(root.rstrip(os.sep) + os.sep):
        return path[len(root.rstrip(os.sep)) + 1 :]
    return path


def hash_file_names(patterns: list[str]) -> list[str]:
    """The hash files that glob patterns (or plain names) name, in order; `DataError` for a pattern that
    matches none."""
    files = []
    for pattern in patterns:
        found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not found:
            raise DataError(NOT_IN_HASHES, f"no hash file matches {pattern!r}", path=pattern)
        files += found
    return files


def load_hash_files(patterns: list[str], root: str | os.PathLike | None = None) -> HashTable:
    """Merge hash files (glob patterns allowed) into one table; a later file's entry for a path wins.

    `root`: the image root the stored relative paths are joined with (default: the root each file was
    written with; see `HashTable.load`)."""
    files = hash_file_names(patterns)
    tables = []
    for f in files:
        try:
            tables.append(HashTable.load(f, root))
        except ValueError as e:
            raise DataError(NOT_IN_HASHES, str(e).removeprefix(f"{f}: "), path=f) from None
    table = HashTable.concat(tables)
    modes = set(np.unique(table.mode).tolist())
    if len(modes) > 1:
        raise DataError(
            NOT_IN_HASHES,
            "the hash files mix fast and exact hashes; make them all with one mode",
            path=files[0],
        )
    last = {p: i for i, p in enumerate(table.paths)}
    return table.take(sorted(last.values())) if len(last) < len(table) else table


def _hash_one(job: tuple[str, int]) -> tuple:
    """Worker: hash one file; ("ok", size, mtime_ns, phash, colours, file_sha, pixel_sha) or an error."""
    path, mode = job
    try:
        if mode == 0:
            try:
                st = os.stat(path)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = -1, -1  # hash_image reports the problem
            h = hash_image(path)
            return "ok", size, mtime, h.phash, h.colours, bytes(32), bytes.fromhex(h.content)
        f = hash_image_fast(path)
        return "ok", f.size, f.mtime_ns, f.phash, f.colours, f.file_sha256, None
    except DataError as e:
        # DataError does not survive pickling across processes; send its parts.
        return "error", e.reason, e.message, e.path, e.field


def _pixels_one(path: str) -> tuple:
    try:
        return "ok", bytes.fromhex(content_hash(path))
    except DataError as e:
        return "error", e.reason, e.message, e.path, e.field


def _run(fn, jobs: list, workers: int, progress: bool, desc: str):
    """Yield fn(job) for each job in order, in a process pool when it pays, with a progress bar."""
    bar = dict(desc=desc, unit="img", total=len(jobs), disable=not progress or len(jobs) < 100)
    if workers <= 1 or len(jobs) < MIN_PARALLEL:
        yield from (fn(j) for j in tqdm(jobs, **bar))
        return
    # Not `with Pool()`: its exit terminates the workers, with a SIGTERM that can be lost on one waiting for
    # the task queue (then both wait forever); a finished pool is closed and joined instead.
    pool = multiprocessing.get_context().Pool(min(workers, len(jobs)), initializer=default_signals)
    try:
        yield from tqdm(pool.imap(fn, jobs, chunksize=max(1, min(64, len(jobs) // (8 * workers)))), **bar)
    except BaseException:  # an error, Ctrl-C or SIGTERM, or the caller stopped reading
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()


def default_signals() -> None:
    """In a worker: SIGTERM ends it at once (not through a Python handler that runs only between bytecodes,
    which `Pool.terminate` relies on), and Ctrl-C is the main process's to handle."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def hamming_threshold(text: str) -> int:
    """--near-threshold: a pHash Hamming distance, 0 to 64 bits."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 64:
        raise argparse.ArgumentTypeError(f"expected a whole number of bits from 0 to 64, got {text!r}")
    return value


def _raise(result: tuple) -> None:
    if result[0] == "error":
        _, reason, message, path, field_ = result
        raise DataError(reason, message, path=path, field=field_)


class ImageHasher:
    """Hash image files through a cache, in parallel; or look them up in given hash files (`--hashes`).

    `stats` counts the files hashed, the cache hits and the pixel hashes computed, for the report and tests.
    """

    def __init__(
        self,
        mode: str = "fast",
        *,
        workers: int | None = None,
        cache: str | os.PathLike | None = None,
        hash_files: HashTable | None = None,
        progress: bool = True,
    ):
        if mode not in MODES:
            raise ValueError(f"hash mode must be one of {MODES}, got {mode!r}")
        self.mode, self.code = mode, MODES.index(mode) ^ 1  # stored codes: 0 exact, 1 fast
        self.workers = workers or default_workers()
        self.progress = progress
        self.cache_path = Path(cache) if cache is not None else None
        self.stats = {"hashed": 0, "cached": 0, "pixels_hashed": 0}
        self.given = hash_files
        self.hash_files_read: list[str] = []  # the files of `hash_files`, inputs that no output may replace
        if hash_files is not None and len(hash_files):
            given_mode = MODES[int(hash_files.mode[0]) ^ 1]
            if given_mode != mode:
                self.mode, self.code = given_mode, int(hash_files.mode[0])
        self._cache = self._load_cache()
        self._dirty = False
        self._index = self._saved_index = None

    def _load_cache(self) -> tuple[HashTable, dict]:
        table = HashTable()
        if self.cache_path is not None and self.cache_path.exists():
            try:
                table = HashTable.load(self.cache_path)
            except ValueError as e:
                # Never trusted: hashed again, and the file is replaced on save.
                warnings.warn(f"ignoring the image hash cache: {e}", stacklevel=3)
        return table, {(p, int(m)): i for i, (p, m) in enumerate(zip(table.paths, table.mode.tolist()))}

    def hash(self, paths: list[str]) -> tuple[HashTable, np.ndarray]:
        """Hashes of the given absolute paths (distinct): a table and the entry of each path in it.

        The table may hold other entries too (the cache's, or the hash files'); use the returned index.
        Raises the first failing image's `DataError`.
        """
        if self.given is not None:
            return self._lookup(paths)
        cache, where = self._cache
        rows = np.full(len(paths), -1, np.int64)
        todo = []
        for k, p in enumerate(paths):
            i = where.get((p, self.code))
            if i is not None:
                try:
                    st = os.stat(p)
                except OSError:
                    st = None
                if st is not None and st.st_size == cache.size[i] and st.st_mtime_ns == cache.mtime_ns[i]:
                    rows[k] = i
                    continue
            todo.append(k)
        self.stats["cached"] += len(paths) - len(todo)
        if todo:
            new = self._compute([paths[k] for k in todo])
            base = len(cache)
            cache = new if base == 0 else HashTable.concat([cache, new])
            for k, key in enumerate(todo):
                where[(paths[key], self.code)] = base + k
                rows[key] = base + k
            self._cache, self._dirty = (cache, where), True
        return cache, rows

    def _compute(self, paths: list[str]) -> HashTable:
        n = len(paths)
        arrays = {k: np.zeros((n, *shape), dtype) for k, (dtype, shape) in _ARRAYS.items()}
        arrays["mode"][:] = self.code
        # Results go straight into the arrays: a list of a million results would hold ~1 GB.
        for k, r in enumerate(
            _run(_hash_one, [(p, self.code) for p in paths], self.workers, self.progress, "hashing images")
        ):
            _raise(r)
            _, arrays["size"][k], arrays["mtime_ns"][k], arrays["phash"][k] = r[:4]
            arrays["colours"][k] = np.frombuffer(r[4], np.uint8)
            arrays["file_sha256"][k] = np.frombuffer(r[5], np.uint8)
            if r[6] is not None:
                arrays["pixel_sha256"][k] = np.frombuffer(r[6], np.uint8)
                arrays["has_pixels"][k] = True
        self.stats["hashed"] += n
        return HashTable(list(paths), arrays)

    def _lookup(self, paths: list[str]) -> tuple[HashTable, np.ndarray]:
        given = self.given
        if self._index is None:
            self._index = {p: i for i, p in enumerate(given.paths)}
        rows = np.empty(len(paths), np.int64)
        for k, p in enumerate(paths):
            i = self._index.get(p)
            if i is None and given.saved_paths is not None:
                # Not under the image root, but where the hash file was made (the data has not moved, and
                # this JSONL is in another folder than the hashed one).
                if self._saved_index is None:
                    self._saved_index = {q: j for j, q in enumerate(given.saved_paths)}
                i = self._saved_index.get(p)
                if i is not None:
                    given.paths[i] = p  # where the image is, for the pixel hashes read from it
            if i is None:
                raise DataError(
                    NOT_IN_HASHES,
                    "image is in none of the --hashes files (hash it with python -m data_tools.hashes)",
                    path=p,
                    field="image",
                )
            rows[k] = i
        self.stats["cached"] += len(paths)
        return given, rows

    def add_pixels(self, table: HashTable, index: np.ndarray) -> None:
        """Pixel SHA-256 (full decode) of the entries at `index` that lack it, here and in the cache."""
        index = np.asarray(index, np.int64)
        index = index[~table.has_pixels[index]]
        if not len(index):
            return
        results = list(
            _run(
                _pixels_one,
                [table.paths[i] for i in index.tolist()],
                self.workers,
                self.progress,
                "pixel hashes of near duplicates",
            )
        )
        for r in results:
            _raise(r)
        self.stats["pixels_hashed"] += len(index)
        table.pixel_sha256[index] = np.frombuffer(b"".join(r[1] for r in results), np.uint8).reshape(-1, 32)
        table.has_pixels[index] = True
        cache, where = self._cache
        for i in index.tolist():
            c = where.get((table.paths[i], self.code))
            if c is not None and cache.size[c] == table.size[i] and cache.mtime_ns[c] == table.mtime_ns[i]:
                cache.pixel_sha256[c] = table.pixel_sha256[i]
                cache.has_pixels[c] = True
                self._dirty = True

    def save(self) -> None:
        """Write the cache if this run added to it; an unwritable cache is a warning, not a failure."""
        if self.cache_path is None or not self._dirty:
            return
        try:
            self._cache[0].save(self.cache_path, root=self.cache_path.parent)
            self._dirty = False
        except OSError as e:
            print(f"warning: cannot write the image hash cache {self.cache_path}: {e}", file=sys.stderr)


@dataclass
class Grouping:
    """Image-level result of `group_images`: content id and group id per image, and the near pairs."""

    content: np.ndarray  # equal ids <=> identical pixels; an id is the first image with that content
    group: np.ndarray  # connected components of identical contents and near pairs; id = first image
    near_i: np.ndarray  # near-duplicate pairs (phash within the threshold, colours match), image indices
    near_j: np.ndarray
    near_d: np.ndarray

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Per image, the image it is merged with by `dedup` and the pHash Hamming distance to it (at most
        the threshold; 0 for identical pixels): `hashing.centre_groups` over the contents in image order,
        so that an earlier image is the centre. `group` joins chains of near pairs whose ends are far apart
        (right for a split, against leakage); a centre's group holds only images near the centre."""
        content = self.content
        centre, distance = centre_groups(len(content), content[self.near_i], content[self.near_j],
                                         self.near_d)
        return centre[content], distance[content]


def first_index(keys: np.ndarray) -> np.ndarray:
    """For each row of a 2-D uint8 array, the index of the first row equal to it."""
    if not len(keys):
        return np.zeros(0, np.int64)
    view = np.ascontiguousarray(keys).view(np.dtype((np.void, keys.shape[1]))).ravel()
    _, first, inverse = np.unique(view, return_index=True, return_inverse=True)
    return first[inverse.ravel()].astype(np.int64)


def _near(table: HashTable, index: np.ndarray, among: np.ndarray, threshold: int):
    ii, jj, dd = near_pairs(table.phash[index[among]], threshold)
    i, j = among[ii], among[jj]
    ok = colours_match_pairs(table.colours, index[i], index[j])
    return i[ok], j[ok], dd[ok]


def group_images(
    table: HashTable,
    threshold: int | None,
    hasher: ImageHasher | None = None,
    index: np.ndarray | None = None,
) -> Grouping:
    """Identical and near-duplicate images among the entries `index` of a table (default: all), as
    `hashing.image_groups` defines them; the result is by position in `index`.

    In fast mode, images with equal file bytes are identical without decoding; pixel hashes are computed
    (by `hasher`) for the images whose fast hashes are near another's (at `threshold` or the default
    threshold, whichever is larger), since only those can have another file's pixels.
    """
    index = np.arange(len(table)) if index is None else np.asarray(index, np.int64)
    n = len(index)
    fast = n > 0 and int(table.mode[index[0]]) == 1
    if not fast:
        content = first_index(table.pixel_sha256[index])
        reps = np.flatnonzero(content == np.arange(n))
        near = _near(table, index, reps, threshold) if threshold is not None and threshold >= 0 else None
    else:
        by_bytes = first_index(table.file_sha256[index])
        reps = np.flatnonzero(by_bytes == np.arange(n))
        near_on = threshold is not None and threshold >= 0
        # A JPEG and a PNG of its pixels can be ~2 bits apart in fast hashes: look for identical pixels at
        # the default radius at least, then keep as near pairs only those within the user's threshold.
        radius = max(threshold, DEFAULT_NEAR_THRESHOLD) if near_on else DEFAULT_NEAR_THRESHOLD
        cand = _near(table, index, reps, radius)
        need = np.unique(np.concatenate(cand[:2]))
        if len(need):
            if hasher is None:
                raise ValueError("fast-mode hashes need an ImageHasher to confirm identical pixels")
            hasher.add_pixels(table, index[need])
        # Key: the pixel hash where computed (candidates), else the bytes hash; a tag byte keeps them apart.
        is_cand = np.zeros(n, bool)
        is_cand[need] = True
        rep_cand = is_cand[by_bytes]
        keys = np.zeros((n, 33), np.uint8)
        keys[:, 0] = rep_cand
        keys[:, 1:] = np.where(
            rep_cand[:, None], table.pixel_sha256[index[by_bytes]], table.file_sha256[index]
        )
        content = first_index(keys)
        near = tuple(a[cand[2] <= threshold] for a in cand) if near_on else None
    if near is None:
        near = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8))
    else:
        # Pairs of one content (fast mode: a JPEG and a PNG of the same pixels) are no near duplicates.
        keep = content[near[0]] != content[near[1]]
        near = tuple(a[keep] for a in near)
    others = np.flatnonzero(content != np.arange(n))
    group = group_ids(n, np.concatenate([content[others], near[0]]), np.concatenate([others, near[1]]))
    return Grouping(content, group, *near)


def default_cache(jsonl: str | os.PathLike) -> Path:
    """The cache file used when none is given: next to the (first) JSONL file."""
    return Path(jsonl).resolve().parent / CACHE_NAME


def add_hash_arguments(parser: argparse.ArgumentParser, *, consumer: bool = True) -> None:
    """The hashing options shared by dedup, split, check-leakage and the hash command."""
    parser.add_argument(
        "--workers", type=int, default=None, help="processes hashing images (default: all cores)"
    )
    parser.add_argument(
        "--exact-hash",
        action="store_true",
        help="decode every image in full (the hashes of a full decode; slower on JPEGs)",
    )
    parser.add_argument(
        "--hash-cache", help=f"hash cache file (default: {CACHE_NAME} next to the JSONL file)"
    )
    parser.add_argument("--no-hash-cache", action="store_true", help="neither read nor write a hash cache")
    if consumer:
        parser.add_argument(
            "--hashes",
            action="append",
            metavar="FILE",
            help="hash files from python -m data_tools.hashes (glob patterns allowed, repeatable): "
            "use them instead of hashing; every image must be in one",
        )


def hasher_from_args(args, jsonl, *, progress: bool = True, inputs: list | None = None) -> ImageHasher:
    """An `ImageHasher` for the parsed options of `add_hash_arguments`; a hash file's relative paths are
    joined with `--image-root` where the command has one and it is given, else with `jsonl`'s folder.
    `inputs`: the command's input files (default: `jsonl`), which the cache must not be."""
    # The stored relative paths are under the consumer's image root, by default the JSONL's folder (not
    # the folder the hash file was made in, which may have moved since).
    root = getattr(args, "image_root", None) or Path(jsonl).parent
    files = hash_file_names(args.hashes) if getattr(args, "hashes", None) else []
    given = load_hash_files(files, root) if files else None
    cache = None if args.no_hash_cache or given is not None else (args.hash_cache or default_cache(jsonl))
    # Checked before the cache is read, and long before it would be written over the input.
    check_outputs({"--hash-cache": cache}, inputs=inputs or [jsonl])
    hasher = ImageHasher(
        "exact" if args.exact_hash else "fast",
        workers=args.workers,
        cache=cache,
        hash_files=given,
        progress=progress,
    )
    hasher.hash_files_read = files
    return hasher


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/N such as 0/8, got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"shard i/N needs 0 <= i < N, got {text!r}")
    return i, n


def shard_of(relative_path: str, n: int) -> int:
    """The shard of an image: a hash of its path relative to the image root, the same in every job."""
    return zlib.crc32(relative_path.encode("utf-8", "surrogateescape")) % n


def main(argv: list[str] | None = None) -> int:
    """`python -m data_tools.hashes`: hash the images of JSONL files (or a shard of them) into a hash file."""
    from .dedup import iter_images  # the row reader lives with dedup; imported here to avoid a cycle

    parser = argparse.ArgumentParser(
        prog="python -m data_tools hash",
        description="Hash the images of JSONL files into a file that dedup, split and "
        "check-leakage read with --hashes.",
    )
    parser.add_argument("inputs", nargs="+", metavar="IN", help="clean JSONL files")
    parser.add_argument("--out", required=True, help="hash file to write (.npz)")
    parser.add_argument(
        "--shard",
        type=_shard,
        default=(0, 1),
        metavar="i/N",
        help="hash only shard i of N (by a hash of the image path), e.g. $SLURM_ARRAY_TASK_ID/64",
    )
    parser.add_argument(
        "--image-root",
        metavar="DIR",
        help="folder the rows' image paths are relative to, and the stored paths too; give dedup, split and "
        "check-leakage the same --image-root (default: each JSONL's own folder, paths stored relative to "
        "the first JSONL's folder)",
    )
    parser.add_argument(
        "--allow-outside-root", action="store_true", help="allow image paths outside the image root"
    )
    add_hash_arguments(parser, consumer=False)
    args = parser.parse_args(argv)
    root = Path(args.image_root or Path(args.inputs[0]).parent).resolve()
    i, n = args.shard
    try:
        hasher = hasher_from_args(args, args.inputs[0], inputs=args.inputs)
        check_outputs({"--out": args.out, "the hash cache": hasher.cache_path}, inputs=args.inputs)
        paths = {}
        for f in args.inputs:
            rows = iter_images(f, image_root=args.image_root, allow_outside_root=args.allow_outside_root)
            for _, _, image in rows:
                if image is not None:
                    paths.setdefault(str(image), None)
        mine = [p for p in paths if shard_of(_relative(p, str(root)), n) == i]
        table, rows = hasher.hash(mine)
        table = table.take(rows)
        table.save(args.out, root=root)
        hasher.save()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"shard {i}/{n}: {len(table)} of {len(paths)} images ({hasher.stats['hashed']} hashed, "
        f"{hasher.stats['cached']} from the cache, {hasher.mode} mode) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
