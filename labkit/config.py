"""The run config: one typed, validated object per run.

The same `RunConfig` is written beside each run as `config.yaml` and read back by the
trainer, the launcher, the notebooks and papermill, so there is exactly one place
where a field's meaning and bounds live.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from labkit import runfiles

Schedule = Literal["constant", "cosine", "linear"]
SAFE_NAME = runfiles.SAFE_NAME  # use .fullmatch


class ConfigError(ValueError):
    """A config that cannot be used; the message has one line per bad field."""


class _Strict(BaseModel):
    # Unknown keys are almost always typos ("learning_rte"); refuse them loudly.
    # inf/nan pass `ge=0` bounds (inf >= 0) and then poison the optimizer: refuse them everywhere.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Phase(_Strict):
    """One training phase: datasets trained together for some epochs."""

    datasets: list[str] = Field(min_length=1)
    epochs: int = Field(default=1, ge=1)
    name: str | None = None


class Distributed(_Strict):
    num_processes: int = Field(default=1, ge=1)
    num_machines: int = Field(default=1, ge=1)
    machine_rank: int = Field(default=0, ge=0)
    main_process_ip: str | None = None
    main_process_port: int = Field(default=29500, ge=1, le=65535)
    # auto: single on one process; ddp on several when the memory plan fits a GPU, else fsdp (labkit.sharding).
    strategy: Literal["auto", "single", "ddp", "fsdp"] = "auto"
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    activation_checkpointing: bool | Literal["auto"] = "auto"  # auto: on from ~3B parameters (labkit.memory)
    cpu: bool = False
    accelerate_config: str | None = None  # a file under templates/accelerate/ or any path


class Slurm(_Strict):
    """Where a run goes on a Slurm cluster (`labkit run --on slurm`, labkit.slurm). Fields left unset
    come from the cluster profile (`LABKIT_SLURM_PROFILE`, default ~/.config/labkit/slurm.yaml)."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # sbatch --time, e.g. "24:00:00"
    gpus_per_node: int | None = Field(default=None, ge=0)  # default: num_processes / num_machines
    cpus_per_task: int | None = Field(default=None, ge=1)
    mem: str | None = None  # sbatch --mem, e.g. "64G"
    sbatch_args: list[str] = Field(default_factory=list)  # more options, e.g. ["--constraint=h100"]
    setup: list[str] = Field(default_factory=list)  # shell lines before training (module load ...)


class EarlyStop(_Strict):
    """Rules under which the trainer stops itself (it also stops when a STOP file appears)."""

    stop_on_nan: bool = True
    grad_norm_max: float | None = Field(default=None, gt=0)
    grad_norm_patience: int = Field(default=5, ge=1)
    loss_max: float | None = Field(default=None, gt=0)


