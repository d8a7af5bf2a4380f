"""``grl-kernels restore INPUT... -o OUTDIR --checkpoint FILE``: restore image files and folders.

Every problem with one image (unreadable, unsupported, too large for the budget, not writable) is
reported on one line naming the file, and the other images still run; the exit status is 1 when
any image failed, 2 when nothing could start (bad model, checkpoint or output folder).
"""
from __future__ import annotations

import os
import sys
import time
from typing import List, Optional, Tuple

import numpy as np
import torch

from .io import ImageError, Picture, image_format, is_image_path, read_image, write_image
from .memory import default_budget, parse_memory, release_freed_memory_promptly
from .tiling import model_geometry, tile_count

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(sub, once_action) -> None:
    s = sub.add_parser("restore", help="restore image files with a GRL checkpoint (tiled, within a memory budget)")
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="image files (PNG, JPEG, TIFF, WebP) or folders of them")
    s.add_argument("-o", "--output", required=True, action=once_action, metavar="OUTDIR",
                   help="output folder (created); files keep their names")
    s.add_argument("--checkpoint", required=True, action=once_action, metavar="FILE",
                   help="Lightning checkpoint or state_dict of a GRL model")
    s.add_argument("--preset", action=once_action, metavar="NAME",
                   help="GRL-T, GRL-S, GRL-B or a preset of grl_kernels.models.PRESETS (default: the published geometry)")
    s.add_argument("--task", action=once_action, help="task geometry (sr, denoise, denoise_f2, jpeg, deblur, deblur_w12)")
    s.add_argument("--config", action=once_action, metavar="FILE.json", help="JSON object of GRL constructor keywords")
    s.add_argument("--tile", action=once_action, default="auto", metavar="N|auto|none",
                   help="tile side in pixels, 'auto' (default: the largest that fits --max-memory) or 'none'")
    s.add_argument("--overlap", action=once_action, type=int, default=32, metavar="N", help="tile overlap in pixels (default 32)")
    s.add_argument("--max-memory", action=once_action, metavar="SIZE",
                   help="memory budget for --tile auto, e.g. 4G or 800M (default: 80%% of free RAM, 90%% of free GPU memory)")
    s.add_argument("--dtype", action=once_action, choices=("auto",) + tuple(DTYPES), default="auto",
                   help="inference dtype (default auto: bfloat16 where the CPU/GPU has it fast, else float32)")
    s.add_argument("--no-compile", action="store_true", help="do not torch.compile the model")
    s.add_argument("--device", action=once_action, choices=("cpu", "cuda"), help="default: cuda when available")
    s.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    s.set_defaults(func=cmd_restore)


