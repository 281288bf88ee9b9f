"""Getting the real datasets: Tiny ImageNet by download, Stanford Cars by hand.

:func:`download_tiny_imagenet` fetches the official zip with ``urllib`` into a
``.part`` file (resumed with an HTTP ``Range`` request after an interruption),
verifies its MD5, unpacks it safely and returns the dataset root (the folder
holding ``wnids.txt``). Stanford Cars is no longer served by its original site;
:func:`stanford_cars_instructions` says where to get it.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import shutil
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from finegrain.errors import DataError
from finegrain.progress import wanted as progress_wanted

log = logging.getLogger(__name__)

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_IMAGENET_DIR = "tiny-imagenet-200"
CHUNK = 1 << 16
TIMEOUT = 30.0
USER_AGENT = "finegrain-downloader/0.1 (+urllib)"


# --------------------------------------------------------------------------- Tiny ImageNet


def _find_root(dest: Path) -> Path | None:
    """An already unpacked Tiny ImageNet under ``dest`` (the folder holding ``wnids.txt``)."""
    for cand in (dest / TINY_IMAGENET_DIR, dest):
        if (cand / "wnids.txt").is_file() and ((cand / "train").is_dir() or (cand / "val").is_dir()):
            return cand
    if dest.is_dir():
        for sub in sorted(p for p in dest.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (sub / "wnids.txt").is_file() and ((sub / "train").is_dir() or (sub / "val").is_dir()):
                return sub
    return None


def _archive_name(url: str) -> str:
    name = PurePosixPath(urllib.parse.urlparse(url).path).name
    return name if name.endswith(".zip") else f"{TINY_IMAGENET_DIR}.zip"


def _manual_hint(url: str, dest: Path, name: str) -> str:
    source = url if url == TINY_IMAGENET_URL else f"{url} (or the official {TINY_IMAGENET_URL})"
    return (
        f"This machine may have no internet access. To set the data up by hand, download "
        f"{source} elsewhere and either put the zip at {dest / name} and run this "
        f"command again, or unzip it so that {dest / TINY_IMAGENET_DIR / 'wnids.txt'} exists."
    )


def download_tiny_imagenet(dest: Path | str, url: str = TINY_IMAGENET_URL, md5: str | None = TINY_IMAGENET_MD5) -> Path:
    """Download, verify and unpack Tiny ImageNet under ``dest``; return its root.

    Returns at once when ``dest`` already holds the unpacked dataset. An
    interrupted download leaves ``<zip>.part``, which the next call resumes (HTTP
    ``Range``; restarted when the server ignores it). ``md5=None`` skips the
    checksum (e.g. for a mirror). Raises :class:`DataError` on network errors, a
    checksum mismatch (the download is deleted) or an unsafe archive.
    """
    dest = Path(dest).expanduser()
    found = _find_root(dest)
    if found is not None:
        log.info("Tiny ImageNet already present at %s", found)
        return found
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the download folder {dest}: {e}") from None
    name = _archive_name(url)
    archive = dest / name
    part = dest / (name + ".part")
    if not archive.is_file():
        _download(url, part, hint=_manual_hint(url, dest, name))
        if md5:
            _verify(part, md5, url)
        part.replace(archive)
    elif md5:
        _verify(archive, md5, url)  # a zip placed by hand or left by an earlier run
    _extract(archive, dest)
    found = _find_root(dest)
    if found is None:
        raise DataError(
            f"{archive} unpacked into {dest}, but no folder with wnids.txt and train/ or val/ "
            f"appeared; is it really Tiny ImageNet?"
        )
    return found


def _open(url: str, start: int):
    headers = {"User-Agent": USER_AGENT}
    if start > 0:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)


def _content_range_start(value: str | None) -> int | None:
    """The first byte of ``Content-Range: bytes <a>-<b>/<total>`` (None when unparsable)."""
    try:
        return int(value.split()[1].split("-")[0]) if value else None
    except (IndexError, ValueError):
        return None


def _open_resumable(url: str, part: Path, start: int):
    """(response, status, start): the response to a request resuming at ``start`` (restarting at 0
    when the server refuses the range or answers another one), or (None, 0, start) when the
    server says ``part`` is already complete."""
    try:
        resp = _open(url, start)
    except urllib.error.HTTPError as e:
        if e.code != 416 or start == 0:
            raise
        # 416: nothing beyond our part file; either it is complete or it is junk.
        total = (e.headers.get("Content-Range") or "").rpartition("/")[2]
        e.close()
        if total.isdigit() and int(total) == start:
            return None, 0, start
        log.info("server refused to resume %s (HTTP 416); starting over", part)
        part.unlink()
        start = 0
        resp = _open(url, 0)
    status = getattr(resp, "status", 200)
    if start and status == 206 and _content_range_start(resp.headers.get("Content-Range")) != start:
        log.info("server answered a different range than asked for; restarting %s", part.name)
        resp.close()
        resp = _open(url, 0)
        status = getattr(resp, "status", 200)
    return resp, status, start


def _write_mode(part: Path, start: int, status: int) -> tuple[str, int]:
    """("ab", start) when the server resumes at ``start`` (HTTP 206), else ("wb", 0)."""
    if start and status == 206:
        log.info("resuming %s at byte %d", part.name, start)
        return "ab", start
    if start:
        log.info("server ignored the Range request (HTTP %s); restarting %s", status, part.name)
    return "wb", 0


def _stream(resp, part: Path, mode: str, start: int, url: str, hint: str) -> None:
    """Copy the response body into ``part`` with a progress bar; DataError when it ends early."""

    with resp:
        length = resp.headers.get("Content-Length")
        remaining = int(length) if length and length.isdigit() else None
        total = start + remaining if remaining is not None else None
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
        )
        with open(part, mode) as f, Progress(*columns, transient=True, disable=not progress_wanted()) as bar:
            task = bar.add_task(f"downloading {part.name[:-5]}", total=total, completed=start)
            got = 0
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                got += len(chunk)
                bar.advance(task, len(chunk))
        if remaining is not None and got < remaining:
            raise DataError(
                f"download of {url} stopped after {start + got} of {total} bytes; "
                f"run the command again to resume from {part}. {hint}"
            )


def _download(url: str, part: Path, hint: str) -> None:
    """Fetch ``url`` into ``part``, resuming from its current size when the server allows."""
    start = part.stat().st_size if part.is_file() else 0
    try:
        resp, status, start = _open_resumable(url, part, start)
        if resp is None:
            return
        mode, start = _write_mode(part, start, status)
        _stream(resp, part, mode, start, url, hint)
    except urllib.error.HTTPError as e:
        raise DataError(f"cannot download {url}: HTTP {e.code} {e.reason}. {hint}") from None
    except urllib.error.URLError as e:
        raise DataError(f"cannot download {url}: {e.reason}. {hint}") from None
    except TimeoutError as e:
        raise DataError(
            f"cannot download {url}: timed out ({e}); partial data kept in {part} and resumed next time. {hint}"
        ) from None
    except (OSError, http.client.HTTPException) as e:
        raise DataError(
            f"cannot download {url}: {type(e).__name__}: {e}; partial data kept in {part} and resumed next time. {hint}"
        ) from None


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, expected: str, url: str) -> None:
    actual = md5_of(path)
    if actual.lower() != expected.lower():
        path.unlink(missing_ok=True)
        raise DataError(
            f"checksum mismatch for {url}: expected MD5 {expected.lower()}, got {actual} "
            f"({path.name} deleted; run the command again to download it afresh)"
        )


def _safe_members(zf: zipfile.ZipFile, archive: Path) -> list[zipfile.ZipInfo]:
    """Every member, after refusing absolute paths, drive letters, ``..`` and symlinks."""
    members = zf.infolist()
    for m in members:
        name = m.filename.replace("\\", "/")
        parts = PurePosixPath(name).parts
        if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
            raise DataError(
                f"{archive}: refusing to unpack unsafe member '{m.filename}' "
                f"(absolute path or '..'); the archive is not a genuine Tiny ImageNet zip"
            )
        if (m.external_attr >> 16) & 0o170000 == 0o120000:
            raise DataError(f"{archive}: refusing to unpack symbolic link '{m.filename}'")
    return members


def _extract(archive: Path, dest: Path) -> None:
    """Unpack into a temporary folder under ``dest``, then move the top-level entries in place."""
    tmp = dest / f".{archive.name}.extracting"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = _safe_members(zf, archive)
            tmp.mkdir()
            zf.extractall(tmp, members)
        for entry in sorted(tmp.iterdir()):
            target = dest / entry.name
            if target.exists():
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink()
            entry.replace(target)
    except zipfile.BadZipFile as e:
        raise DataError(f"{archive} is not a valid zip file ({e}); delete it and download again") from None
    except OSError as e:
        raise DataError(f"cannot unpack {archive} into {dest}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- Stanford Cars


def stanford_cars_instructions() -> str:
    """How to obtain Stanford Cars by hand (it cannot be downloaded automatically)."""
    return (
        "Stanford Cars (Cars196) can no longer be downloaded from its original site "
        "(ai.stanford.edu/~jkrause/cars/ is gone), so finegrain cannot fetch it for you.\n"
        "Get a copy in any of these three layouts:\n"
        "  1. Kaggle: the dataset 'jessicali9530/stanford-cars-dataset' "
        "(kaggle datasets download -d jessicali9530/stanford-cars-dataset), unzipped as is; "
        "its cars_train/cars_train/, cars_test/cars_test/ and car_devkit/devkit/ folders and "
        "'cars_test_annos_withlabels (1).mat' are understood.\n"
        "  2. torchvision's StanfordCars layout (devkit): devkit/cars_meta.mat, "
        "devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, cars_train/, cars_test/.\n"
        "  3. The 'all images' layout of metric-learning papers: car_ims/ with cars_annos.mat.\n"
        "Then run `finegrain data check PATH`: it detects any of the three layouts and "
        "reports what it found (or what is missing)."
    )
