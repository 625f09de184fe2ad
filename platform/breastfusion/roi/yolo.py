"""YOLOv8 lesion detector for ultrasound: export a YOLO data set, train, detect.

This is the only module that imports ultralytics, and it does so lazily, inside
:func:`import_ultralytics`, after :func:`configure_offline` has switched off everything that
would reach the network or the user's home folder. Exporting the data set needs neither torch
nor ultralytics, so it is tested on its own.

Offline switches (ultralytics 8.4 reads most of them once, at import):

- ``YOLO_OFFLINE=1``: skips the DNS look-ups of ``one.one.one.one``/``dns.google`` at import,
  which also disables telemetry (``events``) and hub/platform uploads.
- ``YOLO_AUTOINSTALL=0``: never ``pip install`` a missing extra.
- ``YOLO_CONFIG_DIR``: the settings file and fonts. Honoured when the user sets it; otherwise
  a private cache folder ``<tempdir>/breastfusion-<uid>/ultralytics`` (never ``~/.config``).
  Ultralytics fixes this folder at import, once per process, so it cannot live in a per-run
  output folder that may later be renamed or deleted.
- ``MPLCONFIGDIR`` (unless set): matplotlib's font cache, which ultralytics' import would
  otherwise write to ``~/.cache/matplotlib``.
- ``YOLO_VERBOSE`` (unless set): False, so ultralytics logs errors only; progress is logged
  by this module through ``logging`` instead (``-vv`` turns ultralytics' own output on).
- A font: matplotlib's DejaVuSans.ttf copied to ``Arial.ttf``/``Arial.Unicode.ttf`` in the
  config folder, because ultralytics' data-set check looks for Arial there and otherwise
  ``requests.head``-s a GitHub URL even when offline.
- Settings (``settings.update``): ``sync``, ``raytune``, ``mlflow``, ``comet``, ``clearml``,
  ``dvc``, ``wandb``, ``tensorboard``, ``vscode_msg``, ``openvino_msg`` off; ``api_key``
  empty; ``runs_dir``/``datasets_dir``/``weights_dir`` inside the config folder. ``raytune``
  matters when Ray is installed: its callback warns outside a Tune trial.
- ``ULTRALYTICS_API_KEY`` is removed from this process's environment (it would enable
  platform uploads).
- Per call: ``project=``/``name=`` inside our output folder (never ``./runs``), ``amp=False``
  (ultralytics' AMP check downloads ``yolo26n.pt`` on GPUs), ``workers=0`` by default, and
  weights only from existing local files (a bare name like ``yolov8n.pt`` would download).
- ANSI colour codes are stripped from ultralytics' log lines when they go to a non-terminal.

No code from weight files: a ``.pt`` file is a pickle, and ultralytics unpickles it fully by
default, so a crafted file runs arbitrary code when loaded. ``ULTRALYTICS_SAFE_LOAD=1`` is set
before the import (and ``ultralytics.nn.tasks.SAFE_LOAD`` forced on, in case someone imported
ultralytics first), so every checkpoint load goes through ``torch.load(weights_only=True)``
against ultralytics' allow-list of model classes, and model construction avoids ``eval``. A
file that fails is a one-line ``UserError`` naming it (:func:`load_yolo`). Torch too old for
restricted loading is refused rather than silently loading unsafely.

Training lives in :mod:`breastfusion.roi.train` (``train_detector`` is re-exported here) and
the data set in :mod:`breastfusion.roi.dataset`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from breastfusion.errors import ConfigError, UserError
from breastfusion.roi.dataset import (  # noqa: F401  (re-exported: the module's old API)
    CLASS_NAME,
    DETECTOR_POLICY,
    DetectorPatients,
    ExportSummary,
    box_rows,
    export_yolo_dataset,
    plan_detector_patients,
    yolo_label,
)
from breastfusion.roi.geometry import Detection
from breastfusion.roi.settings import CropSettings

logger = logging.getLogger(__name__)

# Settings that would phone home, upload, or hook third-party loggers into training.
_SETTINGS_OFF = (
    "sync",
    "hub",
    "raytune",
    "mlflow",
    "comet",
    "clearml",
    "dvc",
    "wandb",
    "tensorboard",
    "vscode_msg",
    "openvino_msg",
)


# ------------------------------------------------------------------------ offline set-up


def default_config_dir() -> Path:
    """Where ultralytics keeps settings and fonts: ``$YOLO_CONFIG_DIR`` if the user set it,
    else a private cache folder under the system temp dir (not the home folder)."""
    if env := os.environ.get("YOLO_CONFIG_DIR"):
        return Path(env).expanduser()
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"breastfusion-{uid}" / "ultralytics"


def configure_offline(config_dir: str | os.PathLike | None = None) -> Path:
    """Set the environment so that a later ``import ultralytics`` stays offline and quiet.

    Returns ultralytics' config folder (``YOLO_CONFIG_DIR``; ultralytics adds ``Ultralytics/``).
    Safe to call repeatedly; has no effect on env-driven switches if ultralytics is already
    imported (the settings and font are still applied by :func:`import_ultralytics`).
    """
    base = Path(config_dir) if config_dir is not None else default_config_dir()
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.environ["YOLO_CONFIG_DIR"] = str(base)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ["ULTRALYTICS_SAFE_LOAD"] = "1"
    verbose = logging.getLogger("breastfusion").isEnabledFor(logging.DEBUG)
    os.environ.setdefault("YOLO_VERBOSE", "True" if verbose else "False")
    os.environ.setdefault("MPLCONFIGDIR", str(base / "matplotlib"))
    if os.environ.pop("ULTRALYTICS_API_KEY", None):
        logger.warning("ULTRALYTICS_API_KEY ignored: breastfusion keeps ultralytics offline")
    _install_font(base / "Ultralytics")
    return base


def _install_font(folder: Path) -> None:
    """Put a font where ultralytics looks first, so it never tries to download Arial."""
    targets = [folder / "Arial.ttf", folder / "Arial.Unicode.ttf"]
    if all(t.exists() for t in targets):
        return
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    folder.mkdir(parents=True, exist_ok=True)
    for target in targets:
        if not target.exists():
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)


def import_ultralytics() -> Any:
    """Import ultralytics offline, with safe weight loading and its integrations off."""
    configure_offline(os.environ.get("YOLO_CONFIG_DIR") or None)
    import ultralytics
    import ultralytics.nn.tasks as tasks
    from ultralytics.utils import USER_CONFIG_DIR

    # Read once at ultralytics' import: force it on if someone imported ultralytics before us.
    tasks.SAFE_LOAD = True
    _strip_ansi_for_non_terminals(logging.getLogger("ultralytics"))

    settings = ultralytics.settings
    root = Path(USER_CONFIG_DIR)
    # If someone imported ultralytics before us, its config folder is wherever they chose.
    _install_font(root)
    update: dict[str, Any] = {k: False for k in _SETTINGS_OFF if k in settings.defaults}
    update.update(
        api_key="",
        runs_dir=str(root / "runs"),
        datasets_dir=str(root / "datasets"),
        weights_dir=str(root / "weights"),
    )
    update = {k: v for k, v in update.items() if k in settings.defaults}
    if any(settings.get(k) != v for k, v in update.items()):
        settings.update(update)
    return ultralytics


class _StripAnsi(logging.Filter):
    """Drop ANSI colour codes from records a handler writes to a non-terminal stream."""

    _ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        stream = getattr(self.handler, "stream", None)
        isatty = getattr(stream, "isatty", None)
        if not (callable(isatty) and isatty()):
            record.msg = self._ANSI.sub("", record.getMessage())
            record.args = None
        return True


def _strip_ansi_for_non_terminals(log: logging.Logger) -> None:
    for handler in log.handlers:
        if not any(isinstance(f, _StripAnsi) for f in handler.filters):
            handler.addFilter(_StripAnsi(handler))


def ultralytics_version() -> str:
    import ultralytics

    return str(ultralytics.__version__)


# ---------------------------------------------------------------------------- safe loading


def _reason(exc: BaseException, *names: str) -> str:
    """The first sentence of a loader's message, without colour, prefixes or the file name
    (the caller names the file) and without ultralytics' advice to download a model."""
    text = _StripAnsi._ANSI.sub("", str(exc)).strip()
    for name in sorted({n for n in names if n}, key=len, reverse=True):
        text = text.replace(name, "the file")
    text = re.sub(r"^(ERROR|WARNING)[^\w]*", "", text).strip()
    sentence = re.split(r"(?<=[.!?])\s|\n", text, maxsplit=1)[0].rstrip(".") if text else ""
    return (sentence or type(exc).__name__)[:300]


