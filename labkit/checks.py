"""Pre-launch checks that need the machine: files, the data catalog, the model dir, libraries.

`RunConfig.check()` runs each function here in turn. Each takes the config and returns a list of
problems, one line each, starting with the field to change (`model: ...`). They exist because a
config that validates can still fail minutes after launch, deep inside a library, or quietly train
something else; everything knowable before a process starts is refused here instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from labkit import runfiles

if TYPE_CHECKING:
    from labkit.config import RunConfig

# Files one of which a Hugging Face tokenizer needs (fast JSON, sentencepiece, BPE/WordPiece vocab, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "vocab.json", "vocab.txt")


# -- the model -------------------------------------------------------------------------------------


def model_dir(cfg: RunConfig) -> list[str]:
    """A local checkpoint dir with a config, tokenizer files and a causal-LM architecture."""
    if cfg.model == "tiny":
        return []  # built on demand by labkit.tiny
    mdir = Path(cfg.model).expanduser()
    if not (mdir / "config.json").is_file():
        return [f"model: {cfg.model!r} is not a Hugging Face checkpoint directory (no config.json)"]
    if not any((mdir / f).is_file() for f in TOKENIZER_FILES) and not any(mdir.glob("*.tiktoken")):
        return [f"model: {cfg.model!r} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): "
                "save the tokenizer there too (tokenizer.save_pretrained)"]
    problem = causal_lm_problem(mdir)
    return [f"model: {cfg.model!r} {problem}"] if problem else []


def causal_lm_problem(mdir: Path) -> str | None:
    """Why the checkpoint in `mdir` cannot load as AutoModelForCausalLM, or None when it can."""
    try:
        conf = json.loads((mdir / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return f"has an unreadable config.json ({e})"
    if not isinstance(conf, dict):
        return "has a config.json that is not a JSON object"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = conf.get("model_type")
    archs = conf.get("architectures") or []
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return None
    if any(isinstance(a, str) and a.endswith("ForCausalLM") for a in archs):
        return None  # a custom (remote-code) decoder that names itself a causal LM
    what = f"{model_type!r} ({', '.join(map(str, archs))})" if archs else repr(model_type)
    return (f"is a {what} model, not a causal LM: labkit trains decoder-only models that "
            "AutoModelForCausalLM loads (Llama, Qwen2, Mistral, Gemma, Phi, ...)")


# -- data --------------------------------------------------------------------------------------------


def datasets(cfg: RunConfig) -> list[str]:
    """Every training dataset read through the converter: format errors name file, record and field."""
    from labkit import catalog
    from labkit.data import formats

    problems = []
    for ds in dict.fromkeys(d for p in cfg.training_phases() for d in p.datasets):
        try:
            formats.check(ds, on_error=cfg.on_bad_record)
        except catalog.CatalogError as e:
            problems.append(f"datasets: {e}")
    return problems


def chat_template(cfg: RunConfig) -> list[str]:
    """A named or file template that exists; a base model (no template of its own) must name one."""
    from labkit.data import templates

    if cfg.chat_template:
        try:
            templates.resolve(cfg.chat_template)
        except templates.ChatTemplateError as e:
            return [str(e)]
        return []
    mdir = Path(cfg.model).expanduser()
    if cfg.model == "tiny" or model_dir(cfg):
        return []  # an unusable model dir is model_dir's one line, not two
    if not templates.has_chat_template(mdir):
        return [f"chat_template: {cfg.model!r} has no chat template (a base model): set chat_template "
                f"to one of {', '.join(templates.BUILTIN)} or a .jinja file"]
    return []


def val_dataset(cfg: RunConfig) -> list[str]:
    from labkit import catalog

    if not cfg.val_dataset:
        return []
    try:
        catalog.resolve(cfg.val_dataset)
    except catalog.CatalogError as e:
        return [f"val_dataset: {e}"]
    return []


def _sizes(cfg: RunConfig) -> list[int] | None:
    """Samples per phase from the catalog; None when a dataset does not resolve (`datasets` says so)."""
    from labkit import catalog, schedule

    try:
        return schedule.phase_sizes(cfg)
    except (catalog.CatalogError, OSError):
        return None


def _phase_name(cfg: RunConfig, i: int) -> str:
    phases = cfg.training_phases()
    p = phases[i]
    label = p.name or ", ".join(p.datasets)
    return f"phase {i + 1} ({label})" if len(phases) > 1 else f"the training data ({label})"


def batch_fits_data(cfg: RunConfig) -> list[str]:
    """An effective batch larger than a phase's data would make every epoch one short step."""
    sizes = _sizes(cfg)
    if sizes is None:
        return []
    return [f"effective_batch_size: {cfg.effective_batch_size} is larger than {_phase_name(cfg, i)}, "
            f"which has {n} samples: every epoch would be a single step of {n} samples"
            for i, n in enumerate(sizes) if n < cfg.effective_batch_size]