class RunConfig(_Strict):
    name: str = "run"
    runs_root: str = "runs"
    model: str = "tiny"
    # Stacked training lists datasets here; phased training lists phases instead.
    datasets: list[str] = Field(default_factory=list)
    phases: list[Phase] = Field(default_factory=list)
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)

    effective_batch_size: int = Field(default=32, ge=1, description="samples per optimizer step")
    max_tokens_per_device: int = Field(default=4096, ge=16, description="token budget of one micro-batch")
    max_seq_len: int = Field(default=2048, ge=8)
    overlong: Literal["drop", "truncate"] = "drop"
    # -- data: template, labels, bad records (labkit.data.templates / tokenize / formats) --
    chat_template: str | None = Field(
        default=None, description="built-in (chatml, llama3, granite) or a .jinja path; required for base models")
    reasoning: Literal["keep", "drop", "template"] = Field(
        default="keep", description="<think> blocks / reasoning_content: train them in every turn (keep), "
        "remove them (drop), or as the chat template renders them (template)")
    train_on: Literal["assistant", "last_assistant", "all"] = "assistant"
    on_bad_record: Literal["raise", "skip"] = Field(
        default="raise", description="a bad data record stops the run before launch (raise) or is skipped and counted")
    packing: bool = True
    attention: Literal["auto", "flash_attention_2", "varlen", "sdpa", "eager"] = "auto"
    loss_chunk_tokens: int | None = Field(
        default=4096, ge=1, description="tokens per chunk of the fused head + loss (labkit.loss); "
        "null: transformers' loss, which materializes all logits")

    learning_rate: float = Field(default=2e-5, gt=0, le=1.0)
    schedule: Schedule = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    adam_beta1: float = Field(default=0.9, gt=0.0, lt=1.0)
    adam_beta2: float = Field(default=0.95, gt=0.0, lt=1.0)
    adam_eps: float = Field(default=1e-8, gt=0.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="numpy's seeds are 32-bit unsigned")

    save_every_samples: int | None = Field(default=None, ge=1)
    save_final: bool = True
    keep_checkpoints: int | None = Field(default=2, ge=1)
    val_dataset: str | None = None
    val_every_samples: int | None = Field(default=None, ge=1)
    eval_every_samples: int | None = Field(default=None, ge=1)
    eval_tasks: list[str] = Field(default_factory=list)
    eval_limit: int | None = Field(default=None, ge=1)
    resume: bool = False
    # Checkpoints and final/ (labkit.checkpoint): export dtype; a stopped run (STOP file, SIGTERM, early
    # stop) writes final/ only when asked; background evaluations' device (auto: cpu when the trainer
    # uses every visible GPU, else the first GPU it does not use).
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    save_final_on_stop: bool = False
    eval_device: str = "auto"

    distributed: Distributed = Field(default_factory=Distributed)
    early_stop: EarlyStop = Field(default_factory=EarlyStop)
    slurm: Slurm = Field(default_factory=Slurm)
    tags: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        problem = runfiles.name_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _one_data_source(self) -> RunConfig:
        if self.datasets and self.phases:
            raise ValueError("give either 'datasets' (stacked) or 'phases' (phased), not both")
        if not self.datasets and not self.phases:
            raise ValueError("no training data: set 'datasets' or 'phases'")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give either 'warmup_steps' or 'warmup_ratio', not both")
        return self

    # -- derived views -------------------------------------------------------------------------

    def training_phases(self) -> list[Phase]:
        """Phases to train, in order; stacked data is a single phase."""
        return list(self.phases) if self.phases else [Phase(datasets=self.datasets, epochs=self.epochs)]

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_root) / self.name

    def all_datasets(self) -> list[str]:
        names = [d for p in self.training_phases() for d in p.datasets]
        if self.val_dataset:
            names.append(self.val_dataset)
        return list(dict.fromkeys(names))

    def flat(self) -> dict[str, Any]:
        """Config as one flat dict (`distributed.num_processes`), for tables and the store."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}{k}.", v)
            else:
                out[prefix[:-1]] = _listval(value) if isinstance(value, list) else value

        walk("", self.model_dump(mode="json"))
        return out

    def check(self) -> list[str]:
        """Problems only the machine can show (files, catalog, libraries), one line each naming the
        field; [] when the run can start. Every entry point calls this before any process starts.

        One small named check per line below (labkit.checks), so a new one is a one-line addition.
        """
        from labkit import checks, memory

        problems: list[str] = []
        for check in (
            checks.model_dir,
            checks.datasets,
            checks.chat_template,
            checks.val_dataset,
            checks.batch_fits_data,
            checks.warmup_fits_training,
            checks.eval_tasks,
            checks.attention_backend,
            checks.runs_root,
            memory.check,
        ):
            problems += check(self)
        return problems

    def check_or_raise(self, source: str | Path | None = None) -> RunConfig:
        """`check()`, raising one ConfigError listing every problem; returns self when fine."""
        problems = self.check()
        if problems:
            where = f"{source}: " if source else ""
            raise ConfigError("\n  - ".join([f"{where}run {self.name!r} cannot run here:", *problems]))
        return self

    # -- YAML ----------------------------------------------------------------------------------

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_yaml())
        tmp.replace(path)
        return path

    def with_updates(self, **updates: Any) -> RunConfig:
        """A copy with (possibly dotted, e.g. `distributed.num_processes`) fields replaced, validated."""
        data = self.model_dump(mode="json")
        for key, value in updates.items():
            set_dotted(data, key, value)
        return from_dict(data)


def _listval(v: list) -> Any:
    return ",".join(map(str, v)) if all(not isinstance(x, dict) for x in v) else yaml.safe_dump(v).strip()


def set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        data = data.setdefault(p, {})
    data[parts[-1]] = value


def error_lines(err: ValidationError, root: str = "(config)") -> list[str]:
    """One `  - field.path: message` line per problem, worded for people editing YAML."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or root
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling)"
        elif e["type"] == "literal_error":
            msg = f"{msg}, got {e.get('input')!r}"
        lines.append(f"  - {loc}: {msg}")
    return lines


def _format_errors(err: ValidationError, source: str | None) -> str:
    where = f"{source}: " if source else ""
    return "\n".join([f"{where}invalid run config ({err.error_count()} problem(s)):", *error_lines(err)])


def from_dict(data: dict[str, Any], source: str | None = None) -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml when present
    """A safe loader that refuses a mapping with a repeated key: YAML lets the last one silently win."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then overriding a key is the point of a merge, not a mistake
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the base constructor reports it
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key}: duplicate key (first at line {first}); the last one would silently "
                    "win: keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str | Path = "<config>") -> Any:
    """YAML text as Python data, refusing duplicate keys; ConfigError names the file, line and key."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a safe loader
    except yaml.constructor.ConstructorError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else "?"
        raise ConfigError(f"{source}:{line}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None


def read_mapping(path: str | Path, what: str = "run config") -> dict[str, Any]:
    """A YAML file that must hold one mapping (an empty file is an empty one), duplicate keys refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what} file")
    data = parse_yaml(path.read_text(), path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} must be a YAML mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: dict[str, Any] | None = None, check: bool = False) -> RunConfig:
    """Read a run config from YAML; `overrides` are dotted keys (as papermill parameters give them)."""
    path = Path(path)
    data = read_mapping(path)
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    cfg = from_dict(data, source=str(path))
    return cfg.check_or_raise(path) if check else cfg
