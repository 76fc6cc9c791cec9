"""The one typed config of an adaptation run: YAML plus dotted command-line overrides.

    cfg = load_config("my.yaml", ["train.distill.gamma1=0.2", "cloud.backend=dds"])

Every field is checked on load: an unknown key, a wrong type or an out-of-range value
raises ``ConfigError`` with one line naming the dotted key and what is allowed. Secrets
are never stored: ``cloud.token_env`` holds the *name* of an environment variable.
The YAML key ``lambda`` maps to the field ``lambda_`` (a Python keyword).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from coin_ray import storage

FOGGY_SHAPES_CATEGORIES = ["truck", "car", "rider", "person", "train", "motorcycle", "bicycle", "bus"]
# rho of the Foggy-Shapes world by default: the fraction of rider / train boxes the stand-in
# cloud learns as person / bus. Chosen from the bench teacher rows only, before any COIN run,
# as the smallest measured rho where the CLIP detector beats the cloud by 5 AP50 on a class
# (the paper's pattern); docs/method.md "Foggy-Shapes" says how it was chosen.
FOGGY_SHAPES_CLOUD_CONFUSION = 0.9
DEFAULT_TEMPLATES = ["a photo of a {}.", "a photo of the {}.", "a blurry photo of a {}.",
                     "a photo of a small {}.", "a photo of a large {}."]


class ConfigError(ValueError):
    """A bad config key or value; the message is one line naming the key."""


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, **kw: Any) -> Any:
    return field(metadata={"range": (lo, hi, lo_open, hi_open)}, **kw)


@dataclass
class DataConfig:
    """Where the target images and (optional) labelled validation split live."""

    target_images: str = ""  # folder or s3:// prefix of unlabeled target images; "" = Foggy-Shapes
    val_images: str = ""  # images of the labelled target split (for the metric)
    val_annotations: str = ""  # COCO JSON file or VOC Annotations folder for val_images
    val_format: Literal["coco", "voc"] = "coco"
    categories: list[str] = field(default_factory=lambda: list(FOGGY_SHAPES_CATEGORIES))
    style: str = "foggy street scene"  # the dataset's style phrase for CLIP prompts
    world: Literal["tiny", "demo", "bench"] = "demo"  # Foggy-Shapes size when target_images == ""
    world_cache: str = ""  # where Foggy-Shapes and its stand-ins are cached; "" = ~/.cache/coin_ray
    # rho: fraction of rider / train boxes the Foggy-Shapes stand-in cloud learns as person / bus
    cloud_confusion: float = _range(0.0, 1.0, default=FOGGY_SHAPES_CLOUD_CONFUSION)
    max_images: int = _range(0, default=0)  # 0 = all


@dataclass
class CloudConfig:
    """The cloud detector backend and how politely we call it."""

    backend: Literal["http", "dds", "rekognition", "hf", "replay"] = "http"
    url: str = ""  # http: server URL; dds: base URL (DDS_CLOUDAPI_ENDPOINT overrides); replay: file
    model: str = ""  # dds model name, hf hub id / local dir
    token_env: str = ""  # NAME of the environment variable holding the API token
    prompts: dict[str, list[str]] = field(default_factory=dict)  # category -> prompt phrases
    label_map: dict[str, str] = field(default_factory=dict)  # vendor label -> category
    threshold: float = _range(0.0, 1.0, default=0.25)
    requests_per_second: float = _range(0.0, None, lo_open=True, default=10.0)
    max_in_flight: int = _range(1, None, default=8)
    timeout_s: float = _range(0.0, None, lo_open=True, default=30.0)
    max_retries: int = _range(0, None, default=5)
    poll_deadline_s: float = _range(0.0, None, lo_open=True, default=120.0)
    num_actors: int = _range(1, None, default=2)
    price_per_call: float = _range(0.0, None, default=0.0)
    max_retry_after_s: float = _range(0.0, None, default=120.0)  # cap on a server's Retry-After
    retry_failed: bool = False  # ask again about images whose task failed or that were refused
    max_calls: int = _range(0, None, default=0)  # paid calls over all runs into one answer cache; 0 = no cap
    max_spend: float = _range(0.0, None, default=0.0)  # money, needs price_per_call; 0 = no cap
    cache: str = ""  # "" = the per-user answer cache, $COIN_RAY_CACHE/answers (~/.cache/coin_ray/answers)


# Where answers are kept and what they may cost: none of them changes an answer.
NOT_IN_RUN_ID = ("cache", "max_calls", "max_spend", "price_per_call")


@dataclass
class ClipConfig:
    """The CLIP model used to score cloud boxes and to build the CLIP detector."""

    model: str = ""  # hub id, local dir or s3:// dir; "" = the Foggy-Shapes stand-in
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
    batch_size: int = _range(1, None, default=64)
    num_actors: int = _range(1, None, default=1)


@dataclass
class ModelConfig:
    """The CLIP detector / target detector architecture."""

    context_init: str = "a photo of a"
    num_extra_context: int = _range(0, None, default=4)  # M learnable tokens after the init
    frozen_vision_layers: int = _range(0, None, default=0)
    backbone_lr_mult: float = _range(0.0, None, default=1.0)  # CLIP vision layers (see docs/method.md)
    head_layers: int = _range(0, None, default=1)  # last CLIP vision layers run per region (ViT "C4")
    roi_size: int = _range(1, None, default=4)  # RoIAlign grid side, in patch tokens
    # CLIP detector regions: "pooled" runs CLIP's last layers on RoI-pooled tokens of the
    # whole-image trunk (the reference's C4 layout); "crops" embeds each region's own pixels
    # with CLIP's tower at CLIP's input size (models/clip_backbone.py, docs/method.md "Two deliberate departures").
    region_features: Literal["pooled", "crops"] = "crops"
    target_backbone: Literal["clip", "mobilenet_v3", "resnet18"] = "clip"  # distilled: OV-RCNN | LightRCNN
    min_size: int = _range(32, None, default=160)  # shorter image side fed to the detector
    max_size: int = _range(32, None, default=320)
    detections_per_image: int = _range(1, None, default=50)
    score_threshold: float = _range(0.0, 1.0, default=0.05)


# The reference's foggy schedule: 65k steps with EMA keep rates of 0.9996 per step (eta for
# the prototypes, the teacher's keep rate). The same time constant on a run of any length
# is a half-life as a fraction of the run: ln(0.5) / ln(0.9996) = 1733 steps = 0.0267 of it.
PAPER_RUN_STEPS = 65_000
PAPER_HALF_LIFE = round(math.log(0.5) / math.log(0.9996) / PAPER_RUN_STEPS, 6)  # 0.026654

# Each training stage's default length, in epochs (passes over its training images), as the
# reference trains on Foggy Cityscapes' 2975 training images at 3 images per step
# (Flashkong/COIN, SOLVER.MAX_ITER and IMG_PER_BATCH_UNLABEL):
#   distillation   configs/coin/GDINO/foggy.yaml               65000 x 3 / 2975 = 65.5 epochs
#   dissemination  configs/coin/PRETRAINS/CLIPDET_foggy.yaml   50000 x 3 / 2975 = 50.4 epochs
# A length in steps fits one data set only: 800 steps of 4 are 10 epochs of 300 images, a
# third of one epoch of 10,000. coin_ray.train.schedule.resolve_length turns epochs into steps.
DEFAULT_DISTILL_EPOCHS = 65.0
DEFAULT_DISSEMINATE_EPOCHS = 50.0
DEFAULT_EPOCHS = {"disseminate": DEFAULT_DISSEMINATE_EPOCHS, "distill": DEFAULT_DISTILL_EPOCHS}


def keep_rate(half_life: float, steps: int) -> float:
    """The per-step EMA keep rate whose half-life is ``half_life`` x ``steps`` steps.

    ``0.5 ** (1 / (half_life * steps))``: after that many steps an old value keeps half its
    weight. ``keep_rate(PAPER_HALF_LIFE, PAPER_RUN_STEPS)`` is the paper's 0.9996. A run of
    0 steps (or a half-life of 0) keeps nothing: 0.0.
    """
    span = half_life * steps
    return 0.0 if span <= 0 else math.exp(math.log(0.5) / span)


def resolved_steps(steps: int | None, key: str) -> int:
    """``steps`` of a training stage whose length has been resolved (``key`` names it).

    A stage's config holds ``steps=None`` until ``coin_ray.train.schedule.resolve_length``
    derives the steps from its epochs and its number of training images; every fraction of
    the schedule (warm-up, burn-up, half-lives) needs that number.
    """
    if steps is None:
        raise ValueError(f"{key}.steps: not resolved yet; coin_ray.train.schedule.resolve_length "
                         "derives it from the epochs and the number of training images")
    return steps


@dataclass
class DisseminateConfig:
    """Stage 1: pre-training the CLIP detector on the cloud's boxes.

    Its length: ``epochs`` over the images with a usable cloud record (50 by default, the
    reference's; see DEFAULT_EPOCHS), or ``steps`` (not both).

    ``labels``: "clip" trains on CLIP's relabelling of the cloud boxes (hard labels, boxes
    CLIP calls background dropped; the paper's recipe), "cloud" on the cloud's own labels.
    """

    labels: Literal["clip", "cloud"] = "clip"
    steps: int | None = _range(0, None, default=None)  # fixes the length instead of epochs; null = from epochs
    epochs: float | None = _range(0.0, None, lo_open=True, default=None)  # passes over the images; null = 50 (reference)
    batch_size: int = _range(1, None, default=4)
    lr: float = _range(0.0, None, lo_open=True, default=2e-3)
    weight_decay: float = _range(0.0, None, default=1e-4)
    lambda_: float = _range(0.0, None, default=10.0)
    eta_half_life: float = _range(0.0, None, default=PAPER_HALF_LIFE)  # prototype EMA, fraction of the run
    background_weight: float = _range(0.0, None, default=1.0)
    min_cloud_score: float = _range(0.0, 1.0, default=0.3)
    checkpoint_every: int = _range(1, None, default=100)
    log_every: int = _range(1, None, default=10)

    @property
    def eta(self) -> float:
        """The prototypes' per-step EMA keep rate (the paper's eta) for this run's length."""
        return keep_rate(self.eta_half_life, resolved_steps(self.steps, "train.disseminate"))