def warmup_fits_training(cfg: RunConfig) -> list[str]:
    """Warmup that never ends: each phase restarts the schedule, so each must outlast its warmup."""
    from labkit import schedule

    sizes = _sizes(cfg)
    if sizes is None or not (cfg.warmup_steps or cfg.warmup_ratio):
        return []
    sched = schedule.run_schedule(cfg, sizes)
    field = "warmup_steps:" if cfg.warmup_steps else f"warmup_ratio: {cfg.warmup_ratio:g} gives"
    problems = []
    for i, (n, warm) in enumerate(zip(sched.phase_steps, sched.warmup)):
        if 0 < n <= warm:
            problems.append(
                f"{field} {cfg.warmup_steps or warm} warmup steps, but {_phase_name(cfg, i)} trains only {n} "
                f"optimizer step(s) ({sizes[i]} samples, effective_batch_size {cfg.effective_batch_size}"
                + (f", max_steps {cfg.max_steps}" if cfg.max_steps else "")
                + "): the LR would never get past warmup; lower the warmup")
    return problems


# -- evaluation -----------------------------------------------------------------------------------


def eval_tasks(cfg: RunConfig) -> list[str]:
    """Every eval task is one lm-eval (or labkit's local task dir) knows, and has a cadence."""
    problems = []
    if cfg.eval_every_samples and not cfg.eval_tasks:
        problems.append("eval_tasks: eval_every_samples is set but no eval_tasks are given")
    if not cfg.eval_tasks:
        return problems
    import difflib

    from labkit import evaluate

    known = known_eval_tasks()
    for name in cfg.eval_tasks:
        if name in known:
            continue
        close = difflib.get_close_matches(name, sorted(known), n=4, cutoff=0.6)
        hint = (f"did you mean {', '.join(close)}?" if close
                else f"labkit's local tasks: {', '.join(evaluate.local_tasks())}")
        problems.append(f"eval_tasks: unknown task {name!r} (no lm-eval task, group or tag has that name); {hint}")
    return problems


def known_eval_tasks() -> frozenset[str]:
    """Task, group and tag names lm-eval knows, plus labkit's local ones.

    Indexing lm-eval's ~15k task files takes ~10 s, so its own names are cached on disk per
    lm-eval version (its task folder does not change between installs of one version); the
    local task dir is read fresh each time, it is three small files.
    """
    from labkit import evaluate
    from labkit.tiny import home

    return frozenset(_lm_eval_task_names(home())) | frozenset(evaluate.local_tasks())


_TASK_NAMES: dict[Path, list[str]] = {}  # per process too: the configurator checks on every edit


def _lm_eval_task_names(cache_home: Path) -> list[str]:
    if cache_home not in _TASK_NAMES:
        _TASK_NAMES[cache_home] = _read_or_build_task_index(cache_home)
    return _TASK_NAMES[cache_home]


def _read_or_build_task_index(cache_home: Path) -> list[str]:
    import lm_eval

    spec = importlib.util.find_spec("lm_eval.tasks")
    tasks_dir = Path(spec.origin).parent if spec and spec.origin else Path("?")
    version = getattr(lm_eval, "__version__", "unknown")
    cache = cache_home / f"lm-eval-tasks-{version}.json"
    try:
        data = json.loads(cache.read_text())
        if data.get("tasks_dir") == str(tasks_dir) and isinstance(data.get("names"), list):
            return data["names"]
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    from lm_eval.tasks import TaskManager

    names = sorted(TaskManager().all_tasks)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        runfiles.write_json_atomic(cache, {"tasks_dir": str(tasks_dir), "names": names})
    except OSError:
        pass  # a read-only cache only costs the next check another index
    return names


# -- the machine ----------------------------------------------------------------------------------


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def attention_backend(cfg: RunConfig) -> list[str]:
    """A requested attention kernel that this machine cannot run (transformers fails at load time)."""
    if cfg.attention not in ("flash_attention_2", "varlen"):
        return []
    on_cpu = cfg.distributed.cpu or not _cuda_available()
    where = "distributed.cpu is set" if cfg.distributed.cpu else "no CUDA device is visible"
    if on_cpu:
        return [f"attention: {cfg.attention!r} needs a CUDA GPU but {where}; use 'auto' (sdpa on CPU)"]
    if cfg.attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        return ["attention: 'flash_attention_2' needs the flash-attn package, which is not installed; "
                "use 'auto' (PyTorch's varlen kernel) or pip install flash-attn"]
    return []


def runs_root(cfg: RunConfig) -> list[str]:
    """The runs root is (or can be made) a writable directory, and the run's own dir is not a file.

    Checked with os.access on the nearest existing folder, which sees permissions and read-only
    filesystems (EROFS) without creating anything. (As root, permission bits do not stop writes,
    and os.access agrees: only a read-only filesystem or a file in the way can stop root.)
    """
    root = Path(cfg.runs_root).expanduser()
    if root.exists() and not root.is_dir():
        return [f"runs_root: {str(root)!r} is a file, not a directory"]
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [f"runs_root: cannot create {str(root)!r}: {str(existing)!r} is a file, not a directory"]
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == root else f"cannot be created ({str(existing)!r} is not writable)"
        return [f"runs_root: {str(root)!r} {what}" + (" (a read-only filesystem)" if _read_only_fs(existing) else "")]
    run_dir = root / cfg.name
    if run_dir.exists() and not run_dir.is_dir():
        return [f"name: {str(run_dir)!r} exists and is not a run directory; pick another name"]
    if run_dir.is_dir() and not os.access(run_dir, os.W_OK | os.X_OK):
        return [f"name: the run directory {str(run_dir)!r} is not writable"]
    return []


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False