class RestoreProgress:
    """One line on stderr: a bar over all tiles of all images, the current image, elapsed time and ETA."""

    def __init__(self, total_tiles: int, n_images: int, enabled: bool = True, stream=None, width: int = 24):
        self.total = max(1, total_tiles)
        self.n_images = n_images
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.done = 0
        self.image_index = 0
        self.name = ""
        self._base = 0  # tiles done in earlier images
        self.t0 = time.perf_counter()
        self._last = 0.0

    def start_image(self, index: int, name: str, tiles: int) -> None:
        self.image_index, self.name = index, name
        self._base = self.done
        self._image_tiles = tiles
        self._draw(force=True)

    def tile(self, done: int, total: int) -> None:
        if total != self._image_tiles:  # the tile was halved after an out-of-memory: re-plan this image
            self.total += total - self._image_tiles
            self._image_tiles = total
        self.done = self._base + done
        self._draw(force=done == total)

    def skip_image(self) -> None:  # a failed image: count its tiles as done
        self.done = self._base + self._image_tiles
        self._draw(force=True)

    def _draw(self, force=False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and not self.tty and now - self._last < 5:
            return
        self._last = now
        el = now - self.t0
        frac = min(1.0, self.done / self.total)
        eta = f"ETA {el / self.done * (self.total - self.done):.0f}s" if self.done else "ETA -"
        fill = int(self.width * frac)
        line = (f"restore [{'#' * fill}{'-' * (self.width - fill)}] image {self.image_index}/{self.n_images} "
                f"tiles {self.done}/{self.total} {el:.0f}s {eta} {self.name}")
        self.stream.write(("\r\033[K" + line[:200]) if self.tty else line + "\n")
        self.stream.flush()

    def close(self, ok: int, failed: int) -> None:
        if self.enabled:
            if self.tty:
                self.stream.write("\r\033[K")
            self.stream.write(f"restore: {ok} image(s) written, {failed} failed, in {time.perf_counter() - self.t0:.1f}s\n")
            self.stream.flush()


def collect_inputs(inputs: List[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """(image paths, [(path, error)]): folders give their image files (sorted, not recursive)."""
    files, errors = [], []
    for p in inputs:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, n) for n in os.listdir(p)
                           if is_image_path(n) and os.path.isfile(os.path.join(p, n)) and not n.startswith("."))
            if not found:
                errors.append((p, "folder holds no PNG/JPEG/TIFF/WebP file"))
            files += found
        elif not os.path.exists(p):
            errors.append((p, "no such file or folder"))
        else:
            try:
                image_format(p)
                files.append(p)
            except ImageError as exc:
                errors.append((p, str(exc)))
    seen, unique = {}, []
    for f in files:
        name = os.path.basename(f)
        if name in seen:
            errors.append((f, f"same name as {seen[name]}: its output would be overwritten"))
            continue
        seen[name] = f
        unique.append(f)
    return unique, errors


def _to_tensor(pic: Picture, cin: int) -> torch.Tensor:
    px = pic.pixels
    if px.shape[2] == 1 and cin == 3:
        px = np.repeat(px, 3, axis=2)
    elif px.shape[2] == 3 and cin == 1:
        raise ImageError("colour image, but the model takes one channel (gray)")
    return torch.from_numpy(np.ascontiguousarray(px.transpose(2, 0, 1)))


def _resize_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    if scale == 1:
        return alpha
    a = torch.from_numpy(alpha)[None, None]
    out = torch.nn.functional.interpolate(a, scale_factor=scale, mode="bicubic", align_corners=False)
    return out[0, 0].clamp_(0, 1).numpy()


def _parse_tile(text: str):
    t = str(text).strip().lower()
    if t in ("auto",):
        return "auto"
    if t in ("none", "0", "off"):
        return None
    try:
        v = int(t)
    except ValueError:
        raise ValueError(f"--tile must be a positive integer, 'auto' or 'none', got {text!r}") from None
    if v < 0:
        raise ValueError(f"--tile must be a positive integer, 'auto' or 'none', got {text!r}")
    return v or None


def _err(path: str, msg: str) -> None:
    print(f"grl-kernels restore: error: {path}: {msg}", file=sys.stderr)


def cmd_restore(args) -> int:
    from ..optimize import optimize
    from .api import resolve_tile, restore
    from .config import model_from_checkpoint

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    tile = _parse_tile(args.tile)
    if args.overlap < 0:
        raise ValueError(f"--overlap must be >= 0, got {args.overlap}")
    budget = parse_memory(args.max_memory) if args.max_memory else None
    out_dir = args.output
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{out_dir}: cannot create the output folder ({exc.strerror})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"{out_dir}: the output folder is not writable")
    files, errors = collect_inputs(args.inputs)
    for p, msg in errors:
        _err(p, msg)
    if not files:
        print("grl-kernels restore: error: no image to restore", file=sys.stderr)
        return 1
    model, report, _ = model_from_checkpoint(args.checkpoint, args.preset, args.task, args.config)
    if device.type == "cpu":
        release_freed_memory_promptly()
    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    model = optimize(model.to(device), dtype=dtype or "auto", compile=not args.no_compile)
    run_dtype = next(getattr(model, "_orig_mod", model).parameters()).dtype
    if budget is None and tile == "auto":
        budget = default_budget(device)
    _, scale, cin, _ = model_geometry(model)

    # plan: tile counts of every image from its header (no decoding)
    plans = []
    for f in files:
        try:
            from PIL import Image

            with Image.open(f) as im:
                w, h = im.size
        except Exception:  # noqa: BLE001 - reported when the image is read
            h = w = 0
        n, t, fits = 1, None, True
        if h and w:
            try:
                t = resolve_tile(model, (h, w), tile, args.overlap, run_dtype, device, budget)
                n = tile_count(h, w, t, args.overlap)
            except ValueError:
                n, fits = 1, False  # the restore below reports the budget error
            if not args.no_progress:
                how = "untiled" if t is None else f"tiles of {t} px, {n} tiles"
                how = how if fits else "does not fit the memory budget"
                print(f"grl-kernels restore: {os.path.basename(f)}: {h}x{w} px, {how}", file=sys.stderr)
        plans.append(n)
    prog = RestoreProgress(sum(plans), len(files), enabled=not args.no_progress)
    ok = failed = 0
    for i, (f, n) in enumerate(zip(files, plans)):
        prog.start_image(i + 1, os.path.basename(f), n)
        try:
            pic = read_image(f)
            x = _to_tensor(pic, cin)
            y = restore(model, x, tile=tile, overlap=args.overlap, device=device, dtype=run_dtype,
                        max_memory=budget, on_tile=prog.tile)
            y = y.clamp_(0, 1).permute(1, 2, 0).numpy()
            if pic.gray and y.shape[2] == 3:
                y = y.mean(axis=2, keepdims=True)
            alpha = None if pic.alpha is None else _resize_alpha(pic.alpha, scale)
            write_image(os.path.join(out_dir, os.path.basename(f)), Picture(y, alpha, pic.bits, pic.format))
            ok += 1
        except (ImageError, ValueError, OSError, RuntimeError) as exc:
            msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            _err(f, msg.splitlines()[0] if msg else type(exc).__name__)
            prog.skip_image()
            failed += 1
    prog.close(ok, failed + len(errors))
    return 1 if failed or errors else 0