@dataclass
class DistillConfig:
    """Stage 3: distilling the target detector (the paper's five hyperparameters live here).

    Its length: ``epochs`` over the target images with a usable cloud record (65 by
    default, the reference's; see DEFAULT_EPOCHS), or ``steps`` (not both).
    """

    steps: int | None = _range(0, None, default=None)  # fixes the length instead of epochs; null = from epochs
    epochs: float | None = _range(0.0, None, lo_open=True, default=None)  # passes over the images; null = 65 (reference)
    batch_size: int = _range(1, None, default=4)
    lr: float = _range(0.0, None, lo_open=True, default=2e-3)
    weight_decay: float = _range(0.0, None, default=1e-4)
    gamma1: float = _range(0.0, None, default=0.1)  # L_inc weight
    gamma2: float = _range(0.0, None, default=0.1)  # L_pri weight
    lambda_: float = _range(0.0, None, default=10.0)  # L_align weight
    eta_half_life: float = _range(0.0, None, default=PAPER_HALF_LIFE)  # prototype EMA (eta), fraction of the run
    pi: float = _range(0.0, 1.0, default=0.7)  # CKG confidence threshold
    burn_up: float = _range(0.0, 1.0, default=0.7)  # fraction of steps before L_inc/EMA teacher
    teacher_half_life: float = _range(0.0, None, default=PAPER_HALF_LIFE)  # EMA teacher, fraction of the run
    # After burn-up the CLIP-side source stays CLIP knowledge: "ema" makes the teacher an EMA
    # of the student where the architectures match (the CLIP-ViT target), else it stays the
    # frozen CLIP detector; "frozen" keeps the CLIP detector frozen for every target.
    teacher_after_burn_up: Literal["ema", "frozen"] = "ema"
    prototype_start: float = _range(0.0, 1.0, default=0.077)  # prototypes (and the CKG) update from here
    match_iou: float = _range(0.0, 1.0, lo_open=True, default=0.5)
    min_score: float = _range(0.0, 1.0, default=0.3)  # cloud boxes below it are not separated
    min_clip_score: float = _range(0.0, 1.0, default=0.1)  # CLIP-det boxes below it are not separated
    background_weight: float = _range(0.0, None, default=1.0)  # background RoIs' weight in L_con
    # How an inconsistent pair becomes one target: the paper's Table 6 ("ckg" is COIN), or
    # "ds": each source's confusions estimated by Dawid-Skene EM (coin_ray/confusion.py).
    fusion: Literal["ckg", "cloud", "clip", "avg", "score_avg", "ds"] = "ckg"
    admit_posterior: float = _range(0.0, 1.0, lo_open=True, default=0.7)  # ds: a box this sure of its class takes it (pi)
    use_align: bool = True
    use_con: bool = True
    use_inc: bool = True
    use_pri: bool = True
    private_objectness: bool = True  # the cloud's private boxes are RPN targets too
    flip: bool = True  # the student's weak view: a horizontal flip (p 0.5), boxes flipped too
    strong_augment: bool = True  # the student's strong view: colour jitter, grayscale, blur, cutout
    ckg_lr: float = _range(0.0, None, lo_open=True, default=1e-3)
    ckg_heads: int = _range(1, None, default=4)
    checkpoint_every: int = _range(1, None, default=100)
    log_every: int = _range(1, None, default=10)
    eval_every: int = _range(0, None, default=0)  # 0 = only at the end

    @property
    def eta(self) -> float:
        """The prototypes' per-step EMA keep rate (the paper's eta) for this run's length."""
        return keep_rate(self.eta_half_life, resolved_steps(self.steps, "train.distill"))

    @property
    def teacher_keep_rate(self) -> float:
        """The EMA teacher's per-step keep rate for this run's length."""
        return keep_rate(self.teacher_half_life, resolved_steps(self.steps, "train.distill"))