def load_yolo(weights: str | os.PathLike | None, *, what: str, allow_yaml: bool = False) -> Any:
    """A YOLO model: from ``yolov8n.yaml`` (``weights`` None), or a local file loaded safely.

    ``what`` names the setting in errors (``roi.train.weights``, ``detector weights``). A
    missing file, a bare name (ultralytics would download it), a wrong suffix, or a file that
    fails restricted loading (a pickled payload, a damaged or foreign file) is a one-line
    ``UserError``; nothing from the file runs.
    """
    if weights is None or str(weights).strip().lower() in {"", "none"}:
        return import_ultralytics().YOLO("yolov8n.yaml", task="detect")
    path = Path(weights).expanduser()
    if not path.is_file():
        # A bare name such as "yolov8n.pt" would make ultralytics download it.
        raise UserError(
            f"{what} {weights}: no such file; breastfusion never downloads weights, give a "
            "local .pt file"
            + (" (or .yaml), or none to train from yolov8n.yaml" if allow_yaml else "")
        )
    suffixes = (".pt", ".yaml", ".yml") if allow_yaml else (".pt",)
    if path.suffix.lower() not in suffixes:
        raise UserError(f"{what} {weights}: expected a {' or '.join(suffixes)} file")
    ul = import_ultralytics()
    import torch

    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        raise UserError(
            f"{what} {weights}: torch {torch.__version__} cannot load YOLO weights safely "
            "(needs torch >= 2.6); refusing to unpickle the file"
        )
    try:
        return ul.YOLO(str(path.resolve()), task="detect")
    except Exception as exc:  # any failure to load a user's file is a problem with that file
        reason = _reason(exc, str(path.resolve()), str(path), str(weights))
        raise UserError(
            f"{what} {weights}: not a YOLO checkpoint that can be loaded safely ({reason}); "
            "nothing from the file was run"
        ) from None