@dataclass
class TrainConfig:
    disseminate: DisseminateConfig = field(default_factory=DisseminateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class ReportConfig:
    """What the evaluate stage adds to the run's Table 1 beyond the run's own detectors.

    ``cloud_label_student``: the target detector trained on the cloud's boxes with score >= s
    as hard labels, with the Oracle's trainer and schedule (``coin_ray.train.cloud_label``);
    s in {0.3, 0.5, 0.7} is chosen on the labelled split, so it costs three trainings of
    the distillation's length at the evaluate stage.
    """

    cloud_label_student: bool = False  # add the "Cloud-label student" row (3 trainings at evaluate)


@dataclass
class RayConfig:
    """Ray resources; ``num_cpus`` only applies when starting a local instance.

    With ``use_gpu`` every Ray Train worker and every detection actor asks for
    ``gpus_per_worker`` GPUs, so Ray places them only on nodes that advertise GPUs: a
    cluster whose head advertises none (infra/ sets ``num-gpus`` 0 there) never trains on it.
    """

    num_cpus: int = _range(0, None, default=0)  # 0 = let Ray decide
    num_workers: int = _range(0, None, default=1)  # Ray Train workers; 0 = in the driver
    use_gpu: bool = False
    cpus_per_worker: float = _range(0.0, None, lo_open=True, default=1.0)
    gpus_per_worker: float = _range(0.0, None, lo_open=True, default=1.0)  # only with use_gpu

    def worker_resources(self) -> dict[str, float]:
        """Ray resources of one training worker / detection actor, e.g. {"CPU": 6, "GPU": 1}."""
        if not self.use_gpu:
            return {"CPU": self.cpus_per_worker}
        return {"CPU": self.cpus_per_worker, "GPU": self.gpus_per_worker}


@dataclass
class Config:
    """A whole adaptation run."""

    run_id: str = ""  # "" = derived from the config (stable across re-runs)
    storage: str = "runs"  # local folder or s3:// prefix holding every run
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    cloud: CloudConfig = field(default_factory=CloudConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def num_classes(self) -> int:
        return len(self.data.categories)

    def resolved_run_id(self) -> str:
        """The run id: ``run_id`` if set, else a hash of what defines the collected data.

        The cloud settings that change no answer (``NOT_IN_RUN_ID``) are hashed at their
        defaults, so raising a spend cap resumes the same run, and the ids of runs made
        before they were left out stay the same.
        """
        if self.run_id:
            return self.run_id
        cloud = {**to_dict(self.cloud), **{k: to_dict(CloudConfig())[k] for k in NOT_IN_RUN_ID}}
        key = json.dumps({"data": to_dict(self.data), "cloud": cloud,
                          "seed": self.seed}, sort_keys=True)
        return "run-" + hashlib.sha1(key.encode()).hexdigest()[:10]


# Conventional variable names only: a pasted token (hex, mixed case) must not pass for one.
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_LOOKS_LIKE_TOKEN = re.compile(r"^[0-9A-F]{16,}$")  # an upper-cased hex key is still a key


def _yaml_key(f: dataclasses.Field) -> str:
    return "lambda" if f.name == "lambda_" else f.name


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not allowed (allowed: {', '.join(map(str, args))})")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(f"{key} key", args[0], k): _coerce(f"{key}.{k}", args[1], v)
                for k, v in value.items()}
    raise ConfigError(f"{key}: unsupported type {tp}")


def _check_range(key: str, f: dataclasses.Field, value: Any) -> None:
    if "range" not in f.metadata or value is None:
        return
    lo, hi, lo_open, hi_open = f.metadata["range"]
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or \
          (hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        allowed = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
        raise ConfigError(f"{key}: {value!r} is out of range (allowed: {allowed})")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    fields = {_yaml_key(f): f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{key}: unknown key (allowed: {', '.join(fields)})")
    kwargs = {}
    for ykey, value in data.items():
        f = fields[ykey]
        key = f"{prefix}{ykey}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value, key + ".")
            continue
        value = _coerce(key, tp, value)
        _check_range(key, f, value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    name = cfg.cloud.token_env
    if name and (not _ENV_NAME.match(name) or _LOOKS_LIKE_TOKEN.match(name)):
        raise ConfigError("cloud.token_env: must be the NAME of an environment variable "
                          "(upper-case letters, digits, _), never the token itself")
    if not cfg.data.categories:
        raise ConfigError("data.categories: at least one category is needed")
    if len(set(cfg.data.categories)) != len(cfg.data.categories):
        raise ConfigError("data.categories: categories must be unique")
    for name in (*cfg.cloud.prompts, *cfg.cloud.label_map.values()):
        if name not in cfg.data.categories:
            raise ConfigError(f"cloud: {name!r} is not a category "
                              f"(allowed: {', '.join(cfg.data.categories)})")
    if cfg.cloud.max_spend > 0 and cfg.cloud.price_per_call <= 0:
        raise ConfigError("cloud.max_spend: needs cloud.price_per_call (the price of one call)")
    if cfg.model.min_size > cfg.model.max_size:
        raise ConfigError("model.min_size: must not exceed model.max_size")
    for stage in ("disseminate", "distill"):
        length = getattr(cfg.train, stage)
        if length.steps is not None and length.epochs is not None:
            raise ConfigError(f"train.{stage}.epochs: set train.{stage}.epochs or train.{stage}.steps, not both "
                              "(steps fixes the length; epochs derives it from the number of training images)")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.distill.gamma1=0.2' -> (['train', 'distill', 'gamma1'], 0.2) (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"{text}: an override must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def _set_dotted(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts)}: {p} is not a section")
        node = child
    node[parts[-1]] = value


# A training stage's two length keys: an override of one replaces the other's value from the
# mapping (a YAML file's epochs give way to a command line's steps), never one set by another override.
_LENGTH_KEYS = {"steps": "epochs", "epochs": "steps"}


def _other_length(parts: list[str]) -> list[str] | None:
    """['train', 'distill', 'steps'] -> ['train', 'distill', 'epochs']; None for other keys."""
    if len(parts) == 3 and parts[0] == "train" and parts[2] in _LENGTH_KEYS:
        return [*parts[:2], _LENGTH_KEYS[parts[2]]]
    return None


def from_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build and validate a Config from a plain mapping plus dotted overrides.

    An override of ``train.<stage>.steps`` or ``.epochs`` replaces the other of the two
    where the mapping sets it (``coin-ray tune --config my.yaml train.distill.steps=200``);
    both set in the mapping, or by overrides, is a ConfigError.
    """
    tree = json.loads(json.dumps(data or {}))
    overridden: set[str] = set()
    for text in overrides:
        parts, value = parse_override(text)
        other = _other_length(parts)
        if other is not None and value is not None and ".".join(other) not in overridden:
            _set_dotted(tree, other, None)
        _set_dotted(tree, parts, value)
        overridden.add(".".join(parts))
    cfg = _build(Config, tree, "")
    _validate(cfg)
    return cfg


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML file (local or s3://; None = all defaults) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path:
        try:
            text = storage.read_text(path)
        except FileNotFoundError as err:
            raise ConfigError(f"config file not found: {path}") from err
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    return from_dict(data, overrides)


def to_dict(obj: Any) -> dict[str, Any]:
    """A plain mapping with YAML keys (``lambda``, not ``lambda_``)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[_yaml_key(f)] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def to_yaml(cfg: Config) -> str:
    """The config as YAML; it holds environment-variable names, never their values."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def with_updates(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """A validated copy of ``cfg`` with dotted overrides applied."""
    return from_dict(to_dict(cfg), overrides)