def sanitise_checkpoint(source: Path, dest: Path, base: Path) -> None:
    """Copy a checkpoint we trained, making the paths it records relative to ``base``.

    Ultralytics stores the run's absolute paths (data set, project, save folder: all inside a
    temporary build folder that is renamed afterwards) and the absolute root of the git
    checkout it ran from. Loaded with the same restricted loader as user files.
    """
    import torch
    from ultralytics.nn.tasks import torch_safe_load

    ckpt, _ = torch_safe_load(str(source), safe_only=True)
    ckpt["train_args"] = relativise(ckpt.get("train_args") or {}, base)
    for key in ("model", "ema"):  # the network keeps its own copy of the run's arguments
        model = ckpt.get(key)
        if isinstance(getattr(model, "args", None), dict):
            model.args = relativise(model.args, base)
    if isinstance(ckpt.get("git"), dict):
        ckpt["git"] = {k: v for k, v in ckpt["git"].items() if k != "root"}
    tmp = dest.with_name(f".{dest.name}.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, dest)


def relativise(obj: Any, base: Path) -> Any:
    """Strings that are paths inside ``base`` made relative to it (``.`` for ``base``)."""
    if isinstance(obj, dict):
        return {k: relativise(v, base) for k, v in obj.items()}
    if isinstance(obj, str | Path) and os.path.isabs(str(obj)):
        rel = os.path.relpath(str(obj), str(base))
        if not (rel == os.pardir or rel.startswith(os.pardir + os.sep)):
            return Path(rel).as_posix()
    return obj


# ----------------------------------------------------------------------------- detection


class YoloDetector:
    """A trained detector as a :data:`breastfusion.roi.geometry.Detector`: best box per image.

    Images are 8-bit grey H x W arrays (``geometry.detector_image``, as in training),
    replicated to the 3 channels YOLO expects. ``settings`` gives ``conf``/``iou``
    (``conf=``/``iou=`` override them); ``imgsz=None`` uses the size the weights were trained
    at. The weights are loaded safely (:func:`load_yolo`).
    """

    def __init__(
        self,
        weights: str | os.PathLike,
        settings: CropSettings | None = None,
        *,
        conf: float | None = None,
        iou: float | None = None,
        imgsz: int | None = None,
        device: str | None = None,
        work_dir: str | os.PathLike | None = None,
    ) -> None:
        settings = settings or CropSettings()
        given = {k: v for k, v in {"conf": conf, "iou": iou}.items() if v is not None}
        self.settings = settings.replace(**given) if given else settings
        if imgsz is not None and (
            isinstance(imgsz, bool) or not isinstance(imgsz, int) or imgsz < 1
        ):
            raise ConfigError(f"roi.train.imgsz must be an integer >= 1, got {imgsz!r}")
        if weights is None or str(weights).strip().lower() in {"", "none"}:
            raise UserError(
                "detector weights: a trained detector (.pt) is needed to detect lesions"
            )
        self.model = load_yolo(weights, what="detector weights")
        self.weights = Path(weights)
        self.conf, self.iou = self.settings.conf, self.settings.iou
        self.imgsz, self.device = imgsz, device
        # Predictions are never saved, but ultralytics still derives a run folder name:
        # point it at our own folder rather than ./runs.
        self.work_dir = Path(work_dir or default_config_dir() / "runs").absolute()

    def __call__(self, images: Sequence[np.ndarray]) -> list[Detection | None]:
        """The best box per image, one image per forward pass: in a batch, ultralytics pads
        images to a shape that depends on the other images (letterbox), and batched kernels
        differ in the last bits, so a batched box would depend on its neighbours and
        ``predict`` could not reproduce the study's crops."""
        return [self._detect_one(im) for im in images]

    def _detect_one(self, image: np.ndarray) -> Detection | None:
        array = np.repeat(np.asarray(image, dtype=np.uint8)[..., None], 3, axis=2)
        kwargs: dict[str, Any] = dict(
            conf=self.conf,
            iou=self.iou,
            device=self.device,
            batch=1,
            save=False,
            verbose=False,
            project=str(self.work_dir),
            name="predict",
            exist_ok=True,
        )
        if self.imgsz is not None:
            kwargs["imgsz"] = self.imgsz
        boxes = self.model.predict(array, **kwargs)[0].boxes
        if boxes is None or len(boxes) == 0:
            return None
        conf = boxes.conf.cpu().numpy()
        best = int(np.argmax(conf))
        x0, y0, x1, y1 = (float(v) for v in boxes.xyxy[best].cpu().numpy())
        return Detection(x0, y0, x1, y1, float(conf[best]))


def __getattr__(name: str) -> Any:
    # train_detector lives in roi.train, which imports this module; resolved lazily.
    if name == "train_detector":
        from breastfusion.roi.train import train_detector

        return train_detector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
